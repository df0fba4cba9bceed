//! Memory any CPU can reach without the service's [`crate::Env`]: the
//! kernel heap's per-CPU caches (memd-mm's `GlobalMm`), for work that runs
//! on several CPUs at once (a stress run's parts).

use alloc::boxed::Box;

use memd_mm::{CpuIds, GlobalMm, KObj, PageBlock};

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
}
