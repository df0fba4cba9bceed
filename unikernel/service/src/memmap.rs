//! The physical memory map ([`memd_wire::Op::MemMap`]), in two steps like
//! the other statistics: [`MapSnapshot::new`] allocates every buffer before
//! the memory manager is borrowed, [`crate::Memory::memmap`] fills them
//! under the lock without touching the heap, and [`MapSnapshot::render`]
//! builds the protocol type afterwards.
//!
//! The reply is bounded: at most [`MAX_MAP_RUNS`] runs, which [`RunWalk`]
//! takes a window of frames at a time (`runs`).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use memd_mm::FrameRun;
use memd_wire::{
    MapCma, MapDma, MapRange, MapReservation, MapRun, MapZone, MemMap, RunKind, MAX_MAP_CMA,
    MAX_MAP_DMA, MAX_MAP_RUNS,
};

mod runs;

pub use runs::RunWalk;

/// Most memory ranges, reservations and zones a snapshot keeps.
pub const MAP_MAX_RANGES: usize = 64;

const EMPTY_RUN: FrameRun = FrameRun {
    start_pfn: 0,
    pages: 0,
    kind: RunKind::Absent,
};

/// A heap-free snapshot of the memory map. Every buffer is allocated by
/// [`MapSnapshot::new`], before the memory manager is borrowed; filling it
/// writes into those buffers only.
#[derive(Debug, Clone)]
pub struct MapSnapshot {
    /// Page size.
    pub page_size: u64,
    /// Frames the frame table describes.
    pub nr_frames: u64,
    /// Pages per summary cell.
    pub granule: u64,
    /// Usable RAM `[start, end)`; `nr_memory` are valid.
    pub memory: [(u64, u64); MAP_MAX_RANGES],
    /// Valid entries of `memory`.
    pub nr_memory: usize,
    /// Zones: name, first byte, end, managed pages, free pages.
    pub zones: [(&'static str, u64, u64, u64, u64); 3],
    /// Valid entries of `zones`.
    pub nr_zones: usize,
    /// Reservations: kind name, start, end.
    pub reservations: [(&'static str, u64, u64); MAP_MAX_RANGES],
    /// Valid entries of `reservations`.
    pub nr_reservations: usize,
    /// The CMA region `[base, end)`.
    pub cma: Option<(u64, u64)>,
    /// CMA extents `[start, end)`.
    pub cma_extents: [(u64, u64); MAX_MAP_CMA],
    /// Valid entries of `cma_extents`.
    pub nr_cma_extents: usize,
    /// The region's buffers and bytes in use, listed or not.
    pub cma_used: (u64, u64),
    /// Runs; `nr_runs` are valid.
    pub runs: Vec<FrameRun>,
    /// Valid entries of `runs`.
    pub nr_runs: usize,
}

impl MapSnapshot {
    /// An empty snapshot with room for [`MAX_MAP_RUNS`] runs.
    pub fn new() -> Self {
        MapSnapshot {
            page_size: 4096,
            nr_frames: 0,
            granule: 1,
            memory: [(0, 0); MAP_MAX_RANGES],
            nr_memory: 0,
            zones: [("", 0, 0, 0, 0); 3],
            nr_zones: 0,
            reservations: [("", 0, 0); MAP_MAX_RANGES],
            nr_reservations: 0,
            cma: None,
            cma_extents: [(0, 0); MAX_MAP_CMA],
            nr_cma_extents: 0,
            cma_used: (0, 0),
            runs: vec![EMPTY_RUN; MAX_MAP_RUNS],
            nr_runs: 0,
        }
    }

    /// The protocol's map, with the DMA buffers the service knows about
    /// (sorted by address and cut to [`MAX_MAP_DMA`]).
    pub fn render(&self, mut dma: Vec<MapDma>) -> MemMap {
        let page = self.page_size;
        dma.sort_by_key(|d| (d.phys, d.handle));
        let omitted = dma.len().saturating_sub(MAX_MAP_DMA) as u64;
        dma.truncate(MAX_MAP_DMA);
        MemMap {
            page_size: page,
            end: self.nr_frames * page,
            granule: self.granule,
            memory: self.memory[..self.nr_memory]
                .iter()
                .map(|&(start, end)| MapRange { start, end })
                .collect(),
            zones: self.zones[..self.nr_zones]
                .iter()
                .map(|&(name, start, end, managed, free)| MapZone {
                    name: String::from(name),
                    start,
                    end,
                    managed,
                    free,
                })
                .collect(),
            reservations: self.reservations[..self.nr_reservations]
                .iter()
                .map(|&(kind, start, end)| MapReservation {
                    kind: String::from(kind),
                    start,
                    end,
                })
                .collect(),
            cma: self.cma.map(|(base, end)| MapCma {
                base,
                end,
                extents: self.cma_extents[..self.nr_cma_extents]
                    .iter()
                    .map(|&(start, end)| MapRange { start, end })
                    .collect(),
                buffers: self.cma_used.0,
                used: self.cma_used.1,
            }),
            runs: self.runs[..self.nr_runs]
                .iter()
                .map(|r| MapRun {
                    start: r.start_pfn * page,
                    len: r.pages * page,
                    kind: r.kind,
                })
                .collect(),
            dma,
            dma_omitted: omitted,
        }
    }
}

impl Default for MapSnapshot {
    fn default() -> Self {
        Self::new()
    }
}
