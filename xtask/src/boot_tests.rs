//! The boot test matrix (issue 3): boot with `memd.selftest=1` on microvm and
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
//!   reach the guest as fw_cfg files);
//! - without a PIT (`microvm,pit=off`) boot completes and says so;
//! - two deliberate crashes (`memd.selftest=panic` on microvm, a page fault
//!   with `memd.selftest=fault` on q35) are seen as failures: the harness
//!   can fail.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::guest::Endpoint;
use crate::qemu::{self, Machine, QemuConfig, RunOutcome};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Zone spans (physical), as in memd-mm: DMA < 16 MiB, DMA32 < 4 GiB.
const ZONES: [(&str, u64, u64); 3] = [
    ("DMA", 0, 16 * MIB),
    ("DMA32", 16 * MIB, 4 * GIB),
    ("Normal", 4 * GIB, u64::MAX),
];

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
}

/// The zone `memd.dma_reserve=64M@ZONE` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reserve {
    Dma32,
    Normal,
}

impl Reserve {
    fn arg(self) -> &'static str {
        match self {
            Reserve::Dma32 => "memd.dma_reserve=64M@dma32",
            Reserve::Normal => "memd.dma_reserve=64M@normal",
        }
    }

    /// Where the zone lies, physically.
    fn span(self) -> (u64, u64) {
        match self {
            Reserve::Dma32 => (16 * MIB, 4 * GIB),
            Reserve::Normal => (4 * GIB, u64::MAX),
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    machine: Machine,
    mem: u64,
    dma_reserve: Option<Reserve>,
    /// A deliberate crash (`memd.selftest=panic|fault`): the harness must
    /// see a failure (status, PANIC/FATAL line) quickly, not a hang.
    crash: Option<&'static str>,
    /// Boot with virtio-net and talk to the control port from the host.
    net: bool,
    /// `memmap=64M$512M memd.max_order=13`: a hole and a larger buddy.
    memmap: bool,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}-{}{}{}",
            self.machine.name(),
            mem_arg(self.mem),
            match self.dma_reserve {
                None => "",
                Some(Reserve::Dma32) => "-dma_reserve",
                Some(Reserve::Normal) => "-dma_reserve_normal",
            },
            self.crash
                .map(|c| format!("-{c}-detected"))
                .unwrap_or_default()
        ) + if self.net { "-virtio-net" } else { "" }
            + if self.memmap { "-memmap-max_order" } else { "" }
    }

    /// Whether the reservation cannot fit: DMA32 below the guest's RAM top
    /// is smaller than 64 MiB plus the kernel's own needs.
    fn expect_reserve_failure(&self) -> bool {
        self.dma_reserve.is_some() && self.mem < 256 * MIB
    }

    /// The kernel command line besides `memd.port=`: the self-test (or the
    /// crash asked for) unless the case serves, then the reservation and
    /// the memory map's hole.
    pub fn cmdline(&self) -> String {
        let mut words = Vec::new();
        if !self.net {
            words.push(format!("memd.selftest={}", self.crash.unwrap_or("1")));
        }
        if let Some(reserve) = self.dma_reserve {
            words.push(reserve.arg().into());
        }
        if self.memmap {
            words.push("memmap=64M$512M memd.max_order=13".into());
        }
        words.join(" ")
    }
}

fn mem_arg(mem: u64) -> String {
    if mem.is_multiple_of(GIB) {
        format!("{}G", mem / GIB)
    } else {
        format!("{}M", mem / MIB)
    }
}

fn matrix() -> Vec<Case> {
    let mut v = Vec::new();
    for machine in [Machine::Microvm, Machine::Q35] {
        for mem in [64 * MIB, GIB, 5 * GIB] {
            for dma_reserve in [None, Some(Reserve::Dma32)] {
                v.push(Case {
                    machine,
                    mem,
                    dma_reserve,
                    crash: None,
                    net: false,
                    memmap: false,
                });
            }
        }
    }
    v.push(Case {
        machine: Machine::Microvm,
        mem: GIB,
        dma_reserve: None,
        crash: Some("panic"),
        net: false,
        memmap: false,
    });
    v.push(Case {
        machine: Machine::Q35,
        mem: GIB,
        dma_reserve: None,
        crash: Some("fault"),
        net: false,
        memmap: false,
    });
    for machine in [Machine::Microvm, Machine::Q35] {
        v.push(Case {
            machine,
            mem: GIB,
            dma_reserve: Some(Reserve::Dma32),
            crash: None,
            net: false,
            memmap: true,
        });
    }
    // No PIT: boot must not hang, and must say where the TSC rate came from.
    v.push(Case {
        machine: Machine::MicrovmNoPit,
        mem: GIB,
        dma_reserve: None,
        crash: None,
        net: false,
        memmap: false,
    });
    for machine in [Machine::Microvm, Machine::Q35, Machine::MicrovmPcie] {
        v.push(Case {
            machine,
            mem: GIB,
            dma_reserve: None,
            crash: None,
            net: true,
            memmap: false,
        });
    }
    // A contiguous region above 4 GiB: the self-test's large buffer comes
    // from it under a 64-bit mask, and a 32-bit request is refused.
    v.push(Case {
        machine: Machine::Microvm,
        mem: 6 * GIB,
        dma_reserve: Some(Reserve::Normal),
        crash: None,
        net: false,
        memmap: false,
    });
    // Large DMA buffers through virtio-blk (see `dma_disk_check`).
    v.push(Case {
        machine: Machine::Microvm,
        mem: GIB,
        dma_reserve: Some(Reserve::Dma32),
        crash: None,
        net: true,
        memmap: false,
    });
    v
}

