//! Raw access to managed memory through the direct map.
//!
//! memd-mm denies `unsafe_code`; this module is one of the four places
//! allowed it (the crate documentation lists them) and the only one that
//! reads or writes managed memory: every other module reaches memory
//! through the functions here. Their soundness rests on one contract, made
//! once by the caller of [`crate::MemoryManager::init`]: every usable
//! physical range it hands in is RAM that memd-mm owns exclusively for its
//! lifetime, mapped read-write at `phys + direct_map_offset`.

use crate::frame::Frame;

/// Translation between physical addresses and their direct-map alias.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectMap {
    offset: u64,
}

impl DirectMap {
    pub const fn new(offset: u64) -> Self {
        Self { offset }
    }

    pub const fn offset(&self) -> u64 {
        self.offset
    }

    #[inline(always)]
    pub fn virt(&self, phys: u64) -> usize {
        phys.wrapping_add(self.offset) as usize
    }

    #[inline(always)]
    pub fn phys(&self, virt: usize) -> u64 {
        (virt as u64).wrapping_sub(self.offset)
    }
}

/// Reads the word that links free objects (slab free lists, mempool
/// reserves) at `virt`.
#[inline(always)]
pub(crate) fn read_link(virt: usize) -> u64 {
    // SAFETY: callers pass addresses of free elements inside managed memory
    // (see the module contract); the address is 8-byte aligned because every
    // slab stride and page is.
    unsafe { core::ptr::read(virt as *const u64) }
}

/// Writes a free-list link word at `virt`.
#[inline(always)]
pub(crate) fn write_link(virt: usize, value: u64) {
    // SAFETY: as for `read_link`; the element is free, so nobody else holds a
    // reference to it.
    unsafe { core::ptr::write(virt as *mut u64, value) }
}

/// Fills `len` bytes at `virt` with `byte`.
#[inline]
pub(crate) fn fill(virt: usize, len: usize, byte: u8) {
    // SAFETY: the range lies in managed memory owned by the caller (a fresh
    // or freed allocation), per the module contract.
    unsafe { core::ptr::write_bytes(virt as *mut u8, byte, len) }
}

/// Borrows `len` bytes of managed memory at `virt`.
///
/// Callers only build this for memory they own at that moment (an object
/// being constructed, checked or poisoned) and drop it before the memory
/// changes hands.
#[inline]
#[allow(clippy::mut_from_ref)]
pub(crate) fn bytes_mut<'a>(virt: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: see above and the module contract; `len` bytes at `virt` are
    // inside one allocation of managed memory.
    unsafe { core::slice::from_raw_parts_mut(virt as *mut u8, len) }
}

/// `len` bytes of managed memory at `virt` that one holder reaches at a
/// time, wherever it runs: a DMA buffer's bytes lent out
/// ([`crate::MemoryManager::dma_lend`]), which the manager refuses to
/// hand out or free until they come back.
#[derive(Debug)]
pub(crate) struct Lent {
    virt: usize,
    len: usize,
}

