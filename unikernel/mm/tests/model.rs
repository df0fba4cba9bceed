//! Property tests: long random operation sequences against a simple model,
//! with the invariant checker after every step.
//!
//! The model is the set of live allocations as physical ranges. After every
//! step: `check()` passes (and a check in steps, `check_step`, advances
//! without finding anything), no two live allocations overlap, every address
//! obeys its request's zone or DMA mask, and every allocation still holds
//! the tag written into it. At the end everything is freed and free memory
//! must equal the baseline exactly.
//!
//! The machine has a hot-plug region: blocks are plugged and unplugged at
//! random, and unplugging must succeed exactly when no live allocation
//! touches the block.

use memd_mm::*;
use proptest::prelude::*;
use std::ptr::NonNull;

const MIB: u64 = 1 << 20;
/// The hot-plug region: 2 MiB blocks across a section boundary.
const REGION: u64 = (8 << 30) - 32 * MIB;
const BLOCK: u64 = 2 * MIB;
const BLOCKS: usize = 32;

#[derive(Clone, Debug)]
enum Op {
    Pages {
        order: u32,
        zone: u8,
        atomic: bool,
    },
    Kmalloc {
        size: usize,
    },
    CacheAlloc {
        debug: bool,
    },
    Dma {
        len: usize,
        align_log: u32,
        mask: u8,
        movable: bool,
    },
    PoolAlloc,
    Free {
        pick: usize,
    },
    Shrink,
    Reclaim,
    /// Initialise more of a manager booted with deferred initialisation.
    DeferredStep {
        pageblocks: usize,
    },
    /// Free page reporting: take blocks, check, put them back.
    Report {
        blocks: usize,
        reported: bool,
    },
    /// The balloon: take a block, or give one back (popped for the host,
    /// or straight from the list).
    Balloon {
        take: bool,
        pop: bool,
    },
    /// Create a slab cache (and take an object from it), or destroy one.
    Cache {
        create: bool,
        size: usize,
        pick: usize,
    },
    /// Create a mempool (and take an element from it), or destroy one.
    Pool {
        create: bool,
        min_nr: usize,
        pick: usize,
    },
    /// Serve a new owner, or free the one being served.
    Owner {
        fresh: bool,
    },
    /// Plug (online) or unplug (offline) a block of the hot-plug region.
    Hotplug {
        block: usize,
        plug: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..6, 0u8..4, any::<bool>()).prop_map(|(order, zone, atomic)| Op::Pages { order, zone, atomic }),
        4 => prop_oneof![1usize..256, 1usize..9000, 1usize..200_000].prop_map(|size| Op::Kmalloc { size }),
        3 => any::<bool>().prop_map(|debug| Op::CacheAlloc { debug }),
        2 => (1usize..(12 << 20), 12u32..22, 0u8..3, any::<bool>()).prop_map(|(len, align_log, mask, movable)| Op::Dma { len, align_log, mask, movable }),
        1 => Just(Op::PoolAlloc),
        6 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::Shrink),
        1 => Just(Op::Reclaim),
        1 => (1usize..64).prop_map(|pageblocks| Op::DeferredStep { pageblocks }),
        1 => (1usize..16, any::<bool>()).prop_map(|(blocks, reported)| Op::Report { blocks, reported }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(take, pop)| Op::Balloon { take, pop }),
        3 => (any::<bool>(), 1usize..5000, any::<usize>()).prop_map(|(create, size, pick)| Op::Cache { create, size, pick }),
        3 => (any::<bool>(), 1usize..8, any::<usize>()).prop_map(|(create, min_nr, pick)| Op::Pool { create, min_nr, pick }),
        2 => any::<bool>().prop_map(|fresh| Op::Owner { fresh }),
        3 => (0..BLOCKS, any::<bool>()).prop_map(|(block, plug)| Op::Hotplug { block, plug }),
    ]
}

enum Kind {
    Pages(u32),
    Kmalloc,
    Cache(CacheId),
    Dma(DmaBuffer),
    Pool(PoolId, PoolElement),
}

struct Live {
    start: u64,
    len: u64,
    limit: u64,
    tag: u8,
    kind: Kind,
    /// Whom the manager was serving when it was allocated.
    owner: Owner,
    /// Whether the request allowed ZONE_MOVABLE.
    movable: bool,
}

