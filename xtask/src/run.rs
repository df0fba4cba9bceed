//! `cargo xtask run`: build the kernel, start QEMU in the foreground with the
//! console on stdout (Ctrl-C stops it).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::guest::GuestArgs;
use crate::qemu;
use crate::tokens::GuestTokens;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TCP port of the service; QEMU forwards 127.0.0.1:PORT to the guest.
    #[arg(long, default_value_t = 5555)]
    pub port: u16,
    /// Raw disk image for virtio-blk (default: .memd/disk.img, created
    /// sparse when missing).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Size of the disk image (512M, 1G ...): a missing image is created
    /// sparse with this size, a smaller one is extended (never shrunk).
    #[arg(long, value_parser = parse_size)]
    pub disk_size: Option<u64>,
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// Size of the default disk image.
const DEFAULT_DISK_BYTES: u64 = 256 << 20;

/// Parses a byte size: a number with an optional K, M, G or T suffix
/// (powers of 1024, optional trailing "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 1G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&b| b > 0 && b % 512 == 0)
        .ok_or_else(|| format!("{s:?}: a disk size must be a non-zero multiple of 512 bytes"))
}

/// Makes sure `path` is a raw image of at least `size` bytes: created
/// sparse when missing, extended (sparse) when smaller.
pub fn ensure_disk(path: &std::path::Path, size: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() >= size => Ok(()),
        Ok(m) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            f.set_len(size).context("extending the disk image")?;
            eprintln!(
                "xtask: extended {} from {} to {} MiB (sparse)",
                path.display(),
                m.len() >> 20,
                size >> 20
            );
            Ok(())
        }
        Err(_) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.set_len(size).context("sizing the disk image")?;
            eprintln!(
                "xtask: created {} ({} MiB, sparse)",
                path.display(),
                size >> 20
            );
            Ok(())
        }
    }
}

/// Writes fresh tokens to `.memd/token` (the clients') and
/// `.memd/operator-token` (mode 0600), and `.memd/addr`, at the repository
/// root, where memctl and memd-client look for them.
pub fn write_connection_files(port: u16) -> Result<(PathBuf, GuestTokens)> {
    let dir = crate::build::repo_root().join(".memd");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tokens = GuestTokens::write_in(&dir)?;
    std::fs::write(dir.join("addr"), format!("127.0.0.1:{port}\n"))
        .context("writing .memd/addr")?;
    Ok((dir, tokens))
}

/// Refuses a `memd.token=` word: tokens never go on a command line (any
/// local user can read it in /proc), and the kernel ignores it.
fn refuse_token_on_cmdline(cmdline: &str) -> Result<()> {
    if cmdline
        .split_whitespace()
        .any(|w| w.starts_with("memd.token="))
    {
        bail!("memd.token= on --cmdline: the tokens are passed as fw_cfg files (.memd/token and .memd/operator-token, written by this command), never on a command line");
    }
    Ok(())
}

/// Refuses a port something already listens on (most often a memd left
/// running): QEMU could not forward it, and fresh tokens written for the
/// new guest would lock clients out of the old one.
fn refuse_taken_port(port: u16) -> Result<()> {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        bail!(
            "127.0.0.1:{port} is taken (a memd still running? `cargo run -q -p memctl -- shutdown` stops it); \
             choose another with --port"
        );
    }
    Ok(())
}

pub fn run(args: &RunArgs) -> Result<()> {
    refuse_token_on_cmdline(&args.guest.cmdline)?;
    refuse_taken_port(args.port)?;
    let kernel = crate::build::build_kernel()?;
    let (cfg, accel) = args.guest.config(kernel, "")?;
    eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    let (dir, tokens) = write_connection_files(args.port)?;
    let disk = args.disk.clone().unwrap_or_else(|| dir.join("disk.img"));
    match args.disk_size {
        Some(size) => ensure_disk(&disk, size)?,
        None if !disk.exists() => ensure_disk(&disk, DEFAULT_DISK_BYTES)?,
        None => {}
    }
    // QMP beside `.memd/addr`: `memctl balloon` sets the balloon's target.
    let qmp = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    let cfg = cfg.serve(args.port, &tokens.files).disk(disk).qmp(qmp);
    eprintln!("xtask: {}", cfg.describe());
    eprintln!(
        "xtask: host 127.0.0.1:{} is forwarded to the guest's port; Ctrl-C stops QEMU",
        args.port
    );
    let mut child = cfg
        .command()
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting QEMU")?;
    let started = Instant::now();
    let stdout = child.stdout.take().expect("piped stdout");
    let port = args.port;
    let copier = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let _ = out.write_all(&line);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            if line
                .windows(qemu::READY_LINE.len())
                .any(|w| w == qemu::READY_LINE.as_bytes())
            {
                eprintln!(
                    "xtask: memd is ready after {} ms: connect to 127.0.0.1:{port} (tokens in {}/token and operator-token; memctl finds them)",
                    started.elapsed().as_millis(),
                    dir.display()
                );
            }
        }
    });
    let status = child.wait().context("running QEMU")?;
    let _ = copier.join();
    run_result(status, selftest_requested(&args.guest.cmdline))
}

