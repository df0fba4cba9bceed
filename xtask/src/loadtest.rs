//! `cargo xtask loadtest`: many concurrent clients against memd, a mixed
//! operation profile (pages of several orders, kmalloc, slab caches,
//! mempools, DMA buffers, statistics) or a batch profile (allocator
//! operations per second through batch frames), throughput and latency
//! percentiles per operation kind, errors by code, optional fault injection,
//! and a check that free memory returns exactly to its baseline once every
//! client has disconnected.
//!
//! It boots memd under QEMU itself (on a free loopback port, with its own
//! token) unless `--addr` names a running service. Every loop is bounded by
//! a count and by time; only 127.0.0.1 is used when booting.
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
use memd_client::wire::{
    errno, DmaMask, FaultConfig, FaultTarget, Gfp, Handle, Op, PoolBacking, Reply, SlabFlags,
};
use memd_client::{wire, Client, Error as ClientError, Options};

use crate::qemu::{self, Accel, Machine, QemuConfig};

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

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Target a running memd at this address instead of booting one.
    #[arg(long)]
    pub addr: Option<String>,
    /// Token for `--addr` (default: MEMD_TOKEN or .memd/token).
    #[arg(long)]
    pub token: Option<String>,
    /// Concurrent clients (1..=256).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_CLIENTS as i64))]
    pub clients: u32,
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
    /// QEMU machine (when booting).
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    pub machine: Machine,
    /// Accelerator (when booting; auto never picks a kvm_pvm /dev/kvm).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Guest memory (when booting).
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Extra kernel command line (when booting).
    #[arg(long, default_value = "memd.dma_reserve=128M@dma32")]
    pub cmdline: String,
    /// Seconds to wait for free memory to settle back to its baseline.
    #[arg(long, default_value_t = 20)]
    pub settle: u64,
    /// Boot with QEMU's `-icount shift=0` (TCG): the guest's busy time per
    /// operation is then its instruction count, free of the host's noise.
    #[arg(long)]
    pub icount: bool,
}

impl Args {
    /// The smoke run of `cargo xtask test`: short, TCG, asserted.
    pub fn smoke(clients: u32, secs: u64, fault_probability: Option<u8>) -> Args {
        Args {
            addr: None,
            token: None,
            clients,
            duration: Some(secs),
            ops: None,
            profile: Profile::Mixed,
            batch: 256,
            seed: 7,
            fault_probability,
            fault_target: FaultWhich::Both,
            fault_interval: 1,
            json: true,
            machine: Machine::Microvm,
            accel: Accel::Tcg,
            mem: "1G".into(),
            cmdline: "memd.dma_reserve=128M@dma32".into(),
            settle: 20,
            icount: false,
        }
    }

    fn time_bound(&self) -> Duration {
        Duration::from_secs(match (self.duration, self.ops) {
            (Some(d), _) => d,
            (None, Some(_)) => 3600,
            (None, None) => 10,
        })
    }
}

/// A small deterministic PRNG (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// True with `percent` % chance.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// An index chosen by weights.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut r = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if r < w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
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
    /// or pool table is full (64 each), a documented limit with many
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
}

/// A connection-level failure: the worker stops.
#[derive(Debug)]
struct Fatal(String);

fn connect(opts: &Options) -> Result<Client, Fatal> {
    Client::connect(opts).map_err(|e| Fatal(format!("connect: {e}")))
}

/// One client's live resources and its tally.
struct Worker<'a> {
    c: Client,
    rng: Rng,
    shared: &'a Shared,
    tally: Tally,
    pages: Vec<Handle>,
    objs: Vec<Handle>,
    cache: Option<Handle>,
    cache_objs: Vec<Handle>,
    pools: Vec<(Handle, Vec<Handle>)>,
    dma: Vec<(Handle, bool)>,
    /// May hold one DMA buffer larger than the buddy's largest block (CMA).
    large_dma_ok: bool,
    /// The code of the last server error.
    last_error: Option<i32>,
}

/// Per-client bound on live resources of each kind.
const LIVE_CAP: usize = 32;
/// A DMA buffer that only the contiguous region can serve (> 4 MiB).
pub const LARGE_DMA: u64 = 4608 << 10;

impl<'a> Worker<'a> {
    /// Times one call. Server errors are tallied and give `Ok(None)`;
    /// connection or protocol errors are fatal.
    fn timed<T>(
        &mut self,
        kind: &'static str,
        f: impl FnOnce(&mut Client) -> memd_client::Result<T>,
    ) -> Result<Option<T>, Fatal> {
        let t = Instant::now();
        let r = f(&mut self.c);
        let ns = t.elapsed().as_nanos() as u64;
        self.tally.lat.entry(kind).or_default().push(ns);
        self.tally.ops += 1;
        match r {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Server(e)) => {
                self.last_error = Some(e.code);
                self.tally.record_error(kind, &e);
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(Fatal(format!("{kind}: {e}"))),
        }
    }

