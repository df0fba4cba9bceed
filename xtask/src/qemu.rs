//! QEMU: finding (or installing) it, choosing the accelerator, building the
//! command line, and running a guest with a time bound while reading its
//! console.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::tokens::TokenFiles;

pub const QEMU: &str = "qemu-system-x86_64";
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// isa-debug-exit: the guest writes `v`, QEMU exits with `(v << 1) | 1`.
/// Must match unikernel/kernel/src/arch/exit.rs.
pub const GUEST_SUCCESS: i32 = (0x10 << 1) | 1;
pub const GUEST_FAILURE: i32 = (0x11 << 1) | 1;

/// The line the kernel prints once it is up.
pub const READY_LINE: &str = "memd: ready";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// `-M microvm`: qboot, virtio-mmio (the default).
    Microvm,
    /// `-M q35`: SeaBIOS + pvh.bin, virtio over PCI.
    Q35,
    /// `-M microvm,pcie=on`: qboot (BARs left unassigned), virtio over PCIe.
    MicrovmPcie,
    /// `-M microvm,pit=off`: no PIT to calibrate the TSC against (tests).
    #[value(skip)]
    MicrovmNoPit,
}

impl Machine {
    pub fn name(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
            Machine::MicrovmPcie => "microvm-pcie",
            Machine::MicrovmNoPit => "microvm-nopit",
        }
    }

    /// The `-M` argument.
    pub fn qemu_machine(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
            Machine::MicrovmPcie => "microvm,pcie=on",
            Machine::MicrovmNoPit => "microvm,pit=off",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM where the CPU really virtualises (vmx/svm) and /dev/kvm opens, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator actually used, and why.
#[derive(Clone, Debug)]
pub struct AccelChoice {
    pub kvm: bool,
    pub reason: String,
}

impl AccelChoice {
    pub fn name(&self) -> &'static str {
        if self.kvm {
            "kvm"
        } else {
            "tcg"
        }
    }
}

fn cpu_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn kvm_opens() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether QEMU can start a `machine` with KVM here: a paused guest
/// (`-S`) is created, its vCPU reset and its registers loaded into KVM, then
/// quit from the monitor. Some `/dev/kvm`s open but refuse a vCPU's MSRs and
/// QEMU aborts at start; that is caught here, before a real run.
pub fn kvm_starts(qemu: &Path, machine: Machine) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(qemu)
        .args([
            "-M",
            machine.qemu_machine(),
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ])
        .args(["-m", "32M", "-S", "-nodefaults", "-display", "none"])
        .args(["-monitor", "stdio", "-serial", "none"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // QEMU reads the monitor once the machine is up; if it died first,
        // the write fails and the status below tells why.
        let _ = stdin.write_all(b"quit\n");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    Err(format!(
                        "QEMU with KVM failed to start ({}): {first}",
                        describe_status(status)
                    ))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("QEMU with KVM did not come up within 20 s".into());
            }
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    }
}

/// "exit status 3" or "killed by signal 6 (SIGABRT)".
pub fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => {
            let name = match sig {
                1 => " (SIGHUP)",
                2 => " (SIGINT)",
                4 => " (SIGILL)",
                6 => " (SIGABRT)",
                7 => " (SIGBUS)",
                9 => " (SIGKILL)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                _ => "",
            };
            format!("killed by signal {sig}{name}")
        }
        (None, None) => "no exit status".into(),
    }
}

