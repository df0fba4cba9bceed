//! The DMA API: zeroed, physically contiguous buffers a device can reach.
//!
//! `dma_alloc(len, align, mask)` serves from the buddy when the request fits
//! one block (a block of order k is naturally aligned to its size) in a zone
//! below the device's mask, and from the CMA region when it is larger or the
//! buddy cannot serve it. The buffer carries both addresses: the physical
//! one for the device, the direct-map one for the CPU.

use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::zone::{ZoneType, DMA32_LIMIT, DMA_LIMIT};
use crate::{access, DirectMap, MemoryManager, MmError};

/// A device's addressing limit (`dma_set_mask`): the address a DMA buffer
/// must sit under. Shared with the protocol (memd-wire re-exports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum DmaMask {
    /// Below 16 MiB (ISA-style devices).
    Bits24,
    /// Below 4 GiB.
    Bits32,
    /// Anywhere.
    Bits64,
}

impl DmaMask {
    /// The mask for a width of 24, 32 or 64 bits.
    pub const fn from_bits(bits: u32) -> Option<DmaMask> {
        match bits {
            24 => Some(DmaMask::Bits24),
            32 => Some(DmaMask::Bits32),
            64 => Some(DmaMask::Bits64),
            _ => None,
        }
    }

    /// The mask width in bits.
    pub const fn bits(self) -> u32 {
        match self {
            DmaMask::Bits24 => 24,
            DmaMask::Bits32 => 32,
            DmaMask::Bits64 => 64,
        }
    }

    /// One past the highest address the device reaches.
    pub const fn limit(self) -> u64 {
        match self {
            DmaMask::Bits24 => DMA_LIMIT,
            DmaMask::Bits32 => DMA32_LIMIT,
            DmaMask::Bits64 => u64::MAX,
        }
    }

    /// The flags a buddy block for this mask is asked with, from
    /// ZONE_MOVABLE too when `movable`.
    pub(crate) fn gfp(self, movable: bool) -> Gfp {
        let zones = match self {
            DmaMask::Bits24 => Gfp::DMA,
            DmaMask::Bits32 => Gfp::DMA32,
            DmaMask::Bits64 => Gfp::NOWAIT,
        };
        let gfp = zones.union(Gfp::KERNEL).union(Gfp::NOWARN);
        match movable {
            true => gfp.union(Gfp::MOVABLE),
            false => gfp,
        }
    }
}

/// Where a DMA buffer came from. Shared with the protocol (memd-wire
/// re-exports it); the buddy block's order is [`DmaBuffer::order`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum DmaSource {
    /// The buddy allocator: one block, when the request fits an order.
    Buddy,
    /// The contiguous-memory region (`memd.dma_reserve=`).
    Cma,
}

/// A DMA buffer: where the device sees it and where the CPU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaBuffer {
    /// Physical address, for the device.
    pub phys: u64,
    /// Direct-map address, for the CPU.
    pub virt: usize,
    /// Bytes asked for.
    pub len: usize,
    /// Where it came from.
    pub source: DmaSource,
    /// The order of the buddy block a [`DmaSource::Buddy`] buffer is (it
    /// is freed as that block); 0 for a [`DmaSource::Cma`] buffer.
    pub order: u32,
}

/// What a DMA buffer must be, for `GlobalMm::dma_alloc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRequest {
    /// Bytes.
    pub len: usize,
    /// A power of two.
    pub align: usize,
    /// The device's addressing limit.
    pub mask: DmaMask,
    /// From ZONE_MOVABLE too ([`MemoryManager::dma_alloc_zeroed`]).
    pub movable: bool,
    /// Zeroed before it is returned; else the caller zeroes it before
    /// anyone sees it.
    pub zeroed: bool,
}

/// Bytes of a DMA buffer lent out by [`MemoryManager::dma_lend`], for work
/// on another CPU: until [`MemoryManager::dma_unlend`] takes them back, the
/// manager refuses the buffer's bytes to anyone else and refuses to free
/// it. Dropping this instead leaves the buffer lent for good.
#[derive(Debug)]
pub struct DmaLent {
    bytes: access::Lent,
    phys: u64,
    /// The manager that lent them.
    from: usize,
}

impl core::ops::Deref for DmaLent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes.bytes()
    }
}

impl core::ops::DerefMut for DmaLent {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes.bytes_mut()
    }
}

