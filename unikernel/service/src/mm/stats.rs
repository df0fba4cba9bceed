//! The statistics views of a `MemoryManager`: [`view_len`] counts a
//! listing's entries under the lock, [`MmStats::with_room`] makes room for
//! them outside it, [`snapshot`] copies memd-mm's views into that room
//! under the lock, [`render`] turns them into the protocol's after.
//!
//! This is the one place where memd-mm's views become the wire's. `MemInfo`
//! is one type on both sides and goes out as it is, a slabinfo line only
//! changes the form of its name, and the watermarks and counters the wire's
//! zone view embeds are memd-mm's types too. What is built here is only the
//! wire's owned, display-ready form: names as strings, per-order and
//! per-zone arrays as vectors, a mempool's backing for humans, the CMA
//! region's presence (docs/design-notes.md).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use memd_mm::stats::{self as mm, MemInfo};
use memd_mm::{MemoryManager, PoolBacking, NR_ZONES};
use memd_wire::{BuddyZone, CmaInfo, MempoolInfo, Reply, SlabInfo, ZoneInfo, VIEW_PAGE};

use crate::memory::View;

/// Statistics snapshot of a `MemoryManager`: memd-mm's views, copied
/// (they hold no references into the manager) into room made beforehand.
#[derive(Default)]
pub struct MmStats {
    meminfo: Option<MemInfo>,
    zones: Option<[mm::ZoneInfo; NR_ZONES]>,
    slabs: Vec<mm::SlabInfo>,
    pools: Vec<mm::MempoolInfo>,
    cma: Option<mm::CmaInfo>,
}

impl MmStats {
    /// A snapshot with room for `entries` of a listing (none without the
    /// memory for them).
    pub(super) fn with_room(view: View, entries: usize) -> Option<MmStats> {
        let mut s = MmStats::default();
        match view {
            View::Slabinfo { .. } => s.slabs.try_reserve_exact(entries).ok()?,
            View::Mempools { .. } => s.pools.try_reserve_exact(entries).ok()?,
            _ => {}
        }
        Some(s)
    }
}

/// Entries of `view`'s page: caches or pools from its start, at most a
/// page.
pub(super) fn view_len(mm: &mut MemoryManager, view: View) -> usize {
    let (all, start) = match view {
        View::Slabinfo { start } => (mm.caches().count(), start),
        View::Mempools { start } => (mm.mempools().count(), start),
        _ => return 0,
    };
    all.saturating_sub(start).min(VIEW_PAGE)
}

/// Copies `view`'s data out of `mm` into `out` (a fresh snapshot), without
/// touching the heap: listings fill the room made for them and stop.
pub(super) fn snapshot(mm: &mut MemoryManager, view: View, out: &mut MmStats) {
    match view {
        View::Meminfo => out.meminfo = Some(mm.meminfo()),
        View::Zoneinfo | View::Buddyinfo => out.zones = Some(mm.zoneinfo()),
        View::Slabinfo { start } => {
            let room = out.slabs.capacity();
            for (_, s) in mm.slabinfo().skip(start).take(room) {
                out.slabs.push(s);
            }
        }
        View::Mempools { start } => {
            let room = out.pools.capacity();
            for p in mm.mempool_info().skip(start).take(room) {
                out.pools.push(p);
            }
        }
        View::Cma => out.cma = mm.cma_info(),
    }
}

/// The reply for `view` from the snapshot `s`.
pub(super) fn render(view: View, s: &MmStats) -> Reply {
    match view {
        View::Meminfo => Reply::Meminfo(Box::new(s.meminfo.unwrap_or_default())),
        View::Zoneinfo => Reply::Zoneinfo(s.zones.iter().flatten().map(zone).collect()),
        View::Buddyinfo => Reply::Buddyinfo(
            s.zones
                .iter()
                .flatten()
                .filter(|z| z.managed > 0)
                .map(buddy)
                .collect(),
        ),
        View::Slabinfo { .. } => Reply::Slabinfo(s.slabs.iter().map(slab).collect()),
        View::Mempools { .. } => Reply::Mempools(s.pools.iter().map(mempool).collect()),
        View::Cma => Reply::Cma(Box::new(s.cma.as_ref().map_or_else(CmaInfo::default, cma))),
    }
}

/// Free blocks per order, for the orders the manager uses.
fn free_blocks(z: &mm::ZoneInfo) -> Vec<u64> {
    z.nr_free[..z.max_order as usize].to_vec()
}

fn zone(z: &mm::ZoneInfo) -> ZoneInfo {
    ZoneInfo {
        node: 0,
        name: z.zone.name().to_string(),
        start_pfn: z.start_pfn,
        spanned: z.end_pfn.saturating_sub(z.start_pfn),
        managed: z.managed,
        free: z.free,
        watermark: z.watermark,
        lowmem_reserve: z.lowmem_reserve.to_vec(),
        free_blocks: free_blocks(z),
        pcp_count: z.pcp_count,
        pcp_high: z.pcp_high,
        pcp_batch: z.pcp_batch,
        cpu_pagesets: Vec::new(),
        counters: z.counters,
        deferred: z.deferred,
        balloon: z.balloon,
    }
}

fn buddy(z: &mm::ZoneInfo) -> BuddyZone {
    BuddyZone {
        node: 0,
        zone: z.zone.name().to_string(),
        free: free_blocks(z),
    }
}

fn slab(c: &mm::SlabInfo) -> SlabInfo {
    c.with_name(c.name.as_str().to_string())
}

/// A pool's backing for humans: "cache 3", "kmalloc 256", "pages order 2".
fn backing_name(b: PoolBacking) -> String {
    match b {
        PoolBacking::Cache(c) => format!("cache {}", c.0),
        PoolBacking::Kmalloc(s) => format!("kmalloc {s}"),
        PoolBacking::Pages(o) => format!("pages order {o}"),
    }
}

fn mempool(p: &mm::MempoolInfo) -> MempoolInfo {
    MempoolInfo {
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
    }
}

fn cma(c: &mm::CmaInfo) -> CmaInfo {
    CmaInfo {
        present: true,
        base: c.base,
        total: c.size,
        zone: c.zone.name().to_string(),
        usage: c.usage,
    }
}
