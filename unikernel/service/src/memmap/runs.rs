//! A map's runs in a bounded slice. When the exact runs do not fit,
//! [`RunSink`] summarises cells of `granule` pages (a power of two), each
//! taking the kind that covers most of it, and merges equal neighbours.
//! [`RunWalk`] takes the runs a window of frames at a time and picks the
//! granule.

use memd_wire::RunKind;

use memd_mm::FrameRun;

/// Number of distinct [`RunKind`]s a cell tally tells apart: free orders
/// 0..32 and the nine other kinds.
const KINDS: usize = 32 + 9;

fn kind_index(k: RunKind) -> usize {
    match k {
        RunKind::Free(o) => (o as usize).min(31),
        RunKind::Pcp => 32,
        RunKind::Allocated => 33,
        RunKind::Slab => 34,
        RunKind::Large => 35,
        RunKind::Pool => 36,
        RunKind::Reserved => 37,
        RunKind::Absent => 38,
        RunKind::Uninitialised => 39,
        RunKind::Balloon => 40,
    }
}

fn kind_of(i: usize) -> RunKind {
    match i {
        0..=31 => RunKind::Free(i as u8),
        32 => RunKind::Pcp,
        33 => RunKind::Allocated,
        34 => RunKind::Slab,
        35 => RunKind::Large,
        36 => RunKind::Pool,
        37 => RunKind::Reserved,
        38 => RunKind::Absent,
        39 => RunKind::Uninitialised,
        _ => RunKind::Balloon,
    }
}

/// The run didn't fit: the sink is full at this granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Where a [`RunSink`] stands, kept between the windows of a [`RunWalk`].
#[derive(Debug, Clone, Copy)]
pub struct SinkState {
    len: usize,
    granule: u64,
    /// The cell being tallied (granule > 1): its first frame and what
    /// covers it so far.
    cell: u64,
    tally: [u64; KINDS],
    tallied: u64,
}

impl SinkState {
    /// An empty sink with cells of `granule` pages.
    pub fn new(granule: u64) -> Self {
        SinkState {
            len: 0,
            granule: granule.max(1),
            cell: 0,
            tally: [0; KINDS],
            tallied: 0,
        }
    }
}

/// Collects runs in address order into a fixed slice, summarising cells of
/// `granule` pages (1 = exact), from where `st` says the sink stands.
/// Never allocates.
pub struct RunSink<'a> {
    out: &'a mut [FrameRun],
    st: &'a mut SinkState,
}

impl<'a> RunSink<'a> {
    /// A sink writing into `out` from where `st` stands.
    pub fn new(out: &'a mut [FrameRun], st: &'a mut SinkState) -> Self {
        RunSink { out, st }
    }

    fn emit(&mut self, start_pfn: u64, pages: u64, kind: RunKind) -> Result<(), Full> {
        if let Some(last) = self.st.len.checked_sub(1).map(|i| &mut self.out[i]) {
            if last.kind == kind && last.start_pfn + last.pages == start_pfn {
                last.pages += pages;
                return Ok(());
            }
        }
        let slot = self.out.get_mut(self.st.len).ok_or(Full)?;
        *slot = FrameRun {
            start_pfn,
            pages,
            kind,
        };
        self.st.len += 1;
        Ok(())
    }

    fn flush_cell(&mut self) -> Result<(), Full> {
        if self.st.tallied == 0 {
            return Ok(());
        }
        let mut best = 0;
        for i in 1..KINDS {
            if self.st.tally[i] > self.st.tally[best] {
                best = i;
            }
        }
        let (cell, pages) = (self.st.cell, self.st.tallied);
        self.st.tally = [0; KINDS];
        self.st.tallied = 0;
        self.emit(cell, pages, kind_of(best))
    }

