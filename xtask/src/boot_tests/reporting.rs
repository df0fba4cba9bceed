//! Free page reporting end to end: memory two clients touched and freed
//! goes back to the host (QEMU's resident memory falls again).

use std::time::{Duration, Instant};

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