impl Lent {
    /// The manager builds this only for the bytes of a live DMA buffer it
    /// has just marked lent.
    pub(crate) fn new(virt: usize, len: usize) -> Self {
        Lent { virt, len }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the module contract; the bytes are one live allocation's
        // that only this value reaches while it exists (see `new`), and
        // the borrow is tied to it.
        unsafe { core::slice::from_raw_parts(self.virt as *const u8, self.len) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, exclusively through `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.virt as *mut u8, self.len) }
    }
}

/// Borrows `len` bytes of managed memory at `virt`, for code outside
/// memd-mm that keeps a buffer it owns (a driver's DMA ring) and cannot hold
/// the manager while it uses it. Everyone else uses
/// [`crate::MemoryManager::bytes_of`], which checks the range.
///
/// # Safety
/// `[virt, virt + len)` must lie inside one live allocation the caller
/// owns, and no other reference to those bytes may exist while the slice
/// is used.
pub unsafe fn slice_mut<'a>(virt: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { core::slice::from_raw_parts_mut(virt as *mut u8, len) }
}

/// The memory reserved for the frame table, lent out as a prefix that grows
/// as memory is initialised (see `deferred.rs`).
pub(crate) struct FrameTable {
    base: *mut Frame,
    carved: usize,
    /// Frames lent out so far: the one live slice is `base[..lent]`.
    lent: usize,
}

// SAFETY: the table is plain memory owned by the memory manager, which is
// itself moved between threads only behind its lock.
unsafe impl Send for FrameTable {}

impl FrameTable {
    pub(crate) const fn empty() -> Self {
        FrameTable {
            base: core::ptr::null_mut(),
            carved: 0,
            lent: 0,
        }
    }

    /// The table of `carved` frames at `virt`, and its first `len` frames.
    ///
    /// # Safety
    /// `virt` must point to `carved` frames' worth of writable memory,
    /// 16-byte aligned, owned by the memory manager for as long as the
    /// table is used.
    pub(crate) unsafe fn new(
        virt: usize,
        carved: usize,
        len: usize,
    ) -> (Self, &'static mut [Frame]) {
        assert!(len <= carved);
        let table = FrameTable {
            base: virt as *mut Frame,
            carved,
            lent: len,
        };
        // SAFETY: forwarded to the caller; `len <= carved`.
        let prefix = unsafe { core::slice::from_raw_parts_mut(table.base, len) };
        (table, prefix)
    }

    /// Frames the table has room for.
    pub(crate) fn carved(&self) -> usize {
        self.carved
    }

    /// Gives back `prefix`, the slice this table lent last, and lends its
    /// first `len` frames instead. Anything but that slice is refused (a
    /// panic): two live slices of the table can never exist.
    pub(crate) fn grow(
        &mut self,
        prefix: &'static mut [Frame],
        len: usize,
    ) -> &'static mut [Frame] {
        assert!(
            prefix.len() == self.lent
                && (self.lent == 0 || core::ptr::eq(prefix.as_ptr(), self.base))
                && len >= self.lent
                && len <= self.carved
        );
        self.lent = len;
        // SAFETY: `new`'s contract covers `carved` frames from `base`; the
        // only slice lent from them, `prefix` (checked above by its address
        // and length), is consumed here, so the new one aliases nothing.
        unsafe { core::slice::from_raw_parts_mut(self.base, len) }
    }
}

/// Turns the memory reserved for the pageblock counts into a slice.
///
/// # Safety
/// As for [`FrameTable::new`]: `virt` must point to `len` entries' worth of
/// writable memory, aligned, owned by the memory manager for as long as the
/// slice is used.
pub unsafe fn pageblock_table(virt: usize, len: usize) -> &'static mut [crate::pageblock::Counts] {
    // SAFETY: forwarded to the caller.
    unsafe { core::slice::from_raw_parts_mut(virt as *mut crate::pageblock::Counts, len) }
}

/// Turns `len` entries' worth of memory at `virt` into a table, every entry
/// set to `init()` first (memd-mm's own tables: the ids of caches and
/// mempools, the owners' charges).
///
/// Callers pass memory they just allocated for the table from the memory
/// manager (`MemoryManager::table_alloc`), `len` entries' worth, aligned
/// for `T`, and give it back only after dropping the table.
pub(crate) fn table<T>(virt: usize, len: usize, init: impl Fn() -> T) -> &'static mut [T] {
    let base = virt as *mut T;
    for i in 0..len {
        // SAFETY: see above: entry `i < len` is writable, aligned and holds
        // nothing yet, so nothing is dropped.
        unsafe { base.add(i).write(init()) };
    }
    // SAFETY: see above; every entry was just initialised, and the memory is
    // the table's alone until it is given back.
    unsafe { core::slice::from_raw_parts_mut(base, len) }
}

/// Moves `value` into the memory at `virt` and borrows it there: an object
/// memd-mm keeps in memory it allocated from itself (a slab cache's
/// descriptor, a mempool's).
///
/// Callers pass memory they just allocated for the object from the memory
/// manager, aligned for `T`, and free it only after dropping the reference.
pub(crate) fn object<T>(virt: usize, value: T) -> &'static mut T {
    let p = virt as *mut T;
    // SAFETY: see above: the memory is the object's alone and holds no `T`
    // yet, so nothing is dropped by the write.
    unsafe {
        p.write(value);
        &mut *p
    }
}
