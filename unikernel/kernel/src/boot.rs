//! PVH boot: the ELF note that tells QEMU where to enter, the 32-bit entry
//! that builds boot page tables and switches to long mode, and reading the
//! PVH `hvm_start_info` (memory map and command line).
//!
//! On entry (PVH ABI) the CPU is in 32-bit protected mode with flat segments,
//! paging off, interrupts off, and `ebx` holds the physical address of the
//! start_info structure. The boot page tables identity-map the low 4 GiB with
//! 2 MiB pages; `arch::paging` replaces them with the final direct map.

#![allow(unsafe_code)]

use core::arch::global_asm;

use memd_mm::{BootInfo, MemRegion, MmError, RegionKind};

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note type holding the 32-bit entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Size of the boot stack (in .bss, inside the kernel image).
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

// The note: namesz, descsz, type, "Xen\0", then the entry address as a 64-bit
// value (QEMU reads a u64 from an ELF64 note). Everything stays 4-aligned.
global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long {note_type}
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
);

// The 32-bit entry. Zeroes .bss (boot stack and page tables live there),
// identity-maps 0..4 GiB with 2 MiB pages, enables PAE + long mode + paging,
// loads a 64-bit GDT and calls `boot_main(start_info)` on the boot stack.
global_asm!(
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi

    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4

    movl $boot_pd, %eax
    orl $3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:
    movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 1b

    movl $0x83, %eax
    movl $boot_pd, %edi
    movl $2048, %ecx
2:
    movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    movl $boot_pml4, %eax
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

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_long_mode

    .code64
pvh_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi
    call {main}
3:
    hlt
    jmp 3b
    .popsection

    .pushsection .rodata.boot, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_end:
    .balign 8
    .global boot_gdt_ptr
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 4
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {stack_size}
boot_stack_top:
    .popsection
    "#,
    main = sym boot_main,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax),
);

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static boot_stack_bottom: u8;
}

/// Physical range `[start, end)` of the loaded kernel image, .bss included
/// (so the boot stack and boot page tables are inside it).
pub fn kernel_image() -> core::ops::Range<u64> {
    // Only the addresses of the linker-defined symbols are taken.
    (&raw const __kernel_start as u64)..(&raw const __kernel_end as u64)
}

/// Lowest address of the boot stack (the guard check in the exception handler
/// uses it to recognise a stack overflow).
pub fn stack_bottom() -> u64 {
    &raw const boot_stack_bottom as u64
}

/// One entry of the firmware memory map, as PVH hands it over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    /// 1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
    pub kind: u32,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Maximum number of memory-map entries kept.
pub const MAX_E820: usize = 128;
/// Maximum command-line length kept (longer ones are cut, with a warning).
pub const MAX_CMDLINE: usize = 4096;

/// What the kernel keeps from start_info: copies, so the firmware's memory
/// can be handed to the memory manager.
pub struct BootData {
    pub start_info: u64,
    /// The ACPI RSDP's physical address, if the firmware gave one.
    pub rsdp: u64,
    pub map: [E820Entry; MAX_E820],
    pub map_len: usize,
    /// Entries dropped: zero-sized (qboot ends its map with one) or beyond
    /// `MAX_E820`.
    pub map_dropped: usize,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
    pub cmdline_truncated: bool,
}

impl BootData {
    pub fn memory_map(&self) -> &[E820Entry] {
        &self.map[..self.map_len]
    }

