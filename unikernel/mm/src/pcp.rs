//! Per-CPU page lists (Linux's `per_cpu_pages`): a small stack of free
//! order-0 frames in front of each zone's buddy lists.
//!
//! Most page allocations are single frames that are freed soon after; the
//! list serves them with a push and a pop, and talks to the buddy allocator
//! only in batches, which is where the split/merge cost goes. memd polls on
//! one CPU, so there is one list per zone.

/// Frames moved between the buddy lists and a pcp list at a time.
pub const PCP_BATCH: usize = 31;
/// Above this many frames the list drains a batch back to the buddy.
pub const PCP_HIGH: usize = 6 * PCP_BATCH;

pub struct Pcp {
    pub count: usize,
    pub frames: [u32; PCP_HIGH],
}

impl Default for Pcp {
    fn default() -> Self {
        Self::new()
    }
}

impl Pcp {
    pub const fn new() -> Self {
        Pcp {
            count: 0,
            frames: [0; PCP_HIGH],
        }
    }

    #[inline(always)]
    pub fn pop(&mut self) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        Some(self.frames[self.count])
    }

    /// Pushes a frame; the caller drains first when the list is full.
    #[inline(always)]
    pub fn push(&mut self, pfn: u32) {
        self.frames[self.count] = pfn;
        self.count += 1;
    }

    #[inline(always)]
    pub fn is_full(&self) -> bool {
        self.count == PCP_HIGH
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.frames[..self.count]
    }
}
