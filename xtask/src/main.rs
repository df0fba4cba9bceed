//! `cargo xtask`: build, run, test and benchmark memd.

mod bench_balloon;
mod bench_boot;
mod bench_disk;
mod bench_hotplug;
mod bench_stress;
mod boot_tests;
mod build;
mod fuzz;
mod guest;
mod hostile;
mod libvirt;
mod loadtest;
mod profile;
mod qemu;
mod rng;
mod run;
mod tokens;
mod toolchain;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run, test and benchmark memd")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel ELF (release).
    Build,
    /// Build the kernel and run it under QEMU in the foreground.
    Run(run::RunArgs),
    /// Host tests, then the boot test matrix under QEMU.
    Test(TestArgs),
    /// Many concurrent clients: throughput, latency, errors, memory baseline.
    Loadtest(loadtest::Args),
    /// Where the guest's CPU goes during a load test: sampled instruction
    /// pointers, symbolised with their inline chains (`perf top`-like).
    Profile(profile::ProfileArgs),
    /// The proptest fuzz targets with many cases.
    Fuzz(fuzz::Args),
    /// memd as libvirt domains: print a definition, start, stop, list.
    Libvirt(libvirt::Args),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

#[derive(clap::Args)]
struct TestArgs {
    /// Skip the host test suite (cargo test --workspace).
    #[arg(long)]
    boot_only: bool,
    #[command(flatten)]
    boot: boot_tests::BootTestArgs,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time from starting QEMU to `memd: ready` and to all memory
    /// initialised, beside QEMU's floor, for one or more guest sizes.
    Boot(bench_boot::BootBenchArgs),
    /// QEMU's resident memory before, with and after clients fill and free
    /// memory: what free page reporting gives back, and how soon.
    Balloon(bench_balloon::BalloonBenchArgs),
    /// How fast memd follows a virtio-mem device (q35): plug 2 GiB, take
    /// 1.5 GiB of movable pages from it, unplug it again.
    Hotplug(bench_hotplug::HotplugBenchArgs),
    /// virtio-blk MiB/s: one 64 MiB contiguous DMA buffer against 4 KiB buffers.
    Disk(bench_disk::DiskBenchArgs),
    /// The in-guest stress run on one CPU against several at once
    /// (`memctl stress --cpus N`), taking turns in one guest.
    Stress(bench_stress::StressBenchArgs),
    /// memd-mm against buddy_system_allocator, talc, rlsf and the system
    /// allocator on the same traces, side by side in one process.
    Mm {
        /// Print one JSON array of rows instead of the table.
        #[arg(long)]
        json: bool,
        /// Also kmalloc-steady and page0-steady from this many threads at
        /// once (e.g. 1,2), memd-mm beside glibc's malloc and mimalloc:
        /// rows {workload, allocator, threads, ops_per_sec}.
        #[arg(long)]
        threads: Option<String>,
    },
}

