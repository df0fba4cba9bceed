//! `cargo xtask loadtest`: many concurrent clients against memd, a mixed
//! operation profile (pages of several orders, kmalloc, slab caches,
//! mempools, DMA buffers, statistics) or a batch profile (allocator
//! operations per second through batch frames), throughput and latency
//! percentiles per operation kind, errors by code, optional fault injection,
//! and a check that free memory returns exactly to its baseline once every
//! client has disconnected.
//!
//! It boots memd under QEMU itself (on a free loopback port, with its own
//! tokens) unless `--addr` names a running service. The clients hold the
//! client token; the run's own control steps (clearing and setting fault
//! injection, the invariant check) the operator's. Every loop is bounded by
//! a count and by time; only 127.0.0.1 is used when booting.
//!
//! `--noisy N` adds noisy neighbours beside the clients: operator
//! connections looping over the heaviest requests (see [`noisy`]), whose
//! figures the report keeps apart. The report also gives the service
//! loop's passes over the run (see [`passes`]), when the service reports
//! them.
//!
//! `--profile exhaust` is the exhaustion test: clients take pages until the
//! service says ENOMEM (within their quotas), then the reserve below `min`,
//! the statistics and new connections are checked while memory is
//! exhausted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use memd_client::wire::{errno, FaultConfig, FaultTarget, Gfp, Op};
use memd_client::{wire, Client, Options};

use crate::guest::{Endpoint, GuestArgs};
use crate::qemu::Accel;

mod exhaust;
mod noisy;
mod passes;
mod report;
mod worker;

use exhaust::exhaust;
pub use exhaust::ExhaustFigures;
pub use noisy::NoisyFigures;
pub use passes::PassFigures;
use report::percentiles;
pub use report::{FaultFigures, Lat, Report};
use worker::{worker, LARGE_DMA};

/// The most clients one run may start.
pub const MAX_CLIENTS: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Pages, kmalloc, caches, mempools, DMA buffers and statistics.
    Mixed,
    /// Batches of kmalloc/kfree and page alloc/free (allocator ops/s).
    Batch,
    /// One small request at a time: kmalloc(64) then kfree, alternately
    /// (the single-operation request rate and latency).
    Single,
    /// Take all memory: ENOMEM within quotas, reserve intact, service alive.
    Exhaust,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultWhich {
    Slab,
    Pages,
    Both,
}

/// The kernel command line a load test's guest gets unless `--cmdline`
/// says otherwise: a contiguous region for the large DMA buffers.
pub const DEFAULT_CMDLINE: &str = "memd.dma_reserve=128M@dma32";

#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("cmdline", |a| a.default_value(DEFAULT_CMDLINE)))]
pub struct Args {
    /// Target a running memd at this address instead of booting one (the
    /// guest options are then unused).
    #[arg(long)]
    pub addr: Option<String>,
    /// Client token for `--addr` (default: MEMD_TOKEN or .memd/token).
    #[arg(long)]
    pub token: Option<String>,
    /// Operator token for `--addr` (default: --token when given, else
    /// MEMD_OPERATOR_TOKEN, MEMD_TOKEN, .memd/operator-token, .memd/token).
    #[arg(long)]
    pub operator_token: Option<String>,
    /// Concurrent clients (1..=256).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_CLIENTS as i64))]
    pub clients: u32,
    /// Noisy neighbours besides the clients: operator connections looping
    /// over the heaviest requests (stress runs, large DMA fills and
    /// checksums, disk transfers, batches of stress runs, cache and pool
    /// storms) for as long as the clients run; reported apart. At most 256
    /// with --clients.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=MAX_CLIENTS as i64))]
    pub noisy: u32,
    /// Run for this many seconds (default 10 unless --ops is given).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Stop after this many operations in total (also bounded by --duration,
    /// default one hour when only --ops is given).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Operation profile.
    #[arg(long, value_enum, default_value_t = Profile::Mixed)]
    pub profile: Profile,
    /// Operations per batch frame (batch profile).
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// PRNG seed (client i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Inject allocation failures with this percent probability during the run.
    #[arg(long)]
    pub fault_probability: Option<u8>,
    /// Which allocations faults are injected into.
    #[arg(long, value_enum, default_value_t = FaultWhich::Both)]
    pub fault_target: FaultWhich,
    /// Only every N-th eligible allocation may fail.
    #[arg(long, default_value_t = 1)]
    pub fault_interval: u32,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for free memory to settle back to its baseline.
    #[arg(long, default_value_t = 20)]
    pub settle: u64,
    /// The guest booted unless `--addr` is given; its `--cmdline` defaults
    /// to a DMA reservation (DEFAULT_CMDLINE).
    #[command(flatten)]
    pub guest: GuestArgs,
}

