//! memd-kernel: boots by PVH under QEMU (`-M microvm` or `-M q35`), maps all
//! RAM, and runs the memd memory service.
//!
//! `unsafe` lives only in `boot` (entry, start_info, handing memory to
//! memd-mm), `arch` (port I/O, control registers, page tables, exceptions),
//! `drivers` (virtio `Hal`, device windows, queue buffers) and `hermit` (the
//! hermit-abi exports); the rest of the crate denies it.

#![no_std]
#![no_main]
#![deny(unsafe_code)]

extern crate alloc;

mod arch;
mod balloon;
mod boot;
mod cmdline;
mod drivers;
mod hermit;
mod hotplug;
mod logger;
mod net;
mod passes;
mod selftest;
mod service;
mod workqueue;

use alloc::string::String;
use core::fmt::Write;

use log::{error, info, warn};
use spin::Mutex;

use crate::arch::time::TscSource;
use crate::boot::{BootData, E820Entry, MAX_CMDLINE, MAX_E820};

/// memd-mm is the kernel's allocator (kmalloc + buddy behind a spin lock,
/// vmalloc for large requests).
#[global_allocator]
static ALLOC: arch::paging::KernelHeap = arch::paging::kernel_heap();

static BOOT_DATA: Mutex<BootData> = Mutex::new(BootData {
    start_info: 0,
    rsdp: 0,
    map: [E820Entry {
        addr: 0,
        size: 0,
        kind: 0,
    }; MAX_E820],
    map_len: 0,
    map_dropped: 0,
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
    cmdline_truncated: false,
});

fn e820_name(kind: u32) -> &'static str {
    match kind {
        1 => "usable",
        2 => "reserved",
        3 => "ACPI",
        4 => "ACPI-NVS",
        5 => "unusable",
        _ => "unknown",
    }
}

