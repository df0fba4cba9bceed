//! Per-CPU caches in front of the manager: arrays of free kmalloc
//! objects (Linux SLAB's `kmem_cache->cpu_cache`, SLUB's
//! `kmem_cache_cpu`) and lists of free page blocks of orders up to
//! [`PCP_MAX_ORDER`] (Linux's `per_cpu_pages`, which since 5.14 holds
//! orders up to `PAGE_ALLOC_COSTLY_ORDER` too).
//!
//! [`crate::GlobalMm`] keeps one [`CpuArrays`] and one [`CpuPages`] per
//! CPU. A CPU allocates from and frees to its own caches without taking a
//! lock; only when one runs empty or full does it move a batch from or to
//! the manager: under the zone's lock (`ZoneParts::rmqueue_bulk`) or the
//! cache's (`KmemCache::alloc_bulk`, `free_bulk`) where it can (`node.rs`),
//! else under the whole manager's. What these caches hold is
//! allocated as far as the manager is concerned (its checker, its
//! statistics: page blocks are the kernel's, like the frames on Linux's
//! pcp lists, which `MemFree` does not count): it is the CPU's until
//! `flush_all` gives it back.

use crate::gfp::Gfp;
use crate::kmalloc::NR_KMALLOC;
use crate::owner::Owner;
use crate::pcp::PCP_BATCH;
use crate::zone::{ZoneType, NR_ZONES};
use crate::PAGE_SIZE;
use crate::{MemoryManager, MmError};

/// Objects an array holds at most, per size class.
pub(crate) const CPU_LIMIT: usize = 64;
/// Objects moved between an array and the caches at a time.
pub(crate) const CPU_BATCH: usize = 32;

/// One CPU's free objects, by kmalloc size class.
pub(crate) struct CpuArrays {
    avail: [u8; NR_KMALLOC],
    entry: [[usize; CPU_LIMIT]; NR_KMALLOC],
}

impl CpuArrays {
    pub(crate) const fn new() -> Self {
        CpuArrays {
            avail: [0; NR_KMALLOC],
            entry: [[0; CPU_LIMIT]; NR_KMALLOC],
        }
    }

    /// An object of `class`, if the array has one.
    #[inline(always)]
    pub(crate) fn pop(&mut self, class: usize) -> Option<usize> {
        let n = self.avail[class].checked_sub(1)?;
        self.avail[class] = n;
        Some(self.entry[class][n as usize])
    }

    /// Keeps `obj` of `class`; false when the array is full.
    #[inline(always)]
    pub(crate) fn push(&mut self, class: usize, obj: usize) -> bool {
        let n = self.avail[class] as usize;
        if n == CPU_LIMIT {
            return false;
        }
        self.entry[class][n] = obj;
        self.avail[class] += 1;
        true
    }

    /// Fills the empty array of `class` with up to [`CPU_BATCH`] objects
    /// from `fill` (which says how many it gave) and pops one; `None` when
    /// it gave none.
    pub(crate) fn refill(
        &mut self,
        class: usize,
        fill: impl FnOnce(&mut [usize]) -> usize,
    ) -> Option<usize> {
        let got = fill(&mut self.entry[class][..CPU_BATCH]);
        self.avail[class] = got as u8;
        self.pop(class)
    }

    /// Gives the [`CPU_BATCH`] oldest objects of the full array of `class`
    /// back through `give`.
    pub(crate) fn flush(&mut self, class: usize, give: impl FnOnce(&[usize])) {
        let n = self.avail[class] as usize;
        let count = CPU_BATCH.min(n);
        give(&self.entry[class][..count]);
        self.entry[class].copy_within(count..n, 0);
        self.avail[class] = (n - count) as u8;
    }

    /// Gives every object back to the caches.
    pub(crate) fn flush_all(&mut self, mm: &mut MemoryManager) {
        for class in 0..NR_KMALLOC {
            let n = self.avail[class] as usize;
            mm.kfree_bulk(class, &self.entry[class][..n]);
            self.avail[class] = 0;
        }
    }

    /// Objects held, all classes.
    pub(crate) fn held(&self) -> usize {
        self.avail.iter().map(|&n| n as usize).sum()
    }
}

/// The highest order a CPU's page lists hold (Linux's
/// `PAGE_ALLOC_COSTLY_ORDER`).
pub const PCP_MAX_ORDER: usize = 3;
/// Blocks a CPU's list of one order has room for: four batches of order
/// 0 (higher orders keep four of their smaller batches, [`pages_high`]).
const PAGES_ROOM: usize = 4 * PCP_BATCH;

/// Blocks of `order` a CPU's list holds at most: four batches.
const fn pages_high(order: usize) -> usize {
    4 * page_batch(order)
}

