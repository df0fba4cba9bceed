//! DMA buffers under the node's read lock, as Linux serves them under
//! `zone->lock` from the page allocator and under `cma->lock` from the
//! contiguous region: a buddy block under its zone's lock, a range of the
//! region under the DMA lock, which also owns the DMA counts. What needs
//! the whole manager is the caller's to retry there: a zone below `low`
//! (reclaim, memory not yet initialised), the region's extent table
//! growing or shrinking, injected page faults, lent bytes.

use core::ptr::{addr_of, addr_of_mut};

use super::{handles, zone_parts, Node};
use crate::dma::{dma_order, not_lent, DmaBuffer, DmaRequest, DmaSource};
use crate::gfp::Gfp;
use crate::memblock::PAGE_SIZE;
use crate::page_alloc::allocated_head;
use crate::zone::{Mark, NR_ZONES};
use crate::{MemoryManager, MmError, Owner};

impl Node {
    /// The buffer `req` asks for, unzeroed, charged to `owner` when it is
    /// live (else to the kernel), served as
    /// `MemoryManager::dma_alloc_unzeroed` would serve it; `None` sends the
    /// caller to the whole manager.
    pub(crate) fn dma_alloc(
        &self,
        cpu: Option<usize>,
        req: &DmaRequest,
        owner: Owner,
    ) -> Option<Result<DmaBuffer, MmError>> {
        let order = match dma_order(req.len, req.align) {
            Ok(order) => order,
            Err(e) => return Some(Err(e)),
        };
        self.shared(cpu, |mm| {
            // SAFETY: fields only the writer changes.
            let (max_order, dmap) = unsafe { ((*mm).max_order, (*mm).dmap) };
            if order < max_order {
                let pfn = self.dma_from_zones(mm, order, req.mask.gfp(req.movable), owner)?;
                self.count_dma(mm, true, 1 << order);
                return Some(Ok(DmaBuffer::buddy(dmap, pfn, req.len, order)));
            }
            let _dma = self.dma.lock();
            // SAFETY: the DMA lock makes the caller the region's one user.
            let cma = unsafe { (*addr_of_mut!((*mm).cma)).as_mut() }?;
            if cma.table_to_grow().is_some() {
                return None;
            }
            let Some(phys) = cma.alloc(req.len as u64, req.align as u64, req.mask.limit()) else {
                return Some(Err(MmError::NoMemory));
            };
            // SAFETY: the DMA lock owns the DMA counts.
            unsafe { *addr_of_mut!((*mm).counters.dma_buffers) += 1 };
            Some(Ok(DmaBuffer::cma(dmap, phys, req.len)))
        })
        .flatten()
    }

    /// A buddy block of `order` for `gfp`'s zones, from the highest down
    /// while each stays above `low` (the zonelist walk), under each zone's
    /// lock in turn, stamped and charged to `owner`.
    fn dma_from_zones(
        &self,
        mm: *mut MemoryManager,
        order: u32,
        gfp: Gfp,
        owner: Owner,
    ) -> Option<u32> {
        // SAFETY: a field only the writer changes.
        if unsafe { (*mm).fault.armed_page } {
            return None;
        }
        let highest = gfp.highest_zone();
        // SAFETY: a field only the writer changes.
        let preferred = unsafe { (*mm).preferred_zone[highest as usize] } as usize;
        let owner = self.live_owner(mm, owner);
        // SAFETY: the node's read lock is held; the zones' parts are
        // written under their locks.
        let (mut frames, mut blocks) = unsafe { handles(mm) };
        let pfn = (0..=highest as usize).rev().find_map(|z| {
            let _zone = self.zone_lock(mm, z);
            // SAFETY: the zone's lock is held too.
            let mut parts = unsafe { zone_parts(mm, z, &mut frames, &mut blocks) };
            let pfn = parts.rmqueue(order, Mark::Low, highest)?;
            parts.zone.counters.alloc_success += 1;
            parts.zone.counters.fallback += (z != preferred) as u64;
            parts.stamp_allocated(pfn, order, owner);
            Some(pfn)
        })?;
        self.charge(mm, owner, 1 << order, true);
        Some(pfn)
    }

    /// Whom a buffer for `owner` is charged to
    /// (`OwnerTable::live_or_kernel`).
    fn live_owner(&self, mm: *mut MemoryManager, owner: Owner) -> u16 {
        let _owners = self.owners.lock();
        // SAFETY: the owners' lock makes the caller the table's one user.
        let owners = unsafe { &*addr_of!((*mm).owners) };
        owners.live_or_kernel(owner).0
    }

