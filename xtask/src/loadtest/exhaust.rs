//! The exhaustion profile: clients take page blocks until the service
//! refuses, then the reserve below `min`, the statistics and a new
//! connection are checked while memory is gone.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use memd_client::wire::{errno, Gfp, Op, Reply};
use memd_client::{wire, Client, Options};

use super::baseline::Baseline;
use super::tally::Tally;
use super::{Args, Report};

/// What the exhaustion profile saw.
#[derive(Debug, Default)]
pub struct ExhaustFigures {
    /// Pages each client held when it stopped.
    pub held_pages: Vec<u64>,
    pub quota_pages: u64,
    pub enomem_clients: u32,
    pub edquot_clients: u32,
    /// Free pages per zone and its `min` watermark, at exhaustion.
    pub zones: Vec<(String, u64, u64)>,
    /// Pages missing below the zones' min watermarks at exhaustion.
    pub reserve_deficit_pages: u64,
    /// Pages the kernel's own memory (heap, its DMA buffers: all that is
    /// neither free nor the clients') grew by since the baseline: the only
    /// allowed user of the reserve.
    pub heap_growth_pages: u64,
    /// Client ATOMIC requests refused (ENOMEM) and granted at exhaustion.
    pub atomic_refused: u32,
    pub atomic_granted: u32,
    pub new_connection_ok: bool,
    pub stats_ok: bool,
    pub problems: Vec<String>,
}

impl ExhaustFigures {
    pub(super) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "held_pages": self.held_pages,
            "quota_pages": self.quota_pages,
            "enomem_clients": self.enomem_clients,
            "edquot_clients": self.edquot_clients,
            "zones": self.zones.iter().map(|(n, f, m)| serde_json::json!({"zone": n, "free": f, "min": m})).collect::<Vec<_>>(),
            "reserve_deficit_pages": self.reserve_deficit_pages,
            "heap_growth_pages": self.heap_growth_pages,
            "atomic_refused": self.atomic_refused,
            "atomic_granted": self.atomic_granted,
            "new_connection_ok": self.new_connection_ok,
            "stats_ok": self.stats_ok,
            "problems": self.problems,
        })
    }

    pub(super) fn print(&self) {
        println!(
            "exhaustion: clients held {:?} pages (quota {} each); {} stopped at ENOMEM, {} at EDQUOT",
            self.held_pages, self.quota_pages, self.enomem_clients, self.edquot_clients
        );
        for (n, f, m) in &self.zones {
            println!("  zone {n:<7} free {f:>8} pages, min {m:>6}");
        }
        println!(
            "  below min: {} pages (the kernel's own memory grew by {} pages since the baseline)",
            self.reserve_deficit_pages, self.heap_growth_pages,
        );
        println!(
            "  client ATOMIC requests at exhaustion: {} refused, {} granted; new connection: {}; statistics: {}",
            self.atomic_refused,
            self.atomic_granted,
            ok(self.new_connection_ok),
            ok(self.stats_ok)
        );
        for p in &self.problems {
            println!("  problem: {p}");
        }
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "ok"
    } else {
        "FAILED"
    }
}

