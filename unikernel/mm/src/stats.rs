//! Statistics as typed values: the views kernel engineers already read
//! (/proc/meminfo, /proc/zoneinfo, /proc/buddyinfo, /proc/slabinfo) plus
//! mempools, CMA and per-owner usage.
//!
//! The protocol carries [`MemInfo`], [`SlabInfo`] and [`CmaUsage`] as
//! they are (feature `serde`): their field order is the order of the bytes
//! on the wire, pinned by memd-wire's `tests/encoding.rs`.

use crate::memblock::PAGE_SIZE;
use crate::owner::Owner;
use crate::slab::{CacheCounters, CacheId, CacheName, Corruption, SlabFlags};
use crate::zone::{Watermarks, ZoneCounters, ZoneType, MAX_ORDER_LIMIT, NR_ZONES};
use crate::MemoryManager;

/// Manager-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmCounters {
    pub large_pages: u64,
    pub pool_pages: u64,
    pub dma_buddy_pages: u64,
    pub dma_buffers: u64,
    pub reclaim_runs: u64,
    pub reclaimed_pages: u64,
    pub alloc_fail_warnings: u64,
    /// Pages mapped in vmalloc areas.
    pub vmalloc_pages: u64,
    /// Frames holding page tables of the vmalloc window.
    pub pgtable_pages: u64,
    /// vmalloc requests refused (no room in the window, no memory).
    pub vmalloc_failures: u64,
    /// Pages in the balloon (given to the host on its request).
    pub balloon_pages: u64,
    /// Balloon blocks taken back for allocations that would have failed.
    pub balloon_oom_deflates: u64,
}

impl MmCounters {
    pub const fn new() -> Self {
        MmCounters {
            large_pages: 0,
            pool_pages: 0,
            dma_buddy_pages: 0,
            dma_buffers: 0,
            reclaim_runs: 0,
            reclaimed_pages: 0,
            alloc_fail_warnings: 0,
            vmalloc_pages: 0,
            pgtable_pages: 0,
            vmalloc_failures: 0,
            balloon_pages: 0,
            balloon_oom_deflates: 0,
        }
    }
}

/// The last few debug findings, newest last.
#[derive(Clone, Copy, Debug)]
pub struct CorruptionLog {
    entries: [Option<Corruption>; 8],
    pub total: u64,
}

impl Default for CorruptionLog {
    fn default() -> Self {
        Self::new()
    }
}

impl CorruptionLog {
    pub const fn new() -> Self {
        CorruptionLog {
            entries: [None; 8],
            total: 0,
        }
    }

    pub fn record(&mut self, c: Corruption) {
        self.entries.rotate_left(1);
        self.entries[7] = Some(c);
        self.total += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Corruption> {
        self.entries.iter().flatten()
    }
}

/// /proc/meminfo, in bytes.
///
/// Shared with the protocol: memd-wire re-exports this type and the
/// service sends it as it is, so the order of the fields is the order of
/// the bytes on the wire (memd-wire pins it in a test). A new field goes
/// at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MemInfo {
    /// Memory the manager owns: managed zone pages plus the CMA region.
    pub total: u64,
    /// Buddy free + per-CPU lists + CMA free.
    pub free: u64,
    /// On the buddy free lists.
    pub buddy_free: u64,
    /// On the per-CPU page lists.
    pub pcp: u64,
    /// Pages held by slab caches.
    pub slab: u64,
    /// Objects parked in slab caches' per-CPU arrays and empty slabs:
    /// reclaimable on demand.
    pub slab_reclaimable: u64,
    /// kmalloc allocations too large for the size classes, served straight
    /// from the buddy.
    pub kmalloc_large: u64,
    /// Pages charged to owners (all page allocations).
    pub pages_allocated: u64,
    /// Idle mempool reserves.
    pub mempool_reserve: u64,
    /// DMA buffers served by the buddy.
    pub dma_buddy: u64,
    /// The contiguous-memory region.
    pub cma_total: u64,
    /// Free in the contiguous-memory region.
    pub cma_free: u64,
    /// Reserved at boot (kernel image, boot tables, frame table, CMA),
    /// holes of the memory map excluded.
    pub reserved: u64,
    /// The frame table (`struct page` array).
    pub frame_table: u64,
    /// The vmalloc window's size (0 without vmalloc).
    pub vmalloc_total: u64,
    /// Pages mapped in vmalloc areas (guard pages are not): the kernel
    /// heap's large allocations.
    pub vmalloc_used: u64,
    /// The largest free range of the window: a vmalloc of up to this
    /// less its guard page finds room.
    pub vmalloc_chunk: u64,
    /// Usable memory whose frames are not initialised yet (deferred
    /// initialisation): not in `total` until it arrives. Linux reports
    /// none of this.
    pub deferred: u64,
    /// Free memory in blocks reported to the host (free page reporting):
    /// the host may have taken it back; it is still free for memd.
    pub reported: u64,
    /// Memory in the balloon: given to the host on its request.
    pub balloon: u64,
}

