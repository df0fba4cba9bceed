//! Requests and responses.
//!
//! A client sends [`Request`] frames and receives one [`Response`] frame for
//! each, in order. The first request must be [`Request::Hello`]; until it
//! succeeds nothing else is served. None of these types is recursive (a
//! batch holds [`Op`]s, never another batch), so decoding hostile input
//! cannot recurse deeply.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::error::WireError;
use crate::flags::{DmaMask, Gfp, SlabFlags};
use crate::stats::*;

/// Protocol version spoken by this crate. 6: the slab and mempool
/// listings come in pages, and a client's line carries its owner id and
/// the pages memd-mm charges to it.
pub const PROTOCOL_VERSION: u32 = 9;

/// Most operations one batch may carry. The decoded operations are held
/// while the batch runs, and every result must fit the one reply frame
/// ([`MAX_FRAME`](crate::MAX_FRAME)): 4096 keeps both small beside it.
pub const MAX_BATCH_OPS: usize = 4096;

/// Entries in one page of [`Op::DmaBuffers`]: a page's reply stays far
/// below a frame.
pub const DMA_LIST_PAGE: usize = 2048;

/// Entries in one page of [`Op::Slabinfo`] and [`Op::Mempools`]: clients
/// may hold thousands of caches and pools between them.
pub const VIEW_PAGE: usize = 512;

/// Longest name accepted for a cache or a client.
pub const MAX_NAME_LEN: usize = 32;

/// Most bytes one DMA read may return, so a reply always fits a frame.
pub const MAX_IO: usize = crate::framing::MAX_FRAME - 4096;

/// One frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The handshake; must come first.
    Hello(Hello),
    /// One operation.
    Call(Op),
    /// Many operations in one frame, answered by [`Response::Batch`].
    Batch(Batch),
}

/// The handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// One of the tokens given to the service at boot (fw_cfg files
    /// `opt/memd/token` and `opt/memd/operator-token`); it decides the
    /// connection's [`Role`].
    pub token: String,
    /// A name for the client, shown in the per-client view.
    pub client: String,
}

/// A batch of operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Stop at the first failing operation (the rest are not run and get
    /// no result).
    pub stop_on_error: bool,
    /// The operations, run in order.
    pub ops: Vec<Op>,
}

/// A mempool's backing allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolBacking {
    /// Objects of a slab cache created by this connection.
    Cache(Handle),
    /// kmalloc'd elements of `size` bytes.
    Kmalloc {
        /// Element size.
        size: u32,
    },
    /// Page blocks of `order`.
    Pages {
        /// Block order.
        order: u8,
    },
}

/// A slab cache constructor, run once per object when a slab is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ctor {
    /// No constructor.
    None,
    /// Fill each object with this byte.
    Fill(u8),
}

/// What a slab cache is made of: the arguments of Linux's
/// `kmem_cache_create`, carried by [`Op::CacheCreate`].
///
/// postcard writes a struct as its fields in order, without names, so
/// `Op::CacheCreate(CacheSpec { .. })` has the bytes a struct variant with
/// these fields had: the field order is the protocol's (pinned by
/// `tests/encoding.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Name (at most [`MAX_NAME_LEN`] bytes).
    pub name: String,
    /// Object size in bytes.
    pub size: u32,
    /// Alignment in bytes (0 = default).
    pub align: u32,
    /// SLAB_* flags.
    pub flags: SlabFlags,
    /// Constructor.
    pub ctor: Ctor,
}

/// Which allocations a fault-injection rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultTarget {
    /// Slab allocations (Linux `failslab`).
    Slab,
    /// Page allocations (Linux `fail_page_alloc`).
    Pages,
}

/// A fault-injection rule in the style of Linux's fault-injection
/// attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FaultConfig {
    /// Percent chance (0..=100) that an eligible allocation fails.
    pub probability: u8,
    /// Only every `interval`-th eligible allocation may fail (1 = each).
    pub interval: u32,
    /// Stop after this many injected failures (-1 = no limit, 0 = off).
    pub times: i64,
}

/// One fault-injection rule as it stands, with its counters (Linux's
/// `/sys/kernel/debug/fail*/` attributes): memd-mm's own type.
pub use memd_mm::FaultAttr;

