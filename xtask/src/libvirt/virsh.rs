//! libvirt through `virsh`: installed from apt and its daemons started
//! when missing (as `xtask` does for QEMU), and a memd domain defined,
//! started, waited for and stopped.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::domain::{Domain, METADATA_URI};
use crate::qemu;

/// The system instance: the daemons `xtask` starts run as root.
pub const URI: &str = "qemu:///system";
const PACKAGES: [&str; 3] = [
    "libvirt-daemon-system",
    "libvirt-clients",
    "libvirt-daemon-driver-qemu",
];

/// `virsh -c qemu:///system ARGS`: its output, or its error.
pub fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .output()
        .with_context(|| format!("running virsh {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// virsh and a running libvirtd: installs libvirt with apt-get when it is
/// missing and the user is root, and starts `virtlogd` and `libvirtd` when
/// they are not answering, saying each in one `xtask:` line.
pub fn ensure_libvirt() -> Result<()> {
    qemu::ensure_qemu()?;
    if qemu::find_in_path("virsh").is_none() || !Path::new("/usr/sbin/libvirtd").exists() {
        if !qemu::is_root() || qemu::find_in_path("apt-get").is_none() {
            bail!(
                "libvirt is not installed (Debian/Ubuntu: `sudo apt-get install {}`)",
                PACKAGES.join(" ")
            );
        }
        eprintln!(
            "xtask: libvirt missing; installing {} with apt-get",
            PACKAGES.join(" ")
        );
        qemu::apt_install(&PACKAGES)?;
    }
    kvm_group()?;
    if virsh(&["version"]).is_ok() {
        return Ok(());
    }
    if !qemu::is_root() {
        bail!("libvirtd is not answering on {URI}; start it (as root: `libvirtd -d`)");
    }
    eprintln!("xtask: libvirtd not answering; starting virtlogd and libvirtd");
    // virtlogd may be running already (it then refuses a second one):
    // whether libvirtd came up is what the loop below checks.
    for daemon in ["/usr/sbin/virtlogd", "/usr/sbin/libvirtd"] {
        Command::new(daemon)
            .arg("-d")
            .status()
            .with_context(|| format!("starting {daemon}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match virsh(&["version"]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("libvirtd did not come up"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Gives a root-only `/dev/kvm` the group and mode Debian's udev rule
/// gives it (`kvm`, 0660), where no udev ran (containers). libvirt checks
/// KVM as its QEMU user: with a device that user cannot open, it finds its
/// probe of QEMU out of date at every domain definition and probes again,
/// about a minute each time.
fn kvm_group() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata("/dev/kvm") else {
        return Ok(());
    };
    let has_group = std::fs::read_to_string("/etc/group")
        .is_ok_and(|g| g.lines().any(|l| l.starts_with("kvm:")));
    if meta.gid() != 0 || meta.mode() & 0o060 != 0 || !has_group || !qemu::is_root() {
        return Ok(());
    }
    eprintln!("xtask: /dev/kvm is root's alone (no udev here): giving it group kvm and mode 0660, as Debian's udev rule does, so libvirt keeps its probe of QEMU");
    for (cmd, arg) in [("chgrp", "kvm"), ("chmod", "0660")] {
        let ok = Command::new(cmd)
            .args([arg, "/dev/kvm"])
            .status()
            .with_context(|| format!("running {cmd}"))?
            .success();
        if !ok {
            bail!("{cmd} {arg} /dev/kvm failed");
        }
    }
    Ok(())
}

/// Defines and starts `d`, then waits (at most `timeout`) until its
/// console says all its memory is initialised. A domain that does not get
/// there is stopped and undefined, and the console's end is in the error.
pub fn start(d: &Domain, timeout: Duration) -> Result<()> {
    if virsh(&["domstate", &d.name]).is_ok() {
        bail!("a domain named {} is defined already", d.name);
    }
    let xml = d.dir.join("domain.xml");
    std::fs::write(&xml, d.xml()).with_context(|| format!("writing {}", xml.display()))?;
    let _ = std::fs::remove_file(d.console());
    virsh(&["define", &xml.display().to_string()])?;
    if let Err(e) = virsh(&["start", &d.name]) {
        let _ = stop(&d.name);
        return Err(e);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let console = std::fs::read_to_string(d.console()).unwrap_or_default();
        if console.contains(qemu::INITIALISED_LINE) {
            return Ok(());
        }
        let running = virsh(&["domstate", &d.name]).is_ok_and(|s| s.trim() == "running");
        if !running || Instant::now() > deadline {
            let _ = stop(&d.name);
            let tail: Vec<&str> = console.lines().rev().take(15).collect();
            bail!(
                "{}: {} before `{}`; console's end:\n{}",
                d.name,
                if running { "timed out" } else { "stopped" },
                qemu::INITIALISED_LINE,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether domain `name` is one of memd's (carries its metadata).
pub fn is_memd(name: &str) -> bool {
    virsh(&["metadata", name, "--uri", METADATA_URI]).is_ok()
}

/// Stops and undefines domain `name`: destroyed whatever its state (an
/// error there is a domain not running), then undefined.
pub fn stop(name: &str) -> Result<()> {
    let _ = virsh(&["destroy", name]);
    virsh(&["undefine", name]).map(|_| ())
}

/// The domains that carry memd's metadata: (name, state, address).
pub fn list() -> Result<Vec<(String, String, String)>> {
    let names = virsh(&["list", "--all", "--name"])?;
    let mut out = Vec::new();
    for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
        let Ok(meta) = virsh(&["metadata", name, "--uri", METADATA_URI]) else {
            continue;
        };
        // `<addr>` or `<memd:addr>`, as libvirt gives it back.
        let addr = meta
            .split_once("addr>")
            .and_then(|(_, rest)| rest.split('<').next())
            .unwrap_or("?")
            .to_string();
        let state = virsh(&["domstate", name]).unwrap_or_default();
        out.push((name.to_string(), state.trim().to_string(), addr));
    }
    Ok(out)
}
