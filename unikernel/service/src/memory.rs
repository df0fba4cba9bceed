//! What the service needs from a memory manager.
//!
//! The service is written against this trait so that it holds only opaque
//! ids and plain addresses; [`crate::mm`] implements it for memd-mm's
//! `MemoryManager`. Methods take and return the protocol's types; errors
//! carry an errno number and a static message.
//!
//! **No method may allocate from the heap.** In the kernel the memory
//! manager *is* the heap, behind one lock that [`crate::Env::with_mem`]
//! holds while these methods run. That is why statistics come in three
//! steps: [`Memory::view_len`] counts what a view will list, the service
//! allocates room for that many ([`Memory::stats_room`]) with the lock
//! released, [`Memory::snapshot`] copies plain data into it, and
//! [`Memory::render`] turns it into protocol types after the lock is
//! released again.

use memd_wire::{CacheSpec, DmaMask, DmaSource, FaultConfig, FaultStatus, FaultTarget, Gfp, Reply};

/// Where a DMA buffer may lie: below `mask`, and in ZONE_MOVABLE (memory
/// plugged at run time) only when `movable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The device's address limit.
    pub mask: DmaMask,
    /// Whether memory plugged at run time may serve it.
    pub movable: bool,
}

/// A statistics view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// `/proc/meminfo`.
    Meminfo,
    /// `/proc/zoneinfo`.
    Zoneinfo,
    /// `/proc/buddyinfo`.
    Buddyinfo,
    /// `/proc/slabinfo`: at most [`memd_wire::VIEW_PAGE`] caches from
    /// position `start`.
    Slabinfo {
        /// Position of the first cache listed.
        start: usize,
    },
    /// Mempools, paged as `Slabinfo` is.
    Mempools {
        /// Position of the first pool listed.
        start: usize,
    },
    /// The contiguous region.
    Cma,
}

/// An error from the memory manager: errno number, message, and an optional
/// number that completes it (live objects for `EBUSY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemError {
    /// errno number.
    pub code: i32,
    /// What happened.
    pub message: &'static str,
    /// Live objects, for `EBUSY`.
    pub live: Option<u64>,
}

impl MemError {
    /// An error without a count.
    pub const fn new(code: i32, message: &'static str) -> Self {
        MemError {
            code,
            message,
            live: None,
        }
    }
}

/// An allocated object: its address and usable size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Obj {
    /// Address in the guest's (or host arena's) address space.
    pub addr: u64,
    /// Usable size (`ksize`).
    pub size: u64,
}

/// A mempool's backing, with the memory manager's cache id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing<C> {
    /// Objects of a cache.
    Cache(C),
    /// kmalloc'd elements.
    Kmalloc(u32),
    /// Page blocks.
    Pages(u8),
}

/// A DMA buffer's public facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFacts {
    /// Physical address.
    pub phys: u64,
    /// Length.
    pub len: u64,
    /// Where it came from.
    pub source: DmaSource,
}

/// The memory manager as the service drives it.
pub trait Memory {
    /// A slab cache.
    type CacheId: Copy;
    /// A mempool.
    type PoolId: Copy;
    /// A DMA buffer, given back to free it.
    type DmaBuf;
    /// A DMA buffer's bytes lent out for work on another CPU
    /// ([`Memory::dma_lend`]).
    type Lent: core::ops::DerefMut<Target = [u8]> + Send + 'static;
    /// A heap-free snapshot of the statistics (allocated by the service
    /// before the memory manager is borrowed).
    type Stats;

    /// Page size in bytes.
    fn page_size(&self) -> u64;
    /// Number of buddy orders.
    fn max_order(&self) -> u32;
    /// Bytes managed by the page allocator.
    fn total_bytes(&mut self) -> u64;
    /// Bytes free in the page allocator.
    fn free_bytes(&mut self) -> u64;
    /// Free bytes reported to the host (free page reporting); none where
    /// nothing reports.
    fn reported_bytes(&mut self) -> u64 {
        0
    }
    /// Bytes in the balloon; none where there is no balloon.
    fn balloon_bytes(&mut self) -> u64 {
        0
    }
    /// Runs `f` with what it allocates charged to `owner` (from
    /// [`Memory::owner_new`]); everything outside `f` is the kernel's.
    /// Through [`crate::Env::with_mem_as`].
    fn as_owner<R>(&mut self, owner: u64, f: impl FnOnce(&mut Self) -> R) -> R;
    /// A new owner id for a client, never one whose pages are still
    /// charged.
    fn owner_new(&mut self) -> Result<u64, MemError>;
    /// `owner`'s client is gone and what it held is freed.
    fn owner_free(&mut self, owner: u64);
    /// Pages charged to `owner` now.
    fn owner_pages(&mut self, owner: u64) -> u64;
    /// Gives back owner-table room that ids freed earlier, and charged
    /// until now, held.
    fn owners_tidy(&mut self) {}

    /// Allocate `2^order` pages; returns the physical address.
    fn alloc_pages(&mut self, order: u8, gfp: Gfp) -> Result<u64, MemError>;
    /// Free pages from [`Memory::alloc_pages`].
    fn free_pages(&mut self, phys: u64, order: u8) -> Result<(), MemError>;
    /// kmalloc.
    fn kmalloc(&mut self, size: u64, gfp: Gfp) -> Result<Obj, MemError>;
    /// kfree `obj`, as [`Memory::kmalloc`] returned it: its usable size
    /// names the cache, so nothing is looked up.
    fn kfree(&mut self, obj: Obj) -> Result<(), MemError>;