/// [`Op::Faults`]: both rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FaultStatus {
    /// `failslab`.
    pub slab: FaultAttr,
    /// `fail_page_alloc`.
    pub pages: FaultAttr,
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Service status.
    Status,
    /// `/proc/meminfo`.
    Meminfo,
    /// `/proc/zoneinfo`.
    Zoneinfo,
    /// `/proc/buddyinfo`.
    Buddyinfo,
    /// `/proc/slabinfo`, a page at a time: at most [`VIEW_PAGE`] caches
    /// from position `start`, in id order. A page shorter than
    /// [`VIEW_PAGE`] is the last.
    Slabinfo {
        /// Position of the first entry wanted.
        start: u64,
    },
    /// The mempools, paged as [`Op::Slabinfo`] is.
    Mempools {
        /// Position of the first entry wanted.
        start: u64,
    },
    /// The contiguous-memory region.
    Cma,
    /// Per-connection usage.
    Clients,
    /// The DMA buffers held by clients and devices, a page at a time:
    /// at most [`DMA_LIST_PAGE`] from position `start` of the listing
    /// (devices' buffers first, then each connection's in id order). A
    /// page shorter than [`DMA_LIST_PAGE`] is the last.
    DmaBuffers {
        /// Position of the first entry wanted.
        start: u64,
    },
    /// The physical memory map: zones, reservations, CMA, DMA buffers and
    /// what every frame is (see [`crate::memmap`]).
    MemMap,

    /// Allocate `2^order` pages.
    AllocPages {
        /// Block order.
        order: u8,
        /// GFP flags.
        gfp: Gfp,
    },
    /// Free pages from [`Op::AllocPages`].
    FreePages {
        /// The pages' handle.
        handle: Handle,
    },
    /// kmalloc `size` bytes.
    Kmalloc {
        /// Bytes.
        size: u64,
        /// GFP flags.
        gfp: Gfp,
    },
    /// kfree an object from [`Op::Kmalloc`].
    Kfree {
        /// The object's handle.
        handle: Handle,
    },

    /// Create a slab cache.
    CacheCreate(CacheSpec),
    /// Allocate an object from a cache.
    CacheAlloc {
        /// The cache.
        cache: Handle,
        /// GFP flags.
        gfp: Gfp,
    },
    /// Free an object to the cache it came from.
    CacheFree {
        /// The cache.
        cache: Handle,
        /// The object.
        object: Handle,
    },
    /// Return a cache's empty slabs to the page allocator.
    CacheShrink {
        /// The cache.
        cache: Handle,
    },
    /// Destroy a cache; fails with `EBUSY` while objects are live.
    CacheDestroy {
        /// The cache.
        cache: Handle,
    },

    /// Create a mempool with `min_nr` reserved elements.
    PoolCreate {
        /// Backing allocator.
        backing: PoolBacking,
        /// Reserved elements.
        min_nr: u32,
    },
    /// Allocate an element.
    PoolAlloc {
        /// The pool.
        pool: Handle,
        /// GFP flags.
        gfp: Gfp,
    },
    /// Free an element to its pool.
    PoolFree {
        /// The pool.
        pool: Handle,
        /// The element.
        object: Handle,
    },
    /// Destroy a pool; fails with `EBUSY` while elements are out.
    PoolDestroy {
        /// The pool.
        pool: Handle,
    },

    /// Allocate a physically contiguous DMA buffer.
    DmaAlloc {
        /// Bytes.
        len: u64,
        /// Alignment, a power of two (0 = page).
        align: u64,
        /// Address limit.
        mask: DmaMask,
        /// May come from ZONE_MOVABLE, memory plugged at run time (with a
        /// 64-bit mask; never from the contiguous region).
        movable: bool,
    },
    /// Free a DMA buffer.
    DmaFree {
        /// The buffer.
        handle: Handle,
    },
    /// Copy bytes into a buffer.
    DmaWrite {
        /// The buffer.
        handle: Handle,
        /// Byte offset.
        offset: u64,
        /// Bytes to write.
        data: Vec<u8>,
    },
    /// Copy bytes out of a buffer (at most [`MAX_IO`]).
    DmaRead {
        /// The buffer.
        handle: Handle,
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Fill a whole buffer with the pattern of [`crate::fill_pattern`].
    DmaFill {
        /// The buffer.
        handle: Handle,
        /// Pattern seed.
        seed: u64,
    },
    /// FNV-1a 64 of a range of a buffer (`len` 0 = to the end).
    DmaChecksum {
        /// The buffer.
        handle: Handle,
        /// Byte offset.
        offset: u64,
        /// Bytes (0 = to the end).
        len: u64,
    },
    /// Write a whole buffer to the block device at `sector` (512 bytes).
    DmaWriteDisk {
        /// The buffer.
        handle: Handle,
        /// First sector.
        sector: u64,
    },
    /// Read the block device at `sector` into a whole buffer.
    DmaReadDisk {
        /// The buffer.
        handle: Handle,
        /// First sector.
        sector: u64,
    },

    /// Run every invariant checker.
    Check,
    /// Run `ops` random allocator operations inside the guest.
    Stress {
        /// Operations to run.
        ops: u64,
        /// PRNG seed.
        seed: u64,
        /// CPUs to run them on at once, the network loop's among them (0
        /// counts as 1).
        cpus: u32,
    },
    /// Set a fault-injection rule.
    FaultInject {
        /// Which allocations.
        target: FaultTarget,
        /// The rule (probability 0 or times 0 turns it off).
        config: FaultConfig,
    },
    /// Stop the service after replying.
    Shutdown,
    /// Fault-injection settings and counters.
    Faults,
    /// Return every slab cache's empty slabs and cached objects and drain
    /// the per-CPU page lists (`echo 2 > /proc/sys/vm/drop_caches`, plus
    /// `drain_all_pages`); replies [`Reply::Shrunk`].
    DropCaches,
}

