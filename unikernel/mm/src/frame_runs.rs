//! A read-only walk of the frame table as runs of frame states, for the
//! physical memory map pictures (`memctl map`).
//!
//! [`MemoryManager::frame_runs`] visits every frame from 0 to the end of
//! the frame table once, block by block (a block head's order says how far
//! to skip), and yields maximal runs of one [`RunKind`]: free blocks by
//! order, per-CPU pages, allocated pages, slab pages, large kmalloc pages,
//! mempool reserves, boot reservations and frames that are not RAM.
//! Adjacent free blocks of the same order merge into one run (its length
//! divided by the block size is the number of blocks).
//!
//! Nothing here allocates or writes: it may run under the allocator lock.

use crate::frame::FrameState;
use crate::memblock::PAGE_SIZE;
use crate::zone::ZoneType;
use crate::MemoryManager;

/// What a run of frames is. Shared with the protocol: memd-wire's memory
/// map (`MapRun`) carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum RunKind {
    /// Free blocks of this order on the buddy free lists.
    Free(u8),
    /// Free order-0 frames on a per-CPU list.
    Pcp,
    /// Pages from `alloc_pages` (including DMA buffers the buddy served).
    Allocated,
    /// Slab pages.
    Slab,
    /// The kernel heap's large allocations: kmalloc blocks too large for
    /// the size classes, and vmalloc's pages.
    Large,
    /// Blocks held in a mempool's reserve.
    Pool,
    /// Reserved at boot (kernel, frame table, CMA region, holes, frame 0).
    Reserved,
    /// Not memory the manager was given.
    Absent,
    /// Memory whose frames are not initialised yet (deferred
    /// initialisation, `deferred.rs`): free memory still to come.
    Uninitialised,
    /// Blocks in the balloon: the host's memory until it gives it back.
    Balloon,
}

impl RunKind {
    /// Every kind of RAM that is not on the buddy's free lists, in the
    /// order legends list them (after the free orders).
    pub const NOT_ON_FREE_LISTS: [RunKind; 6] = [
        RunKind::Pcp,
        RunKind::Allocated,
        RunKind::Slab,
        RunKind::Large,
        RunKind::Pool,
        RunKind::Reserved,
    ];
}

/// A short name for legends and tables ("free order 3", "slab", ...); a
/// width pads it.
impl core::fmt::Display for RunKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(match *self {
            RunKind::Free(o) => {
                // "free order " and the order's digits, on the stack.
                let mut label = *b"free order 000";
                let digits = 1 + (o >= 10) as usize + (o >= 100) as usize;
                let mut n = o;
                for d in label[11..11 + digits].iter_mut().rev() {
                    *d = b'0' + n % 10;
                    n /= 10;
                }
                return f.pad(core::str::from_utf8(&label[..11 + digits]).unwrap_or("free"));
            }
            RunKind::Pcp => "per-cpu free",
            RunKind::Allocated => "allocated",
            RunKind::Slab => "slab",
            RunKind::Large => "kmalloc large",
            RunKind::Pool => "mempool reserve",
            RunKind::Reserved => "reserved",
            RunKind::Absent => "not RAM",
            RunKind::Uninitialised => "not initialised yet",
            RunKind::Balloon => "balloon",
        })
    }
}

/// `pages` frames of one kind starting at frame `start_pfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRun {
    /// First frame number.
    pub start_pfn: u64,
    /// Number of frames.
    pub pages: u64,
    /// What they are.
    pub kind: RunKind,
}

impl FrameRun {
    /// One past the last frame number.
    pub fn end_pfn(&self) -> u64 {
        self.start_pfn + self.pages
    }

    /// Physical address of the first frame.
    pub fn start(&self) -> u64 {
        self.start_pfn * PAGE_SIZE
    }
}

/// Iterator returned by [`MemoryManager::frame_runs`] and
/// [`MemoryManager::frame_runs_in`].
pub struct FrameRuns<'a> {
    mm: &'a MemoryManager,
    pfn: u64,
    /// Where the walk stops (at most the table's end).
    end: u64,
    /// The walk starts at `pfn`, which may be inside a block.
    resumed: bool,
}

