//! The guest options every subcommand that boots memd shares
//! ([`GuestArgs`], flattened into each one's arguments), and where a booted
//! service listens ([`Endpoint`]).

use std::path::PathBuf;

use anyhow::Result;

use crate::qemu::{self, Accel, AccelChoice, Machine, QemuConfig};
use crate::tokens::GuestTokens;

/// The guest a subcommand boots. A subcommand whose default differs says
/// so with `#[command(mut_arg(..))]` on its own arguments (the load test's
/// `--cmdline`, the benchmarks' `--accel`), so `--help` shows the default
/// that applies.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Guest")]
pub struct GuestArgs {
    /// QEMU machine.
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    pub machine: Machine,
    /// Accelerator (auto never takes a kvm_pvm /dev/kvm).
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Guest memory (QEMU `-m` syntax: 256M, 1G, 5G ...).
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Extra kernel command line, after xtask's own words (a key's last
    /// value wins), e.g. "memd.log=debug memd.dma_reserve=64M@dma32".
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// QEMU's `-icount shift=0` (TCG only): what the guest measures (busy
    /// time per operation, device time) becomes an instruction count, free
    /// of the host's noise.
    #[arg(long)]
    pub icount: bool,
    /// QEMU's `-mem-prealloc`: the host backs all guest RAM before boot, so
    /// measurements do not include the host faulting pages in on first
    /// touch (boot takes longer).
    #[arg(long)]
    pub mem_prealloc: bool,
    /// Hot-pluggable memory: a virtio-mem device with a region of SIZE
    /// (QEMU size syntax: 512M, 4G; a multiple of 2 MiB), none of it
    /// plugged at boot, maxmem raised to --mem + SIZE. The host grows the
    /// guest with QMP `qom-set vm0 requested-size`. q35 only.
    #[arg(long, value_name = "SIZE")]
    pub hotplug: Option<String>,
    /// Virtual CPUs (QEMU `-smp`, 1 to 8): memd starts the others from the
    /// ACPI MADT; CPU 0 serves, the others run jobs (`memctl stress
    /// --cpus N`) and halt between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub smp: u32,
}

impl Default for GuestArgs {
    /// The command-line defaults.
    fn default() -> GuestArgs {
        GuestArgs {
            machine: Machine::Microvm,
            accel: Accel::Auto,
            mem: "1G".into(),
            cmdline: String::new(),
            icount: false,
            mem_prealloc: false,
            hotplug: None,
            smp: 1,
        }
    }
}

impl GuestArgs {
    /// `kernel` booted with these options: QEMU found (or installed), the
    /// accelerator chosen for the machine, and the configuration with the
    /// machine, accelerator, memory and icount set. The kernel command line
    /// is the subcommand's `words`, then `--cmdline`'s: the kernel takes a
    /// key's last value, so the user's words win.
    pub fn config(&self, kernel: PathBuf, words: &str) -> Result<(QemuConfig, AccelChoice)> {
        // Refused before QEMU is looked for (or installed).
        let hotplug = self.hotplug_bytes()?;
        let qemu_path = qemu::ensure_qemu()?;
        let accel = qemu::choose_accel(self.accel, &qemu_path, self.machine)?;
        let cfg = QemuConfig::new(qemu_path, kernel, self.machine)
            .kvm(accel.kvm)
            .mem(&self.mem)
            .append(words)
            .append(&self.cmdline)
            .icount(self.icount)
            .mem_prealloc(self.mem_prealloc)
            .smp(self.smp);
        let cfg = match hotplug {
            Some(bytes) => cfg.hotplug(bytes)?,
            None => cfg,
        };
        Ok((cfg, accel))
    }

    /// `--hotplug`'s size in bytes, checked against the machine and the
    /// 2 MiB granularity; `None` without the flag.
    pub fn hotplug_bytes(&self) -> Result<Option<u64>> {
        let Some(size) = &self.hotplug else {
            return Ok(None);
        };
        let bytes = qemu::qemu_mem_bytes(size).map_err(|_| {
            anyhow::anyhow!("--hotplug {size:?} is not a size (QEMU syntax: 512M, 4G)")
        })?;
        qemu::check_hotplug(self.machine, bytes)?;
        Ok(Some(bytes))
    }
}

/// Where a test or benchmark guest serves: a free loopback port, and fresh
/// tokens in a private temporary directory (removed when this is dropped,
/// so it must live as long as the guest may read them).
pub struct Endpoint {
    pub port: u16,
    pub tokens: GuestTokens,
}

impl Endpoint {
    /// A free port and new tokens; `purpose` names the tokens' directory.
    pub fn temporary(purpose: &str) -> Result<Endpoint> {
        Ok(Endpoint {
            port: qemu::free_port()?,
            tokens: GuestTokens::temporary(purpose)?,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `cfg` serving here.
    pub fn serve(&self, cfg: QemuConfig) -> QemuConfig {
        cfg.serve(self.port, &self.tokens.files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        guest: GuestArgs,
    }

    #[test]
    fn default_is_what_the_command_line_gives() {
        let parsed = Cli::parse_from(["x"]).guest;
        let d = GuestArgs::default();
        assert_eq!(
            (parsed.machine, parsed.accel, &parsed.mem, &parsed.cmdline),
            (d.machine, d.accel, &d.mem, &d.cmdline)
        );
        assert_eq!(parsed.icount, d.icount);
        assert_eq!(parsed.hotplug, d.hotplug);
        Cli::command().debug_assert();
    }

    #[test]
    fn hotplug_is_checked_before_qemu_is_looked_for() {
        let guest =
            |args: &[&str]| Cli::parse_from(std::iter::once("x").chain(args.iter().copied())).guest;
        assert_eq!(guest(&[]).hotplug_bytes().unwrap(), None);
        assert_eq!(
            guest(&["--machine", "q35", "--hotplug", "4G"])
                .hotplug_bytes()
                .unwrap(),
            Some(4 << 30)
        );
        // microvm (the default machine) is refused, saying why.
        let e = guest(&["--hotplug", "4G"]).hotplug_bytes().unwrap_err();
        assert!(e.to_string().contains("no PCI bus"), "{e}");
        let e = guest(&["--machine", "microvm-pcie", "--hotplug", "4G"])
            .hotplug_bytes()
            .unwrap_err();
        assert!(e.to_string().contains("device-memory"), "{e}");
        for bad in ["3M", "1X", "0"] {
            let e = guest(&["--machine", "q35", "--hotplug", bad])
                .hotplug_bytes()
                .unwrap_err();
            assert!(e.to_string().starts_with("--hotplug"), "{bad}: {e}");
        }
        // `config` refuses before it looks for QEMU.
        let e = guest(&["--hotplug", "4G"])
            .config(PathBuf::from("/nonexistent"), "")
            .unwrap_err();
        assert!(e.to_string().contains("--machine q35"), "{e}");
    }
}
