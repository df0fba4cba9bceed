//! The manager behind its locks: a node lock, and under it a lock per zone
//! (Linux's `zone->lock`), per kmalloc cache (the slab's per-node
//! `list_lock`) and one for DMA (Linux's `cma->lock`).
//!
//! The node lock is a reader-writer lock whose readers count on their own
//! CPU (`percpu_rwsem.rs`). Everything except the per-CPU caches' batches
//! and DMA buffers takes it for writing ([`Node::lock`]) and has the whole
//! [`MemoryManager`], as memd-mm's API always had it. A batch of kernel
//! pages moving between a CPU's page lists and a zone takes the node lock
//! for reading and that zone's lock; a batch of kmalloc objects moving
//! between a CPU's arrays and a cache takes it for reading and that
//! cache's lock, plus the zone's while the cache grows; a DMA buffer takes
//! it for reading and its zone's lock or the DMA lock (`dma.rs`). Batches
//! for different zones and caches so run at once on different CPUs, and
//! the rest of the manager waits for them.
//!
//! # Frame ownership
//!
//! Under the read lock each batch builds its own handles on the frame table
//! and the pageblock counts ([`Frames`], [`Pageblocks`]), and writes only
//! what its locks own:
//!
//! - a zone's lock owns its free lists, its pcp list, every frame on them,
//!   the pageblock counts of its memory, its count of slab pages, and the
//!   state and order bytes of every frame in it (a buddy merge reads those
//!   of its neighbour, so they change only under this lock: a slab's
//!   frames are stamped as it grows, with both locks held);
//! - a cache's lock owns the cache, its slabs' frames (except those two
//!   bytes) and the objects' memory;
//! - a page block a batch takes out of a zone is the batch's until it is
//!   given back;
//! - the DMA lock owns the contiguous region and the DMA counts (DMA
//!   buffers, `dma.rs`: a buddy buffer is a zone's block like any other,
//!   freed under every zone's lock, since its zone is known only once its
//!   head is read).
//!
//! So batches touch disjoint fields and never the same byte. A buddy's
//! neighbour and a pageblock's counts belong to one zone unless a
//! pageblock holds two zones' memory (blocks larger than the DMA zone,
//! `memd.max_order` above 13): then DMA and DMA32 share one lock.
//! Lock order: node, then cache, then zone (all of them in order, to free
//! a DMA buffer), then the owners' charges; the DMA lock is taken alone
//! under the node's.

mod dma;

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::ptr::{addr_of, addr_of_mut};

use spin::Mutex;

use crate::gfp::Gfp;
use crate::kmalloc::NR_KMALLOC;
use crate::memblock::PAGE_SIZE;
use crate::page_alloc::{allocated_head, ZoneParts};
use crate::pageblock::Pageblocks;
use crate::percpu_rwsem::{PercpuRwsem, WriteGuard};
use crate::slab::{CacheId, KmemCache};
use crate::sparse::Frames;
use crate::zone::{Mark, ZoneType, DMA_LIMIT, NR_ZONES};
use crate::{MemoryManager, MmError, Owner};

/// The manager and its locks.
pub(crate) struct Node {
    mm: UnsafeCell<MemoryManager>,
    /// Readers: the per-CPU batches, each counted on its CPU; the writer:
    /// everything else.
    whole: PercpuRwsem,
    zones: [Mutex<()>; NR_ZONES],
    caches: [Mutex<()>; NR_KMALLOC],
    /// The owner table's charges, which page batches of every zone make.
    owners: Mutex<()>,
    /// The contiguous region and the DMA counts (`dma.rs`).
    dma: Mutex<()>,
}

// SAFETY: the manager is reached only under `whole`: whole for the writer,
// and for readers in the parts their other locks own (frame ownership,
// above).
unsafe impl Sync for Node {}
// SAFETY: the manager moves between threads with the node, which is plain
// memory the manager owns.
unsafe impl Send for Node {}

/// The whole manager, under the node lock held for writing.
pub struct MmGuard<'a> {
    _lock: WriteGuard<'a>,
    mm: &'a mut MemoryManager,
}

impl Deref for MmGuard<'_> {
    type Target = MemoryManager;

    fn deref(&self) -> &MemoryManager {
        self.mm
    }
}

