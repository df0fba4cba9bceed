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

/// The counts of every pageblock, indexed by `pfn >> order`.
pub(crate) struct Pageblocks {
    pub(crate) counts: &'static mut [Counts],
    pub(crate) order: u32,
}

impl Pageblocks {
    pub(crate) const fn new() -> Self {
        Pageblocks {
            counts: &mut [],
            order: 0,
        }
    }

    /// Pageblocks needed for `nr_frames` frames with blocks up to
    /// `2^order`.
    pub(crate) fn needed(nr_frames: u64, order: u32) -> u64 {
        nr_frames.div_ceil(1 << order)
    }

    #[inline(always)]
    pub(crate) fn add(&mut self, pfn: u32, held: Held, pages: u32) {
        if let Some(c) = self.counts.get_mut((pfn >> self.order) as usize) {
            c.held[held as usize] += pages;
        }
    }

    #[inline(always)]
    pub(crate) fn sub(&mut self, pfn: u32, held: Held, pages: u32) {
        if let Some(c) = self.counts.get_mut((pfn >> self.order) as usize) {
            c.held[held as usize] -= pages;
        }
    }

    /// Counts `pages` from `pfn` as handed to the buddy at initialisation.
    pub(crate) fn add_managed(&mut self, pfn: u32, pages: u32) {
        if let Some(c) = self.counts.get_mut((pfn >> self.order) as usize) {
            c.managed += pages;
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
        for c in self.counts.iter() {
            for (sum, n) in t.iter_mut().zip(c.held) {
                *sum += n as u64;
            }
            managed += c.managed as u64;
        }
        (t, managed)
    }
}
