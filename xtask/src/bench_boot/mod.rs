//! `cargo xtask bench boot`: for each guest size, the median time from
//! starting QEMU to the kernel's `memd: ready` line and to `memd: all
//! memory initialised`, beside QEMU's floor on the same machine (a kernel
//! that exits at its first instruction, `floor.rs`), over several boots.

mod floor;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::guest::{Endpoint, GuestArgs};
use crate::qemu;

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
pub struct BootBenchArgs {
    /// Number of boots per guest size (at least 5).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Guest sizes to boot, comma-separated (QEMU `-m` syntax); default
    /// `--mem` alone.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<String>,
    /// Print one JSON array instead of text.
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

/// One guest size's medians, in milliseconds.
struct Row {
    mem: String,
    floor: f64,
    ready: f64,
    initialised: f64,
    accel: &'static str,
}

pub fn run(args: &BootBenchArgs) -> Result<()> {
    if args.runs < 5 {
        bail!("--runs must be at least 5");
    }
    let sizes = match args.sweep.is_empty() {
        true => vec![args.guest.mem.clone()],
        false => args.sweep.clone(),
    };
    let kernel = crate::build::build_kernel()?;
    let floor = floor::write(&std::env::temp_dir().join("memd-bench-boot"))?;
    let mut rows = Vec::new();
    for mem in sizes {
        let guest = GuestArgs {
            mem: mem.clone(),
            ..args.guest.clone()
        };
        let floor_ms = floor_boots(&guest, &floor, args.runs)?;
        let (ready, initialised, accel) = memd_boots(&guest, &kernel, args.runs, args.json)?;
        let row = Row {
            mem,
            floor: floor_ms,
            ready,
            initialised,
            accel,
        };
        if !args.json {
            println!(
                "{:>5}: QEMU floor {:.1} ms, memd ready {:.1} ms ({:.1} above the floor), all memory initialised {:.1} ms",
                row.mem, row.floor, row.ready, row.ready - row.floor, row.initialised
            );
        }
        rows.push(row);
    }
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"mem\": \"{}\", \"floor_ms_median\": {:.1}, \"boot_ms_median\": {:.1}, \"initialised_ms_median\": {:.1}, \"accel\": \"{}\", \"machine\": \"{}\", \"runs\": {}}}",
                    r.mem, r.floor, r.ready, r.initialised, r.accel, args.guest.machine.name(), args.runs
                )
            })
            .collect();
        println!("[{}]", items.join(", "));
    } else if let [first, .., last] = &rows[..] {
        println!(
            "boot to `{}` at {} against {}: {:.2}x",
            qemu::READY_LINE,
            last.mem,
            first.mem,
            last.ready / first.ready
        );
    }
    Ok(())
}

/// Median milliseconds from starting QEMU to its exit with the floor kernel.
fn floor_boots(guest: &GuestArgs, floor: &std::path::Path, runs: usize) -> Result<f64> {
    let (cfg, _) = guest.config(floor.to_path_buf(), "")?;
    let cfg = cfg.time_bound(Duration::from_secs(30));
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs {
        let start = Instant::now();
        let out = cfg.run_to_exit()?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        if out.status != Some(qemu::GUEST_SUCCESS) {
            bail!(
                "floor boot {i}: QEMU ended with {:?}, not the floor kernel's exit\n{}",
                out.status,
                out.stderr
            );
        }
        times.push(ms);
    }
    Ok(median(&mut times))
}

/// Median milliseconds to `memd: ready` and to `memd: all memory
/// initialised`.
fn memd_boots(
    guest: &GuestArgs,
    kernel: &std::path::Path,
    runs: usize,
    quiet: bool,
) -> Result<(f64, f64, &'static str)> {
    let (cfg, accel) = guest.config(kernel.to_path_buf(), "memd.log=warn")?;
    if !quiet {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    // A port and token files as for a real run: the NIC is there, so
    // `memd: ready` means the control port listens, and the boot reads the
    // tokens as it would.
    let endpoint = Endpoint::temporary("bench-boot")?;
    let cfg = endpoint.serve(cfg).time_bound(Duration::from_secs(60));
    let (mut ready, mut initialised) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let out = cfg.run_until_ready()?;
        let (Some(r), Some(a)) = (out.ready_after, out.initialised_after) else {
            bail!(
                "boot {i}: no `{}` and `{}` lines (timed out: {}, status {:?})\n{}\n{}",
                qemu::READY_LINE,
                qemu::INITIALISED_LINE,
                out.timed_out,
                out.status,
                out.console(),
                out.stderr
            );
        };
        if out.panicked() {
            bail!("boot {i}: the guest panicked\n{}", out.console());
        }
        ready.push(r.as_secs_f64() * 1000.0);
        initialised.push(a.as_secs_f64() * 1000.0);
    }
    Ok((median(&mut ready), median(&mut initialised), accel.name()))
}
