//! The contiguous memory area: a region reserved at boot
//! (`memd.dma_reserve=SIZE@zone`) that serves physically contiguous
//! buffers of any size and power-of-two alignment, far beyond the buddy's
//! largest block (Linux's CMA, `mm/cma.c`): reserved at boot, as a
//! driver's own `memblock_alloc` buffer would be, but shared by many
//! buffers that come and go.
//!
//! Allocations are kept as a sorted list of extents; a request takes the
//! first gap that fits after alignment and below the caller's address
//! limit. The region is never lent to the buddy, so fragmentation of
//! ordinary memory cannot reach it. The list is a table memd-mm allocates
//! from itself at boot, a page of it, that doubles when full and halves
//! back as it empties.

use crate::memblock::PAGE_SIZE;
use crate::zone::ZoneType;

/// Extents of the table at boot, its smallest: a page.
pub(crate) const EXTENTS_MIN: usize = 256;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub pages: u64,
}

pub struct Cma {
    pub base: u64,
    pub pages: u64,
    pub zone: ZoneType,
    extents: &'static mut [Extent],
    nr: usize,
    pub used_pages: u64,
    pub allocs: u64,
    pub failures: u64,
}

impl Cma {
    pub fn new(base: u64, size: u64, zone: ZoneType) -> Cma {
        Cma {
            base,
            pages: size.div_ceil(PAGE_SIZE),
            zone,
            extents: &mut [],
            nr: 0,
            used_pages: 0,
            allocs: 0,
            failures: 0,
        }
    }

    pub fn end(&self) -> u64 {
        self.base + self.pages * PAGE_SIZE
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents[..self.nr]
    }

    pub fn free_pages(&self) -> u64 {
        self.pages - self.used_pages
    }

    /// Free gaps as `(start, end)` physical ranges, in address order.
    pub fn for_each_gap(&self, mut f: impl FnMut(u64, u64)) {
        let mut cursor = self.base;
        for e in self.extents() {
            if e.start > cursor {
                f(cursor, e.start);
            }
            cursor = e.start + e.pages * PAGE_SIZE;
        }
        if cursor < self.end() {
            f(cursor, self.end());
        }
    }

    pub fn largest_free(&self) -> u64 {
        let mut best = 0;
        self.for_each_gap(|s, e| best = best.max(e - s));
        best
    }

    /// First fit of `bytes` at `align`, ending at or below `limit`.
    pub fn alloc(&mut self, bytes: u64, align: u64, limit: u64) -> Option<u64> {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        let align = align.max(PAGE_SIZE);
        if self.nr == self.extents.len() || !align.is_power_of_two() {
            self.failures += 1;
            return None;
        }
        let size = pages * PAGE_SIZE;
        let mut found = None;
        self.for_each_gap(|s, e| {
            if found.is_some() {
                return;
            }
            let start = s.next_multiple_of(align);
            if start
                .checked_add(size)
                .is_some_and(|end| end <= e && end <= limit)
            {
                found = Some(start);
            }
        });
        let Some(start) = found else {
            self.failures += 1;
            return None;
        };
        let at = self.extents().partition_point(|x| x.start < start);
        self.extents.copy_within(at..self.nr, at + 1);
        self.extents[at] = Extent { start, pages };
        self.nr += 1;
        self.used_pages += pages;
        self.allocs += 1;
        Some(start)
    }

    /// Frees the buffer starting at `start`; returns its size in pages.
    pub fn free(&mut self, start: u64) -> Option<u64> {
        let at = self
            .extents()
            .binary_search_by_key(&start, |x| x.start)
            .ok()?;
        let pages = self.extents[at].pages;
        self.extents.copy_within(at + 1..self.nr, at);
        self.nr -= 1;
        self.used_pages -= pages;
        Some(pages)
    }

    /// The size the extent table must grow to before one more buffer,
    /// when it is full.
    pub(crate) fn table_to_grow(&self) -> Option<usize> {
        let cap = self.extents.len();
        (self.nr == cap).then_some((cap * 2).max(EXTENTS_MIN))
    }

    /// The size the extent table may shrink to: half, when a quarter full
    /// and larger than at boot.
    pub(crate) fn table_to_shrink(&self) -> Option<usize> {
        self.shrink_at(self.nr)
    }

    /// Whether the table would shrink once one more buffer is freed.
    pub(crate) fn shrinks_after_free(&self) -> bool {
        self.shrink_at(self.nr.saturating_sub(1)).is_some()
    }

    fn shrink_at(&self, nr: usize) -> Option<usize> {
        let cap = self.extents.len();
        (cap > EXTENTS_MIN && nr <= cap / 4).then_some(cap / 2)
    }

    /// Entries the extent table has room for.
    pub(crate) fn capacity(&self) -> usize {
        self.extents.len()
    }

    /// Moves the extents into `table`, which has room for them, and
    /// returns the old table.
    pub(crate) fn replace_table(&mut self, table: &'static mut [Extent]) -> &'static mut [Extent] {
        table[..self.nr].copy_from_slice(&self.extents[..self.nr]);
        core::mem::replace(&mut self.extents, table)
    }

    /// Extents sorted, disjoint, inside the region, and adding up.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut cursor = self.base;
        let mut used = 0;
        for e in self.extents() {
            if e.start < cursor || e.pages == 0 {
                return Err("cma: extents overlap or are unsorted");
            }
            cursor = e.start + e.pages * PAGE_SIZE;
            used += e.pages;
        }
        if cursor > self.end() {
            return Err("cma: extent beyond the region");
        }
        if used != self.used_pages {
            return Err("cma: used pages do not match the extents");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_with_alignment_limit_and_reuse() {
        let mut c = Cma::new(0x1000_0000, 64 << 20, ZoneType::Dma32);
        assert!(
            c.alloc(4096, 4096, u64::MAX).is_none(),
            "no extent table yet"
        );
        assert_eq!(c.table_to_grow(), Some(EXTENTS_MIN));
        c.replace_table(std::vec![Extent::default(); EXTENTS_MIN].leak());
        let a = c.alloc(5 << 20, 4096, u64::MAX).unwrap();
        assert_eq!(a, 0x1000_0000);
        let b = c.alloc(8 << 20, 8 << 20, u64::MAX).unwrap();
        assert_eq!(b, 0x1080_0000);
        assert!(c.alloc(64 << 20, 4096, u64::MAX).is_none());
        assert!(
            c.alloc(1 << 20, 4096, 0x1000_0000).is_none(),
            "limit below region"
        );
        assert_eq!(c.free(a), Some(1280));
        assert_eq!(c.free(a), None);
        assert_eq!(c.largest_free(), (64 << 20) - (8 << 20) - (8 << 20));
        c.check().unwrap();
        c.free(b).unwrap();
        assert_eq!(c.largest_free(), 64 << 20);
        assert_eq!(c.alloc(64 << 20, 4096, u64::MAX), Some(0x1000_0000));
    }
}