/// A `[start-end) word` range from a console line, after `prefix`.
fn parse_range(line: &str, prefix: &str) -> Option<(u64, u64, String)> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let rest = rest.trim_start().strip_prefix('[')?;
    let (start, rest) = rest.split_once('-')?;
    let (end, rest) = rest.split_once(')')?;
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    let word = rest.split_whitespace().next().unwrap_or("").to_string();
    Some((hex(start)?, hex(end)?, word))
}

/// `key=value` (decimal) on a line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// What the console says about memory.
#[derive(Debug, Default)]
struct Report {
    /// Usable RAM of the firmware map.
    usable: Vec<(u64, u64)>,
    /// memd-mm's boot reservations (start, end, kind).
    reserved: Vec<(u64, u64, String)>,
    /// name → (start pfn, end pfn, managed pages).
    zones: Vec<(String, u64, u64, u64)>,
    dma_reserve: Option<(u64, u64)>,
}

fn parse_report(console: &str) -> Report {
    let mut r = Report::default();
    for line in console.lines() {
        if let Some((s, e, kind)) = parse_range(line, "e820 ") {
            if kind == "usable" {
                r.usable.push((s, e));
            }
        } else if let Some((s, e, kind)) = parse_range(line, "mm: reserved ") {
            r.reserved.push((s, e, kind));
        } else if let Some((s, e, _)) = parse_range(line, "mm: dma_reserve ") {
            r.dma_reserve = Some((s, e));
        } else if let Some(i) = line.find("mm: zone ") {
            let rest = &line[i + "mm: zone ".len()..];
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            if let (Some((s, e, _)), Some(managed)) =
                (parse_range(rest, "pfn "), field(rest, "managed"))
            {
                r.zones.push((name, s, e, managed));
            }
        }
    }
    r
}

/// Pages of `[s, e)` (rounded inwards to pages) not covered by `holes`.
fn pages_outside(s: u64, e: u64, holes: &[(u64, u64)]) -> u64 {
    let (s, e) = (s.next_multiple_of(PAGE), e / PAGE * PAGE);
    if s >= e {
        return 0;
    }
    let mut covered: Vec<(u64, u64)> = holes
        .iter()
        .map(|&(hs, he)| (hs / PAGE * PAGE, he.next_multiple_of(PAGE)))
        .filter_map(|(hs, he)| {
            let (a, b) = (hs.max(s), he.min(e));
            (a < b).then_some((a, b))
        })
        .collect();
    covered.sort();
    let mut n = 0;
    let mut pos = s;
    for (a, b) in covered {
        if a > pos {
            n += (a - pos) / PAGE;
        }
        pos = pos.max(b);
    }
    if e > pos {
        n += (e - pos) / PAGE;
    }
    n
}

/// Checks the console of a successful boot against the case.
fn check_report(case: &Case, r: &Report) -> Result<(), String> {
    if r.usable.is_empty() {
        return Err("no usable e820 ranges on the console".into());
    }
    let total: u64 = r.usable.iter().map(|(s, e)| e - s).sum();
    // The map loses the legacy hole below 1 MiB and a few firmware pages.
    if total > case.mem || case.mem - total > 2 * MIB {
        return Err(format!(
            "usable RAM {total:#x} does not account for -m {}",
            mem_arg(case.mem)
        ));
    }
    if case.mem > 4 * GIB && !r.usable.iter().any(|&(s, _)| s >= 4 * GIB) {
        return Err("guest larger than 4 GiB but no usable RAM above 4 GiB".into());
    }
    let holes: Vec<(u64, u64)> = r.reserved.iter().map(|&(s, e, _)| (s, e)).collect();
    for (name, lo, hi) in ZONES {
        let expected: u64 = r
            .usable
            .iter()
            .filter_map(|&(s, e)| {
                let (a, b) = (s.max(lo), e.min(hi));
                (a < b).then_some((a, b))
            })
            .map(|(a, b)| pages_outside(a, b, &holes))
            .sum();
        let got = r.zones.iter().find(|z| z.0 == name);
        match got {
            None if expected == 0 => {}
            None => {
                return Err(format!(
                    "zone {name}: expected {expected} managed pages, zone not reported"
                ))
            }
            Some(&(_, spfn, epfn, managed)) => {
                if managed != expected {
                    return Err(format!("zone {name}: managed {managed} pages, memory map minus reservations gives {expected}"));
                }
                if managed > 0
                    && (spfn * PAGE < lo || epfn * PAGE > hi.min(u64::MAX / 2) || spfn >= epfn)
                {
                    return Err(format!(
                        "zone {name}: pfn span [{spfn:#x}-{epfn:#x}) outside [{lo:#x}-{hi:#x})"
                    ));
                }
            }
        }
    }
    let populated = |n: &str| r.zones.iter().any(|z| z.0 == n && z.3 > 0);
    let want_normal = case.mem > 4 * GIB;
    if !populated("DMA") || !populated("DMA32") || populated("Normal") != want_normal {
        return Err(format!(
            "populated zones wrong for {}: {:?}",
            mem_arg(case.mem),
            r.zones
        ));
    }
    match (case.dma_reserve, r.dma_reserve) {
        (None, None) => {}
        (None, Some(x)) => return Err(format!("unrequested DMA reservation {x:x?}")),
        (Some(want), None) => {
            return Err(format!("{} given but no reservation reported", want.arg()))
        }
        (Some(want), Some((s, e))) => {
            if e - s != 64 * MIB {
                return Err(format!("DMA reservation is {:#x} bytes, not 64 MiB", e - s));
            }
            let (lo, hi) = want.span();
            if s < lo || e > hi {
                return Err(format!(
                    "DMA reservation [{s:#x}-{e:#x}) outside the zone of {}",
                    want.arg()
                ));
            }
            if !r.usable.iter().any(|&(us, ue)| us <= s && e <= ue) {
                return Err(format!(
                    "DMA reservation [{s:#x}-{e:#x}) not inside usable RAM"
                ));
            }
            if !r.reserved.iter().any(|&(rs, re, _)| rs <= s && e <= re) {
                return Err("DMA reservation not among the boot reservations".into());
            }
        }
    }
    Ok(())
}

