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
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::boxed::Box;

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
        let layout = Layout::from_size_align(end as usize, 4096).map_err(|_| MmError::Invalid("arena too large"))?;
        // SAFETY: the layout has a non-zero size (checked just below for the
        // empty case by `init`, which rejects a map without memory).
        let base = if end == 0 { core::ptr::null_mut() } else { unsafe { alloc_zeroed(layout) } };
        if end != 0 && base.is_null() {
            return Err(MmError::NoMemory);
        }
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
            direct_map_offset: base as u64,
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
            unsafe { dealloc(self.base, self.layout) };
        }
    }
}
