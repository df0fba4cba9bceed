//! [`QemuConfig`]: one guest's QEMU configuration, built up method by
//! method from a kernel and a machine. Every guest xtask boots is made
//! from one: its command line ([`QemuConfig::command`]), and its runs,
//! each within the configuration's time bound ([`QemuConfig::run_to_exit`],
//! [`QemuConfig::run_until_ready`], [`QemuConfig::run_then`],
//! [`QemuConfig::run_client`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use super::accel::accel_args;
use super::Machine;
use crate::tokens::TokenFiles;

/// The fw_cfg file names the kernel reads its tokens from.
pub const FW_CFG_CLIENT_TOKEN: &str = "opt/memd/token";
pub const FW_CFG_OPERATOR_TOKEN: &str = "opt/memd/operator-token";

/// The time bound of a configuration that sets none.
const DEFAULT_TIME_BOUND: Duration = Duration::from_secs(60);

/// What a hot-plug region's size must be a multiple of: QEMU's default
/// virtio-mem block size on x86 hosts, and the 2 MiB pages memd maps
/// hot-plugged memory with.
pub const HOTPLUG_ALIGN: u64 = 2 << 20;

/// The QOM ids of the hot-plug device and its memory backend: QMP reaches
/// the device as `vm0` (`/machine/peripheral/vm0`).
pub const HOTPLUG_DEVICE_ID: &str = "vm0";
pub const HOTPLUG_BACKEND_ID: &str = "vmem0";

/// Why `machine` cannot take a virtio-mem region of `bytes`, if it cannot.
pub fn check_hotplug(machine: Machine, bytes: u64) -> Result<()> {
    match machine {
        Machine::Q35 => {}
        Machine::Microvm | Machine::MicrovmNoPit => bail!(
            "--hotplug needs --machine q35: microvm has no PCI bus, and QEMU 7.2 has virtio-mem \
             only as virtio-mem-pci (there is no virtio-mem-device for virtio-mmio)"
        ),
        Machine::MicrovmPcie => bail!(
            "--hotplug needs --machine q35: microvm has no device-memory region for hot-plugged \
             memory; with pcie=on QEMU 7.2 accepts virtio-mem-pci but leaves its region \
             unmapped at address 0"
        ),
    }
    if bytes == 0 || !bytes.is_multiple_of(HOTPLUG_ALIGN) {
        bail!(
            "--hotplug {bytes} bytes: the region must be a non-zero multiple of 2 MiB (virtio-mem's block size)"
        );
    }
    Ok(())
}

/// Bytes in a QEMU `-m` size: a whole number with an optional suffix
/// (B, K, M, G, T; case-insensitive), MiB without one, optionally written
/// `size=...`. QEMU also takes fractions (`1.5G`); these are refused here.
pub fn qemu_mem_bytes(mem: &str) -> Result<u64> {
    let t = mem.trim();
    let t = t.strip_prefix("size=").unwrap_or(t);
    if t.contains(',') {
        bail!("--mem {mem:?}: only the size, xtask sets maxmem itself");
    }
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('B') => (&t[..t.len() - 1], 0),
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 20),
    };
    match num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
    {
        Some(b) if b > 0 => Ok(b),
        _ => bail!("--mem {mem:?} is not a whole size (256M, 1G, 1536M)"),
    }
}

/// `bytes` in QEMU's size syntax, in the largest unit that divides it.
fn qemu_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// One guest: QEMU, the kernel, the machine and what is attached to it.
/// [`QemuConfig::new`] gives a TCG guest with 1 GiB, no devices and an
/// empty kernel command line, bounded to 60 s; the other methods change
/// one thing each.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    qemu: PathBuf,
    kernel: PathBuf,
    machine: Machine,
    kvm: bool,
    /// `-m` value, e.g. `1G`.
    mem: String,
    /// Kernel command-line words besides the service's `memd.port=`.
    cmdline: String,
    /// The service's TCP port: `memd.port=PORT` on the kernel command
    /// line, and host 127.0.0.1:PORT forwarded to it (user networking).
    port: Option<u16>,
    /// Files holding the auth tokens, handed to the guest as fw_cfg files
    /// (QEMU reads them; only their paths are on its command line).
    tokens: Option<TokenFiles>,
    /// A raw disk image attached as virtio-blk.
    disk: Option<PathBuf>,
    /// A Unix socket for QEMU's machine protocol (QMP): the balloon's
    /// target (`memctl balloon`).
    qmp: Option<PathBuf>,
    /// A Unix socket for QEMU's monitor (`cargo xtask profile` reads the
    /// vCPU's registers through it).
    monitor: Option<PathBuf>,
    /// `-icount shift=0` (TCG): the guest's clock counts instructions, one
    /// nanosecond each, so guest-measured times are instruction counts.
    icount: bool,
    /// `-mem-prealloc`.
    mem_prealloc: bool,
    /// Virtual CPUs (`-smp`).
    smp: u32,
    /// A virtio-mem device with a region of this many bytes (`maxmem`
    /// raised to match), none plugged at boot.
    hotplug: Option<u64>,
    /// The longest a run of this guest may take before QEMU is killed.
    pub(super) time_bound: Duration,
}