    /// Creates the client's cache and up to three pools, retrying injected
    /// failures (ENOMEM); a full global table (ENOSPC) leaves the client
    /// with fewer.
    fn setup(&mut self) -> Result<(), Fatal> {
        let (mut cache_full, mut pools_full) = (false, false);
        for _ in 0..100 {
            if (self.cache.is_some() || cache_full) && (self.pools.len() == 3 || pools_full) {
                return Ok(());
            }
            if self.cache.is_none() && !cache_full {
                let size = 24 + self.rng.below(1000) as u32;
                let flags = if self.rng.chance(50) {
                    SlabFlags::HWCACHE_ALIGN
                } else {
                    SlabFlags::POISON | SlabFlags::RED_ZONE
                };
                // A constructor cannot go with poisoning (the poison would
                // overwrite what it built).
                let ctor = if !flags.contains(SlabFlags::POISON) && self.rng.chance(50) {
                    wire::Ctor::Fill(0xa5)
                } else {
                    wire::Ctor::None
                };
                self.cache = self.timed("cache-create", |c| {
                    c.cache_create("lt", size, 0, flags, ctor)
                })?;
                if self.cache.is_none() && self.last_error == Some(errno::ENOSPC) {
                    cache_full = true;
                    self.tally.table_full += 1;
                }
                continue;
            }
            let backing = match (self.pools.len(), self.cache) {
                (0, Some(cache)) => PoolBacking::Cache(cache),
                (0 | 1, _) => PoolBacking::Kmalloc {
                    size: 64 + self.rng.below(2000) as u32,
                },
                _ => PoolBacking::Pages {
                    order: self.rng.below(3) as u8,
                },
            };
            let min_nr = 1 + self.rng.below(4) as u32;
            match self.timed("pool-create", |c| c.pool_create(backing, min_nr))? {
                Some(h) => self.pools.push((h, Vec::new())),
                None if self.last_error == Some(errno::ENOSPC) => {
                    pools_full = true;
                    self.tally.table_full += 1;
                }
                None => {}
            }
        }
        Err(Fatal(
            "setup: could not create a cache and pools in 100 tries".into(),
        ))
    }

    fn alloc_or_free(rng: &mut Rng, live: usize) -> bool {
        live == 0 || (live < LIVE_CAP && rng.chance(55))
    }

    fn pick(rng: &mut Rng, v: &mut Vec<Handle>) -> Handle {
        let i = rng.below(v.len() as u64) as usize;
        v.swap_remove(i)
    }

    /// One step of the mixed profile.
    fn single_step(&mut self) -> Result<(), Fatal> {
        match self.objs.pop() {
            Some(h) => {
                self.timed("kfree", |c| c.kfree(h))?;
            }
            None => {
                if let Some(o) = self.timed("kmalloc", |c| c.kmalloc(64, Gfp::KERNEL))? {
                    self.objs.push(o.handle);
                }
            }
        }
        Ok(())
    }

    fn mixed_step(&mut self) -> Result<(), Fatal> {
        const ORDER_W: [u64; 6] = [40, 20, 15, 10, 10, 5];
        match self.rng.weighted(&[25, 25, 15, 12, 10, 13]) {
            0 => {
                if Self::alloc_or_free(&mut self.rng, self.pages.len()) {
                    let order = self.rng.weighted(&ORDER_W) as u8;
                    let gfp = if self.rng.chance(20) {
                        Gfp::KERNEL | Gfp::ZERO
                    } else {
                        Gfp::KERNEL
                    };
                    if let Some((h, _)) =
                        self.timed("alloc-pages", |c| c.alloc_pages(order, gfp))?
                    {
                        self.pages.push(h);
                    }
                } else {
                    let h = Self::pick(&mut self.rng, &mut self.pages);
                    self.timed("free-pages", |c| c.free_pages(h))?;
                }
            }
            1 => {
                if Self::alloc_or_free(&mut self.rng, self.objs.len()) {
                    let size = if self.rng.chance(5) {
                        8192 + self.rng.below(56 << 10)
                    } else {
                        let limit = if self.rng.chance(70) { 512 } else { 8192 };
                        1 + self.rng.below(limit)
                    };
                    if let Some(o) = self.timed("kmalloc", |c| c.kmalloc(size, Gfp::KERNEL))? {
                        self.objs.push(o.handle);
                    }
                } else {
                    let h = Self::pick(&mut self.rng, &mut self.objs);
                    self.timed("kfree", |c| c.kfree(h))?;
                }
            }
            2 if self.cache.is_some() => {
                let cache = self.cache.expect("checked");
                if Self::alloc_or_free(&mut self.rng, self.cache_objs.len()) {
                    if let Some(o) =
                        self.timed("cache-alloc", |c| c.cache_alloc(cache, Gfp::KERNEL))?
                    {
                        self.cache_objs.push(o.handle);
                    }
                } else {
                    let h = Self::pick(&mut self.rng, &mut self.cache_objs);
                    self.timed("cache-free", |c| c.cache_free(cache, h))?;
                    if self.rng.chance(5) {
                        self.timed("cache-shrink", |c| c.cache_shrink(cache))?;
                    }
                }
            }
            3 if !self.pools.is_empty() => {
                let p = self.rng.below(self.pools.len() as u64) as usize;
                let pool = self.pools[p].0;
                if Self::alloc_or_free(&mut self.rng, self.pools[p].1.len()) {
                    if let Some(o) =
                        self.timed("pool-alloc", |c| c.pool_alloc(pool, Gfp::KERNEL))?
                    {
                        self.pools[p].1.push(o.handle);
                    }
                } else {
                    let h = Self::pick(&mut self.rng, &mut self.pools[p].1);
                    self.timed("pool-free", |c| c.pool_free(pool, h))?;
                }
            }
            4 => {
                let live = self.dma.len();
                if live == 0 || (live < 4 && self.rng.chance(55)) {
                    let has_large = self.dma.iter().any(|d| d.1);
                    let (len, mask, large) =
                        if self.large_dma_ok && !has_large && self.rng.chance(10) {
                            (LARGE_DMA, DmaMask::Bits32, true)
                        } else if self.rng.chance(10) && !self.dma.iter().any(|d| !d.1) {
                            // A small buffer for an ISA-style device (< 16 MiB).
                            (4096 << self.rng.below(3), DmaMask::Bits24, false)
                        } else {
                            let mask = if self.rng.chance(50) {
                                DmaMask::Bits32
                            } else {
                                DmaMask::Bits64
                            };
                            (512 + self.rng.below(256 << 10), mask, false)
                        };
                    if let Some(b) = self.timed("dma-alloc", |c| c.dma_alloc(len, 0, mask))? {
                        let h = b.handle;
                        if self.rng.chance(30) {
                            let seed = self.rng.next();
                            self.timed("dma-fill", |c| c.dma_fill(h, seed))?;
                        }
                        self.dma.push((h, large));
                    }
                } else {
                    let i = self.rng.below(live as u64) as usize;
                    let (h, _) = self.dma.swap_remove(i);
                    self.timed("dma-free", |c| c.dma_free(h))?;
                }
            }
            _ => match self.rng.below(5) {
                0 => {
                    self.timed("meminfo", |c| c.meminfo())?;
                }
                1 => {
                    self.timed("status", |c| c.status())?;
                }
                2 => {
                    self.timed("buddyinfo", |c| c.buddyinfo())?;
                }
                3 => {
                    self.timed("slabinfo", |c| c.slabinfo())?;
                }
                _ => {
                    self.timed("zoneinfo", |c| c.zoneinfo())?;
                }
            },
        }
        Ok(())
    }

