//! The boot test matrix: boot with `memd.selftest=1` on microvm and
//! q35, with 64 MiB, 1 GiB and 5 GiB, with and without
//! `memd.dma_reserve=64M@dma32`, and check from the console that
//!
//! - the guest exits through isa-debug-exit with success, within a time
//!   bound, without a panic or CPU exception, after `memd: ready` and
//!   `selftest: passed`;
//! - the firmware memory map it printed accounts for the `-m` size;
//! - every zone's managed page count equals the usable RAM of the memory map
//!   inside the zone's span minus the reservations the kernel reported, and
//!   exactly the zones that the memory size implies are populated;
//! - the DMA reservation is there exactly when asked for, 64 MiB, inside
//!   usable RAM of the zone asked for (DMA32, or Normal above 4 GiB in a
//!   6 GiB guest, where the self-test's large buffer needs a 64-bit mask).
//!   A 64 MiB guest cannot hold it: that case must fail cleanly (an error
//!   naming dma_reserve and a failure exit, no hang, no fault).
//! - with virtio-blk, disk DMA through the service round-trips (see
//!   `disk_check`), and large contiguous buffers from `memd.dma_reserve`
//!   move through the disk, also after fragmentation (`dma_disk_check`);
//! - with virtio-net (mmio on microvm, PCI on q35, PCIe with BARs the
//!   kernel assigns on microvm,pcie=on) the control port works
//!   end to end (see `control_port_check`), each role's token allows
//!   what it should, and neither token is on QEMU's command line (they
//!   reach the guest as fw_cfg files); memory clients touch and free goes
//!   back to the host through the balloon's free page reporting (see
//!   `reporting_check`);
//! - with a virtio-mem device (q35), memory the host asks for is plugged
//!   into ZONE_MOVABLE, serves movable requests beyond the boot memory, is
//!   never unplugged while in use, and is unplugged once freed (see
//!   `hotplug_check`);
//! - without a PIT (`microvm,pit=off`) boot completes and says so;
//! - two deliberate crashes (`memd.selftest=panic` on microvm, a page fault
//!   with `memd.selftest=fault` on q35) are seen as failures: the harness
//!   can fail.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest::Endpoint;
use crate::qemu::{self, QemuConfig};

mod balloon;
mod control;
mod disk;
mod dma_disk;
mod hotplug;
mod matrix;
pub(crate) mod memctl;
mod memory;
mod owners;
mod verdict;

use balloon::{balloon_check, reporting_check};
use control::control_port_check;
use disk::{disk_check, TempDisk};
use dma_disk::dma_disk_check;
use hotplug::hotplug_check;
use matrix::{matrix, mem_arg, Case, Reserve};
use memctl::memctl_check;
use owners::owners_check;
use verdict::judge;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Default, clap::Args)]
pub struct BootTestArgs {
    /// Only run cases whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
    /// Parallel QEMU instances (default: number of CPUs, at most 4).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Time bound for each boot, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Every case with at least this many CPUs (cases that differ only in
    /// their CPUs then run once).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub smp: u32,
}

