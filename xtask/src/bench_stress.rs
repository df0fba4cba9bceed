//! `cargo xtask bench stress`: memd's in-guest stress run on one CPU
//! against the same run on several at once (`memctl stress --cpus N`), in
//! one guest, the CPU counts taking turns run after run, so the ratio
//! compares like with like on a noisy host.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
#[command(mut_arg("smp", |a| a.default_value("2")))]
pub struct StressBenchArgs {
    /// CPU counts to compare, comma-separated (each at most --smp).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
    pub cpus: Vec<u32>,
    /// Operations per run.
    #[arg(long, default_value_t = 4_000_000)]
    pub ops: u64,
    /// Runs per CPU count.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The guest: TCG and 2 CPUs unless told otherwise.
    #[command(flatten)]
    pub guest: GuestArgs,
}

pub fn run(args: &StressBenchArgs) -> Result<()> {
    if args.runs == 0 || args.cpus.is_empty() {
        bail!("bench stress needs --runs 1 or more and at least one --cpus count");
    }
    if let Some(&n) = args.cpus.iter().find(|&&n| n == 0 || n > args.guest.smp) {
        bail!(
            "--cpus {n}: each count must be 1 to --smp ({})",
            args.guest.smp
        );
    }
    let kernel = crate::build::build_kernel()?;
    let (cfg, accel) = args.guest.config(kernel, "memd.log=warn")?;
    if !args.json {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    let endpoint = Endpoint::temporary("bench-stress")?;
    let cfg = endpoint.serve(cfg).time_bound(Duration::from_secs(
        120 + 30 * (args.runs * args.cpus.len()) as u64,
    ));
    let addr = endpoint.addr();
    let (out, rates) = cfg.run_client(|| -> Result<Vec<Vec<u64>>> {
        let mut c =
            Client::connect(&Options::new(&addr, &endpoint.tokens.operator)).context("connect")?;
        // One run to warm the caches and tables up, not counted.
        c.stress_on(args.ops / 4, 1, 1).context("warm-up run")?;
        let mut rates = vec![Vec::new(); args.cpus.len()];
        for run in 0..args.runs {
            for (i, &cpus) in args.cpus.iter().enumerate() {
                let r = c
                    .stress_on(args.ops, run as u64 + 2, cpus)
                    .with_context(|| format!("stress --cpus {cpus}"))?;
                if !r.check_ok {
                    bail!("stress --cpus {cpus}: the invariant check failed");
                }
                rates[i].push(r.ops_per_sec);
            }
        }
        Ok(rates)
    })?;
    let rates = rates
        .unwrap_or_else(|| Err(anyhow!("the guest never became ready")))
        .map_err(|e| anyhow!("{e:#}\n--- console ---\n{}", out.console()))?;
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let base = median(&rates[0]) as f64;
    if args.json {
        let rows: Vec<_> = args
            .cpus
            .iter()
            .zip(&rates)
            .map(|(cpus, r)| {
                serde_json::json!({
                    "cpus": cpus,
                    "ops_per_sec": r,
                    "median_ops_per_sec": median(r),
                    "vs_first": median(r) as f64 / base,
                })
            })
            .collect();
        let v = serde_json::json!({
            "accel": accel.name(),
            "smp": args.guest.smp,
            "ops": args.ops,
            "rows": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "stress, {} ops a run, {} runs each, {} with {} CPUs (median ops/s, against --cpus {}):",
        args.ops,
        args.runs,
        accel.name(),
        args.guest.smp,
        args.cpus[0]
    );
    for (cpus, r) in args.cpus.iter().zip(&rates) {
        let all: Vec<String> = r
            .iter()
            .map(|x| format!("{:.1}M", *x as f64 / 1e6))
            .collect();
        println!(
            "  --cpus {cpus}: {:.1} M ops/s ({:.2}x)   runs: {}",
            median(r) as f64 / 1e6,
            median(r) as f64 / base,
            all.join(" ")
        );
    }
    Ok(())
}