/// Buffers lent at once at most (one per CPU that works on one).
pub const MAX_LENT: usize = 8;

impl DmaBuffer {
    /// The buffer a buddy block of `order` at frame `pfn` makes.
    pub(crate) fn buddy(dmap: DirectMap, pfn: u32, len: usize, order: u32) -> DmaBuffer {
        let phys = pfn as u64 * PAGE_SIZE;
        DmaBuffer {
            phys,
            virt: dmap.virt(phys),
            len,
            source: DmaSource::Buddy,
            order,
        }
    }

    /// The buffer a range of the contiguous region at `phys` makes.
    pub(crate) fn cma(dmap: DirectMap, phys: u64, len: usize) -> DmaBuffer {
        DmaBuffer {
            phys,
            virt: dmap.virt(phys),
            len,
            source: DmaSource::Cma,
            order: 0,
        }
    }

    pub fn zone(&self) -> ZoneType {
        ZoneType::of_pfn(self.phys / PAGE_SIZE)
    }

    /// Bytes the buffer takes: its whole block from the buddy, its pages
    /// from the reservation.
    pub fn span(&self) -> usize {
        match self.source {
            DmaSource::Buddy => (PAGE_SIZE as usize) << self.order,
            DmaSource::Cma => self.len.next_multiple_of(PAGE_SIZE as usize),
        }
    }
}

impl MemoryManager {
    /// Allocates a zeroed DMA buffer of `len` bytes aligned to `align` (a
    /// power of two) that lies entirely below `mask`.
    pub fn dma_alloc(
        &mut self,
        len: usize,
        align: usize,
        mask: DmaMask,
    ) -> Result<DmaBuffer, MmError> {
        self.dma_alloc_zeroed(len, align, mask, false)
    }

    /// As [`MemoryManager::dma_alloc`], from ZONE_MOVABLE too when
    /// `movable` (memory plugged at run time, which is unplugged once
    /// free: a buffer a client holds for a while, not a device ring).
    pub fn dma_alloc_zeroed(
        &mut self,
        len: usize,
        align: usize,
        mask: DmaMask,
        movable: bool,
    ) -> Result<DmaBuffer, MmError> {
        let buf = self.dma_alloc_unzeroed(len, align, mask, movable)?;
        access::fill(buf.virt, buf.span(), 0);
        Ok(buf)
    }

    /// As [`MemoryManager::dma_alloc`], but the bytes are left as the last
    /// user left them: for a caller that zeroes the buffer itself, a piece
    /// at a time, before anyone sees it.
    pub fn dma_alloc_unzeroed(
        &mut self,
        len: usize,
        align: usize,
        mask: DmaMask,
        movable: bool,
    ) -> Result<DmaBuffer, MmError> {
        let order = dma_order(len, align)?;
        if order < self.max_order {
            if let Ok(pfn) = self.alloc_frames(order, mask.gfp(movable)) {
                let zone = self.frames[pfn as usize].zone();
                self.stamp_allocated(pfn, zone, order);
                self.counters.dma_buddy_pages += 1 << order;
                self.counters.dma_buffers += 1;
                return Ok(DmaBuffer::buddy(self.dmap, pfn, len, order));
            }
        }
        if self.cma.is_none() {
            return Err(if order < self.max_order {
                MmError::NoMemory
            } else {
                MmError::Invalid("dma: larger than a buddy block and no memd.dma_reserve region")
            });
        }
        // A full extent table doubles for this buffer, and goes back to
        // its size if the buffer cannot be had after all.
        let before = self.cma.as_ref().map_or(0, |c| c.capacity());
        if let Some(want) = self.cma.as_ref().and_then(|c| c.table_to_grow()) {
            self.cma_table_set(want);
        }
        let cma = self.cma.as_mut().ok_or(MmError::NoMemory)?;
        let phys = cma.alloc(len as u64, align as u64, mask.limit());
        if phys.is_none() && cma.capacity() != before {
            self.cma_table_set(before);
        }
        let phys = phys.ok_or(MmError::NoMemory)?;
        self.counters.dma_buffers += 1;
        Ok(DmaBuffer::cma(self.dmap, phys, len))
    }