struct Harness {
    mm: HostMm,
    live: Vec<Live>,
    caches: [CacheId; 2],
    pool: PoolId,
    /// Caches and pools the operations made, not yet destroyed.
    made_caches: Vec<CacheId>,
    made_pools: Vec<PoolId>,
    next_tag: u8,
    /// Free blocks taken for a report and not put back yet.
    isolated: Vec<ReportBlock>,
    /// Blocks in the balloon.
    balloon: Vec<u64>,
    /// Hot-plug blocks online.
    plugged: [bool; BLOCKS],
}

/// The model's machine: DMA, DMA32 to 48 MiB, 24 MiB of Normal at 4 GiB,
/// and the hot-plug region.
fn machine(cmdline: &str) -> HostMm {
    HostMm::boot_with_hotplug(
        &[
            (MIB, 16 * MIB),
            (16 * MIB, 48 * MIB),
            (4 << 30, (4 << 30) + 24 * MIB),
        ],
        Some((REGION, BLOCKS as u64 * BLOCK)),
        cmdline,
    )
    .unwrap()
}

impl Harness {
    /// With `deferred`, only the first `BOOT_INIT_BYTES` are initialised at
    /// boot: here all of DMA32 (48 MiB), none of Normal (at 4 GiB) and the
    /// hole between them.
    fn new(deferred: bool) -> Harness {
        let cmdline = if deferred {
            "memd.dma_reserve=16M@dma32 memd.deferred_init=on"
        } else {
            "memd.dma_reserve=16M@dma32"
        };
        let mut mm = machine(cmdline);
        let plain = mm
            .cache_create("model-plain", 72, 8, SlabFlags::NONE, None)
            .unwrap();
        let debug = mm
            .cache_create(
                "model-debug",
                40,
                8,
                SlabFlags::POISON | SlabFlags::RED_ZONE,
                None,
            )
            .unwrap();
        let pool = mm.mempool_create(PoolBacking::Pages(1), 3).unwrap();
        Harness {
            mm,
            live: Vec::new(),
            caches: [plain, debug],
            pool,
            made_caches: Vec::new(),
            made_pools: Vec::new(),
            next_tag: 1,
            isolated: Vec::new(),
            balloon: Vec::new(),
            plugged: [false; BLOCKS],
        }
    }

    fn virt(&self, phys: u64) -> *mut u8 {
        self.mm.direct_map().virt(phys) as *mut u8
    }

    fn add(&mut self, start: u64, len: u64, limit: u64, kind: Kind) {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        // SAFETY: the range was just handed out to us by the manager.
        unsafe {
            *self.virt(start) = tag;
            *self.virt(start + len - 1) = tag;
        }
        let owner = self.mm.owner();
        self.live.push(Live {
            start,
            len,
            limit,
            tag,
            kind,
            owner,
            movable: false,
        });
    }