/// Runs the cases `--filter` keeps, `--jobs` guests at a time, each within
/// `--timeout`, and prints a line for each; fails when any case fails.
pub fn run(args: &BootTestArgs) -> Result<()> {
    let kernel = crate::build::build_kernel()?;
    let qemu_path = qemu::ensure_qemu()?;
    // The matrix runs under TCG (QemuConfig's default): it must behave the
    // same on every host.
    let mut cases: Vec<Case> = matrix()
        .into_iter()
        .map(|c| Case {
            smp: c.smp.max(args.smp),
            ..c
        })
        .filter(|c| {
            args.filter
                .as_ref()
                .is_none_or(|f| c.name().contains(f.as_str()))
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    cases.retain(|c| seen.insert(c.name()));
    if cases.is_empty() {
        bail!("no boot test matches the filter");
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4)
        })
        .max(1);
    eprintln!(
        "boot tests: {} cases, {jobs} at a time, TCG, {} s bound each",
        cases.len(),
        args.timeout
    );
    let queue = Mutex::new(cases.iter());
    let failures = Mutex::new(Vec::<String>::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some(case) = queue.lock().unwrap().next() else {
                    break;
                };
                let (cfg, served) = match prepare(case, &qemu_path, &kernel, args.timeout) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("  FAIL  {:<28}", case.name());
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{}: {e:#}", case.name()));
                        continue;
                    }
                };
                let t = Instant::now();
                let verdict = match &served {
                    Some((endpoint, disk)) => {
                        cfg.run_then(&mut || serve_checks(case, &cfg, endpoint, disk))
                    }
                    None => cfg.run_to_exit(),
                };
                let verdict = match verdict {
                    Ok(out) => judge(case, &out).map_err(|e| {
                        format!(
                            "{e}\n--- console ---\n{}\n--- stderr ---\n{}",
                            out.console(),
                            out.stderr
                        )
                    }),
                    Err(e) => Err(format!("could not run QEMU: {e:#}")),
                };
                let ms = t.elapsed().as_millis();
                match verdict {
                    Ok(()) => eprintln!("  ok    {:<28} {ms:>6} ms", case.name()),
                    Err(e) => {
                        eprintln!("  FAIL  {:<28} {ms:>6} ms", case.name());
                        failures.lock().unwrap().push(format!(
                            "{}: {e}\n$ {}",
                            case.name(),
                            cfg.describe()
                        ));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "boot tests: {} passed, {} failed in {:.1} s",
        cases.len() - failures.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("\n==== {f}");
        }
        bail!("{} boot test(s) failed", failures.len());
    }
    Ok(())
}

