//! Memory hot-plug end to end (virtio-mem on q35): the host asks for
//! 2 GiB through QMP and memd plugs it into ZONE_MOVABLE; a client takes
//! 1.5 GiB of movable pages, more than the guest booted with; asked to
//! give everything back, memd unplugs nothing in use and says how much it
//! keeps; once the clients are gone, everything is unplugged. Every view
//! shows the zone on the way, and `memctl hotplug` sets and shows it.

use std::path::Path;
use std::time::{Duration, Instant};

use memd_client::qmp::Qmp;
use memd_client::wire::{DmaMask, Gfp, Hotplug, MemMap, Op, Reply};
use memd_client::{Client, Options};

use super::memctl::memctl;
use crate::tokens::GuestTokens;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// A bound for memd to follow a new request, not a figure (those are
/// `cargo xtask bench hotplug`'s).
const BOUND: Duration = Duration::from_secs(30);

/// The hot-plug state once `done` says so, within [`BOUND`].
fn wait_for(
    c: &mut Client,
    what: &str,
    done: impl Fn(&Hotplug) -> bool,
) -> Result<Hotplug, String> {
    let start = Instant::now();
    loop {
        let h = c
            .status()
            .map_err(|e| format!("hotplug: status: {e}"))?
            .hotplug
            .ok_or("hotplug: memd reports no virtio-mem device")?;
        if done(&h) {
            return Ok(h);
        }
        if start.elapsed() > BOUND {
            return Err(format!("hotplug: {what}: not within {BOUND:?}: {h:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The zone Movable's managed pages as zoneinfo, buddyinfo, the map and
/// meminfo show it: (zoneinfo managed, in buddyinfo, in the map, meminfo
/// total).
fn views(c: &mut Client) -> Result<(u64, bool, bool, u64), String> {
    let e = |e: memd_client::Error| format!("hotplug: views: {e}");
    let zi = c.zoneinfo().map_err(e)?;
    let managed = zi
        .iter()
        .find(|z| z.name == "Movable")
        .ok_or("hotplug: zoneinfo has no Movable zone")?
        .managed;
    let buddy = c
        .buddyinfo()
        .map_err(e)?
        .iter()
        .any(|z| z.zone == "Movable");
    let map: MemMap = match c.call(Op::MemMap).map_err(e)? {
        Reply::MemMap(m) => *m,
        r => return Err(format!("hotplug: map: unexpected {r:?}")),
    };
    let in_map = map.zones.iter().any(|z| z.name == "Movable");
    let total = c.meminfo().map_err(e)?.total;
    Ok((managed, buddy, in_map, total))
}

pub(super) fn hotplug_check(
    region: u64,
    port: u16,
    tokens: &GuestTokens,
    qmp: &Path,
) -> Result<(), String> {
    let addr = format!("127.0.0.1:{port}");
    let mut q = Qmp::connect(qmp)?;
    let mut c = Client::connect(&Options::new(&addr, &tokens.client))
        .map_err(|e| format!("hotplug: connect: {e}"))?;
    let start = wait_for(&mut c, "device at start", |h| h.plugged_bytes == 0)?;
    if start.region_size != region || start.block_size != 2 * MIB || start.memmap_bytes != 0 {
        return Err(format!("hotplug: unexpected device at start: {start:?}"));
    }
    let (_, _, _, total_before) = views(&mut c)?;

    // Grow by 2 GiB.
    q.set_virtio_mem_requested_size(2 * GIB)?;
    let h = wait_for(&mut c, "plug 2 GiB", |h| h.plugged_bytes == 2 * GIB)?;
    let host = q.virtio_mem()?;
    if host.plugged_size != 2 * GIB || h.memmap_bytes != 2 * GIB / 4096 * 16 {
        return Err(format!(
            "hotplug: after plugging 2 GiB: memd {h:?}, QEMU {host:?}"
        ));
    }
    let (managed, buddy, in_map, total) = views(&mut c)?;
    if managed != 2 * GIB / 4096 || !buddy || !in_map || total != total_before + 2 * GIB {
        return Err(format!(
            "hotplug: views after plugging: Movable managed {managed} pages, in buddyinfo {buddy}, in the map {in_map}, meminfo total {total} (before {total_before})"
        ));
    }

    // A DMA buffer that asks for it comes from there too; one that does
    // not, never.
    for movable in [true, false] {
        let b = c
            .dma_alloc_in(4 * MIB, 0, DmaMask::Bits64, movable)
            .map_err(|e| format!("hotplug: DMA buffer (movable {movable}): {e}"))?;
        if (b.phys >= start.region_start) != movable {
            return Err(format!(
                "hotplug: DMA buffer (movable {movable}) at {:#x}",
                b.phys
            ));
        }
        c.dma_free(b.handle)
            .map_err(|e| format!("hotplug: DMA free: {e}"))?;
    }

    // 1.5 GiB of movable pages, more than the guest's 1 GiB, all in the
    // plugged region (six clients: each may hold 256 MiB); a kernel
    // request never lands there.
    let mut holders = Vec::new();
    for k in 0..6 {
        let mut h = Client::connect(&Options::new(&addr, &tokens.client))
            .map_err(|e| format!("hotplug: holder {k}: {e}"))?;
        for i in 0..64 {
            let (_, phys) = h
                .alloc_pages(10, Gfp::KERNEL | Gfp::MOVABLE)
                .map_err(|e| format!("hotplug: holder {k}: movable block {i}: {e}"))?;
            if phys < start.region_start || phys >= start.region_start + region {
                return Err(format!(
                    "hotplug: movable block at {phys:#x}, outside the region"
                ));
            }
        }
        holders.push(h);
    }
    let (_, phys) = c
        .alloc_pages(0, Gfp::KERNEL)
        .map_err(|e| format!("hotplug: kernel page: {e}"))?;
    if phys >= start.region_start {
        return Err(format!(
            "hotplug: a KERNEL page at {phys:#x}, in ZONE_MOVABLE"
        ));
    }

    // Asked for nothing, memd unplugs what is free and keeps the rest.
    q.set_virtio_mem_requested_size(0)?;
    let h = wait_for(&mut c, "unplug the free half GiB", |h| {
        h.requested_bytes == 0 && h.plugged_bytes <= h.used_bytes + 2 * MIB && h.shortfall_bytes > 0
    })?;
    let host = q.virtio_mem()?;
    // Nothing in use was unplugged, and QEMU counts what memd counts.
    if h.used_bytes < 3 * GIB / 2
        || h.plugged_bytes < h.used_bytes
        || host.plugged_size != h.plugged_bytes
    {
        return Err(format!(
            "hotplug: with 1.5 GiB in use and nothing requested: memd {h:?}, QEMU {host:?}"
        ));
    }
    // memctl shows the same, and sets through QMP (QEMU serves one QMP
    // client at a time).
    drop(q);
    let env = [("MEMD_TOKEN", tokens.client.as_str())];
    let qmp_arg = qmp.to_string_lossy();
    let (code, out, err) = memctl(port, &env, &["hotplug", "--qmp", &qmp_arg, "--json"], "")?;
    let shown: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("memctl hotplug --json: {e}: {out}{err}"))?;
    if code != 0 || shown["memd"]["shortfall_bytes"].as_u64() != Some(h.shortfall_bytes) {
        return Err(format!("memctl hotplug --json (exit {code}): {out}{err}"));
    }

    // The clients go, their pages are freed: memd unplugs the rest by
    // itself.
    drop(holders);
    let h = wait_for(&mut c, "unplug after free", |h| h.plugged_bytes == 0)?;
    if h.memmap_bytes != 0
        || h.shortfall_bytes != 0
        || Qmp::connect(qmp)?.virtio_mem()?.plugged_size != 0
    {
        return Err(format!("hotplug: after the client freed everything: {h:?}"));
    }
    let (managed, _, _, total) = views(&mut c)?;
    if managed != 0 || total != total_before {
        return Err(format!(
            "hotplug: Movable managed {managed} pages and total {total} after unplugging (before {total_before})"
        ));
    }
    let (code, out, err) = memctl(
        port,
        &env,
        &["hotplug", "64M", "--qmp", &qmp_arg, "--json"],
        "",
    )?;
    let shown: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("memctl hotplug 64M: {e}: {out}{err}"))?;
    if code != 0 || shown["memd"]["plugged_bytes"].as_u64() != Some(64 * MIB) {
        return Err(format!("memctl hotplug 64M (exit {code}): {out}{err}"));
    }
    let mut op = Client::connect(&Options::new(&addr, &tokens.operator))
        .map_err(|e| format!("hotplug: operator: {e}"))?;
    let report = op.check().map_err(|e| format!("hotplug: check: {e}"))?;
    if !report.ok {
        return Err(format!("hotplug: check: {:?}", report.violations));
    }
    Qmp::connect(qmp)?.set_virtio_mem_requested_size(0)?;
    wait_for(&mut c, "unplug 64 MiB", |h| h.plugged_bytes == 0)?;
    Ok(())
}
