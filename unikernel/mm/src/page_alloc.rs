//! The page allocator: zonelist walk, watermarks, reclaim, pcp front end.
//!
//! `alloc_pages` tries the zones allowed by the GFP flags from the highest
//! down (Linux's zonelist: Normal → DMA32 → DMA), each only while it stays
//! above its `low` watermark plus the lowmem reserve kept against the
//! request's highest zone. When that fails a KERNEL request reclaims
//! (shrinks slab caches, drains pcp lists) and retries down to `min`; an
//! ATOMIC request skips reclaim and may go below `min`.

use crate::buddy;
use crate::frame::{Frame, FrameState};
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::pageblock::Pageblocks;
use crate::pcp::PCP_BATCH;
use crate::sparse::Frames;
use crate::zone::{Mark, Zone, ZoneType};
use crate::{access, MemoryManager, MmError};

impl MemoryManager {
    /// Allocates `2^order` contiguous frames and returns the physical
    /// address of the first (Linux's `alloc_pages` + `page_to_phys`).
    #[inline(always)]
    pub fn alloc_pages(&mut self, order: u32, gfp: Gfp) -> Result<u64, MmError> {
        // Fast path (Linux's rmqueue_pcplist): a single frame from the
        // preferred zone's pcp list while the zone is above `low`.
        if order == 0 && !self.fault.armed_page && !gfp.zero() {
            let zone_ty = self.preferred_zone[gfp.highest_zone() as usize];
            let zone = &mut self.zones[zone_ty as usize];
            if zone.free > zone.watermark.low {
                if let Some(pfn) = zone.pcp.pop() {
                    zone.counters.alloc_success += 1;
                    self.stamp_allocated(pfn, zone_ty, 0);
                    return Ok(pfn as u64 * PAGE_SIZE);
                }
            }
        }
        self.alloc_pages_slow(order, gfp)
    }

    #[inline(never)]
    fn alloc_pages_slow(&mut self, order: u32, gfp: Gfp) -> Result<u64, MmError> {
        let pfn = self.alloc_frames(order, gfp)?;
        let zone = self.frames[pfn as usize].zone();
        self.stamp_allocated(pfn, zone, order);
        Ok(pfn as u64 * PAGE_SIZE)
    }

    /// Marks a block head as handed out to the current owner and charges
    /// the owner for it (page allocations and buddy-backed DMA buffers).
    #[inline(always)]
    pub(crate) fn stamp_allocated(&mut self, pfn: u32, zone: ZoneType, order: u32) {
        let owner = self.owners.current.0;
        stamp(&mut self.frames[pfn as usize], zone, order, owner);
        self.owners.charge(owner, 1 << order);
    }

    /// Frees a block from [`MemoryManager::alloc_pages`]. The address and
    /// order are checked against the frame table, so a bad or repeated free
    /// is refused instead of corrupting the free lists.
    #[inline(always)]
    pub fn free_pages(&mut self, phys: u64, order: u32) -> Result<(), MmError> {
        let pfn = phys / PAGE_SIZE;
        let f = allocated_head(&mut self.frames, phys, order)?;
        let owner = f.owner;
        f.count = 0;
        if order == 0 {
            let zone = f.zone();
            let pcp = &mut self.zones[zone as usize].pcp;
            if !pcp.is_full() {
                f.set(FrameState::Pcp, zone, 0);
                pcp.push(pfn as u32);
                self.owners.uncharge(owner, 1);
                return Ok(());
            }
        }
        self.free_pages_slow(pfn as u32, order, owner);
        Ok(())
    }

    #[inline(never)]
    fn free_pages_slow(&mut self, pfn: u32, order: u32, owner: u16) {
        self.owners.uncharge(owner, 1 << order);
        self.free_frames(pfn, order);
    }

    /// Core allocation: returns a block head whose frame the caller stamps.
    /// The frame keeps zone and order; its state is left for the caller.
    #[inline]
    pub(crate) fn alloc_frames(&mut self, order: u32, gfp: Gfp) -> Result<u32, MmError> {
        if order >= self.max_order {
            return Err(MmError::Invalid("order is not below max_order"));
        }
        if self.fault.fail_page() {
            return Err(MmError::InjectedFault);
        }
        let highest = gfp.highest_zone();
        let pfn = match self.get_page_from_freelist(order, highest, Mark::Low) {
            Some(pfn) => pfn,
            None => self.alloc_slowpath(order, gfp, highest)?,
        };
        if gfp.zero() {
            access::fill(
                self.dmap.virt(pfn as u64 * PAGE_SIZE),
                (PAGE_SIZE as usize) << order,
                0,
            );
        }
        Ok(pfn)
    }

    /// Returns a block head to the pcp list (order 0) or the buddy.
    #[inline]
    pub(crate) fn free_frames(&mut self, pfn: u32, order: u32) {
        let zone_ty = self.frames[pfn as usize].zone();
        self.zone_parts(zone_ty as usize).free_one(pfn, order);
    }

