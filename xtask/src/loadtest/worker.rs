//! One load-test client: its connection, what it holds, and a step of each
//! profile (mixed, batch, single), timed per operation kind.

use std::sync::atomic::Ordering;

use anyhow::Result;
use memd_client::wire::{DmaMask, Gfp, Handle, Op, PoolBacking, Reply, SlabFlags};
use memd_client::{wire, Client, Options};

use super::tally::{Shared, Tally};
use super::Profile;
use crate::rng::Rng;

/// A connection-level failure: the worker stops.
#[derive(Debug)]
pub(super) struct Fatal(String);

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
        let c = &mut self.c;
        match self.tally.timed(kind, || f(c)) {
            Ok(Ok(v)) => Ok(Some(v)),
            Ok(Err(e)) => {
                self.last_error = Some(e.code);
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(Fatal(format!("{kind}: {e}"))),
        }
    }

    /// Creates the client's cache and three pools, retrying injected
    /// failures (ENOMEM). Any other refusal is an error of the run: caches
    /// and pools are limited by memory and the quota (8) alone.
    fn setup(&mut self) -> Result<(), Fatal> {
        for _ in 0..100 {
            if self.cache.is_some() && self.pools.len() == 3 {
                return Ok(());
            }
            if self.cache.is_none() {
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
                    c.cache_create(wire::CacheSpec {
                        name: "lt".into(),
                        size,
                        align: 0,
                        flags,
                        ctor,
                    })
                })?;
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
            if let Some(h) = self.timed("pool-create", |c| c.pool_create(backing, min_nr))? {
                self.pools.push((h, Vec::new()));
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
                    let mut gfp = if self.rng.chance(20) {
                        Gfp::KERNEL | Gfp::ZERO
                    } else {
                        Gfp::KERNEL
                    };
                    // Half of the pages are movable, as user memory is:
                    // hot-plugged memory (ZONE_MOVABLE) may serve them.
                    if self.rng.chance(50) {
                        gfp = gfp | Gfp::MOVABLE;
                    }
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

pub(super) fn worker(
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
