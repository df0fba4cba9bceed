//! QEMU: finding (or installing) it and the machines memd boots on. The
//! accelerator is chosen in [`accel`], a guest's command line is built by
//! [`QemuConfig`] ([`config`]), and a guest is run with a time bound while
//! its console is read in [`run`].

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

mod accel;
mod config;
mod run;

pub use accel::{choose_accel, Accel, AccelChoice};
pub use config::{check_hotplug, qemu_mem_bytes, QemuConfig};
pub use run::{free_port, RunOutcome};

pub const QEMU: &str = "qemu-system-x86_64";
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// isa-debug-exit: the guest writes `v`, QEMU exits with `(v << 1) | 1`.
/// Must match unikernel/kernel/src/arch/exit.rs.
pub const GUEST_SUCCESS: i32 = (0x10 << 1) | 1;
pub const GUEST_FAILURE: i32 = (0x11 << 1) | 1;

/// The line the kernel prints once it is up.
pub const READY_LINE: &str = "memd: ready";

/// The line the kernel prints once every frame is initialised (right after
/// `READY_LINE` when boot initialised them all). Clients in tests start
/// then, so memory does not grow under their baselines.
pub const INITIALISED_LINE: &str = "memd: all memory initialised";

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

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub fn is_root() -> bool {
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
/// Installs Debian `packages` with apt-get (without recommends), updating
/// the package lists and trying again when the first attempt fails.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let install = |update: bool| -> Result<bool> {
        if update {
            Command::new("apt-get")
                .args(["update", "-q"])
                .status()
                .context("running apt-get update")?;
        }
        Ok(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?
            .success())
    };
    if !install(false)? && !install(true)? {
        bail!("apt-get install {} failed", packages.join(" "));
    }
    Ok(())
}

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
    apt_install(&[QEMU_PACKAGE])?;
    find_in_path(QEMU)
        .with_context(|| format!("{QEMU_PACKAGE} installed but {QEMU} still not in PATH"))
}
