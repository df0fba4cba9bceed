//! Deferred initialisation of the frame table (Linux's
//! `DEFERRED_STRUCT_PAGE_INIT`).
//!
//! Booting touches the frame table of every frame, and on a fresh guest
//! the first write to each page of the table is a host page fault: a
//! 16 GiB guest's 64 MiB table costs more than the rest of the boot. So
//! boot initialises the frames below [`BOOT_INIT_BYTES`] only; the table is
//! lent to the rest of memd-mm as that prefix (`MemoryManager::frames`),
//! so a frame past it is simply out of range everywhere, at no cost to any
//! path. The rest follows a few pageblocks at a time,
//! [`MemoryManager::deferred_init_step`], from the kernel's idle loop,
//! and on demand (`deferred_grow`) when an allocation finds the
//! initialised part short, before it would fail. Each step clears its
//! frames, marks the boot reservations among them and hands the free ones
//! to the buddy; managed pages, watermarks and statistics grow with it.

use crate::frame::{Frame, FrameState};
use crate::memblock::PAGE_SIZE;
use crate::zone::{self, ZoneType};
use crate::{buddy, MemoryManager};

/// Physical memory initialised at boot when initialisation is deferred: the
/// DMA zone and the start of DMA32, whatever the guest's size, so boot
/// does the same work on 1 GiB as on 256 GiB.
pub const BOOT_INIT_BYTES: u64 = 128 << 20;

/// Pageblocks an allocation that finds the initialised memory short
/// initialises before it looks again (32 MiB at the default max order).
const GROW_PAGEBLOCKS: usize = 8;

impl MemoryManager {
    /// Initialises frames `[from, to)` of the (already lent) table: marks
    /// the boot reservations among them and hands the free ones to their
    /// zones' buddy.
    pub(crate) fn init_frames(&mut self, from: u64, to: u64) {
        if !self.table_zeroed {
            self.frames.boot[from as usize..to as usize].fill(Frame::EMPTY);
        }
        for r in self.memblock.reserved() {
            let first = (r.start / PAGE_SIZE).max(from);
            let last = (r.end / PAGE_SIZE).min(to);
            for pfn in first..last {
                self.frames[pfn as usize].set(FrameState::Reserved, ZoneType::of_pfn(pfn), 0);
            }
        }
        let frames = &mut self.frames;
        let blocks = &mut self.pageblocks;
        let zones = &mut self.zones;
        let max_order = self.max_order;
        self.memblock.for_each_free(|start, end| {
            let mut pfn = (start / PAGE_SIZE).max(from);
            let end_pfn = (end / PAGE_SIZE).min(to);
            while pfn < end_pfn {
                let ty = ZoneType::of_pfn(pfn);
                let zone_end = (ty.span().1 / PAGE_SIZE).min(end_pfn);
                let zone = &mut zones[ty as usize];
                zone.managed += zone_end - pfn;
                buddy::give_range(zone, frames, blocks, pfn, zone_end, max_order);
                pfn = zone_end;
            }
        });
        zone::set_watermarks(&mut self.zones);
        self.preferred_zone = zone::preferred_zones(&self.zones);
    }

    /// Initialises the next `pageblocks` pageblocks of the frame table;
    /// true once the whole table is initialised.
    pub fn deferred_init_step(&mut self, pageblocks: usize) -> bool {
        let from = self.frames.boot_len();
        let all = self.table.carved();
        if from == all {
            return true;
        }
        let to = from
            .saturating_add(pageblocks.max(1) << self.pageblocks.order)
            .min(all);
        let prefix = core::mem::take(&mut self.frames.boot);
        self.frames.boot = self.table.grow(prefix, to);
        self.init_frames(from as u64, to as u64);
        to == all
    }

    /// Frames of usable memory not initialised yet.
    pub fn deferred_pages(&self) -> u64 {
        self.deferred_in(0, u64::MAX)
    }

    /// Frames of usable memory in pfns `[lo, hi)` not initialised yet.
    pub(crate) fn deferred_in(&self, lo: u64, hi: u64) -> u64 {
        let from = (self.frames.boot_len() as u64).max(lo);
        let mut pages = 0;
        self.memblock.for_each_free(|start, end| {
            pages += (end / PAGE_SIZE)
                .min(hi)
                .saturating_sub((start / PAGE_SIZE).max(from));
        });
        pages
    }

    /// Grows the initialised memory for an allocation that may use zones up
    /// to `highest` and found it short (Linux's `deferred_grow_zone`);
    /// false when nothing below that zone's end is left to initialise.
    pub(crate) fn deferred_grow(&mut self, highest: ZoneType) -> bool {
        let reach = ((highest.span().1 / PAGE_SIZE) as usize).min(self.table.carved());
        if self.frames.boot_len() >= reach {
            return false;
        }
        self.deferred_init_step(GROW_PAGEBLOCKS);
        true
    }
}
