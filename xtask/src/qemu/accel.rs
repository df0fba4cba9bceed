//! The accelerator: KVM where the CPU really virtualises and QEMU starts
//! with it, else TCG (see [`choose_accel`]).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{describe_status, Machine};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM where the CPU shows vmx/svm, /dev/kvm opens and QEMU starts
    /// with it (so never a kvm_pvm /dev/kvm), else TCG.
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

/// QEMU's accelerator and CPU model arguments. TCG gets `max`: 1 GiB pages
/// (a smaller direct map) and more CPUID leaves.
pub(super) fn accel_args(kvm: bool) -> [&'static str; 4] {
    if kvm {
        ["-accel", "kvm", "-cpu", "host"]
    } else {
        ["-accel", "tcg", "-cpu", "max"]
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
fn kvm_starts(qemu: &Path, machine: Machine) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(qemu)
        .args(["-M", machine.qemu_machine()])
        .args(accel_args(true))
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
