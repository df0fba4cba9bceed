//! The kernel's heap for a test binary: memd-mm as the `#[global_allocator]`
//! with the kernel's limits.
//!
//! In the kernel, everything the service allocates for itself (decoded
//! requests, reply frames, handle tables) comes from memd-mm's global
//! allocator, out of the memory the clients allocate from: it fails when
//! that memory is short, and a failure outside a fallible reservation
//! aborts the guest. Host tests run on the system allocator, which serves a
//! 40 MiB vector without complaint, so a test would pass where the guest
//! runs out. A test binary that installs [`KernelHeap`] runs on memd-mm
//! over a bounded arena instead, and aborts ("memory allocation of N bytes
//! failed") where service code asks for more than it gives.
//!
//! Its largest allocation is one buddy block of the kernel's top order
//! (4 MiB): the host has no page tables for vmalloc, which the kernel's
//! heap uses above 128 KiB. That is stricter than the guest on purpose.
//! The service bounds what one request makes it allocate well below 4 MiB
//! (a frame is 1 MiB, a batch at most `MAX_BATCH_OPS` operations), so an
//! allocation above it means a hostile input chose its size; in the guest
//! that takes as many frames from the clients' memory, or fails and aborts.
//!
//! One exception: while a thread panics, its allocations come from the
//! system allocator. Reporting a failed assertion (formatting, and above
//! all symbolising a backtrace under `RUST_BACKTRACE=1`, which asks for
//! blocks of several MiB) is the harness's work, not the kernel's; on the
//! kernel's heap it would fail, and an allocation failure inside the panic
//! hook hangs the test instead of reporting anything (seen here: the
//! out-of-memory hook waits for the backtrace the panic hook is printing).
//! Each block is freed to the allocator whose memory it is.
//!
//! It also measures, per thread, what a piece of code allocated
//! ([`measure`]), so tests can assert that hostile input makes the service
//! reserve nothing in proportion to what the input merely claims.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use memd_mm::HostGlobal;

/// The heap's arena. The kernel's heap shares the guest's memory with the
/// clients; a test binary's own needs (the harness, proptest, frames of up
/// to 1 MiB and their copies) fit in far less. Bounded, so a runaway
/// allocation fails here as it would in the guest.
pub const ARENA_BYTES: u64 = 96 << 20;

/// Buddy orders as the kernel boots with (`memd.max_order` unset).
pub const MAX_ORDER: u32 = memd_mm::DEFAULT_MAX_ORDER as u32;

/// The largest allocation this heap serves: one buddy block of the
/// kernel's top order (4 MiB).
pub const LARGEST_BLOCK: usize = (memd_mm::PAGE_SIZE as usize) << (MAX_ORDER - 1);

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

/// memd-mm over a bounded arena with the kernel's orders, counting what the
/// current thread allocates while [`measure`] watches.
pub struct KernelHeap(HostGlobal);

impl KernelHeap {
    pub const fn new() -> Self {
        KernelHeap(HostGlobal::with_max_order(ARENA_BYTES, MAX_ORDER))
    }

    /// Whether `ptr` is a block of the kernel-like arena (not of the
    /// system allocator).
    pub fn owns<T: ?Sized>(&self, ptr: *const T) -> bool {
        self.0.owns(ptr.cast())
    }
}

/// Notes one allocation (or growth to) `size` bytes on this thread. The
/// cells are const-initialised and have no destructor, so touching them
/// never allocates; `try_with` copes with a thread being torn down.
fn note(size: usize) {
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
        let _ = TOTAL.try_with(|c| c.set(c.get().saturating_add(size)));
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }
}

/// Whether this thread's allocations go to the system allocator: only
/// while it panics (reading the panic count does not allocate).
fn reporting() -> bool {
    std::thread::panicking()
}

// SAFETY: every block comes from `HostGlobal` or `System`, both of which
// uphold the `GlobalAlloc` contract, and goes back to the one whose memory
// it is (`HostGlobal::owns` tells them apart); a block that moves between
// them on reallocation is copied up to the smaller of its two sizes.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if reporting() {
            // SAFETY: forwarded contract.
            return unsafe { System.alloc(layout) };
        }
        note(layout.size());
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if reporting() {
            // SAFETY: forwarded contract.
            return unsafe { System.alloc_zeroed(layout) };
        }
        note(layout.size());
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !self.0.owns(ptr) {
            // SAFETY: forwarded contract; `ptr` is the system allocator's.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if !reporting() {
            note(new_size);
            // SAFETY: forwarded contract; `HostGlobal`'s realloc is the
            // default one (allocate, copy, free) over its own methods.
            return unsafe { self.0.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_size` with the old alignment is a valid layout (the
        // caller's contract); both blocks hold at least the bytes copied,
        // and the old one is freed once, to its own allocator.
        unsafe {
            let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.0.dealloc(ptr, layout);
            }
            new
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.0.owns(ptr) {
            // SAFETY: forwarded contract; the block is the arena's.
            unsafe { self.0.dealloc(ptr, layout) }
        } else {
            // SAFETY: forwarded contract; the block is the system's.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

/// What the current thread allocated while [`measure`] ran its closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapUse {
    /// The largest single request (a reallocation counts its new size).
    pub largest: usize,
    /// Every request's size, summed.
    pub total: usize,
    /// Requests made.
    pub count: usize,
}

/// Checks that `heap` is the running binary's heap, with the kernel's
/// limits: an ordinary allocation is a block of its arena, the largest
/// block is served, one byte more is refused (a fallible reservation, so
/// the refusal is an error, not an abort).
pub fn assert_kernel_limits(heap: &KernelHeap) {
    let b = Box::new([7u8; 100]);
    assert!(heap.owns(&*b), "allocations come from memd-mm's arena");
    let mut v: Vec<u8> = Vec::new();
    assert!(
        v.try_reserve_exact(LARGEST_BLOCK + 1).is_err(),
        "the heap refuses what no buddy block holds"
    );
    v.try_reserve_exact(LARGEST_BLOCK)
        .expect("the heap serves one largest block");
}

/// Runs `f` and reports what this thread allocated meanwhile (other
/// threads, such as parallel tests, are not counted). Not reentrant.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, HeapUse) {
    LARGEST.with(|c| c.set(0));
    TOTAL.with(|c| c.set(0));
    COUNT.with(|c| c.set(0));
    WATCHING.with(|c| c.set(true));
    let r = f();
    WATCHING.with(|c| c.set(false));
    let used = HeapUse {
        largest: LARGEST.with(Cell::get),
        total: TOTAL.with(Cell::get),
        count: COUNT.with(Cell::get),
    };
    (r, used)
}
