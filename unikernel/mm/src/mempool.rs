//! Mempools: a guaranteed minimum of elements for paths that must make
//! forward progress under memory pressure (Linux's `mempool_t`).
//!
//! `min_nr` elements are allocated up front and parked. An allocation
//! first asks the backing allocator; only when that fails does it take a
//! parked element. A free refills the reserve before giving memory back.
//! The parked elements are memory nobody uses while things go well (the
//! reason Linux keeps mempools to the few paths, such as block I/O, that
//! must not fail), so the statistics show them as idle bytes.
//!
//! Parked elements are linked through their own first word, so the reserve
//! costs no memory beyond the elements themselves. A pool's descriptor is
//! an object of memd-mm's `mempool_t` cache (`slab_common.rs`), named by an
//! id (`idr.rs`).

use crate::access;
use crate::frame::FrameState;
use crate::gfp::Gfp;
use crate::idr::Idr;
use crate::memblock::PAGE_SIZE;
use crate::pageblock::Held;
use crate::slab::CacheId;
use crate::slab_common::{is_internal, MEMPOOL_CACHE};
use crate::{MemoryManager, MmError};
use core::ptr::NonNull;

/// Largest reserve one pool may hold.
pub const MAX_MIN_NR: usize = 1 << 16;
const END: u64 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub u16);

/// Where a pool's elements come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolBacking {
    /// Objects of a slab cache (`mempool_create_slab_pool`).
    Cache(CacheId),
    /// kmalloc'd buffers of a size (`mempool_create_kmalloc_pool`).
    Kmalloc(usize),
    /// Page blocks of an order (`mempool_create_page_pool`).
    Pages(u32),
}

/// An element handed out by a pool: its direct-map and physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolElement {
    pub virt: usize,
    pub phys: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounters {
    pub allocs: u64,
    /// Allocations served from the reserve because the backing failed.
    pub from_reserve: u64,
    pub frees: u64,
    /// Frees that went to refill the reserve.
    pub refills: u64,
    pub failures: u64,
}

pub struct Mempool {
    pub backing: PoolBacking,
    pub min_nr: usize,
    /// Elements parked in the reserve (Linux's `curr_nr`).
    pub curr_nr: usize,
    head: u64,
    pub element_size: usize,
    /// Elements handed out and not yet returned.
    pub outstanding: u64,
    pub counters: PoolCounters,
}

fn pools(mm: &mut MemoryManager) -> &mut Idr<Mempool> {
    &mut mm.pools
}

impl MemoryManager {
    /// `mempool_create`: fills the reserve with `min_nr` elements, or fails
    /// and frees what it took.
    pub fn mempool_create(
        &mut self,
        backing: PoolBacking,
        min_nr: usize,
    ) -> Result<PoolId, MmError> {
        if min_nr == 0 || min_nr > MAX_MIN_NR {
            return Err(MmError::Invalid("mempool: min_nr must be 1..=65536"));
        }
        let element_size = match backing {
            PoolBacking::Cache(id) if is_internal(id) => return Err(MmError::NotPermitted),
            PoolBacking::Cache(id) => self.cache(id).ok_or(MmError::NotFound)?.object_size,
            PoolBacking::Kmalloc(size)
                if (1..=(PAGE_SIZE as usize) << (self.max_order - 1)).contains(&size) =>
            {
                size
            }
            PoolBacking::Kmalloc(_) => return Err(MmError::Invalid("mempool: bad kmalloc size")),
            PoolBacking::Pages(order) if order < self.max_order => (PAGE_SIZE as usize) << order,
            PoolBacking::Pages(_) => {
                return Err(MmError::Invalid("mempool: order is not below max_order"))
            }
        };
        let pool = Mempool {
            backing,
            min_nr,
            curr_nr: 0,
            head: END,
            element_size,
            outstanding: 0,
            counters: PoolCounters::default(),
        };
        let slot = self.idr_alloc_object(pools, MEMPOOL_CACHE, pool)?;
        let id = PoolId(slot as u16);
        for _ in 0..min_nr {
            match self.pool_backing_alloc(backing, Gfp::KERNEL) {
                Ok(e) => self.pool_park(id, e),
                Err(e) => {
                    self.mempool_drop(id);
                    return Err(e);
                }
            }
        }
        Ok(id)
    }

    pub fn mempool(&self, id: PoolId) -> Option<&Mempool> {
        self.pools.get(id.0 as usize)
    }

    pub fn mempools(&self) -> impl Iterator<Item = (PoolId, &Mempool)> {
        self.pools.iter().map(|(i, p)| (PoolId(i as u16), p))
    }

    fn pool_mut(&mut self, id: PoolId) -> Result<&mut Mempool, MmError> {
        self.pools.get_mut(id.0 as usize).ok_or(MmError::NotFound)
    }

    fn pool_backing_alloc(
        &mut self,
        backing: PoolBacking,
        gfp: Gfp,
    ) -> Result<PoolElement, MmError> {
        let virt = match backing {
            PoolBacking::Cache(id) => self.cache_alloc(id, gfp)?.as_ptr() as usize,
            PoolBacking::Kmalloc(size) => self.kmalloc(size, gfp)?.as_ptr() as usize,
            PoolBacking::Pages(order) => {
                let pfn = self.alloc_frames(order, gfp.without(Gfp::MOVABLE))?;
                let f = &mut self.frames[pfn as usize];
                f.set_state(FrameState::Pool);
                f.count = 1;
                self.counters.pool_pages += 1 << order;
                self.pageblocks.add(pfn, Held::Pool, 1 << order);
                self.dmap.virt(pfn as u64 * PAGE_SIZE)
            }
        };
        Ok(PoolElement {
            virt,
            phys: self.dmap.phys(virt),
        })
    }