impl DerefMut for MmGuard<'_> {
    fn deref_mut(&mut self) -> &mut MemoryManager {
        self.mm
    }
}

impl Node {
    pub(crate) const fn new() -> Self {
        Node {
            mm: UnsafeCell::new(MemoryManager::new()),
            whole: PercpuRwsem::new(),
            zones: [const { Mutex::new(()) }; NR_ZONES],
            caches: [const { Mutex::new(()) }; NR_KMALLOC],
            owners: Mutex::new(()),
            dma: Mutex::new(()),
        }
    }

    /// The whole manager.
    #[inline(always)]
    pub(crate) fn lock(&self) -> MmGuard<'_> {
        let lock = self.whole.write();
        // SAFETY: the write lock keeps every other reference out.
        let mm = unsafe { &mut *self.mm.get() };
        MmGuard { _lock: lock, mm }
    }

    /// Runs `f` on the manager under the read lock, counted on CPU `cpu`,
    /// once the manager is initialised; `None` before, which sends the
    /// caller to [`Node::lock`].
    #[inline(always)]
    fn shared<T>(&self, cpu: Option<usize>, f: impl FnOnce(*mut MemoryManager) -> T) -> Option<T> {
        let _lock = self.whole.read(cpu);
        let mm = self.mm.get();
        // SAFETY: a field only the writer changes.
        let ok = unsafe { (*mm).is_initialized() };
        ok.then(|| f(mm))
    }

    /// Up to `out.len()` kernel page blocks of `order` from the preferred
    /// zone of `GFP_KERNEL` while it stays above `low`, under that zone's
    /// lock (a CPU list's batch, or one block of a higher order); 0 sends
    /// the caller to the whole manager (another zone, reclaim, memory not
    /// yet initialised, page faults being injected).
    pub(crate) fn rmqueue_bulk(&self, cpu: Option<usize>, order: u32, out: &mut [u64]) -> usize {
        self.shared(cpu, |mm| {
            // SAFETY: a field only the writer changes.
            if unsafe { (*mm).fault.armed_page } {
                return 0;
            }
            // SAFETY: a field only the writer changes.
            let z = unsafe { (*mm).preferred_zone[ZoneType::Normal as usize] } as usize;
            let got = {
                let _zone = self.zone_lock(mm, z);
                // SAFETY: the node's read lock and the zone's lock are held.
                let (mut frames, mut blocks) = unsafe { handles(mm) };
                // SAFETY: as above.
                let mut parts = unsafe { zone_parts(mm, z, &mut frames, &mut blocks) };
                parts.rmqueue_bulk(order, out)
            };
            self.charge(mm, Owner::KERNEL.0, (got as u64) << order, true);
            got
        })
        .unwrap_or(0)
    }

    /// Gives kernel page blocks of `order` (a CPU list's batch, or one
    /// block of a higher order) back to their zones, each under its zone's
    /// lock (Linux's `free_pcppages_bulk`); `None` sends the caller to the
    /// whole manager, else the first refusal.
    pub(crate) fn free_pcppages_bulk(
        &self,
        cpu: Option<usize>,
        order: u32,
        blocks: &[u64],
    ) -> Option<Result<(), MmError>> {
        self.shared(cpu, |mm| {
            // SAFETY: the node's read lock is held; each block's frame is
            // the caller's until it is freed, the rest is written under the
            // zone's lock.
            let (mut frames, mut pageblocks) = unsafe { handles(mm) };
            let mut freed = Ok(());
            let mut kernel = 0;
            let mut held: Option<(usize, spin::MutexGuard<()>)> = None;
            for &phys in blocks {
                let (z, owner) = match allocated_head(&mut frames, phys, order) {
                    Ok(f) => {
                        f.count = 0;
                        (f.zone() as usize, f.owner)
                    }
                    Err(e) => {
                        freed = freed.and(Err(e));
                        continue;
                    }
                };
                // One lock for a run of blocks of one zone, the common case.
                let lock = self.lock_of(mm, z);
                if held.as_ref().map(|h| h.0) != Some(lock) {
                    // Never two zones' locks at once.
                    drop(held.take());
                    held = Some((lock, self.zones[lock].lock()));
                }
                // SAFETY: the zone's lock is held too.
                let mut parts = unsafe { zone_parts(mm, z, &mut frames, &mut pageblocks) };
                parts.free_one((phys / PAGE_SIZE) as u32, order);
                match owner {
                    0 => kernel += 1 << order,
                    owner => self.charge(mm, owner, 1 << order, false),
                }
            }
            drop(held);
            self.charge(mm, Owner::KERNEL.0, kernel, false);
            freed
        })
    }

    /// Takes the lock zone `z` is under.
    fn zone_lock(&self, mm: *mut MemoryManager, z: usize) -> spin::MutexGuard<'_, ()> {
        self.zones[self.lock_of(mm, z)].lock()
    }

    /// Which of the zone locks zone `z` is under.
    fn lock_of(&self, mm: *mut MemoryManager, z: usize) -> usize {
        // SAFETY: a field only the writer changes.
        zone_lock(z, unsafe { (*mm).max_order })
    }

    /// Charges (or uncharges) `owner` for `pages` under the owners' lock.
    fn charge(&self, mm: *mut MemoryManager, owner: u16, pages: u64, charge: bool) {
        if pages == 0 {
            return;
        }
        let _owners = self.owners.lock();
        // SAFETY: the caller holds the node's read lock; the owners' lock
        // makes this the table's one user.
        let owners = unsafe { &mut *addr_of_mut!((*mm).owners) };
        if charge {
            owners.charge(owner, pages);
        } else {
            owners.uncharge(owner, pages);
        }
    }

    /// Up to `out.len()` objects of kmalloc class `class` under the
    /// cache's lock, growing it from the preferred zone of `gfp` under
    /// the zone's lock too; 0 sends the caller to the whole manager.
    pub(crate) fn kmalloc_bulk(
        &self,
        cpu: Option<usize>,
        class: usize,
        gfp: Gfp,
        out: &mut [usize],
    ) -> usize {
        self.shared(cpu, |mm| {
            let _cache = self.caches[class].lock();
            // SAFETY: the node's read lock and the cache's lock are held.
            let Some(cache) = (unsafe { cache_mut(mm, class) }) else {
                return 0;
            };
            // SAFETY: as above; the slabs' frames are the cache's.
            let (mut frames, mut blocks) = unsafe { handles(mm) };
            let highest = gfp.highest_zone();
            // SAFETY: fields only the writer changes.
            let (dmap, z) =
                unsafe { ((*mm).dmap, (*mm).preferred_zone[highest as usize] as usize) };
            let id = CacheId(class as u16);
            cache.alloc_bulk(&mut frames, dmap, out, |cache, frames| {
                let _zone = self.zone_lock(mm, z);
                // SAFETY: the zone's lock is held too.
                let mut parts = unsafe { zone_parts(mm, z, frames, &mut blocks) };
                let Some(pfn) = parts.rmqueue(cache.order, Mark::Low, highest) else {
                    return false;
                };
                parts.zone.counters.alloc_success += 1;
                parts.stamp_slab(pfn, cache.order);
                cache.init_slab(parts.frames, dmap, pfn, id);
                true
            })
        })
        .unwrap_or(0)
    }

    /// Gives kmalloc objects of class `class` back under the cache's lock;
    /// false sends the caller to the whole manager.
    pub(crate) fn kfree_bulk(&self, cpu: Option<usize>, class: usize, objs: &[usize]) -> bool {
        self.shared(cpu, |mm| {
            let _cache = self.caches[class].lock();
            // SAFETY: the node's read lock and the cache's lock are held.
            let Some(cache) = (unsafe { cache_mut(mm, class) }) else {
                return false;
            };
            // SAFETY: as above; the objects' slabs are the cache's.
            let (mut frames, _) = unsafe { handles(mm) };
            // SAFETY: a field only the writer changes.
            let dmap = unsafe { (*mm).dmap };
            cache.free_bulk(&mut frames, dmap, objs);
            true
        })
        .unwrap_or(false)
    }
}