    /// Counts a buffer in (or out) under the DMA lock, with the buddy pages
    /// it takes.
    fn count_dma(&self, mm: *mut MemoryManager, alloc: bool, buddy_pages: u64) {
        let _dma = self.dma.lock();
        // SAFETY: the DMA lock owns the DMA counts.
        let counters = unsafe {
            (
                &mut *addr_of_mut!((*mm).counters.dma_buffers),
                &mut *addr_of_mut!((*mm).counters.dma_buddy_pages),
            )
        };
        if alloc {
            *counters.0 += 1;
            *counters.1 += buddy_pages;
        } else {
            *counters.0 -= 1;
            *counters.1 -= buddy_pages;
        }
    }

    /// Frees `buf` as `MemoryManager::dma_free` would, refusing what it
    /// refuses; `None` sends the caller to the whole manager.
    pub(crate) fn dma_free(
        &self,
        cpu: Option<usize>,
        buf: &DmaBuffer,
    ) -> Option<Result<(), MmError>> {
        self.shared(cpu, |mm| {
            // SAFETY: a table only the writer changes.
            if let Err(e) = not_lent(unsafe { &**addr_of!((*mm).dma_lent) }, buf) {
                return Some(Err(e));
            }
            if buf.source == DmaSource::Cma {
                let _dma = self.dma.lock();
                // SAFETY: the DMA lock makes the caller the region's one
                // user and owns the DMA counts.
                let cma = unsafe { (*addr_of_mut!((*mm).cma)).as_mut() }?;
                if cma.shrinks_after_free() {
                    return None;
                }
                if cma.free(buf.phys).is_none() {
                    return Some(Err(MmError::Invalid("dma: not a CMA buffer")));
                }
                // SAFETY: as above.
                unsafe { *addr_of_mut!((*mm).counters.dma_buffers) -= 1 };
                return Some(Ok(()));
            }
            // Which zone's frame `buf` names is known only once its bytes
            // are read, and any zone's lock may be changing them: the
            // head is checked, and the block freed, under every zone's
            // lock (in order; no one else holds two). A frame that is not
            // an allocated head is refused before anything is written.
            let zones: [_; NR_ZONES] = core::array::from_fn(|z| self.zones[z].lock());
            // SAFETY: the node's read lock and every zone's lock are held.
            let (mut frames, mut blocks) = unsafe { handles(mm) };
            let (z, owner) = match allocated_head(&mut frames, buf.phys, buf.order) {
                Ok(f) => {
                    f.count = 0;
                    (f.zone() as usize, f.owner)
                }
                Err(e) => return Some(Err(e)),
            };
            // SAFETY: as above.
            let mut parts = unsafe { zone_parts(mm, z, &mut frames, &mut blocks) };
            parts.free_one((buf.phys / PAGE_SIZE) as u32, buf.order);
            drop(zones);
            self.charge(mm, owner, 1 << buf.order, false);
            self.count_dma(mm, false, 1 << buf.order);
            Some(Ok(()))
        })
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use crate::arena::HostCpus;
    use crate::memblock::{MemRegion, RegionKind};
    use crate::{BootInfo, DmaBuffer, DmaMask, DmaRequest, DmaSource, GlobalMm, Owner};
    use std::sync::mpsc;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    /// A manager of 96 MiB from 1 MiB, 16 MiB of it reserved for
    /// contiguous buffers in DMA32, with the kernel's 4 MiB blocks.
    fn booted() -> &'static GlobalMm<4, HostCpus> {
        let mm = std::boxed::Box::leak(std::boxed::Box::new(GlobalMm::with_cpus(HostCpus)));
        let end = 97 * MIB;
        let layout = std::alloc::Layout::from_size_align(end, 4096).unwrap();
        // SAFETY: a non-zero size; the arena is leaked with the manager.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!base.is_null());
        let regions = [MemRegion {
            start: MIB as u64,
            end: end as u64,
            kind: RegionKind::Usable,
        }];
        let boot = BootInfo {
            regions: &regions,
            cmdline: "memd.dma_reserve=16M@dma32",
            direct_map_offset: base as u64,
            reserved: &[],
            zeroed: true,
            deferred_init: false,
        };
        // SAFETY: the arena is fresh, zeroed and owned by the manager for
        // the rest of the program.
        unsafe { mm.init(&boot) }.unwrap();
        mm
    }

    fn req(len: usize, mask: DmaMask) -> DmaRequest {
        DmaRequest {
            len,
            align: 4096,
            mask,
            movable: false,
            zeroed: true,
        }
    }

