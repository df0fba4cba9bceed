//! memctl as a process against a host-side service (memd-service over
//! memd-mm's host arena, served on loopback): output formats and exit codes.

mod common;

use std::net::TcpListener;

use memd_mm::HostMm;
use memd_service::host::{serve, HostService};

/// A host service on loopback (the test process exits at the end).
fn start_server() -> String {
    let mm = HostMm::three_zones(64 << 20, 0, "memd.dma_reserve=8M@dma32").unwrap();
    serve(HostService::shared(mm, "tok")).unwrap()
}

/// memctl with `args` split at whitespace.
fn memctl(addr: &str, token: &str, args: &str, stdin: &str) -> (i32, String, String) {
    let args: Vec<&str> = args.split_whitespace().collect();
    common::memctl(addr, token, &args, stdin)
}

#[test]
fn commands_formats_and_exit_codes() {
    let addr = start_server();
    let ok = |args: &str| {
        let (code, out, err) = memctl(&addr, "tok", args, "");
        assert_eq!(code, 0, "memctl {args}: {err}");
        out
    };
    assert!(ok("meminfo").contains("MemTotal:"));
    assert!(ok("buddyinfo").starts_with("Node 0, zone      DMA"));
    assert!(ok("zoneinfo").contains("pages free"));
    assert!(ok("slabinfo").contains("kmalloc-64"));
    assert!(ok("status").contains("max order"));
    assert!(ok("cma").contains("0x"));
    assert!(ok("alloc-pages 2 --gfp KERNEL|ZERO").contains("4 page(s)"));
    assert!(ok("kmalloc 100").contains("128 bytes"));
    assert!(ok("dma-alloc 1M --mask 32").contains("1048576 bytes"));
    assert!(ok("check").contains("hold"));
    assert!(ok("stress 2000").contains("ops/s"));
    assert!(ok("batch 500").contains("1000 ops"));
    let json = ok("--json meminfo");
    assert!(json.contains("\"total\""), "{json}");
    assert!(ok("--json buddyinfo").trim_start().starts_with('['));

    // A session keeps handles across commands.
    let (code, out, err) = memctl(
        &addr,
        "tok",
        "session",
        "cache-create foo 96\ncache-alloc $1\nslabinfo\ncache-destroy $1\n",
    );
    assert_eq!(code, 1, "destroy with a live object fails: {out} {err}");
    assert!(out.contains("foo"));
    assert!(err.contains("EBUSY"), "{err}");
    let (code, out, err) = memctl(
        &addr,
        "tok",
        "session",
        "kmalloc 64\nkfree $last\nkfree $1\n",
    );
    assert_eq!(code, 1, "{out} {err}");
    assert!(
        err.contains("kfree") && err.contains("ENOENT"),
        "double free: {err}"
    );

    // Server error: errno shown, exit 1.
    let (code, _, err) = memctl(&addr, "tok", "kfree 12345", "");
    assert_eq!(code, 1);
    assert!(err.contains("ENOENT"), "{err}");
    // Wrong token: exit 1 with EACCES.
    let (code, _, err) = memctl(&addr, "bad", "status", "");
    assert_eq!(code, 1);
    assert!(err.contains("EACCES"), "{err}");
    // Usage: exit 2.
    let (code, _, _) = memctl(&addr, "tok", "alloc-pages", "");
    assert_eq!(code, 2);
    // Nothing listening: exit 3.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (code, _, _) = memctl(&dead, "tok", "status", "");
    assert_eq!(code, 3);
}

#[test]
fn fault_injection_is_set_counted_and_cleared() {
    let addr = start_server();
    let run = |args: &str| memctl(&addr, "tok", args, "");
    let (code, out, err) = run("--json fault --slab --probability 100 --times 2");
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slab"]["probability"], 100);
    assert_eq!(v["slab"]["times"], 2);
    assert_eq!(v["pages"]["probability"], 0);
    // Exactly two slab allocations fail, with ENOMEM; the third succeeds.
    for _ in 0..2 {
        let (code, _, err) = run("kmalloc 64");
        assert_eq!(code, 1);
        assert!(err.contains("ENOMEM"), "{err}");
    }
    let (code, _, err) = run("kmalloc 64");
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run("--json fault");
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["slab"]["injected"], 2, "{out}");
    assert_eq!(v["slab"]["times"], 0, "{out}");
    // The table names both rules; --page sets the page rule.
    let (code, out, err) = run("fault --page --probability 0");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("failslab") && out.contains("fail_page_alloc"),
        "{out}"
    );
    // Setting needs a probability.
    let (code, _, err) = run("fault --slab");
    assert_eq!(code, 2, "usage error: {err}");
}

