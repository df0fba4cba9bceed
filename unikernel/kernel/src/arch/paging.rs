//! The final page tables: a direct map of all RAM at `DIRECT_MAP_OFFSET`
//! (1 GiB pages where the CPU has them and a whole GiB is RAM, else 2 MiB
//! pages), the device windows below 4 GiB mapped uncached in the same direct
//! map (microvm's virtio-mmio slots, IOAPIC and LAPIC; q35's ECAM and 32-bit
//! PCI BAR window: everything in the 32-bit hole above RAM), and an identity
//! map of the kernel image, which is linked at 1 MiB. RAM that arrives
//! after boot (virtio-mem's hot-plugged blocks) joins the direct map with
//! 2 MiB write-back pages ([`map_ram`]) and leaves it before it goes back
//! to the host ([`unmap_ram`]).
//!
//! Page-table frames come from a bump allocator over the usable RAM right
//! after the kernel image; the range it used is handed to the memory manager
//! as reserved.
//!
//! The vmalloc window is PML4 slot 402 (where Linux puts `VMALLOC_START`
//! with 4-level paging): 512 GiB of addresses, mapped with 4 KiB pages by
//! memd-mm's vmalloc through [`KernelVmalloc`]. Its top table is built at
//! boot with the direct map, so the PML4 never changes afterwards; the
//! tables below it come from memd-mm's buddy and go back when they map
//! nothing.

use core::arch::asm;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use memd_mm::{GlobalMm, MmError, PgtableAlloc, VmapOps};

use super::cpuid;
use crate::boot::E820Entry;

/// Virtual address of physical address 0 in the direct map (PML4 slot 256).
pub const DIRECT_MAP_OFFSET: u64 = 0xffff_8000_0000_0000;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 << 30;
/// The direct map spans at most 64 TiB (PML4 slots 256..384).
const MAX_PHYS: u64 = 64 << 40;
/// First address of the vmalloc window (PML4 slot 402).
pub const VMALLOC_START: u64 = 0xffff_c900_0000_0000;
/// The window's size: the whole PML4 slot, one PDPT.
pub const VMALLOC_SIZE: u64 = 512 * GIB;

const P: u64 = 1;
const RW: u64 = 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Offset through which page-table frames are reached: 0 while the boot
/// identity map is live, `DIRECT_MAP_OFFSET` afterwards.
static TABLE_OFFSET: AtomicU64 = AtomicU64::new(0);
/// Physical address of the live PML4 (0 before `init`).
static PML4: AtomicU64 = AtomicU64::new(0);
/// Serialises changes to the live page tables (the direct map's; the
/// vmalloc window's are serialised by memd-mm's lock, see `KernelVmalloc`).
static MAP_LOCK: spin::Mutex<()> = spin::Mutex::new(());
/// Physical address of the vmalloc window's PDPT (0 before `init`).
static VMALLOC_PDPT: AtomicU64 = AtomicU64::new(0);
/// End of the RAM the boot map covers (`init`'s E820 RAM): `unmap_ram`
/// never goes below it.
static BOOT_RAM_END: AtomicU64 = AtomicU64::new(u64::MAX);

/// The result of `init`.
#[derive(Clone, Debug)]
pub struct PagingInfo {
    pub direct_map_offset: u64,
    /// Physical frames used by the page tables (reserve them).
    pub table_frames: Range<u64>,
    /// End of the direct map's physical range.
    pub mapped_end: u64,
    pub gib_pages: u64,
    pub mib2_pages: u64,
    pub uncached_mib2_pages: u64,
    pub huge_1g: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Ram,
    Device,
}

fn ram_like(kind: u32) -> bool {
    matches!(kind, 1 | 3 | 4)
}

struct Bump {
    start: u64,
    next: u64,
    end: u64,
}

impl Bump {
    fn alloc(&mut self) -> u64 {
        assert!(
            self.next + PAGE <= self.end,
            "out of early frames for page tables"
        );
        let f = self.next;
        self.next += PAGE;
        let p = table_ptr(f);
        // SAFETY: `f` is a fresh frame of usable RAM past the kernel image,
        // reachable through the current offset (identity below 4 GiB).
        unsafe { core::ptr::write_bytes(p, 0, 512) };
        f
    }
}

fn table_ptr(phys: u64) -> *mut u64 {
    (phys + TABLE_OFFSET.load(Ordering::Relaxed)) as *mut u64
}

