//! vmalloc: virtually contiguous kernel memory built from order-0 frames
//! (Linux's `mm/vmalloc.c`).
//!
//! A large allocation needs contiguous addresses, not contiguous frames.
//! vmalloc takes its pages one at a time from the buddy and maps them side
//! by side, with 4 KiB page-table entries, in a window of kernel virtual
//! addresses reserved for it. So it serves sizes no buddy block has, and it
//! keeps serving when memory is fragmented: any free order-0 frames do.
//!
//! The window is tiled by `vmap_area` records on one list sorted by
//! address, each free or busy. An allocation takes the first free area that
//! fits (after alignment) and splits off what it does not use; a free marks
//! its area free and merges it with free neighbours, so no two free areas
//! are ever adjacent. Each busy area ends with one unmapped guard page:
//! running off the end of an allocation faults instead of reaching the
//! next one. The records are kmalloc objects of this manager, as Linux's
//! come from `vmap_area_cachep`; they are reached through `access`.
//!
//! A busy area's pages are frames in state [`FrameState::Vmalloc`]; the
//! first one (count 1) holds the address of the area's record, so `vfree`
//! finds the record from the address in O(1): translate, then read the
//! frame (Linux's `vmalloc_to_page`). Pages are not charged to an owner:
//! like large kmalloc blocks they are the kernel heap's.
//!
//! The page tables are the architecture's ([`VmapOps`]); frames for them
//! come from this manager ([`PgtableAlloc`]), because vmalloc runs with the
//! manager locked and must not re-enter the heap.

use core::ptr::NonNull;

use crate::frame::{FrameState, NIL};
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::pageblock::Held;
use crate::{access, MemoryManager, MmError, Owner};

/// Page-table frames handed to the architecture.
pub trait PgtableAlloc {
    /// A zeroed 4 KiB frame for a new page table: its physical address.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Takes back a frame from [`PgtableAlloc::alloc_table`] that no longer
    /// holds a table.
    fn free_table(&mut self, phys: u64);
}

/// The architecture's half of vmalloc: Linux's `vmap_pages_range`,
/// `vunmap_range`, `flush_tlb_kernel_range` and `vmalloc_to_page`, one page
/// at a time. memd-mm calls it only from the manager's methods (`&mut
/// MemoryManager`), so calls never overlap.
pub trait VmapOps: Sync {
    /// The window `(start, size)` in bytes: page aligned, not used by
    /// anything else.
    fn window(&self) -> (u64, u64);
    /// Maps the frame at `phys` read-write at `virt` (an unmapped page of
    /// the window) with a 4 KiB entry, building missing tables from
    /// `tables`.
    fn map_page(&self, virt: u64, phys: u64, tables: &mut dyn PgtableAlloc) -> Result<(), MmError>;
    /// Removes the entry at `virt` and returns the frame it mapped. The TLB
    /// may hold the translation until [`VmapOps::flush_tlb_page`].
    fn unmap_page(&self, virt: u64) -> Option<u64>;
    /// Drops any cached translation of `virt`.
    fn flush_tlb_page(&self, virt: u64);
    /// The frame mapped at `virt`, if any.
    fn translate(&self, virt: u64) -> Option<u64>;
    /// Returns to `tables` the page tables under `[start, end)` that map
    /// nothing any more. Linux keeps them; memd gives them back so that
    /// free memory returns exactly when every area is freed.
    fn free_empty_tables(&self, start: u64, end: u64, tables: &mut dyn PgtableAlloc);
}

/// One busy area, for [`MemoryManager::vmallocinfo`] (`/proc/vmallocinfo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmallocArea {
    /// First address.
    pub start: u64,
    /// Mapped pages (the guard page after them is not counted).
    pub pages: u64,
    /// Frame number of the first page.
    pub first_pfn: u64,
}

/// The window and its area list.
#[derive(Clone, Copy, Debug)]
pub struct Vmalloc {
    start: u64,
    end: u64,
    /// First record of the area list (lowest address); 0 when the window
    /// is not set up.
    first: usize,
    /// Records on the list.
    records: u64,
    /// Busy areas.
    busy: u64,
}

impl Default for Vmalloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Vmalloc {
    pub const fn new() -> Self {
        Vmalloc {
            start: 0,
            end: 0,
            first: 0,
            records: 0,
            busy: 0,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.first != 0
    }

    /// Whether `addr` lies in the window (Linux's `is_vmalloc_addr`).
    #[inline(always)]
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end
    }
}

