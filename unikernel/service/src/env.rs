//! What the kernel gives the service on each call: the memory manager (lent
//! through a closure, so the kernel can keep it behind its lock), a clock,
//! and an optional block device.

use crate::memory::{MemError, Memory, Placement};
use crate::percpu::{Job, PerCpuMemory};

/// How a [`BlockDevice`] moved a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transfer {
    /// Device requests.
    pub requests: u64,
    /// Queue descriptors in all.
    pub descriptors: u64,
    /// Descriptors pointing into the buffer.
    pub data_descriptors: u64,
}

/// A block device with 512-byte sectors, for the disk DMA operations,
/// driven one request at a time without waiting for it: [`BlockDevice::start`]
/// hands a buffer to the device, [`BlockDevice::poll`] says when the device
/// has given it back.
///
/// Between the two the buffer is the device's: the caller passes the very
/// same slice to `poll` until it reports the request done, and neither
/// reads, writes nor frees the buffer meanwhile (memd-service leases it).
pub trait BlockDevice {
    /// Device size in sectors.
    fn capacity_sectors(&self) -> u64;
    /// The largest request, in bytes (a multiple of [`SECTOR`]).
    fn max_request(&self) -> usize;
    /// Starts reading (`write` false) or writing `buf.len() / 512` sectors
    /// at `sector` into or from `buf`. Ok(false): a request is already in
    /// flight; try again later.
    fn start(&mut self, write: bool, sector: u64, buf: &mut [u8]) -> Result<bool, &'static str>;
    /// The request in flight on `buf`, once the device has completed it
    /// (None: not yet, or no request on `buf` in flight).
    fn poll(&mut self, buf: &mut [u8]) -> Option<Result<Transfer, &'static str>>;
}

/// Sector size of [`BlockDevice`].
pub const SECTOR: u64 = 512;

/// A DMA buffer the kernel holds for a device (rings, driver buffers), for
/// the DMA list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDma {
    /// The device and what the buffer is for, e.g. "virtio-net used ring".
    pub owner: alloc::string::String,
    /// Physical address.
    pub phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// From the contiguous-memory reservation (else the buddy).
    pub cma: bool,
}

/// The service's view of its surroundings.
pub trait Env {
    /// The memory manager type.
    type Mem: Memory;

