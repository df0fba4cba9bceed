//! Balloon pages (Linux's `mm/balloon_compaction.c`): memory the host asked
//! for back through a balloon device. memd takes it in blocks of
//! [`BALLOON_ORDER`], owned by [`Owner::BALLOON`] and listed through their
//! head frames, only from what lies above a zone's `high` watermark: no
//! reserve (`min`, atomic, lowmem) is ever given away. With
//! [`MemoryManager::set_balloon_deflate_on_oom`] (the device's
//! `DEFLATE_ON_OOM`), an allocation that would fail takes blocks back from
//! the balloon first; the driver sees the balloon shrink and tells the host.

use crate::memblock::PAGE_SIZE;
use crate::zone::{Mark, ZoneType};
use crate::{MemoryManager, MmError, Owner};

/// Blocks of 2 MiB (512 frames).
pub const BALLOON_ORDER: u32 = 9;

/// Most blocks one failing allocation takes back (Linux gives back 256
/// pages per OOM notification; memd, 32 MiB).
pub(crate) const OOM_DEFLATE_BLOCKS: usize = 16;

impl MemoryManager {
    fn balloon_order(&self) -> u32 {
        BALLOON_ORDER.min(self.max_order - 1)
    }

    /// Frames in a balloon block.
    pub fn balloon_block_pages(&self) -> u64 {
        1 << self.balloon_order()
    }

    /// Takes one block for the balloon, from memory above the zones' `high`
    /// watermarks (initialising more of it first if some is still to
    /// come); its physical address, or None when there is no such block.
    /// It joins the balloon's list with [`MemoryManager::balloon_keep`] once
    /// the host has it: until then nothing may take it back.
    pub fn balloon_take(&mut self) -> Option<u64> {
        let order = self.balloon_order();
        let pfn = loop {
            if let Some(pfn) = self.get_page_from_freelist(order, ZoneType::Normal, Mark::High) {
                break pfn;
            }
            if !self.deferred_grow(ZoneType::Normal) {
                return None;
            }
        };
        let zone = self.frames[pfn as usize].zone();
        self.with_owner(Owner::BALLOON, |mm| mm.stamp_allocated(pfn, zone, order));
        // Not listed yet (`aux` says whether it is; a page block's `aux`
        // may hold what its last use left there).
        self.frames[pfn as usize].aux = 0;
        self.counters.balloon_pages += 1 << order;
        self.zones[zone as usize].balloon += 1 << order;
        Some(pfn as u64 * PAGE_SIZE)
    }

    /// Blocks in the balloon (those on their way back to memd not counted).
    pub fn balloon_blocks(&self) -> u64 {
        self.balloon.len as u64
    }

    /// Takes a block off the balloon's list for the driver to send back to
    /// the host; [`MemoryManager::balloon_give`] frees it once the host
    /// knows, [`MemoryManager::balloon_keep`] lists it again if the host
    /// never learns.
    pub fn balloon_pop(&mut self) -> Option<u64> {
        let pfn = self.balloon.pop(&mut self.frames)?;
        self.frames[pfn as usize].aux = 0;
        Some(pfn as u64 * PAGE_SIZE)
    }

    /// Lists a block the host now has: one just taken, or one from
    /// [`MemoryManager::balloon_pop`] the host never got back.
    pub fn balloon_keep(&mut self, phys: u64) {
        let pfn = (phys / PAGE_SIZE) as u32;
        if self.is_balloon_block(pfn) && self.frames[pfn as usize].aux == 0 {
            self.list_balloon_block(pfn);
        }
    }

    /// A block's head says it is listed with `aux` 1 (unused by page
    /// blocks otherwise), so a block can be unlisted by its number.
    fn list_balloon_block(&mut self, pfn: u32) {
        self.frames[pfn as usize].aux = 1;
        self.balloon.push(&mut self.frames, pfn);
    }

    fn is_balloon_block(&self, pfn: u32) -> bool {
        self.frames.get(pfn as usize).is_some_and(|f| {
            f.is(crate::frame::FrameState::Allocated)
                && f.owner == Owner::BALLOON.0
                && f.order as u32 == self.balloon_order()
        })
    }

    /// Lets allocations that would fail take blocks back from the balloon.
    pub fn set_balloon_deflate_on_oom(&mut self, on: bool) {
        self.balloon_deflate_on_oom = on;
    }

    /// For an allocation about to fail that may use zones up to `highest`:
    /// gives back one balloon block of such a zone (when allowed); false
    /// when there is none.
    pub(crate) fn balloon_deflate_for_oom(&mut self, highest: ZoneType) -> bool {
        if !self.balloon_deflate_on_oom {
            return false;
        }
        let frames = &self.frames;
        let Some(pfn) = self
            .balloon
            .iter(frames)
            .find(|&p| frames[p as usize].zone() <= highest)
        else {
            return false;
        };
        self.counters.balloon_oom_deflates += 1;
        self.balloon_give(pfn as u64 * PAGE_SIZE).is_ok()
    }

    /// Frees a balloon block back to memd (unlisting it first if it is
    /// still listed).
    pub fn balloon_give(&mut self, phys: u64) -> Result<(), MmError> {
        let order = self.balloon_order();
        let pfn = (phys / PAGE_SIZE) as u32;
        if !phys.is_multiple_of(PAGE_SIZE) || !self.is_balloon_block(pfn) {
            return Err(MmError::Invalid("not a balloon block"));
        }
        if self.frames[pfn as usize].aux == 1 {
            self.balloon.remove(&mut self.frames, pfn);
            self.frames[pfn as usize].aux = 0;
        }
        let zone = self.frames[pfn as usize].zone();
        self.free_pages(phys, order)?;
        self.zones[zone as usize].balloon -= 1 << order;
        self.counters.balloon_pages -= 1 << order;
        Ok(())
    }
}
