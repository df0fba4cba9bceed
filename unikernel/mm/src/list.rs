//! Intrusive lists of frames, linked through the frame table (Linux's
//! `list_head` in `struct page`): the buddy's free lists, slab lists, the
//! balloon's blocks.

use crate::frame::{Frame, NIL};
use crate::sparse::Frames;

/// An intrusive doubly linked list of frames, linked through
/// `Frame::next`/`prev` (Linux's `list_head` in `struct page`).
#[derive(Clone, Copy, Debug)]
pub struct FrameList {
    pub head: u32,
    pub len: u32,
}

impl Default for FrameList {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameList {
    pub const fn new() -> Self {
        Self { head: NIL, len: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.head == NIL
    }

    /// Pushes `pfn` at the front.
    #[inline(always)]
    pub fn push(&mut self, frames: &mut Frames, pfn: u32) {
        let head = self.head;
        frames[pfn as usize].next = head;
        frames[pfn as usize].prev = NIL;
        if head != NIL {
            frames[head as usize].prev = pfn;
        }
        self.head = pfn;
        self.len += 1;
    }

    /// Unlinks `pfn`, which must be on this list.
    #[inline(always)]
    pub fn remove(&mut self, frames: &mut Frames, pfn: u32) {
        let Frame { next, prev, .. } = frames[pfn as usize];
        if prev == NIL {
            self.head = next;
        } else {
            frames[prev as usize].next = next;
        }
        if next != NIL {
            frames[next as usize].prev = prev;
        }
        frames[pfn as usize].next = NIL;
        frames[pfn as usize].prev = NIL;
        self.len -= 1;
    }

    /// Removes and returns the first frame.
    #[inline(always)]
    pub fn pop(&mut self, frames: &mut Frames) -> Option<u32> {
        let head = self.head;
        if head == NIL {
            return None;
        }
        self.remove(frames, head);
        Some(head)
    }

    /// Iterates the list's frame numbers (for statistics and checks).
    pub fn iter<'a>(&self, frames: &'a Frames) -> FrameListIter<'a> {
        FrameListIter {
            frames,
            cur: self.head,
            budget: self.len as usize + 1,
        }
    }
}

/// Iterator over a [`FrameList`]; stops after `len + 1` steps so that a
/// corrupted (cyclic) list cannot hang the invariant checker.
pub struct FrameListIter<'a> {
    frames: &'a Frames,
    cur: u32,
    budget: usize,
}

impl Iterator for FrameListIter<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.cur == NIL || self.budget == 0 || self.frames.get(self.cur as usize).is_none() {
            return None;
        }
        self.budget -= 1;
        let pfn = self.cur;
        self.cur = self.frames[pfn as usize].next;
        Some(pfn)
    }
}
