//! The statistics views of a `MemoryManager`: [`snapshot`] copies them
//! into a heap-free [`MmStats`] under the lock, [`render`] turns that into
//! the protocol's types after.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use memd_mm::stats::{CmaInfo as MmCma, MemInfo, MempoolInfo as MmPool, ZoneInfo as MmZone};
use memd_mm::MemoryManager;
use memd_wire::{BuddyZone, CmaInfo, MempoolInfo, Reply, SlabFlags, SlabInfo, ZoneInfo};

use crate::memory::View;

/// A slabinfo line copied out of the manager (the name is borrowed there).
#[derive(Clone, Copy)]
pub struct SlabSnap {
    name: [u8; memd_mm::CACHE_NAME_LEN],
    name_len: usize,
    active_objs: u64,
    num_objs: u64,
    objsize: u64,
    stride: u64,
    objperslab: u64,
    pagesperslab: u64,
    active_slabs: u64,
    num_slabs: u64,
    flags: u32,
    has_ctor: bool,
    builtin: bool,
    counters: memd_mm::CacheCounters,
}

/// Heap-free statistics snapshot of a `MemoryManager`.
pub struct MmStats {
    max_order: u32,
    meminfo: Option<MemInfo>,
    zones: Option<[MmZone; memd_mm::NR_ZONES]>,
    slabs: [Option<SlabSnap>; memd_mm::MAX_CACHES],
    pools: [Option<MmPool>; memd_mm::MAX_POOLS],
    cma: Option<MmCma>,
}

impl Default for MmStats {
    fn default() -> Self {
        MmStats {
            max_order: 0,
            meminfo: None,
            zones: None,
            slabs: [None; memd_mm::MAX_CACHES],
            pools: [None; memd_mm::MAX_POOLS],
            cma: None,
        }
    }
}

fn zone_info(z: &MmZone) -> ZoneInfo {
    ZoneInfo {
        node: 0,
        name: z.zone.name().to_string(),
        start_pfn: z.start_pfn,
        spanned: z.end_pfn.saturating_sub(z.start_pfn),
        managed: z.managed,
        free: z.free,
        watermark: z.watermark,
        lowmem_reserve: z.lowmem_reserve.to_vec(),
        free_blocks: z.nr_free[..z.max_order as usize].to_vec(),
        pcp_count: z.pcp_count,
        pcp_high: z.pcp_high,
        pcp_batch: z.pcp_batch,
        counters: z.counters,
    }
}

fn backing_name(b: memd_mm::PoolBacking) -> String {
    match b {
        memd_mm::PoolBacking::Cache(c) => format!("cache {}", c.0),
        memd_mm::PoolBacking::Kmalloc(s) => format!("kmalloc {s}"),
        memd_mm::PoolBacking::Pages(o) => format!("pages order {o}"),
    }
}

/// Copies `view`'s data out of `mm` into `out`, without touching the heap.
pub(super) fn snapshot(mm: &mut MemoryManager, view: View, out: &mut MmStats) {
    out.max_order = MemoryManager::max_order(mm);
    match view {
        View::Meminfo => out.meminfo = Some(mm.meminfo()),
        View::Zoneinfo | View::Buddyinfo => out.zones = Some(mm.zoneinfo()),
        View::Slabinfo => {
            for (slot, s) in out.slabs.iter_mut().zip(mm.slabinfo()) {
                let mut name = [0u8; memd_mm::CACHE_NAME_LEN];
                let n = s.name.as_str().len().min(name.len());
                name[..n].copy_from_slice(&s.name.as_str().as_bytes()[..n]);
                *slot = Some(SlabSnap {
                    name,
                    name_len: n,
                    active_objs: s.active_objs,
                    num_objs: s.num_objs,
                    objsize: s.objsize,
                    stride: s.stride,
                    objperslab: s.objperslab,
                    pagesperslab: s.pagesperslab,
                    active_slabs: s.active_slabs,
                    num_slabs: s.num_slabs,
                    flags: s.flags.bits(),
                    has_ctor: s.has_ctor,
                    builtin: s.builtin,
                    counters: s.counters,
                });
            }
        }
        View::Mempools => {
            for (slot, p) in out.pools.iter_mut().zip(mm.mempool_info()) {
                *slot = Some(p);
            }
        }
        View::Cma => out.cma = mm.cma_info(),
    }
}

/// The reply for `view` from the snapshot `s`.
pub(super) fn render(view: View, s: &MmStats) -> Reply {
    match view {
        View::Meminfo => Reply::Meminfo(Box::new(s.meminfo.unwrap_or_default())),
        View::Zoneinfo => Reply::Zoneinfo(s.zones.iter().flatten().map(zone_info).collect()),
        View::Buddyinfo => Reply::Buddyinfo(
            s.zones
                .iter()
                .flatten()
                .filter(|z| z.managed > 0)
                .map(|z| BuddyZone {
                    node: 0,
                    zone: z.zone.name().to_string(),
                    free: z.nr_free[..s.max_order as usize].to_vec(),
                })
                .collect(),
        ),
        View::Slabinfo => Reply::Slabinfo(
            s.slabs
                .iter()
                .flatten()
                .map(|c| SlabInfo {
                    name: String::from_utf8_lossy(&c.name[..c.name_len]).into_owned(),
                    active_objs: c.active_objs,
                    num_objs: c.num_objs,
                    objsize: c.objsize,
                    stride: c.stride,
                    objperslab: c.objperslab,
                    pagesperslab: c.pagesperslab,
                    active_slabs: c.active_slabs,
                    num_slabs: c.num_slabs,
                    flags: SlabFlags(c.flags),
                    has_ctor: c.has_ctor,
                    builtin: c.builtin,
                    counters: c.counters,
                })
                .collect(),
        ),
        View::Mempools => Reply::Mempools(
            s.pools
                .iter()
                .flatten()
                .map(|p| MempoolInfo {
                    id: p.id as u32,
                    backing: backing_name(p.backing),
                    elem_size: p.element_size,
                    min_nr: p.min_nr,
                    curr_nr: p.curr_nr,
                    reserve_bytes: p.idle_bytes,
                    in_use: p.outstanding,
                    allocs: p.counters.allocs,
                    reserve_hits: p.counters.from_reserve,
                    failures: p.counters.failures,
                })
                .collect::<Vec<_>>(),
        ),
        View::Cma => Reply::Cma(Box::new(match &s.cma {
            None => CmaInfo::default(),
            Some(c) => CmaInfo {
                present: true,
                base: c.base,
                total: c.size,
                zone: c.zone.name().to_string(),
                used: c.used,
                free: c.free,
                largest_free: c.largest_free,
                buffers: c.buffers,
                allocs: c.allocs,
                failures: c.failures,
            },
        })),
    }
}
