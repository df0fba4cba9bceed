//! Ids for the objects memd-mm allocates from itself (Linux's IDR): slab
//! caches, whose descriptors come from the cache of caches, and mempools,
//! whose descriptors come from kmalloc.
//!
//! Linux names a cache by its pointer; memd names it by a 16-bit id,
//! because a slab's frame carries its cache's id and a pointer would not fit
//! in 16 bytes a frame. The slots are a table in memory memd-mm allocates
//! from itself: it doubles when every slot is taken, halves back once the
//! ids in use fit in a quarter of it and is freed when none is, so an idle
//! manager holds what it held at boot. The lowest free id is taken first.

use core::alloc::Layout;
use core::ptr::NonNull;

use crate::frame::{FrameState, TABLE_AUX};
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::slab::CacheId;
use crate::{access, MemoryManager, MmError};

/// Slots of the smallest table: a page of pointers.
const IDR_MIN: usize = 512;
/// Ids are 16 bits wide.
pub(crate) const IDR_MAX: usize = 1 << 16;

/// Objects by id.
pub(crate) struct Idr<T: 'static> {
    slots: &'static mut [Option<&'static mut T>],
    /// One past the highest id in use: walks stop there (views and reclaim
    /// run often, and the table is mostly empty).
    end: usize,
}

impl<T> Idr<T> {
    pub(crate) const fn new() -> Self {
        Idr {
            slots: &mut [],
            end: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self, id: usize) -> Option<&T> {
        self.slots.get(id)?.as_deref()
    }

    #[inline(always)]
    pub(crate) fn get_mut(&mut self, id: usize) -> Option<&mut T> {
        self.slots.get_mut(id)?.as_deref_mut()
    }

    /// Slot `id` itself, for `node.rs`, which reaches one entry while
    /// others are in use elsewhere.
    pub(crate) fn slot(&self, id: usize) -> Option<*const Option<&'static mut T>> {
        self.slots.get(id).map(|s| s as *const _)
    }

    /// Slots in the table.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// One past the highest id in use.
    pub(crate) fn end(&self) -> usize {
        self.end
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slots[..self.end]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_deref().map(|t| (i, t)))
    }

    /// Puts `obj` at `id`, a free slot from [`MemoryManager::idr_reserve`].
    pub(crate) fn insert(&mut self, id: usize, obj: &'static mut T) {
        debug_assert!(self.slots[id].is_none());
        self.slots[id] = Some(obj);
        self.end = self.end.max(id + 1);
    }

    /// Takes the object at `id` out; its memory is the caller's to free.
    pub(crate) fn remove(&mut self, id: usize) -> Option<&'static mut T> {
        let obj = self.slots.get_mut(id)?.take();
        if id + 1 == self.end {
            self.end = self.slots[..id]
                .iter()
                .rposition(|s| s.is_some())
                .map_or(0, |i| i + 1);
        }
        obj
    }

    /// Moves every object into `slots` (which has room for each) and
    /// returns the old table.
    fn replace(
        &mut self,
        slots: &'static mut [Option<&'static mut T>],
    ) -> &'static mut [Option<&'static mut T>] {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if let Some(obj) = s.take() {
                slots[i] = Some(obj);
            }
        }
        core::mem::replace(&mut self.slots, slots)
    }
}

/// Which of the manager's id tables an operation is on.
pub(crate) type Pick<T> = fn(&mut MemoryManager) -> &mut Idr<T>;

/// The length a table of `cap` entries, `used` of them in use up to the
/// highest, shrinks to (at least `min`): half or less once the entries in
/// use fit in a quarter of it; `None` while they do not. The id tables and
/// the owner table share this policy.
pub(crate) fn shrunk_len(used: usize, cap: usize, min: usize) -> Option<usize> {
    let want = (used.next_power_of_two() * 2).max(min);
    (want <= cap / 2).then_some(want)
}

impl MemoryManager {
    /// A block of memory for one of the manager's own structures: a large
    /// kmalloc block (kernel memory like any other), marked so that `kfree`,
    /// `ksize` and `bytes_of` refuse it.
    pub(crate) fn table_block(&mut self, layout: Layout) -> Result<NonNull<u8>, MmError> {
        let block = self.kmalloc_large(layout, Gfp::KERNEL)?;
        let pfn = self.dmap.phys(block.as_ptr() as usize) / PAGE_SIZE;
        self.frames[pfn as usize].aux = TABLE_AUX;
        Ok(block)
    }

