//! memd-mm: a memory manager built the way Linux's `mm/` is.
//!
//! Layers, bottom up, each in its own module and named as Linux names it:
//! `memblock`, the boot allocator ([`Memblock`]) → `frame`, the frame table
//! ([`Frame`], Linux's `struct page`) → `zone`: DMA / DMA32 / Normal with
//! watermarks ([`ZoneType`]) → `buddy` with `pcp` lists in front
//! ([`MemoryManager::alloc_pages`]) → `slab` caches ([`KmemCache`]) and
//! `kmalloc` ([`MemoryManager::kmalloc`]) → `mempool`
//! ([`MemoryManager::mempool_create`]) → `cma`, the boot-time contiguous
//! region ([`Cma`]) → `dma`, the DMA API ([`MemoryManager::dma_alloc`]) →
//! `vmalloc`, virtually contiguous memory from order-0 frames
//! ([`MemoryManager::vmalloc`]) → `node`, the manager behind a node lock
//! with a lock per zone and per kmalloc cache → `global`, a `GlobalAlloc`
//! with per-CPU caches in front ([`GlobalMm`]).
//! [`stats`] renders the Linux views; `check` verifies every invariant
//! ([`MemoryManager::check`]).
//!
//! The layers are methods of one [`MemoryManager`], Linux's node. The
//! modules other than [`stats`] are private: what other crates use is
//! re-exported at the root.
//!
//! The crate knows nothing of x86, virtio or sockets. It is handed physical
//! ranges and a direct-map offset through which it reaches them.
//!
//! # Unsafe code
//!
//! The crate denies `unsafe_code`. Five places are allowed it, each marked
//! `#[allow(unsafe_code)]` in this file:
//!
//! - the `access` module: raw reads and writes of managed memory through
//!   the direct map. No other module touches memory except through it.
//! - [`MemoryManager::init`], an unsafe fn whose contract the kernel signs:
//!   it turns the frame table's memory into a slice (with `access`).
//! - the `global` module: [`GlobalMm`] implements the unsafe `GlobalAlloc`
//!   trait, and takes the architecture's word, in the unsafe
//!   [`GlobalMm::with_vmalloc`], that vmalloc's pages are really mapped.
//! - the `node` module: the manager behind its node lock, with a lock per
//!   zone and per kmalloc cache under it; the per-CPU caches' batches
//!   reach the parts of the manager their locks own through raw pointers.
//! - the host-only `arena` module (feature `std`): it borrows memory from
//!   the host allocator and boots a manager over it, and its `HostGlobal`
//!   implements `GlobalAlloc`.
//!
//! Every unsafe block says why it is sound in a `// SAFETY:` comment.
//!
//! # Booting
//! ```ignore
//! static MM: memd_mm::GlobalMm = memd_mm::GlobalMm::new();
//! unsafe { MM.init(&BootInfo { regions, cmdline, direct_map_offset, reserved, zeroed: false }) }?;
//! ```

#![no_std]
#![deny(unsafe_code)]

#[cfg(any(test, feature = "std"))]
extern crate std;

// The modules are private: other crates use the items re-exported below,
// so how the code is split into modules can change without breaking them.
// `stats` is the one public module (see its line).
#[allow(unsafe_code)]
mod access;
#[cfg(feature = "std")]
#[allow(unsafe_code)]
mod arena;
mod balloon;
mod buddy;
mod bytes;
mod check;
mod cma;
mod cmdline;
mod cpu_cache;
mod deferred;
mod dma;
mod error;
mod fault;
mod flag_names;
mod frame;
mod frame_runs;
mod gfp;
#[allow(unsafe_code)]
mod global;
mod idr;
mod kmalloc;
mod kmem_cache;
mod list;
mod memblock;
mod memory_hotplug;
mod mempool;
#[allow(unsafe_code)]
mod node;
mod owner;
mod page_alloc;
mod page_reporting;
mod pageblock;
mod pcp;
mod percpu_rwsem;
mod prandom;
mod slab;
mod slab_common;
mod sparse;
// Public as a namespace: its types are the Linux views (`stats::MemInfo`
// is /proc/meminfo, `stats::ZoneInfo` one zone of /proc/zoneinfo, ...).
// memd-wire carries some of them as they are (`MemInfo`, `SlabInfo`) and
// has its own types of the same names for the others (`ZoneInfo`,
// `CmaInfo`, ...), which the service builds from these, so callers name
// them by module (docs/design-notes.md).
pub mod stats;
mod vmalloc;
mod zone;

