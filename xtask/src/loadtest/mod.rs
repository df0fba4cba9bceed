//! `cargo xtask loadtest`: many concurrent clients against memd, a mixed
//! operation profile (pages of several orders, kmalloc, slab caches,
//! mempools, DMA buffers, statistics) or a batch profile (allocator
//! operations per second through batch frames), throughput and latency
//! percentiles per operation kind, errors by code, optional fault injection,
//! and a check that free memory returns exactly to its baseline once every
//! client has disconnected.
//!
//! It boots memd under QEMU itself (on a free loopback port, with its own
//! tokens) unless `--addr` names a running service. The clients hold the
//! client token; the run's own control steps (clearing and setting fault
//! injection, the invariant check) the operator's. Every loop is bounded by
//! a count and by time; only 127.0.0.1 is used when booting.
//!
//! `--noisy N` adds noisy neighbours beside the clients: operator
//! connections looping over the heaviest requests (see [`noisy`]), whose
//! figures the report keeps apart. The report also gives the service
//! loop's passes over the run (see [`passes`]), when the service reports
//! them.
//!
//! `--profile exhaust` is the exhaustion test: clients take pages until the
//! service says ENOMEM (within their quotas), then the reserve below `min`,
//! the statistics and new connections are checked while memory is
//! exhausted.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::guest::GuestArgs;
use crate::qemu::Accel;

mod against;
mod baseline;
mod boot;
mod drive;
mod exhaust;
mod figures;
mod fleet;
mod hotplug;
mod latency;
mod noisy;
mod passes;
mod report;
mod smoke;
mod tally;
mod worker;

pub use against::{run_against, Tokens};
pub(crate) use baseline::{available, settle};
pub use boot::{boot_and_run, boot_and_run_with, Alongside};
pub use exhaust::ExhaustFigures;
pub use hotplug::HotplugFigures;
pub use passes::PassFigures;
pub use report::{FaultFigures, NoisyFigures, Report};
pub use smoke::smoke;

/// The most clients one run may start.
pub const MAX_CLIENTS: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Pages, kmalloc, caches, mempools, DMA buffers and statistics.
    Mixed,
    /// Batches of kmalloc/kfree and page alloc/free (allocator ops/s).
    Batch,
    /// One small request at a time: kmalloc(64) then kfree, alternately
    /// (the single-operation request rate and latency).
    Single,
    /// Take all memory: ENOMEM within quotas, reserve intact, service alive.
    Exhaust,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultWhich {
    Slab,
    Pages,
    Both,
}

/// The kernel command line a load test's guest gets unless `--cmdline`
/// says otherwise: a contiguous region for the large DMA buffers.
pub const DEFAULT_CMDLINE: &str = "memd.dma_reserve=128M@dma32";

#[derive(Debug, Clone, clap::Args)]
#[command(mut_arg("cmdline", |a| a.default_value(DEFAULT_CMDLINE)))]
pub struct Args {
    /// Target a running memd at this address instead of booting one (the
    /// guest options are then unused).
    #[arg(long)]
    pub addr: Option<String>,
    /// Spread the clients over every memd of this fleet file (`cargo
    /// xtask libvirt start` keeps .memd/fleet.json), each run with its own
    /// baseline.
    #[arg(long, conflicts_with = "addr")]
    pub fleet: Option<std::path::PathBuf>,
    /// Client token for `--addr` (default: MEMD_TOKEN or .memd/token).
    #[arg(long)]
    pub token: Option<String>,
    /// Operator token for `--addr` (default: --token when given, else
    /// MEMD_OPERATOR_TOKEN, MEMD_TOKEN, .memd/operator-token, .memd/token).
    #[arg(long)]
    pub operator_token: Option<String>,
    /// Concurrent clients (1..=256).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_CLIENTS as i64))]
    pub clients: u32,
    /// Noisy neighbours besides the clients: operator connections looping
    /// over the heaviest requests (stress runs, large DMA fills and
    /// checksums, disk transfers, batches of stress runs, cache and pool
    /// storms) for as long as the clients run; reported apart. At most 256
    /// with --clients.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=MAX_CLIENTS as i64))]
    pub noisy: u32,
    /// Run for this many seconds (default 10 unless --ops is given).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Stop after this many operations in total (also bounded by --duration,
    /// default one hour when only --ops is given).
    #[arg(long)]
    pub ops: Option<u64>,
    /// Operation profile.
    #[arg(long, value_enum, default_value_t = Profile::Mixed)]
    pub profile: Profile,
    /// Operations per batch frame (batch profile).
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// PRNG seed (client i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Inject allocation failures with this percent probability during the run.
    #[arg(long)]
    pub fault_probability: Option<u8>,
    /// Which allocations faults are injected into.
    #[arg(long, value_enum, default_value_t = FaultWhich::Both)]
    pub fault_target: FaultWhich,
    /// Only every N-th eligible allocation may fail.
    #[arg(long, default_value_t = 1)]
    pub fault_interval: u32,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for free memory to settle back to its baseline.
    #[arg(long, default_value_t = 20)]
    pub settle: u64,
    /// While the clients run, grow the virtio-mem device to half its
    /// region and shrink it to nothing, in turn, every this many seconds
    /// (the guest needs --hotplug; with --addr, QMP at --qmp).
    #[arg(long, value_name = "SECS")]
    pub hotplug_cycle: Option<u64>,
    /// QEMU's QMP socket for --hotplug-cycle with --addr [default:
    /// .memd/qmp.sock]; a booted guest uses its own.
    #[arg(long, requires = "addr")]
    pub qmp: Option<std::path::PathBuf>,
    /// The guest booted unless `--addr` is given; its `--cmdline` defaults
    /// to a DMA reservation (DEFAULT_CMDLINE).
    #[command(flatten)]
    pub guest: GuestArgs,
}