    /// Gives back a block from [`MemoryManager::table_block`].
    pub(crate) fn table_free_block(&mut self, block: NonNull<u8>) {
        let pfn = self.dmap.phys(block.as_ptr() as usize) / PAGE_SIZE;
        if let Some(f) = self.frames.get_mut(pfn as usize) {
            if f.is(FrameState::Large) && f.aux == TABLE_AUX {
                f.aux = 0;
                let _ = self.kfree(block);
            }
        }
    }

    /// A table of `len` entries in a [`MemoryManager::table_block`].
    pub(crate) fn table_alloc<T>(
        &mut self,
        len: usize,
        init: impl Fn() -> T,
    ) -> Result<&'static mut [T], MmError> {
        let layout = Layout::array::<T>(len).map_err(|_| MmError::NoMemory)?;
        let block = self.table_block(layout)?;
        Ok(access::table(block.as_ptr() as usize, len, init))
    }

    /// Gives back a table from [`MemoryManager::table_alloc`].
    pub(crate) fn table_free<T>(&mut self, table: &'static mut [T]) {
        if table.is_empty() {
            return;
        }
        if let Some(block) = NonNull::new(table.as_mut_ptr() as *mut u8) {
            self.table_free_block(block);
        }
    }

    /// The lowest free id of the table `pick` chooses, doubling the table
    /// when every slot is taken.
    pub(crate) fn idr_reserve<T>(&mut self, pick: Pick<T>) -> Result<usize, MmError> {
        let idr = pick(self);
        if let Some(id) = idr.slots.iter().position(|s| s.is_none()) {
            return Ok(id);
        }
        let cap = idr.capacity();
        if cap >= IDR_MAX {
            return Err(MmError::TableFull);
        }
        let slots = self.table_alloc((cap * 2).clamp(IDR_MIN, IDR_MAX), || None)?;
        let old = pick(self).replace(slots);
        self.table_free(old);
        Ok(cap)
    }

    /// Halves the table `pick` chooses (more than once if need be) while
    /// the ids in use fit in a quarter of it, and frees it when none is.
    /// Best effort: without memory for the smaller table, the larger stays.
    pub(crate) fn idr_shrink<T>(&mut self, pick: Pick<T>) {
        let idr = pick(self);
        let cap = idr.capacity();
        let used = idr.end;
        if used == 0 {
            let old = idr.replace(&mut []);
            self.table_free(old);
            return;
        }
        let Some(want) = shrunk_len(used, cap, IDR_MIN) else {
            return;
        };
        let Ok(slots) = self.table_alloc(want, || None) else {
            return;
        };
        let old = pick(self).replace(slots);
        self.table_free(old);
    }

    /// Puts `value` in an object of memd-mm's own cache `cache` and gives it
    /// the lowest free id of the table `pick` chooses (a descriptor: a
    /// cache's, a mempool's). Without memory for the object, the table is
    /// shrunk back from any growth made for the id.
    pub(crate) fn idr_alloc_object<T>(
        &mut self,
        pick: Pick<T>,
        cache: CacheId,
        value: T,
    ) -> Result<usize, MmError> {
        let id = self.idr_reserve(pick)?;
        let obj = match self.slab_alloc(cache, Gfp::KERNEL) {
            Ok(obj) => obj,
            Err(e) => {
                self.idr_shrink(pick);
                return Err(e);
            }
        };
        pick(self).insert(id, access::object(obj.as_ptr() as usize, value));
        Ok(id)
    }

    /// Takes the object at `id` out of the table `pick` chooses and gives
    /// its memory back to `cache`, the one [`MemoryManager::idr_alloc_object`]
    /// took it from.
    pub(crate) fn idr_free_object<T>(&mut self, pick: Pick<T>, cache: CacheId, id: usize) {
        let Some(obj) = pick(self).remove(id) else {
            return;
        };
        let _ = self.slab_free(cache, NonNull::from(obj).cast::<u8>());
        self.idr_shrink(pick);
    }
}
