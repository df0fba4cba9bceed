//! `cargo xtask libvirt`: memd as libvirt domains, driven by `virsh` and
//! watched as a fleet by `memctl --fleet`.
//!
//! Each domain's tokens and console log live in `.memd/libvirt/NAME/`
//! (mode 0700, the tokens 0600); `start` adds the domain to the fleet file
//! `.memd/fleet.json` and `stop` takes it out.

mod check;
mod domain;
mod virsh;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use memd_client::fleet::{Fleet, Member};

pub use check::smoke;
pub use domain::Domain;
pub use virsh::ensure_libvirt;

use crate::qemu::{self, Accel, Machine};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Print the domain definition (and write the instance's tokens).
    Xml(DomainArgs),
    /// Define and start a memd domain, wait until it is ready, and add it
    /// to the fleet file.
    Start(DomainArgs),
    /// Stop and undefine memd domains, and take them out of the fleet file.
    Stop {
        /// Domain names (default: every domain of the fleet file).
        names: Vec<String>,
    },
    /// The memd domains libvirt knows, with their state and address.
    List,
}

/// One memd domain. Only q35: libvirt does not model QEMU's microvm
/// machine.
#[derive(Debug, Clone, clap::Args)]
pub struct DomainArgs {
    /// Domain name.
    #[arg(long, default_value = "memd-1")]
    pub name: String,
    /// Control port: 127.0.0.1:PORT is forwarded to the guest.
    #[arg(long, default_value_t = 5601)]
    pub port: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem_mib: u64,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Accelerator (auto never takes a kvm_pvm /dev/kvm).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// A virtio-mem region of this many MiB (`<memory model='virtio-mem'>`,
    /// a multiple of 2), nothing plugged at start: `virsh
    /// update-memory-device NAME --requested-size SIZE --live` grows and
    /// shrinks the running memd.
    #[arg(long)]
    pub hotplug_mib: Option<u64>,
}

/// `.memd/fleet.json` at the repository's root.
pub fn fleet_file() -> PathBuf {
    crate::build::repo_root().join(".memd/fleet.json")
}

/// Where instances keep their tokens and console: `.memd/libvirt/`.
fn instances_dir() -> PathBuf {
    crate::build::repo_root().join(".memd/libvirt")
}

/// The domain `args` describe, its directory (in `base`) made and its
/// tokens written (fresh ones for a new instance; an existing instance
/// keeps its own).
pub fn prepare(args: &DomainArgs, base: &std::path::Path) -> Result<Domain> {
    if args
        .hotplug_mib
        .is_some_and(|m| m == 0 || !m.is_multiple_of(2))
    {
        bail!("--hotplug-mib: a region of whole 2 MiB blocks, more than none");
    }
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!("a domain name is letters, digits and '-'");
    }
    let qemu_path = qemu::ensure_qemu()?;
    let accel = qemu::choose_accel(args.accel, &qemu_path, Machine::Q35)?;
    eprintln!(
        "xtask: libvirt domain type {}: {}",
        if accel.kvm { "kvm" } else { "qemu (TCG)" },
        accel.reason
    );
    let kernel = crate::build::build_kernel()?;
    let dir = base.join(&args.name);
    crate::tokens::private_dir(&dir)?;
    if !dir.join("token").exists() || !dir.join("operator-token").exists() {
        crate::tokens::GuestTokens::write_in(&dir)?;
    }
    let meta = std::fs::metadata(&dir).with_context(|| dir.display().to_string())?;
    Ok(Domain {
        name: args.name.clone(),
        port: args.port,
        mem_mib: args.mem_mib,
        kernel,
        dir,
        kvm: accel.kvm,
        cmdline: args.cmdline.clone(),
        uid: meta.uid(),
        gid: meta.gid(),
        hotplug_mib: args.hotplug_mib,
    })
}

/// Starts `d` and adds it to the fleet file `path`; a domain that cannot
/// be listed there is stopped again.
pub fn start(d: &Domain, path: &std::path::Path) -> Result<()> {
    let mut fleet = Fleet::load(path)?;
    virsh::start(d, Duration::from_secs(90))?;
    fleet.put(Member {
        name: d.name.clone(),
        addr: d.addr(),
        token_file: d.token_file(),
        operator_token_file: d.operator_token_file(),
    });
    if let Err(e) = fleet.save(path) {
        let _ = virsh::stop(&d.name);
        return Err(e.into());
    }
    Ok(())
}

/// Stops and undefines memd domain `name` (a domain without memd's
/// metadata is refused), and takes it out of the fleet file `path`.
pub fn stop(name: &str, path: &std::path::Path) -> Result<()> {
    let result = if virsh::is_memd(name) {
        virsh::stop(name)
    } else {
        Err(anyhow::anyhow!(
            "{name} is not a memd domain (no memd metadata)"
        ))
    };
    let mut fleet = Fleet::load(path)?;
    if fleet.remove(name) {
        fleet.save(path)?;
    }
    result
}

pub fn run(args: &Args) -> Result<()> {
    match &args.cmd {
        Cmd::Xml(a) => {
            print!("{}", prepare(a, &instances_dir())?.xml());
            Ok(())
        }
        Cmd::Start(a) => {
            ensure_libvirt()?;
            let d = prepare(a, &instances_dir())?;
            start(&d, &fleet_file())?;
            println!(
                "{} is ready on {} (tokens in {}); `memctl --fleet {} status` shows the fleet",
                d.name,
                d.addr(),
                d.dir.display(),
                fleet_file().display()
            );
            Ok(())
        }
        Cmd::Stop { names } => {
            ensure_libvirt()?;
            let names = if names.is_empty() {
                Fleet::load(&fleet_file())?
                    .members
                    .into_iter()
                    .map(|m| m.name)
                    .collect()
            } else {
                names.clone()
            };
            let mut failed = 0;
            for name in names {
                match stop(&name, &fleet_file()) {
                    Ok(()) => println!("{name} stopped and undefined"),
                    Err(e) => {
                        eprintln!("{name}: {e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} domain(s) not stopped");
            }
            Ok(())
        }
        Cmd::List => {
            ensure_libvirt()?;
            for (name, state, addr) in virsh::list()? {
                println!("{name:<16} {state:<12} {addr}");
            }
            Ok(())
        }
    }
}
