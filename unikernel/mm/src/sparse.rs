//! The frame table in sections (Linux's SPARSEMEM): memory that arrives at
//! run time gets frame descriptors for just the sections it touches.
//!
//! Boot memory keeps one contiguous table from frame 0 (memblock carves
//! it, `deferred.rs` initialises it), so the paths that only ever see boot
//! memory index a slice as before. A hot-plug region (`memory_hotplug.rs`)
//! is cut into sections of [`SECTION_SHIFT`] bits of frames (128 MiB, as
//! on x86-64 Linux, or one pageblock if that is larger); a section's 16
//! bytes a frame, and its pageblocks' counts, are allocated when memory in
//! it is first plugged and freed when its last frame is unplugged. A frame
//! of a section without memory does not exist: [`Frames::get`] says `None`
//! and indexing it panics, as indexing past the boot table always did.

use core::ops::{Index, IndexMut};

use crate::frame::Frame;

/// Frames per section, as a shift: 2^15 frames are 128 MiB.
pub(crate) const SECTION_SHIFT: u32 = 15;

/// The frame table: the boot table's initialised prefix, then the
/// sections of a hot-plug region.
pub struct Frames {
    pub(crate) boot: &'static mut [Frame],
    /// First frame of the hot-plug region's first section.
    hot_start: usize,
    /// Frames per section, as a shift.
    shift: u32,
    /// Each section's frames, `None` while none of its memory is plugged.
    sections: &'static mut [Option<&'static mut [Frame]>],
}

impl Frames {
    pub(crate) const fn new() -> Self {
        Frames {
            boot: &mut [],
            hot_start: usize::MAX,
            shift: SECTION_SHIFT,
            sections: &mut [],
        }
    }

    /// Frames of the boot table initialised so far.
    #[inline(always)]
    pub(crate) fn boot_len(&self) -> usize {
        self.boot.len()
    }

    /// One past the last frame the table may describe: the boot table's
    /// end, or the hot-plug region's.
    pub(crate) fn end(&self) -> usize {
        if self.sections.is_empty() {
            self.boot.len()
        } else {
            self.hot_start + (self.sections.len() << self.shift)
        }
    }

    /// The frame `pfn`, if it exists.
    #[inline(always)]
    pub(crate) fn get(&self, pfn: usize) -> Option<&Frame> {
        match self.boot.get(pfn) {
            Some(f) => Some(f),
            None => self.hot(pfn),
        }
    }

    #[inline(always)]
    pub(crate) fn get_mut(&mut self, pfn: usize) -> Option<&mut Frame> {
        if pfn < self.boot.len() {
            return self.boot.get_mut(pfn);
        }
        self.hot_mut(pfn)
    }

    // Out of line and cold: boot memory's frames, the common case, keep a
    // slice access and one compare.
    #[cold]
    #[inline(never)]
    fn hot(&self, pfn: usize) -> Option<&Frame> {
        let rel = pfn.checked_sub(self.hot_start)?;
        let section = self.sections.get(rel >> self.shift)?.as_deref()?;
        section.get(rel & ((1 << self.shift) - 1))
    }

    #[cold]
    #[inline(never)]
    fn hot_mut(&mut self, pfn: usize) -> Option<&mut Frame> {
        let rel = pfn.checked_sub(self.hot_start)?;
        let mask = (1 << self.shift) - 1;
        let section = self.sections.get_mut(rel >> self.shift)?.as_deref_mut()?;
        section.get_mut(rel & mask)
    }

    /// One past the last frame of the piece of the table that holds `pfn`
    /// (the boot table's initialised prefix, or a section with frames);
    /// `pfn` itself when no frame `pfn` exists.
    pub(crate) fn run_end(&self, pfn: usize) -> usize {
        if pfn < self.boot.len() {
            return self.boot.len();
        }
        if self.hot(pfn).is_none() {
            return pfn;
        }
        let (_, first) = self.section_of(pfn);
        first + self.section_frames()
    }

    /// The first frame from `pfn` on that exists (`end()` if none).
    pub(crate) fn next_present(&self, pfn: usize) -> usize {
        if pfn < self.boot.len() {
            return pfn;
        }
        let mut s = match pfn.checked_sub(self.hot_start) {
            Some(rel) => rel >> self.shift,
            None => 0,
        };
        while s < self.sections.len() {
            let first = self.hot_start + (s << self.shift);
            if self.sections[s].is_some() {
                return first.max(pfn);
            }
            s += 1;
        }
        self.end().max(pfn + 1)
    }

