//! kmalloc: general-purpose allocation on size-class slab caches.
//!
//! Linux's classes from 8 to 8192 bytes (with the odd 96 and 192 that fit
//! common structures); anything larger, or aligned beyond a page, comes
//! straight from the buddy allocator as a `Large` block.

use crate::frame::{FrameState, TABLE_AUX};
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::pageblock::Held;
use crate::slab::{self, CacheId};
use crate::{MemoryManager, MmError};
use core::alloc::Layout;
use core::ptr::NonNull;

/// Object sizes of the kmalloc caches; the cache id is the index.
pub const KMALLOC_SIZES: [usize; 13] = [
    8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192,
];
pub const NR_KMALLOC: usize = KMALLOC_SIZES.len();
pub const KMALLOC_MAX_CACHE_SIZE: usize = 8192;
const KMALLOC_NAMES: [&str; NR_KMALLOC] = [
    "kmalloc-8",
    "kmalloc-16",
    "kmalloc-32",
    "kmalloc-64",
    "kmalloc-96",
    "kmalloc-128",
    "kmalloc-192",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1k",
    "kmalloc-2k",
    "kmalloc-4k",
    "kmalloc-8k",
];

/// Linux's `size_index`: class for sizes 1..=192 by `(size - 1) / 8`.
const SIZE_INDEX: [u8; 24] = [
    0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6,
];

/// The size class for `size` bytes with `align` alignment, if any.
/// Power-of-two classes are naturally aligned (slabs are page aligned and
/// the stride equals the size); 96 and 192 are only 32- and 64-aligned.
#[inline(always)]
pub fn size_class(size: usize, align: usize) -> Option<usize> {
    if align > 8 {
        return aligned_class(size, align);
    }
    if size > KMALLOC_MAX_CACHE_SIZE {
        return None;
    }
    // Both answers, then a select: whether a size is at most 192 is a coin
    // toss for a mixed workload, and a mispredicted branch costs more than
    // the table read and the bit scan together.
    let by_table = SIZE_INDEX[(size.saturating_sub(1) / 8).min(SIZE_INDEX.len() - 1)] as usize;
    let by_log = (usize::BITS - size.saturating_sub(1).leading_zeros()) as usize;
    Some(core::hint::select_unpredictable(
        size <= 192,
        by_table,
        by_log.saturating_sub(1),
    ))
}

/// [`size_class`] for alignments beyond 8 bytes: the smallest class at
/// least as large as both, the odd classes only where they are aligned
/// enough.
fn aligned_class(size: usize, align: usize) -> Option<usize> {
    if align > PAGE_SIZE as usize {
        return None;
    }
    let size = size.max(align);
    if size > KMALLOC_MAX_CACHE_SIZE {
        return None;
    }
    if size <= 192 {
        let class = SIZE_INDEX[(size - 1) / 8] as usize;
        let bytes = KMALLOC_SIZES[class];
        if bytes & bytes.wrapping_neg() >= align {
            return Some(class);
        }
    }
    // Classes 8,16,32,64 are 0..=3; 128 is 5; 256.. are 7..
    let log = usize::BITS - (size - 1).leading_zeros();
    Some(match log {
        0..=3 => 0,
        4..=6 => log as usize - 3,
        7 => 5,
        _ => log as usize - 1,
    })
}

/// `kmalloc_size_roundup`: what [`MemoryManager::ksize`] will say of a
/// `kmalloc(size)`, known without allocating (0 for sizes no buddy block
/// holds).
pub fn kmalloc_size_roundup(size: usize) -> usize {
    match size_class(size.max(1), 8) {
        Some(class) => KMALLOC_SIZES[class],
        None => {
            let pages = size.div_ceil(PAGE_SIZE as usize);
            pages
                .checked_next_power_of_two()
                .and_then(|p| p.checked_mul(PAGE_SIZE as usize))
                .unwrap_or(0)
        }
    }
}

impl MemoryManager {
    pub(crate) fn create_kmalloc_caches(&mut self) -> Result<(), MmError> {
        for (i, (&size, name)) in KMALLOC_SIZES.iter().zip(KMALLOC_NAMES).enumerate() {
            let layout = Layout::from_size_align(size, 8)
                .map_err(|_| MmError::Invalid("built-in cache layout"))?;
            let cache = self.builtin_cache(name, layout)?;
            if self.cache_register(cache)? != CacheId(i as u16) {
                return Err(MmError::Invalid("kmalloc caches must take the first ids"));
            }
        }
        Ok(())
    }

    /// `kmalloc`: `size` bytes, 8-byte aligned (naturally aligned for
    /// power-of-two sizes).
    #[inline]
    pub fn kmalloc(&mut self, size: usize, gfp: Gfp) -> Result<NonNull<u8>, MmError> {
        let layout = Layout::from_size_align(size.max(1), 8)
            .map_err(|_| MmError::Invalid("size too large"))?;
        self.kmalloc_layout(layout, gfp)
    }

    /// Allocation for an arbitrary layout: a size class when one fits,
    /// otherwise a buddy block (naturally aligned to its size).
    #[inline(always)]
    pub fn kmalloc_layout(&mut self, layout: Layout, gfp: Gfp) -> Result<NonNull<u8>, MmError> {
        match size_class(layout.size(), layout.align()) {
            Some(class) => {
                if !self.fault.armed_slab && !gfp.zero() {
                    if let Some(obj) = self.alloc_from_array(class) {
                        return Ok(obj);
                    }
                }
                self.slab_alloc(CacheId(class as u16), gfp)
            }
            None => self.kmalloc_large(layout, gfp),
        }
    }