/// One zone of /proc/zoneinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneInfo {
    pub zone: ZoneType,
    pub start_pfn: u64,
    pub end_pfn: u64,
    pub managed: u64,
    pub free: u64,
    pub watermark: Watermarks,
    pub lowmem_reserve: [u64; NR_ZONES],
    pub pcp_count: u64,
    pub pcp_high: u64,
    pub pcp_batch: u64,
    pub nr_free: [u64; MAX_ORDER_LIMIT],
    pub max_order: u32,
    pub counters: ZoneCounters,
    /// Usable frames of the zone not initialised yet (deferred
    /// initialisation): they join `managed` as they arrive.
    pub deferred: u64,
    /// Frames of the zone in the balloon.
    pub balloon: u64,
}

/// One line of /proc/slabinfo, generic over the form of the cache's name.
///
/// memd-mm's view ([`MemoryManager::slabinfo`]) holds the name inline, a
/// [`CacheName`], so a snapshot needs no borrow of the manager; the
/// protocol's (`memd_wire::SlabInfo`) is this type with a `String`, and
/// [`SlabInfo::with_name`] turns one into the other. The order of the
/// fields is the order of the bytes on the wire (memd-wire pins it in a
/// test): a new field goes at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlabInfo<Name = CacheName> {
    /// The cache's name.
    pub name: Name,
    /// Objects in use.
    pub active_objs: u64,
    /// Object slots in all slabs.
    pub num_objs: u64,
    /// Object size as requested.
    pub objsize: u64,
    /// Distance between objects in a slab: the size plus alignment, red
    /// zone and an outside free pointer.
    pub stride: u64,
    /// Objects per slab.
    pub objperslab: u64,
    /// Pages per slab.
    pub pagesperslab: u64,
    /// Slabs with at least one object in use.
    pub active_slabs: u64,
    /// All slabs.
    pub num_slabs: u64,
    /// `SLAB_*` creation flags.
    pub flags: SlabFlags,
    /// Has a constructor.
    pub has_ctor: bool,
    /// kmalloc's own cache (cannot be destroyed).
    pub builtin: bool,
    /// Activity counters.
    pub counters: CacheCounters,
    /// The per-CPU arrays in front of the cache, all CPUs summed, where
    /// there are any (a kmalloc cache of a `GlobalMm` with CPUs, filled in
    /// by its owner: [`MemoryManager::slabinfo`] does not see them).
    pub cpustat: Option<CpuStat>,
}

/// Hits and misses of a per-CPU cache, as Linux SLAB's `cpustat` columns
/// of /proc/slabinfo: allocations it served, and those that found it
/// empty and refilled it with a batch first; frees it kept, and those that
/// found it full and gave a batch back first. Each CPU counts its own;
/// readers sum them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CpuStat {
    pub allochit: u64,
    pub allocmiss: u64,
    pub freehit: u64,
    pub freemiss: u64,
}

impl core::ops::AddAssign for CpuStat {
    fn add_assign(&mut self, o: CpuStat) {
        self.allochit += o.allochit;
        self.allocmiss += o.allocmiss;
        self.freehit += o.freehit;
        self.freemiss += o.freemiss;
    }
}

/// One CPU's counters ([`crate::GlobalMm::cpu_stats`]): its page lists',
/// and its kmalloc arrays' by size class (the cache of the same id).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    pub pages: CpuStat,
    pub objects: [CpuStat; crate::kmalloc::NR_KMALLOC],
}