fn entry(table: u64, index: u64) -> u64 {
    // SAFETY: `table` is a page-table frame (from `Bump`, or from memd-mm
    // for the vmalloc window and device windows), index < 512.
    unsafe { table_ptr(table).add(index as usize).read() }
}

fn set_entry(table: u64, index: u64, value: u64) {
    // SAFETY: as for `entry`.
    unsafe { table_ptr(table).add(index as usize).write(value) }
}

/// The next-level table under `table[index]`: the one there, or a new one
/// from `alloc` (a zeroed frame, so it maps nothing); `None` when `alloc`
/// has no frame.
fn table_under(table: u64, index: u64, alloc: impl FnOnce() -> Option<u64>) -> Option<u64> {
    let e = entry(table, index);
    if e & P != 0 {
        return Some(e & ADDR_MASK);
    }
    let t = alloc()?;
    set_entry(table, index, t | P | RW);
    Some(t)
}

/// Returns the next-level table under `table[index]`, allocating it.
fn next_table(bump: &mut Bump, table: u64, index: u64) -> u64 {
    table_under(table, index, || Some(bump.alloc())).expect("the bump allocator always has a frame")
}

fn classify(chunk: u64, map: &[E820Entry], low_top: u64) -> Kind {
    let end = chunk + MIB2;
    if map
        .iter()
        .any(|e| ram_like(e.kind) && e.addr < end && e.end() > chunk)
    {
        Kind::Ram
    } else if chunk >= low_top && chunk < FOUR_GIB {
        Kind::Device
    } else {
        Kind::None
    }
}

/// True if the CPU supports 1 GiB pages.
pub fn has_1g_pages() -> bool {
    super::cpuid_max_ext_leaf() >= 0x8000_0001 && cpuid(0x8000_0001, 0).edx & (1 << 26) != 0
}

/// Builds and loads the final page tables. `kernel` is the kernel image.
pub fn init(map: &[E820Entry], kernel: Range<u64>) -> PagingInfo {
    let huge_1g = has_1g_pages();
    // Frames for the tables: the usable region holding the first page after
    // the kernel, below 4 GiB (the boot identity map's reach).
    let first = kernel.end.next_multiple_of(PAGE);
    let region = map
        .iter()
        .find(|e| e.kind == 1 && e.addr <= first && e.end() >= first + 16 * PAGE)
        .expect("no usable RAM after the kernel image for page tables");
    let mut bump = Bump {
        start: first,
        next: first,
        end: region.end().min(FOUR_GIB) & !(PAGE - 1),
    };

    let low_top = map
        .iter()
        .filter(|e| ram_like(e.kind) && e.addr < FOUR_GIB)
        .map(|e| e.end().min(FOUR_GIB))
        .max()
        .unwrap_or(0)
        .next_multiple_of(MIB2);
    let ram_end = map
        .iter()
        .filter(|e| ram_like(e.kind))
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let mapped_end = ram_end.clamp(FOUR_GIB, MAX_PHYS);

    let pml4 = bump.alloc();
    // Identity map of the kernel image (2 MiB pages).
    let id_pdpt = next_table(&mut bump, pml4, 0);
    let id_pd = next_table(&mut bump, id_pdpt, 0);
    let kernel_top = kernel.end.next_multiple_of(MIB2);
    assert!(kernel_top <= GIB, "kernel image beyond 1 GiB");
    for i in 0..kernel_top / MIB2 {
        set_entry(id_pd, i, (i * MIB2) | P | RW | PS);
    }

    let mut info = PagingInfo {
        direct_map_offset: DIRECT_MAP_OFFSET,
        table_frames: 0..0,
        mapped_end,
        gib_pages: 0,
        mib2_pages: 0,
        uncached_mib2_pages: 0,
        huge_1g,
    };
    let mut kinds = [Kind::None; 512];
    for gib in 0..mapped_end.div_ceil(GIB) {
        let base = gib * GIB;
        for (i, k) in kinds.iter_mut().enumerate() {
            *k = classify(base + i as u64 * MIB2, map, low_top);
        }
        if kinds.iter().all(|&k| k == Kind::None) {
            continue;
        }
        let virt = DIRECT_MAP_OFFSET + base;
        let pml4_index = (virt >> 39) & 511;
        let pdpt = next_table(&mut bump, pml4, pml4_index);
        let pdpt_index = (virt >> 30) & 511;
        if huge_1g && kinds.iter().all(|&k| k == Kind::Ram) {
            set_entry(pdpt, pdpt_index, base | P | RW | PS);
            info.gib_pages += 1;
            continue;
        }
        let pd = next_table(&mut bump, pdpt, pdpt_index);
        for (i, &k) in kinds.iter().enumerate() {
            let phys = base + i as u64 * MIB2;
            let flags = match k {
                Kind::None => continue,
                Kind::Ram => P | RW | PS,
                Kind::Device => {
                    info.uncached_mib2_pages += 1;
                    P | RW | PS | PCD | PWT
                }
            };
            info.mib2_pages += 1;
            set_entry(pd, i as u64, phys | flags);
        }
    }
    // The vmalloc window's top table, so its PML4 entry never changes.
    let vmalloc_pdpt = next_table(&mut bump, pml4, (VMALLOC_START >> 39) & 511);
    info.table_frames = bump.start..bump.next;

    // SAFETY: the new tables map the kernel image at the same addresses as
    // the boot tables (code, stack and statics stay reachable) and map every
    // page-table frame through the direct map, which TABLE_OFFSET switches to.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
    TABLE_OFFSET.store(DIRECT_MAP_OFFSET, Ordering::Relaxed);
    PML4.store(pml4, Ordering::Relaxed);
    VMALLOC_PDPT.store(vmalloc_pdpt, Ordering::Relaxed);
    BOOT_RAM_END.store(ram_end, Ordering::Relaxed);
    info
}

