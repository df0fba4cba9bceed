//! The service loop's passes during a run: how many passes did work and
//! how long they took, from the pass histograms of the status read at the
//! run's start and end. A long pass is time every other connection waited.

use memd_client::wire::Status;

/// Pass durations over a run, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassFigures {
    /// The most one connection's turn may take.
    pub budget_us: f64,
    /// Passes that did work.
    pub passes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl PassFigures {
    /// The passes between two status readings; None unless both report
    /// the loop's passes.
    pub fn between(start: &Status, end: &Status) -> Option<PassFigures> {
        let (a, b) = (start.loop_passes.as_ref()?, end.loop_passes.as_ref()?);
        let d = b.since_boot.since(&a.since_boot);
        let us = |ns: u64| ns as f64 / 1e3;
        Some(PassFigures {
            budget_us: us(b.budget_ns),
            passes: d.passes(),
            p50_us: us(d.quantile(500)),
            p99_us: us(d.quantile(990)),
            max_us: us(d.max_ns),
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "budget_us": self.budget_us,
            "passes": self.passes,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
        })
    }

    /// The table line.
    pub fn line(&self) -> String {
        format!(
            "loop passes: {} that did work, p50 {:.1} us, p99 {:.1} us, max {:.1} us (budget {:.1} us per turn)",
            self.passes, self.p50_us, self.p99_us, self.max_us, self.budget_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memd_client::wire::{LoopPasses, PassHistogram};

    fn status(h: &PassHistogram) -> Status {
        Status {
            loop_passes: Some(LoopPasses {
                budget_ns: 200_000,
                interval_ns: 1_000_000_000,
                last: PassHistogram::default(),
                since_boot: h.clone(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn figures_cover_only_the_run() {
        let mut h = PassHistogram::default();
        // Before the run: a boot-time pass longer than any in the run.
        h.record(50_000_000);
        for _ in 0..100 {
            h.record(10_000);
        }
        let start = status(&h);
        for _ in 0..98 {
            h.record(40_000);
        }
        h.record(900_000);
        h.record(1_500_000);
        let f = PassFigures::between(&start, &status(&h)).unwrap();
        assert_eq!(f.passes, 100);
        assert_eq!(f.budget_us, 200.0);
        assert!((40.0..=50.0).contains(&f.p50_us), "{f:?}");
        assert!((900.0..=1125.0).contains(&f.p99_us), "{f:?}");
        // Not the boot-time maximum: the top bucket that grew.
        assert!((1500.0..=1875.0).contains(&f.max_us), "{f:?}");
        assert!(f.line().contains("100 that did work"), "{}", f.line());
        assert_eq!(f.to_json()["passes"], 100);
    }

    #[test]
    fn none_unless_both_readings_have_passes() {
        let with = status(&PassHistogram::default());
        let without = Status::default();
        assert_eq!(PassFigures::between(&without, &with), None);
        assert_eq!(PassFigures::between(&with, &without), None);
        let empty = PassFigures::between(&with, &with).unwrap();
        assert_eq!((empty.passes, empty.p99_us, empty.max_us), (0, 0.0, 0.0));
    }
}
