//! memctl: drive and observe memd from the host.
//!
//! Exit codes: 0 success, 1 the service returned an error (errno shown),
//! 2 usage error, 3 connection or protocol failure.
//!
//! Handles belong to the connection that made them and are released when it
//! closes, so a single `memctl kmalloc` allocates, prints and frees on exit.
//! To keep resources across commands, use `memctl session`, which reads
//! commands (same syntax, without `memctl`) from standard input and runs them
//! on one connection. In a session, `$last` stands for the handle the last
//! command created and `$N` for the handle of the N-th command (from 1).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use memd_client::{Client, Error, Options};
use memd_wire::*;
use serde::Serialize;

mod histogram;
mod map;
mod progress;
mod watch;

const EXAMPLES: &str = "\
Examples:
  memctl status                       is it up, how much is free
  memctl meminfo                      /proc/meminfo, in kB
  memctl buddy --histogram            free blocks per order, as bars
  memctl watch                        live view of zones, buddy, slabs, pools, CMA, clients (q quits)
  memctl map --out mem.svg            picture of physical memory (also .png)
  memctl dma-alloc 64M --mask 32      a contiguous buffer below 4 GiB (from CMA)
  memctl stress 1000000               random allocator work inside the guest
  memctl --json zoneinfo | jq .       JSON for scripts
  printf 'kmalloc 4k\\nslabinfo\\n' | memctl session
  memctl completions bash > /etc/bash_completion.d/memctl

