//! Memory hot-plug: memory that arrives and leaves while memd runs (Linux's
//! `mm/memory_hotplug.c`), for a virtio-mem device.
//!
//! The device's region is declared once ([`MemoryManager::add_memory_region`]):
//! memd-mm gets a table of its sections (`sparse.rs`), no frames yet.
//! [`MemoryManager::online_pages`] puts plugged memory in ZONE_MOVABLE: the
//! sections it touches get their frame descriptors (from the kernel's own
//! zones, never from the memory being plugged), its frames go to the
//! buddy, and watermarks and zonelists follow. Only `MOVABLE` requests
//! are served there (client pages, DMA buffers that ask for it), never
//! memd-mm's own structures, so the zone's memory is free again once its
//! users free it.
//!
//! [`MemoryManager::offline_pages`] takes memory back out, and only if
//! every frame of it is free: memd has no page migration, so memory in use
//! stays where it is and the caller tries again later. Frames of a
//! section that are not plugged read `Reserved` (as Linux marks offline
//! pages); a section's descriptors are freed with its last plugged frame.

use crate::buddy;
use crate::error::MmError;
use crate::frame::{Frame, FrameState};
use crate::memblock::PAGE_SIZE;
use crate::pageblock::{Counts, Held};
use crate::sparse::SECTION_SHIFT;
use crate::zone::{self, ZoneType};
use crate::MemoryManager;

/// The hot-plug region and how much of it is plugged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotplugRegion {
    /// Physical address of the region's first byte.
    pub start: u64,
    pub size: u64,
    /// Bytes online in ZONE_MOVABLE (all of the zone: nothing else feeds it).
    pub plugged: u64,
    /// Sections with frame descriptors, and their descriptors' bytes.
    pub sections: u64,
    pub memmap_bytes: u64,
}

