//! The hostile-client suite: boots memd and attacks its control port the
//! ways a careless or malicious client would, one case at a time. After
//! every case memd must still answer, a well-behaved client working
//! alongside must have been served throughout, and free memory must be
//! back exactly at its baseline.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use memd_client::wire::{to_frame, Gfp, Hello, Op, Request, Response, PROTOCOL_VERSION};
use memd_client::{Client, Options};

use crate::guest::{Endpoint, GuestArgs};
use crate::loadtest::settle;
use crate::qemu::Accel;

/// Timeouts the guest runs with, short so the cases that wait for them
/// stay short.
const HELLO_TIMEOUT_S: u64 = 1;
const SEND_TIMEOUT_S: u64 = 2;
const REQUEST_TIMEOUT_S: u64 = 2;

mod cases;

use cases::{cases, read_response};

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
    for op in [Op::Meminfo, Op::Slabinfo { start: 0 }, Op::Clients] {
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

/// Boots memd (microvm, 1 GiB, TCG, as every test of `cargo xtask test`)
/// and runs the suite.
pub fn run() -> Result<()> {
    let kernel = crate::build::build_kernel()?;
    let guest = GuestArgs {
        accel: Accel::Tcg,
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
        // The console's last 20 lines, in order.
        let console = out.console();
        let lines: Vec<&str> = console.lines().collect();
        bail!(
            "memd crashed under hostile clients; the console's last lines:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
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
