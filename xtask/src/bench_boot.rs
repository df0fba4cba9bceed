//! `cargo xtask bench boot`: median time from starting QEMU to the kernel's
//! `memd: ready` line, over several boots.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::guest::{Endpoint, GuestArgs};
use crate::qemu;

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
pub struct BootBenchArgs {
    /// Number of boots (at least 5).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The guest; its `--accel` defaults to tcg, the accelerator of the
    /// reference figures.
    #[command(flatten)]
    pub guest: GuestArgs,
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
    let (cfg, accel) = args.guest.config(kernel, "memd.log=warn")?;
    if !args.json {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    // A port and token files as for a real run: the NIC is there, so
    // `memd: ready` means the control port listens, and the boot reads the
    // tokens as it would.
    let endpoint = Endpoint::temporary("bench-boot")?;
    let cfg = endpoint.serve(cfg).time_bound(Duration::from_secs(30));
    let mut times = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        let out = cfg.run_until_ready()?;
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
            args.guest.machine.name(),
            args.guest.mem,
            args.runs
        );
    } else {
        println!(
            "boot to `{}`: median {med:.1} ms over {} boots ({}, {}, {}); min {:.1} ms, max {:.1} ms",
            qemu::READY_LINE,
            args.runs,
            args.guest.machine.name(),
            accel.name(),
            args.guest.mem,
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