/// The exhaustion test: every client takes page blocks (largest orders
/// first, through batch frames) until the service refuses; the refusals
/// must be ENOMEM (memory gone) or EDQUOT (the client's quota reached),
/// nothing else. With memory exhausted: clients' ATOMIC requests are
/// refused too (the reserve below `min` is the kernel's), every zone still
/// has at least its `min` watermark free, a new client connects and the
/// statistics are served (the kernel's own heap lives on the reserve).
/// Then everyone disconnects and free memory must return to the baseline.
pub(super) fn exhaust(
    opts: &Options,
    ctl: &mut Client,
    args: &Args,
    baseline: &Baseline,
) -> Result<Report> {
    let started = Instant::now();
    let deadline = started + args.time_bound().max(Duration::from_secs(120));
    let mut fig = ExhaustFigures {
        quota_pages: ctl.hello().quota.pages,
        ..Default::default()
    };
    let mut tally = Tally::default();
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let mut o = opts.clone();
        o.client = format!("exhaust-{i}");
        clients.push(Client::connect(&o).with_context(|| format!("exhaust client {i}"))?);
    }
    let max_order = ctl.status().context("status")?.max_order.max(1) as u8;
    // Round robin, so that every client gets its share before memory ends.
    let mut held = vec![0u64; clients.len()];
    let mut stopped: Vec<Option<i32>> = vec![None; clients.len()];
    let mut order = max_order - 1;
    loop {
        if Instant::now() > deadline {
            fig.problems
                .push("memory not exhausted within the time bound".into());
            break;
        }
        let mut progressed = false;
        for (i, c) in clients.iter_mut().enumerate() {
            if stopped[i].is_some() {
                continue;
            }
            let ops = vec![
                Op::AllocPages {
                    order,
                    gfp: Gfp::KERNEL | Gfp::NOWARN,
                };
                16
            ];
            let t = Instant::now();
            let rs = c.batch(ops, true).context("exhaust batch")?;
            tally
                .lat
                .entry("batch-alloc-pages")
                .or_default()
                .push(t.elapsed().as_nanos() as u64);
            for r in rs {
                tally.ops += 1;
                match r {
                    Ok(Reply::Pages { order, .. }) => {
                        held[i] += 1 << order;
                        progressed = true;
                    }
                    Ok(other) => bail!("unexpected reply {other:?}"),
                    Err(e) => {
                        tally.record_error("alloc-pages", &e);
                        if e.code == errno::ENOMEM {
                            // Smaller blocks may still fit: only order 0
                            // failing means memory is gone for this client.
                            if order == 0 {
                                stopped[i] = Some(e.code);
                            }
                        } else {
                            stopped[i] = Some(e.code);
                        }
                    }
                }
            }
        }
        if stopped.iter().all(|s| s.is_some()) {
            break;
        }
        if !progressed {
            if order == 0 {
                continue;
            }
            order -= 1;
        }
    }
    fig.held_pages = held.clone();
    for (i, s) in stopped.iter().enumerate() {
        match *s {
            Some(errno::ENOMEM) => fig.enomem_clients += 1,
            Some(errno::EDQUOT) => fig.edquot_clients += 1,
            Some(code) => fig.problems.push(format!(
                "client {i} stopped with {} instead of ENOMEM/EDQUOT",
                wire::errno_name(code)
            )),
            None => {}
        }
        if held[i] > fig.quota_pages {
            fig.problems.push(format!(
                "client {i} holds {} pages, above its quota of {}",
                held[i], fig.quota_pages
            ));
        }
    }
    if fig.enomem_clients == 0 {
        fig.problems.push(
            "no client saw ENOMEM: memory was not exhausted (more clients or a smaller --mem)"
                .into(),
        );
    }
    // Clients' ATOMIC requests must not reach into the reserve either: it
    // belongs to the kernel (its heap keeps serving from it).
    for (i, c) in clients.iter_mut().enumerate() {
        let rs = c
            .batch(
                vec![
                    Op::AllocPages {
                        order: 0,
                        gfp: Gfp::ATOMIC | Gfp::NOWARN,
                    };
                    8
                ],
                false,
            )
            .context("ATOMIC batch")?;
        for r in rs {
            tally.ops += 1;
            match r {
                Ok(Reply::Pages { order, .. }) => {
                    held[i] += 1 << order;
                    fig.atomic_granted += 1;
                }
                Ok(other) => bail!("unexpected reply {other:?}"),
                Err(e) => {
                    tally.record_error("alloc-pages-atomic", &e);
                    if e.code == errno::ENOMEM {
                        fig.atomic_refused += 1;
                    }
                }
            }
        }
    }
    if fig.atomic_granted > 0 {
        fig.problems.push(format!(
            "{} client ATOMIC pages were granted with memory exhausted: the reserve below min is the kernel's",
            fig.atomic_granted
        ));
    }
    // The reserve: no client request took a zone below its min watermark.
    // The kernel itself may (its heap lives on the reserve when memory is
    // gone: the handle tables of what the clients hold, reply frames), so
    // every page missing below `min` must be a page the kernel's own memory
    // grew by since the baseline. Free pages include the per-CPU lists.
    let rs = ctl
        .batch(vec![Op::Zoneinfo, Op::Meminfo], true)
        .context("zoneinfo at exhaustion")?;
    let (zones, mi) = match &rs[..] {
        [Ok(Reply::Zoneinfo(z)), Ok(Reply::Meminfo(m))] => (z.clone(), m.clone()),
        other => bail!("zoneinfo/meminfo at exhaustion: {other:?}"),
    };
    // What the kernel holds: everything not free and not held by the
    // clients (their pages are counted exactly above).
    let page = 4096;
    let client_bytes: u64 = held.iter().sum::<u64>() * page;
    let kernel_now = mi.total - mi.free - client_bytes;
    let kernel_base = baseline.info.meminfo.total - baseline.info.meminfo.free;
    fig.heap_growth_pages = kernel_now.saturating_sub(kernel_base) / page;
    for z in zones.iter().filter(|z| z.managed > 0) {
        let free = z.free + z.pcp_count;
        fig.zones.push((z.name.clone(), free, z.watermark.min));
        fig.reserve_deficit_pages += z.watermark.min.saturating_sub(free);
    }
    // The kernel's use cannot be told apart per zone from outside (its
    // heap also gives back cached slabs when memory runs out), so what is
    // asserted is that the reserve is still there for it: every zone keeps
    // at least the part below the ATOMIC mark (min/4) that only the kernel
    // may touch, and no client ATOMIC request was granted (above).
    for z in zones.iter().filter(|z| z.managed > 0) {
        let free = z.free + z.pcp_count;
        if free < z.watermark.min / 4 {
            fig.problems.push(format!(
                "zone {} has {} free pages, below a quarter of its min watermark {}: the reserve is gone",
                z.name, free, z.watermark.min
            ));
        }
    }
    // A new connection and the statistics, with memory exhausted.
    let mut o = opts.clone();
    o.client = "exhaust-late".into();
    match Client::connect(&o) {
        Ok(mut late) => {
            fig.new_connection_ok = true;
            let stats = (|| -> memd_client::Result<()> {
                late.status()?;
                late.meminfo()?;
                late.zoneinfo()?;
                late.buddyinfo()?;
                late.slabinfo()?;
                late.clients()?;
                Ok(())
            })();
            match stats {
                Ok(()) => fig.stats_ok = true,
                Err(e) => fig
                    .problems
                    .push(format!("statistics with memory exhausted: {e}")),
            }
        }
        Err(e) => fig
            .problems
            .push(format!("new connection with memory exhausted: {e}")),
    }
    let elapsed = started.elapsed();
    drop(clients);
    let end = baseline.compare(ctl, Duration::from_secs(args.settle))?;
    // ENOMEM and EDQUOT are the expected refusals here.
    let unexplained = tally
        .errors
        .iter()
        .filter(|((_, c), _)| c != "ENOMEM" && c != "EDQUOT")
        .map(|(_, n)| n)
        .sum();
    Ok(Report {
        exhaust: Some(fig),
        ..Report::new(args, elapsed, tally, unexplained, end)
    })
}