impl Args {
    /// The smoke run of `cargo xtask test`: short, TCG, asserted.
    pub fn smoke(clients: u32, secs: u64, fault_probability: Option<u8>) -> Args {
        Args {
            addr: None,
            token: None,
            operator_token: None,
            clients,
            noisy: 0,
            duration: Some(secs),
            ops: None,
            profile: Profile::Mixed,
            batch: 256,
            seed: 7,
            fault_probability,
            fault_target: FaultWhich::Both,
            fault_interval: 1,
            json: true,
            settle: 20,
            guest: GuestArgs {
                accel: Accel::Tcg,
                cmdline: DEFAULT_CMDLINE.into(),
                ..GuestArgs::default()
            },
        }
    }

    /// Refuses what cannot run: more connections than one run may start,
    /// noisy neighbours in the exhaustion test (it takes all memory), a
    /// fault probability above 100 %.
    fn validate(&self) -> Result<()> {
        if self.clients + self.noisy > MAX_CLIENTS {
            bail!(
                "--clients {} and --noisy {} make more than {MAX_CLIENTS} connections",
                self.clients,
                self.noisy
            );
        }
        if self.noisy > 0 && self.profile == Profile::Exhaust {
            bail!("--noisy does not go with --profile exhaust");
        }
        if self.fault_probability.is_some_and(|p| p > 100) {
            bail!("--fault-probability is a percentage (0..=100)");
        }
        Ok(())
    }

    fn time_bound(&self) -> Duration {
        Duration::from_secs(match (self.duration, self.ops) {
            (Some(d), _) => d,
            (None, Some(_)) => 3600,
            (None, None) => 10,
        })
    }
}

