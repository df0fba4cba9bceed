//! What memctl's integration tests share.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs the memctl binary against `addr` with `token` and `args`, feeding
/// it `stdin`: (exit code, stdout, stderr).
#[allow(dead_code)] // not every test file uses both runners
pub fn memctl(addr: &str, token: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memctl"));
    cmd.args(["--token", token]);
    run(cmd, addr, args, stdin)
}

/// Runs the memctl binary against `addr` without `--token`, in directory
/// `cwd` with the environment variables `env` set: memctl finds its tokens
/// itself.
#[allow(dead_code)] // not every test file uses both runners
pub fn memctl_discovering(
    addr: &str,
    cwd: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memctl"));
    cmd.current_dir(cwd).envs(env.iter().copied());
    run(cmd, addr, args, stdin)
}

fn run(mut cmd: Command, addr: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    // Variables of the test's own environment never leak into memctl's.
    for var in ["MEMD_TOKEN", "MEMD_OPERATOR_TOKEN", "MEMD_ADDR"] {
        if !cmd.get_envs().any(|(k, _)| k == var) {
            cmd.env_remove(var);
        }
    }
    let mut child = cmd
        .args(["--addr", addr, "--wait", "2"])
        .args(args)
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
