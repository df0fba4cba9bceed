//! The page allocator: zonelist walk, watermarks, reclaim, pcp front end.
//!
//! `alloc_pages` tries the zones allowed by the GFP flags from the highest
//! down (Linux's zonelist: Normal → DMA32 → DMA), each only while it stays
//! above its `low` watermark plus the lowmem reserve kept against the
//! request's highest zone. When that fails a KERNEL request reclaims
//! (shrinks slab caches, drains pcp lists) and retries down to `min`; an
//! ATOMIC request skips reclaim and may go below `min`.

use crate::buddy;
use crate::frame::FrameState;
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::pcp::PCP_BATCH;
use crate::zone::{Mark, ZoneType};
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
        let f = &mut self.frames[pfn as usize];
        f.set(FrameState::Allocated, zone, order);
        f.count = 1;
        f.owner = owner;
        self.owners.charge(owner, 1 << order);
    }

    /// Frees a block from [`MemoryManager::alloc_pages`]. The address and
    /// order are checked against the frame table, so a bad or repeated free
    /// is refused instead of corrupting the free lists.
    #[inline(always)]
    pub fn free_pages(&mut self, phys: u64, order: u32) -> Result<(), MmError> {
        let pfn = phys / PAGE_SIZE;
        let f = match self.frames.get_mut(pfn as usize) {
            Some(f)
                if phys.is_multiple_of(PAGE_SIZE) && f.is(FrameState::Allocated) && !f.lent() =>
            {
                f
            }
            _ => return Err(MmError::Invalid("not the start of an allocated page block")),
        };
        if f.order as u32 != order {
            return Err(MmError::Invalid("order does not match the allocation"));
        }
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
        if order == 0 {
            if self.zones[zone_ty as usize].pcp.is_full() {
                self.pcp_drain(zone_ty, PCP_BATCH);
            }
            self.frames[pfn as usize].set(FrameState::Pcp, zone_ty, 0);
            self.zones[zone_ty as usize].pcp.push(pfn);
        } else {
            let max_order = self.max_order;
            buddy::give(
                &mut self.zones[zone_ty as usize],
                &mut self.frames,
                &mut self.pageblocks,
                pfn,
                order,
                max_order,
            );
        }
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
            let zone = &mut self.zones[z];
            if !zone.watermark_ok(order, mark, highest) {
                continue;
            }
            let pfn = if order == 0 {
                // A refill may not take the zone below the mark either.
                let budget = zone.free - zone.mark_pages(mark, highest);
                match zone.pcp.pop() {
                    Some(pfn) => Some(pfn),
                    None => self.pcp_refill(z, budget),
                }
            } else {
                let max_order = self.max_order;
                buddy::take(
                    zone,
                    &mut self.frames,
                    &mut self.pageblocks,
                    order,
                    max_order,
                )
            };
            if let Some(pfn) = pfn {
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

    /// Fills an empty pcp list with a batch from the buddy and pops one.
    #[cold]
    fn pcp_refill(&mut self, z: usize, budget: u64) -> Option<u32> {
        let max_order = self.max_order;
        let zone = &mut self.zones[z];
        zone.counters.pcp_refill += 1;
        for _ in 0..(PCP_BATCH as u64).min(budget) {
            let Some(pfn) = buddy::take(zone, &mut self.frames, &mut self.pageblocks, 0, max_order)
            else {
                break;
            };
            self.frames[pfn as usize].set_state(FrameState::Pcp);
            zone.pcp.push(pfn);
        }
        zone.pcp.pop()
    }

    /// Returns the `count` coldest frames of a pcp list to the buddy.
    pub(crate) fn pcp_drain(&mut self, zone_ty: ZoneType, count: usize) {
        let max_order = self.max_order;
        let zone = &mut self.zones[zone_ty as usize];
        let count = count.min(zone.pcp.count);
        if count == 0 {
            return;
        }
        zone.counters.pcp_drain += 1;
        for i in 0..count {
            let pfn = zone.pcp.frames[i];
            buddy::give(
                zone,
                &mut self.frames,
                &mut self.pageblocks,
                pfn,
                0,
                max_order,
            );
        }
        zone.pcp.frames.copy_within(count..zone.pcp.count, 0);
        zone.pcp.count -= count;
    }

    /// Drains every pcp list (before checks that want exact buddy counts).
    pub fn drain_all_pages(&mut self) {
        for z in ZoneType::ALL {
            let count = self.zones[z as usize].pcp.count;
            self.pcp_drain(z, count);
        }
    }
}
