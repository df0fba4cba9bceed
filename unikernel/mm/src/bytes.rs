//! Borrowing the bytes of a live allocation, checked against the frame
//! table: the safe way for callers to reach memory memd handed them.
//!
//! A range is accepted only when it lies inside one block or object that
//! is allocated right now: a page block, a large kmalloc block, a mempool
//! page, one slab object, or a CMA buffer; never one of memd-mm's own
//! structures (its tables, cache and mempool descriptors). The borrow is tied to the
//! manager, so it cannot outlive a later free.

use crate::frame::{FrameState, TABLE_AUX};
use crate::memblock::PAGE_SIZE;
use crate::slab::slab_head;
use crate::{access, MemoryManager, MmError};

const NOT_LIVE: MmError = MmError::Invalid("range is not inside one live allocation");

impl MemoryManager {
    /// The bytes `[virt, virt + len)` of a live allocation.
    pub fn bytes_of(&mut self, virt: usize, len: usize) -> Result<&mut [u8], MmError> {
        let (start, end) = self.live_extent(virt).ok_or(NOT_LIVE)?;
        let fits = virt
            .checked_add(len)
            .is_some_and(|e| virt >= start && e <= end);
        if !fits || len == 0 {
            return Err(NOT_LIVE);
        }
        let phys = self.dmap.phys(virt);
        if self.lent_overlaps(phys, phys + len as u64) {
            return Err(MmError::Invalid("the bytes are lent to another CPU"));
        }
        Ok(access::bytes_mut(virt, len))
    }

    /// The direct-map extent of the live allocation containing `virt`.
    fn live_extent(&self, virt: usize) -> Option<(usize, usize)> {
        let phys = self.dmap.phys(virt);
        // The CMA region keeps its own books: its buffers are found there,
        // whether or not its frames are initialised yet (deferred.rs).
        if let Some(cma) = self
            .cma
            .as_ref()
            .filter(|c| phys >= c.base && phys < c.end())
        {
            let e = cma
                .extents()
                .iter()
                .find(|e| phys >= e.start && phys < e.start + e.pages * PAGE_SIZE)?;
            let start = self.dmap.virt(e.start);
            return Some((start, start + (e.pages * PAGE_SIZE) as usize));
        }
        let pfn = (phys / PAGE_SIZE) as usize;
        let f = self.frames.get(pfn)?;
        match f.state() {
            FrameState::Slab | FrameState::SlabTail => {
                let head = slab_head(&self.frames, self.dmap, virt)?;
                let id = crate::CacheId(self.frames[head as usize].owner);
                if crate::slab_common::is_internal(id) {
                    return None;
                }
                let cache = self.cache(id)?;
                let base = self.dmap.virt(head as u64 * PAGE_SIZE);
                let index = (virt - base) / cache.stride;
                if index >= cache.objs_per_slab as usize {
                    return None;
                }
                let obj = base + index * cache.stride;
                Some((obj, obj + cache.object_size))
            }
            FrameState::Reserved => None,
            _ => {
                // A page block: its head is the frame itself or the nearest
                // aligned frame below whose order covers this one.
                (0..self.max_order).find_map(|order| {
                    let head = pfn & !((1usize << order) - 1);
                    let h = &self.frames[head];
                    let live = h.is(FrameState::Allocated)
                        || (h.is(FrameState::Large) && h.aux != TABLE_AUX)
                        || h.is(FrameState::Pool);
                    let covers = head + (1usize << h.order) > pfn;
                    (live && h.order as u32 >= order && covers).then(|| {
                        let start = self.dmap.virt(head as u64 * PAGE_SIZE);
                        (start, start + ((PAGE_SIZE as usize) << h.order))
                    })
                })
            }
        }
    }
}