    /// Every frame that exists, with its number.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &Frame)> {
        let hot_start = self.hot_start;
        let shift = self.shift;
        self.boot.iter().enumerate().chain(
            self.sections
                .iter()
                .enumerate()
                .filter_map(|(s, f)| Some((s, f.as_deref()?)))
                .flat_map(move |(s, f)| {
                    f.iter()
                        .enumerate()
                        .map(move |(i, f)| (hot_start + (s << shift) + i, f))
                }),
        )
    }

    /// Whether frame `pfn` lies in the hot-plug region (plugged or not).
    pub(crate) fn in_hot_region(&self, pfn: usize) -> bool {
        pfn >= self.hot_start && pfn < self.end() && !self.sections.is_empty()
    }

    /// The section holding `pfn`, and its first frame.
    pub(crate) fn section_of(&self, pfn: usize) -> (usize, usize) {
        let s = (pfn - self.hot_start) >> self.shift;
        (s, self.hot_start + (s << self.shift))
    }

    /// Frames per section.
    pub(crate) fn section_frames(&self) -> usize {
        1 << self.shift
    }

    /// Sections with frames.
    pub(crate) fn sections_present(&self) -> usize {
        self.sections.iter().filter(|s| s.is_some()).count()
    }

    /// Whether section `s` has frames.
    pub(crate) fn section_present(&self, s: usize) -> bool {
        self.sections.get(s).is_some_and(|x| x.is_some())
    }

    /// The region's sections' table, empty before a region is added.
    pub(crate) fn set_region(
        &mut self,
        hot_start: usize,
        shift: u32,
        sections: &'static mut [Option<&'static mut [Frame]>],
    ) {
        self.hot_start = hot_start;
        self.shift = shift;
        self.sections = sections;
    }

    /// Gives section `s` its frames (`frames` is `section_frames()` long).
    pub(crate) fn section_add(&mut self, s: usize, frames: &'static mut [Frame]) {
        self.sections[s] = Some(frames);
    }

    /// Takes section `s`'s frames out; their memory is the caller's to free.
    pub(crate) fn section_remove(&mut self, s: usize) -> Option<&'static mut [Frame]> {
        self.sections.get_mut(s)?.take()
    }
}

impl Index<usize> for Frames {
    type Output = Frame;

    #[inline(always)]
    fn index(&self, pfn: usize) -> &Frame {
        match self.boot.get(pfn) {
            Some(f) => f,
            None => self.hot(pfn).expect("frame outside the frame table"),
        }
    }
}

impl IndexMut<usize> for Frames {
    #[inline(always)]
    fn index_mut(&mut self, pfn: usize) -> &mut Frame {
        if pfn < self.boot.len() {
            return &mut self.boot[pfn];
        }
        self.hot_mut(pfn).expect("frame outside the frame table")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::vec;

    fn leak(n: usize) -> &'static mut [Frame] {
        Box::leak(vec![Frame::EMPTY; n].into_boxed_slice())
    }

    #[test]
    fn boot_then_sections() {
        let mut f = Frames::new();
        f.boot = leak(100);
        let sections = Box::leak(vec![None, None, None].into_boxed_slice());
        f.set_region(1 << 20, 4, sections);
        assert_eq!(f.end(), (1 << 20) + 48);
        assert!(f.get(99).is_some());
        assert!(f.get(100).is_none());
        assert!(
            f.get((1 << 20) + 17).is_none(),
            "section 1 has no frames yet"
        );
        f.section_add(1, leak(16));
        f.get_mut((1 << 20) + 17).unwrap().count = 7;
        assert_eq!(f[(1 << 20) + 17].count, 7);
        assert!(f.get((1 << 20) + 15).is_none());
        assert!(f.get((1 << 20) + 32).is_none());
        assert_eq!(f.section_of((1 << 20) + 17), (1, (1 << 20) + 16));
        assert!(f.in_hot_region((1 << 20) + 47) && !f.in_hot_region((1 << 20) + 48));
        assert_eq!(f.section_remove(1).map(|s| s.len()), Some(16));
        assert!(f.get((1 << 20) + 17).is_none());
    }

    #[test]
    #[should_panic(expected = "outside the frame table")]
    fn a_frame_without_a_section_panics() {
        let mut f = Frames::new();
        f.boot = leak(4);
        let _ = &f[4];
    }
}
