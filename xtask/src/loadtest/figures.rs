//! What a group of connections did over a run, the ordinary clients' or
//! the noisy neighbours' ([`Figures`]): operations, their rate, latency
//! percentiles overall and per operation kind ([`Lat`]), server errors by
//! kind and code; as JSON fields and as table rows.

use std::collections::BTreeMap;
use std::time::Duration;

use super::tally::Tally;

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

/// A group of connections' figures over a run.
#[derive(Debug)]
pub struct Figures {
    /// Connections in the group.
    pub clients: u32,
    /// From the start until the last of them stopped.
    pub elapsed: Duration,
    pub ops: u64,
    /// Every operation together.
    pub all: Lat,
    /// Each operation kind, by name.
    pub per_kind: Vec<(&'static str, Lat)>,
    /// Server errors by operation kind and code.
    pub errors: BTreeMap<(&'static str, String), u64>,
}

impl Figures {
    /// `clients`' merged tally over `elapsed`.
    pub(super) fn new(clients: u32, elapsed: Duration, mut tally: Tally) -> Figures {
        let (all, per_kind) = tally.latencies();
        Figures {
            clients,
            elapsed,
            ops: tally.ops,
            all,
            per_kind,
            errors: tally.errors,
        }
    }

    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Server errors of every kind and code.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// "16 clients, 10.0 s, 12345 ops, 1234 ops/s".
    pub(super) fn summary(&self) -> String {
        format!(
            "{} clients, {:.1} s, {} ops, {:.0} ops/s",
            self.clients,
            self.elapsed.as_secs_f64(),
            self.ops,
            self.ops_per_sec()
        )
    }

    /// The JSON fields: `clients`, `duration_s`, `ops`, `ops_per_sec`, the
    /// overall percentiles (`p50_us` ... `max_us`), `per_op` (each kind's
    /// count and percentiles), `errors` (the count) and `errors_by_code`
    /// (`"kmalloc:ENOMEM": n`).
    pub(super) fn json_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let lat = |l: &Lat| json!({"count": l.count, "p50_us": l.p50, "p90_us": l.p90, "p99_us": l.p99, "max_us": l.max});
        let per_op: serde_json::Map<_, _> = self
            .per_kind
            .iter()
            .map(|(k, l)| (k.to_string(), lat(l)))
            .collect();
        let by_code: serde_json::Map<_, _> = self
            .errors
            .iter()
            .map(|((k, c), n)| (format!("{k}:{c}"), json!(n)))
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("clients".into(), json!(self.clients));
        m.insert("duration_s".into(), json!(self.elapsed.as_secs_f64()));
        m.insert("ops".into(), json!(self.ops));
        m.insert("ops_per_sec".into(), json!(self.ops_per_sec()));
        for (k, v) in [
            ("p50_us", self.all.p50),
            ("p90_us", self.all.p90),
            ("p99_us", self.all.p99),
            ("max_us", self.all.max),
        ] {
            m.insert(k.into(), json!(v));
        }
        m.insert("per_op".into(), per_op.into());
        m.insert("errors".into(), json!(self.error_count()));
        m.insert("errors_by_code".into(), by_code.into());
        m
    }
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