    /// Frees a buffer from [`MemoryManager::dma_alloc`].
    pub fn dma_free(&mut self, buf: &DmaBuffer) -> Result<(), MmError> {
        self.not_lent(buf)?;
        match buf.source {
            DmaSource::Buddy => {
                self.free_pages(buf.phys, buf.order)?;
                self.counters.dma_buddy_pages -= 1 << buf.order;
            }
            DmaSource::Cma => {
                let cma = self
                    .cma
                    .as_mut()
                    .ok_or(MmError::Invalid("dma: no CMA region"))?;
                cma.free(buf.phys)
                    .ok_or(MmError::Invalid("dma: not a CMA buffer"))?;
                if let Some(want) = cma.table_to_shrink() {
                    self.cma_table_set(want);
                }
            }
        }
        self.counters.dma_buffers -= 1;
        Ok(())
    }

    pub fn cma(&self) -> Option<&crate::Cma> {
        self.cma.as_ref()
    }

    /// Gives the contiguous region's extent table room for `want` buffers
    /// (best effort: without memory for a larger table, the region is
    /// full).
    pub(crate) fn cma_table_set(&mut self, want: usize) {
        let Ok(table) = self.table_alloc(want, crate::Extent::default) else {
            return;
        };
        if let Some(cma) = self.cma.as_mut() {
            let old = cma.replace_table(table);
            self.table_free(old);
        } else {
            self.table_free(table);
        }
    }

    /// Borrows a DMA buffer's bytes for the CPU. A stale or made-up
    /// `DmaBuffer`, or one whose bytes are lent out, is refused rather
    /// than aliasing someone else's memory (`bytes_of` checks).
    pub fn dma_bytes(&mut self, buf: &DmaBuffer) -> Result<&mut [u8], MmError> {
        if buf.virt != self.dmap.virt(buf.phys) {
            return Err(MmError::Invalid("dma: not a live buffer"));
        }
        self.bytes_of(buf.virt, buf.len)
    }

    /// Lends `buf`'s bytes (its length, or with `span` all it takes, as
    /// [`MemoryManager::dma_span_bytes`]) out for work on another CPU.
    pub fn dma_lend(&mut self, buf: &DmaBuffer, span: bool) -> Result<DmaLent, MmError> {
        let len = if span { buf.span() } else { buf.len };
        let virt = self.dma_span_bytes(buf)?[..len].as_ptr() as usize;
        if self.dma_lent.is_empty() {
            self.dma_lent = self.table_alloc(MAX_LENT, || (0, 0))?;
        }
        let slot = self
            .dma_lent
            .iter_mut()
            .find(|s| s.1 == 0)
            .ok_or(MmError::Invalid(
                "dma: as many buffers lent as there can be",
            ))?;
        // The whole span is kept from everyone else, whatever was lent; a
        // buddy block's head says so to `free_pages`.
        *slot = (buf.phys, buf.phys + buf.span() as u64);
        self.mark_lent(buf);
        Ok(DmaLent {
            bytes: access::Lent::new(virt, len),
            phys: buf.phys,
            from: self as *const Self as usize,
        })
    }

    /// Takes lent bytes back: the buffer is the manager's to hand out and
    /// free again.
    ///
    /// # Panics
    /// When `lent` came from another manager.
    pub fn dma_unlend(&mut self, lent: DmaLent) {
        assert_eq!(
            lent.from, self as *const Self as usize,
            "bytes another manager lent"
        );
        let Some(slot) = self
            .dma_lent
            .iter_mut()
            .find(|s| s.1 != 0 && s.0 == lent.phys)
        else {
            return;
        };
        *slot = (0, 0);
        if let Some(f) = self.frames.get_mut((lent.phys / PAGE_SIZE) as usize) {
            f.set_lent(false);
        }
        if self.dma_lent.iter().all(|s| s.1 == 0) {
            let table = core::mem::take(&mut self.dma_lent);
            self.table_free(table);
        }
    }

    /// Marks the head frame of buddy buffer `buf` lent, for `free_pages`.
    fn mark_lent(&mut self, buf: &DmaBuffer) {
        if buf.source == DmaSource::Buddy {
            if let Some(f) = self.frames.get_mut((buf.phys / PAGE_SIZE) as usize) {
                f.set_lent(true);
            }
        }
    }

    /// Whether any of the physical range `[start, end)` is lent out (the
    /// table is empty unless something is).
    #[inline(always)]
    pub(crate) fn lent_overlaps(&self, start: u64, end: u64) -> bool {
        lent_overlaps(self.dma_lent, start, end)
    }

