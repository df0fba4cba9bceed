//! `cargo xtask bench hotplug`: how fast memd follows a virtio-mem device's
//! requested size. Per run, timed from the host's QMP `qom-set` to memd's
//! status saying it is there: plugging 2 GiB (then one movable block is
//! taken from it, so "plugged" means "allocatable"), 1.5 GiB of movable
//! pages taken by six clients (more than the guest booted with), and
//! unplugging the 2 GiB once the clients are gone.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use memd_client::qmp::Qmp;
use memd_client::wire::Gfp;
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The longest one step may take before the run fails.
const BOUND: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
#[command(mut_arg("machine", |a| a.default_value("q35")))]
#[command(mut_arg("hotplug", |a| a.default_value("4G")))]
pub struct HotplugBenchArgs {
    /// Runs (plug, use, unplug each) in the one guest.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The guest: TCG, q35, 1 GiB and a 4 GiB region unless told otherwise.
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// One run's figures, milliseconds.
struct Run {
    plug_2g_ms: f64,
    alloc_1_5g_ms: f64,
    unplug_2g_ms: f64,
}

pub fn run(args: &HotplugBenchArgs) -> Result<()> {
    let region = args
        .guest
        .hotplug_bytes()?
        .ok_or_else(|| anyhow!("bench hotplug needs --hotplug SIZE"))?;
    if region < 2 * GIB || args.runs == 0 {
        bail!("bench hotplug plugs 2 GiB: --hotplug must be 2G or more, --runs at least 1");
    }
    let kernel = crate::build::build_kernel()?;
    let (cfg, accel) = args.guest.config(kernel, "memd.log=warn")?;
    if !args.json {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    let endpoint = Endpoint::temporary("bench-hotplug")?;
    let qmp = std::env::temp_dir().join(format!("memd-bench-hotplug-{}.qmp", std::process::id()));
    let cfg = endpoint
        .serve(cfg)
        .qmp(qmp.clone())
        .time_bound(Duration::from_secs(120 + 60 * args.runs as u64));
    let addr = endpoint.addr();
    let (out, runs) = cfg.run_client(|| {
        let mut q = Qmp::connect(&qmp).map_err(|e| anyhow!(e))?;
        (0..args.runs)
            .map(|_| one_run(&addr, &endpoint.tokens.client, &mut q))
            .collect::<Result<Vec<Run>>>()
    })?;
    let _ = std::fs::remove_file(&qmp);
    let runs = runs
        .unwrap_or_else(|| Err(anyhow!("the guest never became ready")))
        .map_err(|e| anyhow!("{e:#}\n--- console ---\n{}", out.console()))?;
    let best = |f: fn(&Run) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
    if args.json {
        let v = serde_json::json!({
            "machine": args.guest.machine.name(),
            "accel": accel.name(),
            "mem": args.guest.mem,
            "region_bytes": region,
            "runs": runs
                .iter()
                .map(|r| serde_json::json!({
                    "plug_2g_ms": r.plug_2g_ms,
                    "alloc_1_5g_ms": r.alloc_1_5g_ms,
                    "unplug_2g_ms": r.unplug_2g_ms,
                }))
                .collect::<Vec<_>>(),
            "best": {
                "plug_2g_ms": best(|r| r.plug_2g_ms),
                "alloc_1_5g_ms": best(|r| r.alloc_1_5g_ms),
                "unplug_2g_ms": best(|r| r.unplug_2g_ms),
            },
        });
        println!("{v}");
        return Ok(());
    }
    for (i, r) in runs.iter().enumerate() {
        println!(
            "run {}: plug 2 GiB {:.0} ms, 1.5 GiB of movable pages {:.0} ms, unplug 2 GiB {:.0} ms",
            i + 1,
            r.plug_2g_ms,
            r.alloc_1_5g_ms,
            r.unplug_2g_ms
        );
    }
    Ok(())
}

fn connect(addr: &str, token: &str) -> Result<Client> {
    Client::connect(&Options::new(addr, token)).context("connect")
}

/// Milliseconds from `start` until memd's plugged size is `bytes`.
fn until_plugged(c: &mut Client, bytes: u64, start: Instant) -> Result<f64> {
    loop {
        let h = c
            .status()?
            .hotplug
            .ok_or_else(|| anyhow!("memd has no virtio-mem device"))?;
        if h.plugged_bytes == bytes {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > BOUND {
            bail!(
                "memd did not reach {} MiB plugged in {BOUND:?}: {h:?}",
                bytes / MIB
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn one_run(addr: &str, token: &str, q: &mut Qmp) -> Result<Run> {
    let mut c = connect(addr, token)?;
    until_plugged(&mut c, 0, Instant::now())?;
    let asked = Instant::now();
    q.set_virtio_mem_requested_size(2 * GIB)
        .map_err(|e| anyhow!(e))?;
    until_plugged(&mut c, 2 * GIB, asked)?;
    let (h, _) = c
        .alloc_pages(10, Gfp::KERNEL | Gfp::MOVABLE)
        .context("a movable block from the plugged memory")?;
    let plug_2g_ms = asked.elapsed().as_secs_f64() * 1000.0;
    c.free_pages(h)?;

    let start = Instant::now();
    let mut holders = Vec::new();
    for k in 0..6 {
        let mut h = connect(addr, token)?;
        for i in 0..64 {
            h.alloc_pages(10, Gfp::KERNEL | Gfp::MOVABLE)
                .with_context(|| format!("client {k}: movable block {i} of 64"))?;
        }
        holders.push(h);
    }
    let alloc_1_5g_ms = start.elapsed().as_secs_f64() * 1000.0;
    drop(holders);
    // The clients' pages are freed when memd sees them go: wait for that
    // before asking, so the time is the unplug's own.
    loop {
        let st = c.status()?;
        if st.hotplug.as_ref().is_some_and(|h| h.used_bytes == 0) {
            break;
        }
        if start.elapsed() > BOUND {
            bail!("the clients' pages were not freed in {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let asked = Instant::now();
    q.set_virtio_mem_requested_size(0).map_err(|e| anyhow!(e))?;
    let unplug_2g_ms = until_plugged(&mut c, 0, asked)?;
    Ok(Run {
        plug_2g_ms,
        alloc_1_5g_ms,
        unplug_2g_ms,
    })
}