/// Latency samples (ns) per operation kind, errors per (kind, code).
#[derive(Default, Debug)]
struct Tally {
    lat: HashMap<&'static str, Vec<u64>>,
    errors: BTreeMap<(&'static str, String), u64>,
    /// ENOMEM replies (explained only by injected faults in the mixed
    /// profile).
    enomem: u64,
    /// ENOSPC from cache-create / pool-create: the service's global cache
    /// or pool table is full (128 caches, 256 mempools), a documented limit with many
    /// clients; the client goes on with fewer caches and pools.
    table_full: u64,
    ops: u64,
}

impl Tally {
    /// Percentiles of every operation together, and of each kind (by name).
    fn latencies(&mut self) -> (Lat, Vec<(&'static str, Lat)>) {
        let mut all: Vec<u64> = self.lat.values().flatten().copied().collect();
        let mut per_kind: Vec<(&'static str, Lat)> = self
            .lat
            .iter_mut()
            .map(|(k, v)| (*k, percentiles(v)))
            .collect();
        per_kind.sort_by_key(|(k, _)| *k);
        (percentiles(&mut all), per_kind)
    }

    /// Counts a server error by operation kind and code; ENOMEM also counts
    /// toward the total that injected faults must explain.
    fn record_error(&mut self, kind: &'static str, e: &wire::WireError) {
        if e.code == errno::ENOMEM {
            self.enomem += 1;
        }
        *self
            .errors
            .entry((kind, e.code_name().to_string()))
            .or_default() += 1;
    }

    fn merge(&mut self, o: Tally) {
        for (k, mut v) in o.lat {
            self.lat.entry(k).or_default().append(&mut v);
        }
        for (k, n) in o.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.enomem += o.enomem;
        self.table_full += o.table_full;
        self.ops += o.ops;
    }
}

/// Shared progress of a run.
struct Shared {
    stop: AtomicBool,
    ops: AtomicU64,
    errors: AtomicU64,
    budget: Option<u64>,
    deadline: Instant,
}

impl Shared {
    /// Claims one operation from the budget; false when the run is over.
    fn claim(&self, n: u64) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        let before = self.ops.fetch_add(n, Ordering::Relaxed);
        match self.budget {
            Some(b) => before < b,
            None => true,
        }
    }

    /// Whether the clients may still claim work, claiming none: the noisy
    /// neighbours go on while this holds.
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && self
                .budget
                .is_none_or(|b| self.ops.load(Ordering::Relaxed) < b)
    }
}

/// Free memory as the baseline counts it: free pages (buddy, per-CPU
/// lists, contiguous region) plus every byte of slab pages that holds no
/// live object (per-CPU arrays, empty slabs, free slots in partial slabs).
/// Counting the free slots makes the figure exact whatever the slab
/// fragmentation: it returns to the baseline exactly when every page and
/// every object the clients took is back and the kernel holds what it held
/// before.
pub(crate) fn available(c: &mut Client) -> Result<u64> {
    let m = c.meminfo().context("meminfo")?;
    let live: u64 = c
        .slabinfo()
        .context("slabinfo")?
        .iter()
        .map(|s| s.active_objs * s.stride)
        .sum();
    Ok(m.free + m.slab - live)
}

/// meminfo and the live bytes of every slab cache, for diagnosis.
pub struct Snapshot {
    meminfo: wire::Meminfo,
    live: BTreeMap<String, u64>,
}

impl Snapshot {
    fn take(c: &mut Client) -> Result<Snapshot> {
        let meminfo = c.meminfo().context("meminfo")?;
        let live = c
            .slabinfo()
            .context("slabinfo")?
            .into_iter()
            .map(|s| (s.name, s.active_objs * s.stride))
            .collect();
        Ok(Snapshot { meminfo, live })
    }

    /// The meminfo fields and the caches' live bytes that differ.
    fn diff(&self, later: &Snapshot) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        if let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (
            serde_json::to_value(&self.meminfo),
            serde_json::to_value(&later.meminfo),
        ) {
            for (k, va) in &a {
                if let (Some(x), Some(y)) = (va.as_u64(), b.get(k).and_then(|v| v.as_u64())) {
                    if x != y {
                        out.push((k.clone(), x, y));
                    }
                }
            }
        }
        for (name, &x) in &self.live {
            let y = later.live.get(name).copied().unwrap_or(0);
            if x != y {
                out.push((format!("live bytes in {name}"), x, y));
            }
        }
        for (name, &y) in &later.live {
            if !self.live.contains_key(name) {
                out.push((format!("live bytes in {name}"), 0, y));
            }
        }
        out
    }
}

/// Polls `available` until it has not changed for `stable` reads in a row
/// (or equals `target`), within `limit`.
pub(crate) fn settle(c: &mut Client, target: Option<u64>, limit: Duration) -> Result<u64> {
    let deadline = Instant::now() + limit;
    let mut last = u64::MAX;
    let mut same = 0;
    loop {
        let now = available(c)?;
        if Some(now) == target {
            return Ok(now);
        }
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if (target.is_none() && same >= 5) || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fault_targets(w: FaultWhich) -> &'static [FaultTarget] {
    match w {
        FaultWhich::Slab => &[FaultTarget::Slab],
        FaultWhich::Pages => &[FaultTarget::Pages],
        FaultWhich::Both => &[FaultTarget::Slab, FaultTarget::Pages],
    }
}

/// Connects `n` clients that each hold a page and an object at the same
/// time, then free them and disconnect: what grows once and stays
/// (connection tables, per-owner accounting, socket buffers' first use)
/// grows before the baseline is taken.
fn warm_up(opts: &Options, n: u32) -> Result<()> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = Client::connect(opts).with_context(|| format!("warm-up client {i}"))?;
        let (h, _) = c.alloc_pages(0, Gfp::KERNEL).context("warm-up alloc")?;
        let o = c.kmalloc(64, Gfp::KERNEL).context("warm-up kmalloc")?;
        held.push((c, h, o.handle));
    }
    for (mut c, h, o) in held {
        c.free_pages(h).context("warm-up free")?;
        c.kfree(o).context("warm-up kfree")?;
    }
    Ok(())
}

