//! virtio-drivers' `Hal` on memd-mm: queues and buffers are memd-mm DMA
//! buffers (zeroed, counted in its statistics, really freed), the CPU and the
//! device see the same memory (no IOMMU, no bounce buffers), and MMIO
//! windows are reached through the uncached part of the direct map.

use core::ptr::NonNull;

use memd_mm::{DmaBuffer, DmaMask, DmaRequest, DmaSource, Gfp, MmError, Owner, PAGE_SIZE};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::arch::paging::{self, MapError, DIRECT_MAP_OFFSET};
use crate::ALLOC;

pub struct MemdHal;

/// Device DMA buffers the registry can name; more are still allocated and
/// freed, only not listed (a warning says so).
pub const DEVICE_DMA_SLOTS: usize = 32;

/// A DMA buffer held by a device driver (rings, its own data buffers).
#[derive(Clone, Copy, Debug)]
pub struct DeviceDma {
    /// The device, e.g. "virtio-net".
    pub device: &'static str,
    /// What the buffer is for, e.g. "used ring".
    pub purpose: &'static str,
    pub phys: u64,
    pub len: u64,
    pub cma: bool,
}

/// Every device DMA buffer held now: fixed capacity, so registering and
/// listing never allocate (`Hal::dma_alloc` runs with no heap to spare, and
/// the list is copied out before the service builds its reply). Lock order:
/// never take `ALLOC` while holding this lock.
static DEVICE_DMA: spin::Mutex<[Option<DeviceDma>; DEVICE_DMA_SLOTS]> =
    spin::Mutex::new([None; DEVICE_DMA_SLOTS]);

/// The device whose virtqueues `MemdHal::dma_alloc` is allocating now (set
/// by the driver around virtio-drivers' constructors).
static CURRENT_DEVICE: spin::Mutex<&'static str> = spin::Mutex::new(UNATTRIBUTED);
const UNATTRIBUTED: &str = "virtio (device not named)";

/// Runs `f` (a virtio-drivers constructor) with the virtqueue memory it
/// allocates attributed to `device`.
pub fn with_device<R>(device: &'static str, f: impl FnOnce() -> R) -> R {
    *CURRENT_DEVICE.lock() = device;
    let r = f();
    *CURRENT_DEVICE.lock() = UNATTRIBUTED;
    r
}

/// Lists `buf` as held by `device` for `purpose`.
pub fn register_device_dma(device: &'static str, purpose: &'static str, buf: &DmaBuffer) {
    let entry = DeviceDma {
        device,
        purpose,
        phys: buf.phys,
        len: buf.len as u64,
        cma: matches!(buf.source, DmaSource::Cma),
    };
    let mut reg = DEVICE_DMA.lock();
    match reg.iter_mut().find(|e| e.is_none()) {
        Some(slot) => *slot = Some(entry),
        None => {
            drop(reg);
            log::warn!(
                "device DMA registry full: {device} {purpose} at {:#x} is not listed",
                buf.phys
            );
        }
    }
}

/// Removes the buffer at `phys` from the list.
pub fn unregister_device_dma(phys: u64) {
    let mut reg = DEVICE_DMA.lock();
    if let Some(slot) = reg.iter_mut().find(|e| e.is_some_and(|e| e.phys == phys)) {
        *slot = None;
    }
}

/// A copy of the device DMA buffers held now.
pub fn device_dma() -> [Option<DeviceDma>; DEVICE_DMA_SLOTS] {
    *DEVICE_DMA.lock()
}

/// Maps a device window uncached (page-table frames from memd-mm) and
/// returns its virtual address.
pub fn map_device(phys: u64, len: u64) -> Result<u64, MapError> {
    paging::map_mmio(phys, len, &mut || {
        let mut mm = ALLOC.lock();
        mm.alloc_pages(0, Gfp::KERNEL | Gfp::ZERO).ok()
    })
}

/// Maps hot-plugged RAM write-back into the direct map (2 MiB pages,
/// page-table frames from memd-mm) and returns its virtual address; see
/// [`paging::map_ram`]. Takes memd-mm's lock for table frames: the caller
/// must not hold `ALLOC`.
pub fn map_ram(phys: u64, len: u64) -> Result<u64, MapError> {
    paging::map_ram(phys, len, &mut || {
        let mut mm = ALLOC.lock();
        mm.alloc_pages(0, Gfp::KERNEL | Gfp::ZERO).ok()
    })
}

