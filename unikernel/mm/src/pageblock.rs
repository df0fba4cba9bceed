//! Pageblocks: the frame table in aligned runs of `2^(max_order - 1)`
//! frames, the largest buddy block (Linux's `pageblock_order`).
//!
//! A block never straddles two pageblocks, so what one pageblock holds can
//! be counted on its own. memd keeps those counts as frames change state
//! (free in the buddy, slab, large kmalloc, mempool, vmalloc), which lets
//! the invariant checker walk the frame table a pageblock at a time while
//! memory is in use ([`crate::CheckWalk`]): each pageblock's frames are
//! held against its counts at the moment it is walked, and the counts'
//! sums against the global counters at the end. Allocated and pcp frames
//! are what is left of the pageblock's managed frames; they are not
//! counted, so the page allocator's fast path does not pay for this.

/// What a pageblock's counts are kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Free in the buddy (the zone's `free`).
    Free = 0,
    Slab = 1,
    Large = 2,
    Pool = 3,
    Vmalloc = 4,
    /// Free, but off the free lists while the host is told about it.
    Isolated = 5,
}

pub(crate) const HELD_KINDS: usize = 6;

/// One pageblock's frames: by [`Held`], and how many it handed to the
/// buddy when it was initialised (its managed frames, fixed from then on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) held: [u32; HELD_KINDS],
    pub(crate) managed: u32,
}

/// The counts of every pageblock, indexed by `pfn >> order`: the boot
/// table's in one slice, a hot-plug region's per section (`sparse.rs`),
/// present while the section has frames.
pub(crate) struct Pageblocks {
    pub(crate) counts: &'static mut [Counts],
    pub(crate) order: u32,
    /// Index of the hot-plug region's first pageblock.
    hot_first: usize,
    /// Pageblocks per section, as a shift.
    hot_shift: u32,
    pub(crate) hot: &'static mut [Option<&'static mut [Counts]>],
}

impl Pageblocks {
    pub(crate) const fn new() -> Self {
        Pageblocks {
            counts: &mut [],
            order: 0,
            hot_first: usize::MAX,
            hot_shift: 0,
            hot: &mut [],
        }
    }

    /// The counts of pageblock `i`, if it exists.
    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> Option<&Counts> {
        match self.counts.get(i) {
            Some(c) => Some(c),
            None => {
                let rel = i.checked_sub(self.hot_first)?;
                let section = self.hot.get(rel >> self.hot_shift)?.as_deref()?;
                section.get(rel & ((1 << self.hot_shift) - 1))
            }
        }
    }

    #[inline(always)]
    fn get_mut(&mut self, i: usize) -> Option<&mut Counts> {
        if i < self.counts.len() {
            return self.counts.get_mut(i);
        }
        let rel = i.checked_sub(self.hot_first)?;
        let mask = (1 << self.hot_shift) - 1;
        let section = self.hot.get_mut(rel >> self.hot_shift)?.as_deref_mut()?;
        section.get_mut(rel & mask)
    }

    /// Gives the hot-plug region, from pageblock `first` on, its table of
    /// sections of `2^shift` pageblocks.
    pub(crate) fn set_region(
        &mut self,
        first: usize,
        shift: u32,
        hot: &'static mut [Option<&'static mut [Counts]>],
    ) {
        self.hot_first = first;
        self.hot_shift = shift;
        self.hot = hot;
    }

    /// Section `s`'s counts, if it has frames.
    pub(crate) fn section(&self, s: usize) -> Option<&[Counts]> {
        self.hot.get(s)?.as_deref()
    }

    pub(crate) fn section_add(&mut self, s: usize, counts: &'static mut [Counts]) {
        self.hot[s] = Some(counts);
    }

    pub(crate) fn section_remove(&mut self, s: usize) -> Option<&'static mut [Counts]> {
        self.hot.get_mut(s)?.take()
    }

    /// Walk positions: the boot pageblocks, then every pageblock of the
    /// region's sections (present or not).
    pub(crate) fn positions(&self) -> usize {
        self.counts.len() + (self.hot.len() << self.hot_shift)
    }

    /// The pageblock at walk position `p`, `None` when it has no counts (a
    /// section without frames).
    pub(crate) fn at_position(&self, p: usize) -> Option<usize> {
        if p < self.counts.len() {
            return Some(p);
        }
        let i = self.hot_first + (p - self.counts.len());
        self.get(i).map(|_| i)
    }

    /// Pageblocks needed for `nr_frames` frames with blocks up to
    /// `2^order`.
    pub(crate) fn needed(nr_frames: u64, order: u32) -> u64 {
        nr_frames.div_ceil(1 << order)
    }

    #[inline(always)]
    pub(crate) fn add(&mut self, pfn: u32, held: Held, pages: u32) {
        if let Some(c) = self.get_mut((pfn >> self.order) as usize) {
            c.held[held as usize] += pages;
        }
    }

    #[inline(always)]
    pub(crate) fn sub(&mut self, pfn: u32, held: Held, pages: u32) {
        if let Some(c) = self.get_mut((pfn >> self.order) as usize) {
            c.held[held as usize] -= pages;
        }
    }

    /// Counts `pages` from `pfn` as handed to the buddy at initialisation.
    pub(crate) fn add_managed(&mut self, pfn: u32, pages: u32) {
        if let Some(c) = self.get_mut((pfn >> self.order) as usize) {
            c.managed += pages;
        }
    }

    /// Uncounts `pages` from `pfn` as managed (unplugged memory).
    pub(crate) fn sub_managed(&mut self, pfn: u32, pages: u32) {
        if let Some(c) = self.get_mut((pfn >> self.order) as usize) {
            c.managed -= pages;
        }
    }

    /// The frames `[start, end)` of pageblock `i`.
    pub(crate) fn span(&self, i: usize) -> (usize, usize) {
        (i << self.order, (i + 1) << self.order)
    }

    /// Each kind's count, and the managed frames, summed over all
    /// pageblocks.
    pub(crate) fn totals(&self) -> ([u64; HELD_KINDS], u64) {
        let (mut t, mut managed) = ([0u64; HELD_KINDS], 0);
        let hot = self.hot.iter().filter_map(|s| s.as_deref()).flatten();
        for c in self.counts.iter().chain(hot) {
            for (sum, n) in t.iter_mut().zip(c.held) {
                *sum += n as u64;
            }
            managed += c.managed as u64;
        }
        (t, managed)
    }
}
