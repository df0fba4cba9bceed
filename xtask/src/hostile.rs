//! The hostile-client suite: boots memd and attacks its control port the
//! ways a careless or malicious client would, one case at a time. After
//! every case memd must still answer, a well-behaved client working
//! alongside must have been served throughout, and free memory must be
//! back exactly at its baseline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use memd_client::wire::{
    self, errno, to_frame, DmaMask, Gfp, Hello, Op, Reply, Request, Response, MAX_IO,
    PROTOCOL_VERSION,
};
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};
use crate::loadtest::settle;
use crate::qemu::Accel;

/// Timeouts the guest runs with, short so the cases that wait for them
/// stay short.
const HELLO_TIMEOUT_S: u64 = 1;
const SEND_TIMEOUT_S: u64 = 2;
const REQUEST_TIMEOUT_S: u64 = 2;

/// One case: what it does, and the check of what memd answered.
struct Case {
    name: &'static str,
    run: fn(&Target) -> Result<String>,
}

/// Where the guest is.
pub struct Target {
    addr: String,
    token: String,
}

impl Target {
    fn opts(&self, name: &str) -> Options {
        let mut o = Options::new(&self.addr, &self.token);
        o.client = name.into();
        o.ready_timeout = Duration::from_secs(10);
        o.io_timeout = Some(Duration::from_secs(30));
        o
    }

    fn client(&self, name: &str) -> Result<Client> {
        Client::connect(&self.opts(name)).with_context(|| format!("connecting {name}"))
    }

    fn raw(&self) -> Result<TcpStream> {
        let s = TcpStream::connect(&self.addr).context("raw connect")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    }

    /// A raw connection that has said hello.
    fn raw_hello(&self) -> Result<TcpStream> {
        let mut s = self.raw()?;
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: self.token.clone(),
            client: "hostile".into(),
        });
        s.write_all(&to_frame(&hello)?)?;
        match read_response(&mut s)? {
            Some(Response::Hello(_)) => Ok(s),
            r => bail!("hello refused: {r:?}"),
        }
    }
}

/// Reads one response frame; None when the connection ended first.
fn read_response(s: &mut TcpStream) -> Result<Option<Response>> {
    let mut dec = wire::FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let mut input = &pending[..];
        if let Some(body) = dec.feed(&mut input)? {
            return Ok(Some(wire::decode_body(&body)?));
        }
        pending.clear();
        match s.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e).context("reading a reply"),
        }
    }
}

/// Waits for memd to end the connection; what it said first, if anything.
fn expect_closed(s: &mut TcpStream, within: Duration) -> Result<Option<Response>> {
    s.set_read_timeout(Some(within))?;
    let mut said = None;
    loop {
        match read_response(s) {
            Ok(None) => return Ok(said),
            Ok(Some(r)) => said = Some(r),
            Err(e) => bail!("the connection stayed open ({e:#})"),
        }
    }
}

fn closing_code(r: &Option<Response>) -> Option<i32> {
    match r {
        Some(Response::Error {
            error,
            closing: true,
        }) => Some(error.code),
        _ => None,
    }
}