    /// Adds `pages` frames of `kind` at `start_pfn`; runs must come in
    /// address order without gaps.
    pub fn push(&mut self, start_pfn: u64, pages: u64, kind: RunKind) -> Result<(), Full> {
        if self.st.granule == 1 {
            return self.emit(start_pfn, pages, kind);
        }
        let g = self.st.granule;
        let (mut pfn, end) = (start_pfn, start_pfn + pages);
        while pfn < end {
            let cell = pfn / g * g;
            if self.st.tallied > 0 && cell != self.st.cell {
                self.flush_cell()?;
            }
            if self.st.tallied == 0 && pfn == cell && end - pfn >= g {
                // Whole cells of one kind: no tally needed.
                let whole = (end - pfn) / g * g;
                self.emit(pfn, whole, kind)?;
                pfn += whole;
                continue;
            }
            self.st.cell = cell;
            let take = (cell + g).min(end) - pfn;
            self.st.tally[kind_index(kind)] += take;
            self.st.tallied += take;
            pfn += take;
        }
        Ok(())
    }

    /// Flushes the last cell; returns the number of runs written.
    pub fn finish(mut self) -> Result<usize, Full> {
        self.flush_cell()?;
        Ok(self.st.len)
    }
}

/// A map's runs taken a window of frames at a time into a fixed slice, at
/// the finest granule that fits: exact first; when the runs outgrow the
/// slice, the walk starts again with coarser cells (`coarser`), up to
/// one that always fits. The table may change between windows.
#[derive(Debug, Clone, Copy)]
pub struct RunWalk {
    sink: SinkState,
    /// The next frame to walk.
    pfn: u64,
    /// Where the runs taken so far end.
    reached: u64,
    /// The runs outgrew the slice: the rest of the window is ignored.
    full: bool,
}

impl Default for RunWalk {
    fn default() -> Self {
        Self::new()
    }
}

impl RunWalk {
    /// A walk from frame 0, exact.
    pub fn new() -> Self {
        Self::at_granule(1)
    }

    fn at_granule(granule: u64) -> Self {
        RunWalk {
            sink: SinkState::new(granule),
            pfn: 0,
            reached: 0,
            full: false,
        }
    }

    /// Frames walked so far.
    pub fn walked(&self) -> u64 {
        self.pfn
    }

    /// The next window, `size` frames of a table of `nr_frames`.
    pub fn window(&self, size: u64, nr_frames: u64) -> (u64, u64) {
        (self.pfn, self.pfn.saturating_add(size).min(nr_frames))
    }

    /// Takes the window's next run, in address order, into `out`.
    pub fn push(&mut self, out: &mut [FrameRun], r: FrameRun) {
        if self.full {
            return;
        }
        match RunSink::new(out, &mut self.sink).push(r.start_pfn, r.pages, r.kind) {
            Ok(()) => self.reached = r.start_pfn + r.pages,
            Err(Full) => self.full = true,
        }
    }

    /// Ends the window that ends at frame `to` of `nr_frames`: the number
    /// of runs in `out` and their granule once the map is complete, None
    /// while there is more to walk (from the start again, coarser, if the
    /// runs outgrew `out`).
    pub fn end_window(
        &mut self,
        out: &mut [FrameRun],
        to: u64,
        nr_frames: u64,
    ) -> Option<(usize, u64)> {
        let granule = self.sink.granule;
        if !self.full && to >= nr_frames {
            match RunSink::new(out, &mut self.sink).finish() {
                Ok(n) => return Some((n, granule)),
                Err(Full) => self.full = true,
            }
        }
        if !self.full {
            self.pfn = to;
            return None;
        }
        match coarser(granule, self.reached, nr_frames, out.len()) {
            Some(g) => {
                *self = RunWalk::at_granule(g);
                None
            }
            // Cannot happen (each cell yields at most one run); stay
            // bounded anyway.
            None => Some((0, granule)),
        }
    }
}

