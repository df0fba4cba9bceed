//! `cargo xtask bench disk`: MiB/s of virtio-blk moving 64 MiB between the
//! disk and one contiguous DMA buffer (from the CMA region), against the same
//! data in 4 KiB DMA buffers, side by side.
//!
//! One guest, one sparse disk image. The big buffer is filled with a seeded
//! pattern and written at sector 0, then read back; the 4 KiB buffers then
//! read those same sectors (the same data), write them to a second region of
//! the disk, and the big buffer reads that region back: its checksum must
//! equal the original's, so the figures are for transfers that really moved
//! the data. Small transfers go in batches (many operations per frame), so
//! the network round trip is not what is measured.
//!
//! Two rates per row: "device" counts the guest's time inside the driver
//! (the reply's `device_ns`, summed), "wall" the host's time for the whole
//! requests, control traffic included.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use memd_client::wire::{DiskTransfer, DmaMask, Op, Reply};
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};

const MIB: u64 = 1 << 20;
const SMALL: u64 = 4096;
/// Operations per batch frame (replies stay well under the frame limit).
const BATCH: usize = 4096;

#[derive(Debug, clap::Args)]
#[command(mut_arg("accel", |a| a.default_value("tcg")))]
pub struct DiskBenchArgs {
    /// Bytes moved per direction, in MiB.
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Repetitions of each big-buffer transfer (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Time bound for the whole run, in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// The guest; its `--accel` defaults to tcg, the accelerator of the
    /// README's figures.
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// One side of the comparison.
#[derive(Debug, Default, Clone)]
struct Row {
    layout: String,
    buffers: u64,
    requests: u64,
    descriptors: u64,
    write_device_ns: u64,
    write_wall: Duration,
    read_device_ns: u64,
    read_wall: Duration,
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / MIB as f64 / secs
    }
}

fn e(what: &str) -> impl Fn(memd_client::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Median by device time of `runs` transfers.
fn timed(
    runs: usize,
    mut f: impl FnMut() -> Result<DiskTransfer, String>,
) -> Result<(DiskTransfer, Duration), String> {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = f()?;
        v.push((r, t.elapsed()));
    }
    v.sort_by_key(|(r, _)| r.device_ns);
    Ok(v[v.len() / 2])
}

/// Runs `ops` in batches; every reply must be a transfer. Returns the sum of
/// device time, requests and descriptors, and the wall time.
fn batched_transfers(c: &mut Client, ops: Vec<Op>) -> Result<(u64, u64, u64, Duration), String> {
    let (mut ns, mut req, mut desc) = (0, 0, 0);
    let t = Instant::now();
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<Op> = ops.by_ref().take(BATCH).collect();
        for r in c.batch(chunk, true).map_err(e("batch"))? {
            match r {
                Ok(Reply::Transfer(x)) => {
                    ns += x.device_ns;
                    req += x.requests;
                    desc += x.descriptors;
                }
                Ok(r) => return Err(format!("unexpected reply {r:?}")),
                Err(err) => return Err(format!("transfer failed: {err}")),
            }
        }
    }
    Ok((ns, req, desc, t.elapsed()))
}

