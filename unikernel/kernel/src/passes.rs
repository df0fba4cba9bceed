//! How long the poll loop's busy passes take: a histogram since boot and
//! one per interval of `INTERVAL_NS`, read by the status view
//! (`memd_wire::LoopPasses`). Recording takes no heap: the counts are
//! fixed arrays; the status reading copies them out.

use memd_wire::{LoopPasses, PassHistogram, PASS_BUCKETS};
use spin::Mutex;

/// The interval `LoopPasses::last` covers.
pub const INTERVAL_NS: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
struct Counts {
    buckets: [u64; PASS_BUCKETS],
    max_ns: u64,
    total_ns: u64,
}

impl Counts {
    const EMPTY: Counts = Counts {
        buckets: [0; PASS_BUCKETS],
        max_ns: 0,
        total_ns: 0,
    };

    fn record(&mut self, ns: u64) {
        self.buckets[memd_wire::passes::pass_bucket(ns)] += 1;
        self.max_ns = self.max_ns.max(ns);
        self.total_ns = self.total_ns.saturating_add(ns);
    }

    fn histogram(&self) -> PassHistogram {
        PassHistogram::from_counts(&self.buckets, self.max_ns, self.total_ns)
    }
}

struct Passes {
    since_boot: Counts,
    /// The interval being filled, and when it began.
    current: Counts,
    current_start: u64,
    /// The last complete interval.
    last: Counts,
}

static PASSES: Mutex<Passes> = Mutex::new(Passes {
    since_boot: Counts::EMPTY,
    current: Counts::EMPTY,
    current_start: 0,
    last: Counts::EMPTY,
});

/// Counts a busy pass from `start` to `end` (uptime nanoseconds).
pub fn record(start: u64, end: u64) {
    let ns = end.saturating_sub(start);
    let mut p = PASSES.lock();
    roll(&mut p, end);
    p.since_boot.record(ns);
    p.current.record(ns);
}

/// Starts a new interval when the current one is over (an interval with
/// no busy pass at all leaves an empty `last`).
fn roll(p: &mut Passes, now: u64) {
    let elapsed = now.saturating_sub(p.current_start);
    if elapsed >= INTERVAL_NS {
        p.last = if elapsed < 2 * INTERVAL_NS {
            p.current
        } else {
            Counts::EMPTY
        };
        p.current = Counts::EMPTY;
        p.current_start = now - now % INTERVAL_NS;
    }
}

/// The figures for the status view, `budget_ns` being the service's turn
/// budget. Allocates: call it outside the allocator's lock.
pub fn snapshot(budget_ns: u64, now: u64) -> LoopPasses {
    let (last, since_boot) = {
        let mut p = PASSES.lock();
        roll(&mut p, now);
        (p.last, p.since_boot)
    };
    LoopPasses {
        budget_ns,
        interval_ns: INTERVAL_NS,
        last: last.histogram(),
        since_boot: since_boot.histogram(),
    }
}
