//! Starting the application processors (Linux's `smpboot.c`): a
//! trampoline page below 1 MiB, INIT-SIPI-SIPI over the xAPIC, and each
//! CPU on a stack of its own, on the kernel's page tables, GDT and IDT,
//! with its APIC on.
//!
//! A CPU starts in real mode at the trampoline (`TRAMPOLINE`, reserved in
//! memblock before the buddy exists); the trampoline switches to protected
//! mode on a GDT of its own, then to long mode on the kernel's page tables
//! (which identity-map the low 2 MiB), and jumps to `ap_entry64` in the
//! kernel image, which loads the kernel's GDT and calls [`ap_main`]. All
//! CPUs get INIT at once; STARTUP goes to one at a time: the trampoline's
//! parameters (page tables, stack, CPU number) are one set.
//!
//! The network loop stays on CPU 0; a started CPU runs the function
//! `start_aps` was given (the work queue's worker loop).

use core::arch::{asm, global_asm};
use core::ops::Range;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::percpu::MAX_CPUS;
use super::{apic, idt, paging, time};

/// Physical address of the trampoline page (SIPI vector 8).
pub const TRAMPOLINE: u64 = 0x8000;
/// Each application processor's stack.
const AP_STACK: usize = 64 << 10;
/// How long a CPU has to come up (TCG is slow to start a vCPU).
const START_TIMEOUT_NS: u64 = 500_000_000;

/// CPUs running, the boot CPU included.
static ONLINE: AtomicU32 = AtomicU32::new(1);
/// What an application processor runs once it is up.
static WORK: spin::Once<fn(usize) -> !> = spin::Once::new();
/// Each CPU's APIC id, by CPU number (0: the boot CPU).
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
/// When each CPU came up (uptime ns), by CPU number.
static SINCE_NS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

global_asm!(
    r#"
    .pushsection .rodata.trampoline, "a"
    .balign 16
    .global ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $({tramp} + ap_pm32 - ap_trampoline_start)

    .code32
ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl {tramp} + ap_cr3 - ap_trampoline_start, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0
    ljmpl $0x18, $({tramp} + ap_lm64 - ap_trampoline_start)

    .code64
ap_lm64:
    movq {tramp} + ap_stack - ap_trampoline_start, %rsp
    movq {tramp} + ap_cpu - ap_trampoline_start, %rdi
    movq {tramp} + ap_entry - ap_trampoline_start, %rax
    jmpq *%rax

    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
ap_gdt_end:
ap_gdt_ptr:
    .word ap_gdt_end - ap_gdt - 1
    .long {tramp} + ap_gdt - ap_trampoline_start
    .balign 8
    .global ap_cr3
ap_cr3:
    .quad 0
    .global ap_stack
ap_stack:
    .quad 0
    .global ap_cpu
ap_cpu:
    .quad 0
    .global ap_entry
ap_entry:
    .quad 0
    .global ap_trampoline_end
ap_trampoline_end:
    .popsection

    .pushsection .text.ap, "ax"
    .code64
    .global ap_entry64
ap_entry64:
    lgdt boot_gdt_ptr(%rip)
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    xorl %ebp, %ebp
    call {main}
2:
    hlt
    jmp 2b
    .popsection
    "#,
    tramp = const TRAMPOLINE,
    main = sym ap_main,
    options(att_syntax),
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_cr3: u64;
    static ap_stack: u64;
    static ap_cpu: u64;
    static ap_entry: u64;
    fn ap_entry64();
}

/// The physical range the trampoline needs below 1 MiB, to reserve before
/// the memory manager hands memory out.
pub fn trampoline_range() -> Range<u64> {
    TRAMPOLINE..TRAMPOLINE + 4096
}

/// Records the boot CPU as CPU 0 (after `apic::init`, which gives its id).
pub fn boot_cpu() {
    APIC_IDS[0].store(apic::id(), Ordering::Release);
}

/// CPUs running, the boot CPU included.
pub fn online() -> u32 {
    ONLINE.load(Ordering::Acquire)
}

