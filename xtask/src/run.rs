//! `cargo xtask run`: build the kernel, start QEMU in the foreground with the
//! console on stdout (Ctrl-C stops it).

use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::qemu::{self, Accel, Machine, QemuConfig};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// QEMU machine.
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    pub machine: Machine,
    /// Accelerator (auto: KVM only with real hardware virtualisation).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Guest memory (QEMU `-m` syntax: 512M, 1G, 5G ...).
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// TCP port of the service; QEMU forwards 127.0.0.1:PORT to the guest.
    #[arg(long, default_value_t = 5555)]
    pub port: u16,
    /// Extra kernel command line (e.g. "memd.log=debug memd.dma_reserve=64M@dma32").
    #[arg(long, default_value = "")]
    pub cmdline: String,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let kernel = crate::build::build_kernel()?;
    let qemu_path = qemu::ensure_qemu()?;
    let accel = qemu::choose_accel(args.accel)?;
    eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    let cmdline = format!("memd.port={} {}", args.port, args.cmdline)
        .trim()
        .to_string();
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel,
        machine: args.machine,
        kvm: accel.kvm,
        mem: args.mem.clone(),
        cmdline,
        forward_port: Some(args.port),
    };
    eprintln!("xtask: {}", cfg.describe());
    eprintln!(
        "xtask: host 127.0.0.1:{} is forwarded to the guest's port {}; Ctrl-C stops QEMU",
        args.port, args.port
    );
    eprintln!("xtask: note: the kernel does not drive virtio-net yet (issue 4), so nothing answers on that port");
    let status = cfg
        .command()
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .context("running QEMU")?;
    match status.code() {
        Some(qemu::GUEST_SUCCESS) => Ok(()),
        Some(qemu::GUEST_FAILURE) => {
            bail!("the guest reported a failure (panic, fault or failed self-test)")
        }
        Some(0) | None => Ok(()), // QEMU quit or was interrupted (Ctrl-C)
        Some(c) => bail!("QEMU exited with status {c}"),
    }
}