/// Takes hot-plugged RAM out of the direct map again, giving page tables
/// left empty back to memd-mm; see [`paging::unmap_ram`]. The caller must
/// not hold `ALLOC`.
pub fn unmap_ram(phys: u64, len: u64) -> Result<(), MapError> {
    paging::unmap_ram(phys, len, &mut |table| {
        let _ = ALLOC.lock().free_pages(table, 0);
    })
}

/// Physical address of memory the kernel can name: the direct map, or the
/// kernel image (identity-mapped).
pub fn virt_to_phys(virt: u64) -> u64 {
    if virt >= DIRECT_MAP_OFFSET {
        virt - DIRECT_MAP_OFFSET
    } else {
        virt
    }
}

/// A zeroed, page-aligned DMA buffer of `len` bytes anywhere in memory for
/// a device the kernel drives: under memd-mm's DMA and zone locks
/// (`GlobalMm::dma_alloc`), so CPUs in their batches go on meanwhile.
pub fn dma_alloc(len: usize) -> Result<DmaBuffer, MmError> {
    let req = DmaRequest {
        len,
        align: PAGE_SIZE as usize,
        mask: DmaMask::Bits64,
        movable: false,
        zeroed: true,
    };
    ALLOC.dma_alloc(req, Owner::KERNEL)
}

/// Frees a buffer from [`dma_alloc`].
pub fn dma_free(buf: &DmaBuffer) -> Result<(), MmError> {
    ALLOC.dma_free(buf)
}

/// Rebuilds the `DmaBuffer` that `dma_alloc` returned for these pages.
fn dma_buffer(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> DmaBuffer {
    let mm = ALLOC.lock();
    let in_cma = mm
        .cma_info()
        .is_some_and(|c| paddr >= c.base && paddr < c.base + c.size);
    let (source, order) = if in_cma {
        (DmaSource::Cma, 0)
    } else {
        (DmaSource::Buddy, pages.next_power_of_two().trailing_zeros())
    };
    DmaBuffer {
        phys: paddr,
        virt: vaddr.as_ptr() as usize,
        len: pages * PAGE_SIZE as usize,
        source,
        order,
    }
}

// SAFETY: dma_alloc returns zeroed, page-aligned memory that memd-mm hands
// to nobody else until dma_dealloc frees it; mmio_phys_to_virt returns an
// uncached mapping of the device window; share returns the physical address
// of the buffer, which the device reaches directly (identity DMA).
unsafe impl Hal for MemdHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let buf = dma_alloc(pages * PAGE_SIZE as usize)
            .unwrap_or_else(|e| panic!("virtio: no DMA memory for {pages} pages: {e}"));
        // virtio-drivers allocates only virtqueues through the Hal; the
        // direction tells which part (split rings: a legacy queue is one
        // area, a modern one two).
        let purpose = match direction {
            BufferDirection::DriverToDevice => "virtqueue descriptors + available ring",
            BufferDirection::DeviceToDriver => "virtqueue used ring",
            BufferDirection::Both => "virtqueue (descriptors, available and used rings)",
        };
        let device = *CURRENT_DEVICE.lock();
        register_device_dma(device, purpose, &buf);
        let virt = NonNull::new(buf.virt as *mut u8).expect("DMA buffer at virtual address 0");
        (buf.phys, virt)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let buf = dma_buffer(paddr, vaddr, pages);
        unregister_device_dma(paddr);
        match dma_free(&buf) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("virtio: freeing DMA buffer {paddr:#x}: {e}");
                -1
            }
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let virt = map_device(paddr, size as u64)
            .unwrap_or_else(|e| panic!("virtio: device window {paddr:#x}+{size:#x}: {e:?}"));
        NonNull::new(virt as *mut u8).expect("device window at virtual address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // Buffers are in the direct map (heap, DMA buffers) or in the kernel
        // image; both are physically contiguous.
        virt_to_phys(buffer.as_ptr() as *mut u8 as u64)
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Nothing was copied or mapped for the device in `share`.
    }
}
