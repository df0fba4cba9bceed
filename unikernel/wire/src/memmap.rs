//! The physical memory map ([`crate::Op::MemMap`]): zones, boot
//! reservations, the CMA region with its buffers, DMA buffers, and a
//! run-length summary of what every frame is, small enough for one frame.
//!
//! Addresses and lengths are in bytes. The runs cover `[0, end)` in address
//! order without gaps; when the exact runs would not fit
//! [`MAX_MAP_RUNS`], the service summarises cells of `granule` pages (a
//! power of two), each shown as the kind that covers most of it.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::stats::{DmaSource, Handle};

/// What a run of frames is: memd-mm's own type, which prints its label
/// (`free order 3`, `slab`, ...).
pub use memd_mm::RunKind;

/// Most runs one map carries.
pub const MAX_MAP_RUNS: usize = 8192;
/// Most DMA buffers one map lists (the rest are counted in
/// [`MemMap::dma_omitted`]).
pub const MAX_MAP_DMA: usize = 4096;
/// Most buffers of the CMA region one map draws (all are counted in
/// [`MapCma::buffers`] and [`MapCma::used`]).
pub const MAX_MAP_CMA: usize = 256;

/// `[start, start+len)` of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRun {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub len: u64,
    /// What it is.
    pub kind: RunKind,
}

/// A physical range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A zone's extent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapZone {
    /// "DMA", "DMA32", "Normal" or "Movable".
    pub name: String,
    /// First byte spanned.
    pub start: u64,
    /// One past the last byte spanned.
    pub end: u64,
    /// Pages handed to the page allocator.
    pub managed: u64,
    /// Free pages.
    pub free: u64,
}

/// A boot-time reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapReservation {
    /// "kernel", "frame-table", "dma-reserve", "memmap-hole", "zero-page".
    pub kind: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// The contiguous-memory region and the buffers in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCma {
    /// First byte.
    pub base: u64,
    /// One past the last byte.
    pub end: u64,
    /// Allocated extents, in address order: the first [`MAX_MAP_CMA`].
    pub extents: Vec<MapRange>,
    /// Buffers allocated, listed or not.
    pub buffers: u64,
    /// Bytes allocated.
    pub used: u64,
}

/// A DMA buffer held by a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDma {
    /// Its handle.
    pub handle: Handle,
    /// Owning connection.
    pub conn: u64,
    /// Physical address.
    pub phys: u64,
    /// Length.
    pub len: u64,
    /// Where it came from.
    pub source: DmaSource,
}

/// [`crate::Op::MemMap`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemMap {
    /// Page size.
    pub page_size: u64,
    /// One past the last byte the frame table describes.
    pub end: u64,
    /// Pages per summary cell (1: the runs are exact).
    pub granule: u64,
    /// Usable RAM ranges.
    pub memory: Vec<MapRange>,
    /// Populated zones.
    pub zones: Vec<MapZone>,
    /// Boot reservations.
    pub reservations: Vec<MapReservation>,
    /// The contiguous-memory region, if one was reserved.
    pub cma: Option<MapCma>,
    /// What every frame is, in address order.
    pub runs: Vec<MapRun>,
    /// DMA buffers held by clients, in address order.
    pub dma: Vec<MapDma>,
    /// DMA buffers left out to bound the reply.
    pub dma_omitted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{to_frame, Reply, Response};
    use alloc::vec;

    /// The largest map the service can send (every list at its bound, every
    /// number at its widest encoding) still fits one frame.
    #[test]
    fn largest_map_fits_a_frame() {
        let big = u64::MAX;
        let range = MapRange {
            start: big,
            end: big,
        };
        let map = MemMap {
            page_size: 4096,
            end: big,
            granule: big,
            memory: vec![range; 64],
            zones: vec![
                MapZone {
                    name: "Normal".into(),
                    start: big,
                    end: big,
                    managed: big,
                    free: big,
                };
                3
            ],
            reservations: vec![
                MapReservation {
                    kind: "frame-table".into(),
                    start: big,
                    end: big,
                };
                64
            ],
            cma: Some(MapCma {
                base: big,
                end: big,
                extents: vec![range; MAX_MAP_CMA],
                buffers: big,
                used: big,
            }),
            runs: vec![
                MapRun {
                    start: big,
                    len: big,
                    kind: RunKind::Free(255),
                };
                MAX_MAP_RUNS
            ],
            dma: vec![
                MapDma {
                    handle: big,
                    conn: big,
                    phys: big,
                    len: big,
                    source: DmaSource::Cma,
                };
                MAX_MAP_DMA
            ],
            dma_omitted: big,
        };
        let frame = to_frame(&Response::Call(Ok(Reply::MemMap(alloc::boxed::Box::new(
            map,
        )))))
        .unwrap();
        assert!(frame.len() <= crate::MAX_FRAME);
    }
}
