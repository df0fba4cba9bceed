//! The physical memory map, walked a window of frames at a time.
//!
//! The walk of a 1 GiB guest's frame table takes 3.9 ms under TCG in one
//! piece. As work it takes [`WINDOW`] frames per slice; the table may
//! change between slices, so the map is a sweep, each window as it was
//! when walked (like reading `/proc/pagetypeinfo`, not a snapshot of one
//! instant). When the runs outgrow the reply, the sweep starts again with
//! coarser cells ([`RunWalk`]).

use alloc::boxed::Box;
use alloc::vec::Vec;

use memd_wire::{errno, MapDma, Reply, WireError};

use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memmap::{MapSnapshot, RunWalk};
use crate::memory::Memory;

/// Frames walked per slice: 32 MiB of 4 KiB pages.
const WINDOW: u64 = 8192;

/// A memory map being walked.
pub(super) struct MapWork {
    snap: Box<MapSnapshot>,
    walk: RunWalk,
}

impl MapWork {
    /// Frames walked so far.
    pub(super) fn walked(&self) -> u64 {
        self.walk.walked()
    }

    /// Frames in all.
    pub(super) fn frames(&self) -> u64 {
        self.snap.nr_frames
    }
}

impl<M: Memory> Service<M> {
    /// The map's layout (ranges, zones, reservations), its walk to come.
    pub(super) fn start_map<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
    ) -> Result<Box<MapWork>, WireError> {
        // Buffers first, then the manager's lock.
        let mut snap = Box::new(MapSnapshot::new());
        env.with_mem(|m, _| m.memmap(&mut snap)).map_err(mem_err)?;
        Ok(Box::new(MapWork {
            snap,
            walk: RunWalk::new(),
        }))
    }

    /// Walks one window; true when the map is complete.
    pub(super) fn map_slice<E: Env<Mem = M>>(&mut self, env: &mut E, w: &mut MapWork) -> bool {
        let MapWork { snap, walk } = w;
        let nr_frames = snap.nr_frames;
        let (from, to) = walk.window(WINDOW, nr_frames);
        let runs = &mut snap.runs;
        env.with_mem(|m, _| m.memmap_runs(from, to, &mut |r| walk.push(runs, r)));
        match walk.end_window(&mut snap.runs, to, nr_frames) {
            Some((n, granule)) => {
                snap.nr_runs = n;
                snap.granule = granule;
                true
            }
            None => false,
        }
    }

    /// The finished map, with every client's DMA buffers.
    pub(super) fn finish_map(&self, w: &MapWork) -> Result<Reply, WireError> {
        // Counted first, then collected into a vector reserved fallibly: a
        // client may hold tens of thousands.
        let bufs = || {
            self.client_dma().map(|info| MapDma {
                handle: info.handle,
                conn: info.conn,
                phys: info.phys,
                len: info.len,
                source: info.source,
            })
        };
        let mut dma = Vec::new();
        dma.try_reserve_exact(bufs().count())
            .map_err(|_| err(errno::ENOMEM, "no memory to list the DMA buffers"))?;
        dma.extend(bufs());
        Ok(Reply::MemMap(Box::new(w.snap.render(dma))))
    }
}
