//! Latency percentiles of one operation kind, and their row in the
//! report's table.

/// Percentiles of one operation kind, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The percentiles of latency samples in nanoseconds (sorts `v`).
pub(super) fn percentiles(v: &mut [u64]) -> Lat {
    v.sort_unstable();
    let at = |q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    Lat {
        count: v.len() as u64,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// The header of the latency table.
pub(super) fn kind_header() -> String {
    format!(
        "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "operation", "count", "p50 us", "p90 us", "p99 us", "max us"
    )
}

/// One operation kind's row of the latency table.
pub(super) fn kind_row(kind: &str, l: &Lat) -> String {
    format!(
        "{kind:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        l.count, l.p50, l.p90, l.p99, l.max
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let l = percentiles(&mut v);
        assert_eq!(l.count, 100);
        assert_eq!(l.p50, 50.0);
        assert_eq!(l.p90, 90.0);
        assert_eq!(l.p99, 99.0);
        assert_eq!(l.max, 100.0);
        let mut one = vec![7000];
        assert_eq!(percentiles(&mut one).p50, 7.0);
        assert_eq!(percentiles(&mut []).p99, 0.0);
    }
}
