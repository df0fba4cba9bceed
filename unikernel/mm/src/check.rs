//! The invariant checker: every structure agrees with every other.
//!
//! Tests run it after every step; the in-guest self-test runs it on real
//! memory. It walks the frame table once and each list once, so it costs
//! O(frames) and is meant for tests and on-demand checks, not hot paths.

use crate::frame::{FrameState, NIL};
use crate::memblock::PAGE_SIZE;
use crate::mempool::PoolId;
use crate::pcp::PCP_HIGH;
use crate::zone::ZoneType;
use crate::MemoryManager;

/// What was wrong, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckError {
    pub what: &'static str,
    pub pfn: u64,
}

impl core::fmt::Display for CheckError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (frame {:#x})", self.what, self.pfn)
    }
}

fn fail<T>(what: &'static str, pfn: u64) -> Result<T, CheckError> {
    Err(CheckError { what, pfn })
}

struct Tally {
    managed: [u64; 3],
    owner_pages: [u64; crate::MAX_OWNERS],
    slab: u64,
    large: u64,
    pool: u64,
    vmalloc: u64,
    /// vmalloc pages that begin an area.
    vmalloc_heads: u64,
}

impl MemoryManager {
    /// Checks every invariant; returns the first violation.
    pub fn check(&self) -> Result<(), CheckError> {
        self.check_free_lists()?;
        let tally = self.check_frames()?;
        let areas = self
            .check_vmalloc()
            .map_err(|what| CheckError { what, pfn: 0 })?;
        if areas != tally.vmalloc_heads {
            return fail(
                "vmalloc areas differ from the first pages in the frame table",
                0,
            );
        }
        self.check_caches()?;
        self.check_pools()?;
        if let Some(cma) = &self.cma {
            cma.check().map_err(|what| CheckError {
                what,
                pfn: cma.base / PAGE_SIZE,
            })?;
        }
        Ok(())
    }

    /// Buddy lists: linked both ways, heads of the right order and zone,
    /// aligned, counts matching; pcp lists hold only pcp frames.
    fn check_free_lists(&self) -> Result<(), CheckError> {
        for zone in &self.zones {
            let mut free = 0;
            for order in 0..self.max_order {
                let list = &zone.free_area[order as usize].list;
                let mut prev = NIL;
                let mut n = 0;
                for pfn in list.iter(self.frames) {
                    let f = &self.frames[pfn as usize];
                    if !f.is(FrameState::Buddy) || f.order as u32 != order {
                        return fail(
                            "free list holds a frame that is not a free head of its order",
                            pfn as u64,
                        );
                    }
                    if f.zone() != zone.ty || ZoneType::of_pfn(pfn as u64) != zone.ty {
                        return fail("free block in the wrong zone", pfn as u64);
                    }
                    if pfn & ((1 << order) - 1) != 0 {
                        return fail("free block not aligned to its order", pfn as u64);
                    }
                    if f.prev != prev {
                        return fail("free list back link broken", pfn as u64);
                    }
                    prev = pfn;
                    n += 1;
                }
                if n != list.len {
                    return fail("free list length differs from its count", zone.start_pfn);
                }
                free += (n as u64) << order;
            }
            if free != zone.free {
                return fail(
                    "zone free count differs from its free lists",
                    zone.start_pfn,
                );
            }
            if zone.pcp.count > PCP_HIGH {
                return fail("pcp list over its high mark", zone.start_pfn);
            }
            for &pfn in zone.pcp.as_slice() {
                let f = &self.frames[pfn as usize];
                if !f.is(FrameState::Pcp) || f.zone() != zone.ty {
                    return fail(
                        "pcp list holds a frame that is not a pcp frame of this zone",
                        pfn as u64,
                    );
                }
            }
        }
        Ok(())
    }

    /// One pass over each zone's span of the frame table: blocks do not
    /// overlap, every managed frame is accounted for exactly once, counters
    /// add up. Holes between zones (q35's PCI hole, sparse test layouts)
    /// hold no blocks and are skipped.
    fn check_frames(&self) -> Result<Tally, CheckError> {
        let mut tally = Tally {
            managed: [0; 3],
            owner_pages: [0; crate::MAX_OWNERS],
            slab: 0,
            large: 0,
            pool: 0,
            vmalloc: 0,
            vmalloc_heads: 0,
        };
        for zone in self.zones.iter().filter(|z| z.managed > 0) {
            self.check_span(zone.start_pfn as usize, zone.end_pfn as usize, &mut tally)?;
        }
        for zone in &self.zones {
            if tally.managed[zone.ty as usize] != zone.managed {
                return fail(
                    "zone's blocks do not add up to its managed pages",
                    zone.start_pfn,
                );
            }
        }
        if tally.owner_pages != self.owners.pages {
            return fail("per-owner page counts differ from the frame table", 0);
        }
        let c = &self.counters;
        if (tally.slab, tally.large, tally.pool) != (c.slab_pages, c.large_pages, c.pool_pages) {
            return fail(
                "slab/large/pool page counters differ from the frame table",
                0,
            );
        }
        if tally.vmalloc != c.vmalloc_pages {
            return fail("vmalloc page counter differs from the frame table", 0);
        }
        Ok(tally)
    }