    /// Create a slab cache shaped as `spec` says.
    fn cache_create(&mut self, spec: &CacheSpec) -> Result<Self::CacheId, MemError>;
    /// Allocate from a cache.
    fn cache_alloc(&mut self, cache: Self::CacheId, gfp: Gfp) -> Result<Obj, MemError>;
    /// Free to a cache.
    fn cache_free(&mut self, cache: Self::CacheId, addr: u64) -> Result<(), MemError>;
    /// Return empty slabs; returns the pages freed.
    fn cache_shrink(&mut self, cache: Self::CacheId) -> Result<u64, MemError>;
    /// Shrink every cache and drain the per-CPU page lists; returns the
    /// pages given back to the buddy.
    fn drop_caches(&mut self) -> u64;
    /// Destroy a cache (`EBUSY` with the live count while objects are out).
    fn cache_destroy(&mut self, cache: Self::CacheId) -> Result<(), MemError>;

    /// Create a mempool; returns its id and element size.
    fn pool_create(
        &mut self,
        backing: Backing<Self::CacheId>,
        min_nr: u32,
    ) -> Result<(Self::PoolId, u64), MemError>;
    /// Allocate an element.
    fn pool_alloc(&mut self, pool: Self::PoolId, gfp: Gfp) -> Result<Obj, MemError>;
    /// Free an element.
    fn pool_free(&mut self, pool: Self::PoolId, addr: u64) -> Result<(), MemError>;
    /// Destroy a pool (its reserve goes back to the backing allocator).
    fn pool_destroy(&mut self, pool: Self::PoolId) -> Result<(), MemError>;

    /// Allocate a physically contiguous buffer; with `movable`, it may come
    /// from ZONE_MOVABLE.
    fn dma_alloc(
        &mut self,
        len: u64,
        align: u64,
        mask: DmaMask,
        movable: bool,
    ) -> Result<Self::DmaBuf, MemError>;
    /// As [`Memory::dma_alloc`], but the bytes may be left as they were:
    /// the caller zeroes [`Memory::dma_span_bytes`] before anyone sees
    /// them. By default, zeroed anyway.
    fn dma_alloc_unzeroed(
        &mut self,
        len: u64,
        align: u64,
        mask: DmaMask,
        movable: bool,
    ) -> Result<Self::DmaBuf, MemError> {
        self.dma_alloc(len, align, mask, movable)
    }
    /// Its public facts.
    fn dma_facts(&self, buf: &Self::DmaBuf) -> DmaFacts;
    /// Every byte it takes, its length and whatever rounding added: what
    /// zeroing covers. By default its bytes.
    fn dma_span_bytes<'a>(&'a mut self, buf: &'a Self::DmaBuf) -> Result<&'a mut [u8], MemError> {
        self.dma_bytes(buf)
    }
    /// Its bytes.
    fn dma_bytes<'a>(&'a mut self, buf: &'a Self::DmaBuf) -> Result<&'a mut [u8], MemError>;
    /// Free it.
    fn dma_free(&mut self, buf: Self::DmaBuf) -> Result<(), MemError>;
    /// Lends its bytes (all it takes with `span`, as
    /// [`Memory::dma_span_bytes`]) out for work on another CPU: until
    /// [`Memory::dma_unlend`], its bytes are no one else's and it cannot
    /// be freed.
    fn dma_lend(&mut self, buf: &Self::DmaBuf, span: bool) -> Result<Self::Lent, MemError>;
    /// Takes lent bytes back.
    fn dma_unlend(&mut self, lent: Self::Lent);

    /// Entries `view` lists now (caches, pools; 0 for the other views).
    fn view_len(&mut self, view: View) -> usize;
    /// A snapshot with room for `entries` entries of `view` (allocated
    /// with the lock released, fallibly).
    fn stats_room(view: View, entries: usize) -> Result<Self::Stats, MemError>;
    /// Copy the data of `view` into `out`, as much as its room holds (no
    /// heap allocation).
    fn snapshot(&mut self, view: View, out: &mut Self::Stats);
    /// Turn a snapshot into the reply for `view` (runs without the lock).
    fn render(view: View, stats: &Self::Stats) -> Reply;
    /// The next `pageblocks` of a check of every invariant done in steps
    /// (`walk`, from [`memd_mm::CheckWalk::new`]): `Ok(true)` once it has
    /// ended with nothing found, else the first violation and where (a
    /// frame number or address).
    fn check_step(
        &mut self,
        walk: &mut memd_mm::CheckWalk,
        pageblocks: usize,
    ) -> Result<bool, (&'static str, u64)>;
    /// Copy the physical memory map's layout into `out` (memory ranges,
    /// zones, reservations, the CMA region; the frame runs come from
    /// [`Memory::memmap_runs`]), whose buffers the service allocated
    /// beforehand (no heap allocation). A manager without a frame table to
    /// show answers `ENOSYS`, which is what this default does.
    fn memmap(&mut self, out: &mut crate::memmap::MapSnapshot) -> Result<(), MemError> {
        let _ = out;
        Err(MemError::new(
            memd_wire::errno::ENOSYS,
            "this memory manager has no physical memory map",
        ))
    }

    /// The frame runs of frames `from..to`, in address order, each given
    /// to `take` (no heap allocation): a map is walked a window at a time,
    /// and `from` may fall inside a block after the table changed. Nothing
    /// by default.
    fn memmap_runs(&mut self, from: u64, to: u64, take: &mut dyn FnMut(memd_mm::FrameRun)) {
        let _ = (from, to, take);
    }
    /// Set a fault-injection rule.
    fn set_fault(&mut self, target: FaultTarget, config: FaultConfig) -> Result<(), MemError>;
    /// Both fault-injection rules with their counters.
    fn faults(&self) -> FaultStatus;
}
