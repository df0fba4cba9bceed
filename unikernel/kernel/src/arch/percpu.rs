//! Per-CPU data reached through the GS segment base, as on Linux x86-64:
//! each CPU points GS at its own [`PerCpu`] when it starts, so `gs:[n]`
//! reads its own copy with one instruction.
//!
//! The one thing kept here is what the kernel heap's per-CPU caches need
//! ([`KernelCpus`]): which CPU this is, and whether its caches are on.

use core::sync::atomic::{AtomicU64, Ordering};

use memd_mm::CpuIds;

/// The most CPUs memd starts.
pub const MAX_CPUS: usize = 8;

const IA32_GS_BASE: u32 = 0xc000_0101;

/// One CPU's area. `gs:[0]` is `caches`.
#[repr(C, align(64))]
struct PerCpu {
    /// The CPU's number plus one while its heap caches are on; 0 when off.
    caches: AtomicU64,
    /// The CPU's number.
    index: AtomicU64,
}

static AREAS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        caches: AtomicU64::new(0),
        index: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Points this CPU's GS base at CPU `cpu`'s area. Runs first on every CPU,
/// before anything allocates.
pub fn init(cpu: usize) {
    let area = &AREAS[cpu.min(MAX_CPUS - 1)];
    area.index.store(cpu as u64, Ordering::Relaxed);
    let base = area as *const PerCpu as u64;
    // SAFETY: IA32_GS_BASE only sets where GS-relative accesses go; nothing
    // in the kernel uses GS but this module, and the area is a static.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") IA32_GS_BASE, in("eax") base as u32,
            in("edx") (base >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// `gs:[0]`: this CPU's `caches` word.
#[inline(always)]
fn caches_word() -> u64 {
    let v: u64;
    // SAFETY: `init` pointed GS at this CPU's area before anything could
    // call this (the heap is used only after it); offset 0 is `caches`.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v
}

/// This CPU's area.
fn this() -> &'static PerCpu {
    let index: u64;
    // SAFETY: as for `caches_word`; offset 8 is `index`.
    unsafe {
        core::arch::asm!("mov {}, gs:[8]", out(reg) index, options(nostack, readonly, preserves_flags))
    };
    &AREAS[(index as usize).min(MAX_CPUS - 1)]
}

/// The kernel heap's CPUs: a CPU's caches are used between
/// [`CpuIds::enter`] and [`CpuIds::leave`] only, by work that asks for
/// them (a stress run's parts). Outside, allocations take the lock as
/// before, so the figures the network loop reports stay exact.
pub struct KernelCpus;

// SAFETY: CPU `k`'s number is returned only on CPU `k` (it is read through
// that CPU's own GS base), and a CPU runs one thread of control: memd has
// no preemption, and its interrupt handlers (the wake-up gate) allocate
// nothing. Nothing takes another CPU's caches (`try_hold` is always false):
// each CPU empties its own in `GlobalMm::cpu_leave`.
unsafe impl CpuIds for KernelCpus {
    #[inline(always)]
    fn current(&self) -> Option<usize> {
        (caches_word() as usize).checked_sub(1)
    }

    fn try_hold(&self, _: usize) -> bool {
        false
    }

    fn release(&self, _: usize) {}

    fn enter(&self) {
        let area = this();
        area.caches
            .store(area.index.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn leave(&self) {
        this().caches.store(0, Ordering::Relaxed);
    }
}