/// The kernel proper, entered from `boot` in 64-bit mode on the boot stack.
pub fn kmain(start_info: u64) -> ! {
    arch::percpu::init(0);
    arch::time::mark_boot();
    arch::serial::init();
    logger::init();
    arch::idt::init();

    let mut boot = BOOT_DATA.lock();
    if let Err(e) = boot::read_start_info(start_info, &mut boot) {
        panic!("PVH start_info at {start_info:#x}: {e}");
    }
    let cmdline = boot.cmdline();
    let bad_level = match cmdline::get(cmdline, "memd.log") {
        Some(v) => match logger::parse_level(v) {
            Some(level) => {
                log::set_max_level(level);
                None
            }
            None => Some(v),
        },
        None => None,
    };
    info!(
        "memd: PVH boot, start_info at {start_info:#x}, command line \"{}\"",
        cmdline::Redacted(cmdline)
    );
    if let Some(v) = bad_level {
        warn!("memd.log={v:?} is not one of off/error/warn/info/debug/trace; keeping info");
    }
    if boot.cmdline_truncated {
        warn!("command line longer than {MAX_CMDLINE} bytes: truncated");
    }

    let (hz, source) = arch::time::calibrate();
    match source {
        TscSource::Pit => info!(
            "tsc: {}.{:03} MHz (calibrated against the PIT)",
            hz / 1_000_000,
            hz / 1000 % 1000
        ),
        TscSource::CpuidCrystal => {
            warn!("tsc: no PIT; {} MHz from CPUID leaf 0x15", hz / 1_000_000)
        }
        TscSource::CpuidBase => warn!("tsc: no PIT; {} MHz from CPUID leaf 0x16", hz / 1_000_000),
        TscSource::Guess => warn!(
            "tsc: no PIT and no CPUID frequency leaf; guessing {} MHz",
            hz / 1_000_000
        ),
    }

    let map = boot.memory_map();
    info!(
        "memory map: {} entries ({} dropped: zero-sized or beyond {MAX_E820})",
        map.len(),
        boot.map_dropped
    );
    for e in map {
        info!(
            "e820 [{:#014x}-{:#014x}) {} {} KiB",
            e.addr,
            e.end(),
            e820_name(e.kind),
            e.size / 1024
        );
    }
    let kernel = boot::kernel_image();
    let paging = arch::paging::init(map, kernel.clone());
    info!(
        "paging: direct map at {:#x} up to {:#x}: {} x 1 GiB, {} x 2 MiB ({} uncached device), tables {:#x}-{:#x}{}",
        paging.direct_map_offset,
        paging.mapped_end,
        paging.gib_pages,
        paging.mib2_pages,
        paging.uncached_mib2_pages,
        paging.table_frames.start,
        paging.table_frames.end,
        if paging.huge_1g { "" } else { " (no 1 GiB pages on this CPU)" }
    );
    info!("kernel image {:#x}-{:#x}", kernel.start, kernel.end);
    match arch::apic::init() {
        Ok(hz) => info!(
            "idle: halts on the local APIC timer ({}.{:03} MHz) after {} us without work",
            hz / 1_000_000,
            hz / 1000 % 1000,
            net::IDLE_BEFORE_HALT_NS / 1000
        ),
        Err(e) => warn!("idle: no APIC timer ({e:?}): the poll loop never halts"),
    }

    arch::smpboot::boot_cpu();
    // The CPUs, from the ACPI MADT; with more than one, the page their
    // start-up code runs from is kept out of the memory manager's hands.
    let cpus = match arch::acpi::cpus(boot.rsdp) {
        Ok(c) => Some(c),
        Err(e) => {
            info!("smp: {e}; running on the boot CPU alone");
            None
        }
    };
    let others = cpus.as_ref().is_some_and(|c| c.count > 1);
    if let Err(e) = boot::hand_over_memory(
        &ALLOC,
        &boot,
        paging.direct_map_offset,
        paging.table_frames.clone(),
        others.then(arch::smpboot::trampoline_range),
    ) {
        error!("memd-mm: initialisation failed: {e}");
        arch::exit::failure();
    }
    log_memory_summary();
    if let Some(c) = cpus.as_ref().filter(|_| others) {
        let online = arch::smpboot::start_aps(c.ids(), workqueue::worker);
        info!(
            "smp: {online} of {} CPUs online (APIC ids {:?}){}",
            c.count,
            c.ids(),
            match c.left_out {
                0 => alloc::string::String::new(),
                n => alloc::format!("; {n} more left out"),
            }
        );
    }

    let selftest = cmdline::flag(cmdline, "memd.selftest");
    // Deliberate failures, so the host harness can prove it catches them.
    let crash = match cmdline::get(cmdline, "memd.selftest") {
        Some("panic") => Some(Crash::Panic),
        Some("fault") => Some(Crash::Fault),
        _ => None,
    };
    if selftest || crash.is_some() {
        drop(boot);
        logger::always(format_args!("memd: ready"));
        match crash {
            Some(Crash::Panic) => panic!("deliberate panic (memd.selftest=panic)"),
            Some(Crash::Fault) => arch::trigger_page_fault(),
            None => {}
        }
        match selftest::run() {
            Ok(()) => {
                logger::always(format_args!("selftest: passed"));
                arch::exit::success();
            }
            Err(e) => {
                logger::always(format_args!("selftest: FAILED: {e}"));
                arch::exit::failure();
            }
        }
    }

    let net_config = match net::NetConfig::from_cmdline(cmdline) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            arch::exit::failure();
        }
    };
    let timeouts = match net::Timeouts::from_cmdline(cmdline) {
        Ok(t) => t,
        Err(e) => {
            error!("{e}");
            arch::exit::failure();
        }
    };
    if cmdline::get(cmdline, "memd.token").is_some() {
        warn!(
            "memd.token= on the command line is ignored: the tokens come from the fw_cfg files {CLIENT_TOKEN_FILE} and {OPERATOR_TOKEN_FILE}"
        );
    }
    drop(boot);
    let fw_cfg = drivers::fw_cfg::FwCfg::probe();
    if fw_cfg.is_none() {
        warn!("no fw_cfg device: no token files to read");
    }
    let operator_token = token(fw_cfg.as_ref(), OPERATOR_TOKEN_FILE, "operator");
    let client_token = token(fw_cfg.as_ref(), CLIENT_TOKEN_FILE, "client");
    match drivers::virtio_net::NetDevice::probe() {
        Ok(dev) => {
            let disk = match drivers::virtio_blk::BlkDevice::probe() {
                Ok(d) => {
                    info!(
                        "disk: {} sectors ({} MiB){} on {}",
                        d.capacity_sectors(),
                        d.capacity_sectors() >> 11,
                        if d.readonly() { ", read-only" } else { "" },
                        d.location
                    );
                    Some(d)
                }
                Err(e) => {
                    info!("disk: {e}; the disk DMA operations answer ENODEV");
                    None
                }
            };
            let balloon = match drivers::virtio_balloon::BalloonDevice::probe() {
                Ok(b) => {
                    info!(
                        "balloon: host targets and free page reporting on {}",
                        b.location
                    );
                    Some(b)
                }
                Err(e) => {
                    info!("balloon: {e}; free memory stays with the guest");
                    None
                }
            };
            let mut hotplug = hotplug::Hotplug::new(drivers::virtio_mem::MemDevice::probe());
            let mut service = service::MemdService::new(operator_token, client_token, disk);
            let mut balloon = balloon::Balloon::new(balloon);
            // `serve` prints `memd: ready` once the port listens.
            net::serve(
                dev,
                net_config,
                timeouts,
                &mut service,
                &mut balloon,
                &mut hotplug,
            );
            logger::always(format_args!("memd: shut down by a client"));
            arch::exit::success();
        }
        Err(e) => {
            warn!(
                "net: {e}: the control service is not reachable (QEMU needs -device virtio-net-*)"
            );
            logger::always(format_args!("memd: ready"));
            arch::halt_forever()
        }
    }
}