    #[inline(always)]
    pub(crate) fn get_page_from_freelist(
        &mut self,
        order: u32,
        highest: ZoneType,
        mark: Mark,
    ) -> Option<u32> {
        let mut z = highest as usize + 1;
        while z > 0 {
            z -= 1;
            if let Some(pfn) = self.zone_parts(z).rmqueue(order, mark, highest) {
                let zone = &mut self.zones[z];
                zone.counters.alloc_success += 1;
                if z != self.preferred_zone[highest as usize] as usize {
                    zone.counters.fallback += 1;
                }
                if mark == Mark::Atomic && zone.free < zone.watermark.min {
                    zone.counters.atomic_reserve_used += 1;
                }
                return Some(pfn);
            }
        }
        None
    }

    /// Zone `z` and what its lock covers, borrowed from the manager.
    #[inline(always)]
    pub(crate) fn zone_parts(&mut self, z: usize) -> ZoneParts<'_> {
        ZoneParts {
            zone: &mut self.zones[z],
            frames: &mut self.frames,
            blocks: &mut self.pageblocks,
            slab_pages: &mut self.slab_pages[z],
            max_order: self.max_order,
        }
    }

    #[cold]
    fn alloc_slowpath(&mut self, order: u32, gfp: Gfp, highest: ZoneType) -> Result<u32, MmError> {
        // Memory not initialised yet is free memory all the same.
        while self.deferred_grow(highest) {
            if let Some(pfn) = self.get_page_from_freelist(order, highest, Mark::Low) {
                return Ok(pfn);
            }
        }
        if gfp.can_reclaim() {
            self.reclaim();
            if let Some(pfn) = self.get_page_from_freelist(order, highest, Mark::Min) {
                return Ok(pfn);
            }
        }
        // The reserve below `min` is for the kernel: its own heap
        // (MEMALLOC) and ATOMIC requests it makes itself. A client's ATOMIC
        // request stops at `min`, so clients draining memory can never
        // starve the kernel of the memory it needs to answer them.
        let kernel = self.owners.current == crate::Owner::KERNEL;
        if gfp.memalloc() || (gfp.is_atomic() && kernel) {
            if let Some(pfn) = self.get_page_from_freelist(order, highest, Mark::Atomic) {
                return Ok(pfn);
            }
        } else if gfp.is_atomic() && !gfp.can_reclaim() {
            if let Some(pfn) = self.get_page_from_freelist(order, highest, Mark::Min) {
                return Ok(pfn);
            }
        }
        // The balloon's memory, when the host lets memd take it back: a few
        // blocks of the zones this request may use, at the mark it may
        // reach.
        let mark = if gfp.memalloc() || (gfp.is_atomic() && kernel) {
            Mark::Atomic
        } else {
            Mark::Min
        };
        for _ in 0..crate::balloon::OOM_DEFLATE_BLOCKS {
            if !self.balloon_deflate_for_oom(highest) {
                break;
            }
            if let Some(pfn) = self.get_page_from_freelist(order, highest, mark) {
                return Ok(pfn);
            }
        }
        for z in 0..=highest as usize {
            self.zones[z].counters.alloc_fail += 1;
        }
        if !gfp.nowarn() {
            self.counters.alloc_fail_warnings += 1;
        }
        Err(MmError::NoMemory)
    }

    /// Direct reclaim: give back what caches hold but nobody uses. Returns
    /// the pages freed. memd has no page cache or swap, so this is the
    /// slab shrinkers plus the pcp lists.
    pub fn reclaim(&mut self) -> u64 {
        self.counters.reclaim_runs += 1;
        let mut freed = 0;
        for id in 0..self.caches.end() {
            if self.caches.get(id).is_some() {
                freed += self.shrink_cache_index(id);
            }
        }
        for z in ZoneType::ALL {
            freed += self.zones[z as usize].pcp.count as u64;
            let count = self.zones[z as usize].pcp.count;
            self.pcp_drain(z, count);
        }
        self.counters.reclaimed_pages += freed;
        freed
    }

    /// Returns the `count` coldest frames of a pcp list to the buddy.
    pub(crate) fn pcp_drain(&mut self, zone_ty: ZoneType, count: usize) {
        self.zone_parts(zone_ty as usize).pcp_drain(count);
    }

    /// Drains every pcp list (before checks that want exact buddy counts).
    pub fn drain_all_pages(&mut self) {
        for z in ZoneType::ALL {
            let count = self.zones[z as usize].pcp.count;
            self.pcp_drain(z, count);
        }
    }
}

/// Makes a block head handed out to `owner`.
#[inline(always)]
pub(crate) fn stamp(f: &mut Frame, zone: ZoneType, order: u32, owner: u16) {
    f.set(FrameState::Allocated, zone, order);
    f.count = 1;
    f.owner = owner;
}