/// Chooses the accelerator. KVM needs a CPU that shows `vmx`/`svm`, a
/// `/dev/kvm` that opens, and a QEMU that starts with it (`kvm_starts`): a
/// `/dev/kvm` served by `kvm_pvm` (no hardware virtualisation) runs guest
/// kernel code ~1000x slower than TCG, and may refuse the vCPU outright.
pub fn choose_accel(requested: Accel, qemu: &Path, machine: Machine) -> Result<AccelChoice> {
    let hw = cpu_has_hw_virt();
    let dev = kvm_opens();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    match requested {
        Accel::Tcg => Ok(AccelChoice { kvm: false, reason: "requested with --accel tcg".into() }),
        Accel::Kvm => match dev {
            Err(e) => bail!("--accel kvm: cannot open /dev/kvm: {e}"),
            Ok(()) => {
                if let Err(e) = kvm_starts(qemu, machine) {
                    bail!("--accel kvm: {e}{}", if pvm { " (/dev/kvm is kvm_pvm; use --accel tcg)" } else { "" });
                }
                Ok(if hw {
                    AccelChoice { kvm: true, reason: "requested with --accel kvm".into() }
                } else {
                    AccelChoice {
                        kvm: true,
                        reason: format!(
                            "requested with --accel kvm, although the CPU shows no vmx/svm flag{}: expect guest code to run far slower than under TCG",
                            if pvm { " and /dev/kvm is kvm_pvm" } else { "" }
                        ),
                    }
                })
            }
        },
        Accel::Auto => Ok(match (hw, dev) {
            (true, Ok(())) => match kvm_starts(qemu, machine) {
                Ok(()) => AccelChoice { kvm: true, reason: "CPU has vmx/svm, /dev/kvm opens and QEMU starts with it".into() },
                Err(e) => AccelChoice { kvm: false, reason: format!("CPU has vmx/svm but {e}") },
            },
            (true, Err(e)) => AccelChoice { kvm: false, reason: format!("CPU has vmx/svm but /dev/kvm does not open ({e})") },
            (false, Ok(())) => AccelChoice {
                kvm: false,
                reason: format!(
                    "/dev/kvm opens but the CPU shows no vmx/svm flag{}: KVM there runs guest kernel code ~1000x slower than TCG",
                    if pvm { " (module kvm_pvm)" } else { "" }
                ),
            },
            (false, Err(_)) => AccelChoice { kvm: false, reason: "no hardware virtualisation (no vmx/svm flag, no usable /dev/kvm)".into() },
        }),
    }
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Finds `qemu-system-x86_64`, installing the `qemu-system-x86` package with
/// apt-get when it is missing and we are root.
pub fn ensure_qemu() -> Result<PathBuf> {
    if let Some(p) = find_in_path(QEMU) {
        return Ok(p);
    }
    let have_apt = find_in_path("apt-get").is_some();
    if !(is_root() && have_apt) {
        bail!(
            "{QEMU} not found in PATH. Install the package `{QEMU_PACKAGE}` (Debian/Ubuntu: `sudo apt-get install {QEMU_PACKAGE}`){}",
            if have_apt { "" } else { "; apt-get is not available here" }
        );
    }
    eprintln!("xtask: {QEMU} missing; installing {QEMU_PACKAGE} with apt-get");
    let install = |update: bool| -> Result<bool> {
        if update {
            Command::new("apt-get")
                .args(["update", "-q"])
                .status()
                .context("running apt-get update")?;
        }
        Ok(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                QEMU_PACKAGE,
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?
            .success())
    };
    if !install(false)? && !install(true)? {
        bail!("apt-get install {QEMU_PACKAGE} failed");
    }
    find_in_path(QEMU)
        .with_context(|| format!("{QEMU_PACKAGE} installed but {QEMU} still not in PATH"))
}

/// One guest.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub machine: Machine,
    pub kvm: bool,
    /// `-m` value, e.g. `1G`.
    pub mem: String,
    pub cmdline: String,
    /// Forward host 127.0.0.1:port to the guest's port (user networking).
    pub forward_port: Option<u16>,
    /// A raw disk image attached as virtio-blk.
    pub disk: Option<PathBuf>,
    /// A Unix socket for QEMU's monitor (`cargo xtask profile` reads the
    /// vCPU's registers through it).
    pub monitor: Option<PathBuf>,
    /// `-icount shift=0` (TCG): the guest's clock counts instructions, one
    /// nanosecond each, so guest-measured times are instruction counts.
    pub icount: bool,
    /// Files holding the auth tokens, handed to the guest as fw_cfg files
    /// (QEMU reads them; only their paths are on its command line).
    pub tokens: Option<TokenFiles>,
}

