//! A load test against a guest of its own: memd booted under QEMU on a
//! free loopback port with fresh tokens, the load run once it is ready,
//! QEMU stopped after; optionally with a task beside the load (`cargo
//! xtask profile` samples the vCPU through QEMU's monitor).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::against::{run_against, Tokens};
use super::{Args, Report};
use crate::guest::Endpoint;

/// Boots memd under QEMU on a free loopback port and runs the load test
/// against it; the report, or why there is none (a crash, a guest that
/// never became ready, the time bound).
pub fn boot_and_run(args: &Args) -> Result<Report> {
    boot_and_run_with(args, None)
}

/// What runs beside a load test (`cargo xtask profile`): its own kernel
/// build, a QEMU monitor socket, and a task that runs while the load does
/// and is told when it ends.
pub struct Alongside<'a> {
    pub kernel: std::path::PathBuf,
    pub monitor: std::path::PathBuf,
    pub task: &'a mut (dyn FnMut(&AtomicBool) + Send),
}

/// [`boot_and_run`], with `alongside` running beside the load.
pub fn boot_and_run_with(args: &Args, mut alongside: Option<Alongside>) -> Result<Report> {
    args.validate()?;
    let kernel = match &alongside {
        Some(a) => a.kernel.clone(),
        None => crate::build::build_kernel()?,
    };
    let (cfg, accel) = args.guest.config(kernel, "")?;
    let endpoint = Endpoint::temporary("loadtest")?;
    let tokens = Tokens {
        client: endpoint.tokens.client.clone(),
        operator: endpoint.tokens.operator.clone(),
    };
    let mut cfg = endpoint
        .serve(cfg)
        .time_bound(args.time_bound() + Duration::from_secs(180 + args.settle * 2));
    if let Some(a) = &alongside {
        cfg = cfg.monitor(a.monitor.clone());
    }
    // The hot-plug cycling talks to this guest's own QMP socket.
    let mut args = args.clone();
    if args.hotplug_cycle.is_some() {
        let sock = std::env::temp_dir().join(format!(
            "memd-loadtest-{}-{}.qmp",
            std::process::id(),
            endpoint.port
        ));
        cfg = cfg.qmp(sock.clone());
        args.qmp = Some(sock);
    }
    let args = &args;
    if !args.json {
        eprintln!("loadtest: accelerator {}: {}", accel.name(), accel.reason);
        eprintln!("loadtest: booting memd on {}", endpoint.addr());
    }
    let addr = endpoint.addr();
    let (out, report) = cfg.run_client(|| {
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            if let Some(a) = alongside.as_mut() {
                let (task, done) = (&mut a.task, &done);
                s.spawn(move || task(done));
            }
            let r = run_against(&addr, &tokens, args);
            done.store(true, Ordering::Relaxed);
            r
        })
    })?;
    let crashed = out.panicked();
    if out.timed_out || crashed || out.ready_after.is_none() {
        let tail: Vec<&str> = out
            .lines
            .iter()
            .rev()
            .take(40)
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        bail!(
            "memd {} (status {:?}); console tail:\n{}\n{}",
            if crashed {
                "crashed"
            } else if out.ready_after.is_none() {
                "never became ready"
            } else {
                "timed out"
            },
            out.status,
            tail.join("\n"),
            out.stderr
        );
    }
    report.context("the load test did not run")?
}
