//! `GlobalAlloc` over kmalloc, the buddy and vmalloc, behind a spin lock
//! (Linux's `kvmalloc` / `kvfree`).
//!
//! The kernel's `#[global_allocator]` is this; so can a host program's be
//! (see the `arena` module), which is how memd-mm is benchmarked against
//! other allocators with ordinary Rust code. Only a manager built with
//! [`GlobalMm::with_vmalloc`] has vmalloc; without it (the host) large
//! requests are buddy blocks.

use crate::gfp::Gfp;
use crate::vmalloc::VmapOps;
use crate::{BootInfo, MemoryManager, MmError};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};
use spin::{Mutex, MutexGuard};

/// Requests larger than this (128 KiB, order 5) go straight to vmalloc:
/// the kernel's large buffers (reply frames, listings, tables) need only
/// contiguous addresses, not the contiguous frames that clients' DMA
/// buffers need and fragmentation destroys, and power-of-two rounding
/// would waste up to half such a block. Up to it, requests are kmalloc's
/// (a slab object or a buddy block), falling back to vmalloc when that
/// fails. The line sits just above the sockets' 128 KiB transmit buffers,
/// which live as long as their connection: kept in the buddy, they leave
/// the vmalloc window empty while memd is idle, so its bookkeeping (area
/// records, page tables) is back to nothing and free memory returns to
/// its baseline to the byte.
pub const VMALLOC_THRESHOLD: usize = 128 << 10;

pub struct GlobalMm {
    inner: Mutex<MemoryManager>,
    /// The architecture's page tables for vmalloc, if it has any.
    vmap: Option<&'static dyn VmapOps>,
}

impl Default for GlobalMm {
    fn default() -> Self {
        Self::new()
    }
}

impl GlobalMm {
    /// Without vmalloc.
    pub const fn new() -> Self {
        GlobalMm {
            inner: Mutex::new(MemoryManager::new()),
            vmap: None,
        }
    }

    /// With vmalloc over `ops`' window: large requests, and requests
    /// kmalloc cannot serve, are mapped from order-0 frames.
    ///
    /// # Safety
    /// `ops.map_page` must make the frame it is given readable and
    /// writable at the address it is given until `unmap_page` removes it,
    /// and nothing but this allocator may use `ops.window()`: the memory
    /// vmalloc returns is only as real as those mappings.
    pub const unsafe fn with_vmalloc(ops: &'static dyn VmapOps) -> Self {
        GlobalMm {
            inner: Mutex::new(MemoryManager::new()),
            vmap: Some(ops),
        }
    }

    /// Initialises the manager in place, and vmalloc's window if there is
    /// one.
    ///
    /// # Safety
    /// As for [`MemoryManager::init`].
    pub unsafe fn init(&self, boot: &BootInfo) -> Result<(), MmError> {
        let mut mm = self.inner.lock();
        // SAFETY: forwarded to the caller.
        unsafe { mm.init(boot) }?;
        if let Some(ops) = self.vmap {
            let (start, size) = ops.window();
            mm.vmalloc_init(start, size)?;
        }
        Ok(())
    }

    /// The architecture's vmalloc page-table operations, if any.
    pub fn vmap_ops(&self) -> Option<&'static dyn VmapOps> {
        self.vmap
    }

    /// `kvmalloc`: large requests from vmalloc; the rest from kmalloc, and
    /// from vmalloc when kmalloc fails (fragmentation leaves no block of
    /// the order it needs, or a slab cannot grow). `extra` is added to every
    /// request's flags (`Gfp::ZERO` for zeroed memory).
    #[inline(always)]
    fn kvmalloc(&self, layout: Layout, extra: Gfp) -> *mut u8 {
        let mut mm = self.inner.lock();
        if !mm.is_initialized() {
            return null_mut();
        }
        let (size, align) = (layout.size(), layout.align());
        mm.without_faults(|mm| match self.vmap {
            // A large request is one the service can refuse (it reserves
            // fallibly): it stops at the `min` watermark and leaves the
            // reserve to the kernel's small allocations.
            Some(ops) if size > VMALLOC_THRESHOLD => {
                mm.vmalloc(size, align, Gfp::KERNEL | extra, ops)
            }
            vmap => mm
                .kmalloc_layout(layout, Gfp::KERNEL | Gfp::MEMALLOC | extra)
                .or_else(|_| mm.kmalloc_layout(layout, Gfp::ATOMIC | extra))
                .or_else(|e| match vmap {
                    Some(ops) => mm.vmalloc(size, align, Gfp::KERNEL | Gfp::MEMALLOC | extra, ops),
                    None => Err(e),
                }),
        })
        .map_or(null_mut(), |p| p.as_ptr())
    }

    /// The manager, for everything that is not plain allocation.
    pub fn lock(&self) -> MutexGuard<'_, MemoryManager> {
        self.inner.lock()
    }
}

// SAFETY: allocations come from memory the manager owns exclusively (see
// `MemoryManager::init`): kmalloc returns blocks of at least
// `layout.size()` bytes aligned to `layout.align()` (size classes are
// naturally aligned, larger requests are buddy blocks aligned to their
// size); vmalloc returns whole pages, mapped by the architecture as
// `with_vmalloc`'s caller promised, at an address aligned to
// `layout.align()`, with nothing else mapped there until it is freed. The
// spin lock serialises all access. `dealloc` tells the two apart by
// address, since a small request may have fallen back to vmalloc.
//
// The heap is the kernel's own (connection state, reply frames, socket
// buffers): its small requests carry MEMALLOC, so when clients have taken
// memory down to the `min` watermark they dip into the reserve below it,
// whoever the current owner tag is (the service leaves it at the last
// client). Clients' requests stop at `min`, so they cannot take the
// kernel's lifeline.
unsafe impl GlobalAlloc for GlobalMm {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.kvmalloc(layout, Gfp::default())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.kvmalloc(layout, Gfp::ZERO)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(ptr) = NonNull::new(ptr) else {
            return;
        };
        let mut mm = self.inner.lock();
        match self.vmap {
            Some(ops) if mm.is_vmalloc_addr(ptr.as_ptr() as usize) => {
                let freed = mm.vfree(ptr, ops);
                // Report with the lock released: the message may allocate.
                drop(mm);
                debug_assert!(freed.is_ok(), "vfree({ptr:?}): {freed:?}");
            }
            _ => mm.kfree_layout(ptr, layout),
        }
    }
}