/// The tokens of a run: the clients' for the load, the operator's for the
/// control connection.
#[derive(Clone, Debug)]
pub struct Tokens {
    pub client: String,
    pub operator: String,
}

/// Runs the load test against a service at `addr`.
pub fn run_against(addr: &str, tokens: &Tokens, args: &Args) -> Result<Report> {
    args.validate()?;
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
    ctl.batch(
        vec![
            Op::Status,
            Op::Meminfo,
            Op::Zoneinfo,
            Op::Buddyinfo,
            Op::Slabinfo,
            Op::Mempools,
            Op::Cma,
            Op::Clients,
            Op::Faults,
        ],
        false,
    )
    .context("warming up the control connection")?;
    if args.profile == Profile::Exhaust {
        // As many connections as the test holds at once (the clients and
        // the late one), so the connection table has grown already.
        warm_up(&opts, args.clients + 1)?;
        let baseline = settle(&mut ctl, None, Duration::from_secs(args.settle))?;
        let base_info = Snapshot::take(&mut ctl)?;
        return exhaust(&opts, &mut ctl, args, baseline, &base_info);
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
    let baseline = settle(&mut ctl, None, Duration::from_secs(args.settle))?;
    let base_info = Snapshot::take(&mut ctl)?;

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
    let Driven {
        mut tally,
        fatal,
        elapsed,
        noisy,
        noisy_elapsed,
    } = drive(&load, args, args.ops, args.time_bound(), large_slots, true);
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

    let after = settle(&mut ctl, Some(baseline), Duration::from_secs(args.settle))?;
    let check_ok = ctl
        .check()
        .map_err(|e| format!("check: {e}"))
        .and_then(|r| {
            if r.ok {
                Ok(())
            } else {
                Err(format!("check failed: {r:?}"))
            }
        });
    let injected = fault_figures.as_ref().map_or(0, |f| f.injected);
    // ENOMEM is explained by injected faults, one failed request per
    // injection at most; any other code is unexplained.
    let total_errors: u64 = tally.errors.values().sum();
    let other = total_errors - tally.enomem - tally.table_full;
    let unexplained = other + tally.enomem.saturating_sub(injected);
    let (all, per_kind) = tally.latencies();
    Ok(Report {
        profile: args.profile,
        clients: args.clients,
        elapsed,
        ops: tally.ops,
        all,
        per_kind,
        errors: tally.errors,
        enomem: tally.enomem,
        table_full: tally.table_full,
        unexplained,
        fatal,
        faults: fault_figures,
        baseline,
        after,
        baseline_restored: after == baseline,
        meminfo_diff: base_info.diff(&Snapshot::take(&mut ctl)?),
        check_ok,
        exhaust: None,
        busy_ns,
        halted_ns,
        icount: args.guest.icount,
        noisy,
        loop_passes,
    })
}

/// Operations each client runs in the warm-up.
const WARM_UP_OPS_PER_CLIENT: u64 = 300;

/// Where the load's connections go: the clients' options and the noisy
/// neighbours' (the operator's token).
struct Load<'a> {
    clients: &'a Options,
    noisy: &'a Options,
}

