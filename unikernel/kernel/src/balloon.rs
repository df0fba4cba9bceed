//! The balloon from the poll loop. Every pass it may move one step:
//!
//! - towards the host's target (read every [`TARGET_PERIOD_NS`] while it is
//!   met, every pass while it is not): one 2 MiB block inflated or
//!   deflated per request, back to back;
//! - else, once a second, free page reporting: free memory in blocks of
//!   2 MiB or more that the host was not told about yet, a batch at a time
//!   back to back until none is left. A block freed and allocated again
//!   between two looks is never reported (Linux looks 2 s after a free).
//!
//! Statistics are refreshed whenever the host has taken the last ones.
//! The request in flight is completed on the next passes.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::drivers::virtio_balloon::BalloonDevice;

/// What the host asks the balloon to hold, in bytes, as last read
/// (`u64::MAX`: no balloon device).
static TARGET_BYTES: AtomicU64 = AtomicU64::new(u64::MAX);

/// [`TARGET_BYTES`], for the status view.
pub fn target_bytes() -> Option<u64> {
    Some(TARGET_BYTES.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX)
}

/// How often unreported free memory is looked for.
const REPORT_PERIOD_NS: u64 = 1_000_000_000;
/// How often the host's target is read while the balloon is at it (a
/// configuration read is a QEMU exit).
const TARGET_PERIOD_NS: u64 = 20_000_000;

pub struct Balloon {
    dev: Option<BalloonDevice>,
    /// When to look for unreported memory next.
    next_report: u64,
    /// When to read the host's target next.
    next_target: u64,
}

impl Balloon {
    pub fn new(dev: Option<BalloonDevice>) -> Balloon {
        Balloon {
            dev,
            next_report: 0,
            next_target: 0,
        }
    }

    /// One pass of the loop at `now`: completes the request in flight or
    /// starts the next; true while the device holds a request (the loop
    /// then does not halt).
    pub fn pass(&mut self, now: u64) -> bool {
        let Some(dev) = &mut self.dev else {
            return false;
        };
        // Statistics, when the host took the last ones.
        if dev.stats_wanted() {
            let mm = crate::ALLOC.lock();
            dev.refresh_stats(&mm);
        }
        if dev.busy() {
            let mut mm = crate::ALLOC.lock();
            if dev.poll(&mut mm) {
                // Another step may follow at once.
                self.next_target = now;
            }
            return dev.busy();
        }
        if now >= self.next_target {
            let target = dev.target_bytes();
            TARGET_BYTES.store(target, Ordering::Relaxed);
            let mut mm = crate::ALLOC.lock();
            if dev.step(&mut mm, target) {
                return true;
            }
            self.next_target = now + TARGET_PERIOD_NS;
        }
        if now >= self.next_report {
            let mut mm = crate::ALLOC.lock();
            if dev.start(&mut mm) == 0 {
                // Nothing left to report until the next look.
                self.next_report = now + REPORT_PERIOD_NS;
            }
        }
        dev.busy()
    }
}