    fn check_span(&self, start: usize, end: usize, tally: &mut Tally) -> Result<(), CheckError> {
        let n = end.min(self.frames.len());
        let mut pfn = start;
        while pfn < n {
            let f = &self.frames[pfn];
            let state = f.state();
            let pages = match state {
                FrameState::None | FrameState::Reserved => {
                    pfn += 1;
                    continue;
                }
                FrameState::SlabTail => {
                    return fail("slab tail frame outside any slab", pfn as u64)
                }
                _ => 1usize << f.order,
            };
            if pfn + pages > n {
                return fail("block runs past the end of its zone", pfn as u64);
            }
            for inner in pfn + 1..pfn + pages {
                let t = &self.frames[inner];
                let ok = match state {
                    FrameState::Slab => t.is(FrameState::SlabTail) && t.next as usize == pfn,
                    _ => t.is(FrameState::None),
                };
                if !ok {
                    return fail("blocks overlap", inner as u64);
                }
            }
            if f.zone() != ZoneType::of_pfn(pfn as u64) {
                return fail("frame carries the wrong zone", pfn as u64);
            }
            let pages64 = pages as u64;
            tally.managed[f.zone() as usize] += pages64;
            match state {
                FrameState::Allocated => {
                    tally.owner_pages[f.owner as usize % crate::MAX_OWNERS] += pages64
                }
                FrameState::Slab => tally.slab += pages64,
                FrameState::Large => tally.large += pages64,
                FrameState::Pool => tally.pool += pages64,
                FrameState::Vmalloc if f.order != 0 => {
                    return fail("vmalloc page with a non-zero order", pfn as u64)
                }
                FrameState::Vmalloc => {
                    tally.vmalloc += 1;
                    tally.vmalloc_heads += (f.count == 1) as u64;
                }
                _ => {}
            }
            pfn += pages;
        }
        Ok(())
    }

    /// Slab lists hold slabs of the right fill level; free lists inside each
    /// slab are as long as the slab says; per-CPU arrays hold this cache's
    /// objects.
    fn check_caches(&self) -> Result<(), CheckError> {
        for (id, cache) in self.caches() {
            let mut inuse = 0u64;
            let objs = cache.objs_per_slab as u64;
            for (list, want) in [(&cache.partial, 1u8), (&cache.full, 2), (&cache.empty, 0)] {
                let mut n = 0;
                for head in list.iter(self.frames) {
                    n += 1;
                    let f = &self.frames[head as usize];
                    if !f.is(FrameState::Slab) || f.owner != id.0 || f.order as u32 != cache.order {
                        return fail(
                            "slab list holds a frame that is not this cache's slab",
                            head as u64,
                        );
                    }
                    let count = f.count as u64;
                    let level = if count == 0 {
                        0
                    } else if count == objs {
                        2
                    } else {
                        1
                    };
                    if level != want {
                        return fail("slab on the wrong list for its fill level", head as u64);
                    }
                    let free = cache.for_each_free_object(self.frames, self.dmap, head, |_| {});
                    if free as u64 != objs - count {
                        return fail(
                            "slab free list length differs from its in-use count",
                            head as u64,
                        );
                    }
                    inuse += count;
                }
                if n != list.len {
                    return fail("slab list length differs from its count", 0);
                }
            }
            if inuse != cache.slab_inuse {
                return fail("cache in-use count differs from its slabs", 0);
            }
            for &obj in &cache.ac.entry[..cache.ac.avail] {
                if cache.owning_slab(self.frames, self.dmap, id, obj).is_none() {
                    return fail(
                        "per-CPU array holds a foreign object",
                        self.dmap.phys(obj) / PAGE_SIZE,
                    );
                }
            }
        }
        Ok(())
    }

    fn check_pools(&self) -> Result<(), CheckError> {
        for (id, pool) in self.mempools() {
            if pool.curr_nr > pool.min_nr {
                return fail("mempool reserve above min_nr", id.0 as u64);
            }
            if self.pool_reserve_len(PoolId(id.0)) != pool.curr_nr {
                return fail(
                    "mempool reserve list length differs from curr_nr",
                    id.0 as u64,
                );
            }
        }
        Ok(())
    }
}
