//! The boot allocator (Linux's memblock, which replaced bootmem).
//!
//! It starts from the firmware's memory map, learns what is already taken
//! (kernel image, boot page tables, `memmap=` holes), serves the early
//! allocations that must exist before the page allocator does, as Linux's
//! `memblock_alloc` does (the frame table, the `memd.dma_reserve=` region),
//! and finally tells the zones which ranges are free.

pub const MAX_RANGES: usize = 64;
pub const PAGE_SIZE: u64 = 4096;

/// A physical range `[start, end)` from the firmware memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub end: u64,
    pub kind: RegionKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Usable,
    Reserved,
    Acpi,
    Nvs,
    Bad,
}

/// Why a range is reserved; shown in the statistics and the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReserveKind {
    /// Handed in by the kernel: its image, page tables, boot data.
    Kernel,
    /// The frame table itself.
    FrameTable,
    /// The contiguous region for large DMA buffers.
    DmaReserve,
    /// A `memmap=SIZE$ADDR` hole.
    Hole,
    /// Frame 0, never handed out.
    Zero,
}

impl ReserveKind {
    pub const fn name(self) -> &'static str {
        match self {
            ReserveKind::Kernel => "kernel",
            ReserveKind::FrameTable => "frame-table",
            ReserveKind::DmaReserve => "dma-reserve",
            ReserveKind::Hole => "memmap-hole",
            ReserveKind::Zero => "zero-page",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub start: u64,
    pub end: u64,
    pub kind: ReserveKind,
}

#[derive(Clone, Copy, Debug)]
pub struct Memblock {
    memory: [(u64, u64); MAX_RANGES],
    nr_memory: usize,
    reserved: [Reservation; MAX_RANGES],
    nr_reserved: usize,
}

impl Default for Memblock {
    fn default() -> Self {
        Self::new()
    }
}

const fn page_up(x: u64) -> u64 {
    x.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

const fn page_down(x: u64) -> u64 {
    x & !(PAGE_SIZE - 1)
}

impl Memblock {
    pub const fn new() -> Self {
        Memblock {
            memory: [(0, 0); MAX_RANGES],
            nr_memory: 0,
            reserved: [Reservation {
                start: 0,
                end: 0,
                kind: ReserveKind::Kernel,
            }; MAX_RANGES],
            nr_reserved: 0,
        }
    }

    pub fn memory(&self) -> &[(u64, u64)] {
        &self.memory[..self.nr_memory]
    }

    pub fn reserved(&self) -> &[Reservation] {
        &self.reserved[..self.nr_reserved]
    }

    /// Adds usable RAM, trimmed inward to whole pages; keeps the list sorted
    /// and merged (firmware maps may be unsorted and overlapping).
    pub fn add_memory(&mut self, start: u64, end: u64) -> bool {
        let (start, end) = (page_up(start), page_down(end));
        if start >= end {
            return true;
        }
        let mut merged = (start, end);
        let mut out = [(0u64, 0u64); MAX_RANGES];
        let mut n = 0;
        let mut placed = false;
        for &(s, e) in self.memory() {
            if e < merged.0 || s > merged.1 {
                if !placed && s > merged.1 {
                    if n == MAX_RANGES {
                        return false;
                    }
                    out[n] = merged;
                    n += 1;
                    placed = true;
                }
                if n == MAX_RANGES {
                    return false;
                }
                out[n] = (s, e);
                n += 1;
            } else {
                merged = (merged.0.min(s), merged.1.max(e));
            }
        }
        if !placed {
            if n == MAX_RANGES {
                return false;
            }
            out[n] = merged;
            n += 1;
        }
        self.memory = out;
        self.nr_memory = n;
        true
    }

    /// Removes a range from usable memory (a hole), widened to whole pages.
    pub fn remove_memory(&mut self, start: u64, end: u64) -> bool {
        let (start, end) = (page_down(start), page_up(end));
        let mut out = [(0u64, 0u64); MAX_RANGES];
        let mut n = 0;
        for &(s, e) in self.memory() {
            for piece in [(s, e.min(start)), (s.max(end), e)] {
                if piece.0 < piece.1 {
                    if n == MAX_RANGES {
                        return false;
                    }
                    out[n] = piece;
                    n += 1;
                }
            }
        }
        self.memory = out;
        self.nr_memory = n;
        true
    }

    /// Records a reservation, widened to whole pages, kept sorted by start.
    pub fn reserve(&mut self, start: u64, end: u64, kind: ReserveKind) -> bool {
        let (start, end) = (page_down(start), page_up(end));
        if start >= end {
            return true;
        }
        if self.nr_reserved == MAX_RANGES {
            return false;
        }
        let at = self.reserved().partition_point(|r| r.start <= start);
        self.reserved.copy_within(at..self.nr_reserved, at + 1);
        self.reserved[at] = Reservation { start, end, kind };
        self.nr_reserved += 1;
        true
    }

    /// Calls `f` for every usable range that no reservation covers.
    pub fn for_each_free(&self, mut f: impl FnMut(u64, u64)) {
        for &(s, e) in self.memory() {
            let mut cursor = s;
            for r in self.reserved() {
                if r.end <= cursor {
                    continue;
                }
                if r.start >= e {
                    break;
                }
                if r.start > cursor {
                    f(cursor, r.start.min(e));
                }
                cursor = cursor.max(r.end);
                if cursor >= e {
                    break;
                }
            }
            if cursor < e {
                f(cursor, e);
            }
        }
    }

    /// Allocates `size` bytes aligned to `align` inside `[lo, hi)`, from the
    /// top down as Linux's memblock does, and reserves them.
    pub fn alloc(
        &mut self,
        size: u64,
        align: u64,
        lo: u64,
        hi: u64,
        kind: ReserveKind,
    ) -> Option<u64> {
        let size = page_up(size);
        let align = align.max(PAGE_SIZE);
        let mut best: Option<u64> = None;
        self.for_each_free(|s, e| {
            let (s, e) = (s.max(lo), e.min(hi));
            if s >= e || e - s < size {
                return;
            }
            let candidate = (e - size) & !(align - 1);
            if candidate >= s && best.is_none_or(|b| candidate > b) {
                best = Some(candidate);
            }
        });
        let at = best?;
        if !self.reserve(at, at + size, kind) {
            return None;
        }
        Some(at)
    }

    /// One past the last usable byte.
    pub fn end_of_memory(&self) -> u64 {
        self.memory().last().map_or(0, |r| r.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_ranges(m: &Memblock) -> std::vec::Vec<(u64, u64)> {
        let mut v = std::vec::Vec::new();
        m.for_each_free(|s, e| v.push((s, e)));
        v
    }

    extern crate std;

    #[test]
    fn unsorted_overlapping_map_is_merged() {
        let mut m = Memblock::new();
        m.add_memory(0x100000, 0x800000);
        m.add_memory(0x1000, 0x9fc00);
        m.add_memory(0x700000, 0x1000000);
        m.add_memory(0x1000000, 0x1000000); // the zero entry qboot ends with
        assert_eq!(m.memory(), &[(0x1000, 0x9f000), (0x100000, 0x1000000)]);
    }

    #[test]
    fn holes_and_reservations_are_subtracted() {
        let mut m = Memblock::new();
        m.add_memory(0, 0x4000000);
        m.remove_memory(0x1000000, 0x1100000);
        m.reserve(0x100000, 0x200800, ReserveKind::Kernel);
        assert_eq!(
            free_ranges(&m),
            std::vec![(0, 0x100000), (0x201000, 0x1000000), (0x1100000, 0x4000000)]
        );
    }

    #[test]
    fn alloc_is_top_down_aligned_and_limited() {
        let mut m = Memblock::new();
        m.add_memory(0, 0x4000000);
        let a = m
            .alloc(0x3000, 0x1000, 0, u64::MAX, ReserveKind::FrameTable)
            .unwrap();
        assert_eq!(a, 0x4000000 - 0x3000);
        let b = m
            .alloc(0x200000, 0x200000, 0, 0x1000000, ReserveKind::DmaReserve)
            .unwrap();
        assert_eq!(b, 0xe00000);
        assert!(m
            .alloc(0x8000000, 0x1000, 0, u64::MAX, ReserveKind::DmaReserve)
            .is_none());
        let total: u64 = free_ranges(&m).iter().map(|r| r.1 - r.0).sum();
        assert_eq!(total, 0x4000000 - 0x3000 - 0x200000);
    }
}
