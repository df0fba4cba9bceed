//! What a departed connection held, given back a slice at a time.
//!
//! A client may leave holding 65 536 handles; freeing them all at once
//! holds the loop for tens of milliseconds under TCG. Like Redis's lazy
//! free, the table moves to a queue when the connection closes, and
//! [`Service::background`] frees a slice of it per turn: pool elements and
//! cache objects as they come (each knows its parent's id), pools and
//! caches last, once nothing of theirs is left.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::offload;
use super::res::Res;
use super::work::Wait;
use super::Service;
use crate::env::Env;
use crate::handles::{Drain, HandleTable};
use crate::memory::Memory;

use super::budget::Budget;

/// Handles freed per hold of the memory manager.
const SLICE: usize = 64;

/// One departed connection's handles, being freed.
pub(super) struct Departed<M: Memory> {
    rest: Drain<Res<M>>,
    /// Its owner id, freed once everything is.
    owner: u64,
    /// Pools and caches, destroyed when everything else is gone.
    pools: Vec<M::PoolId>,
    caches: Vec<M::CacheId>,
}

/// The departed connections, oldest first.
pub(super) struct Releases<M: Memory> {
    queue: VecDeque<Departed<M>>,
    /// DMA buffers a departed connection left with the disk or a job on
    /// another CPU: each is freed once it is back.
    in_flight: Vec<(M::DmaBuf, Wait)>,
    /// The slice being freed: allocated once per burst of departures, so a
    /// turn's heap work stays outside the allocator's lock.
    slice: Vec<Res<M>>,
    dma: Vec<M::DmaBuf>,
}

impl<M: Memory> Releases<M> {
    pub(super) fn new() -> Self {
        Releases {
            queue: VecDeque::new(),
            in_flight: Vec::new(),
            slice: Vec::new(),
            dma: Vec::new(),
        }
    }

    /// Queues `handles` for freeing, and `owner` for freeing after them;
    /// gives `owner` back when there is nothing to wait for.
    pub(super) fn push(&mut self, handles: HandleTable<Res<M>>, owner: u64) -> Option<u64> {
        if handles.is_empty() {
            return Some(owner);
        }
        self.queue.push_back(Departed {
            rest: handles.drain(),
            owner,
            pools: Vec::new(),
            caches: Vec::new(),
        });
        None
    }

    /// Queues a DMA buffer the device or a job holds, to be freed when it
    /// is back.
    pub(super) fn push_in_flight(&mut self, buf: M::DmaBuf, wait: Wait) {
        self.in_flight.push((buf, wait));
    }

    /// Handles still to be freed.
    pub(super) fn pending(&self) -> usize {
        self.in_flight.len()
            + self
                .queue
                .iter()
                .map(|d| d.rest.len() + d.pools.len() + d.caches.len())
                .sum::<usize>()
    }
}

impl<M: Memory> Service<M> {
    /// Frees departed connections' handles until none are left (true) or
    /// `budget` is spent.
    pub(super) fn release_some<E: Env<Mem = M>>(&mut self, env: &mut E, budget: &Budget) -> bool {
        let r = &mut self.releases;
        // Buffers back from jobs on other CPUs, sorted out off the lock (the
        // job's record is freed here).
        let mut back = Vec::new();
        let mut i = 0;
        while i < r.in_flight.len() {
            match &r.in_flight[i].1 {
                Wait::Job(job) => match offload::finished::<M>(job) {
                    Some((bytes, _)) => {
                        let (buf, _) = r.in_flight.swap_remove(i);
                        back.push((buf, bytes));
                    }
                    None => i += 1,
                },
                Wait::Disk { .. } => i += 1,
            }
        }
        if !r.in_flight.is_empty() || !back.is_empty() {
            let in_flight = &mut r.in_flight;
            let back = &mut back;
            env.with_mem(|m, mut block| {
                let mut freed = false;
                for (buf, bytes) in back.drain(..) {
                    m.dma_unlend(bytes);
                    let _ = m.dma_free(buf);
                    freed = true;
                }
                let mut i = 0;
                while i < in_flight.len() {
                    let Wait::Disk { from, to } = in_flight[i].1 else {
                        i += 1;
                        continue;
                    };
                    let done = match (block.as_deref_mut(), m.dma_bytes(&in_flight[i].0)) {
                        (Some(b), Ok(bytes)) => b.poll(&mut bytes[from..to]).is_some(),
                        // No device, or not a live buffer: nothing can be
                        // in flight on it.
                        _ => true,
                    };
                    if done {
                        let (buf, ..) = in_flight.swap_remove(i);
                        let _ = m.dma_free(buf);
                        freed = true;
                    } else {
                        i += 1;
                    }
                }
                // The buffer's owner was freed when its connection's
                // release ended: its id's room goes now.
                if freed {
                    m.owners_tidy();
                }
            });
        }
        if r.slice.capacity() < SLICE {
            r.slice.reserve_exact(SLICE);
            r.dma.reserve_exact(SLICE);
        }
        while let Some(d) = r.queue.front_mut() {
            // Sorted out here, off the lock: a DMA buffer's description is
            // dropped, parents are set aside for last.
            for res in d.rest.by_ref().take(SLICE) {
                match res {
                    Res::Dma { buf, info } => {
                        r.dma.push(buf);
                        drop(info);
                    }
                    Res::Pool { id, .. } => d.pools.push(id),
                    Res::Cache { id, .. } => d.caches.push(id),
                    other => r.slice.push(other),
                }
            }
            let last = d.rest.is_empty();
            let (slice, dma) = (&mut r.slice, &mut r.dma);
            let (pools, caches, owner) = (&mut d.pools, &mut d.caches, d.owner);
            // Freeing cannot fail for memory the connection really held; an
            // error here would be a memory-manager bug, reported by `check`.
            env.with_mem(|m, _| {
                for buf in dma.drain(..) {
                    let _ = m.dma_free(buf);
                }
                for res in slice.drain(..) {
                    free_one(m, res);
                }
                if last {
                    for id in pools.drain(..) {
                        let _ = m.pool_destroy(id);
                    }
                    for id in caches.drain(..) {
                        let _ = m.cache_destroy(id);
                    }
                    if owner != 0 {
                        m.owner_free(owner);
                    }
                }
            });
            if last {
                r.queue.pop_front();
            }
            if budget.work_spent(env) {
                break;
            }
        }
        if !r.queue.is_empty() || !r.in_flight.is_empty() {
            return false;
        }
        // Nothing of the releases outlives them: an idle service holds
        // exactly what it held before the connections came.
        *r = Releases::new();
        true
    }
}

/// Frees one handle's memory (not a parent's: those go last).
fn free_one<M: Memory>(m: &mut M, res: Res<M>) {
    match res {
        Res::Pages { phys, order } => {
            let _ = m.free_pages(phys, order);
        }
        Res::Kmalloc(obj) => {
            let _ = m.kfree(obj);
        }
        Res::PoolObj { id, obj, .. } => {
            let _ = m.pool_free(id, obj.addr);
        }
        Res::CacheObj { id, obj, .. } => {
            let _ = m.cache_free(id, obj.addr);
        }
        Res::Dma { .. } | Res::Pool { .. } | Res::Cache { .. } => {}
    }
}