/// Which lock zone `z` is under: its own, unless one pageblock holds
/// memory of it and of the zone below (blocks larger than the DMA zone),
/// when the two share the lower one's (frame ownership, above).
fn zone_lock(z: usize, max_order: u32) -> usize {
    let pageblock = 1u64 << max_order.saturating_sub(1);
    if z == ZoneType::Dma32 as usize && pageblock > DMA_LIMIT / PAGE_SIZE {
        ZoneType::Dma as usize
    } else {
        z
    }
}

/// This batch's handles on the frame table and the pageblock counts.
///
/// # Safety
/// The caller holds the node's read lock, so the tables stay where they
/// are, and writes through the handles only what its locks own.
unsafe fn handles(mm: *mut MemoryManager) -> (Frames, Pageblocks) {
    // SAFETY: shallow copies of the manager's handles, which only the
    // writer changes; the caller's locks keep the batches to disjoint
    // fields.
    unsafe {
        (
            core::ptr::read(addr_of!((*mm).frames)),
            core::ptr::read(addr_of!((*mm).pageblocks)),
        )
    }
}

/// Zone `z` and what its lock covers.
///
/// # Safety
/// The caller holds the node's read lock and zone `z`'s lock.
unsafe fn zone_parts<'a>(
    mm: *mut MemoryManager,
    z: usize,
    frames: &'a mut Frames,
    blocks: &'a mut Pageblocks,
) -> ZoneParts<'a> {
    ZoneParts {
        // SAFETY: the zone's lock makes the caller the one user of the
        // zone and its count of slab pages.
        zone: unsafe { &mut *addr_of_mut!((*mm).zones[z]) },
        frames,
        blocks,
        // SAFETY: as above.
        slab_pages: unsafe { &mut *addr_of_mut!((*mm).slab_pages[z]) },
        // SAFETY: a read-only field.
        max_order: unsafe { (*mm).max_order },
    }
}

