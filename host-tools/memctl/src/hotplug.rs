//! `memctl hotplug [SIZE]`: memory plugged at run time through virtio-mem,
//! as memd holds it (its status: region, block size, requested, plugged,
//! in use, shortfall) beside the host's view (QEMU's QMP,
//! `query-memory-devices`); with SIZE, first sets the requested size
//! through QMP (`qom-set vm0 requested-size`) and waits for memd to follow.
//! The QMP socket is `--qmp`, or `.memd/qmp.sock`, which `cargo xtask run`
//! opens.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use memd_client::qmp::{Qmp, VirtioMemQmp};
use memd_client::Client;
use memd_wire::Hotplug;
use serde::Serialize;

#[derive(Serialize)]
struct HotplugView {
    /// The requested size just set, if any.
    set_bytes: Option<u64>,
    /// memd's view.
    memd: Hotplug,
    /// QEMU's view, when its QMP socket is reachable.
    host: Option<HostView>,
}

#[derive(Serialize)]
struct HostView {
    region_start: u64,
    region_size: u64,
    block_size: u64,
    plugged_bytes: u64,
    requested_bytes: u64,
}

impl From<VirtioMemQmp> for HostView {
    fn from(q: VirtioMemQmp) -> HostView {
        HostView {
            region_start: q.memaddr,
            region_size: q.region_size,
            block_size: q.block_size,
            plugged_bytes: q.plugged_size,
            requested_bytes: q.requested_size,
        }
    }
}

fn memd_view(c: &mut Client) -> Result<Hotplug, String> {
    c.status()
        .map_err(|e| e.to_string())?
        .hotplug
        .ok_or_else(|| {
            "memd has no virtio-mem device: boot it with `cargo xtask run --machine q35 --hotplug SIZE`"
                .to_string()
        })
}

/// Sets the requested size (when given), waits up to `wait` for memd to
/// get there or stop moving, and shows where it stands.
pub(crate) fn hotplug(
    c: &mut Client,
    size: Option<u64>,
    qmp: Option<PathBuf>,
    wait: Duration,
    as_json: bool,
) -> Result<(), String> {
    let before = memd_view(c)?;
    let path = qmp.or_else(crate::balloon::find_socket);
    let mut q = match (&path, size) {
        (Some(p), _) => Some(Qmp::connect(p)?),
        (None, Some(_)) => {
            return Err("no QMP socket: pass --qmp, or start memd with `cargo xtask run`".into())
        }
        (None, None) => None,
    };
    if let (Some(size), Some(q)) = (size, q.as_mut()) {
        if size % before.block_size != 0 || size > before.region_size {
            return Err(format!(
                "SIZE must be a multiple of the block size ({} KiB) and at most the region ({} MiB)",
                before.block_size >> 10,
                before.region_size >> 20
            ));
        }
        q.set_virtio_mem_requested_size(size)?;
        // memd follows a section (128 MiB) a pass: wait until it is there,
        // or has stopped moving for a second (memory in use stays).
        let deadline = Instant::now() + wait;
        let (mut last, mut since) = (before.plugged_bytes, Instant::now());
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let now = memd_view(c)?;
            if now.plugged_bytes == size {
                break;
            }
            if now.plugged_bytes != last {
                (last, since) = (now.plugged_bytes, Instant::now());
            } else if since.elapsed() > Duration::from_secs(1) && now.requested_bytes == size {
                break;
            }
        }
    }
    let v = HotplugView {
        set_bytes: size,
        memd: memd_view(c)?,
        host: match q.as_mut() {
            Some(q) => Some(q.virtio_mem()?.into()),
            None => None,
        },
    };
    if as_json {
        crate::print::json(&v);
        return Ok(());
    }
    let mib = |b: u64| format!("{} MiB", b >> 20);
    let m = &v.memd;
    println!(
        "region                      [{:#x}-{:#x}) {}",
        m.region_start,
        m.region_start + m.region_size,
        mib(m.region_size)
    );
    println!("block size                  {} KiB", m.block_size >> 10);
    println!("requested                   {}", mib(m.requested_bytes));
    println!("plugged (ZONE_MOVABLE)      {}", mib(m.plugged_bytes));
    println!("in use                      {}", mib(m.used_bytes));
    println!("frame descriptors           {} KiB", m.memmap_bytes >> 10);
    if m.shortfall_bytes > 0 {
        println!(
            "shortfall                   {}: in use, unplugged as clients free it",
            mib(m.shortfall_bytes)
        );
    }
    if let Some(e) = &m.error {
        println!("device                      {e}");
    }
    match &v.host {
        Some(h) => println!(
            "host (QMP)                  {} plugged of {} requested",
            mib(h.plugged_bytes),
            mib(h.requested_bytes)
        ),
        None => println!("host (QMP)                  no socket (--qmp)"),
    }
    Ok(())
}