/// Frames a CPU's page lists hold at most, all orders (the per-CPU
/// pageset's `high`).
pub const CPU_PAGES_HIGH: u64 = {
    let mut frames = 0;
    let mut order = 0;
    while order <= PCP_MAX_ORDER {
        frames += (pages_high(order) as u64) << order;
        order += 1;
    }
    frames
};

/// Blocks of `order` moved between a list and the manager at a time: a
/// batch of [`PCP_BATCH`] frames' worth, at least one block.
const fn page_batch(order: usize) -> usize {
    let n = PCP_BATCH >> order;
    if n == 0 {
        1
    } else {
        n
    }
}

/// One CPU's free page blocks, by order (physical addresses), and the
/// frames they hold in each zone.
pub(crate) struct CpuPages {
    count: [u8; PCP_MAX_ORDER + 1],
    blocks: [[u64; PAGES_ROOM]; PCP_MAX_ORDER + 1],
    zone_frames: [u32; NR_ZONES],
}

impl CpuPages {
    pub(crate) const fn new() -> Self {
        CpuPages {
            count: [0; PCP_MAX_ORDER + 1],
            blocks: [[0; PAGES_ROOM]; PCP_MAX_ORDER + 1],
            zone_frames: [0; NR_ZONES],
        }
    }

    /// Counts block `phys` of `order` in (`add`) or out of its zone's
    /// frames. The lists hold the kernel's pages, which never come from
    /// ZONE_MOVABLE, so the address says the zone.
    #[inline(always)]
    fn count_zone(&mut self, phys: u64, order: usize, add: bool) {
        let z = ZoneType::of_pfn(phys / PAGE_SIZE) as usize;
        if add {
            self.zone_frames[z] += 1 << order;
        } else {
            self.zone_frames[z] -= 1 << order;
        }
    }

    /// Frames held, by zone.
    pub(crate) fn zone_frames(&self) -> [u32; NR_ZONES] {
        self.zone_frames
    }

    /// A block of `order` (at most [`PCP_MAX_ORDER`]), refilled with a
    /// batch of the kernel's blocks from `fill` (which says how many it
    /// gave, `None` when it cannot) when the list is empty; `None` when it
    /// gave none.
    pub(crate) fn alloc(
        &mut self,
        order: usize,
        fill: impl FnOnce(&mut [u64]) -> Option<usize>,
    ) -> Option<u64> {
        if let Some(n) = self.count[order].checked_sub(1) {
            self.count[order] = n;
            let phys = self.blocks[order][n as usize];
            self.count_zone(phys, order, false);
            return Some(phys);
        }
        let got = fill(&mut self.blocks[order][..page_batch(order)])?;
        let n = got.checked_sub(1)?;
        self.count[order] = n as u8;
        for i in 0..n {
            self.count_zone(self.blocks[order][i], order, true);
        }
        Some(self.blocks[order][n])
    }

    /// Keeps block `phys` of `order`; when the list is full, first gives
    /// its oldest batch back through `give`. Whether it did.
    pub(crate) fn free(
        &mut self,
        phys: u64,
        order: usize,
        give: impl FnOnce(&[u64]) -> Result<(), MmError>,
    ) -> bool {
        let n = self.count[order] as usize;
        let full = n == pages_high(order);
        if full {
            let batch = page_batch(order);
            let freed = give(&self.blocks[order][..batch]);
            for i in 0..batch {
                self.count_zone(self.blocks[order][i], order, false);
            }
            // Reported with the lock released: the message may allocate.
            debug_assert!(freed.is_ok(), "a CPU list's block: {freed:?}");
            self.blocks[order].copy_within(batch..n, 0);
            self.count[order] = (n - batch) as u8;
        }
        let n = self.count[order] as usize;
        self.blocks[order][n] = phys;
        self.count[order] += 1;
        self.count_zone(phys, order, true);
        full
    }

    /// Gives every block back to the manager; the first refusal, for the
    /// caller to report once it has let the manager go.
    pub(crate) fn flush_all(&mut self, mm: &mut MemoryManager) -> Result<(), MmError> {
        let mut freed = Ok(());
        for order in 0..=PCP_MAX_ORDER {
            let blocks = &self.blocks[order][..self.count[order] as usize];
            freed = freed.and(mm.free_pages_bulk(order as u32, blocks));
            self.count[order] = 0;
        }
        self.zone_frames = [0; NR_ZONES];
        freed
    }

    /// Blocks held, by order.
    pub(crate) fn held(&self) -> [u8; PCP_MAX_ORDER + 1] {
        self.count
    }
}