/// A batch body that announces `count` operations, followed by `zeros`
/// zero bytes: the frame that used to kill memd.
fn batch_frame(count: u64, zeros: usize) -> Vec<u8> {
    let mut body = wire::batch_prefix(false, count);
    body.resize(body.len() + zeros, 0);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// A request for all of a new DMA buffer of the largest size one read
/// may take: each reply is a frame of about 1 MiB.
fn full_read(c: &mut Client) -> Result<Request> {
    let buf = c.dma_alloc(MAX_IO as u64, 4096, DmaMask::Bits64)?;
    Ok(Request::Call(Op::DmaRead {
        handle: buf.handle,
        offset: 0,
        len: MAX_IO as u32,
    }))
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "unauthenticated batch of 200000 ops",
            run: |t| {
                let mut s = t.raw()?;
                // memd refuses at the length prefix; the rest may not go in.
                let _ = s.write_all(&batch_frame(200_000, 200_000));
                let r = expect_closed(&mut s, Duration::from_secs(5))?;
                ensure!(closing_code(&r) == Some(errno::E2BIG), "answered {r:?}");
                Ok("closed with E2BIG at the length prefix".into())
            },
        },
        Case {
            name: "garbage before hello",
            run: |t| {
                let mut s = t.raw()?;
                let mut rng = crate::rng::Rng::new(99);
                let junk: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
                let _ = s.write_all(&junk);
                let r = expect_closed(&mut s, Duration::from_secs(5))?;
                Ok(format!("closed ({})", describe(&r)))
            },
        },
        Case {
            name: "giant hello (64 KiB token)",
            run: |t| {
                let mut s = t.raw()?;
                let hello = Request::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    token: "x".repeat(64 << 10),
                    client: "giant".into(),
                });
                let _ = s.write_all(&to_frame(&hello)?);
                let r = expect_closed(&mut s, Duration::from_secs(5))?;
                ensure!(closing_code(&r) == Some(errno::E2BIG), "answered {r:?}");
                Ok("closed with E2BIG".into())
            },
        },
        Case {
            name: "no hello at all",
            run: |t| {
                let mut s = t.raw()?;
                let start = Instant::now();
                expect_closed(&mut s, Duration::from_secs(HELLO_TIMEOUT_S + 5))?;
                Ok(format!("cut after {} ms", start.elapsed().as_millis()))
            },
        },
        Case {
            name: "oversized frame after hello",
            run: |t| {
                let mut s = t.raw_hello()?;
                let _ = s.write_all(&0x7fff_ffffu32.to_le_bytes());
                let r = expect_closed(&mut s, Duration::from_secs(5))?;
                ensure!(closing_code(&r) == Some(errno::E2BIG), "answered {r:?}");
                Ok("closed with E2BIG".into())
            },
        },
        Case {
            name: "truncated frame, then silence",
            run: |t| {
                let mut s = t.raw_hello()?;
                s.write_all(&1000u32.to_le_bytes())?;
                s.write_all(&[0u8; 10])?;
                let start = Instant::now();
                expect_closed(&mut s, Duration::from_secs(REQUEST_TIMEOUT_S + 5))?;
                Ok(format!("cut after {} ms", start.elapsed().as_millis()))
            },
        },
        Case {
            name: "authenticated batch over the limit",
            run: |t| {
                let mut s = t.raw_hello()?;
                s.write_all(&batch_frame(200_000, 200_000))?;
                match read_response(&mut s)? {
                    Some(Response::Batch(r))
                        if r.len() == 1 && r[0].as_ref().is_err_and(|e| e.code == errno::E2BIG) => {
                    }
                    r => bail!("answered {r:?}"),
                }
                s.write_all(&to_frame(&Request::Call(Op::Status))?)?;
                ensure!(
                    matches!(
                        read_response(&mut s)?,
                        Some(Response::Call(Ok(Reply::Status(_))))
                    ),
                    "the connection stopped working"
                );
                Ok("E2BIG reply, connection kept".into())
            },
        },
        Case {
            name: "32 pipelined reads of 1 MiB",
            run: |t| {
                let mut c = t.client("reader")?;
                let read = full_read(&mut c)?;
                for _ in 0..32 {
                    c.send(&read)?;
                }
                for i in 0..32 {
                    match c.recv()? {
                        Response::Call(Ok(Reply::Data(d))) if d.len() == MAX_IO => {}
                        r => bail!("read {i}: {}", describe(&Some(r))),
                    }
                }
                Ok("all 32 answered in order".into())
            },
        },
        Case {
            name: "a reader that never reads",
            run: |t| {
                let mut c = t.client("deaf")?;
                let read = full_read(&mut c)?;
                let mut ctl = t.client("watcher")?;
                let before = ctl.clients()?.len();
                // Requests keep coming while no reply is taken: memd stops
                // reading them once its output is full.
                for _ in 0..64 {
                    if c.send(&read).is_err() {
                        break;
                    }
                }
                let start = Instant::now();
                while ctl.clients()?.len() >= before {
                    ensure!(
                        start.elapsed() < Duration::from_secs(SEND_TIMEOUT_S + 10),
                        "still connected after {:?}",
                        start.elapsed()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(format!(
                    "cut, its buffer released, after {} ms",
                    start.elapsed().as_millis()
                ))
            },
        },
        Case {
            name: "400 idle sockets while a client works",
            run: |t| {
                let mut idle = Vec::new();
                for _ in 0..400 {
                    if let Ok(s) = TcpStream::connect(&t.addr) {
                        idle.push(s);
                    }
                }
                let start = Instant::now();
                let mut c = t.client("latecomer")?;
                let o = c.kmalloc(64, Gfp::KERNEL)?;
                c.kfree(o.handle)?;
                Ok(format!(
                    "{} sockets open; a new client served in {} ms",
                    idle.len(),
                    start.elapsed().as_millis()
                ))
            },
        },
        Case {
            name: "40000 DMA buffers listed and mapped",
            run: |t| {
                let mut c = t.client("hoarder")?;
                let n = 40_000;
                let op = Op::DmaAlloc {
                    len: 4096,
                    align: 4096,
                    mask: DmaMask::Bits64,
                };
                let mut left = n;
                while left > 0 {
                    let k = left.min(wire::MAX_BATCH_OPS);
                    for r in c.batch(vec![op.clone(); k], true)? {
                        r.map_err(|e| anyhow::anyhow!("dma-alloc: {e}"))?;
                    }
                    left -= k;
                }
                let listed = c.dma_buffers()?;
                ensure!(listed.len() >= n, "listed {} of {n}", listed.len());
                let map = match c.call(Op::MemMap) {
                    Ok(Reply::MemMap(m)) => format!("map of {} runs", m.runs.len()),
                    Err(memd_client::Error::Server(e)) if e.code == errno::E2BIG => {
                        "map refused with E2BIG".into()
                    }
                    r => bail!("map: {r:?}"),
                };
                Ok(format!("{} listed in pages; {map}", listed.len()))
            },
        },
        Case {
            name: "client token asks for shutdown and faults",
            run: |t| {
                let mut c = t.client("usurper")?;
                for op in [
                    Op::Shutdown,
                    Op::DropCaches,
                    Op::Check,
                    Op::Stress {
                        ops: 1_000_000,
                        seed: 1,
                    },
                    Op::FaultInject {
                        target: wire::FaultTarget::Pages,
                        config: wire::FaultConfig {
                            probability: 100,
                            interval: 1,
                            times: -1,
                        },
                    },
                ] {
                    let name = op.name();
                    match c.call(op) {
                        Err(memd_client::Error::Server(e)) if e.code == errno::EPERM => {}
                        r => bail!("{name}: {r:?}"),
                    }
                }
                Ok("EPERM for each".into())
            },
        },
        Case {
            name: "slab caches until the quota",
            run: |t| {
                let mut c = t.client("cacher")?;
                for i in 0.. {
                    match c.cache_create(
                        &format!("h{i}"),
                        64,
                        8,
                        wire::SlabFlags(0),
                        wire::Ctor::None,
                    ) {
                        Ok(_) => {}
                        Err(memd_client::Error::Server(e)) if e.code == errno::EDQUOT => {
                            return Ok(format!("EDQUOT after {i}"))
                        }
                        Err(e) => bail!("cache {i}: {e}"),
                    }
                    ensure!(i < 10_000, "no quota on caches");
                }
                unreachable!()
            },
        },
    ]
}

