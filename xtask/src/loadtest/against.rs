//! A load test against a running service: the control connection, the
//! warm-up and the baseline, fault injection around the measured run, and
//! the report once memory has settled back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use memd_client::wire::{self, FaultConfig, FaultTarget, Op};
use memd_client::{Client, Options};

use super::baseline::{warm_up, Baseline};
use super::drive::{drive, Driven, Load, WARM_UP_OPS_PER_CLIENT};
use super::exhaust::exhaust;
use super::hotplug;
use super::worker::LARGE_DMA;
use super::{Args, FaultFigures, FaultWhich, NoisyFigures, PassFigures, Profile, Report};

/// The tokens of a run: the clients' for the load, the operator's for the
/// control connection.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub client: String,
    pub operator: String,
}

/// Runs the load test against a service at `addr` (`args` validated by
/// the caller).
pub fn run_against(addr: &str, tokens: &Tokens, args: &Args) -> Result<Report> {
    let mut opts = Options::new(addr, &tokens.client);
    opts.client = "loadtest".into();
    opts.ready_timeout = Duration::from_secs(30);
    let mut ctl_opts = Options::new(addr, &tokens.operator);
    ctl_opts.client = "loadtest-control".into();
    ctl_opts.ready_timeout = opts.ready_timeout;
    let mut ctl = Client::connect(&ctl_opts).context("control connection")?;
    // The noisy neighbours run stress, which only the operator may.
    let mut noisy_opts = ctl_opts.clone();
    noisy_opts.client = "loadtest-noisy".into();
    let load = Load {
        clients: &opts,
        noisy: &noisy_opts,
    };
    // Turn off any fault rule left from before: the baseline is taken clean.
    for t in fault_targets(FaultWhich::Both) {
        ctl.fault_inject(*t, FaultConfig::default())
            .context("clearing fault injection")?;
    }
    // Every view once on the control connection, so its buffers have
    // grown to the largest reply before the baseline.
    ctl.batch(Op::VIEWS.to_vec(), false)
        .context("warming up the control connection")?;
    if args.profile == Profile::Exhaust {
        // As many connections as the test holds at once (the clients and
        // the late one), so the connection table has grown already.
        warm_up(&opts, args.clients + 1)?;
        let baseline = Baseline::take(&mut ctl, Duration::from_secs(args.settle))?;
        return exhaust(&opts, &mut ctl, args, &baseline);
    }
    let cma_total = ctl.cma().map(|c| c.total).unwrap_or(0);
    // Large (CMA) DMA buffers: at most one per client, and only as many
    // clients as the region can serve at once, so they never fail for want
    // of room.
    let large_slots = (cma_total / LARGE_DMA.next_multiple_of(4096)).saturating_sub(1);
    // The warm-up is the same profile, briefly, with as many clients and
    // noisy neighbours (each of which runs one whole round): what grows
    // once and stays (connection and handle tables, the cache and pool
    // tables, socket buffers' first use) grows before the baseline.
    let warm = drive(
        &load,
        args,
        Some(WARM_UP_OPS_PER_CLIENT * args.clients as u64),
        Duration::from_secs(30),
        large_slots,
        false,
    );
    if let Some(e) = warm.fatal.first().or(warm.noisy.fatal.first()) {
        bail!("warm-up: {e}");
    }
    let baseline = Baseline::take(&mut ctl, Duration::from_secs(args.settle))?;

    let faults = args.fault_probability.filter(|&p| p > 0);
    if let Some(p) = faults {
        for t in fault_targets(args.fault_target) {
            ctl.fault_inject(
                *t,
                FaultConfig {
                    probability: p,
                    interval: args.fault_interval,
                    times: -1,
                },
            )
            .context("setting fault injection")?;
        }
    }

    let before = ctl.status().ok();
    let qmp = args.hotplug_cycle.map(|_| {
        args.qmp
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(".memd/qmp.sock"))
    });
    let cycling_done = AtomicBool::new(false);
    let (driven, hotplug) = std::thread::scope(|s| {
        let cycler = qmp.as_ref().zip(args.hotplug_cycle).map(|(path, secs)| {
            let done = &cycling_done;
            s.spawn(move || hotplug::cycle(path, Duration::from_secs(secs), done))
        });
        let driven = drive(&load, args, args.ops, args.time_bound(), large_slots, true);
        cycling_done.store(true, Ordering::Relaxed);
        let hotplug = cycler.map(|t| t.join().expect("the hot-plug cycler panicked"));
        (driven, hotplug)
    });
    let hotplug = hotplug.transpose().context("hot-plug cycling")?;
    let Driven {
        tally,
        fatal,
        elapsed,
        noisy,
        noisy_elapsed,
    } = driven;
    let after = ctl.status().ok();
    let grew = |field: fn(&wire::Status) -> Option<u64>| {
        Some(field(after.as_ref()?)?.saturating_sub(field(before.as_ref()?)?))
    };
    let (busy_ns, halted_ns) = (grew(|s| s.busy_ns), grew(|s| s.halted_ns));
    let loop_passes = before
        .as_ref()
        .zip(after.as_ref())
        .and_then(|(b, a)| PassFigures::between(b, a));
    let noisy = (args.noisy > 0).then(|| NoisyFigures::new(args.noisy, noisy_elapsed, noisy));

    // Faults off before the baseline comparison; read what was injected.
    let mut fault_figures = None;
    if let Some(p) = faults {
        let mut f = FaultFigures {
            probability: p,
            ..Default::default()
        };
        if let Ok(st) = faults_now(&mut ctl) {
            f.injected = st.0;
            f.calls = st.1;
        }
        for t in fault_targets(FaultWhich::Both) {
            ctl.fault_inject(*t, FaultConfig::default())
                .context("turning fault injection off")?;
        }
        fault_figures = Some(f);
    }

    let end = baseline.compare(&mut ctl, Duration::from_secs(args.settle))?;
    let injected = fault_figures.as_ref().map_or(0, |f| f.injected);
    // ENOMEM is explained by injected faults, one failed request per
    // injection at most; any other code is unexplained.
    let total_errors: u64 = tally.errors.values().sum();
    let other = total_errors - tally.enomem;
    let unexplained = other + tally.enomem.saturating_sub(injected);
    Ok(Report {
        fatal,
        faults: fault_figures,
        busy_ns,
        halted_ns,
        noisy,
        loop_passes,
        hotplug,
        ..Report::new(args, elapsed, tally, unexplained, end)
    })
}

fn fault_targets(w: FaultWhich) -> &'static [FaultTarget] {
    match w {
        FaultWhich::Slab => &[FaultTarget::Slab],
        FaultWhich::Pages => &[FaultTarget::Pages],
        FaultWhich::Both => &[FaultTarget::Slab, FaultTarget::Pages],
    }
}

/// Injected failures and eligible calls so far, both targets together.
fn faults_now(c: &mut Client) -> Result<(u64, u64)> {
    let f = c.faults().context("reading fault counters")?;
    Ok((
        f.slab.injected + f.pages.injected,
        f.slab.calls + f.pages.calls,
    ))
}
