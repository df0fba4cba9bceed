//! What a load-test run measured, and how it is printed: latency
//! percentiles per operation kind, errors by code, the guest's busy and
//! halted time, the service loop's passes, the noisy neighbours' own
//! figures, the memory baseline, as a table or as JSON.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;

use super::{ExhaustFigures, NoisyFigures, PassFigures, Profile};

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

/// Latency percentiles per operation kind, as JSON.
/// Operations per second over `elapsed`.
pub(super) fn per_sec(ops: u64, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// One operation kind's row of the latency tables.
pub(super) fn kind_row(kind: &str, l: &Lat) -> String {
    format!(
        "{kind:<20} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        l.count, l.p50, l.p90, l.p99, l.max
    )
}

pub(super) fn per_op_json(per_kind: &[(&'static str, Lat)]) -> serde_json::Value {
    per_kind
        .iter()
        .map(|(k, l)| {
            (
                k.to_string(),
                serde_json::json!({"count": l.count, "p50_us": l.p50, "p90_us": l.p90, "p99_us": l.p99, "max_us": l.max}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Errors by operation kind and code (`"kmalloc:ENOMEM"`), as JSON.
pub(super) fn errors_json(errors: &BTreeMap<(&'static str, String), u64>) -> serde_json::Value {
    errors
        .iter()
        .map(|((k, c), n)| (format!("{k}:{c}"), serde_json::json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
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
    /// The noisy neighbours' figures (`--noisy`); the fields above count
    /// the clients only.
    pub noisy: Option<NoisyFigures>,
    /// The service loop's passes during the run, if it reports them.
    pub loop_passes: Option<PassFigures>,
}

impl Report {
    pub fn ops_per_sec(&self) -> f64 {
        per_sec(self.ops, self.elapsed)
    }

    /// Whether the run passed: no unexplained error, no dead client,
    /// memory back at its baseline, the invariant checkers clean, and no
    /// noisy neighbour died or saw a wrong checksum or broken invariant.
    pub fn passed(&self) -> bool {
        self.unexplained == 0
            && self.fatal.is_empty()
            && self.baseline_restored
            && self.check_ok.is_ok()
            && self.exhaust.as_ref().is_none_or(|e| e.problems.is_empty())
            && self.noisy.as_ref().is_none_or(|n| n.passed())
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
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
            "loop_passes": self.loop_passes.map(PassFigures::to_json),
            "noisy": self.noisy.as_ref().map(|n| n.to_json()),
            "per_op": per_op_json(&self.per_kind),
            "errors": self.errors.values().sum::<u64>(),
            "errors_by_code": errors_json(&self.errors),
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
            println!("{}", kind_row(k, l));
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
                    "guest: busy {:.3} s{} of {:.3} s, {:.2} us per operation{}",
                    busy as f64 / 1e9,
                    self.halted_ns
                        .map(|h| format!(", halted {:.3} s", h as f64 / 1e9))
                        .unwrap_or_default(),
                    self.elapsed.as_secs_f64(),
                    per_op / 1e3,
                    if self.noisy.is_some() {
                        " (the noisy neighbours' work included)"
                    } else {
                        ""
                    }
                );
            }
        }
        if let Some(p) = &self.loop_passes {
            println!("{}", p.line());
        }
        if let Some(n) = &self.noisy {
            n.print();
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

#[cfg(test)]
mod tests {
    use super::super::noisy::Outcome;
    use super::*;

    fn lat(us: f64) -> Lat {
        Lat {
            count: 10,
            p50: us,
            p90: us,
            p99: us,
            max: us,
        }
    }

    fn report() -> Report {
        Report {
            profile: Profile::Mixed,
            clients: 2,
            elapsed: Duration::from_secs(2),
            ops: 100,
            all: lat(5.0),
            per_kind: vec![("kmalloc", lat(5.0))],
            errors: BTreeMap::new(),
            enomem: 0,
            table_full: 0,
            unexplained: 0,
            fatal: Vec::new(),
            faults: None,
            baseline: 1 << 20,
            after: 1 << 20,
            baseline_restored: true,
            meminfo_diff: Vec::new(),
            check_ok: Ok(()),
            exhaust: None,
            busy_ns: None,
            halted_ns: None,
            icount: false,
            noisy: None,
            loop_passes: None,
        }
    }

    fn noisy() -> NoisyFigures {
        let mut o = Outcome::default();
        o.tally.lat.insert("stress", vec![2_000_000, 4_000_000]);
        o.tally.ops = 66;
        o.tally.errors.insert(("stress", "E2BIG".into()), 1);
        NoisyFigures::new(3, Duration::from_secs(3), o)
    }

    #[test]
    fn without_noisy_or_passes_their_fields_are_null() {
        let r = report();
        let j = r.to_json();
        assert!(j["noisy"].is_null() && j["loop_passes"].is_null());
        assert_eq!(j["ops"], 100);
        assert_eq!(j["ops_per_sec"], 50.0);
        assert_eq!(j["per_op"]["kmalloc"]["count"], 10);
        assert!(r.passed());
    }

    #[test]
    fn noisy_figures_stand_apart() {
        let mut r = report();
        r.noisy = Some(noisy());
        r.loop_passes = Some(PassFigures {
            budget_us: 200.0,
            passes: 812,
            p50_us: 40.0,
            p99_us: 410.0,
            max_us: 630.0,
        });
        let j = r.to_json();
        // The top level still counts the clients only.
        assert_eq!(
            (j["ops"].as_u64(), j["p99_us"].as_f64()),
            (Some(100), Some(5.0))
        );
        let n = &j["noisy"];
        assert_eq!(n["clients"], 3);
        assert_eq!(n["ops"], 66);
        assert_eq!(n["ops_per_sec"], 22.0);
        assert_eq!(n["max_us"], 4000.0);
        assert_eq!(n["per_op"]["stress"]["count"], 2);
        assert_eq!(n["errors_by_code"]["stress:E2BIG"], 1);
        assert_eq!(j["loop_passes"]["passes"], 812);
        assert_eq!(j["loop_passes"]["budget_us"], 200.0);
        // Server errors of the neighbours do not fail the run.
        assert!(r.passed());
    }

    #[test]
    fn a_wrong_checksum_or_dead_neighbour_fails_the_run() {
        let mut r = report();
        let mut n = noisy();
        n.mismatches = 1;
        r.noisy = Some(n);
        assert!(!r.passed());
        let mut n = noisy();
        n.fatal
            .push("noisy client 0: stress: connection reset".into());
        r.noisy = Some(n);
        assert!(!r.passed());
        let mut n = noisy();
        n.stress_check_failures = 1;
        r.noisy = Some(n);
        assert!(!r.passed());
    }
}