/// The descriptor of kmalloc cache `class`.
///
/// # Safety
/// The caller holds the node's read lock and the cache's lock.
unsafe fn cache_mut<'a>(mm: *mut MemoryManager, class: usize) -> Option<&'a mut KmemCache> {
    // SAFETY: the id table only changes under the write lock, so reading
    // it is shared; its slot holds the descriptor's `&'static mut`, read
    // out as a pointer, and the cache's lock makes the caller its one user.
    unsafe {
        let slot = (*addr_of!((*mm).caches)).slot(class)?;
        let mut p = core::ptr::read(slot as *const Option<core::ptr::NonNull<KmemCache>>)?;
        Some(p.as_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostGlobal;
    use std::sync::mpsc;
    use std::time::Duration;

    static HOST: HostGlobal = HostGlobal::new(64 << 20);

    #[test]
    fn batches_for_other_caches_and_zones_run_while_one_cache_is_held() {
        let node = HOST.global_mm().unwrap().node();
        let free = node.lock().meminfo().free;
        let held = node.caches[3].lock();
        let (objs, pages) = std::thread::scope(|s| {
            let other = s.spawn(|| {
                let mut objs = [0usize; 8];
                let mut pages = [0u64; 4];
                let got = (
                    node.kmalloc_bulk(Some(0), 5, Gfp::KERNEL, &mut objs),
                    node.rmqueue_bulk(Some(0), 0, &mut pages),
                );
                (got, objs, pages)
            });
            let (tx, rx) = mpsc::channel();
            let same = s.spawn(move || {
                let mut objs = [0usize; 8];
                let got = node.kmalloc_bulk(None, 3, Gfp::KERNEL, &mut objs);
                tx.send(()).unwrap();
                (got, objs)
            });
            let (got, objs5, pages) = other.join().unwrap();
            assert_eq!(got, (8, 4), "another cache's and a zone's batches ran");
            assert!(rx.try_recv().is_err(), "the held cache's batch waits");
            drop(held);
            rx.recv_timeout(Duration::from_secs(30)).expect("then runs");
            let (got, objs3) = same.join().unwrap();
            assert_eq!(got, 8);
            ((objs5, objs3), pages)
        });
        assert!(node.kfree_bulk(None, 5, &objs.0));
        assert!(node.kfree_bulk(Some(1), 3, &objs.1));
        assert_eq!(node.free_pcppages_bulk(None, 0, &pages), Some(Ok(())));
        assert_eq!(
            node.free_pcppages_bulk(Some(2), 0, &pages[..1]),
            Some(Err(MmError::Invalid(
                "not the start of an allocated page block"
            ))),
            "freed once"
        );
        let mut mm = node.lock();
        mm.check().unwrap();
        mm.reclaim();
        assert_eq!(mm.meminfo().free, free, "everything back");
    }
}