    /// Whether anything is lent out now.
    pub fn dma_lending(&self) -> bool {
        !self.dma_lent.is_empty()
    }

    /// Refuses a buffer whose bytes are lent out.
    fn not_lent(&self, buf: &DmaBuffer) -> Result<(), MmError> {
        not_lent(self.dma_lent, buf)
    }

    /// All the bytes `buf` takes ([`DmaBuffer::span`]), its length and the
    /// rest of its block or pages: what zeroing it must cover.
    pub fn dma_span_bytes(&mut self, buf: &DmaBuffer) -> Result<&mut [u8], MmError> {
        if buf.virt != self.dmap.virt(buf.phys) {
            return Err(MmError::Invalid("dma: not a live buffer"));
        }
        self.bytes_of(buf.virt, buf.span())
    }
}

/// The buddy order a request of `len` bytes aligned to `align` takes (a
/// block of order k is aligned to its size), once its shape is checked.
pub(crate) fn dma_order(len: usize, align: usize) -> Result<u32, MmError> {
    if len == 0 || !align.is_power_of_two() {
        return Err(MmError::Invalid(
            "dma: length must be non-zero and alignment a power of two",
        ));
    }
    let pages = (len as u64).max(align as u64).div_ceil(PAGE_SIZE);
    Ok(pages.next_power_of_two().trailing_zeros())
}

/// Whether any of the physical range `[start, end)` is in the lent table.
#[inline(always)]
fn lent_overlaps(lent: &[(u64, u64)], start: u64, end: u64) -> bool {
    lent.iter().any(|&(s, e)| start < e && s < end)
}

/// Refuses a buffer whose bytes are in the lent table.
pub(crate) fn not_lent(lent: &[(u64, u64)], buf: &DmaBuffer) -> Result<(), MmError> {
    match lent_overlaps(lent, buf.phys, buf.phys + buf.span() as u64) {
        true => Err(MmError::Invalid(
            "dma: the buffer's bytes are lent to another CPU",
        )),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_round_trip() {
        for m in [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64] {
            assert_eq!(DmaMask::from_bits(m.bits()), Some(m));
        }
        assert_eq!(DmaMask::from_bits(31), None);
        assert_eq!(DmaMask::Bits32.limit(), DMA32_LIMIT);
    }

    #[test]
    fn lent_bytes_are_refused_to_everyone_else_until_they_come_back() {
        let mut mm = crate::arena::HostMm::boot(&[(1 << 20, 64 << 20)], "").unwrap();
        let buf = mm.dma_alloc(256 << 10, 4096, DmaMask::Bits64).unwrap();
        let free = mm.meminfo().free;
        let mut lent = mm.dma_lend(&buf, false).unwrap();
        assert_eq!(lent.len(), 256 << 10);
        assert!(mm.dma_bytes(&buf).is_err(), "its bytes are lent");
        assert!(mm.dma_span_bytes(&buf).is_err());
        assert!(mm.dma_lend(&buf, true).is_err(), "lent once");
        assert!(mm.dma_free(&buf).is_err(), "not freed while lent");
        // Another CPU would do this.
        let t = std::thread::spawn(move || {
            lent.fill(0xa5);
            lent
        });
        let lent = t.join().unwrap();
        mm.dma_unlend(lent);
        assert!(mm.dma_bytes(&buf).unwrap().iter().all(|&b| b == 0xa5));
        // Every other way to the bytes or the block is refused while lent.
        let lent = mm.dma_lend(&buf, true).unwrap();
        assert!(
            mm.bytes_of(buf.virt + 4096, 16).is_err(),
            "bytes_of inside it"
        );
        let inside = DmaBuffer {
            phys: buf.phys + 4096,
            virt: buf.virt + 4096,
            len: 4096,
            ..buf
        };
        assert!(mm.dma_bytes(&inside).is_err(), "a made-up buffer inside it");
        assert!(mm.free_pages(buf.phys, buf.order).is_err(), "its block");
        mm.dma_unlend(lent);
        assert_eq!(
            mm.meminfo().free,
            free,
            "the lent table goes with the last lent buffer"
        );
        mm.dma_free(&buf).unwrap();
        mm.check().unwrap();
    }
}
