//! Test support, not part of the protocol: what the property tests of
//! memd-wire and memd-service share. Built only with the `proptest`
//! feature, which those crates' tests enable; the kernel never does.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use crate::MAX_BATCH_OPS;

/// The cases a property test runs: `PROPTEST_CASES` if it is set to a
/// number (`cargo xtask fuzz` sets it), `default` otherwise.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// The fuzz targets' proptest settings: [`proptest_cases`]`(default_cases)`
/// cases, and no failure file (failures print the minimal input; keep it
/// as a regression test).
pub fn proptest_config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: proptest_cases(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Batch counts: at, just around, and far above [`MAX_BATCH_OPS`], up to
/// `u64::MAX`.
pub fn batch_counts() -> impl Strategy<Value = u64> {
    let max = MAX_BATCH_OPS as u64;
    prop_oneof![
        0..=max,
        (max + 1)..=(max + 3),
        prop::sample::select(std::vec![max, max + 1, u32::MAX as u64, 1 << 63, u64::MAX]),
        (max + 1)..=u64::MAX,
    ]
}