/// CPU `cpu`'s APIC id and when it came up, if it runs.
pub fn cpu(cpu: usize) -> Option<(u32, u64)> {
    let id = APIC_IDS.get(cpu)?.load(Ordering::Acquire);
    (id != u32::MAX).then(|| (id, SINCE_NS[cpu].load(Ordering::Relaxed)))
}

/// Where in the trampoline page a symbol of the trampoline lands.
fn in_page(sym: *const u8) -> u64 {
    // Only the addresses of the assembly's labels are taken.
    TRAMPOLINE + (sym as u64 - &raw const ap_trampoline_start as u64)
}

/// A stack for a CPU that runs until the guest stops: its top.
fn stack() -> Option<u64> {
    let layout = core::alloc::Layout::from_size_align(AP_STACK, 16).ok()?;
    // SAFETY: a non-zero layout; the block is never freed.
    let p = unsafe { alloc::alloc::alloc(layout) };
    (!p.is_null()).then(|| p as u64 + AP_STACK as u64)
}

/// Starts every CPU of `apic_ids` but the boot CPU's, each to run `work`
/// with its CPU number; the CPUs running afterwards. All get their INIT
/// (and its 10 ms wait) together, then their STARTUP one at a time: the
/// trampoline's parameters are one set.
pub fn start_aps(apic_ids: &[u8], work: fn(usize) -> !) -> u32 {
    WORK.call_once(|| work);
    let me = apic::id();
    let start = &raw const ap_trampoline_start as u64;
    let len = &raw const ap_trampoline_end as u64 - start;
    // SAFETY: the trampoline page is reserved below 1 MiB (memblock never
    // hands it out) and identity-mapped read-write by the kernel's page
    // tables (the low 2 MiB); the trampoline's bytes are read-only data of
    // the kernel image, `len` (under a page) long.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len as usize)
    };
    let cr3 = paging::kernel_cr3();
    let others = || {
        apic_ids
            .iter()
            .copied()
            .filter(move |&id| id as u32 != me)
            .take(MAX_CPUS - 1)
    };
    apic::init_cpus(others());
    for (cpu, id) in (1..).zip(others()) {
        let Some(top) = stack() else {
            log::warn!("smp: no stack for the CPU with APIC id {id}");
            break;
        };
        let params = [
            (&raw const ap_cr3, cr3),
            (&raw const ap_stack, top),
            (&raw const ap_cpu, cpu as u64),
            (&raw const ap_entry, ap_entry64 as *const () as u64),
        ];
        for (sym, value) in params {
            // SAFETY: each parameter is an 8-aligned quad inside the copied
            // trampoline page (see `in_page`), which no started CPU reads
            // any more: the previous one has reported in (or timed out and
            // was left alone).
            unsafe { core::ptr::write_volatile(in_page(sym as *const u8) as *mut u64, value) };
        }
        let before = ONLINE.load(Ordering::Acquire);
        apic::startup_cpu(id, (TRAMPOLINE >> 12) as u8);
        let asked = time::uptime_ns();
        while ONLINE.load(Ordering::Acquire) == before {
            if time::uptime_ns() - asked > START_TIMEOUT_NS {
                break;
            }
            core::hint::spin_loop();
        }
        if ONLINE.load(Ordering::Acquire) == before {
            log::warn!("smp: the CPU with APIC id {id} did not come up");
            // Its number and stack are not reused: it may still start.
            break;
        }
    }
    online()
}

/// An application processor, in long mode on its own stack: its per-CPU
/// area, the IDT, its APIC, then the work `start_aps` was given.
extern "C" fn ap_main(cpu: u64) -> ! {
    super::percpu::init(cpu as usize);
    idt::init();
    apic::init_ap();
    let cpu = cpu as usize;
    SINCE_NS[cpu].store(time::uptime_ns(), Ordering::Relaxed);
    APIC_IDS[cpu].store(apic::id(), Ordering::Release);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    match WORK.get() {
        Some(work) => work(cpu),
        None => loop {
            // SAFETY: interrupts stay off: the CPU sleeps until an INIT or
            // NMI; it touches no memory.
            unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
        },
    }
}
