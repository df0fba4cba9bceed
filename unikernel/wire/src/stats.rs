//! Statistics views, as the wire carries them. Sizes are in bytes unless a
//! field says pages.
//!
//! Where memd-mm's view carries the same information it is the wire's type
//! too, re-exported here: [`MemInfo`], [`DmaSource`], [`SlabInfo`] (with
//! the cache's name as a `String`), and the parts the views below embed
//! ([`Watermarks`], [`ZoneCounters`], [`CacheCounters`], [`CmaUsage`]).
//! The other views are the wire's own, because they carry owned,
//! display-ready data (zone names as strings, per-order arrays as vectors,
//! a pool's backing for humans); the service builds them from memd-mm's in
//! one place. Field order is encoding: postcard writes a struct's fields,
//! nested ones included, in order and without names.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::flags::DmaMask;

pub use memd_mm::stats::{CmaUsage, CpuStat, MemInfo};
pub use memd_mm::{CacheCounters, DmaSource, Watermarks, ZoneCounters};

/// A resource owned by one connection: pages, an object, a cache, a pool or
/// a DMA buffer. Handles are never reused within a service's lifetime.
pub type Handle = u64;

/// Per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Pages held at once (page blocks, DMA buffers, object footprints).
    pub pages: u64,
    /// Bytes held at once.
    pub bytes: u64,
    /// Handles held at once.
    pub handles: u64,
    /// Slab caches and mempools held at once.
    pub caches: u64,
}

/// [`crate::Op::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Status {
    /// Protocol version.
    pub version: u32,
    /// Server name and version.
    pub server: String,
    /// Time since the service started.
    pub uptime_ns: u64,
    /// Open connections (authenticated or not).
    pub connections: u64,
    /// Requests served since start (batch operations count one each).
    pub requests: u64,
    /// Page size.
    pub page_size: u64,
    /// Number of buddy orders (blocks up to `2^(max_order-1)` pages).
    pub max_order: u32,
    /// Memory managed by the page allocator.
    pub total_bytes: u64,
    /// Memory on the buddy free lists.
    pub free_bytes: u64,
    /// Whether a block device is attached (for the disk DMA operations).
    pub block_device: bool,
    /// Time the service's CPU spent on work since it started: the passes
    /// of the kernel's poll loop that moved packets (the rest is idle
    /// polling). Under QEMU's `-icount shift=0` a nanosecond is one guest
    /// instruction. `None` where the environment does not measure it.
    pub busy_ns: Option<u64>,
    /// Time the CPU spent halted since it started: an idle poll loop halts
    /// until a timer tick instead of spinning. `None` where the environment
    /// does not halt.
    pub halted_ns: Option<u64>,
    /// How long the service loop's passes took. `None` where the
    /// environment has no loop of its own.
    pub loop_passes: Option<crate::LoopPasses>,
    /// Free memory reported to the host (free page reporting through the
    /// balloon): the host may have taken it back; memd may use it again.
    pub reported_bytes: u64,
    /// Memory in the balloon: the host's, on its request, until it gives
    /// it back.
    pub balloon_bytes: u64,
    /// What the host asks the balloon to hold, in bytes (its target);
    /// `None` without a balloon device.
    pub balloon_target_bytes: Option<u64>,
    /// The virtio-mem device and the memory it plugged; `None` without one.
    pub hotplug: Option<Hotplug>,
    /// The CPUs running, the boot CPU first; empty where the environment
    /// does not say.
    pub cpus: Vec<Cpu>,
}

/// One CPU of [`Status::cpus`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cpu {
    /// Its local APIC id.
    pub apic_id: u32,
    /// What it does: "network loop" on the boot CPU, "idle" on the others
    /// while nothing hands them work.
    pub role: String,
    /// Time it worked since it came up.
    pub busy_ns: u64,
    /// Time it halted since it came up.
    pub halted_ns: u64,
    /// Its page lists' hits and misses.
    pub pages: CpuStat,
    /// Its kmalloc arrays' hits and misses, all size classes.
    pub objects: CpuStat,
}

/// Memory plugged at run time through virtio-mem, in ZONE_MOVABLE.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Hotplug {
    /// Physical address of the device's region.
    pub region_start: u64,
    /// Size of the region: the most that can be plugged.
    pub region_size: u64,
    /// What the device plugs and unplugs at a time.
    pub block_size: u64,
    /// What the host asks to be plugged.
    pub requested_bytes: u64,
    /// Plugged and online in ZONE_MOVABLE.
    pub plugged_bytes: u64,
    /// Of the plugged memory, what is in use (allocated or on per-CPU
    /// lists): it cannot be unplugged until it is freed.
    pub used_bytes: u64,
    /// Plugged beyond the request that could not be unplugged because it
    /// is in use; memd keeps trying as clients free memory.
    pub shortfall_bytes: u64,
    /// Frame descriptors of the plugged memory's sections.
    pub memmap_bytes: u64,
    /// The device's last refusal or failure, if any.
    pub error: Option<String>,
}