impl FrameRuns<'_> {
    /// The block that covers `pfn` from a head below it, as (kind, frames
    /// from `pfn` to the block's end), if `pfn` is a block's tail frame: a
    /// walk resumed after the table changed may start inside a block.
    fn covering(&self, pfn: u64) -> Option<(RunKind, u64)> {
        let f = &self.mm.frames[pfn as usize];
        match f.state() {
            FrameState::SlabTail => {
                let (kind, len) = self.block(u64::from(f.next));
                let end = u64::from(f.next) + len;
                (end > pfn).then(|| (kind, end - pfn))
            }
            FrameState::None => (1..64).find_map(|order| {
                let head = pfn & !((1u64 << order) - 1);
                if head == pfn {
                    return None;
                }
                let (kind, len) = self.block(head);
                (len > 1 && head + len > pfn).then(|| (kind, head + len - pfn))
            }),
            _ => None,
        }
    }

    /// The block at `pfn`: its kind and length in frames (clipped to the
    /// table, so a corrupt order cannot run past it).
    fn block(&self, pfn: u64) -> (RunKind, u64) {
        let frames = &self.mm.frames;
        let n = frames.run_end(pfn as usize) as u64;
        let f = &frames[pfn as usize];
        let head = |kind| (kind, (1u64 << f.order.min(63)).min(n - pfn));
        match f.state() {
            FrameState::None => (RunKind::Absent, 1),
            // Frames of the hot-plug region read Reserved until plugged.
            FrameState::Reserved if f.zone() == ZoneType::Movable => (RunKind::Absent, 1),
            FrameState::Reserved => (RunKind::Reserved, 1),
            // Free memory the host is being told about is free memory.
            FrameState::Buddy | FrameState::Isolated => head(RunKind::Free(f.order)),
            FrameState::Pcp => (RunKind::Pcp, 1),
            FrameState::Allocated if f.owner == crate::Owner::BALLOON.0 => head(RunKind::Balloon),
            FrameState::Allocated => head(RunKind::Allocated),
            FrameState::Slab => head(RunKind::Slab),
            // Only seen if a slab's head was lost; count the frame as slab.
            FrameState::SlabTail => (RunKind::Slab, 1),
            FrameState::Large => head(RunKind::Large),
            FrameState::Pool => head(RunKind::Pool),
            FrameState::Vmalloc => (RunKind::Large, 1),
        }
    }
}

impl Iterator for FrameRuns<'_> {
    type Item = FrameRun;

    fn next(&mut self) -> Option<FrameRun> {
        if self.pfn >= self.end {
            return None;
        }
        let start = self.pfn;
        // Frames past the initialised prefix are not read: what they are
        // comes from the boot map.
        let n = self.end.min(self.mm.frames.run_end(start as usize) as u64);
        if start >= n {
            let (kind, until) = if start >= self.mm.table.carved() as u64 {
                // Hot-plug region without frames yet: nothing plugged.
                (
                    RunKind::Absent,
                    self.mm.frames.next_present(start as usize) as u64,
                )
            } else {
                self.mm.uninitialised_run(start)
            };
            self.pfn = until.min(self.end);
            return Some(FrameRun {
                start_pfn: start,
                pages: self.pfn - start,
                kind,
            });
        }
        let first = match core::mem::take(&mut self.resumed) {
            true => self.covering(start),
            false => None,
        };
        let (kind, len) = first.unwrap_or_else(|| self.block(start));
        self.pfn = (self.pfn + len).min(n);
        while self.pfn < n {
            let (k, len) = self.block(self.pfn);
            if k != kind {
                break;
            }
            self.pfn = (self.pfn + len).min(n);
        }
        Some(FrameRun {
            start_pfn: start,
            pages: self.pfn - start,
            kind,
        })
    }
}