    fn phys(&self, p: NonNull<u8>) -> u64 {
        self.mm.direct_map().phys(p.as_ptr() as usize)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Pages {
                order,
                zone,
                atomic,
            } => {
                let (gfp, limit) = match zone {
                    0 => (Gfp::NOWAIT, u64::MAX),
                    1 => (Gfp::DMA32, 4 << 30),
                    2 => (Gfp::DMA, 16 * MIB),
                    _ => (Gfp::MOVABLE, u64::MAX),
                };
                let gfp = gfp | if atomic { Gfp::ATOMIC } else { Gfp::KERNEL };
                if let Ok(p) = self.mm.alloc_pages(order, gfp) {
                    self.add(p, PAGE_SIZE << order, limit, Kind::Pages(order));
                    self.live.last_mut().unwrap().movable = gfp.contains(Gfp::MOVABLE);
                }
            }
            Op::Kmalloc { size } => {
                if let Ok(p) = self.mm.kmalloc(size, Gfp::KERNEL) {
                    assert!(self.mm.ksize(p).unwrap() >= size);
                    let phys = self.phys(p);
                    self.add(phys, size as u64, u64::MAX, Kind::Kmalloc);
                }
            }
            Op::CacheAlloc { debug } => {
                let id = self.caches[debug as usize];
                if let Ok(p) = self.mm.cache_alloc(id, Gfp::KERNEL) {
                    let phys = self.phys(p);
                    let len = self.mm.cache(id).unwrap().object_size as u64;
                    self.add(phys, len, u64::MAX, Kind::Cache(id));
                }
            }
            Op::Dma {
                len,
                align_log,
                mask,
                movable,
            } => {
                let mask = [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64][mask as usize];
                if let Ok(b) = self.mm.dma_alloc_zeroed(len, 1 << align_log, mask, movable) {
                    assert_eq!(b.phys % (1 << align_log), 0, "DMA alignment");
                    assert!(self
                        .mm
                        .dma_bytes(&b)
                        .unwrap()
                        .iter()
                        .step_by(4096)
                        .all(|&x| x == 0));
                    self.add(b.phys, len as u64, mask.limit(), Kind::Dma(b));
                    self.live.last_mut().unwrap().movable = movable;
                }
            }
            Op::PoolAlloc => {
                if let Ok(e) = self.mm.mempool_alloc(self.pool, Gfp::ATOMIC) {
                    self.add(e.phys, 2 * PAGE_SIZE, u64::MAX, Kind::Pool(self.pool, e));
                }
            }
            Op::Free { pick } => {
                if self.live.is_empty() {
                    return;
                }
                let l = self.live.swap_remove(pick % self.live.len());
                self.release(l);
            }
            Op::Shrink => {
                for id in self.caches {
                    self.mm.cache_shrink(id).unwrap();
                }
            }
            Op::Reclaim => {
                self.mm.reclaim();
            }
            Op::DeferredStep { pageblocks } => {
                self.mm.deferred_init_step(pageblocks);
            }
            Op::Balloon { take: true, .. } => {
                if let Some(p) = self.mm.balloon_take() {
                    self.mm.balloon_keep(p);
                    self.balloon.push(p);
                }
            }
            Op::Balloon { take: false, pop } => {
                let p = if pop {
                    self.mm.balloon_pop()
                } else {
                    self.balloon.last().copied()
                };
                if let Some(p) = p {
                    self.balloon.retain(|&b| b != p);
                    self.mm.balloon_give(p).unwrap();
                }
            }
            Op::Cache {
                create: true, size, ..
            } => {
                let id = match self
                    .mm
                    .cache_create("model-made", size, 8, SlabFlags::NONE, None)
                {
                    Ok(id) => id,
                    Err(e) => return assert_eq!(e, MmError::NoMemory),
                };
                assert!(
                    !self.made_caches.contains(&id) && !self.caches.contains(&id),
                    "id {id:?} of a live cache handed out again"
                );
                self.made_caches.push(id);
                if let Ok(p) = self.mm.cache_alloc(id, Gfp::KERNEL) {
                    let phys = self.phys(p);
                    self.add(phys, size as u64, u64::MAX, Kind::Cache(id));
                }
            }
            Op::Cache {
                create: false,
                pick,
                ..
            } => {
                if self.made_caches.is_empty() {
                    return;
                }
                let id = self.made_caches[pick % self.made_caches.len()];
                let live = self
                    .live
                    .iter()
                    .filter(|l| matches!(l.kind, Kind::Cache(c) if c == id))
                    .count() as u64;
                match self.mm.cache_destroy(id) {
                    Ok(()) => {
                        assert_eq!(live, 0, "a cache with live objects destroyed");
                        assert!(self.mm.cache(id).is_none());
                        self.made_caches.retain(|&c| c != id);
                    }
                    Err(e) => assert_eq!(e, MmError::Busy { live }),
                }
            }
            Op::Pool {
                create: true,
                min_nr,
                ..
            } => {
                let Ok(id) = self.mm.mempool_create(PoolBacking::Kmalloc(200), min_nr) else {
                    return;
                };
                assert!(
                    !self.made_pools.contains(&id) && id != self.pool,
                    "id {id:?} of a live pool handed out again"
                );
                self.made_pools.push(id);
                if let Ok(e) = self.mm.mempool_alloc(id, Gfp::KERNEL) {
                    self.add(e.phys, 200, u64::MAX, Kind::Pool(id, e));
                }
            }
            Op::Pool {
                create: false,
                pick,
                ..
            } => {
                if self.made_pools.is_empty() {
                    return;
                }
                let id = self.made_pools[pick % self.made_pools.len()];
                let live = self
                    .live
                    .iter()
                    .filter(|l| matches!(l.kind, Kind::Pool(p, _) if p == id))
                    .count() as u64;
                match self.mm.mempool_destroy(id) {
                    Ok(()) => {
                        assert_eq!(live, 0, "a pool with elements out destroyed");
                        assert!(self.mm.mempool(id).is_none());
                        self.made_pools.retain(|&p| p != id);
                    }
                    Err(e) => assert_eq!(e, MmError::Busy { live }),
                }
            }
            Op::Hotplug { block, plug } => self.hotplug(block, plug),
            Op::Owner { fresh: true } => {
                let o = self.mm.owner_alloc().unwrap();
                assert!(
                    !self
                        .live
                        .iter()
                        .any(|l| l.owner == o && matches!(l.kind, Kind::Pages(_))),
                    "owner id {} handed out while its pages are live",
                    o.0
                );
                self.mm.set_owner(o).unwrap();
            }
            Op::Owner { fresh: false } => {
                let o = self.mm.owner();
                if o != Owner::KERNEL {
                    self.mm.owner_free(o).unwrap();
                    assert_eq!(self.mm.owner(), Owner::KERNEL);
                }
            }
            // Blocks stay isolated across the operations that follow, as
            // they do while the host works on a report.
            Op::Report { blocks, reported } => {
                if self.isolated.is_empty() {
                    let mut taken = [ReportBlock::default(); 16];
                    let n = self.mm.report_take(&mut taken[..blocks]);
                    self.isolated.extend_from_slice(&taken[..n]);
                } else {
                    self.mm.report_put(&self.isolated, reported);
                    self.isolated.clear();
                }
            }
        }
    }

    fn release(&mut self, l: Live) {
        // SAFETY: still live, so still ours.
        unsafe {
            assert_eq!(
                *self.virt(l.start),
                l.tag,
                "allocation at {:#x} was overwritten",
                l.start
            );
            assert_eq!(
                *self.virt(l.start + l.len - 1),
                l.tag,
                "allocation at {:#x} was overwritten",
                l.start
            );
        }
        let ptr = NonNull::new(self.virt(l.start)).unwrap();
        match l.kind {
            Kind::Pages(order) => self.mm.free_pages(l.start, order).unwrap(),
            Kind::Kmalloc => self.mm.kfree(ptr).unwrap(),
            Kind::Cache(id) => self.mm.cache_free(id, ptr).unwrap(),
            Kind::Dma(b) => self.mm.dma_free(&b).unwrap(),
            Kind::Pool(id, e) => self.mm.mempool_free(id, e).unwrap(),
        }
    }

    fn hotplug(&mut self, block: usize, plug: bool) {
        let start = REGION + block as u64 * BLOCK;
        if plug {
            let r = self.mm.online_pages(start, BLOCK);
            assert_eq!(r.is_ok(), !self.plugged[block], "online {start:#x}: {r:?}");
            self.plugged[block] = true;
            return;
        }
        // Live allocations, and free blocks the host is being told about,
        // keep a block in.
        let used = self
            .live
            .iter()
            .map(|l| (l.start, l.len))
            .chain(self.isolated.iter().map(|b| (b.phys, b.bytes())))
            .any(|(s, len)| s < start + BLOCK && start < s + len);
        let r = self.mm.offline_pages(start, BLOCK);
        match (self.plugged[block], used) {
            (false, _) => assert!(matches!(r, Err(MmError::Invalid(_))), "{r:?}"),
            (true, true) => assert!(matches!(r, Err(MmError::Busy { .. })), "{r:?}"),
            (true, false) => {
                assert_eq!(r, Ok(()), "offline free block {start:#x}");
                self.plugged[block] = false;
            }
        }
    }

    /// Every allocation outside the hot-plug region unless it asked for
    /// MOVABLE memory.
    fn movable_only_where_asked(&self, l: &Live) -> bool {
        let in_region = l.start < REGION + BLOCKS as u64 * BLOCK && REGION < l.start + l.len;
        !in_region || l.movable
    }

    fn verify(&self) {
        if let Err(e) = self.mm.check() {
            panic!("invariant broken: {e}");
        }
        let mut ranges: Vec<(u64, u64)> = self
            .live
            .iter()
            .map(|l| (l.start, l.start + l.len))
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "live allocations overlap: {:x?} {:x?}",
                w[0],
                w[1]
            );
        }
        for l in &self.live {
            assert!(
                self.movable_only_where_asked(l),
                "{:#x} in ZONE_MOVABLE without asking for it",
                l.start
            );
            if matches!(l.kind, Kind::Pages(_)) {
                assert_eq!(
                    self.mm.frame(l.start).unwrap().owner,
                    l.owner.0,
                    "block at {:#x} stamped with another owner",
                    l.start
                );
            }
            assert!(
                l.start + l.len <= l.limit,
                "{:#x}+{:#x} beyond its limit {:#x}",
                l.start,
                l.len,
                l.limit
            );
        }
    }

    fn free_everything(&mut self) {
        self.mm.report_put(&self.isolated, false);
        self.isolated.clear();
        for p in std::mem::take(&mut self.balloon) {
            self.mm.balloon_give(p).unwrap();
        }
        while let Some(l) = self.live.pop() {
            self.release(l);
        }
        for id in self
            .caches
            .into_iter()
            .chain(std::mem::take(&mut self.made_caches))
        {
            self.mm.cache_destroy(id).unwrap();
        }
        for id in std::mem::take(&mut self.made_pools)
            .into_iter()
            .chain([self.pool])
        {
            self.mm.mempool_destroy(id).unwrap();
        }
        let o = self.mm.owner();
        if o != Owner::KERNEL {
            self.mm.owner_free(o).unwrap();
        }
        self.mm.reclaim();
        self.mm.drain_all_pages();
        for b in 0..BLOCKS {
            if self.plugged[b] {
                self.hotplug(b, false);
            }
        }
        let r = self.mm.hotplug_region().unwrap();
        assert_eq!((r.plugged, r.sections, r.memmap_bytes), (0, 0, 0));
        self.verify();
    }
}