impl MemoryManager {
    /// Up to `out.len()` of the kernel's page blocks of `order` (Linux's
    /// `alloc_pages_bulk`); how many.
    pub(crate) fn alloc_pages_bulk(&mut self, order: u32, out: &mut [u64]) -> usize {
        self.with_owner(Owner::KERNEL, |mm| {
            for (i, slot) in out.iter_mut().enumerate() {
                match mm.alloc_pages(order, Gfp::KERNEL) {
                    Ok(phys) => *slot = phys,
                    Err(_) => return i,
                }
            }
            out.len()
        })
    }

    /// Frees page blocks of `order`, all of them; the first refusal.
    pub(crate) fn free_pages_bulk(&mut self, order: u32, blocks: &[u64]) -> Result<(), MmError> {
        let mut freed = Ok(());
        for &b in blocks {
            freed = freed.and(self.free_pages(b, order));
        }
        freed
    }

    /// Up to `out.len()` objects of kmalloc class `class` (Linux's
    /// `kmem_cache_alloc_bulk`); how many.
    pub(crate) fn kmalloc_bulk(&mut self, class: usize, gfp: Gfp, out: &mut [usize]) -> usize {
        for (i, slot) in out.iter_mut().enumerate() {
            let got = match self.alloc_from_array(class) {
                Some(p) => Ok(p),
                None => self.slab_alloc(crate::CacheId(class as u16), gfp),
            };
            match got {
                Ok(p) => *slot = p.as_ptr() as usize,
                Err(_) => return i,
            }
        }
        out.len()
    }

    /// Gives kmalloc objects of class `class` back (Linux's
    /// `kmem_cache_free_bulk`).
    pub(crate) fn kfree_bulk(&mut self, class: usize, objs: &[usize]) {
        for &obj in objs {
            self.free_to_array(crate::CacheId(class as u16), obj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostMm;

    #[test]
    fn arrays_move_objects_in_batches_and_give_them_all_back() {
        let mut mm = HostMm::boot(&[(1 << 20, 64 << 20)], "").unwrap();
        mm.reclaim();
        let free = mm.meminfo().free;
        let mut a = CpuArrays::new();
        let first = a
            .refill(3, |out| mm.kmalloc_bulk(3, Gfp::KERNEL, out))
            .unwrap();
        assert_eq!(a.held(), CPU_BATCH - 1);
        let size = mm.ksize(core::ptr::NonNull::new(first as *mut u8).unwrap());
        assert_eq!(size, Ok(64), "a kmalloc-64 object");
        assert!(a.push(3, first));
        let mut more = [0usize; CPU_LIMIT - CPU_BATCH];
        assert_eq!(mm.kmalloc_bulk(3, Gfp::KERNEL, &mut more), more.len());
        for p in more {
            assert!(a.push(3, p));
        }
        assert_eq!(a.held(), CPU_LIMIT);
        assert!(!a.push(3, first), "full at CPU_LIMIT");
        mm.check().unwrap();
        a.flush(3, |objs| mm.kfree_bulk(3, objs));
        assert_eq!(a.held(), CPU_LIMIT - CPU_BATCH);
        a.flush_all(&mut mm);
        assert_eq!(a.held(), 0);
        mm.check().unwrap();
        mm.reclaim();
        assert_eq!(mm.meminfo().free, free, "everything back");
    }

    #[test]
    fn page_lists_move_blocks_in_batches_and_count_them_by_zone() {
        let mut mm = HostMm::boot(&[(1 << 20, 64 << 20)], "").unwrap();
        let free = mm.meminfo().free;
        let mut p = CpuPages::new();
        let b = p.alloc(1, |out| Some(mm.alloc_pages_bulk(1, out))).unwrap();
        assert_eq!(
            p.held()[1] as usize,
            page_batch(1) - 1,
            "a batch, one handed out"
        );
        // Below 16 MiB when the allocator hands out low blocks first, else
        // DMA32: one zone holds them all.
        let held: u32 = p.zone_frames().iter().sum();
        assert_eq!(held as usize, (page_batch(1) - 1) * 2);
        p.free(b, 1, |blocks| mm.free_pages_bulk(1, blocks));
        let mut more = std::vec::Vec::new();
        for _ in 0..pages_high(1) {
            more.push(mm.alloc_pages(1, Gfp::KERNEL).unwrap());
        }
        for b in more {
            p.free(b, 1, |blocks| mm.free_pages_bulk(1, blocks));
        }
        assert!(p.held()[1] as usize <= pages_high(1), "never above high");
        let held: u32 = p.zone_frames().iter().sum();
        assert_eq!(held, p.held()[1] as u32 * 2);
        mm.check().unwrap();
        p.flush_all(&mut mm).unwrap();
        assert_eq!(p.zone_frames(), [0; NR_ZONES]);
        assert_eq!(mm.meminfo().free, free, "everything back");
    }
}