pub use access::{slice_mut, DirectMap};
#[cfg(feature = "std")]
pub use arena::{HostCpus, HostGlobal, HostMm, HOST_CPUS};
pub use balloon::BALLOON_ORDER;
pub use check::{CheckError, CheckWalk};
pub use cma::{Cma, Extent};
pub use cmdline::{DmaReserve, MmOptions};
pub use cpu_cache::{CPU_PAGES_HIGH, PCP_MAX_ORDER};
pub use deferred::BOOT_INIT_BYTES;
pub use dma::{DmaBuffer, DmaLent, DmaMask, DmaRequest, DmaSource, MAX_LENT};
pub use error::MmError;
pub use fault::FaultAttr;
pub use frame::{Frame, FrameState, FRAME_DESCRIPTOR_BYTES};
pub use frame_runs::{FrameRun, FrameRuns, RunKind};
pub use gfp::Gfp;
pub use global::{CpuIds, Drained, GlobalMm, KObj, NoCpus, PageBlock};
pub use kmalloc::{kmalloc_size_roundup, NR_KMALLOC};
pub use list::{FrameList, FrameListIter};
pub use memblock::{MemRegion, Memblock, RegionKind, Reservation, ReserveKind, PAGE_SIZE};
pub use memory_hotplug::HotplugRegion;
pub use mempool::{Mempool, PoolBacking, PoolCounters, PoolElement, PoolId};
pub use node::MmGuard;
pub use owner::Owner;
pub use page_reporting::{ReportBlock, REPORT_ORDER};
pub use pcp::PCP_BATCH;
pub use prandom::Prandom;
pub use slab::{
    CacheCounters, CacheId, CacheName, Corruption, CorruptionKind, Ctor, KmemCache, SlabFlags,
    CACHE_NAME_LEN,
};
pub use vmalloc::{PgtableAlloc, VmallocArea, VmapOps};
pub use zone::{Watermarks, ZoneCounters, ZoneType, DEFAULT_MAX_ORDER, MAX_ORDER_LIMIT, NR_ZONES};

use core::ops::Range;

/// What the kernel hands the memory manager at boot.
pub struct BootInfo<'a> {
    /// The firmware memory map, in any order.
    pub regions: &'a [MemRegion],
    /// The kernel command line (`memd.dma_reserve=`, `memmap=`, ...).
    pub cmdline: &'a str,
    /// Virtual address of physical address 0 in the direct map.
    pub direct_map_offset: u64,
    /// Physical ranges already in use: kernel image, page tables, boot data.
    pub reserved: &'a [Range<u64>],
    /// True when RAM is known to read as zero (a fresh QEMU guest), so the
    /// frame table need not be cleared; clearing 16 bytes per frame is the
    /// largest fixed cost of booting a big guest.
    pub zeroed: bool,
    /// Initialise only the first `BOOT_INIT_BYTES` of memory at boot and
    /// the rest with [`MemoryManager::deferred_init_step`] (the command
    /// line's `memd.deferred_init=on|off` overrides it).
    pub deferred_init: bool,
}

/// The memory manager: Linux's node (`pglist_data`) with everything that
/// hangs off it. The fields every allocation and free reads come first, in
/// this order (`repr(C)`), from a cache line's start (`align(64)`, however
/// the manager is placed): the frame table, the direct map and the zonelist
/// on the first line, the caches, the owners and the fault flags on the
/// second.
#[repr(C, align(64))]
pub struct MemoryManager {
    /// The frame table's initialised prefix: every frame below
    /// `frames.len()` is valid, the rest waits for `deferred_init_step`.
    pub(crate) frames: sparse::Frames,
    pub(crate) dmap: DirectMap,
    pub(crate) max_order: u32,
    /// First populated zone of each zonelist (Linux's preferred zone): a
    /// Normal request on a machine without Normal memory starts at DMA32.
    pub(crate) preferred_zone: [ZoneType; NR_ZONES],
    /// Slab caches by id; their descriptors are objects of the cache of
    /// caches (`slab_common.rs`).
    pub(crate) caches: idr::Idr<KmemCache>,
    pub(crate) owners: owner::OwnerTable,
    pub(crate) fault: fault::Faults,
    initialized: bool,
    pub(crate) pageblocks: pageblock::Pageblocks,
    pub(crate) counters: stats::MmCounters,
    /// All of the frame table's memory.
    pub(crate) table: access::FrameTable,
    /// Whether the table's memory read as zero at boot.
    pub(crate) table_zeroed: bool,
    /// DMA buffers whose bytes are lent out (`dma_lend`): their physical
    /// ranges, `(0, 0)` for none. A table memd-mm allocates from itself
    /// while anything is lent (out of line: it stays off the hot paths'
    /// cache lines).
    pub(crate) dma_lent: &'static mut [(u64, u64)],
    pub(crate) zones: [zone::Zone; NR_ZONES],
    pub(crate) memblock: Memblock,
    /// Mempools by id; their descriptors are objects of `mempool_t`.
    pub(crate) pools: idr::Idr<mempool::Mempool>,
    pub(crate) cma: Option<Cma>,
    /// The hot-plug region `(start, size)`, once declared
    /// (`memory_hotplug.rs`).
    pub(crate) hotplug: Option<(u64, u64)>,
    /// The balloon's blocks (`balloon.rs`), linked through their heads.
    pub(crate) balloon: FrameList,
    pub(crate) balloon_deflate_on_oom: bool,
    pub(crate) vmalloc: vmalloc::Vmalloc,
    pub(crate) corruption_log: stats::CorruptionLog,
    /// Frames in slabs, by zone (Linux's `NR_SLAB_UNRECLAIMABLE`): a cache
    /// grows under its zone's lock, and counts the slab under it too.
    pub(crate) slab_pages: [u64; NR_ZONES],
}