    /// Runs `f` on another thread and says whether it finished within
    /// `wait`, handing back its result through `rx` either way.
    fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx
    }

    #[test]
    fn buffers_come_and_go_while_a_batch_holds_the_node_and_the_region_waits_for_its_lock() {
        let mm = booted();
        let node = mm.node();
        let free = mm.lock().meminfo().free;
        let client = mm.lock().owner_alloc().unwrap();
        // A batch in progress on CPU 2: the whole manager cannot be had.
        let batch = node.whole.read(Some(2));
        let got = spawn(move || {
            let small = mm
                .dma_alloc(req(64 << 10, DmaMask::Bits32), client)
                .unwrap();
            let isa = mm
                .dma_alloc(req(8 << 10, DmaMask::Bits24), Owner(77))
                .unwrap();
            let big = mm.dma_alloc(req(6 * MIB, DmaMask::Bits32), client).unwrap();
            (small, isa, big)
        })
        .recv_timeout(Duration::from_secs(30))
        .expect("served without the whole manager");
        let (small, isa, big) = got;
        assert_eq!((small.source, small.order), (DmaSource::Buddy, 4));
        assert!(small.phys + (64 << 10) <= 4 << 30 && isa.phys + (8 << 10) <= 16 << 20);
        assert_eq!(big.source, DmaSource::Cma);
        let freed = spawn(move || mm.dma_free(&isa))
            .recv_timeout(Duration::from_secs(30))
            .expect("freed without the whole manager");
        assert_eq!(freed, Ok(()));
        drop(batch);
        {
            let mm = mm.lock();
            mm.check().unwrap();
            assert_eq!(mm.counters.dma_buffers, 2);
            assert_eq!(mm.counters.dma_buddy_pages, 16);
            assert_eq!(
                mm.owners.slots[client.0 as usize].pages, 16,
                "the client's block"
            );
            assert_eq!(
                mm.owners.slots[77].pages, 0,
                "a dead owner's is the kernel's"
            );
            assert_eq!(mm.cma().unwrap().used_pages, (6 * MIB / 4096) as u64);
        }

        // The region under its lock: a second range waits for it while a
        // zone's batch does not, and comes back zeroed after the first
        // user's bytes.
        crate::access::fill(big.virt, big.len, 0xa5);
        assert_eq!(mm.dma_free(&big), Ok(()));
        let held = node.dma.lock();
        let range = spawn(move || mm.dma_alloc(req(6 * MIB, DmaMask::Bits64), client));
        let pages = spawn(move || {
            let mut pages = [0u64; 4];
            (mm.node().rmqueue_bulk(Some(1), 0, &mut pages), pages)
        })
        .recv_timeout(Duration::from_secs(30))
        .expect("a zone's batch needs no DMA lock");
        assert_eq!(pages.0, 4);
        std::thread::sleep(Duration::from_millis(50));
        assert!(range.try_recv().is_err(), "the range waits for the region");
        drop(held);
        let range = range
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .unwrap();
        assert_eq!(range.phys, big.phys, "first fit");
        assert!(mm.lock().dma_bytes(&range).unwrap().iter().all(|&b| b == 0));
        assert_eq!(node.free_pcppages_bulk(None, 0, &pages.1), Some(Ok(())));

        for buf in [small, range] {
            assert_eq!(mm.dma_free(&buf), Ok(()));
        }
        // Made-up buffers are refused, and nothing changes: inside the
        // region, a block freed already, the middle of a block, a slab's
        // page.
        let obj = mm.lock().kmalloc(64, crate::Gfp::KERNEL).unwrap();
        let slab = mm.lock().dmap.phys(obj.as_ptr() as usize) & !4095;
        let fakes = [
            DmaBuffer {
                phys: range.phys + 4096,
                ..range
            },
            small,
            DmaBuffer {
                phys: small.phys + 4096,
                order: 0,
                ..small
            },
            DmaBuffer {
                phys: slab,
                order: 0,
                ..small
            },
        ];
        for fake in fakes {
            assert!(mm.dma_free(&fake).is_err(), "{fake:?}");
        }
        mm.lock().kfree(obj).unwrap();
        let mut mm = mm.lock();
        mm.check().unwrap();
        assert_eq!(
            (mm.counters.dma_buffers, mm.counters.dma_buddy_pages),
            (0, 0)
        );
        assert_eq!(mm.owners.slots[client.0 as usize].pages, 0);
        mm.reclaim();
        assert_eq!(mm.meminfo().free, free, "everything back");
    }
}