    /// Run `f` with the memory manager and the block device, if any; what
    /// `f` allocates is the kernel's.
    ///
    /// In the kernel the memory manager sits behind the global allocator's
    /// lock; the service does its own heap work (handle tables, replies)
    /// outside these calls.
    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut Self::Mem, Option<&mut dyn BlockDevice>) -> R,
    ) -> R;

    /// As [`Env::with_mem`], with what `f` allocates charged to `owner`
    /// (a connection id) through [`Memory::as_owner`].
    fn with_mem_as<R>(
        &mut self,
        owner: u64,
        f: impl FnOnce(&mut Self::Mem, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        self.with_mem(|m, block| m.as_owner(owner, |m| f(m, block)))
    }

    /// A DMA buffer charged to `owner`, zeroed unless `zeroed` is false
    /// (the caller zeroes it): by default [`Memory::dma_alloc`] (or
    /// [`Memory::dma_alloc_unzeroed`]) under [`Env::with_mem_as`]. An
    /// environment whose manager serves DMA under locks of its own
    /// ([`PerCpuMemory::dma_alloc`]) passes the whole manager by.
    fn dma_alloc(
        &mut self,
        owner: u64,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<<Self::Mem as Memory>::DmaBuf, MemError> {
        let Placement { mask, movable } = at;
        self.with_mem_as(owner, |m, _| match zeroed {
            true => m.dma_alloc(len, align, mask, movable),
            false => m.dma_alloc_unzeroed(len, align, mask, movable),
        })
    }

    /// Frees a buffer [`Env::dma_alloc`] gave (the service frees each
    /// once, by its handle): by default [`Memory::dma_free`] under
    /// [`Env::with_mem`].
    fn dma_free(&mut self, buf: <Self::Mem as Memory>::DmaBuf) -> Result<(), MemError> {
        self.with_mem(|m, _| m.dma_free(buf))
    }

    /// A monotonic clock in nanoseconds.
    fn now_ns(&mut self) -> u64;

    /// Time spent on work so far ([`memd_wire::Status::busy_ns`]); `None`
    /// by default (host environments do not measure it).
    fn busy_ns(&mut self) -> Option<u64> {
        None
    }

    /// Time spent halted while idle so far
    /// ([`memd_wire::Status::halted_ns`]); `None` by default.
    fn halted_ns(&mut self) -> Option<u64> {
        None
    }

    /// What the host asks the balloon to hold, in bytes
    /// ([`memd_wire::Status::balloon_target_bytes`]); `None` by default
    /// (no balloon device).
    fn balloon_target_bytes(&mut self) -> Option<u64> {
        None
    }

    /// The CPUs ([`memd_wire::Status::cpus`]); none by default.
    fn cpus(&mut self) -> alloc::vec::Vec<memd_wire::Cpu> {
        alloc::vec::Vec::new()
    }

    /// The virtio-mem device's state ([`memd_wire::Status::hotplug`]);
    /// `None` by default (no device).
    fn hotplug(&mut self) -> Option<memd_wire::Hotplug> {
        None
    }

    /// How long the loop's passes took ([`memd_wire::Status::loop_passes`]);
    /// `None` by default (host environments have no loop of their own).
    fn loop_passes(&mut self) -> Option<memd_wire::LoopPasses> {
        None
    }

    /// The kernel heap's per-CPU caches, for work that runs on several
    /// CPUs; `None` by default (the manager only behind `with_mem`).
    fn percpu(&mut self) -> Option<&'static dyn PerCpuMemory> {
        None
    }

    /// Frames each CPU's page lists hold in each zone, by CPU number
    /// (memd-mm's `GlobalMm::cpu_pagesets`), for the zoneinfo view; none
    /// by default.
    fn cpu_pagesets(&mut self) -> alloc::vec::Vec<[u64; memd_mm::NR_ZONES]> {
        alloc::vec::Vec::new()
    }

    /// Each CPU's hit and miss counters, by CPU number (memd-mm's
    /// `GlobalMm::cpu_stats`), for the slabinfo view's `cpustat`; none by
    /// default.
    fn cpu_stats(&mut self) -> alloc::vec::Vec<memd_mm::stats::CpuStats> {
        alloc::vec::Vec::new()
    }

    /// CPUs besides the caller's that take jobs ([`Env::queue_on`]),
    /// numbered `1..=work_cpus()`; none by default.
    fn work_cpus(&mut self) -> usize {
        0
    }

    /// Runs `job` on CPU `cpu` (one of [`Env::work_cpus`]); gives it back
    /// when that CPU is busy with an earlier job.
    fn queue_on(&mut self, cpu: usize, job: Job) -> Result<(), Job> {
        let _ = cpu;
        Err(job)
    }

    /// The DMA buffers devices hold now. Called outside [`Env::with_mem`]:
    /// the result may allocate. None by default (host environments have no
    /// devices).
    fn device_dma(&mut self) -> alloc::vec::Vec<DeviceDma> {
        alloc::vec::Vec::new()
    }
}

/// An [`Env`] over plain borrows: for host programs and tests, or a kernel
/// that needs no lock around the memory manager.
pub struct DirectEnv<'a, M> {
    /// The memory manager.
    pub mem: &'a mut M,
    /// The block device.
    pub block: Option<&'a mut dyn BlockDevice>,
    /// The clock.
    pub clock: fn() -> u64,
}

impl<M: Memory> Env for DirectEnv<'_, M> {
    type Mem = M;

    fn with_mem<R>(&mut self, f: impl FnOnce(&mut M, Option<&mut dyn BlockDevice>) -> R) -> R {
        match &mut self.block {
            Some(b) => f(self.mem, Some(&mut **b)),
            None => f(self.mem, None),
        }
    }

    fn now_ns(&mut self) -> u64 {
        (self.clock)()
    }
}