/// memctl with `args`, its output a pipe whose reader is already gone:
/// every write fails as it does under `memctl ... | head -1`.
fn memctl_into_closed_pipe(addr: &str, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    std::process::Command::new(env!("CARGO_BIN_EXE_memctl"))
        .args(["--addr", addr, "--token", "tok", "--wait", "2"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_ends_memctl_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let addr = start_server();
    for args in [
        &["completions", "bash"][..],
        &["meminfo"],
        &["--json", "slabinfo"],
        &["buddy", "--histogram"],
        &["map"],
    ] {
        let out = memctl_into_closed_pipe(&addr, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "memctl {args:?} into a closed pipe: {err}"
        );
        // Ended by SIGPIPE, as `cat` would be, or quietly by itself.
        assert!(
            out.status.signal() == Some(13) || out.status.success(),
            "memctl {args:?}: {:?}",
            out.status
        );
    }
}

/// A host service with both roles: operator token "op", client token "cl".
fn start_server_with_roles() -> String {
    let mm = HostMm::three_zones(64 << 20, 0, "").unwrap();
    serve(HostService::shared_with_roles(mm, "op", "cl")).unwrap()
}

#[test]
fn a_client_token_may_not_run_operator_commands() {
    let addr = start_server_with_roles();
    // The client token: views and allocation work, but EPERM (exit 1, a
    // server error) for what only the operator may do.
    for args in ["status", "meminfo", "kmalloc 64", "fault"] {
        let (code, _, err) = memctl(&addr, "cl", args, "");
        assert_eq!(code, 0, "client: memctl {args}: {err}");
    }
    for args in [
        "check",
        "shutdown",
        "drop-caches",
        "stress 100",
        "fault --slab --probability 0",
    ] {
        let (code, _, err) = memctl(&addr, "cl", args, "");
        assert_eq!(code, 1, "client: memctl {args}: {err}");
        assert!(err.contains("EPERM"), "client: memctl {args}: {err}");
    }
    let (code, out, err) = memctl(&addr, "cl", "session", "kmalloc 64\ncheck\n");
    assert_eq!(code, 1, "{out} {err}");
    assert!(
        out.contains("bytes") && err.contains("EPERM"),
        "{out} {err}"
    );
    // The operator token runs them.
    let (code, out, err) = memctl(&addr, "op", "check", "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("hold"), "{out}");
    let (code, _, err) = memctl(&addr, "op", "shutdown", "");
    assert_eq!(code, 0, "operator shutdown: {err}");
}

#[test]
fn memctl_picks_the_operator_token_for_operator_commands() {
    let addr = start_server_with_roles();
    let dir = std::env::temp_dir().join(format!("memctl-roles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(".memd")).unwrap();
    std::fs::write(dir.join(".memd/token"), "cl\n").unwrap();
    std::fs::write(dir.join(".memd/operator-token"), "op\n").unwrap();
    let run = |env: &[(&str, &str)], args: &str, stdin: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        common::memctl_discovering(&addr, &dir, env, &args, stdin)
    };
    // From .memd/: the operator's token where needed, the client's else.
    let (code, out, err) = run(&[], "check", "");
    assert_eq!(code, 0, "check with .memd/operator-token: {err}");
    assert!(out.contains("hold"), "{out}");
    let (code, out, err) = run(&[], "session", "kmalloc 64\ndrop-caches\ncheck\n");
    assert_eq!(code, 0, "session: {out} {err}");
    let (code, out, err) = run(&[], "--json clients", "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("memctl"), "{out}");
    // --token overrides both: the client token gets EPERM for check.
    let (code, _, err) = run(&[], "--token cl check", "");
    assert_eq!(code, 1);
    assert!(err.contains("EPERM"), "{err}");
    // The variables beat the files.
    let (code, _, err) = run(&[("MEMD_OPERATOR_TOKEN", "cl")], "check", "");
    assert_eq!(code, 1);
    assert!(err.contains("EPERM"), "{err}");
    let (code, _, err) = run(&[("MEMD_TOKEN", "wrong")], "status", "");
    assert_eq!(code, 1);
    assert!(err.contains("EACCES"), "{err}");
    // A client token in the environment comes before the operator token
    // in .memd/: it was set for a service the file may not belong to.
    let (code, _, err) = run(&[("MEMD_TOKEN", "cl")], "check", "");
    assert_eq!(code, 1);
    assert!(err.contains("EPERM"), "{err}");
    // No operator token anywhere: the client token is used, and the
    // service's refusal is an ordinary server error.
    std::fs::remove_file(dir.join(".memd/operator-token")).unwrap();
    let (code, _, err) = run(&[], "check", "");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("EPERM"), "{err}");
    let (code, _, err) = run(&[], "status", "");
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
