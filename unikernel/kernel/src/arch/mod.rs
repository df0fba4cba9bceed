//! x86-64 specifics: port I/O, CPUID, control registers, the serial console,
//! QEMU's exit device, exceptions, time and paging.

#![allow(unsafe_code)]

pub mod acpi;
pub mod apic;
pub mod exit;
pub mod idt;
pub mod paging;
pub mod percpu;
pub mod serial;
pub mod smpboot;
pub mod time;

use core::arch::asm;
use core::arch::x86_64::{__cpuid_count, _rdtsc, CpuidResult};

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the ports used
    // by this kernel (UART, PIT, debug-exit, PCI configuration, fw_cfg) have
    // no DMA side effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 16-bit value to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Legacy PCI configuration mechanism #1 (ports 0xcf8/0xcfc): reads the
/// 32-bit register at `offset` (4-aligned) of bus/device/function.
pub fn pci_config_read(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    outl(0xcf8, pci_config_address(bus, device, function, offset));
    inl(0xcfc)
}

/// Writes a PCI configuration register (see `pci_config_read`).
pub fn pci_config_write(bus: u8, device: u8, function: u8, offset: u8, value: u32) {
    outl(0xcf8, pci_config_address(bus, device, function, offset));
    outl(0xcfc, value);
}

fn pci_config_address(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    0x8000_0000
        | (bus as u32) << 16
        | ((device as u32) & 0x1f) << 11
        | ((function as u32) & 7) << 8
        | (offset as u32 & 0xfc)
}

/// CPUID leaf/subleaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    __cpuid_count(leaf, subleaf)
}

/// Highest basic CPUID leaf.
pub fn cpuid_max_leaf() -> u32 {
    cpuid(0, 0).eax
}

/// Highest extended CPUID leaf.
pub fn cpuid_max_ext_leaf() -> u32 {
    cpuid(0x8000_0000, 0).eax
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and always present on x86-64.
    unsafe { _rdtsc() }
}

/// CR2 (faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects (we run in ring 0).
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Halts until the next interrupt (interrupts stay disabled, so forever
/// unless an NMI arrives).
pub fn halt() {
    // SAFETY: HLT only stops the CPU until an interrupt.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) }
}

/// Stops the CPU for good.
pub fn halt_forever() -> ! {
    loop {
        halt();
    }
}

/// Reads an unmapped kernel address: a deliberate page fault, for testing
/// the exception path (`memd.selftest=fault`).
pub fn trigger_page_fault() -> ! {
    // Canonical, in the upper half, outside the direct map: never mapped.
    let addr = 0xffff_ff80_0000_0000u64 as *const u64;
    // SAFETY: not sound to read, by design: the read faults and the
    // exception handler ends QEMU; execution never continues past it.
    let _ = unsafe { core::ptr::read_volatile(addr) };
    unreachable!("read of an unmapped address did not fault")
}

/// A random 64-bit value: RDRAND where the CPU has it, else TSC-derived
/// (not cryptographic then).
pub fn random_u64() -> u64 {
    if cpuid(1, 0).ecx & (1 << 30) != 0 {
        for _ in 0..32 {
            let mut v = 0u64;
            // SAFETY: RDRAND exists (CPUID.1:ECX.RDRAND) and only writes `v`.
            if unsafe { core::arch::x86_64::_rdrand64_step(&mut v) } == 1 {
                return v;
            }
        }
    }
    // splitmix64 over the TSC.
    let mut z = rdtsc().wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