impl Args {
    /// The smoke run of `cargo xtask test`: short, TCG, asserted.
    pub fn smoke(clients: u32, secs: u64, fault_probability: Option<u8>) -> Args {
        Args {
            addr: None,
            fleet: None,
            token: None,
            operator_token: None,
            clients,
            noisy: 0,
            duration: Some(secs),
            ops: None,
            profile: Profile::Mixed,
            batch: 256,
            seed: 7,
            fault_probability,
            fault_target: FaultWhich::Both,
            fault_interval: 1,
            json: true,
            settle: 20,
            hotplug_cycle: None,
            qmp: None,
            guest: GuestArgs {
                accel: Accel::Tcg,
                cmdline: DEFAULT_CMDLINE.into(),
                ..GuestArgs::default()
            },
        }
    }

    /// Refuses what cannot run: more connections than one run may start,
    /// noisy neighbours in the exhaustion test (it takes all memory), a
    /// fault probability above 100 %.
    fn validate(&self) -> Result<()> {
        if self.clients + self.noisy > MAX_CLIENTS {
            bail!(
                "--clients {} and --noisy {} make more than {MAX_CLIENTS} connections",
                self.clients,
                self.noisy
            );
        }
        if self.noisy > 0 && self.profile == Profile::Exhaust {
            bail!("--noisy does not go with --profile exhaust");
        }
        if self.fault_probability.is_some_and(|p| p > 100) {
            bail!("--fault-probability is a percentage (0..=100)");
        }
        if self.hotplug_cycle.is_some() {
            if self.addr.is_none() && self.guest.hotplug.is_none() {
                bail!("--hotplug-cycle needs a guest with a virtio-mem device: --machine q35 --hotplug SIZE");
            }
            if self.hotplug_cycle == Some(0)
                || self.profile == Profile::Exhaust
                || self.fleet.is_some()
            {
                bail!("--hotplug-cycle takes a period of 1 s or more, and not with --profile exhaust or --fleet");
            }
        }
        Ok(())
    }

    fn time_bound(&self) -> Duration {
        Duration::from_secs(match (self.duration, self.ops) {
            (Some(d), _) => d,
            (None, Some(_)) => 3600,
            (None, None) => 10,
        })
    }
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(path) = &args.fleet {
        args.validate()?;
        if !fleet::run_fleet(path, args)? {
            bail!("load test failed");
        }
        return Ok(());
    }
    let report = match &args.addr {
        Some(addr) => {
            args.validate()?;
            let client = memd_client::discover_token(args.token.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let operator = memd_client::discover_operator_token(
                args.operator_token.as_deref().or(args.token.as_deref()),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            run_against(addr, &Tokens { client, operator }, args)?
        }
        None => boot_and_run(args)?,
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        report.print();
    }
    if !report.passed() {
        bail!("load test failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("loadtest").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn noisy_option_parses_and_is_checked() {
        assert_eq!(parse(&[]).unwrap().noisy, 0);
        assert_eq!(Args::smoke(8, 4, None).noisy, 0);
        let a = parse(&["--noisy", "3", "--clients", "8"]).unwrap();
        assert_eq!((a.noisy, a.clients), (3, 8));
        a.validate().unwrap();
        assert!(parse(&["--noisy", "257"]).is_err());
        let too_many = parse(&["--noisy", "200", "--clients", "100"]).unwrap();
        assert!(too_many.validate().is_err());
        let exhaust = parse(&["--noisy", "1", "--profile", "exhaust"]).unwrap();
        assert!(exhaust.validate().is_err());
        let faults = parse(&["--fault-probability", "101"]).unwrap();
        assert!(faults.validate().is_err());
        parse(&["--profile", "exhaust"])
            .unwrap()
            .validate()
            .unwrap();
    }
}
