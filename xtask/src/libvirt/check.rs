//! What `cargo xtask test` checks under libvirt, when it runs as root (as
//! CI does): two memd domains started through libvirt, `memctl --fleet`
//! across them, `virsh setmem` moving memd's balloon and `virsh
//! dommemstat` showing memd's own figures, `virsh update-memory-device`
//! growing and shrinking the second through its virtio-mem device, and a
//! stopped domain shown down while the other stays up. Every domain it defined is undefined, even
//! when a step fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use memd_client::fleet::Fleet;
use serde_json::Value;

use super::virsh::{self, virsh};
use super::{prepare, start, DomainArgs};
use crate::qemu::{self, Accel};
use crate::tokens::PrivateDir;

const MIB: u64 = 1 << 20;
/// Each domain's memory.
const GUEST_MIB: u64 = 512;
/// What `virsh setmem` asks the first domain to shrink to.
const TARGET_MIB: u64 = 256;
/// The second domain's virtio-mem region, and what is plugged into it.
const HOTPLUG_MIB: u64 = 1024;
const PLUG_MIB: u64 = 512;

/// Stops and undefines the domains when dropped.
struct Defined(Vec<String>);

impl Drop for Defined {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = virsh::stop(name);
        }
    }
}

pub fn smoke() -> Result<()> {
    if !qemu::is_root() {
        println!("  skip  libvirt: needs root (it starts libvirtd)");
        return Ok(());
    }
    let t = Instant::now();
    super::ensure_libvirt()?;
    let dir = PrivateDir::new("libvirt-test")?;
    let fleet = dir.path.join("fleet.json");
    let names: Vec<String> = ["a", "b"]
        .iter()
        .map(|s| format!("memd-test-{}-{s}", std::process::id()))
        .collect();
    let defined = Defined(names.clone());
    for (i, name) in names.iter().enumerate() {
        let args = DomainArgs {
            name: name.clone(),
            port: qemu::free_port()?,
            mem_mib: GUEST_MIB,
            cmdline: String::new(),
            accel: Accel::Auto,
            hotplug_mib: (i == 1).then_some(HOTPLUG_MIB),
        };
        let d = prepare(&args, &dir.path)?;
        start(&d, &fleet).with_context(|| format!("starting {name}"))?;
    }
    let both = fleet_status(&fleet)?;
    if both.iter().filter(|m| m["up"] == true).count() != 2 {
        bail!("memctl --fleet status: want both memds up, got {both:?}");
    }
    let a = &names[0];
    let (balloon, stats) = setmem_check(a, &fleet)?;
    hotplug_check(&names[1], &fleet)?;

    virsh(&["destroy", &names[1]])?;
    let after = fleet_status(&fleet)?;
    let up: Vec<(&str, bool)> = after
        .iter()
        .map(|m| (m["name"].as_str().unwrap_or(""), m["up"] == true))
        .collect();
    if up != [(a.as_str(), true), (names[1].as_str(), false)] {
        bail!(
            "after stopping {}: memctl --fleet status says {up:?}",
            names[1]
        );
    }
    drop(defined);
    for name in &names {
        if virsh(&["domstate", name]).is_ok() {
            bail!("{name} is still defined after the test");
        }
    }
    println!(
        "  ok    libvirt: 2 domains, fleet status; virsh setmem {TARGET_MIB}M: memd's balloon {} MiB; dommemstat {stats}; update-memory-device {PLUG_MIB}M plugged and back; one stopped shown down ({:.1} s)",
        balloon / MIB,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `memctl --fleet FILE --json status`, one object per member.
fn fleet_status(fleet: &Path) -> Result<Vec<Value>> {
    let out = memctl(fleet, &["--json", "--wait", "3", "status"])?;
    let v: Value = serde_json::from_str(&out).context("memctl --fleet --json status")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn memctl(fleet: &Path, args: &[&str]) -> Result<String> {
    let bin: PathBuf = crate::boot_tests::memctl::memctl_binary().map_err(anyhow::Error::msg)?;
    let out = Command::new(bin)
        .arg("--fleet")
        .arg(fleet)
        .args(args)
        .output()
        .context("running memctl --fleet")?;
    if !out.status.success() {
        bail!(
            "memctl --fleet {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A client connection to the fleet member `name`.
fn connect(name: &str, fleet: &Path) -> Result<memd_client::Client> {
    let fleet = Fleet::load(fleet)?;
    let member = fleet
        .members
        .iter()
        .find(|m| m.name == name)
        .context("not in the fleet file")?;
    Ok(member.connect(false, Duration::from_secs(5))?)
}

/// `virsh setmem` to [`TARGET_MIB`], `dommemstat` there, then back: memd's
/// balloon holds the difference, then nothing. Returns the balloon's size
/// at the target and what `dommemstat` showed. memd is read through one
/// connection of its own.
fn setmem_check(name: &str, fleet: &Path) -> Result<(u64, String)> {
    let mut c = connect(name, fleet)?;
    let want = (GUEST_MIB - TARGET_MIB) * MIB;
    virsh(&["setmem", name, &format!("{TARGET_MIB}M"), "--live"])?;
    let held = wait_balloon(name, &mut c, want)?;
    let stats = dommemstat_check(name, &mut c)?;
    virsh(&["setmem", name, &format!("{GUEST_MIB}M"), "--live"])?;
    wait_balloon(name, &mut c, 0)?;
    Ok((held, stats))
}

/// `virsh update-memory-device --requested-size` to [`PLUG_MIB`] and back
/// to nothing: memd plugs it into ZONE_MOVABLE, then unplugs it.
fn hotplug_check(name: &str, fleet: &Path) -> Result<()> {
    let mut c = connect(name, fleet)?;
    for mib in [PLUG_MIB, 0] {
        virsh(&[
            "update-memory-device",
            name,
            "--requested-size",
            &format!("{mib}MiB"),
            "--live",
        ])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let h = c
                .status()?
                .hotplug
                .with_context(|| format!("{name}: memd reports no virtio-mem device"))?;
            if h.plugged_bytes == mib * MIB && h.region_size == HOTPLUG_MIB * MIB {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name}: virsh asked for {mib} MiB plugged, memd says {h:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn wait_balloon(name: &str, c: &mut memd_client::Client, want: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let balloon = c.meminfo()?.balloon;
        if balloon == want {
            return Ok(balloon);
        }
        if Instant::now() > deadline {
            bail!("{name}: memd's balloon holds {balloon} bytes, virsh asked for {want}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `virsh dommemstat` against memd's meminfo, once a statistics period has
/// passed with nothing else happening: `available` (libvirt's name for the
/// total) is memd's to the kB, `actual` is the guest less memd's balloon,
/// and `unused` (free) and `usable` (free and reclaimable slab) agree
/// within what memd's own serving of the two reads moves.
fn dommemstat_check(name: &str, c: &mut memd_client::Client) -> Result<String> {
    std::thread::sleep(Duration::from_secs(3));
    let m = c.meminfo()?;
    let stats = virsh(&["dommemstat", name])?;
    let stat = |key: &str| -> Result<u64> {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .with_context(|| format!("dommemstat has no {key}: {stats}"))
    };
    let (available, unused, actual) = (stat("available ")?, stat("unused ")?, stat("actual ")?);
    if available != m.total / 1024 {
        bail!(
            "dommemstat available {available} kB, memd's total {} kB",
            m.total / 1024
        );
    }
    if actual != GUEST_MIB * 1024 - m.balloon / 1024 {
        bail!(
            "dommemstat actual {actual} kB, memd's balloon {} kB",
            m.balloon / 1024
        );
    }
    // Free memory moves by what memd's serving of the two reads takes:
    // within 1 MiB.
    let free = m.free / 1024;
    if unused.abs_diff(free) > 1024 {
        bail!("dommemstat unused {unused} kB, memd's free {free} kB");
    }
    let usable = stat("usable ")?;
    let reclaimable = (m.free + m.slab_reclaimable) / 1024;
    if usable.abs_diff(reclaimable) > 1024 {
        bail!("dommemstat usable {usable} kB, memd's free and reclaimable slab {reclaimable} kB");
    }
    Ok(format!(
        "available {available} kB = memd's total, actual {actual} kB = guest - balloon, unused {unused} kB ~ free {free} kB"
    ))
}
