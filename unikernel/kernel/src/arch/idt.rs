//! Exceptions: an IDT whose 32 CPU exception vectors print what happened
//! (vector, error code, RIP, CR2) and end QEMU with a failure status, instead
//! of a silent triple fault.
//!
//! memd polls, and interrupts are enabled only inside the idle halt
//! (`apic::halt_for`): there, any interrupt just ends the `hlt`. Every
//! vector from 32 up is a bare `iretq`; the halt's caller sends the EOI.

use core::arch::{asm, global_asm};
use core::fmt::Write;

use super::serial::Serial;

// Stubs: vectors without a CPU error code push a 0 so every frame looks the
// same, then push the vector number and jump to the common path, which aligns
// the stack and calls `exception_entry(frame)`. Exceptions are fatal here, so
// nothing is restored.
global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .macro ISR_NOERR n
isr_\n:
    pushq $0
    pushq $\n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_\n:
    pushq $\n
    jmp isr_common
    .endm
    ISR_NOERR 0
    ISR_NOERR 1
    ISR_NOERR 2
    ISR_NOERR 3
    ISR_NOERR 4
    ISR_NOERR 5
    ISR_NOERR 6
    ISR_NOERR 7
    ISR_ERR 8
    ISR_NOERR 9
    ISR_ERR 10
    ISR_ERR 11
    ISR_ERR 12
    ISR_ERR 13
    ISR_ERR 14
    ISR_NOERR 15
    ISR_NOERR 16
    ISR_ERR 17
    ISR_NOERR 18
    ISR_NOERR 19
    ISR_NOERR 20
    ISR_ERR 21
    ISR_NOERR 22
    ISR_NOERR 23
    ISR_NOERR 24
    ISR_NOERR 25
    ISR_NOERR 26
    ISR_NOERR 27
    ISR_NOERR 28
    ISR_ERR 29
    ISR_ERR 30
    ISR_NOERR 31
isr_wake:
    iretq
isr_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call {entry}
    ud2
    .popsection

    .pushsection .rodata.isr, "a"
    .balign 8
    .global isr_table
isr_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\n
    .endr
    .global isr_wake_addr
isr_wake_addr:
    .quad isr_wake
    .popsection
    "#,
    entry = sym exception_entry,
    options(att_syntax),
);

extern "C" {
    static isr_table: [u64; 32];
    static isr_wake_addr: u64;
}

/// What the stubs and the CPU left on the stack.
#[repr(C)]
struct Frame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor overrun",
    "invalid TSS",
    "segment not present",
    "stack fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 error",
    "alignment check",
    "machine check",
    "SIMD error",
    "virtualisation",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

extern "C" fn exception_entry(frame: *const Frame) -> ! {
    // SAFETY: `frame` is the stack pointer the stub saw, pointing at the
    // vector/error words it pushed followed by the CPU's interrupt frame.
    let f = unsafe { &*frame };
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    let mut s = Serial;
    let _ = writeln!(
        s,
        "\nmemd: FATAL exception {} ({}) error={:#x} rip={:#x} rsp={:#x} rflags={:#x}",
        f.vector, name, f.error, f.rip, f.rsp, f.rflags
    );
    if f.vector == 14 {
        let _ = writeln!(s, "memd: page fault address cr2={:#x}", super::read_cr2());
    }
    let stack_bottom = crate::boot::stack_bottom();
    if f.rsp < stack_bottom + 4096 && f.rsp + 65536 > stack_bottom {
        let _ = writeln!(
            s,
            "memd: (stack pointer near the bottom of the boot stack: overflow?)"
        );
    }
    super::exit::failure()
}

#[repr(C, packed)]
struct IdtPtr {
    limit: u16,
    base: u64,
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static IDT: spin::Once<Idt> = spin::Once::new();

/// A present 64-bit interrupt gate to `addr` in the kernel code segment.
fn gate(addr: u64) -> [u64; 2] {
    [
        (addr & 0xffff)
            | (0x08 << 16) // kernel code selector
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | ((addr >> 16) & 0xffff) << 48,
        addr >> 32,
    ]
}

fn build() -> Idt {
    let mut idt = Idt([0; 512]);
    // SAFETY: `isr_table` and `isr_wake_addr` are read-only data emitted
    // by the assembly above.
    let (table, wake) = unsafe { (&isr_table, isr_wake_addr) };
    let handlers = table.iter().copied().chain(core::iter::repeat(wake));
    for (slot, addr) in idt.0.chunks_exact_mut(2).zip(handlers) {
        slot.copy_from_slice(&gate(addr));
    }
    idt
}

/// Installs the exception handlers and the wake-up gates.
pub fn init() {
    let idt: &'static Idt = IDT.call_once(build);
    let ptr = IdtPtr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as *const Idt as u64,
    };
    // SAFETY: the IDT is a static that lives forever and holds valid gates
    // for all 256 vectors.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}
