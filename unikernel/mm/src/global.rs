//! `GlobalAlloc` over kmalloc and the buddy, behind a spin lock.
//!
//! The kernel's `#[global_allocator]` is this; so can a host program's be
//! (see the `arena` module), which is how memd-mm is benchmarked against
//! other allocators with ordinary Rust code.

use crate::gfp::Gfp;
use crate::{BootInfo, MemoryManager, MmError};
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};
use spin::{Mutex, MutexGuard};

pub struct GlobalMm {
    inner: Mutex<MemoryManager>,
}

impl Default for GlobalMm {
    fn default() -> Self {
        Self::new()
    }
}

impl GlobalMm {
    pub const fn new() -> Self {
        GlobalMm {
            inner: Mutex::new(MemoryManager::new()),
        }
    }

    /// Initialises the manager in place.
    ///
    /// # Safety
    /// As for [`MemoryManager::init`].
    pub unsafe fn init(&self, boot: &BootInfo) -> Result<(), MmError> {
        // SAFETY: forwarded to the caller.
        unsafe { self.inner.lock().init(boot) }
    }

    /// The manager, for everything that is not plain allocation.
    pub fn lock(&self) -> MutexGuard<'_, MemoryManager> {
        self.inner.lock()
    }
}

// SAFETY: allocations come from memory the manager owns exclusively (see
// `MemoryManager::init`); kmalloc returns blocks of at least `layout.size()`
// bytes aligned to `layout.align()` (size classes are naturally aligned,
// larger requests are buddy blocks aligned to their size), and the spin lock
// serialises all access.
//
// The heap is the kernel's own (connection state, reply frames, socket
// buffers): its requests carry MEMALLOC, so when clients have taken memory
// down to the `min` watermark they dip into the reserve below it, whoever
// the current owner tag is (the service leaves it at the last client).
// Clients' requests stop at `min`, so they cannot take the kernel's
// lifeline.
unsafe impl GlobalAlloc for GlobalMm {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut mm = self.inner.lock();
        if !mm.is_initialized() {
            return null_mut();
        }
        mm.without_faults(|mm| {
            mm.kmalloc_layout(layout, Gfp::KERNEL | Gfp::MEMALLOC)
                .or_else(|_| mm.kmalloc_layout(layout, Gfp::ATOMIC))
        })
        .map_or(null_mut(), |p| p.as_ptr())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let mut mm = self.inner.lock();
        if !mm.is_initialized() {
            return null_mut();
        }
        mm.without_faults(|mm| {
            mm.kmalloc_layout(layout, Gfp::KERNEL | Gfp::MEMALLOC | Gfp::ZERO)
                .or_else(|_| mm.kmalloc_layout(layout, Gfp::ATOMIC | Gfp::ZERO))
        })
        .map_or(null_mut(), |p| p.as_ptr())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(ptr) = NonNull::new(ptr) {
            self.inner.lock().kfree_layout(ptr, layout);
        }
    }
}
