//! The hostile cases, each an attack on the control port and the check of
//! what memd answered, and the raw-frame helpers they use.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use memd_client::wire::{
    self, errno, to_frame, DmaMask, Gfp, Hello, Op, Reply, Request, Response, MAX_IO,
    PROTOCOL_VERSION,
};
use memd_client::Client;

use super::{Target, HELLO_TIMEOUT_S, REQUEST_TIMEOUT_S, SEND_TIMEOUT_S};

/// One case: what it does, and the check of what memd answered.
pub(super) struct Case {
    pub name: &'static str,
    pub run: fn(&Target) -> Result<String>,
}

/// Reads one response frame; None when the connection ended first.
pub(super) fn read_response(s: &mut TcpStream) -> Result<Option<Response>> {
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
/// zero bytes: far fewer bytes than the operations announced.
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

/// Every case, in the order they run.
pub(super) fn cases() -> Vec<Case> {
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
                    movable: false,
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
                        cpus: 1,
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
                    match c.cache_create(wire::CacheSpec {
                        name: format!("h{i}"),
                        size: 64,
                        align: 8,
                        flags: wire::SlabFlags(0),
                        ctor: wire::Ctor::None,
                    }) {
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

/// What memd answered, in a few words.
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
