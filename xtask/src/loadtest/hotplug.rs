//! `--hotplug-cycle SECS`: while the clients run, the host grows the
//! guest's virtio-mem device to half its region and shrinks it to nothing,
//! in turn every SECS seconds (QMP `qom-set vm0 requested-size`, as an
//! operator would). The clients' movable pages land in the plugged memory;
//! memd unplugs what is free and keeps what is in use until it is freed.
//! After the run the device is asked for nothing, so the baseline holds
//! only once memd has unplugged everything the clients left.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use memd_client::qmp::Qmp;

/// What the cycling did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotplugFigures {
    /// Requested-size changes made (grow and shrink each count one).
    pub changes: u64,
    /// The most memory the host saw plugged.
    pub max_plugged: u64,
    /// The most the host saw still plugged at the end of a shrink period:
    /// memory in use that memd could not unplug yet.
    pub max_kept: u64,
}

impl HotplugFigures {
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "changes": self.changes,
            "max_plugged_bytes": self.max_plugged,
            "max_kept_bytes": self.max_kept,
        })
    }

    pub fn line(&self) -> String {
        format!(
            "hot-plug: {} size changes, up to {} MiB plugged, up to {} MiB kept in use through a shrink",
            self.changes,
            self.max_plugged >> 20,
            self.max_kept >> 20
        )
    }
}

/// Grows and shrinks the device every `period` until `done`, then asks for
/// nothing.
pub(super) fn cycle(qmp: &Path, period: Duration, done: &AtomicBool) -> Result<HotplugFigures> {
    let mut q = Qmp::connect(qmp).map_err(|e| anyhow!(e))?;
    let dev = q.virtio_mem().map_err(|e| anyhow!(e))?;
    let grow = (dev.region_size / 2) / dev.block_size * dev.block_size;
    let mut f = HotplugFigures::default();
    let set = |q: &mut Qmp, bytes: u64, f: &mut HotplugFigures| -> Result<()> {
        q.set_virtio_mem_requested_size(bytes)
            .map_err(|e| anyhow!(e))?;
        f.changes += 1;
        Ok(())
    };
    // Waits out a period (or until done), sampling what is plugged.
    let wait = |q: &mut Qmp, f: &mut HotplugFigures| -> Result<u64> {
        let until = Instant::now() + period;
        let mut plugged = 0;
        while Instant::now() < until && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            plugged = q.virtio_mem().map_err(|e| anyhow!(e))?.plugged_size;
            f.max_plugged = f.max_plugged.max(plugged);
        }
        Ok(plugged)
    };
    while !done.load(Ordering::Relaxed) {
        set(&mut q, grow, &mut f)?;
        wait(&mut q, &mut f)?;
        set(&mut q, 0, &mut f)?;
        let kept = wait(&mut q, &mut f)?;
        f.max_kept = f.max_kept.max(kept);
    }
    set(&mut q, 0, &mut f)?;
    Ok(f)
}