/// Why `map_mmio`, `map_ram` or `unmap_ram` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// The range overlaps RAM in the direct map (cached): not a device; or,
    /// for `unmap_ram`, the RAM the boot map covers.
    OverlapsRam,
    /// The range overlaps a device window (uncached) or a mapping of other
    /// pages: not RAM to map write-back.
    OverlapsDevice,
    /// `map_ram` / `unmap_ram`: start or length not a multiple of 2 MiB.
    Unaligned,
    /// Beyond the direct map's reach.
    TooHigh,
    /// No frame for a new page table.
    NoMemory,
}

/// Makes the device window `[phys, phys + len)` reachable, uncached, in the
/// direct map (for PCI BARs outside the 32-bit hole mapped at boot), and
/// returns its virtual address. `alloc_table` provides zeroed 4 KiB frames
/// for new page tables. Windows already mapped uncached are left as they are.
pub fn map_mmio(
    phys: u64,
    len: u64,
    alloc_table: &mut dyn FnMut() -> Option<u64>,
) -> Result<u64, MapError> {
    let end = phys.checked_add(len.max(1)).ok_or(MapError::TooHigh)?;
    if end > MAX_PHYS {
        return Err(MapError::TooHigh);
    }
    let _guard = MAP_LOCK.lock();
    let pml4 = PML4.load(Ordering::Relaxed);
    assert!(pml4 != 0, "map_mmio before paging::init");
    let mut changed = false;
    let mut chunk = phys & !(MIB2 - 1);
    while chunk < end {
        let virt = DIRECT_MAP_OFFSET + chunk;
        let mut table = pml4;
        for (shift, leaf_ok) in [(39, false), (30, true)] {
            let i = index(virt, shift);
            if leaf_ok && entry(table, i) & (P | PS) == P | PS {
                // A 1 GiB page: the boot map only uses those for RAM.
                return Err(MapError::OverlapsRam);
            }
            table = table_under(table, i, &mut *alloc_table).ok_or(MapError::NoMemory)?;
        }
        let i = index(virt, 21);
        let e = entry(table, i);
        if e & P == 0 {
            set_entry(table, i, chunk | P | RW | PS | PCD | PWT);
            changed = true;
        } else if e & PCD == 0 {
            return Err(MapError::OverlapsRam);
        }
        chunk += MIB2;
    }
    if changed {
        // Only not-present entries were filled: no stale translation can
        // exist for them, but flush anyway to drop cached walks.
        flush_tlb_all();
    }
    Ok(DIRECT_MAP_OFFSET + phys)
}

/// Reloads CR3 with its current value: flushes every non-global TLB entry
/// and cached walk.
fn flush_tlb_all() {
    // SAFETY: reloading CR3 with its current value only flushes the TLB.
    unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags)) };
}

/// What the direct map holds for the 2 MiB chunk at `chunk` (physical).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    /// Nothing: no entry, or no table above it.
    Unmapped,
    /// `chunk` itself, write-back, as `map_ram` (or the boot map, for RAM)
    /// maps it: a 2 MiB page, or inside a 1 GiB page.
    RamHere,
    /// Something else: uncached (a device window), 4 KiB pages, or a
    /// frame other than `chunk`.
    Other,
}