/// The granule to try after cells of `granule` pages filled `slots` runs
/// having reached frame `reached` of `nr_frames`: the runs per frame so
/// far, extrapolated to the whole table with room to spare, never finer
/// than twice the last try, never coarser than one that always fits.
/// None when `granule` already always fits.
fn coarser(granule: u64, reached: u64, nr_frames: u64, slots: usize) -> Option<u64> {
    let cap = slots.max(1) as u64;
    let safe = nr_frames.div_ceil(cap).max(1).next_power_of_two();
    if granule >= safe {
        return None;
    }
    let reached = reached.max(1);
    let estimate = (nr_frames / reached + 1).saturating_mul(2 * granule);
    Some(estimate.max(granule * 2).next_power_of_two().min(safe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memmap::EMPTY_RUN;
    use alloc::vec;

    fn run(start_pfn: u64, pages: u64, kind: RunKind) -> FrameRun {
        FrameRun {
            start_pfn,
            pages,
            kind,
        }
    }

    /// Alternating single pages: a fragmented table.
    fn checkerboard(n: u64) -> impl Fn() -> std::vec::IntoIter<FrameRun> {
        move || {
            (0..n)
                .map(|p| {
                    let k = if p % 2 == 0 {
                        RunKind::Free(0)
                    } else {
                        RunKind::Allocated
                    };
                    run(p, 1, k)
                })
                .collect::<std::vec::Vec<_>>()
                .into_iter()
        }
    }

    extern crate std;

    fn assert_cover(out: &[FrameRun], n: u64) {
        let mut pfn = 0;
        for r in out {
            assert_eq!(r.start_pfn, pfn, "contiguous");
            pfn += r.pages;
        }
        assert_eq!(pfn, n, "complete");
        for w in out.windows(2) {
            assert!(w[0].kind != w[1].kind, "merged");
        }
    }

    /// The runs of `runs()` (the whole table's, each time the walk starts
    /// again) taken in one window.
    fn collect<I: Iterator<Item = FrameRun>>(
        out: &mut [FrameRun],
        nr_frames: u64,
        runs: impl Fn() -> I,
    ) -> (usize, u64) {
        let mut walk = RunWalk::new();
        for _ in 0..64 {
            let (from, to) = walk.window(nr_frames, nr_frames);
            assert_eq!((from, to), (0, nr_frames));
            for r in runs() {
                walk.push(out, r);
            }
            if let Some(done) = walk.end_window(out, to, nr_frames) {
                return done;
            }
        }
        panic!("no granule fits");
    }

    #[test]
    fn exact_when_it_fits() {
        let mut out = [EMPTY_RUN; 16];
        let runs = || {
            [
                run(0, 1, RunKind::Reserved),
                run(1, 255, RunKind::Absent),
                run(256, 512, RunKind::Free(9)),
                run(768, 3, RunKind::Slab),
            ]
            .into_iter()
        };
        let (n, g) = collect(&mut out, 771, runs);
        assert_eq!((n, g), (4, 1));
        assert_eq!(out[3], run(768, 3, RunKind::Slab));
    }

    #[test]
    fn coarsens_to_fit_and_keeps_the_dominant_kind() {
        let mut out = [EMPTY_RUN; 64];
        // 4096 alternating pages then a long slab run: cannot be exact.
        let n = 4096u64;
        let runs = || {
            let mut v: std::vec::Vec<FrameRun> = checkerboard(n)().collect();
            v.push(run(n, 4096, RunKind::Slab));
            v.into_iter()
        };
        let (len, g) = collect(&mut out, 2 * n, runs);
        assert!(g > 1 && g.is_power_of_two());
        assert!(len <= out.len());
        assert_cover(&out[..len], 2 * n);
        // The slab half stays slab, exactly.
        let slab: u64 = out[..len]
            .iter()
            .filter(|r| r.kind == RunKind::Slab)
            .map(|r| r.pages)
            .sum();
        assert_eq!(slab, 4096);
    }

    #[test]
    fn cells_take_the_majority() {
        let mut out = [EMPTY_RUN; 8];
        let mut st = SinkState::new(4);
        let mut sink = RunSink::new(&mut out, &mut st);
        // Cell 0: 3 allocated + 1 free; cell 1: 1 slab + 3 free.
        sink.push(0, 3, RunKind::Allocated).unwrap();
        sink.push(3, 1, RunKind::Free(0)).unwrap();
        sink.push(4, 1, RunKind::Slab).unwrap();
        sink.push(5, 3, RunKind::Free(0)).unwrap();
        let n = sink.finish().unwrap();
        assert_eq!(
            &out[..n],
            &[run(0, 4, RunKind::Allocated), run(4, 4, RunKind::Free(0))]
        );
    }

    #[test]
    fn worst_case_fragmentation_stays_bounded() {
        let n = 1 << 16;
        let mut out = vec![EMPTY_RUN; 100];
        let (len, g) = collect(&mut out, n, checkerboard(n));
        assert!(len <= 100, "{len}");
        assert!(g <= n.div_ceil(100).next_power_of_two());
        assert_cover(&out[..len], n);
    }
}
