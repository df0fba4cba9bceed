//! Host-only: run the memory manager over memory borrowed from the host
//! allocator, with a made-up physical layout.
//!
//! Tests and benchmarks describe the "machine" as physical ranges (say 1-16
//! MiB, 16-64 MiB and 4 GiB-4 GiB+32 MiB to get all three zones). One
//! virtual reservation spans from physical 0 to the end of the last range;
//! the host only commits the pages that are touched, so a sparse layout
//! above 4 GiB costs address space, not memory.

use crate::{BootInfo, MemRegion, MemoryManager, MmError, RegionKind};
use core::ops::{Deref, DerefMut};
use std::alloc::Layout;
use std::boxed::Box;

/// Takes `bytes` (plus a page for alignment) of zeroed host memory.
///
/// Asks for 16-byte alignment so that the system allocator uses `calloc`,
/// whose large blocks are fresh mappings the kernel zeroes lazily; a
/// page-aligned `alloc_zeroed` would memset the whole arena up front.
fn zeroed_arena(bytes: usize) -> Option<(*mut u8, Layout)> {
    let layout = Layout::from_size_align(bytes.checked_add(4096)?, 16).ok()?;
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { std::alloc::GlobalAlloc::alloc_zeroed(&std::alloc::System, layout) };
    (!base.is_null()).then_some((base, layout))
}

fn page_align(p: *mut u8) -> usize {
    (p as usize).next_multiple_of(4096)
}

/// A memory manager that owns its host memory.
pub struct HostMm {
    // Dropped before `base` is released, so nothing points into freed memory.
    mm: Box<MemoryManager>,
    base: *mut u8,
    layout: Layout,
}

// SAFETY: the arena is exclusively owned by this value; moving it to another
// thread moves that ownership along.
unsafe impl Send for HostMm {}

impl HostMm {
    /// Boots a manager over `ranges` (physical `[start, end)`), with `cmdline`.
    pub fn boot(ranges: &[(u64, u64)], cmdline: &str) -> Result<HostMm, MmError> {
        let end = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let (base, layout) = if end == 0 {
            (core::ptr::null_mut(), Layout::new::<u8>())
        } else {
            zeroed_arena(end as usize).ok_or(MmError::NoMemory)?
        };
        let regions: std::vec::Vec<MemRegion> = ranges
            .iter()
            .map(|&(start, end)| MemRegion {
                start,
                end,
                kind: RegionKind::Usable,
            })
            .collect();
        let mut mm = Box::new(MemoryManager::new());
        let boot = BootInfo {
            regions: &regions,
            cmdline,
            direct_map_offset: page_align(base) as u64,
            reserved: &[],
            zeroed: true,
        };
        // SAFETY: `base..base+end` is a fresh, zeroed, exclusively owned host
        // allocation that covers every range, and it outlives `mm` (see Drop).
        let result = unsafe { mm.init(&boot) };
        let host = HostMm { mm, base, layout };
        result.map(|()| host)
    }

    /// All three zones: DMA 1-16 MiB, DMA32 16 MiB-`dma32_end`, Normal from
    /// 4 GiB for `normal` bytes.
    pub fn three_zones(dma32_end: u64, normal: u64, cmdline: &str) -> Result<HostMm, MmError> {
        let mut ranges = std::vec![(1 << 20, 16 << 20), (16 << 20, dma32_end)];
        if normal > 0 {
            ranges.push((4 << 30, (4 << 30) + normal));
        }
        HostMm::boot(&ranges, cmdline)
    }
}

impl Deref for HostMm {
    type Target = MemoryManager;
    fn deref(&self) -> &MemoryManager {
        &self.mm
    }
}

impl DerefMut for HostMm {
    fn deref_mut(&mut self) -> &mut MemoryManager {
        &mut self.mm
    }
}

impl Drop for HostMm {
    fn drop(&mut self) {
        // Drop the manager's view first: it holds a slice into the arena.
        *self.mm = MemoryManager::new();
        if !self.base.is_null() {
            // SAFETY: allocated in `boot` with this layout, freed once.
            unsafe {
                std::alloc::GlobalAlloc::dealloc(&std::alloc::System, self.base, self.layout)
            };
        }
    }
}

/// A `#[global_allocator]` for host programs: memd-mm over an arena taken
/// from the system allocator on first use.
///
/// ```ignore
/// #[global_allocator]
/// static A: memd_mm::arena::HostGlobal = memd_mm::arena::HostGlobal::new(256 << 20);
/// ```
pub struct HostGlobal {
    mm: crate::GlobalMm,
    ready: spin::Once<bool>,
    bytes: u64,
}

impl HostGlobal {
    pub const fn new(bytes: u64) -> Self {
        HostGlobal {
            mm: crate::GlobalMm::new(),
            ready: spin::Once::new(),
            bytes,
        }
    }

    fn ensure(&self) -> bool {
        *self.ready.call_once(|| {
            let Some((base, _)) = zeroed_arena(self.bytes as usize + (1 << 20)) else {
                return false;
            };
            // The arena is never returned: it backs the allocator for the
            // rest of the program.
            let base = page_align(base);
            let regions = [MemRegion {
                start: 1 << 20,
                end: self.bytes + (1 << 20),
                kind: RegionKind::Usable,
            }];
            let boot = BootInfo {
                regions: &regions,
                // Host programs grow vectors past 4 MiB: give the buddy
                // 256 MiB blocks (Linux would use vmalloc there).
                cmdline: "memd.max_order=17",
                direct_map_offset: base as u64,
                reserved: &[],
                zeroed: true,
            };
            // SAFETY: the arena is fresh, zeroed, owned by us forever.
            unsafe { self.mm.init(&boot) }.is_ok()
        })
    }

    /// The manager, for statistics.
    pub fn lock(&self) -> spin::MutexGuard<'_, MemoryManager> {
        self.mm.lock()
    }
}

// SAFETY: delegates to `GlobalMm`, which upholds the `GlobalAlloc` contract
// once initialised; before that (or if the arena cannot be had) it returns
// null, which callers treat as allocation failure.
unsafe impl std::alloc::GlobalAlloc for HostGlobal {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.ensure() {
            return core::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { self.mm.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.ensure() {
            return core::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { self.mm.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract; `ptr` came from `alloc` above.
        unsafe { self.mm.dealloc(ptr, layout) }
    }
}
