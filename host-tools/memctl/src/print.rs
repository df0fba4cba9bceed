//! Replies for people: the Linux formats kernel engineers know
//! (`/proc/meminfo`, `zoneinfo`, `buddyinfo`, `slabinfo`) and tables for
//! the rest; or JSON with `--json`.

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use memd_wire::*;
use serde::Serialize;

pub(crate) fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A reply as JSON without the enum wrapper: `{"Buddyinfo": [..]}` prints
/// as `[..]`, `Done` as `{"ok": true}`; replies with fields (Pages,
/// Object, ...) keep them.
pub(crate) fn reply_json(r: &Reply) {
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

pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

pub(crate) fn kb(b: u64) -> u64 {
    b / 1024
}

fn print_meminfo(m: &MemInfo) {
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
        ("VmallocTotal", m.vmalloc_total),
        ("VmallocUsed", m.vmalloc_used),
        ("VmallocChunk", m.vmalloc_chunk),
        ("Uninitialised", m.deferred),
        ("Reported", m.reported),
        ("Balloon", m.balloon),
    ];
    for (k, v) in rows {
        println!("{:<16}{:>10} kB", format!("{k}:"), kb(v));
    }
}

fn print_zoneinfo(zones: &[ZoneInfo]) {
    for z in zones {
        println!("Node {}, zone {:>8}", z.node, z.name);
        println!("  pages free     {}", z.free);
        println!("        min      {}", z.watermark.min);
        println!("        low      {}", z.watermark.low);
        println!("        high     {}", z.watermark.high);
        println!("        spanned  {}", z.spanned);
        println!("        managed  {}", z.managed);
        if z.deferred > 0 {
            println!("        uninitialised {}", z.deferred);
        }
        if z.balloon > 0 {
            println!("        balloon  {}", z.balloon);
        }
        let lr: Vec<String> = z.lowmem_reserve.iter().map(|v| v.to_string()).collect();
        println!("        protection: ({})", lr.join(", "));
        println!("  nr_free_pages {}", z.free);
        let fb: Vec<String> = z.free_blocks.iter().map(|v| v.to_string()).collect();
        println!("  free_area     {}", fb.join(" "));
        println!("  pagesets");
        println!("    count: {}", z.pcp_count);
        println!("    high:  {}", z.pcp_high);
        println!("    batch: {}", z.pcp_batch);
        for p in &z.cpu_pagesets {
            println!("    cpu: {}", p.cpu);
            println!("              count: {}", p.count);
            println!("              high:  {}", p.high);
            println!("              batch: {}", p.batch);
        }
        println!("  alloc_success {}", z.counters.alloc_success);
        println!("  alloc_fail    {}", z.counters.alloc_fail);
        println!("  atomic_reserve_used {}", z.counters.atomic_reserve_used);
        println!("  fallback      {}", z.counters.fallback);
        println!("  pcp_refill    {}", z.counters.pcp_refill);
        println!("  pcp_drain     {}", z.counters.pcp_drain);
        println!("  start_pfn:    {}", z.start_pfn);
    }
}

fn print_buddyinfo(zones: &[BuddyZone]) {
    for z in zones {
        let counts: String = z.free.iter().map(|n| format!("{n:>7}")).collect();
        println!("Node {}, zone {:>8}{}", z.node, z.zone, counts);
    }
}

/// /proc/slabinfo as Linux SLAB prints it with statistics on: the
/// `cpustat` columns (per-CPU arrays' hits and misses, all CPUs summed) on
/// the caches that have arrays in front of them.
fn print_slabinfo(caches: &[SlabInfo]) {
    println!("slabinfo - version: 2.1 (memd)");
    println!("# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail> : cpustat <allochit> <allocmiss> <freehit> <freemiss>");
    for c in caches {
        let cpustat = c.cpustat.map_or_else(String::new, |s| {
            format!(
                " : cpustat {:>8} {:>6} {:>8} {:>6}",
                s.allochit, s.allocmiss, s.freehit, s.freemiss
            )
        });
        println!(
            "{:<17} {:>6} {:>6} {:>6} {:>4} {:>4} : tunables {:>4} {:>4} {:>4} : slabdata {:>6} {:>6} {:>6}{cpustat}",
            c.name, c.active_objs, c.num_objs, c.objsize, c.objperslab, c.pagesperslab, 0, 0, 0, c.active_slabs, c.num_slabs, 0
        );
    }
}

/// A per-CPU cache's hits and misses in a few words.
fn cpustat(s: &memd_wire::CpuStat) -> String {
    format!(
        "alloc {} hit / {} miss, free {} hit / {} miss",
        s.allochit, s.allocmiss, s.freehit, s.freemiss
    )
}

/// Bytes as KiB/MiB/GiB when they divide evenly, else bytes.
pub(crate) fn human_bytes(b: u64) -> String {
    match b {
        0 => "0 B".to_string(),
        b if b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub(crate) fn mib_per_s(bytes: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9)
    }
}

/// Nanoseconds as milliseconds to about two significant digits: 0.041 ms,
/// 0.41 ms, 3.2 ms, 12 ms.
pub(crate) fn ms(ns: u64) -> String {
    let v = ns as f64 / 1e6;
    match v {
        v if v == 0.0 || v >= 10.0 => format!("{v:.0} ms"),
        v if v >= 1.0 => format!("{v:.1} ms"),
        v if v >= 0.1 => format!("{v:.2} ms"),
        v => format!("{v:.3} ms"),
    }
}

