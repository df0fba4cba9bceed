//! The local APIC's timer, for halting the CPU while memd is idle.
//!
//! memd polls, which under QEMU keeps a host core busy even when no client
//! is connected. When the poll loop has had nothing to do for a while it
//! arms the one-shot APIC timer and halts (`halt_for`), like Linux's idle
//! loop with a tick. The timer's interrupt only ends the `hlt`: its gate is
//! a bare `iretq` (see `idt`), interrupts are enabled for the `hlt` alone,
//! and the EOI is sent after. The legacy PICs are masked, and the I/O
//! APIC's pins stay masked as reset left them, so nothing else arrives.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{cpuid, outb, paging::DIRECT_MAP_OFFSET, time};

const APIC_BASE_MSR: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// The registers memd touches, by their offset in the register page.
#[derive(Clone, Copy)]
#[repr(u64)]
enum Reg {
    Id = 0x20,
    TaskPriority = 0x80,
    Eoi = 0xb0,
    Spurious = 0xf0,
    LvtTimer = 0x320,
    LvtLint0 = 0x350,
    LvtLint1 = 0x360,
    LvtError = 0x370,
    InitialCount = 0x380,
    CurrentCount = 0x390,
    Divide = 0x3e0,
    IcrLow = 0x300,
    IcrHigh = 0x310,
}

const LVT_MASKED: u32 = 1 << 16;
const SOFTWARE_ENABLE: u32 = 1 << 8;
const DIVIDE_BY_1: u32 = 0b1011;
/// The timer's vector (any above the exceptions would do).
const WAKE_VECTOR: u32 = 0x30;
const SPURIOUS_VECTOR: u32 = 0xff;

/// How long calibration counts the timer against the TSC.
const CALIBRATION_NS: u64 = 500_000;

/// Virtual address of the APIC's registers; 0 until `init` succeeds.
static REGS: AtomicU64 = AtomicU64::new(0);
/// Timer ticks per nanosecond as 32.32 fixed point.
static TICKS_PER_NS: AtomicU64 = AtomicU64::new(0);

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading IA32_APIC_BASE, which exists on every CPU with an
    // APIC (checked by the caller), has no side effects.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only IA32_APIC_BASE is written, with its base unchanged and
    // the global enable bit set.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32,
            in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

fn write(regs: u64, reg: Reg, value: u32) {
    // SAFETY: `regs` is the APIC's register page, mapped uncached in the
    // direct map at boot (the 32-bit device hole); `reg` is one of its
    // 16-byte-aligned registers.
    unsafe { core::ptr::write_volatile((regs + reg as u64) as *mut u32, value) }
}

fn read(regs: u64, reg: Reg) -> u32 {
    // SAFETY: as for `write`.
    unsafe { core::ptr::read_volatile((regs + reg as u64) as *const u32) }
}

/// Why the idle halt is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTimer {
    /// CPUID shows no local APIC.
    NoApic,
    /// Firmware left the APIC in x2APIC mode (registers as MSRs), which
    /// this driver does not speak.
    X2Apic,
    /// The timer did not count during calibration.
    Stopped,
}

/// Sets the APIC up for `halt_for` and returns the timer's frequency (Hz).
pub fn init() -> Result<u64, NoTimer> {
    if cpuid(1, 0).edx & (1 << 9) == 0 {
        return Err(NoTimer::NoApic);
    }
    let base = rdmsr(APIC_BASE_MSR);
    if base & APIC_BASE_X2APIC != 0 {
        return Err(NoTimer::X2Apic);
    }
    wrmsr(APIC_BASE_MSR, base | APIC_BASE_ENABLE);
    // Both 8259s masked: their timer IRQ would arrive on an exception
    // vector in the firmware's setup.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    let regs = DIRECT_MAP_OFFSET + (base & 0x000f_ffff_ffff_f000);
    // Accept every vector: firmware may have left a priority that would
    // hold the timer's back, and the halt would last until the next NMI.
    write(regs, Reg::TaskPriority, 0);
    write(regs, Reg::Spurious, SOFTWARE_ENABLE | SPURIOUS_VECTOR);
    for lvt in [Reg::LvtLint0, Reg::LvtLint1, Reg::LvtError] {
        write(regs, lvt, LVT_MASKED);
    }
    write(regs, Reg::Divide, DIVIDE_BY_1);
    write(regs, Reg::LvtTimer, LVT_MASKED | WAKE_VECTOR);
    write(regs, Reg::InitialCount, u32::MAX);
    let start = time::uptime_ns();
    while time::uptime_ns() - start < CALIBRATION_NS {
        core::hint::spin_loop();
    }
    let counted = u32::MAX - read(regs, Reg::CurrentCount);
    let elapsed = time::uptime_ns() - start;
    write(regs, Reg::InitialCount, 0);
    if counted == 0 {
        return Err(NoTimer::Stopped);
    }
    write(regs, Reg::LvtTimer, WAKE_VECTOR);
    let hz = counted as u64 * 1_000_000_000 / elapsed.max(1);
    TICKS_PER_NS.store(((counted as u64) << 32) / elapsed.max(1), Ordering::Relaxed);
    REGS.store(regs, Ordering::Relaxed);
    Ok(hz)
}