fn judge(case: &Case, out: &RunOutcome) -> Result<(), String> {
    if out.timed_out {
        return Err("timed out (QEMU killed)".into());
    }
    if case.net {
        if out.panicked() {
            return Err("guest panicked".into());
        }
        return match &out.action {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(format!("control port: {e}")),
            None => Err(format!(
                "no `{}` line (status {:?})",
                qemu::READY_LINE,
                out.status
            )),
        };
    }
    if let Some(crash) = case.crash {
        let (marker, detail) = match crash {
            "panic" => ("memd: PANIC at src/", "deliberate panic"),
            _ => (
                "memd: FATAL exception 14 (page fault)",
                "cr2=0xffffff8000000000",
            ),
        };
        let seen = |s: &str| out.lines.iter().any(|(_, l)| l.contains(s));
        if out.status != Some(qemu::GUEST_FAILURE) || !seen(marker) || !seen(detail) {
            return Err(format!(
                "deliberate {crash}: want failure status and `{marker}`, got status {:?}",
                out.status
            ));
        }
        return Ok(());
    }
    if out.lines.iter().any(|(_, l)| l.contains("memd: FATAL")) {
        return Err("CPU exception in the guest".into());
    }
    if case.expect_reserve_failure() {
        let said = out.lines.iter().any(|(_, l)| {
            l.contains("dma_reserve") && (l.contains("PANIC") || l.contains("ERROR"))
        });
        if out.status != Some(qemu::GUEST_FAILURE) || !said {
            return Err(format!(
                "expected a clean failure naming dma_reserve, got status {:?}",
                out.status
            ));
        }
        return Ok(());
    }
    if out.panicked() {
        return Err("guest panicked".into());
    }
    if out.status != Some(qemu::GUEST_SUCCESS) {
        return Err(format!(
            "QEMU exit status {:?}, want {} (guest success)",
            out.status,
            qemu::GUEST_SUCCESS
        ));
    }
    if out.ready_after.is_none() {
        return Err(format!("no `{}` line", qemu::READY_LINE));
    }
    if !out
        .lines
        .iter()
        .any(|(_, l)| l.contains("selftest: passed"))
    {
        return Err("no `selftest: passed` line".into());
    }
    if case.machine == Machine::MicrovmNoPit
        && !out.lines.iter().any(|(_, l)| l.contains("tsc: no PIT"))
    {
        return Err(
            "no PIT, but the console does not say where the TSC frequency came from".into(),
        );
    }
    let report = parse_report(&out.console());
    if case.memmap {
        let hole = (512 * MIB, 576 * MIB, "memmap-hole".to_string());
        if !report.reserved.contains(&hole) {
            return Err(format!(
                "memmap=64M$512M: no hole [0x20000000-0x24000000) among {:?}",
                report.reserved
            ));
        }
        if let Some((s, e)) = report.dma_reserve {
            if s < hole.1 && e > hole.0 {
                return Err("the DMA reservation overlaps the memmap hole".into());
            }
        }
        if !out.lines.iter().any(|(_, l)| l.contains("max order 13")) {
            return Err("memd.max_order=13 not in effect".into());
        }
    }
    check_report(case, &report)
}

/// Clients this check holds at once (issue 4 asks for at least 64).
const CLIENTS: usize = 64;

/// Through the host forward, across virtio-net, smoltcp and memd-service:
/// a wrong token is refused; a hostile frame (length prefix beyond the
/// maximum) gets an error reply and a close; 64 authenticated clients are
/// connected at once and each holds a page; after they all disconnect, free
/// memory is back at its baseline (the service released their pages).
/// The memctl binary the host tests built (`cargo test --workspace` builds
/// it; built here too so `--boot-only` works on its own).
fn memctl_binary() -> Result<std::path::PathBuf, String> {
    static BUILT: std::sync::OnceLock<Result<std::path::PathBuf, String>> =
        std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let ok = std::process::Command::new(cargo)
                .current_dir(crate::build::repo_root())
                .args(["build", "-q", "-p", "memctl"])
                .status()
                .map_err(|e| format!("building memctl: {e}"))?
                .success();
            if !ok {
                return Err("building memctl failed".into());
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| crate::build::repo_root().join("target"));
            Ok(target.join("debug").join("memctl"))
        })
        .clone()
}