/// The head frame of the block of `order` at `phys` that `alloc_pages`
/// handed out, checked against the frame table, so a bad or repeated free
/// is refused instead of corrupting the free lists.
#[inline(always)]
pub(crate) fn allocated_head(
    frames: &mut Frames,
    phys: u64,
    order: u32,
) -> Result<&mut Frame, MmError> {
    let f = match frames.get_mut((phys / PAGE_SIZE) as usize) {
        Some(f) if phys.is_multiple_of(PAGE_SIZE) && f.is(FrameState::Allocated) && !f.lent() => f,
        _ => return Err(MmError::Invalid("not the start of an allocated page block")),
    };
    if f.order as u32 != order {
        return Err(MmError::Invalid("order does not match the allocation"));
    }
    Ok(f)
}

/// One zone and what its lock covers: its free lists and pcp list, the
/// frames on them and their pageblocks' counts. The manager's own paths
/// borrow it from the manager ([`MemoryManager::zone_parts`]); the per-CPU
/// batches build it under the zone's lock alone (`node.rs`).
pub(crate) struct ZoneParts<'a> {
    pub(crate) zone: &'a mut Zone,
    pub(crate) frames: &'a mut Frames,
    pub(crate) blocks: &'a mut Pageblocks,
    /// The zone's frames in slabs.
    pub(crate) slab_pages: &'a mut u64,
    pub(crate) max_order: u32,
}

impl ZoneParts<'_> {
    /// A block of `order` while the zone stays above `mark` for a request
    /// whose highest zone is `highest` (Linux's `rmqueue`): order 0 from
    /// the pcp list, refilled from the buddy when empty. The head keeps its
    /// zone and order; its state is left for the caller.
    #[inline(always)]
    pub(crate) fn rmqueue(&mut self, order: u32, mark: Mark, highest: ZoneType) -> Option<u32> {
        if !self.zone.watermark_ok(order, mark, highest) {
            return None;
        }
        if order == 0 {
            // A refill may not take the zone below the mark either.
            let budget = self.zone.free - self.zone.mark_pages(mark, highest);
            match self.zone.pcp.pop() {
                Some(pfn) => Some(pfn),
                None => self.pcp_refill(budget),
            }
        } else {
            buddy::take(self.zone, self.frames, self.blocks, order, self.max_order)
        }
    }

    /// Up to `out.len()` kernel blocks of `order` while the zone stays
    /// above `low` for a `GFP_KERNEL` request (Linux's `rmqueue_bulk`),
    /// under the zone's lock alone (`node.rs`); how many. The owner table
    /// is the caller's to charge.
    pub(crate) fn rmqueue_bulk(&mut self, order: u32, out: &mut [u64]) -> usize {
        let mut got = 0;
        for slot in out.iter_mut() {
            let Some(pfn) = self.rmqueue(order, Mark::Low, ZoneType::Normal) else {
                break;
            };
            self.stamp_allocated(pfn, order, crate::Owner::KERNEL.0);
            *slot = pfn as u64 * PAGE_SIZE;
            got += 1;
        }
        self.zone.counters.alloc_success += got as u64;
        got
    }

    /// Makes the block of `order` at `pfn`, just taken from this zone,
    /// handed out to `owner`; charging the owner is the caller's.
    #[inline(always)]
    pub(crate) fn stamp_allocated(&mut self, pfn: u32, order: u32, owner: u16) {
        stamp(&mut self.frames[pfn as usize], self.zone.ty, order, owner);
    }

    /// Returns a block head of this zone to the pcp list (order 0) or the
    /// buddy.
    #[inline]
    pub(crate) fn free_one(&mut self, pfn: u32, order: u32) {
        if order == 0 {
            if self.zone.pcp.is_full() {
                self.pcp_drain(PCP_BATCH);
            }
            self.frames[pfn as usize].set(FrameState::Pcp, self.zone.ty, 0);
            self.zone.pcp.push(pfn);
        } else {
            buddy::give(
                self.zone,
                self.frames,
                self.blocks,
                pfn,
                order,
                self.max_order,
            );
        }
    }

    /// Fills an empty pcp list with a batch from the buddy and pops one.
    #[cold]
    fn pcp_refill(&mut self, budget: u64) -> Option<u32> {
        self.zone.counters.pcp_refill += 1;
        for _ in 0..(PCP_BATCH as u64).min(budget) {
            let Some(pfn) = buddy::take(self.zone, self.frames, self.blocks, 0, self.max_order)
            else {
                break;
            };
            self.frames[pfn as usize].set_state(FrameState::Pcp);
            self.zone.pcp.push(pfn);
        }
        self.zone.pcp.pop()
    }

    /// Returns the `count` coldest frames of the pcp list to the buddy.
    pub(crate) fn pcp_drain(&mut self, count: usize) {
        let zone = &mut *self.zone;
        let count = count.min(zone.pcp.count);
        if count == 0 {
            return;
        }
        zone.counters.pcp_drain += 1;
        for i in 0..count {
            let pfn = zone.pcp.frames[i];
            buddy::give(zone, self.frames, self.blocks, pfn, 0, self.max_order);
        }
        zone.pcp.frames.copy_within(count..zone.pcp.count, 0);
        zone.pcp.count -= count;
    }
}