/// The fw_cfg file names the kernel reads its tokens from.
pub const FW_CFG_CLIENT_TOKEN: &str = "opt/memd/token";
pub const FW_CFG_OPERATOR_TOKEN: &str = "opt/memd/operator-token";

/// `-fw_cfg name=NAME,file=PATH`'s value, with the commas of the path
/// doubled as QEMU's option syntax wants.
fn fw_cfg_arg(name: &str, path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut arg = format!("name={name},file=").into_bytes();
    for &b in path.as_os_str().as_bytes() {
        arg.push(b);
        if b == b',' {
            arg.push(b',');
        }
    }
    std::ffi::OsString::from_vec(arg)
}

impl QemuConfig {
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.qemu);
        c.args(["-M", self.machine.qemu_machine()]);
        if self.kvm {
            c.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            // `max` gives TCG 1 GiB pages (a smaller direct map) and more CPUID leaves.
            c.args(["-accel", "tcg", "-cpu", "max"]);
        }
        c.args(["-m", &self.mem]);
        c.arg("-kernel").arg(&self.kernel);
        c.args(["-append", &self.cmdline]);
        c.args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        if let Some(port) = self.forward_port {
            let dev = match self.machine {
                Machine::Microvm | Machine::MicrovmNoPit => "virtio-net-device,netdev=n0",
                Machine::Q35 | Machine::MicrovmPcie => "virtio-net-pci,netdev=n0",
            };
            c.args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{port}"),
            ]);
            c.args(["-device", dev]);
        }
        if self.icount && !self.kvm {
            c.args(["-icount", "shift=0,sleep=off"]);
        }
        if let Some(sock) = &self.monitor {
            let mut arg = std::ffi::OsString::from("unix:");
            arg.push(sock);
            arg.push(",server,nowait");
            c.arg("-monitor").arg(arg);
        }
        if let Some(t) = &self.tokens {
            c.arg("-fw_cfg")
                .arg(fw_cfg_arg(FW_CFG_CLIENT_TOKEN, &t.client));
            c.arg("-fw_cfg")
                .arg(fw_cfg_arg(FW_CFG_OPERATOR_TOKEN, &t.operator));
        }
        if let Some(disk) = &self.disk {
            let mut drive = std::ffi::OsString::from("file=");
            drive.push(disk);
            drive.push(",if=none,format=raw,id=d0");
            c.arg("-drive").arg(drive);
            c.args([
                "-device",
                match self.machine {
                    Machine::Microvm | Machine::MicrovmNoPit => "virtio-blk-device,drive=d0",
                    Machine::Q35 | Machine::MicrovmPcie => "virtio-blk-pci,drive=d0",
                },
            ]);
        }
        c
    }

    /// The command line as a shell-like string, for messages.
    pub fn describe(&self) -> String {
        let c = self.command();
        let mut s = c.get_program().to_string_lossy().into_owned();
        for a in c.get_args() {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                s += &format!(" '{a}'");
            } else {
                s += &format!(" {a}");
            }
        }
        s
    }
}

/// What a bounded run saw.
#[derive(Debug)]
pub struct RunOutcome {
    /// Console lines (stdout), with the time each arrived after spawn.
    pub lines: Vec<(Duration, String)>,
    pub stderr: String,
    /// QEMU's exit status; `None` if it was killed (timeout or stop condition).
    pub status: Option<i32>,
    pub timed_out: bool,
    /// Time from spawn to the `memd: ready` line.
    pub ready_after: Option<Duration>,
    /// What the `on_ready` action returned, if it ran.
    pub action: Option<Result<(), String>>,
}