The address and token come from --addr/--token, $MEMD_ADDR/$MEMD_TOKEN, or the
.memd/ directory that `cargo xtask run` writes.";

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
struct Cli {
    /// Service address [default: $MEMD_ADDR, .memd/addr, 127.0.0.1:5555]
    #[arg(long, global = true)]
    addr: Option<String>,
    /// Auth token [default: $MEMD_TOKEN, .memd/token]
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the service to become ready
    #[arg(long, global = true, default_value_t = 10)]
    wait: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_gfp(s: &str) -> Result<Gfp, String> {
    Gfp::parse(s).ok_or_else(|| {
        format!("unknown GFP flags {s:?} (KERNEL, ATOMIC, DMA, DMA32, ZERO, NOWARN, NOWAIT)")
    })
}

fn parse_slab_flags(s: &str) -> Result<SlabFlags, String> {
    SlabFlags::parse(s)
        .ok_or_else(|| format!("unknown slab flags {s:?} (HWCACHE_ALIGN, POISON, RED_ZONE)"))
}

fn parse_mask(s: &str) -> Result<DmaMask, String> {
    s.parse::<u32>()
        .ok()
        .and_then(DmaMask::from_bits)
        .ok_or_else(|| "DMA mask must be 24, 32 or 64".to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
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

#[derive(Subcommand, Debug)]
enum Cmd {
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
        #[arg(long, default_value_t = map::DEFAULT_WIDTH)]
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
    },
    /// Configure fault injection (failslab / fail_page_alloc)
    FaultInject {
        /// slab or pages
        target: String,
        /// Percent chance an eligible allocation fails (0 turns it off)
        #[arg(long, default_value_t = 100)]
        probability: u8,
        /// Only every N-th allocation is eligible
        #[arg(long, default_value_t = 1)]
        interval: u32,
        /// Stop after this many failures (-1: no limit)
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        times: i64,
    },
    /// Set fault injection on slab and/or page allocations, then show both
    /// rules; with neither --slab nor --page, just show them
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
    /// Fault-injection rules with their counters (calls seen, failures injected)
    Faults,
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
}

enum Fail {
    Server(WireError),
    Conn(String),
    Usage(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        match e {
            Error::Server(w) => Fail::Server(w),
            e => Fail::Conn(e.to_string()),
        }
    }
}

fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A reply as JSON without the enum wrapper: `{"Buddyinfo": [..]}` prints
/// as `[..]`, `Done` as `{"ok": true}`; replies with fields (Pages,
/// Object, ...) keep them.
fn reply_json(r: &Reply) {
    let v = serde_json::to_value(r).expect("serializable");
    let v = match v {
        serde_json::Value::String(_) => serde_json::json!({ "ok": true }),
        serde_json::Value::Object(m) if m.len() == 1 => m.into_iter().next().expect("one entry").1,
        v => v,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&v).expect("serializable")
    );
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn kb(b: u64) -> u64 {
    b / 1024
}

fn print_meminfo(m: &Meminfo) {
    let rows = [
        ("MemTotal", m.total),
        ("MemFree", m.free),
        ("BuddyFree", m.buddy_free),
        ("PerCpuLists", m.pcp),
        ("Slab", m.slab),
        ("SReclaimable", m.slab_reclaimable),
        ("KmallocLarge", m.kmalloc_large),
        ("PagesAllocated", m.pages_allocated),
        ("MempoolReserve", m.mempool_reserve),
        ("DmaBuddy", m.dma_buddy),
        ("CmaTotal", m.cma_total),
        ("CmaFree", m.cma_free),
        ("Reserved", m.reserved),
        ("FrameTable", m.frame_table),
    ];
    for (k, v) in rows {
        println!("{:<16}{:>10} kB", format!("{k}:"), kb(v));
    }
}

fn print_zoneinfo(zones: &[ZoneInfo]) {
    for z in zones {
        println!("Node {}, zone {:>8}", z.node, z.name);
        println!("  pages free     {}", z.free);
        println!("        min      {}", z.min);
        println!("        low      {}", z.low);
        println!("        high     {}", z.high);
        println!("        spanned  {}", z.spanned);
        println!("        managed  {}", z.managed);
        let lr: Vec<String> = z.lowmem_reserve.iter().map(|v| v.to_string()).collect();
        println!("        protection: ({})", lr.join(", "));
        println!("  nr_free_pages {}", z.free);
        let fb: Vec<String> = z.free_blocks.iter().map(|v| v.to_string()).collect();
        println!("  free_area     {}", fb.join(" "));
        println!("  pagesets");
        println!("    count: {}", z.pcp_count);
        println!("    high:  {}", z.pcp_high);
        println!("    batch: {}", z.pcp_batch);
        println!("  alloc_success {}", z.alloc_success);
        println!("  alloc_fail    {}", z.alloc_fail);
        println!("  atomic_reserve_used {}", z.atomic_reserve_used);
        println!("  fallback      {}", z.fallback);
        println!("  pcp_refill    {}", z.pcp_refill);
        println!("  pcp_drain     {}", z.pcp_drain);
        println!("  start_pfn:    {}", z.start_pfn);
    }
}

fn print_buddyinfo(zones: &[BuddyZone]) {
    for z in zones {
        let counts: String = z.free.iter().map(|n| format!("{n:>7}")).collect();
        println!("Node {}, zone {:>8}{}", z.node, z.zone, counts);
    }
}

fn print_slabinfo(caches: &[SlabInfo]) {
    println!("slabinfo - version: 2.1 (memd)");
    println!("# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>");
    for c in caches {
        println!(
            "{:<17} {:>6} {:>6} {:>6} {:>4} {:>4} : tunables {:>4} {:>4} {:>4} : slabdata {:>6} {:>6} {:>6}",
            c.name, c.active_objs, c.num_objs, c.objsize, c.objperslab, c.pagesperslab, 0, 0, 0, c.active_slabs, c.num_slabs, 0
        );
    }
}

/// Bytes as KiB/MiB/GiB when they divide evenly, else bytes.
fn human_bytes(b: u64) -> String {
    match b {
        0 => "0 B".to_string(),
        b if b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn mib_per_s(bytes: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9)
    }
}

fn print_reply(r: &Reply) {
    match r {
        Reply::Done => println!("ok"),
        Reply::Status(s) => {
            let mut t = table(&["field", "value"]);
            t.add_row(vec!["server".to_string(), s.server.clone()]);
            t.add_row(vec!["protocol".to_string(), s.version.to_string()]);
            t.add_row(vec![
                "uptime".to_string(),
                format!("{:.3} s", s.uptime_ns as f64 / 1e9),
            ]);
            if let Some(busy) = s.busy_ns {
                t.add_row(vec![
                    "busy".to_string(),
                    format!(
                        "{:.3} s ({:.1} % of uptime)",
                        busy as f64 / 1e9,
                        busy as f64 * 100.0 / s.uptime_ns.max(1) as f64
                    ),
                ]);
            }
            if let Some(halted) = s.halted_ns {
                t.add_row(vec![
                    "halted".to_string(),
                    format!(
                        "{:.3} s ({:.1} % of uptime; the rest is polling)",
                        halted as f64 / 1e9,
                        halted as f64 * 100.0 / s.uptime_ns.max(1) as f64
                    ),
                ]);
            }
            t.add_row(vec!["connections".to_string(), s.connections.to_string()]);
            t.add_row(vec!["requests".to_string(), s.requests.to_string()]);
            t.add_row(vec!["page size".to_string(), s.page_size.to_string()]);
            t.add_row(vec!["max order".to_string(), s.max_order.to_string()]);
            t.add_row(vec![
                "memory".to_string(),
                format!(
                    "{} kB total, {} kB free",
                    kb(s.total_bytes),
                    kb(s.free_bytes)
                ),
            ]);
            t.add_row(vec![
                "block device".to_string(),
                if s.block_device { "yes" } else { "no" }.to_string(),
            ]);
            println!("{t}");
        }
        Reply::Meminfo(m) => print_meminfo(m),
        Reply::Zoneinfo(z) => print_zoneinfo(z),
        Reply::Buddyinfo(b) => print_buddyinfo(b),
        Reply::Slabinfo(s) => print_slabinfo(s),
        Reply::Mempools(pools) => {
            let mut t = table(&[
                "id",
                "backing",
                "elem size",
                "min_nr",
                "curr_nr",
                "idle bytes",
                "in use",
                "allocs",
                "from reserve",
                "failures",
            ]);
            for p in pools {
                t.add_row(vec![
                    p.id.to_string(),
                    p.backing.clone(),
                    p.elem_size.to_string(),
                    p.min_nr.to_string(),
                    p.curr_nr.to_string(),
                    p.reserve_bytes.to_string(),
                    p.in_use.to_string(),
                    p.allocs.to_string(),
                    p.reserve_hits.to_string(),
                    p.failures.to_string(),
                ]);
            }
            println!("{t}");
        }
        Reply::Cma(c) if !c.present => {
            println!("no CMA region (boot with memd.dma_reserve=SIZE@ZONE)")
        }
        Reply::Cma(c) => {
            let mut t = table(&[
                "base",
                "zone",
                "total kB",
                "used kB",
                "free kB",
                "largest free kB",
                "buffers",
                "allocs",
                "failures",
            ]);
            t.add_row(vec![
                format!("{:#x}", c.base),
                c.zone.clone(),
                kb(c.total).to_string(),
                kb(c.used).to_string(),
                kb(c.free).to_string(),
                kb(c.largest_free).to_string(),
                c.buffers.to_string(),
                c.allocs.to_string(),
                c.failures.to_string(),
            ]);
            println!("{t}");
        }
        Reply::Clients(cs) => {
            let mut t = table(&[
                "conn", "name", "auth", "handles", "pages", "bytes", "requests", "errors",
            ]);
            for c in cs {
                t.add_row(vec![
                    c.conn.to_string(),
                    c.name.clone(),
                    c.authenticated.to_string(),
                    c.handles.to_string(),
                    c.pages.to_string(),
                    c.bytes.to_string(),
                    c.requests.to_string(),
                    c.errors.to_string(),
                ]);
            }
            println!("{t}");
        }
        Reply::MemMap(m) => print!("{}", map::text(m)),
        Reply::Faults(f) => {
            let mut t = table(&[
                "rule",
                "probability %",
                "interval",
                "times left",
                "calls",
                "injected",
            ]);
            for (name, r) in [("failslab", f.slab), ("fail_page_alloc", f.pages)] {
                t.add_row(vec![
                    name.to_string(),
                    r.probability.to_string(),
                    r.interval.to_string(),
                    if r.times < 0 {
                        "unlimited".to_string()
                    } else {
                        r.times.to_string()
                    },
                    r.calls.to_string(),
                    r.injected.to_string(),
                ]);
            }
            println!("{t}");
        }
        Reply::DmaBuffers(bs) => {
            let mut t = table(&[
                "owner", "handle", "size", "bytes", "phys", "zone", "mask", "source",
            ]);
            for b in bs {
                let owner = match &b.owner {
                    DmaOwner::Client { name } => format!("client {} ({name})", b.conn),
                    DmaOwner::DeviceQueue { device } => format!("device {device}"),
                };
                t.add_row(vec![
                    owner,
                    if b.handle == 0 {
                        "-".to_string()
                    } else {
                        b.handle.to_string()
                    },
                    human_bytes(b.len),
                    b.len.to_string(),
                    format!("{:#x}", b.phys),
                    b.zone.clone(),
                    b.mask.bits().to_string(),
                    format!("{:?}", b.source),
                ]);
            }
            println!("{t}");
        }
        Reply::Pages {
            handle,
            phys,
            order,
        } => println!(
            "handle {handle}: {} page(s) at phys {phys:#x} (order {order})",
            1u64 << order
        ),
        Reply::Object { handle, addr, size } => {
            println!("handle {handle}: {size} bytes at {addr:#x}")
        }
        Reply::Created { handle } => println!("handle {handle}"),
        Reply::Shrunk { pages } => println!("{pages} page(s) returned"),
        Reply::Dma(b) => println!(
            "handle {}: {} bytes ({}) at phys {:#x}-{:#x}, zone {}, from {:?}, mask {} bits",
            b.handle,
            b.len,
            human_bytes(b.len),
            b.phys,
            b.phys + b.len,
            b.zone,
            b.source,
            b.mask.bits()
        ),
        Reply::Transfer(t) => println!(
            "{} bytes ({}) at sector {} moved in place: {} request(s), {} descriptor(s) ({} on the buffer), {:.1} ms, {:.1} MiB/s",
            t.bytes,
            human_bytes(t.bytes),
            t.sector,
            t.requests,
            t.descriptors,
            t.data_descriptors,
            t.device_ns as f64 / 1e6,
            mib_per_s(t.bytes, t.device_ns)
        ),
        Reply::Data(d) => {
            for (i, chunk) in d.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let asc: String = chunk
                    .iter()
                    .map(|&b| {
                        if b.is_ascii_graphic() || b == b' ' {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                println!("{:08x}  {:<48} {}", i * 16, hex.join(" "), asc);
            }
        }
        Reply::Checksum(c) => println!("{c:016x}"),
        Reply::Check(r) if r.ok => println!("all invariants hold"),
        Reply::Check(r) => {
            for v in &r.violations {
                println!("VIOLATION: {v}");
            }
        }
        Reply::Stress(s) => println!(
            "{} ops in {:.3} ms: {} ops/s, {} failed allocations, invariants {}",
            s.ops,
            s.elapsed_ns as f64 / 1e6,
            s.ops_per_sec,
            s.failed_allocs,
            if s.check_ok { "hold" } else { "VIOLATED" }
        ),
    }
}

fn to_op(cmd: Cmd) -> Result<Op, Fail> {
    Ok(match cmd {
        Cmd::Status => Op::Status,
        Cmd::Meminfo => Op::Meminfo,
        Cmd::Zoneinfo => Op::Zoneinfo,
        Cmd::Buddyinfo => Op::Buddyinfo,
        Cmd::Slabinfo => Op::Slabinfo,
        Cmd::Mempools => Op::Mempools,
        Cmd::Cma => Op::Cma,
        Cmd::Clients => Op::Clients,
        Cmd::DmaList => Op::DmaBuffers,
        Cmd::Map { .. } => Op::MemMap,
        Cmd::Buddy { .. } => Op::Buddyinfo,
        Cmd::AllocPages { order, gfp } => Op::AllocPages { order, gfp },
        Cmd::FreePages { handle } => Op::FreePages { handle },
        Cmd::Kmalloc { size, gfp } => Op::Kmalloc { size, gfp },
        Cmd::Kfree { handle } => Op::Kfree { handle },
        Cmd::CacheCreate {
            name,
            size,
            align,
            flags,
            ctor_fill,
        } => Op::CacheCreate {
            name,
            size: u32::try_from(size).map_err(|_| Fail::Usage("object size too large".into()))?,
            align,
            flags,
            ctor: ctor_fill.map_or(Ctor::None, Ctor::Fill),
        },
        Cmd::CacheAlloc { cache, gfp } => Op::CacheAlloc { cache, gfp },
        Cmd::CacheFree { cache, object } => Op::CacheFree { cache, object },
        Cmd::CacheShrink { cache } => Op::CacheShrink { cache },
        Cmd::CacheDestroy { cache } => Op::CacheDestroy { cache },
        Cmd::PoolCreate { backing, min_nr } => {
            let bad = || {
                Fail::Usage(format!(
                    "backing {backing:?}: use cache:HANDLE, kmalloc:SIZE or pages:ORDER"
                ))
            };
            let (kind, v) = backing.split_once(':').ok_or_else(bad)?;
            let backing = match kind {
                "cache" => PoolBacking::Cache(v.parse().map_err(|_| bad())?),
                "kmalloc" => PoolBacking::Kmalloc {
                    size: parse_size(v)
                        .ok()
                        .and_then(|s| u32::try_from(s).ok())
                        .ok_or_else(bad)?,
                },
                "pages" => PoolBacking::Pages {
                    order: v.parse().map_err(|_| bad())?,
                },
                _ => return Err(bad()),
            };
            Op::PoolCreate { backing, min_nr }
        }
        Cmd::PoolAlloc { pool, gfp } => Op::PoolAlloc { pool, gfp },
        Cmd::PoolFree { pool, object } => Op::PoolFree { pool, object },
        Cmd::PoolDestroy { pool } => Op::PoolDestroy { pool },
        Cmd::DmaAlloc { len, align, mask } => Op::DmaAlloc { len, align, mask },
        Cmd::DmaFree { handle } => Op::DmaFree { handle },
        Cmd::DmaWrite {
            handle,
            offset,
            data,
        } => Op::DmaWrite {
            handle,
            offset,
            data: data.into_bytes(),
        },
        Cmd::DmaRead {
            handle,
            offset,
            len,
        } => Op::DmaRead {
            handle,
            offset,
            len,
        },
        Cmd::DmaFill { handle, seed } => Op::DmaFill { handle, seed },
        Cmd::DmaChecksum {
            handle,
            offset,
            len,
        } => Op::DmaChecksum {
            handle,
            offset,
            len,
        },
        Cmd::DmaWriteDisk { handle, sector } => Op::DmaWriteDisk { handle, sector },
        Cmd::DmaReadDisk { handle, sector } => Op::DmaReadDisk { handle, sector },
        Cmd::Check => Op::Check,
        Cmd::DropCaches => Op::DropCaches,
        Cmd::Stress { ops, seed } => Op::Stress { ops, seed },
        Cmd::FaultInject {
            target,
            probability,
            interval,
            times,
        } => Op::FaultInject {
            target: match target.as_str() {
                "slab" | "failslab" => FaultTarget::Slab,
                "pages" | "page" | "fail_page_alloc" => FaultTarget::Pages,
                t => {
                    return Err(Fail::Usage(format!(
                        "fault target {t:?}: use slab or pages"
                    )))
                }
            },
            config: FaultConfig {
                probability,
                interval,
                times,
            },
        },
        Cmd::Shutdown => Op::Shutdown,
        Cmd::Faults | Cmd::Fault { .. } => Op::Faults,
        Cmd::Batch { .. } | Cmd::Session | Cmd::Watch { .. } | Cmd::Completions { .. } => {
            unreachable!("handled by the caller")
        }
    })
}

/// Operations per batch frame: small enough that the replies fit a frame.
const BATCH_CHUNK: u32 = memd_wire::MAX_BATCH_OPS as u32;

fn run_batch(c: &mut Client, count: u32, size: u64, as_json: bool) -> Result<(), Fail> {
    let t0 = std::time::Instant::now();
    let pb = progress::bar(2 * count as u64, "kmalloc + kfree", as_json);
    let mut allocs = Vec::with_capacity(count as usize);
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH_CHUNK);
        allocs.extend(
            c.batch(
                (0..n)
                    .map(|_| Op::Kmalloc {
                        size,
                        gfp: Gfp::KERNEL,
                    })
                    .collect(),
                false,
            )?,
        );
        pb.inc(n as u64);
        left -= n;
    }
    let handles: Vec<Handle> = allocs
        .iter()
        .filter_map(|r| match r {
            Ok(Reply::Object { handle, .. }) => Some(*handle),
            _ => None,
        })
        .collect();
    let failed = allocs.len() - handles.len();
    pb.inc(failed as u64);
    let mut frees = Vec::with_capacity(handles.len());
    for chunk in handles.chunks(BATCH_CHUNK as usize) {
        frees.extend(c.batch(
            chunk.iter().map(|&handle| Op::Kfree { handle }).collect(),
            false,
        )?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let ops = allocs.len() + frees.len();
    #[derive(Serialize)]
    struct Out {
        ops: usize,
        failed_allocs: usize,
        seconds: f64,
        ops_per_sec: f64,
    }
    let out = Out {
        ops,
        failed_allocs: failed,
        seconds: secs,
        ops_per_sec: ops as f64 / secs,
    };
    if as_json {
        json(&out);
    } else {
        println!(
            "{} ops ({} failed allocations) in {:.3} ms: {:.0} ops/s",
            out.ops,
            out.failed_allocs,
            secs * 1e3,
            out.ops_per_sec
        );
    }
    Ok(())
}

/// Writes the map picture: PNG for a `.png` path, SVG otherwise.
fn write_map(m: &MemMap, path: &std::path::Path, width: u32) -> Result<(), Fail> {
    let svg = map::svg(m, width);
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let bytes = if is_png {
        map::png(&svg).map_err(Fail::Usage)?
    } else {
        svg.into_bytes()
    };
    std::fs::write(path, bytes).map_err(|e| Fail::Usage(format!("{}: {e}", path.display())))
}

fn completions(shell: clap_complete::Shell) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "memctl", &mut std::io::stdout());
}

/// Runs one command; returns the handle it created, if any.
fn run(c: &mut Client, cmd: Cmd, as_json: bool) -> Result<Option<Handle>, Fail> {
    match cmd {
        Cmd::Batch { count, size } => run_batch(c, count, size, as_json).map(|()| None),
        Cmd::Fault {
            slab,
            page,
            probability,
            interval,
            times,
        } if slab || page => {
            let Some(probability) = probability else {
                return Err(Fail::Usage(
                    "fault --slab/--page needs --probability".into(),
                ));
            };
            let config = FaultConfig {
                probability,
                interval,
                times,
            };
            let mut ops: Vec<Op> = [(slab, FaultTarget::Slab), (page, FaultTarget::Pages)]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, target)| Op::FaultInject { target, config })
                .collect();
            ops.push(Op::Faults);
            let replies = c.batch(ops, true)?;
            match replies.last() {
                Some(Ok(r @ Reply::Faults(_))) if as_json => reply_json(r),
                Some(Ok(r @ Reply::Faults(_))) => print_reply(r),
                Some(Err(e)) => return Err(Fail::Server(e.clone())),
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            }
            Ok(None)
        }
        Cmd::Session => Err(Fail::Usage("session cannot be nested".into())),
        Cmd::Watch {
            interval_ms,
            iterations,
        } => watch::run(c, Duration::from_millis(interval_ms.max(50)), iterations)
            .map(|()| None)
            .map_err(|e| Fail::Conn(format!("terminal: {e}"))),
        Cmd::Completions { shell } => {
            completions(shell);
            Ok(None)
        }
        Cmd::Map {
            out: Some(path),
            width,
        } => {
            let m = match c.call(Op::MemMap)? {
                Reply::MemMap(m) => m,
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            };
            write_map(&m, &path, width)?;
            if as_json {
                json(
                    &serde_json::json!({ "out": path, "runs": m.runs.len(), "granule": m.granule }),
                );
            } else {
                println!(
                    "wrote {} ({} zones, {} reservations, {} runs{})",
                    path.display(),
                    m.zones.len(),
                    m.reservations.len(),
                    m.runs.len(),
                    if m.granule > 1 {
                        format!(", cells of {} pages", m.granule)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(None)
        }
        Cmd::Buddy {
            histogram: true,
            width,
        } if !as_json => {
            let replies = c.batch(vec![Op::Status, Op::Buddyinfo], true)?;
            match &replies[..] {
                [Ok(Reply::Status(s)), Ok(Reply::Buddyinfo(zones))] => {
                    print!("{}", histogram::render(zones, s.page_size, width))
                }
                [.., Err(e)] => return Err(Fail::Server(e.clone())),
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            }
            Ok(None)
        }
        cmd => {
            let op = to_op(cmd)?;
            let reply = if progress::is_long(&op) {
                let pb = progress::spinner(format!("memd: {}", op.name()), as_json);
                let r = c.call(op);
                pb.finish_and_clear();
                r?
            } else {
                c.call(op)?
            };
            if as_json {
                reply_json(&reply);
            } else {
                print_reply(&reply);
            }
            Ok(match &reply {
                Reply::Pages { handle, .. }
                | Reply::Object { handle, .. }
                | Reply::Created { handle } => Some(*handle),
                Reply::Dma(b) => Some(b.handle),
                _ => None,
            })
        }
    }
}

/// Replaces `$last` and `$N` with handles from earlier commands.
fn substitute(word: &str, handles: &[Option<Handle>]) -> Result<String, String> {
    // `cache:$3` (a pool's backing) names a handle after a prefix.
    if let Some((prefix, var)) = word.split_once(":$") {
        return Ok(format!(
            "{prefix}:{}",
            substitute(&format!("${var}"), handles)?
        ));
    }
    let Some(var) = word.strip_prefix('$') else {
        return Ok(word.to_string());
    };
    let h = if var == "last" {
        handles.iter().rev().flatten().next().copied()
    } else {
        let n: usize = var
            .parse()
            .map_err(|_| format!("unknown variable {word}"))?;
        n.checked_sub(1)
            .and_then(|i| handles.get(i).copied().flatten())
    };
    h.map(|h| h.to_string())
        .ok_or_else(|| format!("{word}: no handle there"))
}

fn session(c: &mut Client, as_json: bool) -> Result<(), Fail> {
    let mut last = Ok(());
    let mut handles: Vec<Option<Handle>> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Fail::Usage(e.to_string()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Result<Vec<String>, String> = line
            .split_whitespace()
            .map(|w| substitute(w, &handles))
            .collect();
        let words = match words {
            Ok(w) => w,
            Err(e) => {
                eprintln!("memctl: {line}: {e}");
                handles.push(None);
                last = Err(Fail::Usage(e));
                continue;
            }
        };
        let args = std::iter::once("memctl".to_string()).chain(words);
        let cmd = match Cli::try_parse_from(args) {
            Ok(cli) => cli.cmd,
            Err(e) => {
                eprintln!("{e}");
                handles.push(None);
                last = Err(Fail::Usage(format!("bad command {line:?}")));
                continue;
            }
        };
        match run(c, cmd, as_json) {
            Ok(h) => handles.push(h),
            Err(Fail::Server(e)) => {
                eprintln!("memctl: {line}: {e}");
                handles.push(None);
                last = Err(Fail::Server(e));
            }
            Err(Fail::Conn(e)) => return Err(Fail::Conn(e)),
            Err(e) => {
                handles.push(None);
                last = Err(e);
            }
        }
    }
    last
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        completions(shell);
        return ExitCode::SUCCESS;
    }
    let mut opts = match Options::discover(cli.addr.as_deref(), cli.token.as_deref()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("memctl: {e}");
            return ExitCode::from(2);
        }
    };
    opts.client = "memctl".into();
    opts.ready_timeout = std::time::Duration::from_secs(cli.wait);
    let result = Client::connect(&opts)
        .map_err(Fail::from)
        .and_then(|mut c| match cli.cmd {
            Cmd::Session => session(&mut c, cli.json),
            cmd => run(&mut c, cmd, cli.json).map(|_| ()),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Server(e)) => {
            if cli.json {
                json(&e);
            }
            eprintln!("memctl: {} ({}): {}", e.code_name(), e.code, e.message);
            ExitCode::from(1)
        }
        Err(Fail::Usage(e)) => {
            eprintln!("memctl: {e}");
            ExitCode::from(2)
        }
        Err(Fail::Conn(e)) => {
            eprintln!("memctl: {e}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("12q").is_err());
    }

    #[test]
    fn every_command_parses() {
        for line in [
            "status",
            "meminfo",
            "zoneinfo",
            "buddyinfo",
            "slabinfo",
            "mempools",
            "cma",
            "clients",
            "dma-list",
            "map",
            "map --out m.svg --width 800",
            "buddy --histogram",
            "watch --interval-ms 200 --iterations 3",
            "completions zsh",
            "alloc-pages 3 --gfp KERNEL|ZERO",
            "free-pages 1",
            "kmalloc 4k",
            "kfree 2",
            "cache-create foo 96 --flags POISON --ctor-fill 90",
            "cache-alloc 3",
            "cache-free 3 4",
            "cache-shrink 3",
            "cache-destroy 3",
            "pool-create cache:3 4",
            "pool-alloc 5 --gfp ATOMIC",
            "pool-free 5 6",
            "pool-destroy 5",
            "dma-alloc 64M --align 1M --mask 32",
            "dma-free 7",
            "dma-write 7 0 hello",
            "dma-read 7 0 5",
            "dma-fill 7 42",
            "dma-checksum 7",
            "dma-write-disk 7 0",
            "dma-read-disk 7 0",
            "check",
            "stress 1000",
            "fault-inject slab --times -1",
            "fault --slab --page --probability 5 --interval 2 --times 10",
            "fault",
            "faults",
            "batch 100 --size 32",
            "session",
            "shutdown",
        ] {
            let args = std::iter::once("memctl").chain(line.split_whitespace());
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
            if !matches!(
                cli.cmd,
                Cmd::Batch { .. } | Cmd::Session | Cmd::Watch { .. } | Cmd::Completions { .. }
            ) {
                to_op(cli.cmd).unwrap_or_else(|_| panic!("{line}"));
            }
        }
        assert!(Cli::try_parse_from(["memctl", "alloc-pages", "1", "--gfp", "BOGUS"]).is_err());
        assert!(Cli::try_parse_from(["memctl", "dma-alloc", "4k", "--mask", "31"]).is_err());
    }

    #[test]
    fn pool_backing_parses() {
        let op = |s: &str| {
            to_op(Cmd::PoolCreate {
                backing: s.into(),
                min_nr: 2,
            })
        };
        assert!(matches!(
            op("pages:2"),
            Ok(Op::PoolCreate {
                backing: PoolBacking::Pages { order: 2 },
                ..
            })
        ));
        assert!(matches!(
            op("kmalloc:1k"),
            Ok(Op::PoolCreate {
                backing: PoolBacking::Kmalloc { size: 1024 },
                ..
            })
        ));
        assert!(matches!(op("nonsense"), Err(Fail::Usage(_))));
    }
}