/// Walks the direct map for `chunk` without changing it.
fn direct_chunk(pml4: u64, chunk: u64) -> Chunk {
    let virt = DIRECT_MAP_OFFSET + chunk;
    let e = entry(pml4, index(virt, 39));
    if e & P == 0 {
        return Chunk::Unmapped;
    }
    let e = entry(e & ADDR_MASK, index(virt, 30));
    if e & P == 0 {
        return Chunk::Unmapped;
    }
    let cached = e & (PCD | PWT) == 0;
    if e & PS != 0 {
        let gib = chunk & !(GIB - 1);
        return match cached && e & ADDR_MASK & !(GIB - 1) == gib {
            true => Chunk::RamHere,
            false => Chunk::Other,
        };
    }
    let e = entry(e & ADDR_MASK, index(virt, 21));
    if e & P == 0 {
        Chunk::Unmapped
    } else if e & PS != 0 && e & (PCD | PWT) == 0 && e & ADDR_MASK == chunk {
        Chunk::RamHere
    } else {
        Chunk::Other
    }
}

/// `[phys, phys + len)` checked for `map_ram` / `unmap_ram`: 2 MiB
/// aligned, non-empty, within the direct map's reach; its end.
fn ram_range(phys: u64, len: u64) -> Result<u64, MapError> {
    if len == 0 || !phys.is_multiple_of(MIB2) || !len.is_multiple_of(MIB2) {
        return Err(MapError::Unaligned);
    }
    let end = phys.checked_add(len).ok_or(MapError::TooHigh)?;
    if end > MAX_PHYS {
        return Err(MapError::TooHigh);
    }
    Ok(end)
}

/// Makes the RAM `[phys, phys + len)` reachable, write-back (no PCD/PWT),
/// in the direct map with 2 MiB pages, and returns its virtual address:
/// memory that arrives after boot (virtio-mem's hot-plugged blocks, whose
/// region on q35 starts at 4 GiB or above the RAM above 4 GiB, 1 GiB
/// aligned). `phys` and `len` are multiples of 2 MiB. `alloc_table`
/// provides zeroed 4 KiB frames for new page tables (one per GiB touched
/// that has none yet); the caller must not hold what `alloc_table` locks.
///
/// Chunks already mapped write-back to themselves (by an earlier `map_ram`
/// or as boot RAM) are left as they are; the whole range is checked before
/// anything changes, and any chunk mapped otherwise (uncached device
/// window, 4 KiB pages) refuses the call with `OverlapsDevice`. When a
/// table frame runs out (`NoMemory`), the chunks mapped so far stay mapped
/// (harmless: the range's own frames, and a retry maps the rest).
pub fn map_ram(
    phys: u64,
    len: u64,
    alloc_table: &mut dyn FnMut() -> Option<u64>,
) -> Result<u64, MapError> {
    let end = ram_range(phys, len)?;
    let _guard = MAP_LOCK.lock();
    let pml4 = PML4.load(Ordering::Relaxed);
    assert!(pml4 != 0, "map_ram before paging::init");
    let mut chunk = phys;
    while chunk < end {
        if direct_chunk(pml4, chunk) == Chunk::Other {
            return Err(MapError::OverlapsDevice);
        }
        chunk += MIB2;
    }
    let mut changed = false;
    let mut result = Ok(DIRECT_MAP_OFFSET + phys);
    chunk = phys;
    'chunks: while chunk < end {
        if direct_chunk(pml4, chunk) == Chunk::RamHere {
            chunk += MIB2;
            continue;
        }
        // Checked above: every level present on the way is a table (a
        // 1 GiB page here would be `RamHere` or `Other`).
        let virt = DIRECT_MAP_OFFSET + chunk;
        let mut table = pml4;
        for shift in [39, 30] {
            let Some(t) = table_under(table, index(virt, shift), &mut *alloc_table) else {
                result = Err(MapError::NoMemory);
                break 'chunks;
            };
            table = t;
        }
        set_entry(table, index(virt, 21), chunk | P | RW | PS);
        changed = true;
        chunk += MIB2;
    }
    if changed {
        // Only not-present entries were filled: no stale translation can
        // exist for them, but flush anyway to drop cached walks.
        flush_tlb_all();
    }
    result
}

