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

use crate::gfp::Gfp;
use crate::{access, MemoryManager, MmError};

/// Slots of the smallest table: a page of pointers.
const IDR_MIN: usize = 512;
/// Ids are 16 bits wide.
pub(crate) const IDR_MAX: usize = 1 << 16;

/// Objects by id.
pub(crate) struct Idr<T: 'static> {
    slots: &'static mut [Option<&'static mut T>],
}

impl<T> Idr<T> {
    pub(crate) const fn new() -> Self {
        Idr { slots: &mut [] }
    }

    #[inline(always)]
    pub(crate) fn get(&self, id: usize) -> Option<&T> {
        self.slots.get(id)?.as_deref()
    }

    #[inline(always)]
    pub(crate) fn get_mut(&mut self, id: usize) -> Option<&mut T> {
        self.slots.get_mut(id)?.as_deref_mut()
    }

    /// Slots in the table.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_deref().map(|t| (i, t)))
    }

    /// Puts `obj` at `id`, a free slot from [`MemoryManager::idr_reserve`].
    pub(crate) fn insert(&mut self, id: usize, obj: &'static mut T) {
        debug_assert!(self.slots[id].is_none());
        self.slots[id] = Some(obj);
    }

    /// Takes the object at `id` out; its memory is the caller's to free.
    pub(crate) fn remove(&mut self, id: usize) -> Option<&'static mut T> {
        self.slots.get_mut(id)?.take()
    }

    /// One past the highest id in use.
    fn used_end(&self) -> usize {
        self.slots
            .iter()
            .rposition(|s| s.is_some())
            .map_or(0, |i| i + 1)
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

impl MemoryManager {
    /// A table of `len` entries in memory from the manager itself (a
    /// kmalloc'd block, counted as kernel memory like any other).
    pub(crate) fn table_alloc<T>(
        &mut self,
        len: usize,
        init: impl Fn() -> T,
    ) -> Result<&'static mut [T], MmError> {
        let layout = Layout::array::<T>(len).map_err(|_| MmError::NoMemory)?;
        let block = self.kmalloc_large(layout, Gfp::KERNEL)?;
        Ok(access::table(block.as_ptr() as usize, len, init))
    }

    /// Gives back a table from [`MemoryManager::table_alloc`].
    pub(crate) fn table_free<T>(&mut self, table: &'static mut [T]) {
        if let Some(block) = core::ptr::NonNull::new(table.as_mut_ptr() as *mut u8) {
            if !table.is_empty() {
                let _ = self.kfree(block);
            }
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
        let used = idr.used_end();
        if used == 0 {
            let old = idr.replace(&mut []);
            self.table_free(old);
            return;
        }
        let want = (used.next_power_of_two() * 2).max(IDR_MIN);
        if want > cap / 2 {
            return;
        }
        let Ok(slots) = self.table_alloc(want, || None) else {
            return;
        };
        let old = pick(self).replace(slots);
        self.table_free(old);
    }
}
