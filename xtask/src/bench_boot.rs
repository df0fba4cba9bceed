//! `cargo xtask bench boot`: median time from starting QEMU to the kernel's
//! `memd: ready` line, over several boots.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::qemu::{self, Accel, Machine, QemuConfig};

#[derive(Debug, clap::Args)]
pub struct BootBenchArgs {
    /// Number of boots (at least 5).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    pub machine: Machine,
    /// Accelerator; the benchmark's reference numbers are for TCG.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Median of a non-empty list.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(args: &BootBenchArgs) -> Result<()> {
    if args.runs < 5 {
        bail!("--runs must be at least 5");
    }
    let kernel = crate::build::build_kernel()?;
    let qemu_path = qemu::ensure_qemu()?;
    let accel = qemu::choose_accel(args.accel, &qemu_path, args.machine)?;
    if !args.json {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    let port = qemu::free_port()?;
    // Token files as for a real run, so the boot reads them as it would.
    let tokens = crate::tokens::GuestTokens::temporary("bench-boot")?;
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel,
        machine: args.machine,
        kvm: accel.kvm,
        mem: args.mem.clone(),
        // The NIC is there, so `memd: ready` means the control port listens.
        cmdline: format!("memd.log=warn memd.port={port}"),
        forward_port: Some(port),
        disk: None,
        monitor: None,
        icount: false,
        tokens: Some(tokens.files.clone()),
    };
    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let out = qemu::run_bounded(&cfg, Duration::from_secs(30), true)?;
        let Some(t) = out.ready_after else {
            bail!(
                "boot {i}: no `{}` line (timed out: {}, status {:?})\n{}\n{}",
                qemu::READY_LINE,
                out.timed_out,
                out.status,
                out.console(),
                out.stderr
            );
        };
        if out.panicked() {
            bail!("boot {i}: the guest panicked\n{}", out.console());
        }
        let ms = t.as_secs_f64() * 1000.0;
        if !args.json {
            eprintln!("boot {i}: {ms:.1} ms");
        }
        times.push(ms);
    }
    let med = median(&mut times);
    if args.json {
        println!(
            "{{\"boot_ms_median\": {med:.1}, \"accel\": \"{}\", \"machine\": \"{}\", \"mem\": \"{}\", \"runs\": {}}}",
            accel.name(),
            args.machine.name(),
            args.mem,
            args.runs
        );
    } else {
        println!(
            "boot to `{}`: median {med:.1} ms over {} boots ({}, {}, {}); min {:.1} ms, max {:.1} ms",
            qemu::READY_LINE,
            args.runs,
            args.machine.name(),
            accel.name(),
            args.mem,
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