/// What [`drive`] measured.
struct Driven {
    /// The clients' merged tally.
    tally: Tally,
    /// The failures of clients that died.
    fatal: Vec<String>,
    /// From the start until the last client stopped.
    elapsed: Duration,
    /// The noisy neighbours' merged outcome.
    noisy: noisy::Outcome,
    /// From the start until the last noisy neighbour stopped.
    noisy_elapsed: Duration,
}

/// How many of the large DMA slots the clients take (as many as there are
/// clients, so their profile is the same with or without neighbours) and
/// how many are left to the noisy neighbours.
fn share_large_slots(slots: u64, clients: u32, noisy: u32) -> (u64, u64) {
    let for_clients = slots.min(u64::from(clients));
    (for_clients, (slots - for_clients).min(u64::from(noisy)))
}

/// Runs the clients until `ops` or `bound`, and the noisy neighbours as
/// long as the clients run. In the measured run (`measured`) a progress
/// bar is shown; otherwise each noisy neighbour runs one whole round
/// first.
fn drive(
    load: &Load,
    args: &Args,
    ops: Option<u64>,
    bound: Duration,
    large_slots: u64,
    measured: bool,
) -> Driven {
    let shared = Shared {
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        budget: ops,
        deadline: Instant::now() + bound,
    };
    let (client_slots, noisy_slots) = share_large_slots(large_slots, args.clients, args.noisy);
    let results: Mutex<Vec<(Result<Tally, String>, Instant)>> = Mutex::new(Vec::new());
    let noisy_results: Mutex<Vec<(noisy::Outcome, Instant)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..args.clients {
            let (shared, results) = (&shared, &results);
            let seed = args.seed.wrapping_add(i as u64);
            let profile = args.profile;
            let batch = args.batch.clamp(1, wire::MAX_BATCH_OPS as u32);
            s.spawn(move || {
                let r = worker(
                    load.clients,
                    shared,
                    seed,
                    i as u64 >= client_slots,
                    i,
                    profile,
                    batch,
                );
                results.lock().unwrap().push((r, Instant::now()));
            });
        }
        for i in 0..args.noisy {
            let (shared, noisy_results) = (&shared, &noisy_results);
            let seed = args
                .seed
                .wrapping_add(u64::from(args.clients) + u64::from(i));
            s.spawn(move || {
                let o = noisy::noisy(
                    load.noisy,
                    shared,
                    seed,
                    i,
                    u64::from(i) < noisy_slots,
                    !measured,
                );
                noisy_results.lock().unwrap().push((o, Instant::now()));
            });
        }
        progress(&shared, ops, bound, measured);
    });
    let since_start = |t: Instant| t.saturating_duration_since(started);
    let mut tally = Tally::default();
    let mut fatal = Vec::new();
    let mut elapsed = Duration::ZERO;
    for (r, done) in results.into_inner().unwrap() {
        elapsed = elapsed.max(since_start(done));
        match r {
            Ok(t) => tally.merge(t),
            Err(e) => fatal.push(e),
        }
    }
    let mut noisy = noisy::Outcome::default();
    let mut noisy_elapsed = Duration::ZERO;
    for (o, done) in noisy_results.into_inner().unwrap() {
        noisy_elapsed = noisy_elapsed.max(since_start(done));
        noisy.merge(o);
    }
    Driven {
        tally,
        fatal,
        elapsed,
        noisy,
        noisy_elapsed,
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

/// The progress bar, until every worker has stopped claiming work.
fn progress(shared: &Shared, ops_bound: Option<u64>, bound: Duration, show: bool) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let (len, by_ops) = match ops_bound {
        Some(n) => (n, true),
        None => (bound.as_secs().max(1), false),
    };
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(len), target);
    pb.set_style(
        ProgressStyle::with_template(if by_ops {
            "{elapsed_precise} [{bar:40}] {pos}/{len} ops {msg}"
        } else {
            "{elapsed_precise} [{bar:40}] {pos}/{len} s {msg}"
        })
        .expect("valid template")
        .progress_chars("=> "),
    );
    let start = Instant::now();
    loop {
        let ops = shared.ops.load(Ordering::Relaxed);
        let t = start.elapsed();
        pb.set_position(if by_ops {
            ops.min(len)
        } else {
            t.as_secs().min(len)
        });
        pb.set_message(format!(
            "{ops} ops, {:.0} ops/s, {} errors",
            ops as f64 / t.as_secs_f64().max(1e-3),
            shared.errors.load(Ordering::Relaxed)
        ));
        let over = Instant::now() >= shared.deadline || ops_bound.is_some_and(|b| ops >= b);
        if over {
            shared.stop.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.finish_and_clear();
}

/// Boots memd under QEMU on a free loopback port and runs the load test
/// against it; the report, or why there is none (a crash, a guest that
/// never became ready, the time bound).
pub fn boot_and_run(args: &Args) -> Result<Report> {
    boot_and_run_with(args, None)
}

/// What runs beside a load test (`cargo xtask profile`): its own kernel
/// build, a QEMU monitor socket, and a task that runs while the load does
/// and is told when it ends.
pub struct Alongside<'a> {
    pub kernel: std::path::PathBuf,
    pub monitor: std::path::PathBuf,
    pub task: &'a mut (dyn FnMut(&std::sync::atomic::AtomicBool) + Send),
}