/// Nanoseconds as seconds: whole ones plainly (`1 s`), else to a tenth.
fn secs(ns: u64) -> String {
    if ns.is_multiple_of(1_000_000_000) {
        format!("{} s", ns / 1_000_000_000)
    } else {
        format!("{:.1} s", ns as f64 / 1e9)
    }
}

/// The service loop's busy passes in one line: the last whole interval's
/// count, 99th percentile and longest (or that it had none: an idle memd
/// answering one request), the longest since boot, and the turn budget.
pub(crate) fn loop_passes(p: &LoopPasses) -> String {
    let last = match p.last.passes() {
        0 => format!("none in the last {}", secs(p.interval_ns)),
        n => format!(
            "last {}: {n} passes, p99 {}, max {}",
            secs(p.interval_ns),
            ms(p.last.quantile(990)),
            ms(p.last.max_ns)
        ),
    };
    format!(
        "{last}; since boot max {} (budget {} per turn)",
        ms(p.since_boot.max_ns),
        ms(p.budget_ns)
    )
}

pub(crate) fn print_reply(r: &Reply) {
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
            if let Some(p) = &s.loop_passes {
                t.add_row(vec!["loop passes".to_string(), loop_passes(p)]);
            }
            for (k, c) in s.cpus.iter().enumerate() {
                let up = (c.busy_ns + c.halted_ns).max(1) as f64;
                t.add_row(vec![
                    format!("cpu {k}"),
                    format!(
                        "APIC id {}, {}: halted {:.1} %; page lists {}; kmalloc arrays {}",
                        c.apic_id,
                        c.role,
                        c.halted_ns as f64 * 100.0 / up,
                        cpustat(&c.pages),
                        cpustat(&c.objects)
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
                    "{} kB total, {} kB free, {} kB of it given back to the host; {} kB in the balloon",
                    kb(s.total_bytes),
                    kb(s.free_bytes),
                    kb(s.reported_bytes),
                    kb(s.balloon_bytes)
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
                kb(c.usage.used).to_string(),
                kb(c.usage.free).to_string(),
                kb(c.usage.largest_free).to_string(),
                c.usage.buffers.to_string(),
                c.usage.allocs.to_string(),
                c.usage.failures.to_string(),
            ]);
            println!("{t}");
        }
        Reply::Clients(cs) => {
            // "pages" is what the service accounts to the client (objects
            // by their footprint too); "owner"'s pages are what memd-mm's
            // frame table charges to the client's owner id.
            let mut t = table(&[
                "conn",
                "name",
                "auth",
                "handles",
                "owner",
                "owner pages",
                "pages",
                "bytes",
                "requests",
                "errors",
            ]);
            for c in cs {
                t.add_row(vec![
                    c.conn.to_string(),
                    c.name.clone(),
                    c.authenticated.to_string(),
                    c.handles.to_string(),
                    c.owner.to_string(),
                    c.charged_pages.to_string(),
                    c.pages.to_string(),
                    c.bytes.to_string(),
                    c.requests.to_string(),
                    c.errors.to_string(),
                ]);
            }
            println!("{t}");
        }
        Reply::MemMap(m) => print!("{}", crate::map::text(m)),
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
        Reply::Check(r) => {
            match r.ok {
                true if r.left_out.is_empty() => println!("all invariants hold"),
                true => println!("all invariants checked hold"),
                false => {}
            }
            for v in &r.violations {
                println!("VIOLATION: {v}");
            }
            if !r.left_out.is_empty() {
                println!(
                    "checked a few pageblocks at a time while memd serves; left to the one-piece check its tests and self-test run: {}",
                    r.left_out.join("; ")
                );
            }
        }
        Reply::Stress(s) => {
            println!(
                "{} ops in {:.3} ms on {} CPU(s): {} ops/s, {} failed allocations, invariants {}",
                s.ops,
                s.elapsed_ns as f64 / 1e6,
                s.cpus.max(1),
                s.ops_per_sec,
                s.failed_allocs,
                if s.check_ok { "hold" } else { "VIOLATED" }
            );
            if s.cpu_ops.len() > 1 {
                let shares: Vec<String> = s
                    .cpu_ops
                    .iter()
                    .enumerate()
                    .map(|(k, n)| format!("cpu {k}: {n}"))
                    .collect();
                println!("ops per CPU: {}", shares.join(", "));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_keep_two_digits() {
        assert_eq!(ms(0), "0 ms");
        assert_eq!(ms(41_000), "0.041 ms");
        assert_eq!(ms(410_000), "0.41 ms");
        assert_eq!(ms(200_000), "0.20 ms");
        assert_eq!(ms(3_200_000), "3.2 ms");
        assert_eq!(ms(12_400_000), "12 ms");
    }

    #[test]
    fn loop_passes_line() {
        let mut last = PassHistogram::default();
        for _ in 0..800 {
            last.record(100_000);
        }
        for _ in 0..12 {
            last.record(630_000);
        }
        let mut since_boot = last.clone();
        since_boot.record(3_200_000);
        let p = LoopPasses {
            budget_ns: 200_000,
            interval_ns: 1_000_000_000,
            last,
            since_boot,
        };
        assert_eq!(
            loop_passes(&p),
            "last 1 s: 812 passes, p99 0.63 ms, max 0.63 ms; since boot max 3.2 ms (budget 0.20 ms per turn)"
        );
        let half = LoopPasses {
            interval_ns: 500_000_000,
            ..LoopPasses::default()
        };
        assert!(
            loop_passes(&half).starts_with("none in the last 0.5 s; since boot max 0 ms"),
            "{}",
            loop_passes(&half)
        );
    }
}
