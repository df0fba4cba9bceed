//! Large contiguous DMA buffers from `memd.dma_reserve` through the disk,
//! before and after ordinary memory is fragmented.

use std::time::{Duration, Instant};

use super::{GIB, MIB};

/// Large contiguous DMA buffers and the disk, on a 1 GiB guest
/// with `memd.dma_reserve=64M@dma32` and a 32 MiB disk:
///
/// - the DMA list names the kernel's device buffers with their device
///   queue (virtio-net's receive buffers, both devices' virtqueue rings),
///   page-aligned, page-multiple sizes, in a real zone;
/// - requests the reservation can never serve (larger than it, or a 24-bit
///   mask when it lies above 16 MiB) fail with ENOMEM and a message naming
///   the reason, and leave nothing allocated: no client buffer listed, the region
///   empty, free memory equal to the baseline;
/// - a 24 MiB buffer (larger than a 4 MiB buddy block) below 4 GiB: zone
///   DMA32, listed with its owner; filled, written to the disk in one
///   request of 3 descriptors, freed; a new buffer (zeroed) reads it back
///   and the checksums are equal;
/// - the same after three other clients have fragmented ordinary memory
///   with 184 320 single-page allocations, every other one then freed;
/// - when everyone has gone, no page, large kmalloc block or reservation
///   byte is held, and every page is free or in the slab layer exactly as
///   at the baseline (the handle tables' slabs stay cached).
pub(super) fn dma_disk_check(port: u16, token: &str) -> Result<(), String> {
    use memd_client::wire::{errno, DmaMask, DmaOwner, Gfp, Op, Reply};
    use memd_client::{Client, Error, Options};

    const LEN: u64 = 24 * MIB;
    let opts = Options::new(format!("127.0.0.1:{port}"), token);
    let mut c = Client::connect(&opts).map_err(|e| format!("connect: {e}"))?;
    let free = |c: &mut Client| {
        c.meminfo()
            .map(|m| m.free + m.slab_reclaimable)
            .map_err(|e| format!("meminfo: {e}"))
    };
    // Settles after connection churn; the baseline is what it settles at.
    let settle = |c: &mut Client, want: Option<u64>| -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut last, mut stable) = (0, 0);
        loop {
            let now = free(c)?;
            if want == Some(now) || (want.is_none() && now == last && stable >= 3) {
                return Ok(now);
            }
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            if Instant::now() > deadline {
                return Err(format!("free memory {now}, want {want:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let baseline = settle(&mut c, None)?;
    // The kernel's own device buffers are listed with their device queue:
    // virtio-net's receive buffers (256 slots of 2 KiB) and virtqueue rings
    // of both devices, page-sized and page-aligned, in a real zone.
    let devices = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
    let device_owned = |name: &str| {
        devices
            .iter()
            .filter(|b| matches!(&b.owner, DmaOwner::DeviceQueue { device } if device.starts_with(name)))
            .count()
    };
    for b in &devices {
        if let DmaOwner::DeviceQueue { .. } = &b.owner {
            if b.handle != 0
                || b.len == 0
                || b.len % 4096 != 0
                || b.phys % 4096 != 0
                || !["DMA", "DMA32", "Normal"].contains(&b.zone.as_str())
            {
                return Err(format!("implausible device DMA buffer: {b:?}"));
            }
        }
    }
    if !devices.iter().any(|b| {
        matches!(&b.owner, DmaOwner::DeviceQueue { device } if device == "virtio-net receive buffers (queue 0)")
            && b.len == 256 * 2048
    }) || device_owned("virtio-net virtqueue") < 2
        || device_owned("virtio-blk virtqueue") < 1
    {
        return Err(format!(
            "want virtio-net's receive buffers and both devices' virtqueues listed as device-owned: {devices:?}"
        ));
    }
    let nothing_held = |c: &mut Client, what: &str| -> Result<(), String> {
        let listed = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
        let clients = listed
            .iter()
            .filter(|b| matches!(b.owner, DmaOwner::Client { .. }))
            .count();
        let cma = c.cma().map_err(|e| format!("cma: {e}"))?;
        if clients != 0 || cma.usage.used != 0 || cma.usage.buffers != 0 {
            return Err(format!(
                "after {what}: {clients} client buffer(s) listed, {} bytes of the reservation used",
                cma.usage.used
            ));
        }
        Ok(())
    };

    // Round 0 warms up what the first error replies grow once and keep
    // (as in `control_port_check`); round 1 must then return every byte.
    let mut baseline = baseline;
    for round in 0..2 {
        // Refused requests on a connection of their own: its reply buffer grows
        // for the longer error messages and is returned when it closes.
        let mut r = Client::connect(&opts).map_err(|e| format!("connect: {e}"))?;
        for (len, mask, reason) in [
            (
                128 * MIB,
                DmaMask::Bits32,
                "larger than the DMA reservation",
            ),
            (LEN, DmaMask::Bits24, "24-bit mask"),
        ] {
            match r.dma_alloc(len, 0, mask) {
                Err(Error::Server(e)) if e.code == errno::ENOMEM && e.message.contains(reason) => {}
                other => {
                    return Err(format!(
                        "dma_alloc of {} MiB under a {}-bit mask: want ENOMEM saying {reason:?}, got {other:?}",
                        len / MIB,
                        mask.bits()
                    ))
                }
            }
            nothing_held(&mut c, "a refused request")?;
        }
        drop(r);
        if round == 0 {
            baseline = settle(&mut c, None)?;
        }
    }
    // Taken once the refused clients' sockets are gone: the kernel's socket
    // buffers (large kmalloc blocks) come and go with connections.
    settle(&mut c, Some(baseline)).map_err(|e| format!("after refused requests: {e}"))?;
    let base_info = c.meminfo().map_err(|e| format!("meminfo: {e}"))?;

    let round_trip = |c: &mut Client, seed: u64, sector: u64| -> Result<(), String> {
        let a = c
            .dma_alloc(LEN, 0, DmaMask::Bits32)
            .map_err(|e| format!("dma_alloc: {e}"))?;
        if a.zone != "DMA32" || a.phys + a.len > 4 * GIB || a.len != LEN {
            return Err(format!("want {LEN} bytes in DMA32 below 4 GiB, got {a:?}"));
        }
        let listed = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
        if !listed.iter().any(|b| {
            b.handle == a.handle
                && b.phys == a.phys
                && b.zone == "DMA32"
                && matches!(&b.owner, DmaOwner::Client { name } if name == "boot-test-dma")
        }) || listed
            .iter()
            .any(|b| b.phys == a.phys && matches!(b.owner, DmaOwner::DeviceQueue { .. }))
        {
            return Err(format!(
                "buffer {a:?} not listed with its owner: {listed:?}"
            ));
        }
        c.dma_fill(a.handle, seed)
            .map_err(|e| format!("dma_fill: {e}"))?;
        let want = c
            .dma_checksum(a.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?;
        let t = c
            .dma_write_disk(a.handle, sector)
            .map_err(|e| format!("write-disk: {e}"))?;
        if t.bytes != LEN || t.requests != 1 || t.descriptors != 3 || t.data_descriptors != 1 {
            return Err(format!(
                "want one request of 3 descriptors for {LEN} bytes, got {t:?}"
            ));
        }
        c.dma_free(a.handle).map_err(|e| format!("dma_free: {e}"))?;
        let b = c
            .dma_alloc(LEN, 0, DmaMask::Bits32)
            .map_err(|e| format!("dma_alloc (second): {e}"))?;
        if c.dma_checksum(b.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?
            == want
        {
            return Err("a fresh buffer already holds the data (not zeroed?)".into());
        }
        c.dma_read_disk(b.handle, sector)
            .map_err(|e| format!("read-disk: {e}"))?;
        let got = c
            .dma_checksum(b.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?;
        if got != want {
            return Err(format!("read back {got:#x}, wrote {want:#x}"));
        }
        c.dma_free(b.handle).map_err(|e| format!("dma_free: {e}"))?;
        Ok(())
    };
    let mut opts_named = opts.clone();
    opts_named.client = "boot-test-dma".into();
    let mut d = Client::connect(&opts_named).map_err(|e| format!("connect: {e}"))?;
    round_trip(&mut d, 0xd15c, 8)?;

    // Fragment ordinary memory: 3 clients x 60 000 pages, every other freed.
    let mut fragmenters = Vec::new();
    for i in 0..3 {
        let mut f = Client::connect(&opts).map_err(|e| format!("fragmenter {i}: {e}"))?;
        let mut handles = Vec::with_capacity(60_000);
        // 15 full batches (memd-wire's MAX_BATCH_OPS, 4096 each).
        for _ in 0..15 {
            let ops = vec![
                Op::AllocPages {
                    order: 0,
                    gfp: Gfp::KERNEL
                };
                memd_client::wire::MAX_BATCH_OPS
            ];
            for r in f
                .batch(ops, true)
                .map_err(|e| format!("fragmenter {i}: {e}"))?
            {
                match r {
                    Ok(Reply::Pages { handle, .. }) => handles.push(handle),
                    other => return Err(format!("fragmenter {i}: alloc_pages: {other:?}")),
                }
            }
        }
        let frees: Vec<Op> = handles
            .iter()
            .step_by(2)
            .map(|&handle| Op::FreePages { handle })
            .collect();
        for chunk in frees.chunks(memd_client::wire::MAX_BATCH_OPS) {
            for r in f
                .batch(chunk.to_vec(), true)
                .map_err(|e| format!("fragmenter {i}: {e}"))?
            {
                r.map_err(|e| format!("fragmenter {i}: free_pages: {e}"))?;
            }
        }
        fragmenters.push(f);
    }
    let held: u64 = d
        .clients()
        .map_err(|e| format!("clients: {e}"))?
        .iter()
        .map(|c| c.pages)
        .sum();
    if held < 90_000 {
        return Err(format!("fragmenters hold {held} pages, want 90 000"));
    }
    round_trip(&mut d, 0xf4a9, 4096)?;
    drop(fragmenters);
    drop(d);
    nothing_held(&mut c, "the round trips")?;
    // 184 320 handles grew the service's handle tables in the slab layer;
    // closing returns every object, but slabs the kernel's other objects
    // keep partly used stay with the slab layer. So: every page is either
    // free or held by the slab layer, exactly as at the baseline, and no
    // page, large kmalloc block or reservation byte is held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = c.meminfo().map_err(|e| format!("meminfo: {e}"))?;
        let same = now.free + now.slab == base_info.free + base_info.slab
            && now.pages_allocated == base_info.pages_allocated
            && now.kmalloc_large == base_info.kmalloc_large
            && now.cma_free == base_info.cma_total;
        if same {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after everyone left: meminfo at the baseline {base_info:?}, now {now:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