/// A `vmap_area` record: five words in a kmalloc object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Va(usize);

const VA_START: usize = 0;
/// Length in pages, the guard page included for a busy area.
const VA_PAGES: usize = 1;
const VA_NEXT: usize = 2;
const VA_PREV: usize = 3;
/// Frame number of a busy area's first page; `FREE_AREA` for a free area.
const VA_PFN: usize = 4;
const VA_BYTES: usize = 5 * 8;
const FREE_AREA: u64 = u64::MAX;
/// A busy area's first page until it is mapped.
const MAPPING: u64 = u64::MAX - 1;

impl Va {
    fn get(self, field: usize) -> u64 {
        access::read_link(self.0 + field * 8)
    }

    fn set(self, field: usize, value: u64) {
        access::write_link(self.0 + field * 8, value)
    }

    fn start(self) -> u64 {
        self.get(VA_START)
    }

    fn pages(self) -> u64 {
        self.get(VA_PAGES)
    }

    fn end(self) -> u64 {
        self.start() + self.pages() * PAGE_SIZE
    }

    fn is_free(self) -> bool {
        self.get(VA_PFN) == FREE_AREA
    }

    fn next(self) -> Option<Va> {
        match self.get(VA_NEXT) {
            0 => None,
            p => Some(Va(p as usize)),
        }
    }

    fn prev(self) -> Option<Va> {
        match self.get(VA_PREV) {
            0 => None,
            p => Some(Va(p as usize)),
        }
    }
}

fn link_of(va: Option<Va>) -> u64 {
    va.map_or(0, |v| v.0 as u64)
}

/// The record address a busy area's first frame holds, split over the
/// frame's two link words (unused while the frame is on no list).
fn record_of(next: u32, prev: u32) -> usize {
    ((prev as u64) << 32 | next as u64) as usize
}

/// Page-table frames from the manager: zeroed order-0 frames stamped as
/// the kernel's page allocations.
struct Tables<'a> {
    mm: &'a mut MemoryManager,
    gfp: Gfp,
}

impl PgtableAlloc for Tables<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        let pfn = self
            .mm
            .alloc_frames(0, self.gfp.without(Gfp::MOVABLE) | Gfp::ZERO)
            .ok()?;
        let zone = self.mm.frames[pfn as usize].zone();
        let f = &mut self.mm.frames[pfn as usize];
        f.set(FrameState::Allocated, zone, 0);
        f.count = 1;
        f.owner = Owner::KERNEL.0;
        self.mm.owners.charge(Owner::KERNEL.0, 1);
        self.mm.counters.pgtable_pages += 1;
        Some(pfn as u64 * PAGE_SIZE)
    }

    fn free_table(&mut self, phys: u64) {
        let ok = self.mm.free_pages(phys, 0).is_ok();
        debug_assert!(ok, "page table {phys:#x} was not from alloc_table");
        if ok {
            self.mm.counters.pgtable_pages -= 1;
        }
    }
}