/// Removes `[phys, phys + len)` from the direct map again (a virtio-mem
/// block before it is unplugged: the host may discard it, and nothing must
/// reach it by accident), and flushes the TLB. Only for what [`map_ram`]
/// mapped: the range must lie above the RAM the boot map covers
/// (`OverlapsRam` otherwise) and be 2 MiB aligned; chunks not mapped are
/// skipped, and a chunk mapped any other way refuses the call before
/// anything changes (`OverlapsDevice`). A page directory `map_ram` added
/// that maps nothing any more is taken out and handed to `free_table`, as
/// Linux frees page tables on memory removal.
pub fn unmap_ram(phys: u64, len: u64, free_table: &mut dyn FnMut(u64)) -> Result<(), MapError> {
    let end = ram_range(phys, len)?;
    if phys < BOOT_RAM_END.load(Ordering::Relaxed) {
        return Err(MapError::OverlapsRam);
    }
    let _guard = MAP_LOCK.lock();
    let pml4 = PML4.load(Ordering::Relaxed);
    assert!(pml4 != 0, "unmap_ram before paging::init");
    let mut chunk = phys;
    while chunk < end {
        let virt = DIRECT_MAP_OFFSET + chunk;
        match direct_chunk(pml4, chunk) {
            Chunk::Unmapped => {}
            // `map_ram` never makes 1 GiB pages, and the boot map makes
            // them only below `BOOT_RAM_END`.
            Chunk::RamHere if entry_pdpt(pml4, virt) & PS == 0 => {}
            _ => return Err(MapError::OverlapsDevice),
        }
        chunk += MIB2;
    }
    chunk = phys;
    while chunk < end {
        let virt = DIRECT_MAP_OFFSET + chunk;
        let pdpt_entry = entry_pdpt(pml4, virt);
        if pdpt_entry & P != 0 {
            let pd = pdpt_entry & ADDR_MASK;
            if entry(pd, index(virt, 21)) & P != 0 {
                set_entry(pd, index(virt, 21), 0);
                // One CPU: no other TLB to shoot down.
                invlpg(virt);
            }
            // The last chunk of this GiB, or of the range: an empty page
            // directory goes (only `map_ram` made directories up here).
            let gib_end = (chunk | (GIB - 1)) + 1;
            if (chunk + MIB2 == gib_end || chunk + MIB2 >= end)
                && (0..512).all(|i| entry(pd, i) == 0)
            {
                let pdpt = entry(pml4, index(virt, 39)) & ADDR_MASK;
                set_entry(pdpt, index(virt, 30), 0);
                flush_tlb_all();
                free_table(pd);
            }
        }
        chunk += MIB2;
    }
    Ok(())
}

/// The PDPT entry above `virt` (0 when its PML4 entry is empty).
fn entry_pdpt(pml4: u64, virt: u64) -> u64 {
    let e = entry(pml4, index(virt, 39));
    if e & P == 0 {
        return 0;
    }
    entry(e & ADDR_MASK, index(virt, 30))
}

/// Physical address of the kernel's top page table (what CR3 holds): the
/// application processors load it (it lies below 4 GiB, after the kernel
/// image).
pub fn kernel_cr3() -> u64 {
    PML4.load(Ordering::Relaxed)
}

/// The kernel heap: memd-mm with vmalloc and per-CPU caches.
pub type KernelHeap = GlobalMm<{ super::percpu::MAX_CPUS }, super::percpu::KernelCpus>;

/// memd-mm as the kernel heap, with vmalloc over [`VMALLOC_START`] and
/// per-CPU caches for work that asks for them (for `main`'s
/// `#[global_allocator]`).
pub const fn kernel_heap() -> KernelHeap {
    // SAFETY: `KernelVmalloc::map_page` writes a present, writable 4 KiB
    // entry for the frame at the address given into the live page tables
    // (CR3 is loaded once, in `init`, and never changed), and only
    // `unmap_page` clears it. Nothing else maps anything in PML4 slot 402:
    // the direct map ends at slot 384 and the identity map is slot 0.
    unsafe { GlobalMm::with_vmalloc_cpus(&KernelVmalloc, super::percpu::KernelCpus) }
}

/// The vmalloc window's page tables: PDPT (built at boot) → PD → PT, the
/// lower two allocated from memd-mm on demand.
///
/// memd-mm calls these only with its manager locked, one at a time, and
/// `map_mmio` never touches slot 402, so the window's tables need no lock
/// of their own (taking `MAP_LOCK` here would also invert `map_mmio`'s
/// order: it takes memd-mm's lock for table frames while holding it).
pub struct KernelVmalloc;

fn in_vmalloc_window(virt: u64) -> bool {
    virt >= VMALLOC_START && virt - VMALLOC_START < VMALLOC_SIZE
}