    pub fn cmdline(&self) -> &str {
        match core::str::from_utf8(&self.cmdline[..self.cmdline_len]) {
            Ok(s) => s,
            // Keep the valid prefix rather than losing every parameter.
            Err(e) => core::str::from_utf8(&self.cmdline[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

/// Raw `struct hvm_start_info` (Xen public/arch-x86/hvm/start_info.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// Rust entry from the assembly above: 64-bit mode, boot page tables active.
extern "C" fn boot_main(start_info: u32) -> ! {
    crate::kmain(start_info as u64)
}

/// Reads start_info (identity-mapped by the boot page tables; PVH firmware
/// puts it, the map and the command line below 4 GiB) into `out`.
pub fn read_start_info(phys: u64, out: &mut BootData) -> Result<(), &'static str> {
    if phys == 0 || phys >= 1 << 32 {
        return Err("start_info address outside the boot identity map");
    }
    // SAFETY: the PVH ABI guarantees `phys` points to a valid hvm_start_info,
    // identity-mapped (below 4 GiB) by the boot page tables.
    let si: HvmStartInfo = unsafe { core::ptr::read_unaligned(phys as *const HvmStartInfo) };
    if si.magic != HVM_START_MAGIC {
        return Err("bad hvm_start_info magic");
    }
    if si.version < 1 || si.memmap_paddr == 0 || si.memmap_entries == 0 {
        return Err("start_info carries no memory map (version 0)");
    }
    if si.memmap_paddr >= 1 << 32 {
        return Err("memory map above 4 GiB");
    }
    out.start_info = phys;
    out.rsdp = si.rsdp_paddr;
    out.map_len = 0;
    out.map_dropped = 0;
    for i in 0..si.memmap_entries as usize {
        let p = si.memmap_paddr as usize + i * core::mem::size_of::<HvmMemmapEntry>();
        // SAFETY: within the memmap array announced by start_info (identity
        // mapped, below 4 GiB as checked above).
        let e: HvmMemmapEntry = unsafe { core::ptr::read_unaligned(p as *const HvmMemmapEntry) };
        if e.size == 0 || out.map_len == MAX_E820 {
            out.map_dropped += 1;
            continue;
        }
        out.map[out.map_len] = E820Entry {
            addr: e.addr,
            size: e.size,
            kind: e.kind,
        };
        out.map_len += 1;
    }
    // qboot's map is unsorted: sort by address (insertion sort, n is small).
    let map = &mut out.map[..out.map_len];
    for i in 1..map.len() {
        let mut j = i;
        while j > 0 && map[j - 1].addr > map[j].addr {
            map.swap(j - 1, j);
            j -= 1;
        }
    }
    out.cmdline_len = 0;
    out.cmdline_truncated = false;
    if si.cmdline_paddr != 0 && si.cmdline_paddr < 1 << 32 {
        let base = si.cmdline_paddr as usize;
        loop {
            let addr = base + out.cmdline_len;
            if addr >= 1 << 32 {
                break;
            }
            // SAFETY: a NUL-terminated string inside the identity map; the
            // loop stops at NUL, at MAX_CMDLINE and at 4 GiB.
            let b = unsafe { core::ptr::read_volatile(addr as *const u8) };
            if b == 0 {
                break;
            }
            if out.cmdline_len == MAX_CMDLINE {
                out.cmdline_truncated = true;
                break;
            }
            out.cmdline[out.cmdline_len] = b;
            out.cmdline_len += 1;
        }
    }
    Ok(())
}

fn region_kind(e820: u32) -> RegionKind {
    match e820 {
        1 => RegionKind::Usable,
        3 => RegionKind::Acpi,
        4 => RegionKind::Nvs,
        5 => RegionKind::Bad,
        _ => RegionKind::Reserved,
    }
}

/// Hands the machine's memory to memd-mm: the firmware map and command line
/// from `data`, the direct map at `direct_map_offset`, and the kernel image
/// (with its stack and statics) and the page tables' frames as reserved.
pub fn hand_over_memory<const CPUS: usize, I: memd_mm::CpuIds>(
    mm: &memd_mm::GlobalMm<CPUS, I>,
    data: &BootData,
    direct_map_offset: u64,
    table_frames: core::ops::Range<u64>,
    trampoline: Option<core::ops::Range<u64>>,
) -> Result<(), MmError> {
    let map = data.memory_map();
    let mut regions = [MemRegion {
        start: 0,
        end: 0,
        kind: RegionKind::Reserved,
    }; MAX_E820];
    for (r, e) in regions.iter_mut().zip(map) {
        *r = MemRegion {
            start: e.addr,
            end: e.end(),
            kind: region_kind(e.kind),
        };
    }
    let reserved = [kernel_image(), table_frames, trampoline.unwrap_or(0..0)];
    let info = BootInfo {
        regions: &regions[..map.len()],
        cmdline: data.cmdline(),
        direct_map_offset,
        reserved: &reserved,
        // Firmware may have used RAM it reports usable (SeaBIOS does):
        // the frame table is cleared.
        zeroed: false,
        // Boot initialises the first `BOOT_INIT_BYTES`; the net loop does
        // the rest (`memd.deferred_init=off` initialises all at boot).
        deferred_init: true,
    };
    // SAFETY: the regions are the firmware's map, whose usable ranges are
    // RAM; after `read_start_info` copied what it needed, nothing but the
    // kernel image (stack and statics included) and the page tables of
    // `arch::paging` is in use, and both are reserved; `arch::paging::init`
    // mapped every RAM-like range read-write at `direct_map_offset`, and that
    // mapping is never removed (`map_mmio` only adds uncached device windows
    // where nothing was mapped).
    unsafe { mm.init(&info) }
}
