//! The balloon end to end: memory two clients touched and freed goes back
//! to the host (QEMU's resident memory falls again), and the balloon
//! follows the host's targets through QMP.

use std::time::{Duration, Instant};

use memd_client::qmp::Qmp;
use memd_client::wire::Gfp;
use memd_client::{Client, Options};

use crate::bench_balloon::{qemu_pid, rss};
use crate::tokens::GuestTokens;

const MIB: u64 = 1 << 20;
/// Each client fills this much with zeroed 4 MiB blocks.
const PER_CLIENT: u64 = 192 * MIB;
/// The guest reports once a second; this is a bound, not a figure (those
/// are `cargo xtask bench balloon`'s).
const BOUND: Duration = Duration::from_secs(20);

/// Two clients fill 384 MiB and disconnect; within the bound, QEMU's
/// resident memory is back within a quarter of what they touched.
pub(super) fn reporting_check(port: u16, tokens: &GuestTokens) -> Result<(), String> {
    let pid = qemu_pid(port).map_err(|e| format!("{e:#}"))?;
    let rss = || rss(pid).map_err(|e| format!("{e:#}"));
    let before = rss()?;
    let mut clients = Vec::new();
    for i in 0..2 {
        let mut c = Client::connect(&Options::new(format!("127.0.0.1:{port}"), &tokens.client))
            .map_err(|e| format!("reporting: client {i}: {e}"))?;
        for _ in 0..PER_CLIENT / (4 * MIB) {
            c.alloc_pages(10, Gfp::KERNEL | Gfp::ZERO)
                .map_err(|e| format!("reporting: client {i}: alloc: {e}"))?;
        }
        clients.push(c);
    }
    let filled = rss()?;
    let touched = filled.saturating_sub(before);
    if touched < PER_CLIENT {
        return Err(format!(
            "reporting: QEMU grew by {} MiB for {} MiB of zeroed pages",
            touched / MIB,
            2 * PER_CLIENT / MIB
        ));
    }
    drop(clients);
    let left = Instant::now();
    loop {
        let now = rss()?;
        if now <= before + touched / 4 {
            return Ok(());
        }
        if left.elapsed() > BOUND {
            return Err(format!(
                "reporting: QEMU still holds {} MiB {} s after clients freed {} MiB (before {} MiB, filled {} MiB)",
                now / MIB,
                BOUND.as_secs(),
                touched / MIB,
                before / MIB,
                filled / MIB
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the host takes back in the target check.
const TAKEN: u64 = 256 * MIB;

/// The host sets the guest to its RAM less 256 MiB: the balloon holds
/// 256 MiB (memd's meminfo and QEMU's `query-balloon` agree); set back to
/// all of its RAM, the balloon empties and memd has its memory again. The
/// statistics memd sends the host (QMP `guest-stats`) give memd's total.
pub(super) fn balloon_check(
    ram: u64,
    port: u16,
    tokens: &GuestTokens,
    qmp: &std::path::Path,
) -> Result<(), String> {
    let mut q = Qmp::connect(qmp)?;
    let mut c = Client::connect(&Options::new(format!("127.0.0.1:{port}"), &tokens.client))
        .map_err(|e| format!("balloon: connect: {e}"))?;
    let mut balloon = || -> Result<u64, String> {
        c.meminfo()
            .map(|m| m.balloon)
            .map_err(|e| format!("balloon: meminfo: {e}"))
    };
    if q.balloon_actual()? != ram || balloon()? != 0 {
        return Err("balloon: not empty at the start".into());
    }
    for (target, held) in [(ram - TAKEN, TAKEN), (ram, 0)] {
        q.set_balloon(target)?;
        let asked = Instant::now();
        loop {
            let (actual, inside) = (q.balloon_actual()?, balloon()?);
            if actual == target && inside == held {
                break;
            }
            if asked.elapsed() > BOUND {
                return Err(format!(
                    "balloon: target {} MiB, after {} s QEMU sees {} MiB and memd holds {} MiB in the balloon",
                    target / MIB,
                    BOUND.as_secs(),
                    actual / MIB,
                    inside / MIB
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The host asks for nearly everything: the balloon takes what lies
    // above memd's watermarks; a client's allocations then take blocks back
    // (DEFLATE_ON_OOM) instead of failing, and the host sees it.
    q.set_balloon(64 * MIB)?;
    // Full once it stops growing (five readings alike), within the bound.
    let asked = Instant::now();
    let (mut full, mut still) = (balloon()?, 0);
    while still < 5 && asked.elapsed() < BOUND {
        std::thread::sleep(Duration::from_millis(100));
        let now = balloon()?;
        still = if now == full { still + 1 } else { 0 };
        full = now;
    }
    if full < ram / 2 {
        return Err(format!(
            "balloon: asked for all but 64 MiB, it holds {} MiB",
            full / MIB
        ));
    }
    let free = grab_meminfo(port, tokens)?.free;
    let mut grabber = Client::connect(&Options::new(format!("127.0.0.1:{port}"), &tokens.client))
        .map_err(|e| format!("balloon: connect: {e}"))?;
    let want = (free + 64 * MIB).min(192 * MIB);
    for i in 0..want / (4 * MIB) {
        grabber.alloc_pages(10, Gfp::KERNEL).map_err(|e| {
            format!(
                "balloon: allocation {i} failed with the balloon full ({} MiB free before): {e}",
                free / MIB
            )
        })?;
    }
    let after = balloon()?;
    if after >= full {
        return Err(format!(
            "balloon: {} MiB allocated past free memory, the balloon still holds {} MiB",
            want / MIB,
            after / MIB
        ));
    }
    drop(grabber);
    q.set_balloon(ram)?;
    let asked = Instant::now();
    while q.balloon_actual()? != ram || balloon()? != 0 {
        if asked.elapsed() > BOUND {
            return Err("balloon: did not empty after the allocations".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The guest's statistics reach the host and agree with memd's own.
    let total = grab_meminfo(port, tokens)?.total;
    let asked = Instant::now();
    loop {
        let stats = q.guest_stats()?;
        let stat = |name: &str| stats.iter().find(|(k, _)| k == name).map(|&(_, v)| v);
        if stat("stat-total-memory") == Some(total) && stat("stat-free-memory").is_some() {
            return Ok(());
        }
        if asked.elapsed() > BOUND {
            return Err(format!(
                "balloon: guest statistics {stats:?} after {} s, memd's total is {total}",
                BOUND.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// memd's meminfo on a connection of its own.
fn grab_meminfo(port: u16, tokens: &GuestTokens) -> Result<memd_client::wire::MemInfo, String> {
    Client::connect(&Options::new(format!("127.0.0.1:{port}"), &tokens.client))
        .and_then(|mut c| c.meminfo())
        .map_err(|e| format!("balloon: meminfo: {e}"))
}