fn baseline() -> u64 {
    let mut h = machine("memd.dma_reserve=16M@dma32");
    h.reclaim();
    h.meminfo().free
}

proptest! {
    // 64 cases unless PROPTEST_CASES says otherwise (`cargo xtask fuzz`).
    #![proptest_config(ProptestConfig::with_cases(match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => 64,
    }))]

    #[test]
    fn random_operations_keep_every_invariant(ops in prop::collection::vec(op(), 1..400), deferred in any::<bool>()) {
        let mut h = Harness::new(deferred);
        h.verify();
        // A check in steps runs alongside, a few pageblocks per operation,
        // while memory changes under it.
        let mut walk = CheckWalk::new();
        for op in &ops {
            h.apply(op);
            h.verify();
            match h.mm.check_step(&mut walk, 128) {
                Ok(true) => walk = CheckWalk::new(),
                Ok(false) => {}
                Err(e) => panic!("invariant broken, found by a check in steps: {e}"),
            }
        }
        // Deferred memory arrives whole, whenever it is initialised.
        while !h.mm.deferred_init_step(1024) {}
        prop_assert_eq!(h.mm.deferred_pages(), 0);
        h.free_everything();
        prop_assert_eq!(h.mm.meminfo().free, baseline(), "free memory returns to its baseline");
        prop_assert_eq!(h.mm.owners().count(), 0);
    }

    #[test]
    fn buddy_state_is_independent_of_free_order(orders in prop::collection::vec(0u32..8, 1..200), seed in any::<u64>()) {
        let mut mm = HostMm::three_zones(48 * MIB, 0, "").unwrap();
        mm.drain_all_pages();
        let before = mm.buddyinfo();
        let mut got: Vec<(u64, u32)> = orders.iter().filter_map(|&o| mm.alloc_pages(o, Gfp::KERNEL).ok().map(|p| (p, o))).collect();
        // Shuffle deterministically from the seed.
        let mut rng = memd_mm::Prandom::new(seed);
        for i in (1..got.len()).rev() {
            got.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for (p, o) in got {
            mm.free_pages(p, o).unwrap();
            mm.check().unwrap();
        }
        mm.drain_all_pages();
        prop_assert_eq!(mm.buddyinfo(), before, "everything coalesces back");
    }
}
