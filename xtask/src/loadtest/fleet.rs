//! `cargo xtask loadtest --fleet FILE`: the clients spread over every memd
//! of a fleet (`cargo xtask libvirt start` keeps `.memd/fleet.json`), one
//! load test per member at once, each with its own baseline.

use std::path::Path;

use anyhow::{bail, Result};
use memd_client::fleet::Fleet;

use super::against::{run_against, Tokens};
use super::{Args, Report};

/// Runs `args`' load across the members of the fleet file at `path`:
/// `args.clients` split as evenly as they go, each member's report, then
/// the totals. Passes when every member's run passed.
pub fn run_fleet(path: &Path, args: &Args) -> Result<bool> {
    let fleet = Fleet::load(path)?;
    let n = fleet.members.len() as u32;
    if n == 0 {
        bail!("{}: no members", path.display());
    }
    if args.clients < n {
        bail!(
            "--clients {} for {n} memds: at least one each",
            args.clients
        );
    }
    let reports: Vec<(String, Result<Report>)> = std::thread::scope(|s| {
        let runs: Vec<_> = fleet
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut a = args.clone();
                a.clients = args.clients / n + u32::from((i as u32) < args.clients % n);
                s.spawn(move || {
                    let report =
                        m.tokens()
                            .map_err(anyhow::Error::from)
                            .and_then(|(client, operator)| {
                                run_against(&m.addr, &Tokens { client, operator }, &a)
                            });
                    (m.name.clone(), report)
                })
            })
            .collect();
        runs.into_iter()
            .map(|h| h.join().expect("fleet load thread"))
            .collect()
    });
    let mut passed = true;
    let (mut ops, mut rate) = (0, 0.0);
    for (name, report) in &reports {
        println!("=== {name}");
        match report {
            Ok(r) if args.json => println!("{}", r.to_json()),
            Ok(r) => r.print(),
            Err(e) => println!("failed: {e:#}"),
        }
        match report {
            Ok(r) => {
                passed &= r.passed();
                ops += r.load.ops;
                rate += r.load.ops_per_sec();
            }
            Err(_) => passed = false,
        }
    }
    println!(
        "fleet: {} memds, {} clients, {ops} ops, {rate:.0} ops/s together, {}",
        n,
        args.clients,
        if passed { "every run passed" } else { "FAILED" }
    );
    Ok(passed)
}