/// [`boot_and_run`], with `alongside` running beside the load.
pub fn boot_and_run_with(args: &Args, mut alongside: Option<Alongside>) -> Result<Report> {
    args.validate()?;
    let kernel = match &alongside {
        Some(a) => a.kernel.clone(),
        None => crate::build::build_kernel()?,
    };
    let (cfg, accel) = args.guest.config(kernel, "")?;
    let endpoint = Endpoint::temporary("loadtest")?;
    let tokens = Tokens {
        client: endpoint.tokens.client.clone(),
        operator: endpoint.tokens.operator.clone(),
    };
    let mut cfg = endpoint
        .serve(cfg)
        .time_bound(args.time_bound() + Duration::from_secs(180 + args.settle * 2));
    if let Some(a) = &alongside {
        cfg = cfg.monitor(a.monitor.clone());
    }
    if !args.json {
        eprintln!("loadtest: accelerator {}: {}", accel.name(), accel.reason);
        eprintln!("loadtest: booting memd on {}", endpoint.addr());
    }
    let addr = endpoint.addr();
    let (out, report) = cfg.run_client(|| {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            if let Some(a) = alongside.as_mut() {
                let (task, done) = (&mut a.task, &done);
                s.spawn(move || task(done));
            }
            let r = run_against(&addr, &tokens, args);
            done.store(true, Ordering::Relaxed);
            r
        })
    })?;
    let crashed = out.panicked();
    if out.timed_out || crashed || out.ready_after.is_none() {
        let tail: Vec<&str> = out
            .lines
            .iter()
            .rev()
            .take(40)
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "memd {} (status {:?}); console tail:\n{}\n{}",
            if crashed {
                "crashed"
            } else if out.ready_after.is_none() {
                "never became ready"
            } else {
                "timed out"
            },
            out.status,
            tail.join("\n"),
            out.stderr
        );
    }
    report.context("the load test did not run")?
}