/// One zone of `/proc/zoneinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ZoneInfo {
    /// NUMA node (always 0 today).
    pub node: u32,
    /// "DMA", "DMA32", "Normal" or "Movable".
    pub name: String,
    /// First frame number spanned.
    pub start_pfn: u64,
    /// Frames spanned.
    pub spanned: u64,
    /// Frames handed to the page allocator.
    pub managed: u64,
    /// Free frames.
    pub free: u64,
    /// Watermarks, pages.
    pub watermark: Watermarks,
    /// Pages held back per requesting zone.
    pub lowmem_reserve: Vec<u64>,
    /// Free blocks per order.
    pub free_blocks: Vec<u64>,
    /// Pages on the per-CPU lists.
    pub pcp_count: u64,
    /// Per-CPU list high mark.
    pub pcp_high: u64,
    /// Per-CPU list batch.
    pub pcp_batch: u64,
    /// Each CPU's page lists in front of the zones (orders 0 to 3), as
    /// far as they hold this zone's frames.
    pub cpu_pagesets: Vec<CpuPageset>,
    /// Event counters.
    pub counters: ZoneCounters,
    /// Usable frames not initialised yet (deferred initialisation).
    pub deferred: u64,
    /// Frames in the balloon.
    pub balloon: u64,
}

/// One CPU's pageset in a zone of `/proc/zoneinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CpuPageset {
    /// The CPU's number.
    pub cpu: u32,
    /// The zone's frames its page lists hold.
    pub count: u64,
    /// Frames its page lists hold at most, all zones.
    pub high: u64,
    /// Frames moved to or from the zones at a time.
    pub batch: u64,
}

/// One line of `/proc/buddyinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BuddyZone {
    /// NUMA node.
    pub node: u32,
    /// Zone name.
    pub zone: String,
    /// Free blocks per order.
    pub free: Vec<u64>,
}

/// One line of `/proc/slabinfo`: memd-mm's line with the cache's name as
/// a `String`.
pub type SlabInfo = memd_mm::stats::SlabInfo<String>;

/// One mempool.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MempoolInfo {
    /// Pool id in the memory manager.
    pub id: u32,
    /// What backs it, for humans ("cache 3", "kmalloc 256", "pages order 2").
    pub backing: String,
    /// Element size.
    pub elem_size: u64,
    /// Reserve size.
    pub min_nr: u64,
    /// Elements currently in the reserve.
    pub curr_nr: u64,
    /// Bytes idle in the reserve.
    pub reserve_bytes: u64,
    /// Elements handed out and not yet freed.
    pub in_use: u64,
    /// Allocations.
    pub allocs: u64,
    /// Allocations served from the reserve because the backing failed.
    pub reserve_hits: u64,
    /// Allocations that failed.
    pub failures: u64,
}

/// The contiguous-memory region.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CmaInfo {
    /// Whether a region was reserved at boot (`memd.dma_reserve=`).
    pub present: bool,
    /// First physical address.
    pub base: u64,
    /// Region size.
    pub total: u64,
    /// The zone it lies in.
    pub zone: String,
    /// What is in it.
    pub usage: CmaUsage,
}

/// One connection in the per-client view.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Connection id.
    pub conn: u64,
    /// The name the client gave in its hello ("" before it).
    pub name: String,
    /// Whether it has authenticated.
    pub authenticated: bool,
    /// Handles held.
    pub handles: u64,
    /// Its owner id in the memory manager (0 before its hello).
    pub owner: u64,
    /// Pages the memory manager charges to that owner: page blocks and
    /// DMA buffers from the buddy allocator, counted in the frame table.
    pub charged_pages: u64,
    /// Pages accounted (page blocks, DMA buffers, object footprints).
    pub pages: u64,
    /// Bytes accounted.
    pub bytes: u64,
    /// Requests served (batch operations count one each).
    pub requests: u64,
    /// Errors returned.
    pub errors: u64,
    /// Its limits.
    pub quota: Option<Quota>,
}

/// A DMA buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaBufferInfo {
    /// Its handle.
    pub handle: Handle,
    /// Owning connection.
    pub conn: u64,
    /// Physical address.
    pub phys: u64,
    /// Length.
    pub len: u64,
    /// Alignment asked for.
    pub align: u64,
    /// Address limit asked for.
    pub mask: DmaMask,
    /// Where it came from.
    pub source: DmaSource,
    /// The zone it lies in (DMA, DMA32, Normal).
    pub zone: String,
    /// Who holds it.
    pub owner: DmaOwner,
}

/// Who holds a DMA buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DmaOwner {
    /// A client connection (`conn`, `handle`).
    Client {
        /// The name the client gave in its hello.
        name: String,
    },
    /// A device's queue (rings, descriptor tables), held by the kernel.
    DeviceQueue {
        /// The device and queue, e.g. "virtio-blk".
        device: String,
    },
}

/// [`crate::Op::Check`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// Whether every invariant held.
    pub ok: bool,
    /// What was violated.
    pub violations: Vec<String>,
    /// Invariants this check did not hold (a check made in steps while
    /// memory is in use leaves out what holds only for one instant of the
    /// whole frame table).
    pub left_out: Vec<String>,
}

/// [`crate::Op::Stress`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StressReport {
    /// Operations run.
    pub ops: u64,
    /// Allocations that failed (out of memory; not errors of the run).
    pub failed_allocs: u64,
    /// Time taken inside the guest.
    pub elapsed_ns: u64,
    /// `ops` per second.
    pub ops_per_sec: u64,
    /// Whether the invariant check after the run passed.
    pub check_ok: bool,
    /// CPUs the run used.
    pub cpus: u32,
    /// Operations each of them ran, the network loop's CPU first.
    pub cpu_ops: Vec<u64>,
}