    fn pool_backing_free(&mut self, backing: PoolBacking, e: PoolElement) {
        let ptr = NonNull::new(e.virt as *mut u8).expect("pool element at address 0");
        let _ = match backing {
            PoolBacking::Cache(id) => self.cache_free(id, ptr),
            PoolBacking::Kmalloc(_) => self.kfree(ptr),
            PoolBacking::Pages(order) => {
                let pfn = (e.phys / PAGE_SIZE) as u32;
                self.frames[pfn as usize].count = 0;
                self.counters.pool_pages -= 1 << order;
                self.pageblocks.sub(pfn, Held::Pool, 1 << order);
                self.free_frames(pfn, order);
                Ok(())
            }
        };
    }

    fn pool_park(&mut self, id: PoolId, e: PoolElement) {
        if let Some(pool) = self.pools.get_mut(id.0 as usize) {
            access::write_link(e.virt, pool.head);
            pool.head = e.virt as u64;
            pool.curr_nr += 1;
        }
    }

    fn pool_unpark(&mut self, id: PoolId) -> Option<PoolElement> {
        let pool = self.pools.get_mut(id.0 as usize)?;
        if pool.head == END {
            return None;
        }
        let virt = pool.head as usize;
        pool.head = access::read_link(virt);
        pool.curr_nr -= 1;
        Some(PoolElement {
            virt,
            phys: self.dmap.phys(virt),
        })
    }

    /// `mempool_alloc`: the backing allocator first (without reclaim or
    /// warnings, as Linux does), then the reserve.
    pub fn mempool_alloc(&mut self, id: PoolId, gfp: Gfp) -> Result<PoolElement, MmError> {
        let backing = self.pool_mut(id)?.backing;
        let first_try = gfp.without(Gfp::KERNEL).union(Gfp::NOWARN);
        let result = match self.pool_backing_alloc(backing, first_try) {
            Ok(e) => Ok(e),
            Err(_) => match self.pool_unpark(id) {
                Some(e) => {
                    self.pool_mut(id)?.counters.from_reserve += 1;
                    if gfp.zero() {
                        access::fill(e.virt, self.pool_mut(id)?.element_size, 0);
                    }
                    Ok(e)
                }
                // Reserve empty: a last try that may reclaim.
                None => self.pool_backing_alloc(backing, gfp),
            },
        };
        let pool = self.pool_mut(id)?;
        match result {
            Ok(_) => {
                pool.counters.allocs += 1;
                pool.outstanding += 1;
            }
            Err(_) => pool.counters.failures += 1,
        }
        result
    }

    /// `mempool_free`: refills the reserve first.
    pub fn mempool_free(&mut self, id: PoolId, e: PoolElement) -> Result<(), MmError> {
        let backing = self.pool_mut(id)?.backing;
        if !self.is_pool_element(backing, e) {
            return Err(MmError::Invalid(
                "mempool: not an element of this pool's backing",
            ));
        }
        let pool = self.pool_mut(id)?;
        if pool.outstanding == 0 {
            return Err(MmError::Invalid("mempool: nothing outstanding to free"));
        }
        pool.outstanding -= 1;
        pool.counters.frees += 1;
        let backing = pool.backing;
        if pool.curr_nr < pool.min_nr {
            pool.counters.refills += 1;
            self.pool_park(id, e);
        } else {
            self.pool_backing_free(backing, e);
        }
        Ok(())
    }

    /// Whether `e` can be an element from `backing`: an object of its
    /// cache, a kmalloc block large enough, or a page block of its order.
    fn is_pool_element(&self, backing: PoolBacking, e: PoolElement) -> bool {
        if e.virt != self.dmap.virt(e.phys) {
            return false;
        }
        let Some(ptr) = NonNull::new(e.virt as *mut u8) else {
            return false;
        };
        match backing {
            PoolBacking::Cache(id) => self
                .cache(id)
                .is_some_and(|c| c.owning_slab(&self.frames, self.dmap, id, e.virt).is_some()),
            PoolBacking::Kmalloc(size) => self.ksize(ptr).is_ok_and(|k| k >= size),
            PoolBacking::Pages(order) => self.frame(e.phys).is_some_and(|f| {
                f.is(FrameState::Pool)
                    && f.order as u32 == order
                    && e.phys.is_multiple_of(PAGE_SIZE)
            }),
        }
    }

    /// `mempool_destroy`: refused while elements are outstanding.
    pub fn mempool_destroy(&mut self, id: PoolId) -> Result<(), MmError> {
        let pool = self.pool_mut(id)?;
        if pool.outstanding > 0 {
            return Err(MmError::Busy {
                live: pool.outstanding,
            });
        }
        self.mempool_drop(id);
        Ok(())
    }

    fn mempool_drop(&mut self, id: PoolId) {
        let Some(backing) = self.pools.get(id.0 as usize).map(|p| p.backing) else {
            return;
        };
        while let Some(e) = self.pool_unpark(id) {
            self.pool_backing_free(backing, e);
        }
        self.idr_free_object(pools, MEMPOOL_CACHE, id.0 as usize);
    }

    /// Walks a pool's reserve list (for the checker).
    pub(crate) fn pool_reserve_len(&self, id: PoolId) -> usize {
        let Some(pool) = self.mempool(id) else {
            return 0;
        };
        let mut n = 0;
        let mut cur = pool.head;
        while cur != END && n <= pool.min_nr {
            n += 1;
            cur = access::read_link(cur as usize);
        }
        n
    }
}