fn describe(r: &Option<Response>) -> String {
    match r {
        None => "no reply".into(),
        Some(Response::Error { error, closing }) => {
            format!("{}{}", error, if *closing { ", closing" } else { "" })
        }
        Some(Response::Call(Err(e))) => e.to_string(),
        Some(other) => format!("{other:?}").chars().take(80).collect(),
    }
}

/// A well-behaved client working beside every case: kmalloc and kfree,
/// one at a time. Counts what it got done, and what failed.
fn bystander(t: &Target, stop: &AtomicBool, done: &AtomicU64) -> Result<()> {
    let mut c = t.client("bystander")?;
    while !stop.load(Ordering::Relaxed) {
        let o = c.kmalloc(128, Gfp::KERNEL)?;
        c.kfree(o.handle)?;
        done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Runs every case against `t`, printing a line for each.
pub fn run_against(t: &Target) -> Result<()> {
    let mut ctl = t.client("hostile-control")?;
    // Views once, so the control connection's buffers have grown first.
    for op in [Op::Meminfo, Op::Slabinfo, Op::Clients] {
        ctl.call(op)?;
    }
    let baseline = settle(&mut ctl, None, Duration::from_secs(10))?;
    let mut failed = 0;
    for case in cases() {
        let stop = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let started = Instant::now();
        let (outcome, by) = std::thread::scope(|s| {
            let by = s.spawn(|| bystander(t, &stop, &done));
            let before = done.load(Ordering::Relaxed);
            let r = (case.run)(t);
            // The bystander must have moved during the case (or, for a
            // case shorter than one of its steps, just after).
            let deadline = Instant::now() + Duration::from_secs(5);
            while done.load(Ordering::Relaxed) <= before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Relaxed);
            (r, by.join())
        });
        let by = match by {
            Ok(Ok(())) if done.load(Ordering::Relaxed) > 0 => Ok(()),
            Ok(Ok(())) => Err("the bystander was not served".to_string()),
            Ok(Err(e)) => Err(format!("the bystander failed: {e:#}")),
            Err(_) => Err("the bystander panicked".into()),
        };
        let alive = ctl
            .status()
            .map(|_| ())
            .map_err(|e| format!("memd no longer answers: {e}"));
        let back = alive.clone().and_then(|()| {
            let now = settle(&mut ctl, Some(baseline), Duration::from_secs(15))
                .map_err(|e| e.to_string())?;
            if now == baseline {
                Ok(())
            } else {
                Err(format!(
                    "free memory {} bytes off its baseline",
                    now as i64 - baseline as i64
                ))
            }
        });
        let line = match (&outcome, by, alive, back) {
            (Ok(what), Ok(()), Ok(()), Ok(())) => format!(
                "  ok    {:<42} {what}; bystander served {} times; baseline restored ({:.1} s)",
                case.name,
                done.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            ),
            (o, b, a, m) => {
                failed += 1;
                let why: Vec<String> = [
                    o.as_ref().err().map(|e| format!("{e:#}")),
                    b.err(),
                    a.err(),
                    m.err(),
                ]
                .into_iter()
                .flatten()
                .collect();
                format!("  FAIL  {:<42} {}", case.name, why.join("; "))
            }
        };
        println!("{line}");
        if ctl.status().is_err() {
            break;
        }
    }
    ensure!(failed == 0, "{failed} hostile-client case(s) failed");
    Ok(())
}

/// Boots memd (microvm, 1 GiB, TCG unless told) and runs the suite.
pub fn run(accel: Accel) -> Result<()> {
    let kernel = crate::build::build_kernel()?;
    let guest = GuestArgs {
        accel,
        ..GuestArgs::default()
    };
    let (cfg, accel) = guest.config(
        kernel,
        &format!(
            "memd.hello_timeout={HELLO_TIMEOUT_S} memd.send_timeout={SEND_TIMEOUT_S} \
             memd.request_timeout={REQUEST_TIMEOUT_S}"
        ),
    )?;
    // The attackers hold the client token, as any client would.
    let endpoint = Endpoint::temporary("hostile")?;
    let cfg = endpoint.serve(cfg).time_bound(Duration::from_secs(600));
    println!(
        "hostile clients: memd on {}, {}",
        endpoint.addr(),
        accel.name()
    );
    let target = Target {
        addr: endpoint.addr(),
        token: endpoint.tokens.client.clone(),
    };
    let (out, result) = cfg.run_client(|| run_against(&target))?;
    if out.panicked() {
        bail!(
            "memd crashed under hostile clients:\n{}",
            out.console()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    match result {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(e),
        None => bail!(
            "memd never became ready (timed out: {}); console:\n{}",
            out.timed_out,
            out.console()
        ),
    }
}
