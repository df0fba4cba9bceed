//! The command line: every subcommand, its options and its help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use memd_wire::*;

const EXAMPLES: &str = "\
Examples:
  memctl status                       is it up, how much is free
  memctl meminfo                      /proc/meminfo, in kB
  memctl buddy --histogram            free blocks per order, as bars
  memctl watch                        live view of zones, buddy, slabs, pools, CMA, clients (q quits)
  memctl map --out mem.svg            picture of physical memory (also .png)
  memctl dma-alloc 64M --mask 32      a contiguous buffer below 4 GiB (from CMA)
  memctl stress 1000000               random allocator work inside the guest
  memctl hotplug 2G                   plug 2 GiB into ZONE_MOVABLE (xtask run --machine q35 --hotplug 4G)
  memctl --json zoneinfo | jq .       JSON for scripts
  printf 'kmalloc 4k\\nslabinfo\\n' | memctl session
  memctl completions bash > /etc/bash_completion.d/memctl

The address and token come from --addr/--token, $MEMD_ADDR/$MEMD_TOKEN, or the
.memd/ directory that `cargo xtask run` writes. Commands only the operator may
run (shutdown, fault with a rule, drop-caches, stress, check) and sessions
take the operator token first: $MEMD_OPERATOR_TOKEN, then $MEMD_TOKEN, then
.memd/operator-token, then .memd/token.";

const MAP_EXAMPLES: &str = "\
Examples:
  memctl map                          zones, reservations, CMA and what every page is, as text
  memctl map --out mem.svg            the same as a picture (open it in a browser)
  memctl map --out mem.png --width 1600
  memctl --json map                   the raw map (runs of frame states)";

const WATCH_EXAMPLES: &str = "\
Examples:
  memctl watch                        refresh every second until q
  memctl watch --interval-ms 250      faster
  memctl watch --iterations 10        stop by itself after 10 refreshes";

const BUDDY_EXAMPLES: &str = "\
Examples:
  memctl buddy                        /proc/buddyinfo
  memctl buddy --histogram            bars: free memory held at each order, per zone";

