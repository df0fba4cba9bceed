//! What the clients count as they run: latency samples and errors per
//! operation kind ([`Tally`]), and the progress they share with the run
//! ([`Shared`]): the operations claimed, the deadline, the stop flag.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use memd_client::wire::{self, errno};

use super::latency::{percentiles, Lat};

/// Latency samples (ns) per operation kind, errors per (kind, code).
#[derive(Default, Debug)]
pub(super) struct Tally {
    pub lat: HashMap<&'static str, Vec<u64>>,
    pub errors: BTreeMap<(&'static str, String), u64>,
    /// ENOMEM replies (explained only by injected faults in the mixed
    /// profile).
    pub enomem: u64,
    pub ops: u64,
}

impl Tally {
    /// Times `f` as one operation of `kind`, keeping its latency and, when
    /// the server refused it, the error; a server error comes back as
    /// `Ok(Err(e))`, a connection or protocol failure as `Err`.
    pub fn timed<T>(
        &mut self,
        kind: &'static str,
        f: impl FnOnce() -> memd_client::Result<T>,
    ) -> Result<Result<T, wire::WireError>, memd_client::Error> {
        let t = Instant::now();
        let r = f();
        self.lat
            .entry(kind)
            .or_default()
            .push(t.elapsed().as_nanos() as u64);
        self.ops += 1;
        match r {
            Ok(v) => Ok(Ok(v)),
            Err(memd_client::Error::Server(e)) => {
                self.record_error(kind, &e);
                Ok(Err(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Percentiles of every operation together, and of each kind (by name).
    pub fn latencies(&mut self) -> (Lat, Vec<(&'static str, Lat)>) {
        let mut all: Vec<u64> = self.lat.values().flatten().copied().collect();
        let mut per_kind: Vec<(&'static str, Lat)> = self
            .lat
            .iter_mut()
            .map(|(k, v)| (*k, percentiles(v)))
            .collect();
        per_kind.sort_by_key(|(k, _)| *k);
        (percentiles(&mut all), per_kind)
    }

    /// Counts a server error by operation kind and code; ENOMEM also counts
    /// toward the total that injected faults must explain.
    pub fn record_error(&mut self, kind: &'static str, e: &wire::WireError) {
        if e.code == errno::ENOMEM {
            self.enomem += 1;
        }
        *self
            .errors
            .entry((kind, e.code_name().to_string()))
            .or_default() += 1;
    }

    pub fn merge(&mut self, o: Tally) {
        for (k, mut v) in o.lat {
            self.lat.entry(k).or_default().append(&mut v);
        }
        for (k, n) in o.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.enomem += o.enomem;
        self.ops += o.ops;
    }
}

/// Shared progress of a run.
pub(super) struct Shared {
    pub stop: AtomicBool,
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    pub budget: Option<u64>,
    pub deadline: Instant,
}

impl Shared {
    /// Progress of a run that ends after `budget` operations or at
    /// `deadline`, whichever comes first.
    pub fn new(budget: Option<u64>, deadline: Instant) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            budget,
            deadline,
        }
    }

    /// Claims one operation from the budget; false when the run is over.
    pub fn claim(&self, n: u64) -> bool {
        if self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        let before = self.ops.fetch_add(n, Ordering::Relaxed);
        match self.budget {
            Some(b) => before < b,
            None => true,
        }
    }

    /// Whether the clients may still claim work, claiming none: the noisy
    /// neighbours go on while this holds.
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && Instant::now() < self.deadline
            && self
                .budget
                .is_none_or(|b| self.ops.load(Ordering::Relaxed) < b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget_and_deadline_bound_claims() {
        let s = Shared::new(Some(3), Instant::now() + Duration::from_secs(60));
        assert!(s.claim(1) && s.claim(1) && s.claim(1));
        assert!(!s.claim(1));
        let late = Shared {
            budget: None,
            deadline: Instant::now(),
            ..s
        };
        assert!(!late.claim(1));
    }

    #[test]
    fn running_follows_the_claims_without_claiming() {
        let s = Shared::new(Some(2), Instant::now() + Duration::from_secs(60));
        assert!(s.running() && s.running());
        assert_eq!(s.ops.load(Ordering::Relaxed), 0);
        assert!(s.claim(1) && s.running());
        assert!(s.claim(1) && !s.running());
        let unbounded = Shared {
            budget: None,
            ops: AtomicU64::new(1 << 40),
            ..s
        };
        assert!(unbounded.running());
        unbounded.stop.store(true, Ordering::Relaxed);
        assert!(!unbounded.running());
        let late = Shared {
            stop: AtomicBool::new(false),
            deadline: Instant::now(),
            ..unbounded
        };
        assert!(!late.running());
    }
}
