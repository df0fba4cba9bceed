//! Time: the TSC, calibrated against the PIT (channel 0). Where there is no
//! PIT (`-M microvm,pit=off`) calibration falls back to CPUID leaf 0x15/0x16
//! and finally to a fixed guess, and reports which source it used.

use super::{cpuid, cpuid_max_leaf, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

const PIT_HZ: u64 = 1_193_182;
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;
/// PIT ticks measured: 1 ms (1193 ticks) keeps boot fast; the error stays
/// around 0.1 % (one tick of latching jitter on either end).
const CAL_TICKS: u16 = 1193;
/// Polls without a counter change before concluding there is no PIT.
const NO_PIT_POLLS: u32 = 2_000;
/// Guess used when nothing else is available.
const FALLBACK_HZ: u64 = 2_000_000_000;

/// Nanoseconds per tick as a 32.32 fixed-point multiplier (Linux's
/// clocksource `mult`/`shift`): the poll loop reads the clock several times
/// a pass, and a 128-bit division is a long library call under TCG.
static NS_MULT: AtomicU64 = AtomicU64::new(ns_mult(FALLBACK_HZ));
const NS_SHIFT: u32 = 32;

const fn ns_mult(hz: u64) -> u64 {
    ((1_000_000_000u128 << NS_SHIFT) / hz as u128) as u64
}
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscSource {
    Pit,
    CpuidCrystal,
    CpuidBase,
    Guess,
}

/// Records the boot TSC value: `uptime_ns` counts from here.
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

fn pit_read() -> u16 {
    outb(PIT_CMD, 0x00); // latch channel 0
    let lo = inb(PIT_CH0) as u16;
    let hi = inb(PIT_CH0) as u16;
    (hi << 8) | lo
}

/// Measures TSC ticks over `CAL_TICKS` PIT ticks; `None` without a PIT.
fn calibrate_pit() -> Option<u64> {
    outb(PIT_CMD, 0x34); // channel 0, lo/hi byte, mode 2, binary
    outb(PIT_CH0, 0xff);
    outb(PIT_CH0, 0xff);
    // Synchronise on a counter edge; a missing PIT reads back a constant.
    let first = pit_read();
    let mut start = first;
    let mut polls = 0;
    while start == first {
        polls += 1;
        if polls > NO_PIT_POLLS {
            return None;
        }
        start = pit_read();
    }
    let t0 = rdtsc();
    let mut polls: u64 = 0;
    loop {
        let now = pit_read();
        let elapsed = start.wrapping_sub(now);
        if (CAL_TICKS..0x8000).contains(&elapsed) {
            let t1 = rdtsc();
            let hz = (t1 - t0) as u128 * PIT_HZ as u128 / elapsed as u128;
            return Some(hz as u64);
        }
        polls += 1;
        if polls > 50_000_000 {
            return None;
        }
    }
}

fn cpuid_crystal() -> Option<u64> {
    if cpuid_max_leaf() < 0x15 {
        return None;
    }
    let r = cpuid(0x15, 0);
    let (den, num, crystal) = (r.eax as u64, r.ebx as u64, r.ecx as u64);
    (den != 0 && num != 0 && crystal != 0).then(|| crystal * num / den)
}

fn cpuid_base() -> Option<u64> {
    if cpuid_max_leaf() < 0x16 {
        return None;
    }
    let mhz = (cpuid(0x16, 0).eax & 0xffff) as u64;
    (mhz != 0).then(|| mhz * 1_000_000)
}

/// Calibrates the TSC and returns the frequency and its source.
pub fn calibrate() -> (u64, TscSource) {
    let (hz, src) = if let Some(hz) = calibrate_pit() {
        (hz, TscSource::Pit)
    } else if let Some(hz) = cpuid_crystal() {
        (hz, TscSource::CpuidCrystal)
    } else if let Some(hz) = cpuid_base() {
        (hz, TscSource::CpuidBase)
    } else {
        (FALLBACK_HZ, TscSource::Guess)
    };
    let hz = hz.max(1_000_000);
    NS_MULT.store(ns_mult(hz), Ordering::Relaxed);
    (hz, src)
}

/// Nanoseconds since `mark_boot`.
pub fn uptime_ns() -> u64 {
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ((ticks as u128 * NS_MULT.load(Ordering::Relaxed) as u128) >> NS_SHIFT) as u64
}