/// Runs memctl against the guest with the token variables `env` (memctl
/// picks the role's token itself; none goes on its command line): returns
/// (exit code, stdout, stderr).
fn memctl(
    port: u16,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> Result<(i32, String, String), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(memctl_binary()?)
        .env_remove("MEMD_TOKEN")
        .env_remove("MEMD_OPERATOR_TOKEN")
        .envs(env.iter().copied())
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("memctl {args:?}: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .map_err(|e| format!("memctl {args:?} stdin: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("memctl {args:?}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every memctl command against the booted kernel: each view in the human
/// and the JSON form, the map picture, and every operation in one session
/// (handles live as long as their connection). memctl is given both
/// tokens and picks the operator's for `check` and sessions; given only
/// the client's, `check` is refused with EPERM.
fn memctl_check(port: u16, tokens: &crate::tokens::GuestTokens) -> Result<(), String> {
    let both = [
        ("MEMD_TOKEN", tokens.client.as_str()),
        ("MEMD_OPERATOR_TOKEN", tokens.operator.as_str()),
    ];
    let (code, _, err) = memctl(port, &both[..1], &["check"], "")?;
    if code != 1 || !err.contains("EPERM") {
        return Err(format!(
            "memctl check with the client token: exit {code}, want 1 and EPERM\n{err}"
        ));
    }
    let expect = |args: &[&str], stdin: &str, want: &str| -> Result<String, String> {
        let (code, out, err) = memctl(port, &both, args, stdin)?;
        if code != 0 || !out.contains(want) {
            return Err(format!(
                "memctl {args:?}: exit {code}, wanted {want:?} in stdout\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            ));
        }
        Ok(out)
    };
    for (view, want) in [
        ("status", "protocol"),
        ("meminfo", "MemTotal"),
        ("zoneinfo", "pages free"),
        ("buddyinfo", "zone"),
        ("slabinfo", "kmalloc-64"),
        ("mempools", ""),
        ("cma", ""),
        ("clients", ""),
        ("dma-list", "virtio-net"),
        ("map", "DMA32"),
        ("faults", ""),
        ("check", "hold"),
    ] {
        expect(&[view], "", want)?;
        expect(&["--json", view], "", "")?;
    }
    expect(&["buddy", "--histogram"], "", "DMA32")?;
    let svg = std::env::temp_dir().join(format!("memd-boot-map-{port}.svg"));
    let svg_arg = svg.display().to_string();
    expect(&["map", "--out", &svg_arg], "", "")?;
    let picture = std::fs::read_to_string(&svg).map_err(|e| format!("map --out: {e}"))?;
    let _ = std::fs::remove_file(&svg);
    if !picture.contains("<svg") || !picture.contains("DMA32") {
        return Err("map --out wrote no picture of the zones".into());
    }
    let script = "\
alloc-pages 3 --gfp KERNEL|ZERO
free-pages $1
kmalloc 100
kfree $3
cache-create e2e 96 --flags POISON|RED_ZONE
cache-alloc $5
pool-create cache:$5 2
pool-alloc $7
pool-free $7 $8
pool-destroy $7
cache-free $5 $6
cache-shrink $5
cache-destroy $5
dma-alloc 1M --mask 32
dma-fill $14 7
dma-checksum $14
dma-write $14 0 hello
dma-read $14 0 5
dma-write-disk $14 0
dma-read-disk $14 0
dma-free $14
stress 20000
fault --slab --probability 0
batch 200
check
drop-caches
";
    let out = expect(&["session"], script, "hold")?;
    for want in [
        "8 page(s)",
        "128 bytes",
        "1048576 bytes",
        "ops/s",
        "hello",
        "moved in place",
    ] {
        if !out.contains(want) {
            return Err(format!("memctl session: no {want:?} in\n{out}"));
        }
    }
    Ok(())
}

fn control_port_check(port: u16, tokens: &crate::tokens::GuestTokens) -> Result<(), String> {
    use memd_client::wire::{errno, Gfp, Role};
    use memd_client::{Client, Error, Options};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let addr = format!("127.0.0.1:{port}");
    // The clients hold the client token; the main connection, which drops
    // caches, the operator's.
    let opts = Options::new(addr.clone(), &tokens.client);
    let mut main = Client::connect(&Options::new(addr.clone(), &tokens.operator))
        .map_err(|e| format!("connect: {e}"))?;
    if main.hello().role != Role::Operator {
        return Err(format!(
            "the operator token got role {:?}",
            main.hello().role
        ));
    }
    let status = main.status().map_err(|e| format!("status: {e}"))?;
    // Free memory as the load test counts it: free pages plus every slab
    // byte that holds no live object. Connections allocate through
    // kmalloc, and which slab pages stay partly used depends on how
    // requests happened to interleave; counting the free slots makes the
    // figure exact whatever that fragmentation.
    let available = |c: &mut Client| crate::loadtest::available(c).map_err(|e| format!("{e:#}"));
    let baseline = available(&mut main)?;

    match Client::connect(&Options::new(addr.clone(), "wrong-token")) {
        Err(Error::Server(_)) => {}
        Err(e) => {
            return Err(format!(
                "wrong token: want a refusal from the server, got {e}"
            ))
        }
        Ok(_) => return Err("a wrong token was accepted".into()),
    }
    // The client token: a client's role, and EPERM for what only the
    // operator may do.
    let mut client = Client::connect(&opts).map_err(|e| format!("client connect: {e}"))?;
    if client.hello().role != Role::Client {
        return Err(format!(
            "the client token got role {:?}",
            client.hello().role
        ));
    }
    match client.check() {
        Err(e) if e.code() == Some(errno::EPERM) => {}
        other => {
            return Err(format!(
                "check with the client token: want EPERM, got {other:?}"
            ))
        }
    }
    if let Err(e) = client.meminfo() {
        return Err(format!("meminfo with the client token: {e}"));
    }
    drop(client);

    let mut s = TcpStream::connect(&addr).map_err(|e| format!("raw connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4])
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !reply.is_empty() => {}
        Err(e) => return Err(format!("oversize frame: reading the reply: {e}")),
    }
    if reply.len() < 5 {
        return Err(format!(
            "oversize frame: {} reply bytes, want an error frame",
            reply.len()
        ));
    }
    // Closed from this side too, so the guest's socket is gone before the
    // baseline: half-closed and never authenticated, it would be cut by
    // the guest's hello timeout in the middle of the rounds.
    drop(s);

    // Round 0 warms up what grows once and stays (the service's connection
    // table, socket buffers' first use); round 1 must then return every
    // byte: a per-connection leak shows as a drop below the baseline.
    let mut baseline = baseline;
    for round in 0..2 {
        let mut clients = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let mut c =
                Client::connect(&opts).map_err(|e| format!("client {i} of {CLIENTS}: {e}"))?;
            c.alloc_pages(0, Gfp::KERNEL)
                .map_err(|e| format!("client {i}: alloc_pages: {e}"))?;
            clients.push(c);
        }
        let during = available(&mut main)?;
        if during >= baseline {
            return Err(format!("{CLIENTS} clients hold a page each, yet free memory did not drop ({during} >= {baseline})"));
        }
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = 0;
        let mut stable = 0;
        loop {
            let now = available(&mut main)?;
            if round == 1 && now == baseline {
                break;
            }
            // Round 0: wait until the closes are processed (value stable).
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            if round == 0 && stable >= 5 {
                baseline = now;
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "round {round}: free memory {now} after all clients left, baseline {baseline}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if status.page_size != 4096 {
        return Err(format!("status reports page size {}", status.page_size));
    }
    // The kernel accounts the poll loop's work: it grew with the clients'
    // requests, and stays below the time the service has been up.
    let later = main.status().map_err(|e| format!("status: {e}"))?;
    match (status.busy_ns, later.busy_ns) {
        (Some(before), Some(after)) if after > before && after <= later.uptime_ns => {}
        other => {
            return Err(format!(
                "busy time before and after the clients: {other:?} (uptime {} ns)",
                later.uptime_ns
            ))
        }
    }
    // Idle, the poll loop halts on the APIC timer instead of spinning: over
    // half a second with no requests, most of the time is spent halted.
    let (a, b) = (main.status().map_err(|e| format!("status: {e}"))?, {
        std::thread::sleep(Duration::from_millis(500));
        main.status().map_err(|e| format!("status: {e}"))?
    });
    match (a.halted_ns, b.halted_ns) {
        (Some(x), Some(y)) if (y - x) * 2 > b.uptime_ns - a.uptime_ns => {}
        other => {
            return Err(format!(
                "halted time over {} ms idle: {other:?}",
                (b.uptime_ns - a.uptime_ns) / 1_000_000
            ))
        }
    }
    Ok(())
}

/// A sparse disk image removed when dropped.
struct TempDisk {
    path: std::path::PathBuf,
}

impl TempDisk {
    fn new(name: &str) -> std::io::Result<TempDisk> {
        let path =
            std::env::temp_dir().join(format!("memd-boot-test-{}-{name}.img", std::process::id()));
        std::fs::File::create(&path)?.set_len(DISK_BYTES)?;
        Ok(TempDisk { path })
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const DISK_BYTES: u64 = 32 << 20;

/// virtio-blk through the service: a 1 MiB DMA buffer filled with a
/// pattern is written at sector 8 and read back into a second buffer; the
/// checksums match, the image file on the host holds the data, and a request
/// past the end of the disk is refused.
fn disk_check(port: u16, token: &str, image: &std::path::Path) -> Result<(), String> {
    use memd_client::wire::DmaMask;
    use memd_client::{Client, Options};
    use std::io::{Read, Seek, SeekFrom};

    let mut c = Client::connect(&Options::new(format!("127.0.0.1:{port}"), token))
        .map_err(|e| format!("connect: {e}"))?;
    let status = c.status().map_err(|e| format!("status: {e}"))?;
    if !status.block_device {
        return Err("status reports no block device, yet a virtio-blk disk is attached".into());
    }
    const LEN: u64 = 1 << 20;
    let a = c
        .dma_alloc(LEN, 4096, DmaMask::Bits64)
        .map_err(|e| format!("dma_alloc: {e}"))?;
    let b = c
        .dma_alloc(LEN, 4096, DmaMask::Bits64)
        .map_err(|e| format!("dma_alloc: {e}"))?;
    c.dma_fill(a.handle, 0x5eed)
        .map_err(|e| format!("dma_fill: {e}"))?;
    let want = c
        .dma_checksum(a.handle, 0, 0)
        .map_err(|e| format!("checksum: {e}"))?;
    c.dma_write_disk(a.handle, 8)
        .map_err(|e| format!("dma_write_disk: {e}"))?;
    c.dma_read_disk(b.handle, 8)
        .map_err(|e| format!("dma_read_disk: {e}"))?;
    let got = c
        .dma_checksum(b.handle, 0, 0)
        .map_err(|e| format!("checksum: {e}"))?;
    if got != want {
        return Err(format!(
            "disk round trip: checksum {got:#x}, wrote {want:#x}"
        ));
    }
    let first = c
        .dma_read(a.handle, 0, 512)
        .map_err(|e| format!("dma_read: {e}"))?;
    let mut on_disk = vec![0u8; 512];
    let mut f = std::fs::File::open(image).map_err(|e| format!("opening the image: {e}"))?;
    f.seek(SeekFrom::Start(8 * 512))
        .and_then(|_| f.read_exact(&mut on_disk))
        .map_err(|e| format!("reading the image: {e}"))?;
    if on_disk != first || first.iter().all(|&x| x == 0) {
        return Err("the image file does not hold what the guest wrote at sector 8".into());
    }
    let last_sector = DISK_BYTES / 512 - 1;
    if c.dma_write_disk(a.handle, last_sector).is_ok() {
        return Err("a write past the end of the disk was accepted".into());
    }
    c.dma_free(a.handle).map_err(|e| format!("dma_free: {e}"))?;
    c.dma_free(b.handle).map_err(|e| format!("dma_free: {e}"))?;
    Ok(())
}

/// Large contiguous DMA buffers and the disk (issue 5), on a 1 GiB guest
/// with `memd.dma_reserve=64M@dma32` and a 32 MiB disk:
///
/// - the DMA list names the kernel's device buffers with their device
///   queue (virtio-net's receive buffers, both devices' virtqueue rings),
///   page-aligned, page-multiple sizes, in a real zone;
/// - requests the reservation can never serve (larger than it, or a 24-bit
///   mask when it lies above 16 MiB) fail with ENOMEM and a message naming
///   the reason, and leave nothing allocated: no client buffer listed, the region
///   empty, free memory equal to the baseline;
/// - a 24 MiB buffer (larger than a 4 MiB buddy block) below 4 GiB: zone
///   DMA32, listed with its owner; filled, written to the disk in one
///   request of 3 descriptors, freed; a new buffer (zeroed) reads it back
///   and the checksums are equal;
/// - the same after three other clients have fragmented ordinary memory
///   with 184 320 single-page allocations, every other one then freed;
/// - when everyone has gone, no page, large kmalloc block or reservation
///   byte is held, and every page is free or in the slab layer exactly as
///   at the baseline (the handle tables' slabs stay cached).
fn dma_disk_check(port: u16, token: &str) -> Result<(), String> {
    use memd_client::wire::{errno, DmaMask, DmaOwner, Gfp, Op, Reply};
    use memd_client::{Client, Error, Options};

    const LEN: u64 = 24 * MIB;
    let opts = Options::new(format!("127.0.0.1:{port}"), token);
    let mut c = Client::connect(&opts).map_err(|e| format!("connect: {e}"))?;
    let free = |c: &mut Client| {
        c.meminfo()
            .map(|m| m.free + m.slab_reclaimable)
            .map_err(|e| format!("meminfo: {e}"))
    };
    // Settles after connection churn; the baseline is what it settles at.
    let settle = |c: &mut Client, want: Option<u64>| -> Result<u64, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut last, mut stable) = (0, 0);
        loop {
            let now = free(c)?;
            if want == Some(now) || (want.is_none() && now == last && stable >= 3) {
                return Ok(now);
            }
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            if Instant::now() > deadline {
                return Err(format!("free memory {now}, want {want:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let baseline = settle(&mut c, None)?;
    // The kernel's own device buffers are listed with their device queue:
    // virtio-net's receive buffers (256 slots of 2 KiB) and virtqueue rings
    // of both devices, page-sized and page-aligned, in a real zone.
    let devices = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
    let device_owned = |name: &str| {
        devices
            .iter()
            .filter(|b| matches!(&b.owner, DmaOwner::DeviceQueue { device } if device.starts_with(name)))
            .count()
    };
    for b in &devices {
        if let DmaOwner::DeviceQueue { .. } = &b.owner {
            if b.handle != 0
                || b.len == 0
                || b.len % 4096 != 0
                || b.phys % 4096 != 0
                || !["DMA", "DMA32", "Normal"].contains(&b.zone.as_str())
            {
                return Err(format!("implausible device DMA buffer: {b:?}"));
            }
        }
    }
    if !devices.iter().any(|b| {
        matches!(&b.owner, DmaOwner::DeviceQueue { device } if device == "virtio-net receive buffers (queue 0)")
            && b.len == 256 * 2048
    }) || device_owned("virtio-net virtqueue") < 2
        || device_owned("virtio-blk virtqueue") < 1
    {
        return Err(format!(
            "want virtio-net's receive buffers and both devices' virtqueues listed as device-owned: {devices:?}"
        ));
    }
    let nothing_held = |c: &mut Client, what: &str| -> Result<(), String> {
        let listed = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
        let clients = listed
            .iter()
            .filter(|b| matches!(b.owner, DmaOwner::Client { .. }))
            .count();
        let cma = c.cma().map_err(|e| format!("cma: {e}"))?;
        if clients != 0 || cma.used != 0 || cma.buffers != 0 {
            return Err(format!(
                "after {what}: {clients} client buffer(s) listed, {} bytes of the reservation used",
                cma.used
            ));
        }
        Ok(())
    };

    // Round 0 warms up what the first error replies grow once and keep
    // (as in `control_port_check`); round 1 must then return every byte.
    let mut baseline = baseline;
    for round in 0..2 {
        // Refused requests on a connection of their own: its reply buffer grows
        // for the longer error messages and is returned when it closes.
        let mut r = Client::connect(&opts).map_err(|e| format!("connect: {e}"))?;
        for (len, mask, reason) in [
            (
                128 * MIB,
                DmaMask::Bits32,
                "larger than the DMA reservation",
            ),
            (LEN, DmaMask::Bits24, "24-bit mask"),
        ] {
            match r.dma_alloc(len, 0, mask) {
                Err(Error::Server(e)) if e.code == errno::ENOMEM && e.message.contains(reason) => {}
                other => {
                    return Err(format!(
                        "dma_alloc of {} MiB under a {}-bit mask: want ENOMEM saying {reason:?}, got {other:?}",
                        len / MIB,
                        mask.bits()
                    ))
                }
            }
            nothing_held(&mut c, "a refused request")?;
        }
        drop(r);
        if round == 0 {
            baseline = settle(&mut c, None)?;
        }
    }
    // Taken once the refused clients' sockets are gone: the kernel's socket
    // buffers (large kmalloc blocks) come and go with connections.
    settle(&mut c, Some(baseline)).map_err(|e| format!("after refused requests: {e}"))?;
    let base_info = c.meminfo().map_err(|e| format!("meminfo: {e}"))?;

    let round_trip = |c: &mut Client, seed: u64, sector: u64| -> Result<(), String> {
        let a = c
            .dma_alloc(LEN, 0, DmaMask::Bits32)
            .map_err(|e| format!("dma_alloc: {e}"))?;
        if a.zone != "DMA32" || a.phys + a.len > 4 * GIB || a.len != LEN {
            return Err(format!("want {LEN} bytes in DMA32 below 4 GiB, got {a:?}"));
        }
        let listed = c.dma_buffers().map_err(|e| format!("dma list: {e}"))?;
        if !listed.iter().any(|b| {
            b.handle == a.handle
                && b.phys == a.phys
                && b.zone == "DMA32"
                && matches!(&b.owner, DmaOwner::Client { name } if name == "boot-test-dma")
        }) || listed
            .iter()
            .any(|b| b.phys == a.phys && matches!(b.owner, DmaOwner::DeviceQueue { .. }))
        {
            return Err(format!(
                "buffer {a:?} not listed with its owner: {listed:?}"
            ));
        }
        c.dma_fill(a.handle, seed)
            .map_err(|e| format!("dma_fill: {e}"))?;
        let want = c
            .dma_checksum(a.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?;
        let t = c
            .dma_write_disk(a.handle, sector)
            .map_err(|e| format!("write-disk: {e}"))?;
        if t.bytes != LEN || t.requests != 1 || t.descriptors != 3 || t.data_descriptors != 1 {
            return Err(format!(
                "want one request of 3 descriptors for {LEN} bytes, got {t:?}"
            ));
        }
        c.dma_free(a.handle).map_err(|e| format!("dma_free: {e}"))?;
        let b = c
            .dma_alloc(LEN, 0, DmaMask::Bits32)
            .map_err(|e| format!("dma_alloc (second): {e}"))?;
        if c.dma_checksum(b.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?
            == want
        {
            return Err("a fresh buffer already holds the data (not zeroed?)".into());
        }
        c.dma_read_disk(b.handle, sector)
            .map_err(|e| format!("read-disk: {e}"))?;
        let got = c
            .dma_checksum(b.handle, 0, 0)
            .map_err(|e| format!("checksum: {e}"))?;
        if got != want {
            return Err(format!("read back {got:#x}, wrote {want:#x}"));
        }
        c.dma_free(b.handle).map_err(|e| format!("dma_free: {e}"))?;
        Ok(())
    };
    let mut opts_named = opts.clone();
    opts_named.client = "boot-test-dma".into();
    let mut d = Client::connect(&opts_named).map_err(|e| format!("connect: {e}"))?;
    round_trip(&mut d, 0xd15c, 8)?;

    // Fragment ordinary memory: 3 clients x 60 000 pages, every other freed.
    let mut fragmenters = Vec::new();
    for i in 0..3 {
        let mut f = Client::connect(&opts).map_err(|e| format!("fragmenter {i}: {e}"))?;
        let mut handles = Vec::with_capacity(60_000);
        // 15 full batches (memd-wire's MAX_BATCH_OPS, 4096 each).
        for _ in 0..15 {
            let ops = vec![
                Op::AllocPages {
                    order: 0,
                    gfp: Gfp::KERNEL
                };
                memd_client::wire::MAX_BATCH_OPS
            ];
            for r in f
                .batch(ops, true)
                .map_err(|e| format!("fragmenter {i}: {e}"))?
            {
                match r {
                    Ok(Reply::Pages { handle, .. }) => handles.push(handle),
                    other => return Err(format!("fragmenter {i}: alloc_pages: {other:?}")),
                }
            }
        }
        let frees: Vec<Op> = handles
            .iter()
            .step_by(2)
            .map(|&handle| Op::FreePages { handle })
            .collect();
        for chunk in frees.chunks(memd_client::wire::MAX_BATCH_OPS) {
            for r in f
                .batch(chunk.to_vec(), true)
                .map_err(|e| format!("fragmenter {i}: {e}"))?
            {
                r.map_err(|e| format!("fragmenter {i}: free_pages: {e}"))?;
            }
        }
        fragmenters.push(f);
    }
    let held: u64 = d
        .clients()
        .map_err(|e| format!("clients: {e}"))?
        .iter()
        .map(|c| c.pages)
        .sum();
    if held < 90_000 {
        return Err(format!("fragmenters hold {held} pages, want 90 000"));
    }
    round_trip(&mut d, 0xf4a9, 4096)?;
    drop(fragmenters);
    drop(d);
    nothing_held(&mut c, "the round trips")?;
    // 184 320 handles grew the service's handle tables in the slab layer;
    // closing returns every object, but slabs the kernel's other objects
    // keep partly used stay with the slab layer. So: every page is either
    // free or held by the slab layer, exactly as at the baseline, and no
    // page, large kmalloc block or reservation byte is held.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = c.meminfo().map_err(|e| format!("meminfo: {e}"))?;
        let same = now.free + now.slab == base_info.free + base_info.slab
            && now.pages_allocated == base_info.pages_allocated
            && now.kmalloc_large == base_info.kmalloc_large
            && now.cma_free == base_info.cma_total;
        if same {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after everyone left: meminfo at the baseline {base_info:?}, now {now:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn run(args: &BootTestArgs) -> Result<()> {
    let kernel = crate::build::build_kernel()?;
    let qemu_path = qemu::ensure_qemu()?;
    // The matrix runs under TCG (QemuConfig's default): it must behave the
    // same on every host.
    let cases: Vec<Case> = matrix()
        .into_iter()
        .filter(|c| {
            args.filter
                .as_ref()
                .is_none_or(|f| c.name().contains(f.as_str()))
        })
        .collect();
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
                // Fresh tokens for each guest that serves, in a private
                // directory: only their paths go on QEMU's command line.
                let served = match case.net.then(|| served(case)).transpose() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("  FAIL  {:<28}", case.name());
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{}: setting up the service: {e:#}", case.name()));
                        continue;
                    }
                };
                let mut cfg = QemuConfig::new(qemu_path.clone(), kernel.clone(), case.machine)
                    .mem(&mem_arg(case.mem))
                    .append(&case.cmdline())
                    .time_bound(Duration::from_secs(args.timeout));
                if let Some((endpoint, disk)) = &served {
                    cfg = endpoint.serve(cfg).disk(disk.path.clone());
                }
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

/// A served case's endpoint and disk image.
fn served(case: &Case) -> anyhow::Result<(Endpoint, TempDisk)> {
    let endpoint = Endpoint::temporary("boot-test")?;
    let disk = TempDisk::new(&case.name())?;
    Ok((endpoint, disk))
}

/// What a served case checks once the guest is ready: no token on QEMU's
/// command line (any local user can read one in /proc), the control port,
/// the disk, large DMA buffers through the disk when the case reserves
/// DMA32 memory, and memctl.
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
    disk_check(port, &tokens.client, &disk.path)?;
    if case.dma_reserve == Some(Reserve::Dma32) {
        dma_disk_check(port, &tokens.client)?;
    }
    memctl_check(port, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\
[   0.004] INFO  e820 [0x000000000000-0x00000009fc00) usable 639 KiB
[   0.004] INFO  e820 [0x00000009fc00-0x0000000a0000) reserved 1 KiB
[   0.004] INFO  e820 [0x000000100000-0x000004000000) usable 64512 KiB
[   0.005] INFO  mm: reserved [0x000000000000-0x000000001000) zero
[   0.005] INFO  mm: reserved [0x000000100000-0x000000200000) kernel
[   0.005] INFO  mm: zone DMA pfn [0x1-0x1000) managed=3710 free=3710
[   0.005] INFO  mm: zone DMA32 pfn [0x1000-0x4000) managed=12288 free=12000
";

    fn case() -> Case {
        Case {
            machine: Machine::Microvm,
            mem: 64 * MIB,
            dma_reserve: None,
            crash: None,
            net: false,
            memmap: false,
        }
    }

    #[test]
    fn parses_console() {
        let r = parse_report(CONSOLE);
        assert_eq!(r.usable, vec![(0, 0x9fc00), (0x100000, 0x4000000)]);
        assert_eq!(r.reserved.len(), 2);
        assert_eq!(r.zones.len(), 2);
        assert_eq!(r.zones[1], ("DMA32".to_string(), 0x1000, 0x4000, 12288));
    }

    #[test]
    fn accepts_consistent_zones() {
        // DMA: 0x9f pages below 640K minus page 0, plus 0x100..0x1000 minus
        // the kernel's 0x100 pages: 158 + 3840 - 256 = 3742.
        let fixed = CONSOLE.replace("managed=3710", "managed=3742");
        check_report(&case(), &parse_report(&fixed)).unwrap();
    }

    #[test]
    fn rejects_wrong_counts_and_missing_reservation() {
        assert!(check_report(&case(), &parse_report(CONSOLE)).is_err());
        let fixed = CONSOLE.replace("managed=3710", "managed=3742");
        let with = Case {
            dma_reserve: Some(Reserve::Dma32),
            mem: GIB,
            ..case()
        };
        assert!(check_report(&with, &parse_report(&fixed)).is_err());
    }

    #[test]
    fn pages_outside_counts_holes() {
        assert_eq!(
            pages_outside(0, 10 * PAGE, &[(PAGE, 3 * PAGE), (2 * PAGE, 4 * PAGE)]),
            7
        );
        assert_eq!(pages_outside(0, 0x9fc00, &[]), 0x9f);
    }
}
