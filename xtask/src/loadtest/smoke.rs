//! The load-test runs of `cargo xtask test`: short, under TCG, each
//! asserted: the mixed profile with injected faults, the mixed profile
//! while memory is plugged and unplugged, the mixed profile on two CPUs,
//! the exhaustion test, and the noisy-neighbour run.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::boot::boot_and_run;
use super::{Args, Profile};

/// The short end-to-end run of `cargo xtask test` (TCG): 8 clients for a
/// few seconds with 3 % injected faults, the same on q35 while the host
/// grows and shrinks a virtio-mem device every second, the same with a
/// second CPU started, then the exhaustion test in a 256 MiB guest. Each must pass: no crash, no unexplained error, free
/// memory back at its baseline, invariants clean.
pub fn smoke() -> Result<()> {
    let mixed = Args::smoke(8, 4, Some(3));
    let mut exhaust = Args {
        profile: Profile::Exhaust,
        clients: 4,
        fault_probability: None,
        ..Args::smoke(4, 4, None)
    };
    exhaust.guest.mem = "256M".into();
    exhaust.guest.cmdline = String::new();
    let mut hotplug = Args {
        hotplug_cycle: Some(1),
        ..Args::smoke(8, 4, None)
    };
    hotplug.guest.machine = crate::qemu::Machine::Q35;
    hotplug.guest.hotplug = Some("1G".into());
    let mut smp = Args::smoke(8, 4, None);
    smp.guest.smp = 2;
    for (name, args) in [
        ("mixed+faults", mixed),
        ("mixed+hotplug", hotplug),
        ("mixed+smp2", smp),
        ("exhaust", exhaust),
    ] {
        let t = Instant::now();
        let r = boot_and_run(&args).with_context(|| format!("loadtest smoke {name}"))?;
        let line = format!(
            "{name}: {} clients, {} ops, {:.0} ops/s, p99 {:.0} us, {} errors ({} unexplained), baseline {}",
            r.load.clients,
            r.load.ops,
            r.load.ops_per_sec(),
            r.load.all.p99,
            r.load.error_count(),
            r.unexplained,
            if r.baseline_restored { "restored" } else { "NOT restored" }
        );
        if !r.passed() {
            r.print();
            bail!("loadtest smoke {line}");
        }
        // Memory was really plugged during the run, and unplugged again
        // (the baseline above holds only then).
        if args.hotplug_cycle.is_some() && r.hotplug.is_none_or(|h| h.max_plugged == 0) {
            bail!(
                "loadtest smoke {name}: nothing was plugged: {:?}",
                r.hotplug
            );
        }
        eprintln!(
            "  ok    loadtest {line} ({:.1} s)",
            t.elapsed().as_secs_f64()
        );
    }
    noisy_neighbour()
}

/// Busy loop passes (every client's turn, the network's work around
/// them) may take this many budgets at the 99th percentile: the guest's
/// own measure of how long a request can wait behind the others' work.
const PASS_BUDGETS: f64 = 8.0;
/// The small requests' p99 as the clients see it may reach this many
/// budgets: their round trip through QEMU's user networking and the host's
/// scheduling of 2 cores come on top of any wait (1–2 ms on a busy host).
/// A 1 M-operation stress run in one piece, were turns unbounded, would
/// hold the loop about 130 ms: 650 budgets.
const NEIGHBOUR_WAIT_BUDGETS: f64 = 25.0;

/// The noisy-neighbour smoke run: four clients of one small request at a
/// time beside one client that asks for nothing but the heaviest legal
/// work. Fails if the small requests wait behind the heavy ones for more
/// than a few turn budgets.
fn noisy_neighbour() -> Result<()> {
    let args = Args {
        profile: Profile::Single,
        noisy: 1,
        ..Args::smoke(4, 6, None)
    };
    let t = Instant::now();
    let r = boot_and_run(&args).context("loadtest smoke noisy-neighbour")?;
    let passes = r
        .loop_passes
        .context("the service reports no loop passes")?;
    let noisy_ops = r.noisy.as_ref().map_or(0, |n| n.load.ops);
    let line = format!(
        "noisy-neighbour: {} clients beside 1 noisy ({noisy_ops} heavy ops), p99 {:.0} us, loop passes p99 {:.0} us (budget {:.0} us)",
        r.load.clients, r.load.all.p99, passes.p99_us, passes.budget_us
    );
    let waited = r.load.all.p99 > NEIGHBOUR_WAIT_BUDGETS * passes.budget_us;
    let long_passes = passes.p99_us > PASS_BUDGETS * passes.budget_us;
    if !r.passed() || waited || long_passes || noisy_ops == 0 {
        r.print();
        bail!("loadtest smoke {line}");
    }
    eprintln!(
        "  ok    loadtest {line} ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