impl MemoryManager {
    /// What frame `pfn`, not initialised yet, is by the boot map, and the
    /// first frame after it that may differ: a boot reservation, memory
    /// still to come, or no memory at all.
    fn uninitialised_run(&self, pfn: u64) -> (RunKind, u64) {
        let at = pfn * PAGE_SIZE;
        let page = |b: u64| b.div_ceil(PAGE_SIZE);
        if let Some(r) = self
            .memblock
            .reserved()
            .iter()
            .find(|r| r.start <= at && at < r.end)
        {
            return (RunKind::Reserved, page(r.end));
        }
        match self
            .memblock
            .memory()
            .iter()
            .find(|&&(s, e)| s <= at && at < e)
        {
            Some(&(_, end)) => {
                let next_reserved = self
                    .memblock
                    .reserved()
                    .iter()
                    .map(|r| r.start)
                    .filter(|&s| s > at && s < end)
                    .min()
                    .unwrap_or(end);
                (
                    RunKind::Uninitialised,
                    (next_reserved / PAGE_SIZE).max(pfn + 1),
                )
            }
            None => {
                let next_memory = self
                    .memblock
                    .memory()
                    .iter()
                    .map(|&(s, _)| s)
                    .filter(|&s| s > at)
                    .min()
                    .unwrap_or(u64::MAX);
                (RunKind::Absent, (next_memory / PAGE_SIZE).max(pfn + 1))
            }
        }
    }

