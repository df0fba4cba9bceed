//! The invariant checker: every structure agrees with every other.
//!
//! Tests run it after every step; the in-guest self-test runs it on real
//! memory. [`MemoryManager::check`] walks the frame table once and each
//! list once, in one piece: O(frames), for tests. [`CheckWalk`] does most
//! of it a few pageblocks at a time, for the service, whose loop must not
//! stop that long.

use crate::frame::{FrameState, NIL};
use crate::memblock::PAGE_SIZE;
use crate::mempool::PoolId;
use crate::pageblock::{Counts, Held, HELD_KINDS};
use crate::pcp::PCP_HIGH;
use crate::zone::{ZoneType, NR_ZONES};
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

/// Owners tallied per pass of [`MemoryManager::check_owner_charges`].
const OWNER_CHUNK: usize = 512;

fn fail<T>(what: &'static str, pfn: u64) -> Result<T, CheckError> {
    Err(CheckError { what, pfn })
}

/// What a walk of the frame table found.
#[derive(Default)]
struct Tally {
    managed: [u64; NR_ZONES],
    /// vmalloc pages that begin an area.
    vmalloc_heads: u64,
}

/// A check of memd-mm done a few pageblocks at a time, for a caller that
/// must not stop for a whole walk of the frame table (the service's loop):
/// start it with [`CheckWalk::new`], call
/// [`MemoryManager::check_step`] until it answers `Ok(true)`. Memory may
/// change between steps.
///
/// Each pageblock is held against its own counts at the moment it is
/// walked (see `pageblock.rs`), and free and slab blocks against their
/// neighbours in their lists; the last step holds the counts' sums against
/// the global counters and checks the structures that are small (pcp
/// lists, per-CPU arrays, mempools, the CMA region, vmalloc's areas). What
/// only holds for one instant of the whole table is left to
/// [`MemoryManager::check`]: each owner's charge against its frames, each
/// cache's in-use count against its slabs, and the slab lists' fill
/// levels.
#[derive(Clone, Debug, Default)]
pub struct CheckWalk {
    next: usize,
}

impl CheckWalk {
    /// What a walk in steps does not hold (only [`MemoryManager::check`],
    /// in one piece, does).
    pub const LEFT_OUT: [&'static str; 3] = [
        "each owner's charge against its own frames",
        "each cache's in-use count against its slabs",
        "the slab lists' fill levels",
    ];

    /// A walk from the first pageblock.
    pub const fn new() -> Self {
        CheckWalk { next: 0 }
    }

    /// Pageblocks walked so far.
    pub fn walked(&self) -> usize {
        self.next
    }
}