/// The short end-to-end run of `cargo xtask test` (TCG): 8 clients for a
/// few seconds with 3 % injected faults, then the exhaustion test in a
/// 256 MiB guest. Each must pass: no crash, no unexplained error, free
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
    for (name, args) in [("mixed+faults", mixed), ("exhaust", exhaust)] {
        let t = Instant::now();
        let r = boot_and_run(&args).with_context(|| format!("loadtest smoke {name}"))?;
        let line = format!(
            "{name}: {} clients, {} ops, {:.0} ops/s, p99 {:.0} us, {} errors ({} unexplained), baseline {}",
            r.clients,
            r.ops,
            r.ops_per_sec(),
            r.all.p99,
            r.errors.values().sum::<u64>(),
            r.unexplained,
            if r.baseline_restored { "restored" } else { "NOT restored" }
        );
        if !r.passed() {
            r.print();
            bail!("loadtest smoke {line}");
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
    let noisy_ops = r.noisy.as_ref().map_or(0, |n| n.ops);
    let line = format!(
        "noisy-neighbour: {} clients beside 1 noisy ({noisy_ops} heavy ops), p99 {:.0} us, loop passes p99 {:.0} us (budget {:.0} us)",
        r.clients, r.all.p99, passes.p99_us, passes.budget_us
    );
    let waited = r.all.p99 > NEIGHBOUR_WAIT_BUDGETS * passes.budget_us;
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

pub fn run(args: &Args) -> Result<()> {
    let report = match &args.addr {
        Some(addr) => {
            let client = memd_client::discover_token(args.token.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let operator = match (&args.operator_token, &args.token) {
                (Some(t), _) | (None, Some(t)) => t.clone(),
                (None, None) => memd_client::discover_operator_token(None)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            run_against(addr, &Tokens { client, operator }, args)?
        }
        None => boot_and_run(args)?,
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        report.print();
    }
    if !report.passed() {
        bail!("load test failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let l = percentiles(&mut v);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, 50.0);
        assert_eq!(l.p90, 90.0);
        assert_eq!(l.p99, 99.0);
        assert_eq!(l.max, 100.0);
        let mut one = vec![7000];
        assert_eq!(percentiles(&mut one).p50, 7.0);
        assert_eq!(percentiles(&mut []).p99, 0.0);
    }

    #[test]
    fn budget_and_deadline_bound_claims() {
        let s = Shared {
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            budget: Some(3),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        assert!(s.claim(1) && s.claim(1) && s.claim(1));
        assert!(!s.claim(1));
        let late = Shared {
            budget: None,
            deadline: Instant::now(),
            ..s
        };
        assert!(!late.claim(1));
    }

    #[test]
    fn running_follows_the_claims_without_claiming() {
        let s = Shared {
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            budget: Some(2),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        assert!(s.running() && s.running());
        assert_eq!(s.ops.load(Ordering::Relaxed), 0);
        assert!(s.claim(1) && s.running());
        assert!(s.claim(1) && !s.running());
        let unbounded = Shared {
            budget: None,
            ops: AtomicU64::new(1 << 40),
            ..s
        };
        assert!(unbounded.running());
        unbounded.stop.store(true, Ordering::Relaxed);
        assert!(!unbounded.running());
        let late = Shared {
            stop: AtomicBool::new(false),
            deadline: Instant::now(),
            ..unbounded
        };
        assert!(!late.running());
    }

    #[test]
    fn clients_keep_their_large_slots_before_noisy_neighbours() {
        // Enough for everyone.
        assert_eq!(share_large_slots(27, 16, 4), (16, 4));
        // The clients as without neighbours; the neighbours get the rest.
        assert_eq!(share_large_slots(27, 16, 20), (16, 11));
        assert_eq!(share_large_slots(10, 16, 4), (10, 0));
        assert_eq!(share_large_slots(0, 16, 4), (0, 0));
        assert_eq!(share_large_slots(27, 16, 0), (16, 0));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("loadtest").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn noisy_option_parses_and_is_checked() {
        assert_eq!(parse(&[]).unwrap().noisy, 0);
        assert_eq!(Args::smoke(8, 4, None).noisy, 0);
        let a = parse(&["--noisy", "3", "--clients", "8"]).unwrap();
        assert_eq!((a.noisy, a.clients), (3, 8));
        a.validate().unwrap();
        assert!(parse(&["--noisy", "257"]).is_err());
        let too_many = parse(&["--noisy", "200", "--clients", "100"]).unwrap();
        assert!(too_many.validate().is_err());
        let exhaust = parse(&["--noisy", "1", "--profile", "exhaust"]).unwrap();
        assert!(exhaust.validate().is_err());
        let faults = parse(&["--fault-probability", "101"]).unwrap();
        assert!(faults.validate().is_err());
        parse(&["--profile", "exhaust"])
            .unwrap()
            .validate()
            .unwrap();
    }
}