impl Op {
    /// Every view a client may read, each as its first request (the DMA
    /// listing's first page): what a fuzzer or a warm-up asks for when it
    /// wants all of them.
    pub const VIEWS: [Op; 10] = [
        Op::Status,
        Op::Meminfo,
        Op::Zoneinfo,
        Op::Buddyinfo,
        Op::Slabinfo { start: 0 },
        Op::Mempools { start: 0 },
        Op::Cma,
        Op::Clients,
        Op::DmaBuffers { start: 0 },
        Op::Faults,
    ];

    /// Whether only the operator may run this: it stops the service, or
    /// affects, or takes the loop from, every client.
    pub fn operator_only(&self) -> bool {
        matches!(
            self,
            Op::Shutdown | Op::FaultInject { .. } | Op::DropCaches | Op::Stress { .. } | Op::Check
        )
    }

    /// The operation's name, as memctl spells its subcommand.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Status => "status",
            Op::Meminfo => "meminfo",
            Op::Zoneinfo => "zoneinfo",
            Op::Buddyinfo => "buddyinfo",
            Op::Slabinfo { .. } => "slabinfo",
            Op::Mempools { .. } => "mempools",
            Op::Cma => "cma",
            Op::Clients => "clients",
            Op::DmaBuffers { .. } => "dma-list",
            Op::MemMap => "map",
            Op::AllocPages { .. } => "alloc-pages",
            Op::FreePages { .. } => "free-pages",
            Op::Kmalloc { .. } => "kmalloc",
            Op::Kfree { .. } => "kfree",
            Op::CacheCreate(_) => "cache-create",
            Op::CacheAlloc { .. } => "cache-alloc",
            Op::CacheFree { .. } => "cache-free",
            Op::CacheShrink { .. } => "cache-shrink",
            Op::CacheDestroy { .. } => "cache-destroy",
            Op::PoolCreate { .. } => "pool-create",
            Op::PoolAlloc { .. } => "pool-alloc",
            Op::PoolFree { .. } => "pool-free",
            Op::PoolDestroy { .. } => "pool-destroy",
            Op::DmaAlloc { .. } => "dma-alloc",
            Op::DmaFree { .. } => "dma-free",
            Op::DmaWrite { .. } => "dma-write",
            Op::DmaRead { .. } => "dma-read",
            Op::DmaFill { .. } => "dma-fill",
            Op::DmaChecksum { .. } => "dma-checksum",
            Op::DmaWriteDisk { .. } => "dma-write-disk",
            Op::DmaReadDisk { .. } => "dma-read-disk",
            Op::Check => "check",
            Op::Stress { .. } => "stress",
            Op::FaultInject { .. } => "fault-inject",
            Op::Shutdown => "shutdown",
            Op::Faults => "faults",
            Op::DropCaches => "drop-caches",
        }
    }
}

