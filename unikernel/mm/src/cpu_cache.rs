//! Per-CPU arrays of free kmalloc objects in front of the manager's lock
//! (Linux SLAB's `kmem_cache->cpu_cache`, SLUB's `kmem_cache_cpu`).
//!
//! [`crate::GlobalMm`] keeps one [`CpuArrays`] per CPU. A CPU allocates
//! from and frees to its own arrays without taking the manager's lock;
//! only when an array runs empty or full does it move [`CPU_BATCH`]
//! objects from or to the kmalloc caches, under the lock. Objects in these
//! arrays are allocated as far as the manager is concerned (its checker,
//! its statistics): they are the CPU's, as in Linux, until
//! [`CpuArrays::flush_all`] gives them back.

use crate::gfp::Gfp;
use crate::kmalloc::NR_KMALLOC;
use crate::MemoryManager;

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

    /// Gives the [`CPU_BATCH`] oldest objects of the full array of `class`
    /// back to the caches.
    pub(crate) fn flush(&mut self, class: usize, mm: &mut MemoryManager) {
        let n = self.avail[class] as usize;
        let count = CPU_BATCH.min(n);
        mm.kfree_bulk(class, &self.entry[class][..count]);
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
}
