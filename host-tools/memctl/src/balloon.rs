//! `memctl balloon [SIZE]`: the guest's balloon as the host sees it (QEMU's
//! QMP, `query-balloon`) beside what memd holds in it and has reported
//! (memd's meminfo) and the statistics memd sends the host (`virsh
//! dommemstat`); with SIZE, first sets the guest's target size through
//! QMP's `balloon`, as `virsh setmem` does. The QMP socket is `--qmp`, or
//! `.memd/qmp.sock`, which `cargo xtask run` opens.

use std::path::PathBuf;
use std::time::Duration;

use memd_client::qmp::{self, Qmp};
use memd_client::Client;
use serde::Serialize;

/// `.memd/qmp.sock` in the current directory or a parent.
pub(crate) fn find_socket() -> Option<PathBuf> {
    std::env::current_dir()
        .ok()?
        .ancestors()
        .map(|d| d.join(".memd").join("qmp.sock"))
        .find(|p| p.exists())
}

#[derive(Serialize)]
struct BalloonView {
    /// The guest's memory as the host counts it: RAM less the balloon.
    guest_bytes: u64,
    /// The target just set, if any.
    target_bytes: Option<u64>,
    /// What the host asks the balloon to hold (memd reads it from the
    /// device), if memd has a balloon.
    asked_bytes: Option<u64>,
    /// What memd holds in the balloon (the host's memory meanwhile).
    balloon_bytes: u64,
    /// Free memory memd reported to the host (free page reporting).
    reported_bytes: u64,
    /// memd's managed and free memory.
    memd_total_bytes: u64,
    memd_free_bytes: u64,
    /// What the guest told the host through the balloon's statistics
    /// (`virsh dommemstat`), by QEMU's names; empty until the first come.
    guest_stats: std::collections::BTreeMap<String, u64>,
}

/// Sets the target (when given), waits briefly for the balloon to move, and
/// shows where it stands.
pub(crate) fn balloon(
    c: &mut Client,
    size: Option<u64>,
    qmp: Option<PathBuf>,
    as_json: bool,
) -> Result<(), String> {
    let path = qmp
        .or_else(find_socket)
        .ok_or("no QMP socket: pass --qmp, or start memd with `cargo xtask run`")?;
    let mut q = Qmp::connect(&path)?;
    if let Some(size) = size {
        q.set_balloon(size)?;
        // memd moves 2 MiB a request: wait (up to 5 s) until the size is
        // met or stops moving (a target memd rounds, or only partly meets).
        let (mut last, mut still) = (q.balloon_actual()?, 0);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now = q.balloon_actual()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
            if now == size || still >= 5 {
                break;
            }
        }
    }
    let m = c.meminfo().map_err(|e| e.to_string())?;
    let asked = c.status().map_err(|e| e.to_string())?.balloon_target_bytes;
    let v = BalloonView {
        guest_bytes: q.balloon_actual()?,
        target_bytes: size,
        asked_bytes: asked,
        balloon_bytes: m.balloon,
        reported_bytes: m.reported,
        memd_total_bytes: m.total,
        memd_free_bytes: m.free,
        // Best effort: a balloon without statistics still has a size.
        guest_stats: q.guest_stats().unwrap_or_default().into_iter().collect(),
    };
    if as_json {
        crate::print::json(&v);
        return Ok(());
    }
    let mib = |b: u64| format!("{} MiB", b >> 20);
    println!("guest memory (host's view)   {}", mib(v.guest_bytes));
    if let Some(t) = v.target_bytes {
        println!("target                       {}", mib(t));
    }
    match v.asked_bytes {
        Some(a) => println!("asked of the balloon         {}", mib(a)),
        None => println!("asked of the balloon         memd has no balloon device"),
    }
    println!("in the balloon (memd)        {}", mib(v.balloon_bytes));
    println!("free, reported to the host   {}", mib(v.reported_bytes));
    println!(
        "memd                         {} managed, {} free",
        mib(v.memd_total_bytes),
        mib(v.memd_free_bytes)
    );
    if v.guest_stats.is_empty() {
        println!("guest statistics             none yet (asked for every 2 s)");
    }
    for (name, value) in &v.guest_stats {
        println!("{:<29}{}", format!("{name}"), mib(*value));
    }
    if let Some(short) = v.asked_bytes.and_then(|a| a.checked_sub(v.balloon_bytes)) {
        if short > 0 {
            println!(
                "memd keeps {} the host asked for: the balloon takes only memory above its zones' high watermarks",
                mib(short)
            );
        }
    }
    Ok(())
}

/// The QEMU process behind `.memd/qmp.sock` (its command line names the
/// socket) and its resident memory in bytes, when it runs on this host.
pub(crate) fn qemu_resident() -> Option<(u32, u64)> {
    let sock = find_socket()?;
    let pid = qmp::qemu_process(&sock.to_string_lossy())?;
    Some((pid, qmp::resident_bytes(pid)?))
}
