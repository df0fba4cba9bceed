//! Free page reporting (Linux's `mm/page_reporting.c`): telling the host
//! which free memory it may take back.
//!
//! A reporting device (virtio-balloon's reporting queue) is lent free
//! buddy blocks of at least [`REPORT_ORDER`]: [`MemoryManager::report_take`]
//! takes unreported ones off the free lists (they become `Isolated`, so
//! nothing allocates or merges them meanwhile), the device discards their
//! memory, and [`MemoryManager::report_put`] returns them, marked reported
//! (Linux's `PageReported`) so they are not reported again. Their contents
//! are never touched. A reported block that is allocated, split or merged
//! loses the mark (any `Frame::set` clears it): it is simply used, and the
//! host faults its memory back in.

use crate::buddy;
use crate::frame::FrameState;
use crate::memblock::PAGE_SIZE;
use crate::pageblock::Held;
use crate::zone::ZoneType;
use crate::MemoryManager;

/// The smallest block reported: 2 MiB (Linux's `pageblock_order` on x86).
pub const REPORT_ORDER: u32 = 9;

/// A free block lent to the reporting device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportBlock {
    pub phys: u64,
    pub order: u32,
}

impl ReportBlock {
    pub fn bytes(&self) -> u64 {
        PAGE_SIZE << self.order
    }
}

impl MemoryManager {
    fn report_order(&self) -> u32 {
        REPORT_ORDER.min(self.max_order - 1)
    }

    /// Free memory reported to the host and still free, in bytes (kept as
    /// blocks change, like Linux's `zone->reported_pages`).
    pub fn reported_bytes(&self) -> u64 {
        self.zones.iter().map(|z| z.reported).sum::<u64>() * PAGE_SIZE
    }

    /// Free memory in blocks large enough to report: `(unreported,
    /// reported)` bytes. Walks the free lists of those orders (for tests
    /// and checks; [`MemoryManager::reported_bytes`] is the counter).
    pub fn reportable_bytes(&self) -> (u64, u64) {
        let (mut unreported, mut reported) = (0, 0);
        for zone in &self.zones {
            for order in self.report_order()..self.max_order {
                for pfn in zone.free_area[order as usize].list.iter(&self.frames) {
                    match self.frames[pfn as usize].reported() {
                        true => reported += PAGE_SIZE << order,
                        false => unreported += PAGE_SIZE << order,
                    }
                }
            }
        }
        (unreported, reported)
    }

    /// Takes up to `out.len()` unreported free blocks of at least
    /// [`REPORT_ORDER`] off the free lists, highest zone and largest block
    /// first, for the device; they stay isolated until
    /// [`MemoryManager::report_put`]. A zone gives only what keeps it above
    /// its `high` watermark and its reserve for higher zones' requests, so
    /// reporting never makes an allocation fail or fall back. Returns how
    /// many it took.
    pub fn report_take(&mut self, out: &mut [ReportBlock]) -> usize {
        let mut n = 0;
        for z in ZoneType::ALL.into_iter().rev() {
            for order in (self.report_order()..self.max_order).rev() {
                // One walk of the list finds the candidates (reported blocks
                // sit at its head after a report, so walking it again for
                // each block would pass them again and again).
                let list = self.zones[z as usize].free_area[order as usize].list;
                let mut found = n;
                for pfn in list.iter(&self.frames) {
                    if found == out.len() {
                        break;
                    }
                    if !self.frames[pfn as usize].reported() {
                        out[found].phys = pfn as u64 * PAGE_SIZE;
                        found += 1;
                    }
                }
                // Taken in order while the zone stays above its marks; the
                // candidates not taken are overwritten later.
                while n < found {
                    let zone = &mut self.zones[z as usize];
                    let keep = zone.watermark.high + zone.lowmem_reserve[ZoneType::Normal as usize];
                    if zone.free < keep + (1 << order) {
                        break;
                    }
                    let pfn = (out[n].phys / PAGE_SIZE) as u32;
                    zone.free_area[order as usize]
                        .list
                        .remove(&mut self.frames, pfn);
                    zone.free -= 1 << order;
                    zone.isolated += 1 << order;
                    self.pageblocks.sub(pfn, Held::Free, 1 << order);
                    self.pageblocks.add(pfn, Held::Isolated, 1 << order);
                    self.frames[pfn as usize].set(FrameState::Isolated, z, order);
                    out[n].order = order;
                    n += 1;
                }
            }
        }
        n
    }

    /// Returns blocks from [`MemoryManager::report_take`] to the free lists;
    /// with `reported`, the device took their memory and they are marked so.
    /// Blocks that are not isolated blocks of that order are left alone.
    pub fn report_put(&mut self, blocks: &[ReportBlock], reported: bool) {
        let max_order = self.max_order;
        for b in blocks {
            let pfn = (b.phys / PAGE_SIZE) as u32;
            let Some(f) = self.frames.get(pfn as usize) else {
                continue;
            };
            if !f.is(FrameState::Isolated) || f.order as u32 != b.order {
                continue;
            }
            let z = f.zone();
            let zone = &mut self.zones[z as usize];
            zone.isolated -= 1 << b.order;
            self.pageblocks.sub(pfn, Held::Isolated, 1 << b.order);
            buddy::give(
                zone,
                &mut self.frames,
                &mut self.pageblocks,
                pfn,
                b.order,
                max_order,
            );
            // Still the block reported (not merged into a larger one).
            let f = &mut self.frames[pfn as usize];
            if reported && f.is(FrameState::Buddy) && f.order as u32 == b.order {
                f.mark_reported();
                self.zones[z as usize].reported += 1 << b.order;
            }
        }
    }
}