impl CpuStats {
    /// The kmalloc arrays' counters, all size classes together.
    pub fn objects_summed(&self) -> CpuStat {
        let mut sum = CpuStat::default();
        for &c in &self.objects {
            sum += c;
        }
        sum
    }
}

impl<N> SlabInfo<N> {
    /// The same line with the name in another form.
    pub fn with_name<M>(self, name: M) -> SlabInfo<M> {
        SlabInfo {
            name,
            active_objs: self.active_objs,
            num_objs: self.num_objs,
            objsize: self.objsize,
            stride: self.stride,
            objperslab: self.objperslab,
            pagesperslab: self.pagesperslab,
            active_slabs: self.active_slabs,
            num_slabs: self.num_slabs,
            flags: self.flags,
            has_ctor: self.has_ctor,
            builtin: self.builtin,
            counters: self.counters,
            cpustat: self.cpustat,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MempoolInfo {
    pub id: u16,
    pub backing: crate::PoolBacking,
    pub min_nr: u64,
    pub curr_nr: u64,
    pub element_size: u64,
    /// Bytes parked in the reserve, doing nothing until memory runs out.
    pub idle_bytes: u64,
    pub outstanding: u64,
    pub counters: crate::mempool::PoolCounters,
}

/// The contiguous-memory region: where it is and how it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmaInfo {
    /// First physical address.
    pub base: u64,
    /// Bytes reserved.
    pub size: u64,
    /// The zone it lies in.
    pub zone: ZoneType,
    /// What is in it.
    pub usage: CmaUsage,
}

/// How the contiguous-memory region is used, in bytes. Shared with the
/// protocol: memd-wire's `CmaInfo` carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CmaUsage {
    /// In buffers.
    pub used: u64,
    /// Free.
    pub free: u64,
    /// The largest free contiguous range.
    pub largest_free: u64,
    /// Live buffers.
    pub buffers: u64,
    /// Allocations made.
    pub allocs: u64,
    /// Allocations that failed.
    pub failures: u64,
}

impl MemoryManager {
    /// Frames in slabs, all zones.
    pub(crate) fn slab_pages(&self) -> u64 {
        self.slab_pages.iter().sum()
    }

    pub fn meminfo(&self) -> MemInfo {
        let page = PAGE_SIZE;
        // Free blocks lent to a reporting device are free memory too.
        let buddy_free: u64 = self.zones.iter().map(|z| z.free + z.isolated).sum();
        let pcp: u64 = self.zones.iter().map(|z| z.pcp.count as u64).sum();
        let managed: u64 = self.zones.iter().map(|z| z.managed).sum();
        let (cma_total, cma_free) = self
            .cma
            .as_ref()
            .map_or((0, 0), |c| (c.pages * page, c.free_pages() * page));
        let mut slab_reclaimable = 0;
        for (_, c) in self.caches() {
            slab_reclaimable +=
                c.ac.avail as u64 * c.stride as u64 + c.empty.len as u64 * c.slab_bytes() as u64;
        }
        let mempool_reserve = self
            .mempools()
            .map(|(_, p)| p.curr_nr as u64 * p.element_size as u64)
            .sum();
        let pages_allocated: u64 = self.owners.charged();
        let reserved = self
            .memblock
            .reserved()
            .iter()
            .filter(|r| r.kind != crate::ReserveKind::Hole)
            .map(|r| r.end - r.start)
            .sum();
        let frame_table = self
            .memblock
            .reserved()
            .iter()
            .filter(|r| r.kind == crate::ReserveKind::FrameTable)
            .map(|r| r.end - r.start)
            .sum();
        let (vmalloc_total, vmalloc_chunk) = self.vmalloc_totals();
        MemInfo {
            total: managed * page + cma_total,
            free: (buddy_free + pcp) * page + cma_free,
            buddy_free: buddy_free * page,
            pcp: pcp * page,
            slab: self.slab_pages() * page,
            slab_reclaimable,
            kmalloc_large: self.counters.large_pages * page,
            pages_allocated: pages_allocated * page,
            mempool_reserve,
            dma_buddy: self.counters.dma_buddy_pages * page,
            cma_total,
            cma_free,
            reserved,
            frame_table,
            vmalloc_total,
            vmalloc_used: self.counters.vmalloc_pages * page,
            vmalloc_chunk,
            deferred: self.deferred_pages() * page,
            reported: self.reported_bytes(),
            balloon: self.counters.balloon_pages * page,
        }
    }

