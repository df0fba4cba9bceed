//! Memory any CPU can reach without the service's [`crate::Env`]: the
//! kernel heap's per-CPU caches (memd-mm's `GlobalMm`), for work that runs
//! on several CPUs at once (a stress run's parts).

use alloc::boxed::Box;

use memd_mm::{CpuIds, DmaBuffer, DmaRequest, GlobalMm, KObj, Owner, PageBlock};

use crate::memory::{MemError, Placement};
use crate::mm::{dma_shape, mm_err};

/// A job for another CPU ([`crate::Env::queue_on`]).
pub type Job = Box<dyn FnOnce() + Send>;

/// Allocation through the calling CPU's caches.
pub trait PerCpuMemory: Sync {
    /// Turns the calling CPU's caches on for the calls that follow.
    fn enter(&self);
    /// Turns them off, keeping what they hold (for a CPU that runs other
    /// work between slices of this one).
    fn pause(&self);
    /// Gives back what they hold and turns them off.
    fn leave(&self);
    /// `2^order` pages.
    fn alloc_pages(&self, order: u32) -> Option<PageBlock>;
    /// Frees what [`PerCpuMemory::alloc_pages`] gave.
    fn free_pages(&self, block: PageBlock);
    /// A kmalloc object of `size` bytes.
    fn kmalloc(&self, size: usize) -> Option<KObj>;
    /// Frees what [`PerCpuMemory::kmalloc`] gave.
    fn kfree(&self, obj: KObj);
    /// A DMA buffer as [`crate::Env::dma_alloc`] asks for it, under the
    /// manager's DMA and zone locks rather than the whole manager.
    fn dma_alloc(
        &self,
        owner: u64,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<DmaBuffer, MemError>;
    /// Frees what [`PerCpuMemory::dma_alloc`] (or the manager's own
    /// `dma_alloc`) gave, refusing what is not a live buffer.
    fn dma_free(&self, buf: &DmaBuffer) -> Result<(), MemError>;
}

impl<const CPUS: usize, I: CpuIds> PerCpuMemory for GlobalMm<CPUS, I> {
    fn enter(&self) {
        self.cpu_enter();
    }

    fn pause(&self) {
        self.cpu_pause();
    }

    fn leave(&self) {
        self.cpu_leave();
    }

    fn alloc_pages(&self, order: u32) -> Option<PageBlock> {
        GlobalMm::alloc_pages(self, order)
    }

    fn free_pages(&self, block: PageBlock) {
        GlobalMm::free_pages(self, block);
    }

    fn kmalloc(&self, size: usize) -> Option<KObj> {
        GlobalMm::kmalloc(self, size)
    }

    fn kfree(&self, obj: KObj) {
        GlobalMm::kfree(self, obj);
    }

    fn dma_alloc(
        &self,
        owner: u64,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<DmaBuffer, MemError> {
        let (len, align) = dma_shape(len, align)?;
        let req = DmaRequest {
            len,
            align,
            mask: at.mask,
            movable: at.movable,
            zeroed,
        };
        // An id past 16 bits is no live owner's: the kernel's, as
        // `Memory::as_owner` has it.
        let owner = Owner(u16::try_from(owner).unwrap_or(0));
        GlobalMm::dma_alloc(self, req, owner).map_err(mm_err)
    }

    fn dma_free(&self, buf: &DmaBuffer) -> Result<(), MemError> {
        GlobalMm::dma_free(self, buf).map_err(mm_err)
    }
}
