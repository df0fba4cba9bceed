//! What memctl's integration tests share.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs the memctl binary against `addr` with `token` and `args`, feeding
/// it `stdin`: (exit code, stdout, stderr).
pub fn memctl(addr: &str, token: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_memctl"))
        .args(["--addr", addr, "--token", token, "--wait", "2"])
        .args(args)
        .env_remove("MEMD_TOKEN")
        .env_remove("MEMD_ADDR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