/// Accepted handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The server's protocol version.
    pub version: u32,
    /// The connection's id in the per-client view.
    pub conn: u64,
    /// The limits this connection runs under.
    pub quota: Quota,
    /// What the token presented allows.
    pub role: Role,
}

/// What a connection may do, by the token it presented.
///
/// A client token allows allocation work on the connection's own
/// resources and every read-only view. The operator token allows, besides,
/// what affects every client: shutdown, fault injection, dropping caches,
/// stress runs and the invariant check ([`Op::operator_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Allocation work and views.
    Client,
    /// Everything, including operations that affect every client.
    Operator,
}

/// The successful result of one operation.
///
/// Large views are boxed so that a `Reply` stays small (56 bytes): a batch
/// holds thousands of them, and every one is moved several times between
/// running the operation and encoding the reply. The encoding is the same
/// either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done; nothing to return.
    Done,
    /// [`Op::Status`].
    Status(Box<Status>),
    /// [`Op::Meminfo`].
    Meminfo(Box<MemInfo>),
    /// [`Op::Zoneinfo`].
    Zoneinfo(Vec<ZoneInfo>),
    /// [`Op::Buddyinfo`].
    Buddyinfo(Vec<BuddyZone>),
    /// [`Op::Slabinfo`].
    Slabinfo(Vec<SlabInfo>),
    /// [`Op::Mempools`].
    Mempools(Vec<MempoolInfo>),
    /// [`Op::Cma`].
    Cma(Box<CmaInfo>),
    /// [`Op::Clients`].
    Clients(Vec<ClientInfo>),
    /// [`Op::DmaBuffers`].
    DmaBuffers(Vec<DmaBufferInfo>),
    /// [`Op::MemMap`].
    MemMap(Box<crate::memmap::MemMap>),
    /// A page block.
    Pages {
        /// Its handle.
        handle: Handle,
        /// Physical address.
        phys: u64,
        /// Order.
        order: u8,
    },
    /// An object (kmalloc, cache or pool).
    Object {
        /// Its handle.
        handle: Handle,
        /// Its address in the guest.
        addr: u64,
        /// Usable size (`ksize`).
        size: u64,
    },
    /// A created cache or pool.
    Created {
        /// Its handle.
        handle: Handle,
    },
    /// [`Op::CacheShrink`], [`Op::DropCaches`]: pages returned.
    Shrunk {
        /// Pages returned to the page allocator.
        pages: u64,
    },
    /// A DMA buffer.
    Dma(Box<DmaBufferInfo>),
    /// Bytes read.
    Data(Vec<u8>),
    /// A checksum.
    Checksum(u64),
    /// [`Op::Check`].
    Check(CheckReport),
    /// [`Op::Stress`].
    Stress(StressReport),
    /// [`Op::Faults`].
    Faults(Box<FaultStatus>),
    /// [`Op::DmaWriteDisk`] / [`Op::DmaReadDisk`]: what moved and how.
    Transfer(DiskTransfer),
}

/// A disk transfer of a whole DMA buffer, done in place: the device reads or
/// writes the buffer's own pages (no bounce copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DiskTransfer {
    /// Bytes moved.
    pub bytes: u64,
    /// First sector.
    pub sector: u64,
    /// Device requests used (one per at most the driver's largest request).
    pub requests: u64,
    /// Virtqueue descriptors used in all, headers and status bytes included.
    pub descriptors: u64,
    /// Of those, descriptors that point into the buffer.
    pub data_descriptors: u64,
    /// Time the device took, in the guest's clock (nanoseconds).
    pub device_ns: u64,
}

/// One frame from the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The handshake succeeded.
    Hello(HelloAck),
    /// The result of [`Request::Call`].
    Call(Result<Reply, WireError>),
    /// The results of [`Request::Batch`], one per operation run.
    Batch(Vec<Result<Reply, WireError>>),
    /// The request could not be served at all (bad frame, no hello, wrong
    /// token, ...). `closing` says the service closes the connection after
    /// this frame.
    Error {
        /// What went wrong.
        error: WireError,
        /// The connection is being closed.
        closing: bool,
    },
}