/// `-fw_cfg name=NAME,file=PATH`'s value, with the commas of the path
/// doubled as QEMU's option syntax wants.
fn fw_cfg_arg(name: &str, path: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut arg = format!("name={name},file=").into_bytes();
    for &b in path.as_os_str().as_bytes() {
        arg.push(b);
        if b == b',' {
            arg.push(b',');
        }
    }
    std::ffi::OsString::from_vec(arg)
}

impl QemuConfig {
    /// `kernel` on `machine`, run by the QEMU binary `qemu`.
    pub fn new(qemu: PathBuf, kernel: PathBuf, machine: Machine) -> QemuConfig {
        QemuConfig {
            qemu,
            kernel,
            machine,
            kvm: false,
            mem: "1G".into(),
            cmdline: String::new(),
            port: None,
            tokens: None,
            disk: None,
            monitor: None,
            qmp: None,
            icount: false,
            mem_prealloc: false,
            smp: 1,
            hotplug: None,
            time_bound: DEFAULT_TIME_BOUND,
        }
    }

    /// KVM (`-accel kvm -cpu host`) when `kvm`, else TCG (`-cpu max`).
    pub fn kvm(mut self, kvm: bool) -> QemuConfig {
        self.kvm = kvm;
        self
    }

    /// Guest memory, in QEMU's `-m` syntax (`256M`, `1G`).
    pub fn mem(mut self, mem: &str) -> QemuConfig {
        self.mem = mem.into();
        self
    }

    /// Adds `words` to the end of the kernel command line.
    pub fn append(mut self, words: &str) -> QemuConfig {
        let words = words.trim();
        if !words.is_empty() {
            if !self.cmdline.is_empty() {
                self.cmdline.push(' ');
            }
            self.cmdline.push_str(words);
        }
        self
    }

    /// The service on `port` (first on the kernel command line, forwarded
    /// from host 127.0.0.1:`port`), with its tokens read from `tokens`.
    pub fn serve(mut self, port: u16, tokens: &TokenFiles) -> QemuConfig {
        self.port = Some(port);
        self.tokens = Some(tokens.clone());
        self
    }

    /// `image`, a raw disk image, as the guest's virtio-blk disk.
    pub fn disk(mut self, image: PathBuf) -> QemuConfig {
        self.disk = Some(image);
        self
    }

    /// QEMU's QMP on the Unix socket `sock`.
    pub fn qmp(mut self, sock: PathBuf) -> QemuConfig {
        self.qmp = Some(sock);
        self
    }

    /// QEMU's monitor on the Unix socket `sock`.
    pub fn monitor(mut self, sock: PathBuf) -> QemuConfig {
        self.monitor = Some(sock);
        self
    }

    /// `cpus` virtual CPUs (`-smp`); memd starts the ones after the first
    /// from the ACPI MADT.
    pub fn smp(mut self, cpus: u32) -> QemuConfig {
        self.smp = cpus.max(1);
        self
    }

    /// Backs all guest RAM before boot (`-mem-prealloc`).
    pub fn mem_prealloc(mut self, on: bool) -> QemuConfig {
        self.mem_prealloc = on;
        self
    }

