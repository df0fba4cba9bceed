//! memctl against a booted guest: every view, the map picture and a
//! session of every operation, with the tokens picked by memctl itself.

use crate::tokens::GuestTokens;

/// The memctl binary the host tests built (`cargo test --workspace` builds
/// it; built here too so `--boot-only` works on its own).
pub(crate) fn memctl_binary() -> Result<std::path::PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .current_dir(crate::build::repo_root())
                .args(["build", "-q", "-p", "memctl"])
                .status()
                .map_err(|e| format!("building memctl: {e}"))?
                .success();
            if !ok {
                return Err("building memctl failed".into());
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| crate::build::repo_root().join("target"));
            Ok(target.join("debug").join("memctl"))
        })
        .clone()
}

/// Runs memctl against the guest with the token variables `env` (memctl
/// picks the role's token itself; none goes on its command line): returns
/// (exit code, stdout, stderr).
pub(super) fn memctl(
    port: u16,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> Result<(i32, String, String), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(memctl_binary()?)
        .env_remove("MEMD_TOKEN")
        .env_remove("MEMD_OPERATOR_TOKEN")
        .envs(env.iter().copied())
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("memctl {args:?}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .map_err(|e| format!("memctl {args:?} stdin: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("memctl {args:?}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every memctl command against the booted kernel: each view in the human
/// and the JSON form, the map picture, and every operation in one session
/// (handles live as long as their connection). memctl is given both
/// tokens and picks the operator's for `check` and sessions; given only
/// the client's, `check` is refused with EPERM.
pub(super) fn memctl_check(
    port: u16,
    tokens: &GuestTokens,
    qmp: &std::path::Path,
) -> Result<(), String> {
    let both = [
        ("MEMD_TOKEN", tokens.client.as_str()),
        ("MEMD_OPERATOR_TOKEN", tokens.operator.as_str()),
    ];
    let (code, _, err) = memctl(port, &both[..1], &["check"], "")?;
    if code != 1 || !err.contains("EPERM") {
        return Err(format!(
            "memctl check with the client token: exit {code}, want 1 and EPERM\n{err}"
        ));
    }
    let expect = |args: &[&str], stdin: &str, want: &str| -> Result<String, String> {
        let (code, out, err) = memctl(port, &both, args, stdin)?;
        if code != 0 || !out.contains(want) {
            return Err(format!(
                "memctl {args:?}: exit {code}, wanted {want:?} in stdout\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            ));
        }
        Ok(out)
    };
    for (view, want) in [
        ("status", "protocol"),
        ("meminfo", "MemTotal"),
        ("zoneinfo", "pages free"),
        ("buddyinfo", "zone"),
        ("slabinfo", "kmalloc-64"),
        ("mempools", ""),
        ("cma", ""),
        ("clients", ""),
        ("dma-list", "virtio-net"),
        ("map", "DMA32"),
        ("fault", "failslab"),
        ("check", "hold"),
    ] {
        expect(&[view], "", want)?;
        expect(&["--json", view], "", "")?;
    }
    expect(&["buddy", "--histogram"], "", "DMA32")?;
    // The balloon through QMP and memd: 128 MiB taken, then given back.
    let qmp_arg = qmp.display().to_string();
    expect(
        &["balloon", "--qmp", &qmp_arg],
        "",
        "asked of the balloon         0 MiB",
    )?;
    let ram = expect(&["--json", "balloon", "--qmp", &qmp_arg], "", "guest_bytes")?;
    let ram: serde_json::Value = serde_json::from_str(&ram).map_err(|e| e.to_string())?;
    let ram = ram["guest_bytes"]
        .as_u64()
        .ok_or("memctl balloon --json: no guest_bytes")?;
    let less = format!("{}", ram - (128 << 20));
    expect(
        &["balloon", &less, "--qmp", &qmp_arg],
        "",
        "in the balloon (memd)        128 MiB",
    )?;
    expect(&["zoneinfo"], "", "balloon")?;
    expect(
        &["balloon", &ram.to_string(), "--qmp", &qmp_arg],
        "",
        "in the balloon (memd)        0 MiB",
    )?;
    let svg = std::env::temp_dir().join(format!("memd-boot-map-{port}.svg"));
    let svg_arg = svg.display().to_string();
    expect(&["map", "--out", &svg_arg], "", "")?;
    let picture = std::fs::read_to_string(&svg).map_err(|e| format!("map --out: {e}"))?;
    let _ = std::fs::remove_file(&svg);
    if !picture.contains("<svg") || !picture.contains("DMA32") {
        return Err("map --out wrote no picture of the zones".into());
    }
    let script = "\
alloc-pages 3 --gfp KERNEL|ZERO
free-pages $1
kmalloc 100
kfree $3
cache-create e2e 96 --flags POISON|RED_ZONE
cache-alloc $5
pool-create cache:$5 2
pool-alloc $7
pool-free $7 $8
pool-destroy $7
cache-free $5 $6
cache-shrink $5
cache-destroy $5
dma-alloc 1M --mask 32
dma-fill $14 7
dma-checksum $14
dma-write $14 0 hello
dma-read $14 0 5
dma-write-disk $14 0
dma-read-disk $14 0
dma-free $14
stress 20000
fault --slab --probability 0
batch 200
check
drop-caches
";
    let out = expect(&["session"], script, "hold")?;
    for want in [
        "8 page(s)",
        "128 bytes",
        "1048576 bytes",
        "ops/s",
        "hello",
        "moved in place",
    ] {
        if !out.contains(want) {
            return Err(format!("memctl session: no {want:?} in\n{out}"));
        }
    }
    Ok(())
}