enum Crash {
    Panic,
    Fault,
}

/// The fw_cfg files holding the tokens (`-fw_cfg name=...,file=...`).
const CLIENT_TOKEN_FILE: &str = "opt/memd/token";
const OPERATOR_TOKEN_FILE: &str = "opt/memd/operator-token";

/// The `role`'s token from fw_cfg file `name`; when it is missing or
/// refused, a random token nobody knows, so nobody gets that role.
fn token(fw_cfg: Option<&drivers::fw_cfg::FwCfg>, name: &str, role: &str) -> String {
    if let Some(fw) = fw_cfg {
        match fw.read_secret(name) {
            Ok(t) => {
                info!("auth: the {role} token is set (fw_cfg {name})");
                return t;
            }
            Err(e) => warn!("auth: fw_cfg {name}: {e}"),
        }
    }
    warn!("auth: no {role} token: using a random one nobody knows, so nobody logs in as {role}");
    let mut t = String::new();
    let _ = write!(t, "{:016x}{:016x}", arch::random_u64(), arch::random_u64());
    t
}

/// The zone summary and boot reservations, in a form the boot tests parse.
fn log_memory_summary() {
    let mm = ALLOC.lock();
    for r in mm.reservations() {
        info!(
            "mm: reserved [{:#014x}-{:#014x}) {}",
            r.start,
            r.end,
            r.kind.name()
        );
    }
    if let Some(c) = mm.cma_info() {
        info!(
            "mm: dma_reserve [{:#014x}-{:#014x}) {} KiB in {}",
            c.base,
            c.base + c.size,
            c.size / 1024,
            c.zone.name()
        );
    }
    for z in mm.zoneinfo() {
        info!(
            "mm: zone {} pfn [{:#x}-{:#x}) managed={} to_come={} free={} min={} low={} high={}",
            z.zone.name(),
            z.start_pfn,
            z.end_pfn,
            z.managed,
            z.deferred,
            z.free,
            z.watermark.min,
            z.watermark.low,
            z.watermark.high
        );
    }
    let m = mm.meminfo();
    info!(
        "mm: {} MiB managed, {} MiB free, {} MiB to come, frame table {} KiB, max order {}",
        m.total >> 20,
        m.free >> 20,
        m.deferred >> 20,
        m.frame_table >> 10,
        mm.max_order()
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(loc) => logger::write_raw(format_args!(
            "\nmemd: PANIC at {}:{}:{}: {}\n",
            loc.file(),
            loc.line(),
            loc.column(),
            info.message()
        )),
        None => logger::write_raw(format_args!("\nmemd: PANIC: {}\n", info.message())),
    }
    arch::exit::failure()
}