    pub fn zoneinfo(&self) -> [ZoneInfo; NR_ZONES] {
        ZoneType::ALL.map(|ty| {
            let z = &self.zones[ty as usize];
            let mut nr_free = [0; MAX_ORDER_LIMIT];
            for (o, n) in nr_free.iter_mut().enumerate().take(self.max_order as usize) {
                *n = z.free_area[o].list.len as u64;
            }
            ZoneInfo {
                zone: ty,
                start_pfn: z.start_pfn,
                end_pfn: z.end_pfn,
                managed: z.managed,
                free: z.free,
                watermark: z.watermark,
                lowmem_reserve: z.lowmem_reserve,
                pcp_count: z.pcp.count as u64,
                pcp_high: crate::pcp::PCP_HIGH as u64,
                pcp_batch: crate::pcp::PCP_BATCH as u64,
                nr_free,
                max_order: self.max_order,
                counters: z.counters,
                balloon: z.balloon,
                // Plugged memory is never deferred.
                deferred: match ty {
                    ZoneType::Movable => 0,
                    _ => {
                        let (lo, hi) = ty.span();
                        self.deferred_in(lo / PAGE_SIZE, hi / PAGE_SIZE)
                    }
                },
            }
        })
    }

    /// /proc/buddyinfo: free blocks per order, per zone.
    pub fn buddyinfo(&self) -> [(ZoneType, [u64; MAX_ORDER_LIMIT]); NR_ZONES] {
        self.zoneinfo().map(|z| (z.zone, z.nr_free))
    }

    /// /proc/slabinfo: each cache's line, with its id.
    pub fn slabinfo(&self) -> impl Iterator<Item = (CacheId, SlabInfo)> + '_ {
        self.caches().map(|(id, c)| {
            let slabs = c.nr_slabs();
            let line = SlabInfo {
                name: c.cache_name(),
                active_objs: c.active_objects(),
                num_objs: slabs * c.objs_per_slab as u64,
                objsize: c.object_size as u64,
                stride: c.stride as u64,
                objperslab: c.objs_per_slab as u64,
                pagesperslab: 1 << c.order,
                active_slabs: (c.partial.len + c.full.len) as u64,
                num_slabs: slabs,
                flags: c.flags,
                has_ctor: c.ctor.is_some(),
                builtin: c.builtin,
                counters: c.counters,
                cpustat: None,
            };
            (id, line)
        })
    }

    pub fn mempool_info(&self) -> impl Iterator<Item = MempoolInfo> + '_ {
        self.mempools().map(|(id, p)| MempoolInfo {
            id: id.0,
            backing: p.backing,
            min_nr: p.min_nr as u64,
            curr_nr: p.curr_nr as u64,
            element_size: p.element_size as u64,
            idle_bytes: p.curr_nr as u64 * p.element_size as u64,
            outstanding: p.outstanding,
            counters: p.counters,
        })
    }

    pub fn cma_info(&self) -> Option<CmaInfo> {
        self.cma.as_ref().map(|c| CmaInfo {
            base: c.base,
            size: c.pages * PAGE_SIZE,
            zone: c.zone,
            usage: CmaUsage {
                used: c.used_pages * PAGE_SIZE,
                free: c.free_pages() * PAGE_SIZE,
                largest_free: c.largest_free(),
                buffers: c.extents().len() as u64,
                allocs: c.allocs,
                failures: c.failures,
            },
        })
    }

    /// Owners holding pages, with their page counts.
    pub fn owners(&self) -> impl Iterator<Item = (Owner, u64)> + '_ {
        self.owners
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pages > 0)
            .map(|(i, s)| (Owner(i as u16), s.pages))
    }

    pub fn counters(&self) -> MmCounters {
        self.counters
    }

    pub fn corruptions(&self) -> &CorruptionLog {
        &self.corruption_log
    }
}