impl MemoryManager {
    /// Declares the hot-plug region `[start, start + size)`: above the boot
    /// memory (with a whole section between: the region's first section
    /// starts on a section boundary, below the region if it must), page
    /// aligned, once. No memory is online until
    /// [`MemoryManager::online_pages`].
    pub fn add_memory_region(&mut self, start: u64, size: u64) -> Result<(), MmError> {
        if self.hotplug.is_some() {
            return Err(MmError::Invalid("a hot-plug region is already declared"));
        }
        let end = start
            .checked_add(size)
            .ok_or(MmError::Invalid("hot-plug region past the address space"))?;
        if size == 0 || !start.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MmError::Invalid(
                "hot-plug region empty or not page aligned",
            ));
        }
        let order = self.pageblocks.order;
        let shift = SECTION_SHIFT.max(order);
        let first = ((start / PAGE_SIZE) >> shift) << shift;
        // The boot table (and its pageblock counts) ends below the first
        // section: no frame is both a boot frame and a section's.
        let boot_end = (self.table.carved() as u64).next_multiple_of(1 << order);
        if first < boot_end || end / PAGE_SIZE >= u32::MAX as u64 {
            return Err(MmError::Invalid(
                "hot-plug region shares a section with boot memory or is past 32-bit frame numbers",
            ));
        }
        let nr = ((end / PAGE_SIZE) - first).div_ceil(1 << shift) as usize;
        let sections = self.table_alloc(nr, || None)?;
        let counts = match self.table_alloc(nr, || None) {
            Ok(c) => c,
            Err(e) => {
                self.table_free(sections);
                return Err(e);
            }
        };
        self.frames.set_region(first as usize, shift, sections);
        self.pageblocks
            .set_region((first >> order) as usize, shift - order, counts);
        self.hotplug = Some((start, size));
        Ok(())
    }

    /// The zone frame `pfn` belongs to: Movable in the hot-plug region,
    /// else by its address.
    pub(crate) fn pfn_zone(&self, pfn: u64) -> ZoneType {
        if self.frames.in_hot_region(pfn as usize) {
            ZoneType::Movable
        } else {
            ZoneType::of_pfn(pfn)
        }
    }

    /// The hot-plug region, if one is declared.
    pub fn hotplug_region(&self) -> Option<HotplugRegion> {
        let (start, size) = self.hotplug?;
        let sections = self.frames.sections_present() as u64;
        Some(HotplugRegion {
            start,
            size,
            plugged: self.zones[ZoneType::Movable as usize].managed * PAGE_SIZE,
            sections,
            memmap_bytes: sections
                * (self.frames.section_frames() * core::mem::size_of::<Frame>()) as u64,
        })
    }

    /// The frames `[first, last)` of `[start, start + size)`, checked to lie
    /// in the region.
    fn hotplug_range(&self, start: u64, size: u64) -> Result<(u64, u64), MmError> {
        let (region_start, region_size) = self
            .hotplug
            .ok_or(MmError::Invalid("no hot-plug region declared"))?;
        if size == 0 || !start.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MmError::Invalid("range empty or not page aligned"));
        }
        if start < region_start || start.saturating_add(size) > region_start + region_size {
            return Err(MmError::Invalid("range outside the hot-plug region"));
        }
        Ok((start / PAGE_SIZE, (start + size) / PAGE_SIZE))
    }

    /// Puts plugged memory `[start, start + size)` online in ZONE_MOVABLE
    /// (Linux's `online_pages`). It must lie in the region and not be online
    /// already. Fails, changing nothing, without memory for the sections'
    /// frame descriptors.
    pub fn online_pages(&mut self, start: u64, size: u64) -> Result<(), MmError> {
        let (first, last) = self.hotplug_range(start, size)?;
        let frames_per = self.frames.section_frames() as u64;
        let mut pfn = first;
        while pfn < last {
            match self.frames.get(pfn as usize) {
                Some(f) if !f.is(FrameState::Reserved) => {
                    return Err(MmError::Invalid("range already online"))
                }
                Some(_) => pfn += 1,
                None => pfn = (pfn / frames_per + 1) * frames_per,
            }
        }
        // Descriptors for the sections without them, all or none: a section
        // with descriptors always has plugged memory, so on failure the
        // ones without any are the ones just given theirs.
        let mut pfn = first;
        while pfn < last {
            let (s, section_start) = self.frames.section_of(pfn as usize);
            if !self.frames.section_present(s) {
                if let Err(e) = self.section_populate(s) {
                    self.sections_tidy(first, pfn);
                    return Err(e);
                }
            }
            pfn = section_start as u64 + frames_per;
        }
        let zone = &mut self.zones[ZoneType::Movable as usize];
        for pfn in first..last {
            self.frames[pfn as usize] = Frame::EMPTY;
        }
        if zone.managed == 0 {
            zone.start_pfn = first;
            zone.end_pfn = last;
        } else {
            zone.start_pfn = zone.start_pfn.min(first);
            zone.end_pfn = zone.end_pfn.max(last);
        }
        zone.managed += last - first;
        buddy::give_range(
            zone,
            &mut self.frames,
            &mut self.pageblocks,
            first,
            last,
            self.max_order,
        );
        self.zones_changed();
        Ok(())
    }

    /// Takes `[start, start + size)` offline (Linux's `offline_pages`) if
    /// every frame of it is online and free; `Busy` with the frames in use
    /// otherwise, changing nothing (but the zone's pcp list, drained first).
    /// Offline memory may then be unplugged.
    pub fn offline_pages(&mut self, start: u64, size: u64) -> Result<(), MmError> {
        let (first, last) = self.hotplug_range(start, size)?;
        let count = self.zones[ZoneType::Movable as usize].pcp.count;
        self.pcp_drain(ZoneType::Movable, count);
        let busy = self.movable_busy(first, last)?;
        if busy > 0 {
            return Err(MmError::Busy { live: busy });
        }
        // Take every free block touching the range off the lists, and give
        // back its parts outside the range.
        let max_order = self.max_order;
        let mut pfn = first;
        while pfn < last {
            let (head, order) = self
                .free_block_covering(pfn)
                .expect("checked free just above");
            let zone = &mut self.zones[ZoneType::Movable as usize];
            zone.free_area[order as usize]
                .list
                .remove(&mut self.frames, head);
            if self.frames[head as usize].reported() {
                zone.reported -= 1 << order;
            }
            zone.free -= 1 << order;
            self.pageblocks.sub(head, Held::Free, 1 << order);
            self.frames[head as usize].clear();
            let end = head as u64 + (1 << order);
            for (a, b) in [(head as u64, first), (last, end)] {
                if a < b {
                    buddy::free_range(
                        zone,
                        &mut self.frames,
                        &mut self.pageblocks,
                        a,
                        b,
                        max_order,
                    );
                }
            }
            pfn = end;
        }
        for pfn in first..last {
            self.frames[pfn as usize].set(FrameState::Reserved, ZoneType::Movable, 0);
        }
        let mut pfn = first;
        while pfn < last {
            let block_end = ((pfn >> self.pageblocks.order) + 1) << self.pageblocks.order;
            let to = block_end.min(last);
            self.pageblocks.sub_managed(pfn as u32, (to - pfn) as u32);
            pfn = to;
        }
        let zone = &mut self.zones[ZoneType::Movable as usize];
        zone.managed -= last - first;
        if zone.managed == 0 {
            zone.start_pfn = 0;
            zone.end_pfn = 0;
        }
        self.sections_tidy(first, last);
        self.zones_changed();
        Ok(())
    }

    /// The plugged ranges `[start, end)` of the hot-plug region, in address
    /// order (for the memory map: plugged memory is RAM too). Walks the
    /// frames of the sections that have descriptors.
    pub fn plugged_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (first, last) = self.hotplug.map_or((0, 0), |(start, size)| {
            (start / PAGE_SIZE, (start + size) / PAGE_SIZE)
        });
        let order = self.pageblocks.order;
        let block = 1u64 << order;
        // A pageblock's managed count says whether it is all plugged, not
        // at all, or in part: only the last kind has its frames read.
        let managed = move |pfn: u64| {
            self.pageblocks
                .get((pfn >> order) as usize)
                .map_or(0, |c| c.managed as u64)
        };
        let plugged = move |pfn: u64| match managed(pfn) {
            0 => false,
            m if m == block => true,
            _ => self
                .frames
                .get(pfn as usize)
                .is_some_and(|f| !f.is(FrameState::Reserved)),
        };
        // The next frame at or after `pfn` that may differ from it.
        let step = move |pfn: u64| match managed(pfn) {
            m if m == 0 || m == block => (pfn | (block - 1)) + 1,
            _ => pfn + 1,
        };
        let mut pfn = first;
        core::iter::from_fn(move || {
            while pfn < last && !plugged(pfn) {
                pfn = match self.frames.get(pfn as usize) {
                    Some(_) => step(pfn),
                    None => (self.frames.next_present(pfn as usize) as u64).max(pfn + 1),
                };
            }
            if pfn >= last {
                return None;
            }
            let start = pfn;
            while pfn < last && plugged(pfn) {
                pfn = step(pfn);
            }
            let end = pfn.min(last);
            Some((start * PAGE_SIZE, end * PAGE_SIZE))
        })
    }

    /// Frames of `[first, last)` not covered by a free buddy block: in use,
    /// on a pcp list, or told to the host right now. `Invalid` if any is
    /// not online.
    fn movable_busy(&self, first: u64, last: u64) -> Result<u64, MmError> {
        let mut busy = 0;
        let mut pfn = first;
        while pfn < last {
            match self.frames.get(pfn as usize) {
                None => return Err(MmError::Invalid("range not online")),
                Some(f) if f.is(FrameState::Reserved) => {
                    return Err(MmError::Invalid("range not online"))
                }
                _ => {}
            }
            match self.free_block_covering(pfn) {
                Some((head, order)) => pfn = head as u64 + (1 << order),
                None => {
                    busy += 1;
                    pfn += 1;
                }
            }
        }
        Ok(busy)
    }

    /// The free buddy block holding frame `pfn`: its head and order.
    fn free_block_covering(&self, pfn: u64) -> Option<(u32, u32)> {
        (0..self.max_order).find_map(|order| {
            let head = (pfn >> order) << order;
            let f = self.frames.get(head as usize)?;
            (f.is(FrameState::Buddy) && f.order as u32 == order).then_some((head as u32, order))
        })
    }

    /// Gives section `s` frame descriptors, every frame `Reserved` (not
    /// plugged), and its pageblocks' counts.
    fn section_populate(&mut self, s: usize) -> Result<(), MmError> {
        let n = self.frames.section_frames();
        let reserved = {
            let mut f = Frame::EMPTY;
            f.set(FrameState::Reserved, ZoneType::Movable, 0);
            f
        };
        let frames = self.table_alloc(n, || reserved)?;
        let counts = match self.table_alloc(n >> self.pageblocks.order, Counts::default) {
            Ok(c) => c,
            Err(e) => {
                self.table_free(frames);
                return Err(e);
            }
        };
        self.frames.section_add(s, frames);
        self.pageblocks.section_add(s, counts);
        Ok(())
    }

    /// Frees section `s`'s descriptors and counts.
    fn section_depopulate(&mut self, s: usize) {
        if let Some(frames) = self.frames.section_remove(s) {
            self.table_free(frames);
        }
        if let Some(counts) = self.pageblocks.section_remove(s) {
            self.table_free(counts);
        }
    }

    /// Frees the descriptors of the sections touching `[first, last)` that
    /// have no plugged memory.
    fn sections_tidy(&mut self, first: u64, last: u64) {
        let frames_per = self.frames.section_frames() as u64;
        let mut pfn = first;
        while pfn < last {
            let (s, section_start) = self.frames.section_of(pfn as usize);
            if self.frames.section_present(s) && self.section_managed(s) == 0 {
                self.section_depopulate(s);
            }
            pfn = section_start as u64 + frames_per;
        }
    }

    /// Plugged frames of section `s`.
    fn section_managed(&self, s: usize) -> u64 {
        self.pageblocks
            .section(s)
            .map_or(0, |c| c.iter().map(|c| c.managed as u64).sum())
    }

    /// Watermarks and zonelists after a zone grew or shrank.
    fn zones_changed(&mut self) {
        zone::set_watermarks(&mut self.zones);
        self.preferred_zone = zone::preferred_zones(&self.zones);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostMm;
    use crate::{DmaMask, Gfp};
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;
    /// 64 MiB of boot memory, a 512 MiB region at 4 GiB.
    const REGION: u64 = 4 << 30;

    fn machine() -> HostMm {
        HostMm::boot_with_hotplug(&[(MIB, 64 * MIB)], Some((REGION, 512 * MIB)), "").unwrap()
    }

    fn movable(mm: &MemoryManager) -> &crate::zone::Zone {
        &mm.zones[ZoneType::Movable as usize]
    }

    #[test]
    fn plugged_memory_serves_movable_requests_only() {
        let mut mm = machine();
        assert_eq!(
            mm.hotplug_region().unwrap().sections,
            0,
            "no descriptors before a plug"
        );
        mm.online_pages(REGION + 128 * MIB, 6 * MIB).unwrap();
        mm.online_pages(REGION + 300 * MIB, 2 * MIB).unwrap();
        let ranges: Vec<(u64, u64)> = mm.plugged_ranges().collect();
        assert_eq!(
            ranges,
            [
                (REGION + 128 * MIB, REGION + 134 * MIB),
                (REGION + 300 * MIB, REGION + 302 * MIB)
            ]
        );
        mm.offline_pages(REGION + 300 * MIB, 2 * MIB).unwrap();
        mm.check().unwrap();
        let r = mm.hotplug_region().unwrap();
        assert_eq!((r.plugged, r.sections), (6 * MIB, 1));
        assert_eq!(
            r.memmap_bytes,
            (128 * MIB / PAGE_SIZE) * 16,
            "one section's descriptors"
        );
        assert_eq!(movable(&mm).managed, 6 * MIB / PAGE_SIZE);
        assert!(movable(&mm).watermark.min > 0);
        // Kernel requests stay in the boot zones.
        for _ in 0..64 {
            let p = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
            assert!(p < 64 * MIB);
        }
        let k = mm.kmalloc(64 << 10, Gfp::KERNEL | Gfp::MOVABLE).unwrap();
        assert!(
            mm.direct_map().phys(k.as_ptr() as usize) < 64 * MIB,
            "kmalloc ignores MOVABLE"
        );
        // Movable ones go to the plugged memory first, DMA buffers that
        // ask for it too.
        let p = mm.alloc_pages(9, Gfp::KERNEL | Gfp::MOVABLE).unwrap();
        assert!((REGION + 128 * MIB..REGION + 134 * MIB).contains(&p));
        let d = mm
            .dma_alloc_zeroed(MIB as usize, 4096, DmaMask::Bits64, true)
            .unwrap();
        assert!((REGION + 128 * MIB..REGION + 134 * MIB).contains(&d.phys));
        let k = mm.dma_alloc(MIB as usize, 4096, DmaMask::Bits64).unwrap();
        assert!(
            k.phys < 64 * MIB,
            "a device's buffer stays in the boot zones"
        );
        let d32 = mm
            .dma_alloc_zeroed(MIB as usize, 4096, DmaMask::Bits32, true)
            .unwrap();
        assert!(
            d32.phys < 64 * MIB,
            "a 32-bit mask never reaches the region"
        );
        mm.check().unwrap();
    }

    #[test]
    fn memory_in_use_is_never_offlined() {
        let mut mm = machine();
        mm.online_pages(REGION, 8 * MIB).unwrap();
        let pages: Vec<u64> = (0..8)
            .map(|_| mm.alloc_pages(0, Gfp::KERNEL | Gfp::MOVABLE).unwrap())
            .collect();
        let used = pages[3] & !(2 * MIB - 1);
        assert_eq!(
            mm.offline_pages(used, 2 * MIB),
            Err(MmError::Busy {
                live: pages
                    .iter()
                    .filter(|&&p| p & !(2 * MIB - 1) == used)
                    .count() as u64
            })
        );
        assert_eq!(
            mm.hotplug_region().unwrap().plugged,
            8 * MIB,
            "nothing changed"
        );
        mm.check().unwrap();
        // A free 2 MiB block beside the used one goes, splitting the 4 MiB
        // block it was part of.
        let free = (REGION..REGION + 8 * MIB)
            .step_by(2 << 20)
            .find(|&b| pages.iter().all(|&p| p & !(2 * MIB - 1) != b))
            .unwrap();
        mm.offline_pages(free, 2 * MIB).unwrap();
        mm.check().unwrap();
        assert_eq!(mm.hotplug_region().unwrap().plugged, 6 * MIB);
        assert_eq!(movable(&mm).managed, 6 * MIB / PAGE_SIZE);
        for p in pages {
            mm.free_pages(p, 0).unwrap();
        }
        mm.offline_pages(used, 2 * MIB).unwrap();
        mm.check().unwrap();
        let rest: Vec<u64> = (REGION..REGION + 8 * MIB)
            .step_by(2 << 20)
            .filter(|&b| b != used && b != free)
            .collect();
        for b in rest {
            mm.offline_pages(b, 2 * MIB).unwrap();
        }
        let r = mm.hotplug_region().unwrap();
        assert_eq!((r.plugged, r.sections, r.memmap_bytes), (0, 0, 0));
        assert_eq!((movable(&mm).managed, movable(&mm).free), (0, 0));
        assert_eq!(
            mm.preferred_zone[ZoneType::Movable as usize],
            ZoneType::Dma32
        );
        mm.check().unwrap();
    }

    #[test]
    fn a_request_only_plugged_memory_can_serve() {
        let mut mm = machine();
        let want = 160 * MIB / PAGE_SIZE;
        let grab = |mm: &mut MemoryManager| -> Vec<u64> {
            let mut got = Vec::new();
            while (got.len() as u64) < want / 512 {
                match mm.alloc_pages(9, Gfp::KERNEL | Gfp::MOVABLE) {
                    Ok(p) => got.push(p),
                    Err(_) => break,
                }
            }
            got
        };
        let got = grab(&mut mm);
        assert!(
            (got.len() as u64) < want / 512,
            "64 MiB of boot memory cannot hold 160 MiB"
        );
        for p in got {
            mm.free_pages(p, 9).unwrap();
        }
        // Across a section boundary.
        mm.online_pages(REGION + 64 * MIB, 256 * MIB).unwrap();
        assert_eq!(mm.hotplug_region().unwrap().sections, 3);
        let got = grab(&mut mm);
        assert_eq!(got.len() as u64, want / 512);
        mm.check().unwrap();
        for p in got {
            mm.free_pages(p, 9).unwrap();
        }
        mm.offline_pages(REGION + 64 * MIB, 256 * MIB).unwrap();
        assert_eq!(mm.hotplug_region().unwrap().sections, 0);
        mm.check().unwrap();
    }

    #[test]
    fn bad_ranges_are_refused() {
        let mut mm = machine();
        assert!(mm.online_pages(REGION - 2 * MIB, 2 * MIB).is_err());
        assert!(mm.online_pages(REGION + 511 * MIB, 2 * MIB).is_err());
        assert!(mm.online_pages(REGION + 1, PAGE_SIZE).is_err());
        assert!(mm.online_pages(REGION, 0).is_err());
        assert!(mm.offline_pages(REGION, 2 * MIB).is_err(), "not online");
        mm.online_pages(REGION, 2 * MIB).unwrap();
        assert!(
            mm.online_pages(REGION + MIB, 2 * MIB).is_err(),
            "half online already"
        );
        assert!(
            mm.offline_pages(REGION, 4 * MIB).is_err(),
            "half not online"
        );
        assert!(
            mm.add_memory_region(8 << 30, 2 * MIB).is_err(),
            "one region"
        );
        let mut plain = HostMm::boot(&[(MIB, 64 * MIB)], "").unwrap();
        assert!(plain.online_pages(REGION, 2 * MIB).is_err());
        assert!(
            plain.add_memory_region(32 * MIB, 2 * MIB).is_err(),
            "boot memory"
        );
        // Past the boot memory, but in the section that holds its end.
        assert!(
            plain.add_memory_region(96 * MIB, 2 * MIB).is_err(),
            "boot memory's section"
        );
        mm.check().unwrap();
    }

    #[test]
    fn a_region_inside_pageblocks_at_both_ends() {
        let (start, size) = (128 * MIB + 6 * MIB, 20 * MIB);
        let mut mm =
            HostMm::boot_with_hotplug(&[(MIB, 64 * MIB)], Some((start, size)), "").unwrap();
        mm.online_pages(start, size).unwrap();
        mm.check().unwrap();
        assert_eq!(
            mm.plugged_ranges().collect::<Vec<_>>(),
            [(start, start + size)]
        );
        mm.offline_pages(start + 2 * MIB, 4 * MIB).unwrap();
        mm.check().unwrap();
        assert_eq!(
            mm.plugged_ranges().collect::<Vec<_>>(),
            [(start, start + 2 * MIB), (start + 6 * MIB, start + size)]
        );
        mm.offline_pages(start, 2 * MIB).unwrap();
        mm.offline_pages(start + 6 * MIB, size - 6 * MIB).unwrap();
        assert_eq!(mm.hotplug_region().unwrap().sections, 0);
        mm.check().unwrap();
    }
}