#[derive(Parser, Debug)]
#[command(
    name = "memctl",
    version,
    about = "Drive and observe memd, the unikernel memory service",
    after_help = EXAMPLES
)]
pub(crate) struct Cli {
    /// Service address [default: $MEMD_ADDR, .memd/addr, 127.0.0.1:5555]
    #[arg(long, global = true)]
    pub(crate) addr: Option<String>,
    /// Auth token, for every command [default: $MEMD_TOKEN, .memd/token;
    /// operator commands and sessions: $MEMD_OPERATOR_TOKEN, $MEMD_TOKEN,
    /// .memd/operator-token, .memd/token]
    #[arg(long, global = true)]
    pub(crate) token: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Seconds to wait for the service to become ready
    #[arg(long, global = true, default_value_t = 10)]
    pub(crate) wait: u64,
    /// Run a read-only view (status, meminfo, watch, or any other view)
    /// across every memd of a fleet file (`cargo xtask libvirt start` keeps
    /// .memd/fleet.json); --wait is how long the view waits for them all
    #[arg(long, global = true, conflicts_with_all = ["addr", "token"])]
    pub(crate) fleet: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

pub(crate) fn parse_gfp(s: &str) -> Result<Gfp, String> {
    Gfp::parse(s).ok_or_else(|| {
        format!("unknown GFP flags {s:?} (KERNEL, ATOMIC, DMA, DMA32, ZERO, NOWARN, NOWAIT)")
    })
}

pub(crate) fn parse_slab_flags(s: &str) -> Result<SlabFlags, String> {
    SlabFlags::parse(s)
        .ok_or_else(|| format!("unknown slab flags {s:?} (HWCACHE_ALIGN, POISON, RED_ZONE)"))
}

pub(crate) fn parse_mask(s: &str) -> Result<DmaMask, String> {
    s.parse::<u32>()
        .ok()
        .and_then(DmaMask::from_bits)
        .ok_or_else(|| "DMA mask must be 24, 32 or 64".to_string())
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x") {
        return u64::from_str_radix(h, 16).map_err(|e| e.to_string());
    }
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_lowercase().as_str() {
                "k" | "kb" | "kib" => 1 << 10,
                "m" | "mb" | "mib" => 1 << 20,
                "g" | "gb" | "gib" => 1 << 30,
                "b" => 1,
                u => return Err(format!("unknown unit {u:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|e: std::num::ParseIntError| e.to_string())?;
    n.checked_mul(mult)
        .ok_or_else(|| "size overflows".to_string())
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum Cmd {
    /// Service status
    Status,
    /// /proc/meminfo
    Meminfo,
    /// /proc/zoneinfo
    Zoneinfo,
    /// /proc/buddyinfo
    Buddyinfo,
    /// /proc/slabinfo
    Slabinfo,
    /// Mempools and their idle reserves
    Mempools,
    /// The contiguous-memory (CMA) region
    Cma,
    /// Per-client usage
    Clients,
    /// Every DMA buffer: owner, size, address, zone
    DmaList,
    /// The physical memory map: as text, or as a picture with --out
    #[command(after_help = MAP_EXAMPLES)]
    Map {
        /// Write a picture instead: FILE.svg or FILE.png
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Picture width in pixels
        #[arg(long, default_value_t = crate::map::DEFAULT_WIDTH)]
        width: u32,
    },
    /// Buddy free lists per zone and order
    #[command(after_help = BUDDY_EXAMPLES)]
    Buddy {
        /// Draw bars of the free memory held at each order
        #[arg(long)]
        histogram: bool,
        /// Longest bar, in terminal cells
        #[arg(long, default_value_t = 40)]
        width: usize,
    },
    /// Live full-screen view: zones, buddy, slabs, mempools, CMA, clients
    #[command(after_help = WATCH_EXAMPLES)]
    Watch {
        /// Refresh period
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many refreshes (default: until q)
        #[arg(long)]
        iterations: Option<u64>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Allocate 2^order pages
    AllocPages {
        order: u8,
        #[arg(long, default_value = "KERNEL", value_parser = parse_gfp)]
        gfp: Gfp,
    },
    /// Free pages (by handle, within a session)
    FreePages { handle: Handle },
    /// kmalloc SIZE bytes (e.g. 100, 4k)
    Kmalloc {
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value = "KERNEL", value_parser = parse_gfp)]
        gfp: Gfp,
    },
    /// kfree an object
    Kfree { handle: Handle },
    /// Create a slab cache
    CacheCreate {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 0)]
        align: u32,
        /// SLAB flags: HWCACHE_ALIGN|POISON|RED_ZONE
        #[arg(long, default_value = "NONE", value_parser = parse_slab_flags)]
        flags: SlabFlags,
        /// Constructor: fill each object with this byte when its slab is made
        #[arg(long)]
        ctor_fill: Option<u8>,
    },
    /// Allocate an object from a cache
    CacheAlloc {
        cache: Handle,
        #[arg(long, default_value = "KERNEL", value_parser = parse_gfp)]
        gfp: Gfp,
    },
    /// Free an object to its cache
    CacheFree { cache: Handle, object: Handle },
    /// Return a cache's empty slabs
    CacheShrink { cache: Handle },
    /// Destroy a cache (fails while objects are live)
    CacheDestroy { cache: Handle },
    /// Shrink every slab cache and drain the per-CPU page lists, like
    /// `echo 2 > /proc/sys/vm/drop_caches`
    DropCaches,
    /// Create a mempool: backing is cache:HANDLE, kmalloc:SIZE or pages:ORDER
    PoolCreate { backing: String, min_nr: u32 },
    /// Allocate from a mempool
    PoolAlloc {
        pool: Handle,
        #[arg(long, default_value = "KERNEL", value_parser = parse_gfp)]
        gfp: Gfp,
    },
    /// Free to a mempool
    PoolFree { pool: Handle, object: Handle },
    /// Destroy a mempool
    PoolDestroy { pool: Handle },
    /// Allocate a physically contiguous DMA buffer
    DmaAlloc {
        #[arg(value_parser = parse_size)]
        len: u64,
        #[arg(long, default_value = "0", value_parser = parse_size)]
        align: u64,
        /// Address limit in bits: 24, 32 or 64
        #[arg(long, default_value = "64", value_parser = parse_mask)]
        mask: DmaMask,
        /// May come from ZONE_MOVABLE, memory plugged at run time
        /// (`memctl hotplug`), which is unplugged once the buffer is freed
        #[arg(long)]
        movable: bool,
    },
    /// Free a DMA buffer
    DmaFree { handle: Handle },
    /// Write a string into a DMA buffer
    DmaWrite {
        handle: Handle,
        offset: u64,
        data: String,
    },
    /// Read bytes from a DMA buffer (hex dump)
    DmaRead {
        handle: Handle,
        offset: u64,
        len: u32,
    },
    /// Fill a DMA buffer with a seeded pattern
    DmaFill { handle: Handle, seed: u64 },
    /// FNV-1a 64 checksum of a buffer range (len 0: to the end)
    DmaChecksum {
        handle: Handle,
        #[arg(default_value_t = 0)]
        offset: u64,
        #[arg(default_value_t = 0)]
        len: u64,
    },
    /// Write a whole DMA buffer to the disk at SECTOR
    DmaWriteDisk { handle: Handle, sector: u64 },
    /// Read the disk at SECTOR into a whole DMA buffer
    DmaReadDisk { handle: Handle, sector: u64 },
    /// Run every invariant checker
    Check,
    /// Run N random allocator operations inside the guest
    Stress {
        #[arg(default_value_t = 1_000_000)]
        ops: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// CPUs to run on at once (the network loop's among them; `memctl
        /// status` lists them).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
    },
    /// Fault injection (failslab / fail_page_alloc): with --slab and/or
    /// --page, set those rules; then show both with their counters (calls
    /// seen, failures injected)
    Fault {
        /// The failslab rule (slab and kmalloc allocations)
        #[arg(long)]
        slab: bool,
        /// The fail_page_alloc rule (page allocations)
        #[arg(long, alias = "pages")]
        page: bool,
        /// Percent chance an eligible allocation fails (0 turns it off)
        #[arg(long)]
        probability: Option<u8>,
        /// Only every N-th allocation is eligible
        #[arg(long, default_value_t = 1)]
        interval: u32,
        /// Stop after this many failures (-1: no limit)
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        times: i64,
    },
    /// Allocate COUNT objects of SIZE and free them, in batch frames of up
    /// to 4096 operations (memd-wire's MAX_BATCH_OPS)
    Batch {
        #[arg(default_value_t = 10_000)]
        count: u32,
        #[arg(long, default_value = "64", value_parser = parse_size)]
        size: u64,
    },
    /// Run commands from standard input on one connection
    Session,
    /// Stop the service
    Shutdown,
    /// The balloon: the guest's size as the host sees it, what memd holds
    /// in the balloon and has reported; with SIZE, set the guest's target
    /// size first (QEMU's QMP, like `virsh setmem`)
    Balloon {
        /// Target guest memory (e.g. 1G); omitted: just show
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
        /// QEMU's QMP socket [default: .memd/qmp.sock]
        #[arg(long)]
        qmp: Option<PathBuf>,
    },
    /// Memory plugged at run time (virtio-mem, ZONE_MOVABLE): region,
    /// block size, requested, plugged and in-use bytes; with SIZE, set the
    /// requested size first (QEMU's QMP) and wait for memd to follow
    Hotplug {
        /// Memory to plug (e.g. 2G, 0 to unplug all); omitted: just show
        #[arg(value_parser = parse_size)]
        size: Option<u64>,
        /// QEMU's QMP socket [default: .memd/qmp.sock]
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// Seconds to wait for memd to reach SIZE
        #[arg(long = "for", default_value = "10")]
        for_secs: u64,
    },
}
