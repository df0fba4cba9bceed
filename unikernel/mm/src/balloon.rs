//! Balloon pages (Linux's `mm/balloon_compaction.c`): memory the host asked
//! for back through a balloon device. memd takes it in blocks of
//! [`BALLOON_ORDER`], owned by [`Owner::BALLOON`], only from what lies
//! above a zone's `high` watermark: no reserve (`min`, atomic, lowmem) is
//! ever given away, and a balloon never makes an allocation fail that
//! would have succeeded.

use crate::memblock::PAGE_SIZE;
use crate::zone::{Mark, ZoneType};
use crate::{MemoryManager, MmError, Owner};

/// Blocks of 2 MiB (512 frames).
pub const BALLOON_ORDER: u32 = 9;

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
        let current = self.owners.current;
        self.owners.current = Owner::BALLOON;
        self.stamp_allocated(pfn, zone, order);
        self.owners.current = current;
        self.counters.balloon_pages += 1 << order;
        Some(pfn as u64 * PAGE_SIZE)
    }

    /// Gives a block from [`MemoryManager::balloon_take`] back to memd.
    pub fn balloon_give(&mut self, phys: u64) -> Result<(), MmError> {
        let order = self.balloon_order();
        match self.frame(phys) {
            Some(f) if f.owner == Owner::BALLOON.0 && f.order as u32 == order => {}
            _ => return Err(MmError::Invalid("not a balloon block")),
        }
        self.free_pages(phys, order)?;
        self.counters.balloon_pages -= 1 << order;
        Ok(())
    }
}
