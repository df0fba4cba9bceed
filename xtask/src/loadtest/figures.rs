//! What a group of connections did over a run, the ordinary clients' or
//! the noisy neighbours' ([`Figures`]): operations, their rate, latency
//! percentiles overall and per operation kind ([`Lat`]), server errors by
//! kind and code; as JSON fields and as table rows.

use std::collections::BTreeMap;
use std::time::Duration;

use super::latency::Lat;
use super::tally::Tally;

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