/// One of memd-mm's benchmark programs, with `args`: its output.
fn mm_bench(bench: &str, args: &[&str]) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(build::repo_root())
        .args(["bench", "--quiet", "-p", "memd-mm", "--features", "std"])
        .args(["--bench", bench, "--"])
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running the memd-mm benchmark {bench}"))?;
    if !out.status.success() {
        bail!("memd-mm benchmark {bench} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bench_mm(json: bool, threads: Option<&str>) -> Result<()> {
    let flag: &[&str] = if json { &["--json"] } else { &[] };
    let compare = mm_bench("compare", flag)?;
    let Some(threads) = threads else {
        print!("{compare}");
        return Ok(());
    };
    let mut args = vec!["--threads", threads];
    args.extend_from_slice(flag);
    let threaded = mm_bench("threads", &args)?;
    if !json {
        print!("{compare}\n{threaded}");
        return Ok(());
    }
    // One array: the single-threaded rows, then the threaded ones.
    let mut rows: Vec<serde_json::Value> =
        serde_json::from_str(&compare).context("compare's JSON")?;
    let more: Vec<serde_json::Value> = serde_json::from_str(&threaded).context("threads' JSON")?;
    rows.extend(more);
    println!("{}", serde_json::Value::Array(rows));
    Ok(())
}

fn host_tests() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(build::repo_root())
        .args(["test", "--workspace"])
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("host tests failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build => {
            let elf = build::build_kernel()?;
            println!("{}", elf.display());
            Ok(())
        }
        Cmd::Run(args) => run::run(&args),
        Cmd::Test(args) => {
            if !args.boot_only {
                host_tests()?;
            }
            // `--filter loadtest` (or `profile`, `hostile`) runs only that
            // run; no filter runs the boot tests and then all three.
            let filter = args.boot.filter.as_deref();
            let smoke = |name: &str| filter.is_none_or(|f| name.contains(f));
            if !filter.is_some_and(|f| {
                "loadtest".contains(f)
                    || "profile".contains(f)
                    || "hostile".contains(f)
                    || "libvirt".contains(f)
            }) {
                boot_tests::run(&args.boot)?;
            }
            if smoke("hostile") {
                hostile::run()?;
            }
            if smoke("loadtest") {
                loadtest::smoke()?;
            }
            if smoke("profile") {
                profile::smoke()?;
            }
            if smoke("libvirt") {
                libvirt::smoke()?;
            }
            Ok(())
        }
        Cmd::Loadtest(args) => loadtest::run(&args),
        Cmd::Profile(args) => profile::run(&args),
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::Libvirt(args) => libvirt::run(&args),
        Cmd::Bench {
            which: BenchCmd::Boot(args),
        } => bench_boot::run(&args),
        Cmd::Bench {
            which: BenchCmd::Disk(args),
        } => bench_disk::run(&args),
        Cmd::Bench {
            which: BenchCmd::Balloon(args),
        } => bench_balloon::run(&args),
        Cmd::Bench {
            which: BenchCmd::Hotplug(args),
        } => bench_hotplug::run(&args),
        Cmd::Bench {
            which: BenchCmd::Stress(args),
        } => bench_stress::run(&args),
        Cmd::Bench {
            which: BenchCmd::Mm { json, threads },
        } => bench_mm(json, threads.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::{Accel, Machine};
    use clap::CommandFactory;

    fn parse(line: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("xtask").chain(line.iter().copied()))
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
            .cmd
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_readme_commands_parse_with_their_defaults() {
        let Cmd::Run(r) = parse(&[
            "run",
            "--mem",
            "1G",
            "--cmdline",
            "memd.dma_reserve=64M@dma32",
        ]) else {
            panic!("not run")
        };
        assert_eq!((r.guest.mem.as_str(), r.port), ("1G", 5555));
        assert_eq!(r.guest.cmdline, "memd.dma_reserve=64M@dma32");
        assert_eq!(
            (r.guest.machine, r.guest.accel),
            (Machine::Microvm, Accel::Auto)
        );
        let Cmd::Run(r) = parse(&["run", "--disk", "/tmp/d.img", "--disk-size", "1G"]) else {
            panic!("not run")
        };
        assert_eq!((r.disk_size, r.guest.cmdline.as_str()), (Some(1 << 30), ""));

        let Cmd::Loadtest(l) = parse(&[
            "loadtest",
            "--clients",
            "16",
            "--duration",
            "10",
            "--json",
            "--profile",
            "batch",
            "--batch",
            "4096",
            "--noisy",
            "1",
            "--icount",
        ]) else {
            panic!("not loadtest")
        };
        assert_eq!(
            (l.clients, l.duration, l.batch, l.noisy),
            (16, Some(10), 4096, 1)
        );
        assert!(l.json && l.guest.icount && l.profile == loadtest::Profile::Batch);
        assert_eq!(l.guest.cmdline, loadtest::DEFAULT_CMDLINE);
        assert_eq!((l.guest.accel, l.guest.mem.as_str()), (Accel::Auto, "1G"));
        let Cmd::Loadtest(l) = parse(&[
            "loadtest",
            "--profile",
            "exhaust",
            "--clients",
            "4",
            "--mem",
            "256M",
            "--cmdline",
            "",
        ]) else {
            panic!("not loadtest")
        };
        assert_eq!(
            (l.guest.mem.as_str(), l.guest.cmdline.as_str()),
            ("256M", "")
        );

        let Cmd::Profile(p) = parse(&["profile", "--profile", "batch", "--batch", "4096"]) else {
            panic!("not profile")
        };
        assert_eq!(p.load.guest.cmdline, loadtest::DEFAULT_CMDLINE);

        let Cmd::Bench {
            which: BenchCmd::Boot(b),
        } = parse(&["bench", "boot", "--mem", "2G", "--json"])
        else {
            panic!("not bench boot")
        };
        assert_eq!(
            (b.guest.accel, b.guest.mem.as_str(), b.json),
            (Accel::Tcg, "2G", true)
        );
        let Cmd::Bench {
            which: BenchCmd::Disk(d),
        } = parse(&["bench", "disk"])
        else {
            panic!("not bench disk")
        };
        assert_eq!((d.guest.accel, d.guest.mem.as_str()), (Accel::Tcg, "1G"));
        assert_eq!(d.guest.cmdline, "");
    }
}