    #[cold]
    pub(crate) fn kmalloc_large(
        &mut self,
        layout: Layout,
        gfp: Gfp,
    ) -> Result<NonNull<u8>, MmError> {
        let bytes = layout.size().max(layout.align()) as u64;
        let pages = bytes.div_ceil(PAGE_SIZE);
        let order = pages.next_power_of_two().trailing_zeros();
        if order >= self.max_order {
            return Err(MmError::Invalid(
                "kmalloc: larger than the largest buddy block",
            ));
        }
        let pfn = self.alloc_frames(order, gfp.without(Gfp::MOVABLE))?;
        let f = &mut self.frames[pfn as usize];
        f.set_state(FrameState::Large);
        f.count = 1;
        f.aux = 0;
        self.counters.large_pages += 1 << order;
        self.pageblocks.add(pfn, Held::Large, 1 << order);
        let virt = self.dmap.virt(pfn as u64 * PAGE_SIZE);
        Ok(NonNull::new(virt as *mut u8).expect("direct map maps frame at 0"))
    }

    /// `kfree`: finds the owner through the frame table, like Linux's
    /// `virt_to_slab`. Pointers memd did not hand out are refused.
    pub fn kfree(&mut self, ptr: NonNull<u8>) -> Result<(), MmError> {
        let virt = ptr.as_ptr() as usize;
        let pfn = (self.dmap.phys(virt) / PAGE_SIZE) as usize;
        let Some(f) = self.frames.get(pfn) else {
            return Err(MmError::Invalid("kfree: not a kmalloc pointer"));
        };
        match f.state() {
            FrameState::Large if f.aux == TABLE_AUX => {
                Err(MmError::Invalid("kfree: memd-mm's own table"))
            }
            FrameState::Large if self.dmap.phys(virt).is_multiple_of(PAGE_SIZE) => {
                let order = f.order as u32;
                self.frames[pfn].count = 0;
                self.counters.large_pages -= 1 << order;
                self.pageblocks.sub(pfn as u32, Held::Large, 1 << order);
                self.free_frames(pfn as u32, order);
                Ok(())
            }
            FrameState::Slab | FrameState::SlabTail => {
                let head = slab::slab_head(&self.frames, self.dmap, virt).unwrap_or(pfn as u32);
                let id = self.frames[head as usize].owner;
                if id as usize >= NR_KMALLOC {
                    return Err(MmError::Invalid("kfree: object belongs to a named cache"));
                }
                self.slab_free(CacheId(id), ptr)
            }
            _ => Err(MmError::Invalid("kfree: not a kmalloc pointer")),
        }
    }

    /// Frees what [`MemoryManager::kmalloc_layout`] returned for `layout`.
    /// The class comes from the layout, as `GlobalAlloc::dealloc` allows,
    /// which skips the frame-table lookup on the hot path.
    #[inline(always)]
    pub fn kfree_layout(&mut self, ptr: NonNull<u8>, layout: Layout) {
        match size_class(layout.size(), layout.align()) {
            Some(class) => self.free_to_array(CacheId(class as u16), ptr.as_ptr() as usize),
            None => {
                let _ = self.kfree(ptr);
            }
        }
    }

    /// `ksize`: the usable size of a kmalloc allocation.
    pub fn ksize(&self, ptr: NonNull<u8>) -> Result<usize, MmError> {
        let virt = ptr.as_ptr() as usize;
        let pfn = (self.dmap.phys(virt) / PAGE_SIZE) as usize;
        let f = self
            .frames
            .get(pfn)
            .ok_or(MmError::Invalid("ksize: not a kmalloc pointer"))?;
        match f.state() {
            FrameState::Large if f.aux != TABLE_AUX => Ok((PAGE_SIZE as usize) << f.order),
            FrameState::Slab | FrameState::SlabTail => {
                let head = slab::slab_head(&self.frames, self.dmap, virt).unwrap_or(pfn as u32);
                let cache = self
                    .cache(CacheId(self.frames[head as usize].owner))
                    .ok_or(MmError::Invalid("ksize: not a kmalloc pointer"))?;
                Ok(cache.object_size)
            }
            _ => Err(MmError::Invalid("ksize: not a kmalloc pointer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_fit_and_align() {
        for size in 1..=KMALLOC_MAX_CACHE_SIZE {
            for align in [1, 8, 16, 32, 64, 128, 4096] {
                let c = size_class(size, align).unwrap();
                let class = KMALLOC_SIZES[c];
                assert!(class >= size, "size {size} align {align} -> {class}");
                let natural = if class.is_power_of_two() {
                    class
                } else {
                    class & class.wrapping_neg()
                };
                assert!(
                    natural >= align.min(8) && (align <= 8 || natural % align == 0),
                    "size {size} align {align} -> {class}"
                );
                // The smallest such class: no smaller one holds the size
                // at the alignment.
                let holds = |k: usize| k >= size && (k & k.wrapping_neg()) >= align;
                let smaller_fits = KMALLOC_SIZES[..c].iter().any(|&k| holds(k));
                assert!(!smaller_fits, "size {size} align {align} -> {class}");
            }
        }
        assert_eq!(size_class(8193, 8), None);
        assert_eq!(size_class(8, 8192), None);
        assert_eq!(size_class(96, 8), Some(4));
        assert_eq!(size_class(96, 64), Some(5));
        assert_eq!(size_class(192, 8), Some(6));
        assert_eq!(size_class(193, 8), Some(7));
    }
}
