//! What a load-test run measured, and how it is printed: the clients'
//! figures (see [`Figures`]), the guest's busy and halted time, the
//! service loop's passes, the noisy neighbours' own figures, the memory
//! baseline, as a table or as JSON.

use std::time::Duration;

use super::baseline::Ending;
use super::figures::Figures;
use super::latency::{kind_header, kind_row};
use super::noisy::Outcome;
use super::tally::Tally;
use super::HotplugFigures;
use super::{Args, ExhaustFigures, PassFigures, Profile};

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
    /// The clients' figures (the noisy neighbours' are in `noisy`).
    pub load: Figures,
    pub enomem: u64,
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
    /// What `--hotplug-cycle` did.
    pub hotplug: Option<HotplugFigures>,
}

impl Report {
    /// The report of `args`' run whose clients' merged tally is `tally`
    /// over `elapsed`, with `unexplained` errors and memory as `end` found
    /// it; nothing else measured (no faults, guest times, passes, noisy
    /// neighbours or exhaustion figures).
    pub(super) fn new(
        args: &Args,
        elapsed: Duration,
        tally: Tally,
        unexplained: u64,
        end: Ending,
    ) -> Report {
        Report {
            profile: args.profile,
            enomem: tally.enomem,
            load: Figures::new(args.clients, elapsed, tally),
            unexplained,
            fatal: Vec::new(),
            faults: None,
            baseline: end.baseline,
            after: end.after,
            baseline_restored: end.after == end.baseline,
            meminfo_diff: end.meminfo_diff,
            check_ok: end.check_ok,
            exhaust: None,
            busy_ns: None,
            halted_ns: None,
            icount: args.guest.icount,
            noisy: None,
            loop_passes: None,
            hotplug: None,
        }
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
        let mut m = self.load.json_fields();
        let rest = json!({
            "profile": format!("{:?}", self.profile).to_lowercase(),
            "guest_busy_ns": self.busy_ns,
            "guest_halted_ns": self.halted_ns,
            "icount": self.icount,
            "loop_passes": self.loop_passes.map(PassFigures::to_json),
            "noisy": self.noisy.as_ref().map(|n| n.to_json()),
            "hotplug": self.hotplug.map(HotplugFigures::to_json),
            "enomem": self.enomem,
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
        });
        if let serde_json::Value::Object(rest) = rest {
            m.extend(rest);
        }
        m.into()
    }

    pub fn print(&self) {
        let load = &self.load;
        println!("loadtest: {:?} profile, {}", self.profile, load.summary());
        println!("{}", kind_header());
        for (k, l) in load.per_kind.iter().chain([("all", load.all)].iter()) {
            println!("{}", kind_row(k, l));
        }
        if let Some(busy) = self.busy_ns {
            let per_op = busy as f64 / load.ops.max(1) as f64;
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
                    load.elapsed.as_secs_f64(),
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
        if let Some(h) = &self.hotplug {
            println!("{}", h.line());
        }
        if load.errors.is_empty() {
            println!("errors: none");
        } else {
            println!("errors:");
            for ((k, c), n) in &load.errors {
                println!("  {k:<20} {c:<8} {n}");
            }
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

/// The noisy clients' figures for the report.
#[derive(Debug)]
pub struct NoisyFigures {
    pub load: Figures,
    pub mismatches: u64,
    pub stress_check_failures: u64,
    pub fatal: Vec<String>,
}

impl NoisyFigures {
    pub(super) fn new(clients: u32, elapsed: Duration, o: Outcome) -> NoisyFigures {
        NoisyFigures {
            load: Figures::new(clients, elapsed, o.tally),
            mismatches: o.mismatches,
            stress_check_failures: o.stress_check_failures,
            fatal: o.fatal,
        }
    }

    /// Whether nothing went wrong that a server error does not explain:
    /// no connection failed, no checksum differed, no stress run found a
    /// broken invariant.
    pub fn passed(&self) -> bool {
        self.fatal.is_empty() && self.mismatches == 0 && self.stress_check_failures == 0
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut m = self.load.json_fields();
        m.insert("checksum_mismatches".into(), self.mismatches.into());
        m.insert(
            "stress_check_failures".into(),
            self.stress_check_failures.into(),
        );
        m.insert("client_failures".into(), self.fatal.clone().into());
        m.into()
    }

    pub fn print(&self) {
        let l = &self.load;
        println!(
            "noisy neighbours: {}, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            l.summary(),
            l.all.p50,
            l.all.p99,
            l.all.max
        );
        for (k, lat) in &l.per_kind {
            println!("  {}", kind_row(k, lat));
        }
        for ((k, c), n) in &l.errors {
            println!("  error {k:<20} {c:<8} {n}");
        }
        println!(
            "  checksum mismatches: {}, stress runs with broken invariants: {}",
            self.mismatches, self.stress_check_failures
        );
        for f in &self.fatal {
            println!("  noisy client failure: {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut tally = Tally::default();
        tally.lat.insert("kmalloc", vec![5_000; 10]);
        tally.ops = 100;
        let end = Ending {
            baseline: 1 << 20,
            after: 1 << 20,
            meminfo_diff: Vec::new(),
            check_ok: Ok(()),
        };
        let args = Args {
            clients: 2,
            ..Args::smoke(2, 2, None)
        };
        Report::new(&args, Duration::from_secs(2), tally, 0, end)
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
        assert_eq!(j["profile"], "mixed");
        assert_eq!(j["clients"], 2);
        assert_eq!(j["ops"], 100);
        assert_eq!(j["p99_us"], 5.0);
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
