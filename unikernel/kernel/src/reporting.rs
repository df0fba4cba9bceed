//! Free page reporting from the poll loop: once a second, free memory in
//! blocks of 2 MiB or more that the host was not told about yet goes to
//! the balloon's reporting queue, a batch at a time back to back until none
//! is left; the batch in flight is completed on the next passes. A block
//! freed and allocated again between two looks is never reported (Linux
//! looks 2 s after a free).

use crate::drivers::virtio_balloon::BalloonDevice;

/// How often unreported free memory is looked for.
const PERIOD_NS: u64 = 1_000_000_000;

pub struct Reporter {
    dev: Option<BalloonDevice>,
    /// When to look for unreported memory next.
    next: u64,
}

impl Reporter {
    pub fn new(dev: Option<BalloonDevice>) -> Reporter {
        Reporter { dev, next: 0 }
    }

    /// One pass of the loop at `now`: completes the report in flight or
    /// starts the next; true while the device holds memory (the loop then
    /// does not halt).
    pub fn pass(&mut self, now: u64) -> bool {
        let Some(dev) = &mut self.dev else {
            return false;
        };
        if !dev.busy() && now < self.next {
            return false;
        }
        let mut mm = crate::ALLOC.lock();
        if dev.busy() {
            dev.poll(&mut mm);
        } else if dev.start(&mut mm) == 0 {
            // Nothing left to report until the next look.
            self.next = now + PERIOD_NS;
        }
        dev.busy()
    }

}