/// Whether the guest was asked to run its self-test and exit.
fn selftest_requested(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|w| w.strip_prefix("memd.selftest=").is_some_and(|v| v != "0"))
}

/// What `cargo xtask run` reports for QEMU's exit. A Ctrl-C reaches QEMU
/// and xtask alike: QEMU catches it and exits 0, and xtask itself dies of
/// it. So a QEMU killed by a signal (an abort at start, a crash) is always
/// a failure, and with a self-test only the guest's own success counts.
fn run_result(status: std::process::ExitStatus, selftest: bool) -> Result<()> {
    match status.code() {
        Some(qemu::GUEST_SUCCESS) => Ok(()),
        Some(qemu::GUEST_FAILURE) => {
            bail!("the guest reported a failure (panic, fault or failed self-test)")
        }
        Some(0) if selftest => {
            bail!("QEMU exited before the guest reported its self-test result")
        }
        Some(0) => Ok(()), // QEMU quit (monitor `quit`, or Ctrl-C caught by QEMU)
        _ => bail!("QEMU failed: {}", qemu::describe_status(status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_refused_before_anything_is_written() {
        let held = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let e = refuse_taken_port(port).unwrap_err().to_string();
        assert!(e.contains("is taken"), "{e}");
        drop(held);
        refuse_taken_port(port).unwrap();
    }

    #[test]
    fn a_qemu_killed_by_a_signal_fails_the_run() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        // wait(2) statuses: a signal in the low 7 bits, an exit code above.
        let abort = ExitStatus::from_raw(6);
        let segv = ExitStatus::from_raw(11);
        let exit = |c: i32| ExitStatus::from_raw(c << 8);
        let err = run_result(abort, false).unwrap_err().to_string();
        assert!(err.contains("SIGABRT"), "{err}");
        assert!(run_result(segv, false).is_err());
        assert!(run_result(exit(1), false).is_err());
        assert!(run_result(exit(qemu::GUEST_FAILURE), false).is_err());
        assert!(run_result(exit(qemu::GUEST_SUCCESS), true).is_ok());
        assert!(run_result(exit(0), false).is_ok());
        assert!(
            run_result(exit(0), true).is_err(),
            "a self-test passes only when the guest says so"
        );
    }

    #[test]
    fn selftest_is_seen_on_the_command_line() {
        assert!(selftest_requested("memd.log=debug memd.selftest=1"));
        assert!(selftest_requested("memd.selftest=panic"));
        assert!(!selftest_requested("memd.selftest=0"));
        assert!(!selftest_requested("memd.log=debug"));
    }

    #[test]
    fn a_token_on_the_command_line_is_refused() {
        assert!(refuse_token_on_cmdline("memd.log=debug memd.token=abc").is_err());
        assert!(refuse_token_on_cmdline("memd.log=debug memd.dma_reserve=64M@dma32").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("100").is_err());
        assert!(parse_size("1X").is_err());
    }

    #[test]
    fn disk_is_created_sparse_and_only_grows() {
        let p = std::env::temp_dir().join(format!("xtask-disk-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        ensure_disk(&p, 1 << 30).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 30);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert!(m.blocks() * 512 < 1 << 20, "the image is not sparse");
        }
        ensure_disk(&p, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        ensure_disk(&p, 2 << 30).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30);
        std::fs::remove_file(&p).unwrap();
    }
}