/// Halts the CPU for about `ns` nanoseconds (at least one timer tick, at
/// most what the 32-bit count holds), or until another interrupt. Returns
/// at once when `init` did not succeed.
pub fn halt_for(ns: u64) {
    let regs = REGS.load(Ordering::Relaxed);
    if regs == 0 {
        return;
    }
    let ticks = (ns as u128 * TICKS_PER_NS.load(Ordering::Relaxed) as u128) >> 32;
    write(
        regs,
        Reg::InitialCount,
        ticks.clamp(1, u32::MAX as u128) as u32,
    );
    // SAFETY: interrupts are enabled only for the HLT (STI's shadow covers
    // it, so a timer that already fired wakes it at once rather than being
    // taken before it); every vector's gate is valid (`idt::init`). Not
    // `nomem`: the asm orders the timer's register writes around the halt.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
    write(regs, Reg::InitialCount, 0);
    write(regs, Reg::Eoi, 0);
}

/// This CPU's local APIC id (xAPIC: bits 24-31 of the ID register); 0
/// before `init`.
pub fn id() -> u32 {
    match REGS.load(Ordering::Relaxed) {
        0 => 0,
        regs => read(regs, Reg::Id) >> 24,
    }
}

/// An application processor's APIC, as `init` set up the boot CPU's: on,
/// every vector accepted, the local interrupt pins and the timer masked
/// (the CPU idles in `hlt` with interrupts off until there is work for
/// it). The register page is the same physical page on every CPU.
pub fn init_ap() {
    let regs = REGS.load(Ordering::Relaxed);
    if regs == 0 {
        return;
    }
    let base = rdmsr(APIC_BASE_MSR);
    wrmsr(APIC_BASE_MSR, base | APIC_BASE_ENABLE);
    write(regs, Reg::TaskPriority, 0);
    write(regs, Reg::Spurious, SOFTWARE_ENABLE | SPURIOUS_VECTOR);
    for lvt in [Reg::LvtLint0, Reg::LvtLint1, Reg::LvtError] {
        write(regs, lvt, LVT_MASKED);
    }
    write(regs, Reg::LvtTimer, LVT_MASKED | WAKE_VECTOR);
}

/// Sends the wake-up vector to the CPU with APIC id `apic_id`: it ends
/// that CPU's [`wait_for_wakeup`]. Nothing when `init` found no usable
/// APIC.
pub fn send_wakeup(apic_id: u32) {
    let regs = REGS.load(Ordering::Relaxed);
    if regs == 0 {
        return;
    }
    send_ipi(regs, apic_id as u8, ICR_ASSERT | WAKE_VECTOR);
}

/// Halts until an interrupt (another CPU's [`send_wakeup`]); one that
/// arrived while interrupts were off, since the caller last looked for
/// work, ends it at once.
pub fn wait_for_wakeup() {
    // SAFETY: as in `halt_for`: interrupts are on for the HLT alone, and
    // every vector's gate is valid.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
    let regs = REGS.load(Ordering::Relaxed);
    if regs != 0 {
        write(regs, Reg::Eoi, 0);
    }
}

/// ICR delivery modes and flags (Intel SDM 10.6.1).
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_PENDING: u32 = 1 << 12;

/// Sends INIT to each CPU of `apic_ids`, then waits the specification's
/// 10 ms once for all of them: each then waits for its STARTUP
/// ([`startup_cpu`]). False when `init` found no usable APIC.
pub fn init_cpus(apic_ids: impl Iterator<Item = u8>) -> bool {
    let regs = REGS.load(Ordering::Relaxed);
    if regs == 0 {
        return false;
    }
    for id in apic_ids {
        send_ipi(regs, id, ICR_INIT | ICR_ASSERT);
    }
    spin_for(10_000_000);
    true
}

/// Sends STARTUP twice with `vector` (the start page's number: the CPU
/// starts in real mode at `vector << 12`) to the CPU with APIC id
/// `apic_id`, which had its INIT, with the specification's 200 us waits.
/// False when `init` found no usable APIC.
pub fn startup_cpu(apic_id: u8, vector: u8) -> bool {
    let regs = REGS.load(Ordering::Relaxed);
    if regs == 0 {
        return false;
    }
    for _ in 0..2 {
        send_ipi(regs, apic_id, ICR_STARTUP | ICR_ASSERT | vector as u32);
        spin_for(200_000);
    }
    true
}

/// Sends an interprocessor interrupt (`low`: the ICR's low word) to the
/// CPU with APIC id `apic_id` and waits until the APIC has sent it.
fn send_ipi(regs: u64, apic_id: u8, low: u32) {
    write(regs, Reg::IcrHigh, (apic_id as u32) << 24);
    write(regs, Reg::IcrLow, low);
    while read(regs, Reg::IcrLow) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// Spins for `ns` nanoseconds.
fn spin_for(ns: u64) {
    let start = time::uptime_ns();
    while time::uptime_ns() - start < ns {
        core::hint::spin_loop();
    }
}
