//! `cargo xtask fuzz`: the proptest fuzz targets with many more cases than
//! `cargo test` runs (frame decoding in memd-wire, random sessions and
//! hostile well-formed frames over memd-mm in memd-service, memd-mm's
//! operation model), optimised.
//! Failures print the minimal input; keep it as a regression test.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cases per fuzz target (PROPTEST_CASES).
    #[arg(long, default_value_t = 20_000)]
    pub cases: u32,
}

/// (package, test target).
const TARGETS: [(&str, &str); 5] = [
    ("memd-wire", "fuzz_frames"),
    ("memd-service", "fuzz_ops"),
    ("memd-service", "fuzz_hostile"),
    ("memd-service", "bulk"),
    ("memd-mm", "model"),
];

pub fn run(args: &Args) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for (pkg, test) in TARGETS {
        let t = Instant::now();
        eprintln!("fuzz: {pkg} {test}, {} cases", args.cases);
        let status = Command::new(&cargo)
            .current_dir(crate::build::repo_root())
            .args(["test", "--release", "-p", pkg, "--test", test])
            .env("PROPTEST_CASES", args.cases.to_string())
            .status()
            .with_context(|| format!("running cargo test -p {pkg} --test {test}"))?;
        if !status.success() {
            bail!("fuzz target {pkg}/{test} failed");
        }
        eprintln!(
            "fuzz: {pkg} {test} passed in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