    /// A virtio-mem device (`virtio-mem-pci`, QOM id `vm0`) with a region of
    /// `bytes` backed by `memory-backend-ram` `vmem0`, `requested-size=0`,
    /// and `-m MEM,maxmem=MEM+bytes`: the host grows the guest with QMP
    /// `qom-set vm0 requested-size`. q35 only, `bytes` a multiple of 2 MiB,
    /// and the memory already set (`mem`) a whole QEMU size: refused
    /// otherwise, with the reason.
    pub fn hotplug(mut self, bytes: u64) -> Result<QemuConfig> {
        check_hotplug(self.machine, bytes)?;
        qemu_mem_bytes(&self.mem)?;
        self.hotplug = Some(bytes);
        Ok(self)
    }

    /// `-icount shift=0,sleep=off` when `icount` (TCG only; ignored under
    /// KVM).
    pub fn icount(mut self, icount: bool) -> QemuConfig {
        self.icount = icount;
        self
    }

    /// The longest one run may take; QEMU is killed then.
    pub fn time_bound(mut self, bound: Duration) -> QemuConfig {
        self.time_bound = bound;
        self
    }

    /// The QEMU binary.
    pub fn qemu(&self) -> &Path {
        &self.qemu
    }

    /// The kernel command line: `memd.port=PORT` when serving, then the
    /// appended words.
    pub fn kernel_cmdline(&self) -> String {
        match self.port {
            Some(port) if self.cmdline.is_empty() => format!("memd.port={port}"),
            Some(port) => format!("memd.port={port} {}", self.cmdline),
            None => self.cmdline.clone(),
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.qemu);
        c.args(["-M", self.machine.qemu_machine()]);
        c.args(accel_args(self.kvm));
        match self.hotplug {
            Some(bytes) => {
                // `hotplug` checked that `mem` parses.
                let maxmem = qemu_mem_bytes(&self.mem).unwrap_or(0) + bytes;
                c.args(["-m", &format!("{},maxmem={}", self.mem, qemu_size(maxmem))]);
            }
            None => {
                c.args(["-m", &self.mem]);
            }
        }
        if self.smp > 1 {
            c.args(["-smp", &self.smp.to_string()]);
        }
        if self.mem_prealloc {
            c.arg("-mem-prealloc");
        }
        c.arg("-kernel").arg(&self.kernel);
        c.args(["-append", &self.kernel_cmdline()]);
        c.args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        let pci = match self.machine {
            Machine::Microvm | Machine::MicrovmNoPit => false,
            Machine::Q35 | Machine::MicrovmPcie => true,
        };
        if let Some(port) = self.port {
            c.args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{port}"),
            ]);
            c.args([
                "-device",
                if pci {
                    "virtio-net-pci,netdev=n0"
                } else {
                    "virtio-net-device,netdev=n0"
                },
            ]);
            // The balloon, for free page reporting: memd gives the host
            // back the memory it does not use.
            c.args([
                "-device",
                if pci {
                    "virtio-balloon-pci,id=balloon0,free-page-reporting=on,deflate-on-oom=on"
                } else {
                    "virtio-balloon-device,id=balloon0,free-page-reporting=on,deflate-on-oom=on"
                },
            ]);
        }
        if self.icount && !self.kvm {
            c.args(["-icount", "shift=0,sleep=off"]);
        }
        if let Some(sock) = &self.qmp {
            let mut arg = std::ffi::OsString::from("unix:");
            arg.push(sock);
            arg.push(",server=on,wait=off");
            c.arg("-qmp").arg(arg);
        }
        if let Some(sock) = &self.monitor {
            let mut arg = std::ffi::OsString::from("unix:");
            arg.push(sock);
            arg.push(",server,nowait");
            c.arg("-monitor").arg(arg);
        }
        if let Some(t) = &self.tokens {
            c.arg("-fw_cfg")
                .arg(fw_cfg_arg(FW_CFG_CLIENT_TOKEN, &t.client));
            c.arg("-fw_cfg")
                .arg(fw_cfg_arg(FW_CFG_OPERATOR_TOKEN, &t.operator));
        }
        if let Some(disk) = &self.disk {
            let mut drive = std::ffi::OsString::from("file=");
            drive.push(disk);
            drive.push(",if=none,format=raw,id=d0");
            c.arg("-drive").arg(drive);
            c.args([
                "-device",
                if pci {
                    "virtio-blk-pci,drive=d0"
                } else {
                    "virtio-blk-device,drive=d0"
                },
            ]);
        }
        if let Some(bytes) = self.hotplug {
            // Last, so the other devices keep their PCI slots.
            // -mem-prealloc would make every memory backend preallocate,
            // the whole region included; the device preallocates each
            // block as it is plugged instead.
            let (backend, device) = match self.mem_prealloc {
                true => (",prealloc=off", ",prealloc=on"),
                false => ("", ""),
            };
            c.args([
                "-object",
                &format!(
                    "memory-backend-ram,id={HOTPLUG_BACKEND_ID},size={}{backend}",
                    qemu_size(bytes)
                ),
            ]);
            c.args([
                "-device",
                &format!(
                    "virtio-mem-pci,id={HOTPLUG_DEVICE_ID},memdev={HOTPLUG_BACKEND_ID},requested-size=0{device}"
                ),
            ]);
        }
        c
    }

    /// The command line as a shell-like string, for messages.
    pub fn describe(&self) -> String {
        let c = self.command();
        let mut s = c.get_program().to_string_lossy().into_owned();
        for a in c.get_args() {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() {
                s += &format!(" '{a}'");
            } else {
                s += &format!(" {a}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QEMU;
    use crate::tokens::tests::mode;
    use crate::tokens::GuestTokens;

    fn bare() -> QemuConfig {
        QemuConfig::new(
            PathBuf::from(QEMU),
            PathBuf::from("/k/memd-kernel"),
            Machine::Microvm,
        )
    }

    fn config(tokens: Option<TokenFiles>) -> QemuConfig {
        match tokens {
            Some(t) => bare().serve(5555, &t),
            None => bare(),
        }
    }

    fn args(c: &QemuConfig) -> Vec<String> {
        c.command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value after each `flag`.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_port_comes_first_on_the_kernel_command_line() {
        let c = bare()
            .append(" memd.log=warn ")
            .append("")
            .append("memd.x=1");
        assert_eq!(c.kernel_cmdline(), "memd.log=warn memd.x=1");
        let t = GuestTokens::temporary("xtask-unit-port").unwrap();
        let served = c.serve(6000, &t.files);
        assert_eq!(
            served.kernel_cmdline(),
            "memd.port=6000 memd.log=warn memd.x=1"
        );
        let a = args(&served);
        assert_eq!(
            values(&a, "-append"),
            ["memd.port=6000 memd.log=warn memd.x=1"]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:6000-:6000"]
        );
        assert_eq!(bare().serve(1, &t.files).kernel_cmdline(), "memd.port=1");
        assert!(values(&args(&bare()), "-netdev").is_empty());
    }

    #[test]
    fn devices_follow_the_machine_and_icount_only_tcg() {
        let disk = |m: Machine| {
            let c = QemuConfig::new(PathBuf::from(QEMU), PathBuf::from("/k"), m)
                .disk(PathBuf::from("/d.img"));
            values(&args(&c), "-device")[1].to_string()
        };
        assert_eq!(disk(Machine::Microvm), "virtio-blk-device,drive=d0");
        assert_eq!(disk(Machine::Q35), "virtio-blk-pci,drive=d0");
        let a = args(&bare().icount(true).mem("256M"));
        assert_eq!(values(&a, "-icount"), ["shift=0,sleep=off"]);
        assert!(!a.iter().any(|x| x == "-mem-prealloc"));
        assert!(args(&bare().mem_prealloc(true))
            .iter()
            .any(|x| x == "-mem-prealloc"));
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);
        let kvm = args(&bare().icount(true).kvm(true));
        assert!(values(&kvm, "-icount").is_empty());
        assert_eq!(values(&kvm, "-accel"), ["kvm"]);
    }

    #[test]
    fn tokens_reach_qemu_as_fw_cfg_files_never_as_arguments() {
        let t = GuestTokens::temporary("xtask-unit").unwrap();
        let dir = t.files.client.parent().unwrap().to_path_buf();
        assert_eq!(mode(&dir), 0o700);
        for (path, token) in [
            (&t.files.client, &t.client),
            (&t.files.operator, &t.operator),
        ] {
            assert_eq!(mode(path), 0o600, "{}", path.display());
            assert_eq!(std::fs::read_to_string(path).unwrap().trim(), token);
        }
        assert_ne!(t.client, t.operator);
        let cmd = config(Some(t.files.clone())).command();
        assert!(!t.appear_in(&cmd), "a token on QEMU's command line");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let fw_cfg: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-fw_cfg")
            .map(|w| &w[1])
            .collect();
        assert_eq!(
            fw_cfg,
            [
                &format!("name=opt/memd/token,file={}", t.files.client.display()),
                &format!(
                    "name=opt/memd/operator-token,file={}",
                    t.files.operator.display()
                ),
            ]
        );
        assert!(!args.iter().any(|a| a.contains("memd.token")));
        let described = config(Some(t.files.clone())).describe();
        assert!(!described.contains(&t.client) && !described.contains(&t.operator));
        // Without token files there is no -fw_cfg.
        assert!(!config(None).command().get_args().any(|a| a == "-fw_cfg"));
        // The directory and the files go with the tokens.
        drop(t);
        assert!(!dir.exists());
    }

    #[test]
    fn hotplug_attaches_virtio_mem_and_raises_maxmem() {
        let q35 = |mem: &str| {
            QemuConfig::new(PathBuf::from(QEMU), PathBuf::from("/k"), Machine::Q35).mem(mem)
        };
        let a = args(&q35("1G").hotplug(4 << 30).unwrap());
        assert_eq!(values(&a, "-m"), ["1G,maxmem=5G"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-ram,id=vmem0,size=4G"]
        );
        assert_eq!(
            values(&a, "-device")[1],
            "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"
        );
        // QEMU's -m takes MiB without a suffix; maxmem is written exactly.
        let a = args(&q35("1536").hotplug(514 << 20).unwrap());
        assert_eq!(values(&a, "-m"), ["1536,maxmem=2050M"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-ram,id=vmem0,size=514M"]
        );
        // With -mem-prealloc the region is not preallocated at start: the
        // device preallocates what it plugs.
        let a = args(&q35("1G").mem_prealloc(true).hotplug(2 << 30).unwrap());
        assert!(a.iter().any(|x| x == "-mem-prealloc"));
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-ram,id=vmem0,size=2G,prealloc=off"]
        );
        assert!(values(&a, "-device")[1].ends_with("requested-size=0,prealloc=on"));
        // Without it, nothing changes.
        let a = args(&q35("1G"));
        assert_eq!(values(&a, "-m"), ["1G"]);
        assert!(values(&a, "-object").is_empty());
        assert!(!a.iter().any(|x| x.contains("virtio-mem")));
    }

    #[test]
    fn hotplug_is_refused_on_microvm_and_for_odd_sizes() {
        for m in [
            Machine::Microvm,
            Machine::MicrovmNoPit,
            Machine::MicrovmPcie,
        ] {
            let c = QemuConfig::new(PathBuf::from(QEMU), PathBuf::from("/k"), m);
            let e = c.hotplug(4 << 30).unwrap_err().to_string();
            assert!(e.contains("--machine q35") && e.contains("microvm"), "{e}");
        }
        let q35 = || QemuConfig::new(PathBuf::from(QEMU), PathBuf::from("/k"), Machine::Q35);
        for bad in [0, 1 << 20, (4 << 30) + 4096] {
            let e = q35().hotplug(bad).unwrap_err().to_string();
            assert!(e.contains("multiple of 2 MiB"), "{bad}: {e}");
        }
        assert!(q35().mem("1.5G").hotplug(2 << 20).is_err());
        assert!(q35().mem("1G,maxmem=2G").hotplug(2 << 20).is_err());
    }

    #[test]
    fn qemu_memory_sizes() {
        assert_eq!(qemu_mem_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(qemu_mem_bytes("256m").unwrap(), 256 << 20);
        assert_eq!(qemu_mem_bytes("1024").unwrap(), 1 << 30);
        assert_eq!(qemu_mem_bytes("size=2G").unwrap(), 2 << 30);
        assert_eq!(qemu_mem_bytes("1048576K").unwrap(), 1 << 30);
        assert!(qemu_mem_bytes("0").is_err());
        assert!(qemu_mem_bytes("1X").is_err());
        assert_eq!(qemu_size(5 << 30), "5G");
        assert_eq!(qemu_size(2050 << 20), "2050M");
        assert_eq!(qemu_size(4097), "4097");
    }

    #[test]
    fn commas_in_token_paths_are_doubled() {
        let arg = fw_cfg_arg("opt/x", Path::new("/tmp/a,b/t"));
        assert_eq!(arg, "name=opt/x,file=/tmp/a,,b/t");
    }
}