/// Every CPU QEMU was given is up: the status view lists them, the boot
/// CPU serving and the others halted since they came up. With several, a
/// stress run on all of them at once: each runs a share, the invariants
/// hold, free memory is back where it was, and a run on more CPUs than
/// there are is refused.
fn cpus_check(smp: u32, port: u16, tokens: &crate::tokens::GuestTokens) -> Result<(), String> {
    let opts = memd_client::Options::new(format!("127.0.0.1:{port}"), &tokens.client);
    let mut c = memd_client::Client::connect(&opts).map_err(|e| format!("cpus: {e}"))?;
    let cpus = c.status().map_err(|e| format!("cpus: {e}"))?.cpus;
    let roles: Vec<&str> = cpus.iter().map(|c| c.role.as_str()).collect();
    let mut ids: Vec<u32> = cpus.iter().map(|c| c.apic_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let want_roles: Vec<&str> = (0..smp)
        .map(|k| if k == 0 { "network loop" } else { "worker" })
        .collect();
    if roles != want_roles || ids.len() != smp as usize {
        return Err(format!(
            "cpus: want {smp} CPUs online, the status view lists {cpus:?}"
        ));
    }
    if cpus
        .iter()
        .skip(1)
        .any(|c| c.busy_ns != 0 || c.halted_ns == 0)
    {
        return Err(format!("cpus: the started CPUs should be halted: {cpus:?}"));
    }
    let zones = c.zoneinfo().map_err(|e| format!("cpus: {e}"))?;
    if let Some(z) = zones.iter().find(|z| z.cpu_pagesets.len() != smp as usize) {
        return Err(format!(
            "cpus: zone {} lists {} CPU pagesets, want {smp}",
            z.name,
            z.cpu_pagesets.len()
        ));
    }
    if smp == 1 {
        return Ok(());
    }
    let opts = memd_client::Options::new(format!("127.0.0.1:{port}"), &tokens.operator);
    let mut op = memd_client::Client::connect(&opts).map_err(|e| format!("cpus: {e}"))?;
    let settle = |c: &mut memd_client::Client, target| {
        crate::loadtest::settle(c, target, std::time::Duration::from_secs(2))
            .map_err(|e| format!("cpus: {e:#}"))
    };
    let before = settle(&mut op, None)?;
    const OPS: u64 = 400_000;
    let r = op
        .stress_on(OPS, 7, smp)
        .map_err(|e| format!("cpus: stress --cpus {smp}: {e}"))?;
    if r.cpus != smp
        || r.cpu_ops.len() != smp as usize
        || r.cpu_ops.iter().sum::<u64>() != OPS
        || r.cpu_ops.contains(&0)
        || !r.check_ok
    {
        return Err(format!(
            "cpus: stress --cpus {smp}: want every CPU to run a share of {OPS} ops and the check to pass: {r:?}"
        ));
    }
    let after = settle(&mut op, Some(before))?;
    if after != before {
        return Err(format!(
            "cpus: free memory after stress --cpus {smp} is {after} bytes, before {before}"
        ));
    }
    let cpus = op.status().map_err(|e| format!("cpus: {e}"))?.cpus;
    if cpus
        .iter()
        .any(|c| c.objects.allochit == 0 || c.objects.freehit == 0 || c.pages.allochit == 0)
        || cpus.iter().skip(1).any(|c| c.busy_ns == 0)
    {
        return Err(format!(
            "cpus: every CPU should have run a share through its own caches, the workers as jobs: {cpus:?}"
        ));
    }
    let slabs = op.slabinfo().map_err(|e| format!("cpus: {e}"))?;
    let hits: u64 = slabs
        .iter()
        .flat_map(|s| s.cpustat)
        .map(|s| s.allochit)
        .sum();
    let per_cpu: u64 = cpus.iter().map(|c| c.objects.allochit).sum();
    if hits != per_cpu {
        return Err(format!(
            "cpus: slabinfo's cpustat sums {hits} array hits, the CPUs count {per_cpu}"
        ));
    }
    match op.stress_on(1000, 7, smp + 1) {
        Err(e) if e.code() == Some(memd_client::wire::errno::EINVAL) => Ok(()),
        r => Err(format!(
            "cpus: stress --cpus {} should be refused with EINVAL: {r:?}",
            smp + 1
        )),
    }
}

/// A served case's endpoint and disk image.
fn served(case: &Case) -> anyhow::Result<(Endpoint, TempDisk)> {
    let endpoint = Endpoint::temporary("boot-test")?;
    let disk = TempDisk::new(&case.name())?;
    Ok((endpoint, disk))
}

/// QEMU's configuration for `case`, within `timeout` seconds, and, for a
/// case that serves, its endpoint and disk: fresh tokens for each guest,
/// in a private directory, so only their paths go on QEMU's command line.
fn prepare(
    case: &Case,
    qemu_path: &std::path::Path,
    kernel: &std::path::Path,
    timeout: u64,
) -> anyhow::Result<(QemuConfig, Option<(Endpoint, TempDisk)>)> {
    let served = case
        .net
        .then(|| served(case))
        .transpose()
        .context("setting up the service")?;
    let mut cfg = QemuConfig::new(qemu_path.to_path_buf(), kernel.to_path_buf(), case.machine)
        .mem(&mem_arg(case.mem))
        .smp(case.smp)
        .append(&case.cmdline())
        .time_bound(Duration::from_secs(timeout));
    if let Some(bytes) = case.hotplug {
        cfg = cfg.hotplug(bytes)?;
    }
    if let Some((endpoint, disk)) = &served {
        cfg = endpoint
            .serve(cfg)
            .disk(disk.path.clone())
            .qmp(disk.qmp.clone());
    }
    Ok((cfg, served))
}

/// What a served case checks once the guest is ready: no token on QEMU's
/// command line (any local user can read one in /proc), the control port,
/// clients past 255 each charged exactly, free page reporting (memory
/// clients freed goes back to the host), the balloon following the host's
/// targets, the disk, large DMA buffers through the disk when the
/// case reserves DMA32 memory, and memctl.
fn serve_checks(
    case: &Case,
    cfg: &QemuConfig,
    endpoint: &Endpoint,
    disk: &TempDisk,
) -> Result<(), String> {
    let (port, tokens) = (endpoint.port, &endpoint.tokens);
    if tokens.appear_in(&cfg.command()) {
        return Err("a token is on QEMU's command line".into());
    }
    control_port_check(port, tokens)?;
    cpus_check(case.smp, port, tokens)?;
    owners_check(port, tokens)?;
    reporting_check(port, tokens)?;
    balloon_check(case.mem, port, tokens, &disk.qmp)?;
    disk_check(port, &tokens.client, &disk.path)?;
    if case.dma_reserve == Some(Reserve::Dma32) {
        dma_disk_check(port, &tokens.client)?;
    }
    if let Some(region) = case.hotplug {
        hotplug_check(region, port, tokens, &disk.qmp)?;
    }
    memctl_check(port, tokens, &disk.qmp)
}
