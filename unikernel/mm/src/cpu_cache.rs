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
use crate::node::Node;
use crate::owner::Owner;
use crate::pcp::PCP_BATCH;
use crate::zone::{ZoneType, NR_ZONES};
use crate::PAGE_SIZE;
use crate::{MemoryManager, MmError};
use core::ops::DerefMut;

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
    /// from the caches and pops one; `None` when the caches have none.
    pub(crate) fn refill(
        &mut self,
        class: usize,
        mm: &mut MemoryManager,
        gfp: Gfp,
    ) -> Option<usize> {
        let got = mm.kmalloc_bulk(class, gfp, &mut self.entry[class][..CPU_BATCH]);
        self.avail[class] = got as u8;
        self.pop(class)
    }

    /// [`CpuArrays::refill`] under the cache's lock alone (`node.rs`);
    /// `None` when that could not serve it.
    pub(crate) fn refill_shared(
        &mut self,
        cpu: usize,
        class: usize,
        node: &Node,
        gfp: Gfp,
    ) -> Option<usize> {
        let got = node.kmalloc_bulk(Some(cpu), class, gfp, &mut self.entry[class][..CPU_BATCH]);
        self.avail[class] = got as u8;
        self.pop(class)
    }

    /// Gives the [`CPU_BATCH`] oldest objects of the full array of `class`
    /// back to the caches.
    pub(crate) fn flush(&mut self, class: usize, mm: &mut MemoryManager) {
        let count = CPU_BATCH.min(self.avail[class] as usize);
        mm.kfree_bulk(class, &self.entry[class][..count]);
        self.flushed(class, count);
    }

    /// [`CpuArrays::flush`] under the cache's lock alone; false when it
    /// must take the whole manager.
    pub(crate) fn flush_shared(&mut self, cpu: usize, class: usize, node: &Node) -> bool {
        let count = CPU_BATCH.min(self.avail[class] as usize);
        let done = node.kfree_bulk(Some(cpu), class, &self.entry[class][..count]);
        if done {
            self.flushed(class, count);
        }
        done
    }

    /// Forgets the `count` oldest objects of `class`, given back.
    fn flushed(&mut self, class: usize, count: usize) {
        let n = self.avail[class] as usize;
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
    /// batch when the list is empty: from `bulk` (a zone under its own
    /// lock), else from the manager; `None` when the manager has none.
    /// Refills are the kernel's pages.
    pub(crate) fn alloc<G: DerefMut<Target = MemoryManager>>(
        &mut self,
        order: usize,
        bulk: impl FnOnce(&mut [u64]) -> usize,
        lock: impl FnOnce() -> G,
    ) -> Option<u64> {
        if let Some(n) = self.count[order].checked_sub(1) {
            self.count[order] = n;
            let phys = self.blocks[order][n as usize];
            self.count_zone(phys, order, false);
            return Some(phys);
        }
        let blocks = &mut self.blocks[order][..page_batch(order)];
        let got = match bulk(blocks) {
            0 => Self::refill_locked(order, blocks, lock)?,
            got => got,
        };
        let n = got.checked_sub(1)?;
        self.count[order] = n as u8;
        for i in 0..n {
            self.count_zone(self.blocks[order][i], order, true);
        }
        Some(self.blocks[order][n])
    }

    /// Fills `blocks` with kernel blocks of `order` from the whole manager;
    /// how many (`None` before it is initialised).
    fn refill_locked<G: DerefMut<Target = MemoryManager>>(
        order: usize,
        blocks: &mut [u64],
        lock: impl FnOnce() -> G,
    ) -> Option<usize> {
        let mut mm = lock();
        if !mm.is_initialized() {
            return None;
        }
        let got = mm.with_owner(Owner::KERNEL, |mm| {
            let mut got = 0usize;
            for slot in blocks {
                match mm.alloc_pages(order as u32, Gfp::KERNEL) {
                    Ok(phys) => *slot = phys,
                    Err(_) => break,
                }
                got += 1;
            }
            got
        });
        Some(got)
    }

    /// Keeps block `phys` of `order`; when the list is full, first gives
    /// its oldest batch back: to `bulk` (the zones under their own locks),
    /// else to the manager.
    pub(crate) fn free<G: DerefMut<Target = MemoryManager>>(
        &mut self,
        phys: u64,
        order: usize,
        bulk: impl FnOnce(&[u64]) -> Option<Result<(), MmError>>,
        lock: impl FnOnce() -> G,
    ) {
        let n = self.count[order] as usize;
        if n == pages_high(order) {
            let batch = page_batch(order);
            let oldest = &self.blocks[order][..batch];
            let freed = bulk(oldest).unwrap_or_else(|| {
                let mut mm = lock();
                let mut freed = Ok(());
                for &b in oldest {
                    freed = freed.and(mm.free_pages(b, order as u32));
                }
                freed
            });
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
    }

    /// Gives every block back to the manager; the first refusal, for the
    /// caller to report once it has let the manager go.
    pub(crate) fn flush_all(&mut self, mm: &mut MemoryManager) -> Result<(), MmError> {
        let mut freed = Ok(());
        for order in 0..=PCP_MAX_ORDER {
            for &b in &self.blocks[order][..self.count[order] as usize] {
                freed = freed.and(mm.free_pages(b, order as u32));
            }
            self.count[order] = 0;
        }
        self.zone_frames = [0; NR_ZONES];
        freed
    }

    /// Whether the list of `order` is at its high mark.
    pub(crate) fn is_full(&self, order: usize) -> bool {
        self.count[order] as usize == pages_high(order)
    }

    /// Blocks held, by order.
    pub(crate) fn held(&self) -> [u8; PCP_MAX_ORDER + 1] {
        self.count
    }
}

impl MemoryManager {
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
        let first = a.refill(3, &mut mm, Gfp::KERNEL).unwrap();
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
        a.flush(3, &mut mm);
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
        let b = p.alloc(1, |_| 0, || &mut *mm).unwrap();
        assert_eq!(
            p.held()[1] as usize,
            page_batch(1) - 1,
            "a batch, one handed out"
        );
        // Below 16 MiB when the allocator hands out low blocks first, else
        // DMA32: one zone holds them all.
        let held: u32 = p.zone_frames().iter().sum();
        assert_eq!(held as usize, (page_batch(1) - 1) * 2);
        p.free(b, 1, |_| None, || &mut *mm);
        let mut more = std::vec::Vec::new();
        for _ in 0..pages_high(1) {
            more.push(mm.alloc_pages(1, Gfp::KERNEL).unwrap());
        }
        for b in more {
            p.free(b, 1, |_| None, || &mut *mm);
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