impl MemoryManager {
    /// Sets up the vmalloc window `[start, start + size)`: one free area.
    /// Needs the kmalloc caches, so it runs after [`MemoryManager::init`].
    pub fn vmalloc_init(&mut self, start: u64, size: u64) -> Result<(), MmError> {
        if !self.is_initialized() || self.vmalloc.is_enabled() {
            return Err(MmError::Invalid(
                "vmalloc: manager not initialised or window already set",
            ));
        }
        if !start.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) || size == 0 {
            return Err(MmError::Invalid("vmalloc: window not page aligned"));
        }
        let end = start
            .checked_add(size)
            .filter(|&e| e <= usize::MAX as u64)
            .ok_or(MmError::Invalid("vmalloc: window beyond the address space"))?;
        let va = self.new_va(Gfp::KERNEL)?;
        va.set(VA_START, start);
        va.set(VA_PAGES, size / PAGE_SIZE);
        va.set(VA_NEXT, 0);
        va.set(VA_PREV, 0);
        va.set(VA_PFN, FREE_AREA);
        self.vmalloc = Vmalloc {
            start,
            end,
            first: va.0,
            records: 1,
            busy: 0,
        };
        Ok(())
    }

    /// Whether `addr` is in the vmalloc window.
    #[inline(always)]
    pub fn is_vmalloc_addr(&self, addr: usize) -> bool {
        self.vmalloc.contains(addr as u64)
    }

    /// `__vmalloc`: `size` bytes (at least one page) at an address aligned
    /// to `align` (a power of two; page alignment at least), mapped from
    /// order-0 frames allocated with `gfp` (`ZERO` zeroes them).
    pub fn vmalloc(
        &mut self,
        size: usize,
        align: usize,
        gfp: Gfp,
        ops: &dyn VmapOps,
    ) -> Result<NonNull<u8>, MmError> {
        if !self.vmalloc.is_enabled() {
            return Err(MmError::Invalid("vmalloc: no window"));
        }
        if !align.is_power_of_two() {
            return Err(MmError::Invalid("vmalloc: alignment not a power of two"));
        }
        let pages = (size as u64).div_ceil(PAGE_SIZE).max(1);
        let align = (align as u64).max(PAGE_SIZE);
        let r = self.vmalloc_pages(pages, align, gfp, ops);
        if r.is_err() {
            self.counters.vmalloc_failures += 1;
        }
        r
    }

    fn vmalloc_pages(
        &mut self,
        pages: u64,
        align: u64,
        gfp: Gfp,
        ops: &dyn VmapOps,
    ) -> Result<NonNull<u8>, MmError> {
        let va = self.alloc_vmap_area(pages + 1, align, gfp)?;
        let start = va.start();
        let mut first_pfn = MAPPING;
        for i in 0..pages {
            match self.vmap_page(start + i * PAGE_SIZE, gfp, ops) {
                Ok(pfn) if i == 0 => first_pfn = pfn,
                Ok(_) => {}
                Err(e) => {
                    // Page `i` may have left new, empty tables behind.
                    self.vunmap_pages(start, i, i + 1, ops);
                    self.free_vmap_area(va);
                    return Err(e);
                }
            }
        }
        let f = &mut self.frames[first_pfn as usize];
        f.count = 1;
        f.next = va.0 as u32;
        f.prev = (va.0 as u64 >> 32) as u32;
        va.set(VA_PFN, first_pfn);
        self.vmalloc.busy += 1;
        Ok(NonNull::new(start as usize as *mut u8).expect("vmalloc window at address 0"))
    }

    /// One frame, mapped at `virt`; returns its frame number.
    fn vmap_page(&mut self, virt: u64, gfp: Gfp, ops: &dyn VmapOps) -> Result<u64, MmError> {
        let pfn = self.alloc_frames(0, gfp.without(Gfp::MOVABLE))?;
        let f = &mut self.frames[pfn as usize];
        f.set_state(FrameState::Vmalloc);
        f.count = 0;
        f.next = NIL;
        f.prev = NIL;
        let phys = pfn as u64 * PAGE_SIZE;
        let mut tables = Tables {
            mm: self,
            gfp: gfp.without(Gfp::ZERO),
        };
        if let Err(e) = ops.map_page(virt, phys, &mut tables) {
            self.free_frames(pfn, 0);
            return Err(e);
        }
        self.counters.vmalloc_pages += 1;
        self.pageblocks.add(pfn, Held::Vmalloc, 1);
        Ok(pfn as u64)
    }

    /// Unmaps `pages` pages from `start`, flushing each before its frame
    /// goes back to the buddy, then frees the page tables left empty under
    /// the first `sweep` pages.
    fn vunmap_pages(&mut self, start: u64, pages: u64, sweep: u64, ops: &dyn VmapOps) {
        for i in 0..pages {
            let virt = start + i * PAGE_SIZE;
            let Some(phys) = ops.unmap_page(virt) else {
                debug_assert!(false, "vmalloc page {virt:#x} was not mapped");
                continue;
            };
            ops.flush_tlb_page(virt);
            let pfn = (phys / PAGE_SIZE) as u32;
            match self.frames.get_mut(pfn as usize) {
                Some(f) if f.is(FrameState::Vmalloc) => {
                    f.count = 0;
                    f.next = NIL;
                    f.prev = NIL;
                    self.counters.vmalloc_pages -= 1;
                    self.pageblocks.sub(pfn, Held::Vmalloc, 1);
                    self.free_frames(pfn, 0);
                }
                // Not a vmalloc frame: the page tables disagree with the
                // frame table. Leave the frame alone; `check` reports it.
                _ => debug_assert!(false, "{virt:#x} mapped frame {pfn:#x}, not a vmalloc page"),
            }
        }
        let mut tables = Tables {
            mm: self,
            gfp: Gfp::KERNEL,
        };
        ops.free_empty_tables(start, start + sweep * PAGE_SIZE, &mut tables);
    }

    /// `vfree`: frees what [`MemoryManager::vmalloc`] returned. Anything
    /// else (another address, a second free) is refused.
    pub fn vfree(&mut self, addr: NonNull<u8>, ops: &dyn VmapOps) -> Result<(), MmError> {
        let addr = addr.as_ptr() as usize as u64;
        const NOT_VMALLOC: MmError = MmError::Invalid("vfree: not the start of a vmalloc area");
        if !self.vmalloc.contains(addr) || !addr.is_multiple_of(PAGE_SIZE) {
            return Err(NOT_VMALLOC);
        }
        let phys = ops.translate(addr).ok_or(NOT_VMALLOC)?;
        let pfn = phys / PAGE_SIZE;
        let va = match self.frames.get(pfn as usize) {
            Some(f) if f.is(FrameState::Vmalloc) && f.count == 1 => Va(record_of(f.next, f.prev)),
            _ => return Err(NOT_VMALLOC),
        };
        if va.start() != addr || va.get(VA_PFN) != pfn {
            return Err(NOT_VMALLOC);
        }
        let pages = va.pages() - 1;
        self.vunmap_pages(addr, pages, pages, ops);
        self.vmalloc.busy -= 1;
        self.free_vmap_area(va);
        Ok(())
    }

    /// Busy areas in address order (`/proc/vmallocinfo`).
    pub fn vmallocinfo(&self) -> impl Iterator<Item = VmallocArea> + '_ {
        self.vmap_areas()
            .filter(|va| !va.is_free())
            .map(|va| VmallocArea {
                start: va.start(),
                pages: va.pages() - 1,
                first_pfn: va.get(VA_PFN),
            })
    }

    /// `(VmallocTotal, VmallocChunk)`: the window's size and its largest
    /// free area, in bytes.
    pub(crate) fn vmalloc_totals(&self) -> (u64, u64) {
        let chunk = self
            .vmap_areas()
            .filter(|va| va.is_free())
            .map(|va| va.pages() * PAGE_SIZE)
            .max()
            .unwrap_or(0);
        (self.vmalloc.end - self.vmalloc.start, chunk)
    }

    fn vmap_areas(&self) -> impl Iterator<Item = Va> + '_ {
        let mut cur = (self.vmalloc.first != 0).then_some(Va(self.vmalloc.first));
        let mut budget = self.vmalloc.records;
        core::iter::from_fn(move || {
            let va = cur.filter(|_| budget > 0)?;
            budget -= 1;
            cur = va.next();
            Some(va)
        })
    }

    fn new_va(&mut self, gfp: Gfp) -> Result<Va, MmError> {
        let p = self.kmalloc(VA_BYTES, gfp.without(Gfp::ZERO))?;
        Ok(Va(p.as_ptr() as usize))
    }

    /// Frees a record that is on no list.
    fn drop_va(&mut self, va: Va) {
        let p = NonNull::new(va.0 as *mut u8).expect("vmap_area record at address 0");
        let freed = self.kfree(p);
        debug_assert!(freed.is_ok(), "vmap_area record {:#x}: {freed:?}", va.0);
    }

    /// Links `new` into the list after `at`.
    fn insert_after(&mut self, at: Va, new: Va) {
        let next = at.next();
        new.set(VA_PREV, at.0 as u64);
        new.set(VA_NEXT, link_of(next));
        at.set(VA_NEXT, new.0 as u64);
        if let Some(n) = next {
            n.set(VA_PREV, new.0 as u64);
        }
        self.vmalloc.records += 1;
    }

    /// Unlinks `va` from the list and frees its record.
    fn remove_va(&mut self, va: Va) {
        let (prev, next) = (va.prev(), va.next());
        match prev {
            Some(p) => p.set(VA_NEXT, link_of(next)),
            None => self.vmalloc.first = link_of(next) as usize,
        }
        if let Some(n) = next {
            n.set(VA_PREV, link_of(prev));
        }
        self.vmalloc.records -= 1;
        self.drop_va(va);
    }

    /// First fit: the lowest free area that holds `pages` pages at an
    /// `align`-aligned start. What precedes the start stays a free area,
    /// and so does what follows the end. Returns the busy area, its pages
    /// not yet mapped.
    fn alloc_vmap_area(&mut self, pages: u64, align: u64, gfp: Gfp) -> Result<Va, MmError> {
        let bytes = pages
            .checked_mul(PAGE_SIZE)
            .ok_or(MmError::Invalid("vmalloc: size beyond the window"))?;
        let found = self.vmap_areas().filter(|va| va.is_free()).find_map(|va| {
            let (start, end) = (va.start(), va.end());
            let at = start.checked_next_multiple_of(align)?;
            (at.checked_add(bytes)? <= end).then_some((va, at, end))
        });
        let (va, at, end) = found.ok_or(MmError::NoMemory)?;
        let (before, after) = (at > va.start(), at + bytes < end);
        // Take the records first, so that failing leaves the list as it was.
        let busy = if before {
            Some(self.new_va(gfp)?)
        } else {
            None
        };
        let tail = if after {
            match self.new_va(gfp) {
                Ok(t) => Some(t),
                Err(e) => {
                    if let Some(b) = busy {
                        self.drop_va(b);
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        let busy = match busy {
            Some(b) => {
                va.set(VA_PAGES, (at - va.start()) / PAGE_SIZE);
                self.insert_after(va, b);
                b
            }
            None => va,
        };
        busy.set(VA_START, at);
        busy.set(VA_PAGES, pages);
        busy.set(VA_PFN, MAPPING);
        if let Some(t) = tail {
            t.set(VA_START, at + bytes);
            t.set(VA_PAGES, (end - at - bytes) / PAGE_SIZE);
            t.set(VA_PFN, FREE_AREA);
            self.insert_after(busy, t);
        }
        Ok(busy)
    }

    /// Marks `va` free and merges it with free neighbours.
    fn free_vmap_area(&mut self, va: Va) {
        va.set(VA_PFN, FREE_AREA);
        if let Some(next) = va.next().filter(|n| n.is_free()) {
            va.set(VA_PAGES, va.pages() + next.pages());
            self.remove_va(next);
        }
        if let Some(prev) = va.prev().filter(|p| p.is_free()) {
            prev.set(VA_PAGES, prev.pages() + va.pages());
            self.remove_va(va);
        }
    }

    /// The area list tiles the window in address order, free areas never
    /// touch, each busy area's first frame points back at it, and the
    /// mapped pages add up to the counter. Returns the busy areas, for the
    /// frame-table cross-check.
    pub(crate) fn check_vmalloc(&self) -> Result<u64, &'static str> {
        if !self.vmalloc.is_enabled() {
            return Ok(0);
        }
        let (mut expect, mut prev, mut prev_free) = (self.vmalloc.start, 0u64, false);
        let (mut n, mut busy, mut mapped) = (0u64, 0u64, 0u64);
        let mut cur = Some(Va(self.vmalloc.first));
        while let Some(va) = cur {
            if n == self.vmalloc.records {
                return Err("vmalloc area list longer than its record count");
            }
            // Read a record only once it is known to be a slab object.
            if crate::slab::slab_head(&self.frames, self.dmap, va.0).is_none() {
                return Err("vmalloc area record is not a slab object");
            }
            n += 1;
            if va.get(VA_PREV) != prev {
                return Err("vmalloc area list back link broken");
            }
            if va.start() != expect || va.pages() == 0 {
                return Err("vmalloc areas do not tile the window");
            }
            if va.is_free() {
                if prev_free {
                    return Err("adjacent free vmalloc areas not merged");
                }
            } else {
                let pfn = va.get(VA_PFN);
                let points_back = self.frames.get(pfn as usize).is_some_and(|f| {
                    f.is(FrameState::Vmalloc) && f.count == 1 && record_of(f.next, f.prev) == va.0
                });
                if va.pages() < 2 || !points_back {
                    return Err("busy vmalloc area without its first page");
                }
                busy += 1;
                mapped += va.pages() - 1;
            }
            prev_free = va.is_free();
            expect = va.end();
            prev = va.0 as u64;
            cur = va.next();
        }
        if expect != self.vmalloc.end || n != self.vmalloc.records {
            return Err("vmalloc areas do not tile the window");
        }
        if busy != self.vmalloc.busy || mapped != self.counters.vmalloc_pages {
            return Err("vmalloc counters differ from the area list");
        }
        Ok(busy)
    }
}