    /// Every frame of the table as maximal runs of one kind, in address
    /// order, covering `0..nr_frames()` without gaps.
    pub fn frame_runs(&self) -> FrameRuns<'_> {
        FrameRuns {
            mm: self,
            pfn: 0,
            end: self.nr_frames() as u64,
            resumed: false,
        }
    }

    /// The runs of frames `from..to` (clipped to the table), for a walk
    /// made a window at a time while the table changes between windows:
    /// `from` may be inside a block, whose frames from there on count as
    /// the block's kind, and a run crossing `to` is cut there.
    pub fn frame_runs_in(&self, from: u64, to: u64) -> FrameRuns<'_> {
        let end = to.min(self.nr_frames() as u64);
        FrameRuns {
            mm: self,
            pfn: from.min(end),
            end,
            resumed: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostMm;
    use crate::{Gfp, ReserveKind, SlabFlags};

    fn runs(mm: &MemoryManager) -> std::vec::Vec<FrameRun> {
        mm.frame_runs().collect()
    }

    #[test]
    fn labels() {
        use std::format;
        assert_eq!(format!("{}", RunKind::Free(0)), "free order 0");
        assert_eq!(format!("{}", RunKind::Free(10)), "free order 10");
        assert_eq!(format!("{}", RunKind::Free(255)), "free order 255");
        assert_eq!(format!("[{:<14}]", RunKind::Free(3)), "[free order 3  ]");
        assert_eq!(format!("[{:>6}]", RunKind::Slab), "[  slab]");
        assert_eq!(format!("{}", RunKind::Absent), "not RAM");
    }

    #[test]
    fn runs_cover_the_table_and_agree_with_the_counters() {
        let mut host = HostMm::three_zones(64 << 20, 0, "memd.dma_reserve=8M@dma32").unwrap();
        let mm: &mut MemoryManager = &mut host;
        let a = mm.alloc_pages(3, Gfp::KERNEL).unwrap();
        let c = mm.cache_create("t", 200, 8, SlabFlags::NONE, None).unwrap();
        let _o = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
        let rs = runs(mm);
        // Contiguous, complete, maximal.
        let mut pfn = 0;
        for w in rs.windows(2) {
            assert_ne!(w[0].kind, w[1].kind, "runs are maximal");
        }
        for r in &rs {
            assert_eq!(r.start_pfn, pfn);
            assert!(r.pages > 0);
            pfn = r.end_pfn();
        }
        assert_eq!(pfn, mm.nr_frames() as u64);

        let sum = |pred: &dyn Fn(RunKind) -> bool| -> u64 {
            rs.iter().filter(|r| pred(r.kind)).map(|r| r.pages).sum()
        };
        let free: u64 = mm.zoneinfo().iter().map(|z| z.free).sum();
        assert_eq!(sum(&|k| matches!(k, RunKind::Free(_))), free);
        let pcp: u64 = mm.zoneinfo().iter().map(|z| z.pcp_count).sum();
        assert_eq!(sum(&|k| k == RunKind::Pcp), pcp);
        assert_eq!(
            sum(&|k| k == RunKind::Slab) * PAGE_SIZE,
            mm.meminfo().slab,
            "slab pages"
        );
        // Frames below 1 MiB are not RAM in this layout.
        assert_eq!(rs[0].kind, RunKind::Reserved, "frame 0");
        assert!(rs.iter().any(|r| r.kind == RunKind::Absent));
        // Every reservation is covered by reserved frames.
        let reserved = sum(&|k| k == RunKind::Reserved);
        let want: u64 = mm
            .reservations()
            .iter()
            .map(|r| (r.end - r.start) / PAGE_SIZE)
            .sum();
        assert_eq!(reserved, want);
        let cma = mm
            .reservations()
            .iter()
            .find(|r| r.kind == ReserveKind::DmaReserve)
            .unwrap();
        assert!(rs.iter().any(|r| r.kind == RunKind::Reserved
            && r.start() <= cma.start
            && r.end_pfn() * PAGE_SIZE >= cma.end));
        // The allocated block is an Allocated run that contains it.
        assert!(rs.iter().any(|r| r.kind == RunKind::Allocated
            && r.start() <= a
            && r.end_pfn() * PAGE_SIZE >= a + (8 << 12)));
    }

    #[test]
    fn free_runs_count_blocks_by_order() {
        let mut host = HostMm::three_zones(32 << 20, 0, "").unwrap();
        let mm: &mut MemoryManager = &mut host;
        // Split a high-order block: frees of alternate order-0 pages leave
        // isolated free pages.
        let pages: std::vec::Vec<u64> = (0..64)
            .map(|_| mm.alloc_pages(0, Gfp::KERNEL).unwrap())
            .collect();
        for p in pages.iter().step_by(2) {
            mm.free_pages(*p, 0).unwrap();
        }
        let mut per_order = [0u64; crate::MAX_ORDER_LIMIT];
        for r in mm.frame_runs() {
            if let RunKind::Free(o) = r.kind {
                assert_eq!(r.pages % (1 << o), 0, "whole blocks");
                per_order[o as usize] += r.pages >> o;
            }
        }
        let mut want = [0u64; crate::MAX_ORDER_LIMIT];
        for z in mm.zoneinfo() {
            for (w, n) in want.iter_mut().zip(z.nr_free) {
                *w += n;
            }
        }
        assert_eq!(per_order, want);
    }

    /// Runs of windows `[k*w, (k+1)*w)`, adjacent runs of one kind merged.
    fn windowed(mm: &MemoryManager, w: u64) -> std::vec::Vec<FrameRun> {
        let mut out: std::vec::Vec<FrameRun> = std::vec::Vec::new();
        let n = mm.nr_frames() as u64;
        let mut from = 0;
        while from < n {
            for r in mm.frame_runs_in(from, from + w) {
                match out.last_mut() {
                    Some(l) if l.kind == r.kind && l.end_pfn() == r.start_pfn => l.pages += r.pages,
                    _ => out.push(r),
                }
            }
            from += w;
        }
        out
    }

    #[test]
    fn windows_starting_inside_blocks_add_up_to_the_whole_walk() {
        let mut host = HostMm::three_zones(32 << 20, 0, "memd.dma_reserve=4M@dma32").unwrap();
        let mm: &mut MemoryManager = &mut host;
        let _a = mm.alloc_pages(5, Gfp::KERNEL).unwrap();
        let c = mm
            .cache_create("w", 3000, 8, SlabFlags::NONE, None)
            .unwrap();
        let _o = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
        let pages: std::vec::Vec<u64> = (0..40)
            .map(|_| mm.alloc_pages(0, Gfp::KERNEL).unwrap())
            .collect();
        for p in pages.iter().step_by(3) {
            mm.free_pages(*p, 0).unwrap();
        }
        let whole = runs(mm);
        for w in [1, 3, 7, 64, 1000, 1 << 20] {
            assert_eq!(windowed(mm, w), whole, "windows of {w} frames");
        }
        // A window ends where it is told, even inside a block.
        let big = whole.iter().find(|r| r.pages > 8).unwrap();
        let cut: std::vec::Vec<FrameRun> = mm
            .frame_runs_in(big.start_pfn + 3, big.start_pfn + 5)
            .collect();
        assert_eq!(
            cut,
            [FrameRun {
                start_pfn: big.start_pfn + 3,
                pages: 2,
                kind: big.kind
            }]
        );
    }
}
