//! What a load-test run measured, and how it is printed: latency
//! percentiles per operation kind, errors by code, the guest's busy and
//! halted time, the memory baseline, as a table or as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use super::{ExhaustFigures, Profile};

/// Percentiles of one operation kind, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Lat {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

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

/// Fault counters after a run (both targets).
#[derive(Debug, Clone, Default)]
pub struct FaultFigures {
    pub probability: u8,
    pub injected: u64,
    pub calls: u64,
}

/// What one run measured.
#[derive(Debug)]
pub struct Report {
    pub profile: Profile,
    pub clients: u32,
    pub elapsed: Duration,
    pub ops: u64,
    pub all: Lat,
    pub per_kind: Vec<(&'static str, Lat)>,
    pub errors: BTreeMap<(&'static str, String), u64>,
    pub enomem: u64,
    /// ENOSPC from a full global cache or pool table (explained).
    pub table_full: u64,
    /// Errors no injected fault explains.
    pub unexplained: u64,
    pub fatal: Vec<String>,
    pub faults: Option<FaultFigures>,
    pub baseline: u64,
    pub after: u64,
    pub baseline_restored: bool,
    /// meminfo fields that differ between the baseline and the end
    /// (name, baseline, after), for diagnosis.
    pub meminfo_diff: Vec<(String, u64, u64)>,
    pub check_ok: Result<(), String>,
    /// Exhaustion profile: what was seen (None for other profiles).
    pub exhaust: Option<ExhaustFigures>,
    /// The guest's busy time during the run (`Status::busy_ns`), if it
    /// measures it.
    pub busy_ns: Option<u64>,
    /// The guest's time halted while idle during the run
    /// (`Status::halted_ns`), if it measures it.
    pub halted_ns: Option<u64>,
    /// Whether the guest's clock counted instructions (`--icount`).
    pub icount: bool,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Whether the run passed: no unexplained error, no dead client,
    /// memory back at its baseline, the invariant checkers clean.
    pub fn passed(&self) -> bool {
        self.unexplained == 0
            && self.fatal.is_empty()
            && self.baseline_restored
            && self.check_ok.is_ok()
            && self.exhaust.as_ref().is_none_or(|e| e.problems.is_empty())
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let per: serde_json::Map<String, serde_json::Value> = self
            .per_kind
            .iter()
            .map(|(k, l)| {
                (
                    k.to_string(),
                    json!({"count": l.count, "p50_us": l.p50, "p90_us": l.p90, "p99_us": l.p99, "max_us": l.max}),
                )
            })
            .collect();
        let by_code: serde_json::Map<String, serde_json::Value> = self
            .errors
            .iter()
            .map(|((k, c), n)| (format!("{k}:{c}"), json!(n)))
            .collect();
        json!({
            "profile": format!("{:?}", self.profile).to_lowercase(),
            "clients": self.clients,
            "duration_s": self.elapsed.as_secs_f64(),
            "ops": self.ops,
            "ops_per_sec": self.ops_per_sec(),
            "p50_us": self.all.p50,
            "p90_us": self.all.p90,
            "p99_us": self.all.p99,
            "max_us": self.all.max,
            "guest_busy_ns": self.busy_ns,
            "guest_halted_ns": self.halted_ns,
            "icount": self.icount,
            "per_op": per,
            "errors": self.errors.values().sum::<u64>(),
            "errors_by_code": by_code,
            "enomem": self.enomem,
            "table_full": self.table_full,
            "unexplained_errors": self.unexplained,
            "client_failures": self.fatal,
            "faults": self.faults.as_ref().map(|f| json!({"probability": f.probability, "injected": f.injected, "calls": f.calls})),
            "baseline_bytes": self.baseline,
            "after_bytes": self.after,
            "baseline_restored": self.baseline_restored,
            "meminfo_diff": self.meminfo_diff.iter().map(|(k, a, b)| json!({"field": k, "baseline": a, "after": b})).collect::<Vec<_>>(),
            "check": match &self.check_ok { Ok(()) => "ok".to_string(), Err(e) => e.clone() },
            "exhaust": self.exhaust.as_ref().map(|e| e.to_json()),
            "passed": self.passed(),
        })
    }

    pub fn print(&self) {
        println!(
            "loadtest: {:?} profile, {} clients, {:.1} s, {} ops, {:.0} ops/s",
            self.profile,
            self.clients,
            self.elapsed.as_secs_f64(),
            self.ops,
            self.ops_per_sec()
        );
        println!(
            "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "operation", "count", "p50 us", "p90 us", "p99 us", "max us"
        );
        for (k, l) in self.per_kind.iter().chain([("all", self.all)].iter()) {
            println!(
                "{:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                k, l.count, l.p50, l.p90, l.p99, l.max
            );
        }
        if let Some(busy) = self.busy_ns {
            let per_op = busy as f64 / self.ops.max(1) as f64;
            if self.icount {
                println!(
                    "guest: {:.0} instructions per operation (icount; busy {busy} instructions)",
                    per_op
                );
            } else {
                println!(
                    "guest: busy {:.3} s{} of {:.3} s, {:.2} us per operation",
                    busy as f64 / 1e9,
                    self.halted_ns
                        .map(|h| format!(", halted {:.3} s", h as f64 / 1e9))
                        .unwrap_or_default(),
                    self.elapsed.as_secs_f64(),
                    per_op / 1e3
                );
            }
        }
        if self.errors.is_empty() {
            println!("errors: none");
        } else {
            println!("errors:");
            for ((k, c), n) in &self.errors {
                println!("  {k:<20} {c:<8} {n}");
            }
        }
        if self.table_full > 0 {
            println!(
                "ENOSPC from full global cache/pool tables: {}",
                self.table_full
            );
        }
        println!("unexplained errors: {}", self.unexplained);
        if let Some(f) = &self.faults {
            println!(
                "faults: {} % probability, {} injected in {} eligible allocations; {} ENOMEM replies",
                f.probability, f.injected, f.calls, self.enomem
            );
        }
        for f in &self.fatal {
            println!("client failure: {f}");
        }
        if let Some(e) = &self.exhaust {
            e.print();
        }
        println!(
            "free memory: baseline {} bytes, after {} bytes: {}",
            self.baseline,
            self.after,
            if self.baseline_restored {
                "restored exactly".to_string()
            } else {
                format!(
                    "NOT restored ({:+} bytes)",
                    self.after as i128 - self.baseline as i128
                )
            }
        );
        for (k, a, b) in &self.meminfo_diff {
            println!("  meminfo {k}: {a} -> {b} ({:+})", *b as i128 - *a as i128);
        }
        println!(
            "invariant check: {}",
            match &self.check_ok {
                Ok(()) => "ok",
                Err(e) => e.as_str(),
            }
        );
        println!("verdict: {}", if self.passed() { "PASS" } else { "FAIL" });
    }
}