    /// One step of the batch profile: `n` allocations in one frame, then
    /// their frees in another. Latency is per frame; ops count each
    /// operation in it.
    fn batch_step(&mut self, n: u32) -> Result<(), Fatal> {
        let pages = self.rng.chance(30);
        let ops: Vec<Op> = (0..n)
            .map(|_| {
                if pages {
                    Op::AllocPages {
                        order: self.rng.below(3) as u8,
                        gfp: Gfp::KERNEL,
                    }
                } else {
                    Op::Kmalloc {
                        size: 8 + self.rng.below(1024),
                        gfp: Gfp::KERNEL,
                    }
                }
            })
            .collect();
        let (akind, fkind) = if pages {
            ("batch-alloc-pages", "batch-free-pages")
        } else {
            ("batch-kmalloc", "batch-kfree")
        };
        let Some(results) = self.timed(akind, |c| c.batch(ops, false))? else {
            return Ok(());
        };
        self.tally.ops += results.len() as u64 - 1;
        let mut frees = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Ok(Reply::Pages { handle, .. }) => frees.push(Op::FreePages { handle }),
                Ok(Reply::Object { handle, .. }) => frees.push(Op::Kfree { handle }),
                Ok(other) => return Err(Fatal(format!("{akind}: unexpected reply {other:?}"))),
                Err(e) => {
                    self.tally.record_error(akind, &e);
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if frees.is_empty() {
            return Ok(());
        }
        let nfree = frees.len() as u64;
        self.shared.ops.fetch_add(nfree, Ordering::Relaxed);
        if let Some(results) = self.timed(fkind, |c| c.batch(frees, false))? {
            self.tally.ops += nfree - 1;
            for r in results {
                if let Err(e) = r {
                    *self
                        .tally
                        .errors
                        .entry((fkind, e.code_name().to_string()))
                        .or_default() += 1;
                    self.shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Frees everything explicitly (half of the clients do this; the other
    /// half just disconnect and leave it to the service).
    fn teardown(&mut self) -> Result<(), Fatal> {
        for h in std::mem::take(&mut self.pages) {
            self.timed("free-pages", |c| c.free_pages(h))?;
        }
        for h in std::mem::take(&mut self.objs) {
            self.timed("kfree", |c| c.kfree(h))?;
        }
        for (h, _) in std::mem::take(&mut self.dma) {
            self.timed("dma-free", |c| c.dma_free(h))?;
        }
        for (pool, objs) in std::mem::take(&mut self.pools) {
            for h in objs {
                self.timed("pool-free", |c| c.pool_free(pool, h))?;
            }
            self.timed("pool-destroy", |c| c.pool_destroy(pool))?;
        }
        if let Some(cache) = self.cache.take() {
            for h in std::mem::take(&mut self.cache_objs) {
                self.timed("cache-free", |c| c.cache_free(cache, h))?;
            }
            self.timed("cache-destroy", |c| c.cache_destroy(cache))?;
        }
        Ok(())
    }
}

/// Free memory as the baseline counts it: free pages (buddy, per-CPU
/// lists, contiguous region) plus every byte of slab pages that holds no
/// live object (per-CPU arrays, empty slabs, free slots in partial slabs).
/// Counting the free slots makes the figure exact whatever the slab
/// fragmentation: it returns to the baseline exactly when every page and
/// every object the clients took is back and the kernel holds what it held
/// before.
fn available(c: &mut Client) -> Result<u64> {
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
fn settle(c: &mut Client, target: Option<u64>, limit: Duration) -> Result<u64> {
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

/// Percentiles of one operation kind, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

fn percentiles(v: &mut [u64]) -> Lat {
    v.sort_unstable();
    let at = |q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    Lat {
        count: v.len() as u64,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// Fault counters after a run (both targets).
#[derive(Debug, Clone, Default)]
pub struct FaultFigures {
    pub probability: u8,
    pub injected: u64,
    pub calls: u64,
}

/// What one run measured.
#[derive(Debug)]
pub struct Report {
    pub profile: Profile,
    pub clients: u32,
    pub elapsed: Duration,
    pub ops: u64,
    pub all: Lat,
    pub per_kind: Vec<(&'static str, Lat)>,
    pub errors: BTreeMap<(&'static str, String), u64>,
    pub enomem: u64,
    /// ENOSPC from a full global cache or pool table (explained).
    pub table_full: u64,
    /// Errors no injected fault explains.
    pub unexplained: u64,
    pub fatal: Vec<String>,
    pub faults: Option<FaultFigures>,
    pub baseline: u64,
    pub after: u64,
    pub baseline_restored: bool,
    /// meminfo fields that differ between the baseline and the end
    /// (name, baseline, after), for diagnosis.
    pub meminfo_diff: Vec<(String, u64, u64)>,
    pub check_ok: Result<(), String>,
    /// Exhaustion profile: what was seen (None for other profiles).
    pub exhaust: Option<ExhaustFigures>,
    /// The guest's busy time during the run (`Status::busy_ns`), if it
    /// measures it.
    pub busy_ns: Option<u64>,
    /// The guest's time halted while idle during the run
    /// (`Status::halted_ns`), if it measures it.
    pub halted_ns: Option<u64>,
    /// Whether the guest's clock counted instructions (`--icount`).
    pub icount: bool,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Whether the run passed: no unexplained error, no dead client,
    /// memory back at its baseline, the invariant checkers clean.
    pub fn passed(&self) -> bool {
        self.unexplained == 0
            && self.fatal.is_empty()
            && self.baseline_restored
            && self.check_ok.is_ok()
            && self.exhaust.as_ref().is_none_or(|e| e.problems.is_empty())
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let per: serde_json::Map<String, serde_json::Value> = self
            .per_kind
            .iter()
            .map(|(k, l)| {
                (
                    k.to_string(),
                    json!({"count": l.count, "p50_us": l.p50, "p90_us": l.p90, "p99_us": l.p99, "max_us": l.max}),
                )
            })
            .collect();
        let by_code: serde_json::Map<String, serde_json::Value> = self
            .errors
            .iter()
            .map(|((k, c), n)| (format!("{k}:{c}"), json!(n)))
            .collect();
        json!({
            "profile": format!("{:?}", self.profile).to_lowercase(),
            "clients": self.clients,
            "duration_s": self.elapsed.as_secs_f64(),
            "ops": self.ops,
            "ops_per_sec": self.ops_per_sec(),
            "p50_us": self.all.p50,
            "p90_us": self.all.p90,
            "p99_us": self.all.p99,
            "max_us": self.all.max,
            "guest_busy_ns": self.busy_ns,
            "guest_halted_ns": self.halted_ns,
            "icount": self.icount,
            "per_op": per,
            "errors": self.errors.values().sum::<u64>(),
            "errors_by_code": by_code,
            "enomem": self.enomem,
            "table_full": self.table_full,
            "unexplained_errors": self.unexplained,
            "client_failures": self.fatal,
            "faults": self.faults.as_ref().map(|f| json!({"probability": f.probability, "injected": f.injected, "calls": f.calls})),
            "baseline_bytes": self.baseline,
            "after_bytes": self.after,
            "baseline_restored": self.baseline_restored,
            "meminfo_diff": self.meminfo_diff.iter().map(|(k, a, b)| json!({"field": k, "baseline": a, "after": b})).collect::<Vec<_>>(),
            "check": match &self.check_ok { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
            "exhaust": self.exhaust.as_ref().map(|e| e.to_json()),
            "passed": self.passed(),
        })
    }

    pub fn print(&self) {
        println!(
            "loadtest: {:?} profile, {} clients, {:.1} s, {} ops, {:.0} ops/s",
            self.profile,
            self.clients,
            self.elapsed.as_secs_f64(),
            self.ops,
            self.ops_per_sec()
        );
        println!(
            "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "operation", "count", "p50 us", "p90 us", "p99 us", "max us"
        );
        for (k, l) in self.per_kind.iter().chain([("all", self.all)].iter()) {
            println!(
                "{:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                k, l.count, l.p50, l.p90, l.p99, l.max
            );
        }
        if let Some(busy) = self.busy_ns {
            let per_op = busy as f64 / self.ops.max(1) as f64;
            if self.icount {
                println!(
                    "guest: {:.0} instructions per operation (icount; busy {busy} instructions)",
                    per_op
                );
            } else {
                println!(
                    "guest: busy {:.3} s{} of {:.3} s, {:.2} us per operation",
                    busy as f64 / 1e9,
                    self.halted_ns
                        .map(|h| format!(", halted {:.3} s", h as f64 / 1e9))
                        .unwrap_or_default(),
                    self.elapsed.as_secs_f64(),
                    per_op / 1e3
                );
            }
        }
        if self.errors.is_empty() {
            println!("errors: none");
        } else {
            println!("errors:");
            for ((k, c), n) in &self.errors {
                println!("  {k:<20} {c:<8} {n}");
            }
        }
        if self.table_full > 0 {
            println!(
                "ENOSPC from full global cache/pool tables (64 each): {}",
                self.table_full
            );
        }
        println!("unexplained errors: {}", self.unexplained);
        if let Some(f) = &self.faults {
            println!(
                "faults: {} % probability, {} injected in {} eligible allocations; {} ENOMEM replies",
                f.probability, f.injected, f.calls, self.enomem
            );
        }
        for f in &self.fatal {
            println!("client failure: {f}");
        }
        if let Some(e) = &self.exhaust {
            e.print();
        }
        println!(
            "free memory: baseline {} bytes, after {} bytes: {}",
            self.baseline,
            self.after,
            if self.baseline_restored {
                "restored exactly".to_string()
            } else {
                format!(
                    "NOT restored ({:+} bytes)",
                    self.after as i128 - self.baseline as i128
                )
            }
        );
        for (k, a, b) in &self.meminfo_diff {
            println!("  meminfo {k}: {a} -> {b} ({:+})", *b as i128 - *a as i128);
        }
        println!(
            "invariant check: {}",
            match &self.check_ok {
                Ok(()) => "ok",
                Err(e) => e.as_str(),
            }
        );
        println!("verdict: {}", if self.passed() { "PASS" } else { "FAIL" });
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

/// Runs the load test against a service at `addr`.
pub fn run_against(addr: &str, token: &str, args: &Args) -> Result<Report> {
    let mut opts = Options::new(addr, token);
    opts.client = "loadtest".into();
    opts.ready_timeout = Duration::from_secs(30);
    let mut ctl = Client::connect(&opts).context("control connection")?;
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
    // The warm-up is the same profile, briefly, with as many clients: what
    // grows once and stays (connection and handle tables, the cache and
    // pool tables, socket buffers' first use) grows before the baseline.
    let warm = drive(
        &opts,
        args,
        Some(WARM_UP_OPS_PER_CLIENT * args.clients as u64),
        Duration::from_secs(30),
        large_slots,
        false,
    );
    if let Some(e) = warm.1.first() {
        bail!("warm-up: {e}");
    }
    let baseline = settle(&mut ctl, None, Duration::from_secs(args.settle))?;
    let base_info = Snapshot::take(&mut ctl)?;

    let faults = args.fault_probability.filter(|&p| p > 0);
    if let Some(p) = faults {
        if p > 100 {
            bail!("--fault-probability is a percentage (0..=100)");
        }
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
    let started = Instant::now();
    let (mut tally, fatal) = drive(&opts, args, args.ops, args.time_bound(), large_slots, true);
    let elapsed = started.elapsed();
    let after = ctl.status().ok();
    let grew = |field: fn(&wire::Status) -> Option<u64>| {
        Some(field(after.as_ref()?)?.saturating_sub(field(before.as_ref()?)?))
    };
    let (busy_ns, halted_ns) = (grew(|s| s.busy_ns), grew(|s| s.halted_ns));

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
        icount: args.icount,
    })
}

/// Operations each client runs in the warm-up.
const WARM_UP_OPS_PER_CLIENT: u64 = 300;

/// Runs the clients until `ops` or `bound`; their merged tally and the
/// failures of clients that died.
fn drive(
    opts: &Options,
    args: &Args,
    ops: Option<u64>,
    bound: Duration,
    large_slots: u64,
    show_progress: bool,
) -> (Tally, Vec<String>) {
    let shared = Shared {
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        budget: ops,
        deadline: Instant::now() + bound,
    };
    let results: Mutex<Vec<Result<Tally, String>>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..args.clients {
            let (shared, results) = (&shared, &results);
            let seed = args.seed.wrapping_add(i as u64);
            let profile = args.profile;
            let batch = args.batch.clamp(1, wire::MAX_BATCH_OPS as u32);
            s.spawn(move || {
                let r = worker(
                    opts,
                    shared,
                    seed,
                    i as u64 >= large_slots,
                    i,
                    profile,
                    batch,
                );
                results.lock().unwrap().push(r);
            });
        }
        progress(&shared, ops, bound, show_progress);
    });
    let mut tally = Tally::default();
    let mut fatal = Vec::new();
    for r in results.into_inner().unwrap() {
        match r {
            Ok(t) => tally.merge(t),
            Err(e) => fatal.push(e),
        }
    }
    (tally, fatal)
}

/// Injected failures and eligible calls so far, both targets together.
fn faults_now(c: &mut Client) -> Result<(u64, u64)> {
    let f = c.faults().context("reading fault counters")?;
    Ok((
        f.slab.injected + f.pages.injected,
        f.slab.calls + f.pages.calls,
    ))
}

fn worker(
    opts: &Options,
    shared: &Shared,
    seed: u64,
    no_large_dma: bool,
    idx: u32,
    profile: Profile,
    batch: u32,
) -> Result<Tally, String> {
    let mut opts = opts.clone();
    opts.client = format!("loadtest-{idx}");
    let c = connect(&opts).map_err(|e| format!("client {idx}: {}", e.0))?;
    let mut w = Worker {
        c,
        rng: Rng::new(seed),
        shared,
        tally: Tally::default(),
        pages: Vec::new(),
        objs: Vec::new(),
        cache: None,
        cache_objs: Vec::new(),
        pools: Vec::new(),
        dma: Vec::new(),
        large_dma_ok: !no_large_dma,
        last_error: None,
    };
    let r = (|| -> Result<(), Fatal> {
        match profile {
            Profile::Mixed => {
                w.setup()?;
                while shared.claim(1) {
                    w.mixed_step()?;
                }
                if idx.is_multiple_of(2) {
                    w.teardown()?;
                }
            }
            Profile::Batch => {
                while shared.claim(batch as u64) {
                    w.batch_step(batch)?;
                }
            }
            Profile::Single => {
                while shared.claim(1) {
                    w.single_step()?;
                }
                while let Some(h) = w.objs.pop() {
                    w.timed("kfree", |c| c.kfree(h))?;
                }
            }
            Profile::Exhaust => unreachable!("exhaust has its own driver"),
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(w.tally),
        Err(Fatal(e)) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            Err(format!("client {idx}: {e}"))
        }
    }
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

/// What the exhaustion profile saw.
#[derive(Debug, Default)]
pub struct ExhaustFigures {
    /// Pages each client held when it stopped.
    pub held_pages: Vec<u64>,
    pub quota_pages: u64,
    pub enomem_clients: u32,
    pub edquot_clients: u32,
    /// Free pages per zone and its `min` watermark, at exhaustion.
    pub zones: Vec<(String, u64, u64)>,
    /// Pages missing below the zones' min watermarks at exhaustion.
    pub reserve_deficit_pages: u64,
    /// Pages the kernel's own memory (heap, its DMA buffers: all that is
    /// neither free nor the clients') grew by since the baseline: the only
    /// allowed user of the reserve.
    pub heap_growth_pages: u64,
    /// Client ATOMIC requests refused (ENOMEM) and granted at exhaustion.
    pub atomic_refused: u32,
    pub atomic_granted: u32,
    pub new_connection_ok: bool,
    pub stats_ok: bool,
    pub problems: Vec<String>,
}

impl ExhaustFigures {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "held_pages": self.held_pages,
            "quota_pages": self.quota_pages,
            "enomem_clients": self.enomem_clients,
            "edquot_clients": self.edquot_clients,
            "zones": self.zones.iter().map(|(n, f, m)| serde_json::json!({"zone": n, "free": f, "min": m})).collect::<Vec<_>>(),
            "reserve_deficit_pages": self.reserve_deficit_pages,
            "heap_growth_pages": self.heap_growth_pages,
            "atomic_refused": self.atomic_refused,
            "atomic_granted": self.atomic_granted,
            "new_connection_ok": self.new_connection_ok,
            "stats_ok": self.stats_ok,
            "problems": self.problems,
        })
    }

    fn print(&self) {
        println!(
            "exhaustion: clients held {:?} pages (quota {} each); {} stopped at ENOMEM, {} at EDQUOT",
            self.held_pages, self.quota_pages, self.enomem_clients, self.edquot_clients
        );
        for (n, f, m) in &self.zones {
            println!("  zone {n:<7} free {f:>8} pages, min {m:>6}");
        }
        println!(
            "  below min: {} pages (the kernel's own memory grew by {} pages since the baseline)",
            self.reserve_deficit_pages, self.heap_growth_pages,
        );
        println!(
            "  client ATOMIC requests at exhaustion: {} refused, {} granted; new connection: {}; statistics: {}",
            self.atomic_refused,
            self.atomic_granted,
            ok(self.new_connection_ok),
            ok(self.stats_ok)
        );
        for p in &self.problems {
            println!("  problem: {p}");
        }
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "FAILED"
    }
}

/// The exhaustion test: every client takes page blocks (largest orders
/// first, through batch frames) until the service refuses; the refusals
/// must be ENOMEM (memory gone) or EDQUOT (the client's quota reached),
/// nothing else. With memory exhausted: clients' ATOMIC requests are
/// refused too (the reserve below `min` is the kernel's), every zone still
/// has at least its `min` watermark free, a new client connects and the
/// statistics are served (the kernel's own heap lives on the reserve).
/// Then everyone disconnects and free memory must return to the baseline.
fn exhaust(
    opts: &Options,
    ctl: &mut Client,
    args: &Args,
    baseline: u64,
    base_info: &Snapshot,
) -> Result<Report> {
    let started = Instant::now();
    let deadline = started + args.time_bound().max(Duration::from_secs(120));
    let mut fig = ExhaustFigures {
        quota_pages: ctl.hello().quota.pages,
        ..Default::default()
    };
    let mut tally = Tally::default();
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let mut o = opts.clone();
        o.client = format!("exhaust-{i}");
        clients.push(Client::connect(&o).with_context(|| format!("exhaust client {i}"))?);
    }
    let max_order = ctl.status().context("status")?.max_order.max(1) as u8;
    // Round robin, so that every client gets its share before memory ends.
    let mut held = vec![0u64; clients.len()];
    let mut stopped: Vec<Option<i32>> = vec![None; clients.len()];
    let mut order = max_order - 1;
    loop {
        if Instant::now() > deadline {
            fig.problems
                .push("memory not exhausted within the time bound".into());
            break;
        }
        let mut progressed = false;
        for (i, c) in clients.iter_mut().enumerate() {
            if stopped[i].is_some() {
                continue;
            }
            let ops = vec![
                Op::AllocPages {
                    order,
                    gfp: Gfp::KERNEL | Gfp::NOWARN,
                };
                16
            ];
            let t = Instant::now();
            let rs = c.batch(ops, true).context("exhaust batch")?;
            tally
                .lat
                .entry("batch-alloc-pages")
                .or_default()
                .push(t.elapsed().as_nanos() as u64);
            for r in rs {
                tally.ops += 1;
                match r {
                    Ok(Reply::Pages { order, .. }) => {
                        held[i] += 1 << order;
                        progressed = true;
                    }
                    Ok(other) => bail!("unexpected reply {other:?}"),
                    Err(e) => {
                        tally.record_error("alloc-pages", &e);
                        if e.code == errno::ENOMEM {
                            // Smaller blocks may still fit: only order 0
                            // failing means memory is gone for this client.
                            if order == 0 {
                                stopped[i] = Some(e.code);
                            }
                        } else {
                            stopped[i] = Some(e.code);
                        }
                    }
                }
            }
        }
        if stopped.iter().all(|s| s.is_some()) {
            break;
        }
        if !progressed {
            if order == 0 {
                continue;
            }
            order -= 1;
        }
    }
    fig.held_pages = held.clone();
    for (i, s) in stopped.iter().enumerate() {
        match *s {
            Some(errno::ENOMEM) => fig.enomem_clients += 1,
            Some(errno::EDQUOT) => fig.edquot_clients += 1,
            Some(code) => fig.problems.push(format!(
                "client {i} stopped with {} instead of ENOMEM/EDQUOT",
                wire::errno_name(code)
            )),
            None => {}
        }
        if held[i] > fig.quota_pages {
            fig.problems.push(format!(
                "client {i} holds {} pages, above its quota of {}",
                held[i], fig.quota_pages
            ));
        }
    }
    if fig.enomem_clients == 0 {
        fig.problems.push(
            "no client saw ENOMEM: memory was not exhausted (more clients or a smaller --mem)"
                .into(),
        );
    }
    // Clients' ATOMIC requests must not reach into the reserve either: it
    // belongs to the kernel (its heap keeps serving from it).
    for (i, c) in clients.iter_mut().enumerate() {
        let rs = c
            .batch(
                vec![
                    Op::AllocPages {
                        order: 0,
                        gfp: Gfp::ATOMIC | Gfp::NOWARN,
                    };
                    8
                ],
                false,
            )
            .context("ATOMIC batch")?;
        for r in rs {
            tally.ops += 1;
            match r {
                Ok(Reply::Pages { order, .. }) => {
                    held[i] += 1 << order;
                    fig.atomic_granted += 1;
                }
                Ok(other) => bail!("unexpected reply {other:?}"),
                Err(e) => {
                    tally.record_error("alloc-pages-atomic", &e);
                    if e.code == errno::ENOMEM {
                        fig.atomic_refused += 1;
                    }
                }
            }
        }
    }
    if fig.atomic_granted > 0 {
        fig.problems.push(format!(
            "{} client ATOMIC pages were granted with memory exhausted: the reserve below min is the kernel's",
            fig.atomic_granted
        ));
    }
    // The reserve: no client request took a zone below its min watermark.
    // The kernel itself may (its heap lives on the reserve when memory is
    // gone: the handle tables of what the clients hold, reply frames), so
    // every page missing below `min` must be a page the kernel's own memory
    // grew by since the baseline. Free pages include the per-CPU lists.
    let rs = ctl
        .batch(vec![Op::Zoneinfo, Op::Meminfo], true)
        .context("zoneinfo at exhaustion")?;
    let (zones, mi) = match &rs[..] {
        [Ok(Reply::Zoneinfo(z)), Ok(Reply::Meminfo(m))] => (z.clone(), m.clone()),
        other => bail!("zoneinfo/meminfo at exhaustion: {other:?}"),
    };
    // What the kernel holds: everything not free and not held by the
    // clients (their pages are counted exactly above).
    let page = 4096;
    let client_bytes: u64 = held.iter().sum::<u64>() * page;
    let kernel_now = mi.total - mi.free - client_bytes;
    let kernel_base = base_info.meminfo.total - base_info.meminfo.free;
    fig.heap_growth_pages = kernel_now.saturating_sub(kernel_base) / page;
    for z in zones.iter().filter(|z| z.managed > 0) {
        let free = z.free + z.pcp_count;
        fig.zones.push((z.name.clone(), free, z.min));
        fig.reserve_deficit_pages += z.min.saturating_sub(free);
    }
    // The kernel's use cannot be told apart per zone from outside (its
    // heap also gives back cached slabs when memory runs out), so what is
    // asserted is that the reserve is still there for it: every zone keeps
    // at least the part below the ATOMIC mark (min/4) that only the kernel
    // may touch, and no client ATOMIC request was granted (above).
    for z in zones.iter().filter(|z| z.managed > 0) {
        let free = z.free + z.pcp_count;
        if free < z.min / 4 {
            fig.problems.push(format!(
                "zone {} has {} free pages, below a quarter of its min watermark {}: the reserve is gone",
                z.name, free, z.min
            ));
        }
    }
    // A new connection and the statistics, with memory exhausted.
    let mut o = opts.clone();
    o.client = "exhaust-late".into();
    match Client::connect(&o) {
        Ok(mut late) => {
            fig.new_connection_ok = true;
            let stats = (|| -> memd_client::Result<()> {
                late.status()?;
                late.meminfo()?;
                late.zoneinfo()?;
                late.buddyinfo()?;
                late.slabinfo()?;
                late.clients()?;
                Ok(())
            })();
            match stats {
                Ok(()) => fig.stats_ok = true,
                Err(e) => fig
                    .problems
                    .push(format!("statistics with memory exhausted: {e}")),
            }
        }
        Err(e) => fig
            .problems
            .push(format!("new connection with memory exhausted: {e}")),
    }
    let elapsed = started.elapsed();
    drop(clients);
    let after = settle(ctl, Some(baseline), Duration::from_secs(args.settle))?;
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
    // ENOMEM and EDQUOT are the expected refusals here.
    let unexplained = tally
        .errors
        .iter()
        .filter(|((_, c), _)| c != "ENOMEM" && c != "EDQUOT")
        .map(|(_, n)| n)
        .sum();
    let (all, per_kind) = tally.latencies();
    Ok(Report {
        profile: Profile::Exhaust,
        clients: args.clients,
        elapsed,
        ops: tally.ops,
        all,
        per_kind,
        errors: tally.errors,
        enomem: tally.enomem,
        table_full: tally.table_full,
        unexplained,
        fatal: Vec::new(),
        faults: None,
        baseline,
        after,
        baseline_restored: after == baseline,
        meminfo_diff: base_info.diff(&Snapshot::take(ctl)?),
        check_ok,
        exhaust: Some(fig),
        busy_ns: None,
        halted_ns: None,
        icount: args.icount,
    })
}

/// Boots memd under QEMU on a free loopback port and runs the load test
/// against it; the report, and whether the guest crashed.
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
    let kernel = match &alongside {
        Some(a) => a.kernel.clone(),
        None => crate::build::build_kernel()?,
    };
    let qemu_path = qemu::ensure_qemu()?;
    let accel = qemu::choose_accel(args.accel)?;
    let port = qemu::free_port()?;
    let token = crate::run::random_token()?;
    let cfg = QemuConfig {
        qemu: qemu_path,
        kernel,
        machine: args.machine,
        kvm: accel.kvm,
        mem: args.mem.clone(),
        cmdline: format!("memd.port={port} memd.token={token} {}", args.cmdline)
            .trim()
            .to_string(),
        forward_port: Some(port),
        disk: None,
        monitor: alongside.as_ref().map(|a| a.monitor.clone()),
        icount: args.icount,
    };
    if !args.json {
        eprintln!("loadtest: accelerator {}: {}", accel.name(), accel.reason);
        eprintln!("loadtest: booting memd on 127.0.0.1:{port}");
    }
    let mut report: Option<Result<Report>> = None;
    let addr = format!("127.0.0.1:{port}");
    let mut action = || -> Result<(), String> {
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            if let Some(a) = alongside.as_mut() {
                let (task, done) = (&mut a.task, &done);
                s.spawn(move || task(done));
            }
            let r = run_against(&addr, &token, args);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        });
        let msg = r.as_ref().err().map(|e| format!("{e:#}"));
        report = Some(r);
        msg.map_or(Ok(()), Err)
    };
    let bound = args.time_bound() + Duration::from_secs(180 + args.settle * 2);
    let out = qemu::run_with(&cfg, bound, false, Some(&mut action))?;
    let crashed = out.panicked() || out.lines.iter().any(|(_, l)| l.contains("memd: FATAL"));
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
    let exhaust = Args {
        profile: Profile::Exhaust,
        clients: 4,
        mem: "256M".into(),
        cmdline: String::new(),
        fault_probability: None,
        ..Args::smoke(4, 4, None)
    };
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
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let report = match &args.addr {
        Some(addr) => {
            let token = memd_client::discover_token(args.token.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            run_against(addr, &token, args)?
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
    fn weighted_choice_follows_weights() {
        let mut r = Rng::new(3);
        let mut n = [0u32; 3];
        for _ in 0..30_000 {
            n[r.weighted(&[1, 0, 2])] += 1;
        }
        assert_eq!(n[1], 0);
        assert!(n[2] > n[0] * 3 / 2, "{n:?}");
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
}