impl RunOutcome {
    pub fn console(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn panicked(&self) -> bool {
        self.lines
            .iter()
            .any(|(_, l)| l.contains("memd: PANIC") || l.contains("memd: FATAL"))
    }
}

/// Kills the child when dropped (so no QEMU outlives an error path).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs a guest for at most `timeout`, collecting its console. If
/// `stop_at_ready` is set, QEMU is killed as soon as `memd: ready` appears.
pub fn run_bounded(cfg: &QemuConfig, timeout: Duration, stop_at_ready: bool) -> Result<RunOutcome> {
    run_with(cfg, timeout, stop_at_ready, None)
}

/// A free TCP port on 127.0.0.1 (for a host forward).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// As `run_bounded`; when `memd: ready` appears, runs `on_ready` (e.g. a
/// client talking to the guest), records its result and stops QEMU.
pub fn run_with(
    cfg: &QemuConfig,
    timeout: Duration,
    stop_at_ready: bool,
    mut on_ready: Option<&mut dyn FnMut() -> Result<(), String>>,
) -> Result<RunOutcome> {
    let mut cmd = cfg.command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .with_context(|| format!("starting {}", cfg.qemu.display()))?,
    );
    let stdout = child.0.stdout.take().expect("piped stdout");
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let s = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send((start.elapsed(), s)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut out = RunOutcome {
        lines: Vec::new(),
        stderr: String::new(),
        status: None,
        timed_out: false,
        ready_after: None,
        action: None,
    };
    let deadline = start + timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            out.timed_out = true;
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((t, line)) => {
                let ready = line.contains(READY_LINE);
                if ready && out.ready_after.is_none() {
                    out.ready_after = Some(t);
                }
                out.lines.push((t, line));
                if ready {
                    if let Some(action) = on_ready.as_mut() {
                        out.action = Some(action());
                        break;
                    }
                    if stop_at_ready {
                        break;
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.timed_out = true;
                break;
            }
            // stdout closed: QEMU is exiting.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if out.timed_out || out.action.is_some() || (stop_at_ready && out.ready_after.is_some()) {
        let _ = child.0.kill();
    }
    let status = child.0.wait().context("waiting for QEMU")?;
    out.status = status.code();
    let _ = reader.join();
    // Lines that arrived between the stop and the kill.
    out.lines.extend(rx.try_iter());
    out.stderr = err_reader.join().unwrap_or_default();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::tests::mode;
    use crate::tokens::GuestTokens;

    fn config(tokens: Option<TokenFiles>) -> QemuConfig {
        QemuConfig {
            qemu: PathBuf::from(QEMU),
            kernel: PathBuf::from("/k/memd-kernel"),
            machine: Machine::Microvm,
            kvm: false,
            mem: "1G".into(),
            cmdline: "memd.port=5555".into(),
            forward_port: Some(5555),
            disk: None,
            monitor: None,
            icount: false,
            tokens,
        }
    }

    #[test]
    fn tokens_reach_qemu_as_fw_cfg_files_never_as_arguments() {
        let t = GuestTokens::temporary("xtask-unit").unwrap();
        let dir = t.files.client.parent().unwrap().to_path_buf();
        assert_eq!(mode(&dir), 0o700);
        for (path, token) in [
            (&t.files.client, &t.client),
            (&t.files.operator, &t.operator),
        ] {
            assert_eq!(mode(path), 0o600, "{}", path.display());
            assert_eq!(std::fs::read_to_string(path).unwrap().trim(), token);
        }
        assert_ne!(t.client, t.operator);
        let cmd = config(Some(t.files.clone())).command();
        assert!(!t.appear_in(&cmd), "a token on QEMU's command line");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let fw_cfg: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-fw_cfg")
            .map(|w| &w[1])
            .collect();
        assert_eq!(
            fw_cfg,
            [
                &format!("name=opt/memd/token,file={}", t.files.client.display()),
                &format!(
                    "name=opt/memd/operator-token,file={}",
                    t.files.operator.display()
                ),
            ]
        );
        assert!(!args.iter().any(|a| a.contains("memd.token")));
        let described = config(Some(t.files.clone())).describe();
        assert!(!described.contains(&t.client) && !described.contains(&t.operator));
        // Without token files there is no -fw_cfg.
        assert!(!config(None).command().get_args().any(|a| a == "-fw_cfg"));
        // The directory and the files go with the tokens.
        drop(t);
        assert!(!dir.exists());
    }

    #[test]
    fn commas_in_token_paths_are_doubled() {
        let arg = fw_cfg_arg("opt/x", Path::new("/tmp/a,b/t"));
        assert_eq!(arg, "name=opt/x,file=/tmp/a,,b/t");
    }
}