/// Measures with a client's token: DMA buffers and disk transfers need no
/// more.
fn measure(port: u16, token: &str, bytes: u64, runs: usize) -> Result<Vec<Row>, String> {
    let mut c =
        Client::connect(&Options::new(format!("127.0.0.1:{port}"), token)).map_err(e("connect"))?;
    let second = bytes / 512; // sector of the second region
    let big = c
        .dma_alloc(bytes, 0, DmaMask::Bits64)
        .map_err(e("dma_alloc (big)"))?;
    c.dma_fill(big.handle, 0x5eed).map_err(e("dma_fill"))?;
    let want = c.dma_checksum(big.handle, 0, 0).map_err(e("checksum"))?;
    let (w, w_wall) = timed(runs, || {
        c.dma_write_disk(big.handle, 0).map_err(e("write-disk"))
    })?;
    let (r, r_wall) = timed(runs, || {
        c.dma_read_disk(big.handle, 0).map_err(e("read-disk"))
    })?;
    if c.dma_checksum(big.handle, 0, 0).map_err(e("checksum"))? != want {
        return Err("the big buffer read back differs from what was written".into());
    }
    let big_row = Row {
        layout: format!("1 x {} MiB (contiguous, {:?})", bytes / MIB, big.source),
        buffers: 1,
        requests: w.requests,
        descriptors: w.descriptors,
        write_device_ns: w.device_ns,
        write_wall: w_wall,
        read_device_ns: r.device_ns,
        read_wall: r_wall,
    };

    // The same data in 4 KiB buffers.
    let n = bytes / SMALL;
    let mut handles = Vec::with_capacity(n as usize);
    let allocs: Vec<Op> = (0..n)
        .map(|_| Op::DmaAlloc {
            len: SMALL,
            align: 0,
            mask: DmaMask::Bits64,
            movable: false,
        })
        .collect();
    for chunk in allocs.chunks(BATCH) {
        for r in c.batch(chunk.to_vec(), true).map_err(e("batch alloc"))? {
            match r {
                Ok(Reply::Dma(b)) => handles.push(b.handle),
                other => return Err(format!("4 KiB dma_alloc: {other:?}")),
            }
        }
    }
    let sectors = SMALL / 512;
    let reads: Vec<Op> = handles
        .iter()
        .enumerate()
        .map(|(i, &handle)| Op::DmaReadDisk {
            handle,
            sector: i as u64 * sectors,
        })
        .collect();
    let (read_ns, _, _, read_wall) = batched_transfers(&mut c, reads)?;
    let writes: Vec<Op> = handles
        .iter()
        .enumerate()
        .map(|(i, &handle)| Op::DmaWriteDisk {
            handle,
            sector: second + i as u64 * sectors,
        })
        .collect();
    let (write_ns, req, desc, write_wall) = batched_transfers(&mut c, writes)?;
    c.dma_fill(big.handle, 1).map_err(e("dma_fill"))?;
    c.dma_read_disk(big.handle, second)
        .map_err(e("read-disk (check)"))?;
    if c.dma_checksum(big.handle, 0, 0).map_err(e("checksum"))? != want {
        return Err("the data copied through 4 KiB buffers differs from the original".into());
    }
    let small_row = Row {
        layout: format!("{n} x 4 KiB (buddy, order 0)"),
        buffers: n,
        requests: req,
        descriptors: desc,
        write_device_ns: write_ns,
        write_wall,
        read_device_ns: read_ns,
        read_wall,
    };
    Ok(vec![big_row, small_row])
}

pub fn run(args: &DiskBenchArgs) -> Result<()> {
    if args.runs == 0 || args.mib == 0 || args.mib > 120 {
        bail!("--runs must be at least 1 and --mib within 1..=120 (two copies must fit a client's 256 MiB quota)");
    }
    let bytes = args.mib * MIB;
    let kernel = crate::build::build_kernel()?;
    let reserve = (bytes / MIB).next_power_of_two().max(64);
    let (cfg, accel) = args.guest.config(
        kernel,
        &format!("memd.log=warn memd.dma_reserve={reserve}M@dma32"),
    )?;
    eprintln!("xtask: accelerator {}: {}", accel.name(), accel.reason);
    let image = std::env::temp_dir().join(format!("memd-bench-disk-{}.img", std::process::id()));
    crate::run::ensure_disk(&image, 2 * bytes)?;
    let endpoint = Endpoint::temporary("bench-disk")?;
    let cfg = endpoint
        .serve(cfg)
        .disk(image.clone())
        .time_bound(Duration::from_secs(args.timeout));
    eprintln!("xtask: {}", cfg.describe());
    let out = cfg.run_client(|| {
        measure(endpoint.port, &endpoint.tokens.client, bytes, args.runs).map_err(|e| anyhow!(e))
    });
    let _ = std::fs::remove_file(&image);
    let (out, rows) = out?;
    let rows = rows.unwrap_or_else(|| Err(anyhow!("the guest never became ready")));
    let rows = rows.map_err(|e| {
        anyhow!(
            "{e:#}\n--- console ---\n{}\n--- stderr ---\n{}",
            out.console(),
            out.stderr
        )
    })?;
    println!(
        "virtio-blk, {} MiB each way, {} {}, {}-run median for the big buffer",
        args.mib,
        args.guest.machine.name(),
        accel.name(),
        args.runs
    );
    println!(
        "{:<34} {:>8} {:>9} {:>11} {:>13} {:>12} {:>13} {:>12}",
        "layout",
        "buffers",
        "requests",
        "descriptors",
        "write device",
        "write wall",
        "read device",
        "read wall"
    );
    for r in &rows {
        println!(
            "{:<34} {:>8} {:>9} {:>11} {:>8.1} MiB/s {:>6.1} MiB/s {:>7.1} MiB/s {:>6.1} MiB/s",
            r.layout,
            r.buffers,
            r.requests,
            r.descriptors,
            mib_s(bytes, r.write_device_ns as f64 / 1e9),
            mib_s(bytes, r.write_wall.as_secs_f64()),
            mib_s(bytes, r.read_device_ns as f64 / 1e9),
            mib_s(bytes, r.read_wall.as_secs_f64()),
        );
    }
    Ok(())
}
