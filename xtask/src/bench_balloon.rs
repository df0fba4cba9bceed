//! `cargo xtask bench balloon`: how much of the memory memd's clients
//! touched and freed the host gets back through free page reporting, and
//! how soon (QEMU's resident memory, VmRSS, read before the clients fill
//! memory, once they have, and every 100 ms after they disconnect); then
//! how long the balloon takes to follow a host target through QMP:
//! inflate by the same amount, and deflate back.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use memd_client::qmp::{self, Qmp};
use memd_client::wire::Gfp;
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};

const MIB: u64 = 1 << 20;
/// Each client's share is taken in 4 MiB blocks (order 10).
const BLOCK_ORDER: u8 = 10;
/// How long to watch QEMU's memory after the clients leave.
const WATCH: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
#[command(mut_arg("mem", |a| a.default_value("2G")))]
pub struct BalloonBenchArgs {
    /// MiB the clients fill (zeroed pages), split between them.
    #[arg(long, default_value_t = 1024)]
    pub fill_mib: u64,
    /// Clients (each holds at most its 256 MiB quota).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The guest: TCG and 2 GiB unless told otherwise.
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// What was measured, bytes and milliseconds.
struct Figures {
    before: u64,
    filled: u64,
    after: u64,
    /// Time from the clients' leaving until 90 % of what they touched was
    /// back with the host, if it came back.
    to_90_ms: Option<f64>,
    /// Time for the balloon to take the fill size from the guest, and to
    /// give it back, host target to `actual`.
    inflate_ms: f64,
    deflate_ms: f64,
}

pub fn run(args: &BalloonBenchArgs) -> Result<()> {
    if args.clients == 0 || args.fill_mib == 0 || args.fill_mib > 256 * args.clients as u64 {
        bail!("--fill-mib must be within 1..=256 x --clients (each client's quota is 256 MiB)");
    }
    let kernel = crate::build::build_kernel()?;
    let (cfg, accel) = args.guest.config(kernel, "memd.log=warn")?;
    if !args.json {
        eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    }
    let endpoint = Endpoint::temporary("bench-balloon")?;
    let qmp = std::env::temp_dir().join(format!("memd-bench-balloon-{}.qmp", std::process::id()));
    let cfg = endpoint
        .serve(cfg)
        .qmp(qmp.clone())
        .time_bound(Duration::from_secs(300));
    let port = endpoint.port;
    let (out, figures) = cfg.run_client(|| {
        let mut f = measure(
            port,
            &endpoint.tokens.client,
            args.fill_mib * MIB,
            args.clients,
        )?;
        (f.inflate_ms, f.deflate_ms) = follow(&qmp, args.fill_mib * MIB)?;
        Ok(f)
    })?;
    let _ = std::fs::remove_file(&qmp);
    let f = figures
        .unwrap_or_else(|| Err(anyhow!("the guest never became ready")))
        .map_err(|e| anyhow!("{e:#}\n--- console ---\n{}", out.console()))?;
    let touched = f.filled.saturating_sub(f.before);
    let returned = f.filled.saturating_sub(f.after);
    let share = returned as f64 / touched.max(1) as f64;
    if args.json {
        println!(
            "{{\"machine\": \"{}\", \"mem\": \"{}\", \"fill_mib\": {}, \"rss_before\": {}, \"rss_filled\": {}, \"rss_after\": {}, \"returned_share\": {:.3}, \"to_90_percent_ms\": {}, \"inflate_ms\": {:.0}, \"deflate_ms\": {:.0}}}",
            args.guest.machine.name(),
            args.guest.mem,
            args.fill_mib,
            f.before,
            f.filled,
            f.after,
            share,
            f.to_90_ms.map_or("null".into(), |t| format!("{t:.0}")),
            f.inflate_ms,
            f.deflate_ms
        );
    } else {
        println!(
            "QEMU resident: {} MiB before, {} MiB with {} MiB filled, {} MiB {} s after the clients left: {:.0} % of what they touched returned{}",
            f.before / MIB,
            f.filled / MIB,
            args.fill_mib,
            f.after / MIB,
            WATCH.as_secs(),
            share * 100.0,
            f.to_90_ms
                .map_or(String::new(), |t| format!(", 90 % within {t:.0} ms"))
        );
        println!(
            "balloon: {} MiB taken (host target to actual) in {:.0} ms, given back in {:.0} ms",
            args.fill_mib, f.inflate_ms, f.deflate_ms
        );
    }
    Ok(())
}

fn measure(port: u16, token: &str, bytes: u64, clients: usize) -> Result<Figures> {
    let pid = qemu_pid(port)?;
    let before = rss(pid)?;
    let share = bytes / clients as u64;
    let mut held = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut c = Client::connect(&Options::new(format!("127.0.0.1:{port}"), token))
            .with_context(|| format!("client {i}: connect"))?;
        let mut got = 0;
        while got < share {
            c.alloc_pages(BLOCK_ORDER, Gfp::KERNEL | Gfp::ZERO)
                .with_context(|| format!("client {i}: {} MiB in", got / MIB))?;
            got += (1 << BLOCK_ORDER) * 4096;
        }
        held.push(c);
    }
    let filled = rss(pid)?;
    // Leaving frees everything the clients held.
    drop(held);
    let left = Instant::now();
    let target = before + (filled.saturating_sub(before)) / 10;
    let mut to_90_ms = None;
    let mut after = filled;
    while left.elapsed() < WATCH {
        std::thread::sleep(Duration::from_millis(100));
        after = rss(pid)?;
        if to_90_ms.is_none() && after <= target {
            to_90_ms = Some(left.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(Figures {
        before,
        filled,
        after,
        to_90_ms,
        inflate_ms: 0.0,
        deflate_ms: 0.0,
    })
}

/// Milliseconds for the balloon to take `bytes` from the guest after the
/// host asks (QMP `balloon`), and to give them back.
fn follow(qmp: &std::path::Path, bytes: u64) -> Result<(f64, f64)> {
    let mut q = Qmp::connect(qmp).map_err(|e| anyhow!(e))?;
    let ram = q.balloon_actual().map_err(|e| anyhow!(e))?;
    let mut timed = |target: u64| -> Result<f64> {
        let asked = Instant::now();
        q.set_balloon(target).map_err(|e| anyhow!(e))?;
        while q.balloon_actual().map_err(|e| anyhow!(e))? != target {
            if asked.elapsed() > Duration::from_secs(60) {
                bail!("the balloon did not reach {} MiB in 60 s", target / MIB);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(asked.elapsed().as_secs_f64() * 1000.0)
    };
    let inflate = timed(ram - bytes)?;
    let deflate = timed(ram)?;
    Ok((inflate, deflate))
}

/// The QEMU process forwarding `port` (its command line names it).
pub fn qemu_pid(port: u16) -> Result<u32> {
    qmp::qemu_process(&format!("hostfwd=tcp:127.0.0.1:{port}-"))
        .ok_or_else(|| anyhow!("no QEMU process forwarding port {port}"))
}

/// A process's resident memory, in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    qmp::resident_bytes(pid).ok_or_else(|| anyhow!("no resident memory for process {pid}"))
}