impl Default for MemoryManager {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryManager {
    /// An empty manager; [`MemoryManager::init`] gives it memory. `const` so
    /// that it can live in a static (it is tens of KiB: never put it on a
    /// small stack).
    pub const fn new() -> Self {
        MemoryManager {
            frames: sparse::Frames::new(),
            table: access::FrameTable::empty(),
            table_zeroed: false,
            pageblocks: pageblock::Pageblocks::new(),
            dmap: DirectMap::new(0),
            dma_lent: &mut [],
            max_order: DEFAULT_MAX_ORDER as u32,
            zones: [
                zone::Zone::new(ZoneType::Dma),
                zone::Zone::new(ZoneType::Dma32),
                zone::Zone::new(ZoneType::Normal),
                zone::Zone::new(ZoneType::Movable),
            ],
            preferred_zone: ZoneType::ALL,
            memblock: Memblock::new(),
            caches: idr::Idr::new(),
            pools: idr::Idr::new(),
            cma: None,
            hotplug: None,
            balloon: FrameList::new(),
            balloon_deflate_on_oom: false,
            vmalloc: vmalloc::Vmalloc::new(),
            owners: owner::OwnerTable::new(),
            fault: fault::Faults::new(),
            counters: stats::MmCounters::new(),
            corruption_log: stats::CorruptionLog::new(),
            initialized: false,
            slab_pages: [0; NR_ZONES],
        }
    }

    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// Takes ownership of the machine's memory: builds the memblock view,
    /// places the frame table and the DMA reservation, releases the rest to
    /// the zones, and creates the owner table, the cache of caches and
    /// kmalloc's caches.
    ///
    /// # Safety
    /// Every `Usable` range in `boot.regions`, minus `boot.reserved`, must be
    /// RAM that nothing else uses from now on, mapped read-write at
    /// `phys + boot.direct_map_offset`, and must stay so while this manager
    /// (or anything it handed out) is in use.
    #[allow(unsafe_code)]
    pub unsafe fn init(&mut self, boot: &BootInfo) -> Result<(), MmError> {
        if self.initialized {
            return Err(MmError::Invalid("memory manager already initialised"));
        }
        let opts = MmOptions::parse(boot.cmdline)?;
        self.max_order = opts.max_order.unwrap_or(DEFAULT_MAX_ORDER) as u32;
        self.dmap = DirectMap::new(boot.direct_map_offset);

        let mb = &mut self.memblock;
        for r in boot.regions.iter().filter(|r| r.kind == RegionKind::Usable) {
            if !mb.add_memory(r.start, r.end) {
                return Err(MmError::TableFull);
            }
        }
        for &(start, end) in opts.holes() {
            if !mb.remove_memory(start, end) || !mb.reserve(start, end, ReserveKind::Hole) {
                return Err(MmError::TableFull);
            }
        }
        for r in boot.reserved {
            if !mb.reserve(r.start, r.end, ReserveKind::Kernel) {
                return Err(MmError::TableFull);
            }
        }
        mb.reserve(0, PAGE_SIZE, ReserveKind::Zero);

        let end = mb.end_of_memory();
        if end == 0 {
            return Err(MmError::Invalid("no usable memory in the memory map"));
        }
        let nr_frames = end / PAGE_SIZE;
        if nr_frames > u32::MAX as u64 - 1 {
            return Err(MmError::Invalid(
                "more memory than 32-bit frame numbers reach",
            ));
        }
        let table_bytes = nr_frames * FRAME_DESCRIPTOR_BYTES as u64;
        let table = mb
            .alloc(table_bytes, PAGE_SIZE, 0, u64::MAX, ReserveKind::FrameTable)
            .ok_or(MmError::NoMemory)?;
        let pageblock_order = self.max_order - 1;
        // With deferred initialisation, the frames below the boot amount
        // (whole pageblocks); the rest come with `deferred_init_step`.
        let boot_frames = if opts.deferred_init.unwrap_or(boot.deferred_init) {
            (deferred::BOOT_INIT_BYTES / PAGE_SIZE)
                .next_multiple_of(1 << pageblock_order)
                .min(nr_frames)
        } else {
            nr_frames
        };
        // SAFETY: `table` was just carved out of usable RAM that the caller
        // gave us (see this function's contract) and reserved, so nothing else
        // will use it; it is page aligned.
        let (table, frames) = unsafe {
            access::FrameTable::new(
                self.dmap.virt(table),
                nr_frames as usize,
                boot_frames as usize,
            )
        };
        self.table = table;
        self.frames.boot = frames;
        self.table_zeroed = boot.zeroed;
        let nr_blocks = pageblock::Pageblocks::needed(nr_frames, pageblock_order);
        let counts = mb
            .alloc(
                nr_blocks * core::mem::size_of::<pageblock::Counts>() as u64,
                PAGE_SIZE,
                0,
                u64::MAX,
                ReserveKind::FrameTable,
            )
            .ok_or(MmError::NoMemory)?;
        // SAFETY: as for the frame table: carved out of the caller's usable
        // RAM just now, reserved, and page aligned.
        self.pageblocks.counts =
            unsafe { access::pageblock_table(self.dmap.virt(counts), nr_blocks as usize) };
        self.pageblocks.order = pageblock_order;
        if !boot.zeroed {
            self.pageblocks.counts.fill(pageblock::Counts::default());
        }
        // Zeroed RAM reads as `FrameState::None` everywhere, which is what an
        // untouched frame must be; only the link fields differ, and they are
        // only read on list members.

        if let Some(reserve) = opts.dma_reserve {
            let (lo, hi) = reserve.zone.span();
            let align = reserve.size.next_power_of_two().min(4 << 20);
            let base = mb
                .alloc(reserve.size, align, lo, hi, ReserveKind::DmaReserve)
                .ok_or(MmError::Invalid(
                    "memd.dma_reserve: no contiguous range of that size in that zone",
                ))?;
            self.cma = Some(Cma::new(base, reserve.size, reserve.zone));
        }

        // Each zone's span, from all of its free memory (initialised or
        // not): first and one-past-last frame.
        let zones = &mut self.zones;
        self.memblock.for_each_free(|start, end| {
            let mut pfn = start / PAGE_SIZE;
            let end_pfn = end / PAGE_SIZE;
            while pfn < end_pfn {
                let ty = ZoneType::of_pfn(pfn);
                let zone_end = (ty.span().1 / PAGE_SIZE).min(end_pfn);
                let zone = &mut zones[ty as usize];
                if zone.end_pfn == 0 {
                    zone.start_pfn = pfn;
                }
                zone.end_pfn = zone_end;
                pfn = zone_end;
            }
        });
        self.init_frames(0, boot_frames);
        self.initialized = true;
        self.owners_init()?;
        self.kmem_cache_init()?;
        if self.cma.is_some() {
            self.cma_table_set(cma::EXTENTS_MIN);
        }
        Ok(())
    }

    /// The direct map this manager reaches memory through.
    pub fn direct_map(&self) -> DirectMap {
        self.dmap
    }

    /// Number of buddy free lists (orders `0..max_order`).
    pub fn max_order(&self) -> u32 {
        self.max_order
    }

    /// Boot-time reservations, for the memory map views.
    pub fn reservations(&self) -> &[Reservation] {
        self.memblock.reserved()
    }

    /// Usable RAM ranges as memblock saw them.
    pub fn memory_ranges(&self) -> &[(u64, u64)] {
        self.memblock.memory()
    }

    /// The frame descriptor of a physical address, for views and tests.
    pub fn frame(&self, phys: u64) -> Option<&Frame> {
        self.frames.get((phys / PAGE_SIZE) as usize)
    }

    /// Number of frames the frame table may describe: boot memory
    /// (initialised or not), and the hot-plug region once declared.
    pub fn nr_frames(&self) -> usize {
        self.table.carved().max(self.frames.end())
    }

    /// Frames initialised so far: the rest of the table waits for
    /// [`MemoryManager::deferred_init_step`].
    pub fn initialised_frames(&self) -> usize {
        self.frames.boot_len()
    }
}
