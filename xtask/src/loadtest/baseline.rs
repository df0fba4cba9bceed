//! Free memory before and after a run: the figure the baseline counts
//! ([`available`]), waiting for it to settle, the baseline itself
//! ([`Baseline`]) and what the end of a run finds against it ([`Ending`]),
//! and the warm-up that grows, before the baseline, what grows once and
//! stays.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use memd_client::wire::{self, Gfp};
use memd_client::{Client, Options};

/// Free memory as the baseline counts it: free pages (buddy, per-CPU
/// lists, contiguous region) plus every byte of slab pages that holds no
/// live object (per-CPU arrays, empty slabs, free slots in partial slabs).
/// Counting the free slots makes the figure exact whatever the slab
/// fragmentation: it returns to the baseline exactly when every page and
/// every object the clients took is back and the kernel holds what it held
/// before.
pub(crate) fn available(c: &mut Client) -> Result<u64> {
    let m = c.meminfo().context("meminfo")?;
    let live: u64 = c
        .slabinfo()
        .context("slabinfo")?
        .iter()
        .map(|s| s.active_objs * s.stride)
        .sum();
    Ok(m.free + m.slab - live)
}

/// meminfo and the live bytes of every slab cache, for diagnosis.
pub(super) struct Snapshot {
    pub meminfo: wire::MemInfo,
    live: BTreeMap<String, u64>,
}

impl Snapshot {
    fn take(c: &mut Client) -> Result<Snapshot> {
        let meminfo = c.meminfo().context("meminfo")?;
        let live = c
            .slabinfo()
            .context("slabinfo")?
            .into_iter()
            .map(|s| (s.name, s.active_objs * s.stride))
            .collect();
        Ok(Snapshot { meminfo, live })
    }

    /// The meminfo fields and the caches' live bytes that differ.
    fn diff(&self, later: &Snapshot) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        if let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (
            serde_json::to_value(self.meminfo),
            serde_json::to_value(later.meminfo),
        ) {
            for (k, va) in &a {
                if let (Some(x), Some(y)) = (va.as_u64(), b.get(k).and_then(|v| v.as_u64())) {
                    if x != y {
                        out.push((k.clone(), x, y));
                    }
                }
            }
        }
        for (name, &x) in &self.live {
            let y = later.live.get(name).copied().unwrap_or(0);
            if x != y {
                out.push((format!("live bytes in {name}"), x, y));
            }
        }
        for (name, &y) in &later.live {
            if !self.live.contains_key(name) {
                out.push((format!("live bytes in {name}"), 0, y));
            }
        }
        out
    }
}

/// Polls `available` until it has not changed for `stable` reads in a row
/// (or equals `target`), within `limit`.
pub(crate) fn settle(c: &mut Client, target: Option<u64>, limit: Duration) -> Result<u64> {
    let deadline = Instant::now() + limit;
    let mut last = u64::MAX;
    let mut same = 0;
    loop {
        let now = available(c)?;
        if Some(now) == target {
            return Ok(now);
        }
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if (target.is_none() && same >= 5) || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects `n` clients that each hold a page and an object at the same
/// time, then free them and disconnect: what grows once and stays
/// (connection tables, per-owner accounting, socket buffers' first use)
/// grows before the baseline is taken.
pub(super) fn warm_up(opts: &Options, n: u32) -> Result<()> {
    let mut held = Vec::new();
    for i in 0..n {
        let mut c = Client::connect(opts).with_context(|| format!("warm-up client {i}"))?;
        let (h, _) = c.alloc_pages(0, Gfp::KERNEL).context("warm-up alloc")?;
        let o = c.kmalloc(64, Gfp::KERNEL).context("warm-up kmalloc")?;
        held.push((c, h, o.handle));
    }
    for (mut c, h, o) in held {
        c.free_pages(h).context("warm-up free")?;
        c.kfree(o).context("warm-up kfree")?;
    }
    Ok(())
}

/// Free memory once settled after the warm-up, and the meminfo and slab
/// figures then.
pub(super) struct Baseline {
    pub bytes: u64,
    pub info: Snapshot,
}

/// What the end of a run found: free memory after settling toward the
/// baseline, the invariant check, and the figures that differ.
pub(super) struct Ending {
    pub baseline: u64,
    pub after: u64,
    pub check_ok: Result<(), String>,
    /// (name, baseline, after) of each meminfo field and slab cache's live
    /// bytes that differ.
    pub meminfo_diff: Vec<(String, u64, u64)>,
}

impl Baseline {
    /// Waits (within `limit`) for free memory to stop changing, and takes
    /// it and the snapshot.
    pub fn take(ctl: &mut Client, limit: Duration) -> Result<Baseline> {
        let bytes = settle(ctl, None, limit)?;
        let info = Snapshot::take(ctl)?;
        Ok(Baseline { bytes, info })
    }

    /// Once the load has gone: waits (within `limit`) for free memory to
    /// return to the baseline, runs the service's invariant check, and
    /// compares the figures.
    pub fn compare(&self, ctl: &mut Client, limit: Duration) -> Result<Ending> {
        let after = settle(ctl, Some(self.bytes), limit)?;
        let check_ok = ctl
            .check()
            .map_err(|e| format!("check: {e}"))
            .and_then(|r| {
                if r.ok {
                    Ok(())
                } else {
                    Err(format!("check failed: {r:?}"))
                }
            });
        Ok(Ending {
            baseline: self.bytes,
            after,
            check_ok,
            meminfo_diff: self.info.diff(&Snapshot::take(ctl)?),
        })
    }
}