fn index(virt: u64, shift: u32) -> u64 {
    (virt >> shift) & 511
}

/// The page-table entry slot `(table, index)` for `virt`'s 4 KiB page, if
/// every table above it exists.
fn vmalloc_pte(virt: u64) -> Option<(u64, u64)> {
    let pdpt = VMALLOC_PDPT.load(Ordering::Relaxed);
    if pdpt == 0 || !in_vmalloc_window(virt) {
        return None;
    }
    let pd = entry(pdpt, index(virt, 30));
    if pd & P == 0 {
        return None;
    }
    let pt = entry(pd & ADDR_MASK, index(virt, 21));
    if pt & P == 0 {
        return None;
    }
    Some((pt & ADDR_MASK, index(virt, 12)))
}

/// True if no entry of `table` is in use.
fn table_is_empty(table: u64) -> bool {
    (0..512).all(|i| entry(table, i) == 0)
}

/// Drops the TLB's translation of `virt`, and every cached walk through
/// the tables above it.
fn invlpg(virt: u64) {
    // SAFETY: `invlpg` only invalidates cached translations; it neither
    // reads nor writes memory.
    unsafe { asm!("invlpg [{}]", in(reg) virt, options(nostack, preserves_flags)) };
}

impl VmapOps for KernelVmalloc {
    fn window(&self) -> (u64, u64) {
        (VMALLOC_START, VMALLOC_SIZE)
    }

    fn map_page(&self, virt: u64, phys: u64, tables: &mut dyn PgtableAlloc) -> Result<(), MmError> {
        let pdpt = VMALLOC_PDPT.load(Ordering::Relaxed);
        if pdpt == 0 {
            return Err(MmError::Invalid("vmalloc before paging::init"));
        }
        if !in_vmalloc_window(virt)
            || !virt.is_multiple_of(PAGE)
            || !phys.is_multiple_of(PAGE)
            || phys >= MAX_PHYS
        {
            return Err(MmError::Invalid("vmalloc: bad page for the window"));
        }
        let mut table = pdpt;
        for shift in [30, 21] {
            // memd-mm hands out zeroed frames: a new table maps nothing.
            table = table_under(table, index(virt, shift), || tables.alloc_table())
                .ok_or(MmError::NoMemory)?;
        }
        let i = index(virt, 12);
        if entry(table, i) & P != 0 {
            return Err(MmError::Invalid("vmalloc: page already mapped"));
        }
        // A not-present entry becomes present: no stale translation of it
        // can be cached, so nothing to flush.
        set_entry(table, i, phys | P | RW);
        Ok(())
    }

    fn unmap_page(&self, virt: u64) -> Option<u64> {
        let (pt, i) = vmalloc_pte(virt)?;
        let e = entry(pt, i);
        if e & P == 0 {
            return None;
        }
        set_entry(pt, i, 0);
        Some(e & ADDR_MASK)
    }

    fn flush_tlb_page(&self, virt: u64) {
        // One CPU: no other TLB to shoot down.
        invlpg(virt);
    }

    fn translate(&self, virt: u64) -> Option<u64> {
        let (pt, i) = vmalloc_pte(virt)?;
        let e = entry(pt, i);
        (e & P != 0).then_some(e & ADDR_MASK)
    }

    fn free_empty_tables(&self, start: u64, end: u64, tables: &mut dyn PgtableAlloc) {
        let pdpt = VMALLOC_PDPT.load(Ordering::Relaxed);
        let end = end.min(VMALLOC_START + VMALLOC_SIZE);
        if pdpt == 0 || start >= end || !in_vmalloc_window(start) {
            return;
        }
        let mut gib = start & !(GIB - 1);
        while gib < end {
            let pdpt_index = index(gib, 30);
            let e = entry(pdpt, pdpt_index);
            if e & P != 0 {
                let pd = e & ADDR_MASK;
                let mut chunk = gib.max(start & !(MIB2 - 1));
                while chunk < end.min(gib + GIB) {
                    let pd_index = index(chunk, 21);
                    let e = entry(pd, pd_index);
                    if e & P != 0 && table_is_empty(e & ADDR_MASK) {
                        set_entry(pd, pd_index, 0);
                        invlpg(chunk);
                        tables.free_table(e & ADDR_MASK);
                    }
                    chunk += MIB2;
                }
                if table_is_empty(pd) {
                    set_entry(pdpt, pdpt_index, 0);
                    invlpg(gib);
                    tables.free_table(pd);
                }
            }
            gib += GIB;
        }
    }
}