impl MemoryManager {
    /// Checks every invariant, in one piece; returns the first violation.
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
        self.check_small()
    }

    /// Checks the next `pageblocks` pageblocks of `walk` (each
    /// `2^(max_order - 1)` frames); after the last, the sums and the small
    /// structures. `Ok(true)` when the walk is over and everything agreed.
    pub fn check_step(&self, walk: &mut CheckWalk, pageblocks: usize) -> Result<bool, CheckError> {
        let all = self.pageblocks.positions();
        let end = walk.next.saturating_add(pageblocks).min(all);
        while walk.next < end {
            if let Some(i) = self.pageblocks.at_position(walk.next) {
                self.check_pageblock(i, &mut Tally::default(), true)?;
            }
            walk.next += 1;
        }
        if walk.next < all {
            return Ok(false);
        }
        // Pageblocks initialised behind the walk were not walked: the
        // managed frames are held per pageblock, and summed in `check_sums`.
        self.check_sums()?;
        self.check_vmalloc()
            .map_err(|what| CheckError { what, pfn: 0 })?;
        self.check_small()?;
        Ok(true)
    }

    /// The small structures both checks hold whole: pcp lists, per-CPU
    /// arrays, mempools and the CMA region.
    fn check_small(&self) -> Result<(), CheckError> {
        self.check_pcp()?;
        self.check_balloon()?;
        self.check_array_caches()?;
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
    /// aligned, counts matching.
    fn check_free_lists(&self) -> Result<(), CheckError> {
        for zone in &self.zones {
            let (mut free, mut reported) = (0, 0);
            for order in 0..self.max_order {
                let list = &zone.free_area[order as usize].list;
                let mut prev = NIL;
                let mut n = 0;
                for pfn in list.iter(&self.frames) {
                    let f = &self.frames[pfn as usize];
                    if !f.is(FrameState::Buddy) || f.order as u32 != order {
                        return fail(
                            "free list holds a frame that is not a free head of its order",
                            pfn as u64,
                        );
                    }
                    if f.zone() != zone.ty || self.pfn_zone(pfn as u64) != zone.ty {
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
                    if f.reported() {
                        reported += 1u64 << order;
                    }
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
            if reported != zone.reported {
                return fail(
                    "zone reported count differs from its reported free blocks",
                    zone.start_pfn,
                );
            }
        }
        Ok(())
    }

    /// The balloon's list holds allocated blocks of the balloon's owner,
    /// no more than its page count (blocks on their way back are off the
    /// list but still counted).
    fn check_balloon(&self) -> Result<(), CheckError> {
        let (mut pages, mut listed) = (0, 0);
        for pfn in self.balloon.iter(&self.frames) {
            listed += 1;
            let f = &self.frames[pfn as usize];
            if !f.is(FrameState::Allocated) || f.owner != crate::Owner::BALLOON.0 || f.aux != 1 {
                return fail(
                    "balloon list holds a block that is not the balloon's",
                    pfn as u64,
                );
            }
            pages += 1u64 << f.order;
        }
        if listed != self.balloon.len {
            return fail("balloon list length differs from its count", 0);
        }
        if pages > self.counters.balloon_pages {
            return fail("balloon list holds more than the balloon's page count", 0);
        }
        if self.owner_pages(crate::Owner::BALLOON) != self.counters.balloon_pages {
            return fail("the balloon's owner charge differs from its page count", 0);
        }
        if self.zones.iter().map(|z| z.balloon).sum::<u64>() != self.counters.balloon_pages {
            return fail(
                "the zones' balloon pages differ from the balloon's count",
                0,
            );
        }
        Ok(())
    }

    /// pcp lists hold only pcp frames of their zone, no more than the high
    /// mark.
    fn check_pcp(&self) -> Result<(), CheckError> {
        for zone in &self.zones {
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

    /// One pass over the frame table, a pageblock at a time: blocks do not
    /// overlap, every managed frame is accounted for exactly once, counters
    /// add up.
    fn check_frames(&self) -> Result<Tally, CheckError> {
        let mut tally = Tally::default();
        for p in 0..self.pageblocks.positions() {
            if let Some(i) = self.pageblocks.at_position(p) {
                self.check_pageblock(i, &mut tally, false)?;
            }
        }
        self.check_managed(&tally.managed)?;
        self.check_owner_charges()?;
        self.check_sums()?;
        Ok(tally)
    }

    /// Each owner's charge against the allocated blocks stamped with its
    /// id, [`OWNER_CHUNK`] owners per pass over the table (the tally lives
    /// on the stack; a check must not allocate from what it checks).
    fn check_owner_charges(&self) -> Result<(), CheckError> {
        let slots = &self.owners.slots;
        for base in (0..slots.len()).step_by(OWNER_CHUNK) {
            let mut tally = [0u64; OWNER_CHUNK];
            for (pfn, f) in self.frames.iter() {
                if !f.is(FrameState::Allocated) {
                    continue;
                }
                let owner = f.owner as usize;
                if owner >= slots.len() {
                    return fail(
                        "allocated block stamped with an owner id never handed out",
                        pfn as u64,
                    );
                }
                if let Some(t) = owner.checked_sub(base).and_then(|i| tally.get_mut(i)) {
                    *t += 1 << f.order;
                }
            }
            let end = (base + OWNER_CHUNK).min(slots.len());
            for (i, s) in slots[base..end].iter().enumerate() {
                if s.pages != tally[i] {
                    return fail("per-owner page counts differ from the frame table", 0);
                }
            }
        }
        Ok(())
    }

    fn check_managed(&self, managed: &[u64; NR_ZONES]) -> Result<(), CheckError> {
        for zone in &self.zones {
            if managed[zone.ty as usize] != zone.managed {
                return fail(
                    "zone's blocks do not add up to its managed pages",
                    zone.start_pfn,
                );
            }
        }
        Ok(())
    }

    /// The pageblocks' counts against the global counters, and the pages
    /// nobody counts per pageblock (allocated and pcp) against the owners'
    /// charges: both hold at every instant, so the walk can check them at
    /// its end.
    fn check_sums(&self) -> Result<(), CheckError> {
        let ([free, slab, large, pool, vmalloc, isolated], block_managed) =
            self.pageblocks.totals();
        let c = &self.counters;
        let zone_free: u64 = self.zones.iter().map(|z| z.free).sum();
        if free != zone_free {
            return fail("pageblock free counts differ from the zones' free", 0);
        }
        let zone_isolated: u64 = self.zones.iter().map(|z| z.isolated).sum();
        if isolated != zone_isolated {
            return fail("pageblock isolated counts differ from the zones'", 0);
        }
        for zone in &self.zones {
            let listed: u64 = (0..self.max_order)
                .map(|o| (zone.free_area[o as usize].list.len as u64) << o)
                .sum();
            if listed != zone.free {
                return fail(
                    "zone free count differs from its free lists",
                    zone.start_pfn,
                );
            }
        }
        if (slab, large, pool) != (self.slab_pages(), c.large_pages, c.pool_pages) {
            return fail(
                "slab/large/pool page counters differ from the frame table",
                0,
            );
        }
        if vmalloc != c.vmalloc_pages {
            return fail("vmalloc page counter differs from the frame table", 0);
        }
        let slabs: u64 = self
            .caches()
            .map(|(_, k)| ((k.partial.len + k.full.len + k.empty.len) as u64) << k.order)
            .sum();
        if slabs != self.slab_pages() {
            return fail(
                "the caches' slab lists differ from the slab page counter",
                0,
            );
        }
        let managed: u64 = self.zones.iter().map(|z| z.managed).sum();
        if block_managed != managed {
            return fail("pageblocks' managed frames differ from the zones'", 0);
        }
        let pcp: u64 = self.zones.iter().map(|z| z.pcp.count as u64).sum();
        let charged: u64 = self.owners.charged();
        if charged + pcp + free + isolated + slab + large + pool + vmalloc != managed {
            return fail(
                "owners' charges and pcp frames differ from the frames not otherwise held",
                0,
            );
        }
        Ok(())
    }

    /// Pageblock `i`: its blocks do not overlap, carry their zone, and add
    /// up to its counts. With `linked`, each free block's and slab's own
    /// links are checked too (a walk in steps cannot walk whole lists).
    fn check_pageblock(&self, i: usize, tally: &mut Tally, linked: bool) -> Result<(), CheckError> {
        let (start, end) = self.pageblocks.span(i);
        let mut found = Counts::default();
        let before: u64 = tally.managed.iter().sum();
        for zone in self.zones.iter().filter(|z| z.managed > 0) {
            let from = start.max(zone.start_pfn as usize);
            let to = end.min(zone.end_pfn as usize);
            if from < to {
                self.check_span(from, to, tally, &mut found.held, linked)?;
            }
        }
        found.managed = (tally.managed.iter().sum::<u64>() - before) as u32;
        if Some(&found) != self.pageblocks.get(i) {
            return fail("pageblock counts differ from its frames", start as u64);
        }
        Ok(())
    }

    fn check_span(
        &self,
        start: usize,
        end: usize,
        tally: &mut Tally,
        held: &mut [u32; HELD_KINDS],
        linked: bool,
    ) -> Result<(), CheckError> {
        let n = end.min(self.frames.run_end(start));
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
            if f.zone() != self.pfn_zone(pfn as u64) {
                return fail("frame carries the wrong zone", pfn as u64);
            }
            if f.zone() == ZoneType::Movable
                && !matches!(
                    state,
                    FrameState::Buddy
                        | FrameState::Pcp
                        | FrameState::Allocated
                        | FrameState::Isolated
                )
            {
                return fail("memd-mm's own memory in ZONE_MOVABLE", pfn as u64);
            }
            if f.reported() && state != FrameState::Buddy {
                return fail("a block that is not free is marked reported", pfn as u64);
            }
            tally.managed[f.zone() as usize] += pages as u64;
            let kind = match state {
                FrameState::Allocated => None,
                FrameState::Buddy => Some(Held::Free),
                FrameState::Isolated => Some(Held::Isolated),
                FrameState::Slab => Some(Held::Slab),
                FrameState::Large => Some(Held::Large),
                FrameState::Pool => Some(Held::Pool),
                FrameState::Vmalloc if f.order != 0 => {
                    return fail("vmalloc page with a non-zero order", pfn as u64)
                }
                FrameState::Vmalloc => {
                    tally.vmalloc_heads += (f.count == 1) as u64;
                    Some(Held::Vmalloc)
                }
                _ => None,
            };
            if let Some(kind) = kind {
                held[kind as usize] += pages as u32;
            }
            if linked {
                match state {
                    FrameState::Buddy => self.check_buddy_links(pfn as u32)?,
                    FrameState::Slab => self.check_slab(pfn as u32)?,
                    _ => {}
                }
            }
            pfn += pages;
        }
        Ok(())
    }

    /// A free block is aligned to its order, and its list neighbours are
    /// free blocks of the same order and zone that link back to it; the
    /// first of a list is its list's head.
    fn check_buddy_links(&self, pfn: u32) -> Result<(), CheckError> {
        let f = &self.frames[pfn as usize];
        let order = f.order as u32;
        if order >= self.max_order || pfn & ((1 << order) - 1) != 0 {
            return fail("free block not aligned to its order", pfn as u64);
        }
        let same = |other: u32| {
            self.frames.get(other as usize).is_some_and(|o| {
                o.is(FrameState::Buddy) && o.order == f.order && o.zone() == f.zone()
            })
        };
        if f.next != NIL && !(same(f.next) && self.frames[f.next as usize].prev == pfn) {
            return fail("free list forward link broken", pfn as u64);
        }
        let head = self.zones[f.zone() as usize].free_area[order as usize]
            .list
            .head;
        let linked_back = if f.prev == NIL {
            head == pfn
        } else {
            same(f.prev) && self.frames[f.prev as usize].next == pfn
        };
        if !linked_back {
            return fail("free list back link broken", pfn as u64);
        }
        Ok(())
    }

    /// A slab belongs to a cache of its order, and its free list is as long
    /// as its in-use count leaves room for.
    fn check_slab(&self, head: u32) -> Result<(), CheckError> {
        let f = &self.frames[head as usize];
        let Some(cache) = self.caches.get(f.owner as usize) else {
            return fail("slab of a cache that does not exist", head as u64);
        };
        if cache.order != f.order as u32 || f.count as u32 > cache.objs_per_slab {
            return fail("slab does not fit its cache", head as u64);
        }
        let free = cache.for_each_free_object(&self.frames, self.dmap, head, |_| {});
        if free as u64 != (cache.objs_per_slab - f.count as u32) as u64 {
            return fail(
                "slab free list length differs from its in-use count",
                head as u64,
            );
        }
        Ok(())
    }

    /// Slab lists hold slabs of the right fill level; free lists inside each
    /// slab are as long as the slab says.
    fn check_caches(&self) -> Result<(), CheckError> {
        for (id, cache) in self.caches() {
            let mut inuse = 0u64;
            let objs = cache.objs_per_slab as u64;
            for (list, want) in [(&cache.partial, 1u8), (&cache.full, 2), (&cache.empty, 0)] {
                let mut n = 0;
                for head in list.iter(&self.frames) {
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
                    let free = cache.for_each_free_object(&self.frames, self.dmap, head, |_| {});
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
        }
        Ok(())
    }

    /// Per-CPU arrays hold their own cache's objects.
    fn check_array_caches(&self) -> Result<(), CheckError> {
        for (id, cache) in self.caches() {
            for &obj in &cache.ac.entry[..cache.ac.avail] {
                if cache
                    .owning_slab(&self.frames, self.dmap, id, obj)
                    .is_none()
                {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostMm;
    use crate::Gfp;

    fn walk_to_end(mm: &MemoryManager) -> Result<usize, CheckError> {
        let mut walk = CheckWalk::new();
        let mut steps = 0;
        while !mm.check_step(&mut walk, 1)? {
            steps += 1;
        }
        Ok(steps + 1)
    }

    fn boot() -> HostMm {
        HostMm::three_zones(48 << 20, 16 << 20, "memd.dma_reserve=8M@dma32").unwrap()
    }

    #[test]
    fn a_walk_in_steps_holds_while_memory_changes() {
        let mut host = boot();
        let mm: &mut MemoryManager = &mut host;
        let mut walk = CheckWalk::new();
        let mut live = std::vec::Vec::new();
        let mut rng = crate::Prandom::new(7);
        let mut walks = 0;
        for i in 0..2000u64 {
            match rng.below(3) {
                0 => live.extend(
                    mm.alloc_pages(rng.below(6) as u32, Gfp::KERNEL)
                        .ok()
                        .map(|p| (p, None)),
                ),
                1 => {
                    let size = 8 + rng.below(20_000) as usize;
                    live.extend(mm.kmalloc(size, Gfp::KERNEL).ok().map(|p| (0, Some(p))));
                }
                _ if !live.is_empty() => {
                    let (phys, ptr) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    match ptr {
                        Some(p) => mm.kfree(p).unwrap(),
                        None => {
                            let order = mm.frame(phys).unwrap().order as u32;
                            mm.free_pages(phys, order).unwrap();
                        }
                    }
                }
                _ => {}
            }
            if i % 3 == 0 && mm.check_step(&mut walk, 64).unwrap() {
                walks += 1;
                walk = CheckWalk::new();
            }
        }
        assert!(walks > 10, "only {walks} walks ended");
        mm.check().unwrap();
        assert_eq!(walk_to_end(mm).unwrap(), mm.pageblocks.counts.len());
    }

    #[test]
    fn a_walk_in_steps_finds_what_the_whole_check_finds() {
        // A pageblock's count off by one.
        let mut host = boot();
        let mm: &mut MemoryManager = &mut host;
        mm.pageblocks.counts[3].held[Held::Slab as usize] += 1;
        assert_eq!(
            mm.check().unwrap_err().what,
            "pageblock counts differ from its frames"
        );
        assert_eq!(
            walk_to_end(mm).unwrap_err().what,
            "pageblock counts differ from its frames"
        );

        // A free block whose list neighbour does not link back.
        let mut host = boot();
        let mm: &mut MemoryManager = &mut host;
        let pages: std::vec::Vec<u64> = (0..64)
            .map(|_| mm.alloc_pages(0, Gfp::KERNEL).unwrap() / PAGE_SIZE)
            .collect();
        // Free the even frames whose odd buddy stays allocated: order-0
        // blocks that cannot merge.
        for &pfn in pages
            .iter()
            .filter(|&&p| p % 2 == 0 && pages.contains(&(p + 1)))
        {
            mm.free_pages(pfn * PAGE_SIZE, 0).unwrap();
        }
        mm.drain_all_pages();
        let zone = mm.frames[pages[0] as usize].zone();
        let list = mm.zones[zone as usize].free_area[0].list;
        assert!(list.len >= 2, "order-0 blocks listed together");
        let second = mm.frames[list.head as usize].next;
        mm.frames[second as usize].prev = second + 2;
        assert!(mm.check().is_err());
        assert!(walk_to_end(mm).unwrap_err().what.ends_with("link broken"));

        // A slab whose in-use count disagrees with its free list.
        let mut host = boot();
        let mm: &mut MemoryManager = &mut host;
        let p = mm.kmalloc(64, Gfp::KERNEL).unwrap();
        let pfn = (mm.dmap.phys(p.as_ptr() as usize) / PAGE_SIZE) as usize;
        mm.frames[pfn].count += 1;
        assert!(mm.check().is_err());
        assert_eq!(
            walk_to_end(mm).unwrap_err().what,
            "slab free list length differs from its in-use count"
        );

        // An owner charged for a page nobody holds.
        let mut host = boot();
        let mm: &mut MemoryManager = &mut host;
        mm.owners.charge(5, 1);
        assert_eq!(
            mm.check().unwrap_err().what,
            "per-owner page counts differ from the frame table"
        );
        assert_eq!(
            walk_to_end(mm).unwrap_err().what,
            "owners' charges and pcp frames differ from the frames not otherwise held"
        );
    }
}
