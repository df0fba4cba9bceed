//! The frame table: one [`Frame`] (Linux's `struct page`) per 4 KiB frame.
//!
//! Linux pays 64 bytes a frame; memd pays 16. Links are frame numbers, not
//! pointers, so the same table works at any direct-map address and halves
//! the link size. A frame's meaning depends on its [`FrameState`]; only the
//! first frame of a block (its head) carries state, the rest read `None`
//! (or `SlabTail`, pointing back at the head).

/// Frame number used as "no frame" in links.
pub const NIL: u32 = u32::MAX;

/// What a frame currently is. Stored in the low four bits of `Frame::flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameState {
    /// Not a block head: unmanaged, reserved, or inside a larger block.
    None = 0,
    /// Head of a free block on a buddy free list.
    Buddy = 1,
    /// A free order-0 frame held on the zone's per-CPU list.
    Pcp = 2,
    /// Head of a block handed out by `alloc_pages`.
    Allocated = 3,
    /// Head of a slab; `owner` is the cache, `count` the objects in use,
    /// `aux` the first free object.
    Slab = 4,
    /// A non-head frame of a multi-page slab; `next` is the head.
    SlabTail = 5,
    /// Head of a kmalloc allocation too large for the size classes.
    Large = 6,
    /// Reserved at boot (kernel image, frame table, CMA region).
    Reserved = 7,
    /// Head of a block held in a mempool's reserve.
    Pool = 8,
    /// A page of a vmalloc area (order 0). The area's first page has
    /// `count` 1 and holds the address of the area's record in its links.
    Vmalloc = 9,
    /// Head of a free block taken off the free lists while a device is
    /// told about it (free page reporting, `page_reporting.rs`).
    Isolated = 10,
}

impl FrameState {
    fn from_bits(bits: u8) -> Self {
        match bits & 0xf {
            1 => Self::Buddy,
            2 => Self::Pcp,
            3 => Self::Allocated,
            4 => Self::Slab,
            5 => Self::SlabTail,
            6 => Self::Large,
            7 => Self::Reserved,
            8 => Self::Pool,
            9 => Self::Vmalloc,
            10 => Self::Isolated,
            _ => Self::None,
        }
    }
}

/// `Frame::aux` of a `Large` block that holds one of memd-mm's own tables
/// (`idr.rs`): `kfree`, `ksize` and `bytes_of` refuse it.
pub(crate) const TABLE_AUX: u16 = 1;

/// `Frame::flags` bit of a free block reported to the host.
const REPORTED: u8 = 0x40;
/// `Frame::flags` bit of an allocated block whose bytes are lent out
/// (`dma_lend`): `free_pages` refuses it.
const LENT: u8 = 0x80;

/// One frame descriptor. 16 bytes, checked at compile time below.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
pub struct Frame {
    /// Free-list / slab-list link, or the head frame for `SlabTail`.
    pub next: u32,
    pub prev: u32,
    /// Reference count for pages, objects in use for slabs.
    pub count: u16,
    /// Owner tag for pages (who allocated it), cache id for slabs.
    pub owner: u16,
    /// State (bits 0-3), zone (bits 4-5), on a free block's head whether
    /// the host was told it is free (bit 6, Linux's `PageReported`), on an
    /// allocated block's head whether its bytes are lent out (bit 7).
    flags: u8,
    /// Block order for heads.
    pub order: u8,
    /// Slab: index of the first free object (`u16::MAX` when full).
    pub aux: u16,
}

const _: () = assert!(core::mem::size_of::<Frame>() == 16);

/// Bytes of frame table per 4 KiB frame, for the statistics and benchmarks.
pub const FRAME_DESCRIPTOR_BYTES: usize = core::mem::size_of::<Frame>();

impl Frame {
    pub const EMPTY: Frame = Frame {
        next: NIL,
        prev: NIL,
        count: 0,
        owner: 0,
        flags: 0,
        order: 0,
        aux: 0,
    };

    #[inline(always)]
    pub fn state(&self) -> FrameState {
        FrameState::from_bits(self.flags)
    }

    #[inline(always)]
    pub fn is(&self, state: FrameState) -> bool {
        self.flags & 0xf == state as u8
    }

    /// The index of the zone this frame belongs to (`Frame::zone`, in
    /// zone.rs, gives it its type).
    #[inline(always)]
    pub(crate) fn zone_index(&self) -> usize {
        ((self.flags >> 4) & 3) as usize
    }

    /// Makes this frame the head of a block in zone `zone_index`.
    #[inline(always)]
    pub(crate) fn set_head(&mut self, state: FrameState, zone_index: u8, order: u32) {
        self.flags = state as u8 | (zone_index << 4);
        self.order = order as u8;
    }

    #[inline(always)]
    pub fn set_state(&mut self, state: FrameState) {
        self.flags = (self.flags & 0xf0) | state as u8;
    }

    /// Whether this free block's memory was reported to the host (and so
    /// may have been discarded by it). Any `set` clears it: a block that is
    /// split, merged or allocated is no longer the block reported.
    #[inline(always)]
    pub(crate) fn reported(&self) -> bool {
        self.flags & REPORTED != 0
    }

    pub(crate) fn mark_reported(&mut self) {
        self.flags |= REPORTED;
    }

    /// Whether this allocated block's bytes are lent out.
    #[inline(always)]
    pub(crate) fn lent(&self) -> bool {
        self.flags & LENT != 0
    }

    #[inline(always)]
    pub(crate) fn set_lent(&mut self, lent: bool) {
        match lent {
            true => self.flags |= LENT,
            false => self.flags &= !LENT,
        }
    }

    /// Returns the frame to "not a head".
    #[inline(always)]
    pub fn clear(&mut self) {
        *self = Frame::EMPTY;
    }
}
