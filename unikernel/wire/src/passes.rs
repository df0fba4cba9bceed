//! How long the service loop's passes took: a log-linear histogram of pass
//! durations that a client can subtract from a later one, so the 99th
//! percentile and the longest pass of any interval come from two status
//! readings.

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: a bucket spans at most a quarter of its
/// octave, so a percentile read from the histogram is within 19 % above
/// the true value.
const SUB: u32 = 4;
/// Passes shorter than 2^`LOW` ns (1 µs) share the first bucket.
const LOW: u32 = 10;
/// Passes of 2^`HIGH` ns (17 s) or longer share the last bucket.
const HIGH: u32 = 34;
/// Buckets in a [`PassHistogram`].
pub const PASS_BUCKETS: usize = ((HIGH - LOW) * SUB + 2) as usize;

/// The bucket of a pass of `ns` nanoseconds.
pub fn pass_bucket(ns: u64) -> usize {
    if ns < 1 << LOW {
        return 0;
    }
    let octave = 63 - ns.leading_zeros();
    if octave >= HIGH {
        return PASS_BUCKETS - 1;
    }
    let sub = (ns >> (octave - SUB.trailing_zeros())) as u32 & (SUB - 1);
    (1 + (octave - LOW) * SUB + sub) as usize
}

/// The longest pass bucket `i` holds (`u64::MAX` for the last).
pub fn pass_bucket_upper(i: usize) -> u64 {
    if i == 0 {
        return (1 << LOW) - 1;
    }
    if i >= PASS_BUCKETS - 1 {
        return u64::MAX;
    }
    let i = i as u32 - 1;
    let octave = LOW + i / SUB;
    let step = 1u64 << (octave - SUB.trailing_zeros());
    (1u64 << octave) + step * u64::from(i % SUB + 1) - 1
}

/// Pass durations, by [`pass_bucket`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassHistogram {
    /// Passes per bucket; [`PASS_BUCKETS`] long.
    pub counts: Vec<u64>,
    /// The longest pass recorded, in nanoseconds.
    pub max_ns: u64,
    /// All recorded passes' time, in nanoseconds.
    pub total_ns: u64,
}

impl Default for PassHistogram {
    fn default() -> Self {
        PassHistogram {
            counts: vec![0; PASS_BUCKETS],
            max_ns: 0,
            total_ns: 0,
        }
    }
}

impl PassHistogram {
    /// A histogram of `counts` (at most [`PASS_BUCKETS`] used).
    pub fn from_counts(counts: &[u64], max_ns: u64, total_ns: u64) -> Self {
        let mut h = PassHistogram::default();
        for (c, n) in h.counts.iter_mut().zip(counts) {
            *c = *n;
        }
        h.max_ns = max_ns;
        h.total_ns = total_ns;
        h
    }

    /// Counts one pass of `ns`.
    pub fn record(&mut self, ns: u64) {
        if let Some(c) = self.counts.get_mut(pass_bucket(ns)) {
            *c += 1;
        }
        self.max_ns = self.max_ns.max(ns);
        self.total_ns = self.total_ns.saturating_add(ns);
    }

    /// Passes recorded.
    pub fn passes(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The pass duration `permille`/1000 of passes do not exceed: the upper
    /// bound of the bucket that rank falls in, never above the longest
    /// pass. 0 when empty.
    pub fn quantile(&self, permille: u32) -> u64 {
        let n = self.passes();
        if n == 0 {
            return 0;
        }
        let rank = (n * u64::from(permille.min(1000))).div_ceil(1000).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return pass_bucket_upper(i).min(self.max_ns);
            }
        }
        self.max_ns
    }

    /// The passes recorded after `earlier`, a reading of the same
    /// histogram. The longest of them is exact when it set a new maximum,
    /// else the upper bound of the highest bucket that grew.
    pub fn since(&self, earlier: &PassHistogram) -> PassHistogram {
        let mut d = PassHistogram::default();
        for (i, c) in d.counts.iter_mut().enumerate() {
            let now = self.counts.get(i).copied().unwrap_or(0);
            let then = earlier.counts.get(i).copied().unwrap_or(0);
            *c = now.saturating_sub(then);
        }
        d.total_ns = self.total_ns.saturating_sub(earlier.total_ns);
        d.max_ns = if self.max_ns > earlier.max_ns {
            self.max_ns
        } else {
            d.counts
                .iter()
                .rposition(|c| *c > 0)
                .map_or(0, |i| pass_bucket_upper(i).min(self.max_ns))
        };
        d
    }
}

/// The service loop's timing ([`crate::Status::loop_passes`]): how long
/// the passes that did work took, since boot and over the last interval.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoopPasses {
    /// The most one connection's turn may take before its work is set
    /// aside for the next pass, in nanoseconds.
    pub budget_ns: u64,
    /// The interval `last` covers, in nanoseconds.
    pub interval_ns: u64,
    /// The last complete interval's passes.
    pub last: PassHistogram,
    /// Every pass since boot.
    pub since_boot: PassHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_their_values() {
        let mut prev = 0;
        for i in 0..PASS_BUCKETS - 1 {
            let up = pass_bucket_upper(i);
            assert!(up > prev || i == 0, "bucket {i}");
            assert_eq!(pass_bucket(up), i, "upper bound of bucket {i}");
            assert_eq!(pass_bucket(up + 1), i + 1, "just above bucket {i}");
            prev = up;
        }
        assert_eq!(pass_bucket(u64::MAX), PASS_BUCKETS - 1);
    }

    #[test]
    fn quantiles_and_differences() {
        let mut h = PassHistogram::default();
        for _ in 0..990 {
            h.record(50_000);
        }
        for _ in 0..10 {
            h.record(3_000_000);
        }
        let q50 = h.quantile(500);
        assert!((50_000..=50_000 * 5 / 4).contains(&q50), "{q50}");
        assert!(h.quantile(990) < 3_000_000);
        assert_eq!(h.quantile(999), 3_000_000);
        assert_eq!(h.max_ns, 3_000_000);

        let earlier = h.clone();
        for _ in 0..100 {
            h.record(200_000);
        }
        let d = h.since(&earlier);
        assert_eq!(d.passes(), 100);
        assert!((200_000..=250_000).contains(&d.max_ns), "{}", d.max_ns);
        assert_eq!(d.total_ns, 100 * 200_000);
        h.record(9_000_000);
        assert_eq!(h.since(&earlier).max_ns, 9_000_000);
        assert_eq!(PassHistogram::default().quantile(990), 0);
    }
}
