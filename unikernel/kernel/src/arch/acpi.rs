//! The CPUs from ACPI's MADT (Linux's `acpi_parse_madt`): the RSDP from
//! PVH's start info (QEMU's PVH option ROM finds it; else the BIOS area is
//! searched, as Linux does), then the RSDT or XSDT, then the "APIC" table's
//! processor local APIC entries. Tables are read through the direct map,
//! which covers everything below 4 GiB where firmware puts them.

use super::paging::DIRECT_MAP_OFFSET;
use super::percpu::MAX_CPUS;

/// The enabled CPUs' local APIC ids, in MADT order.
pub struct Cpus {
    pub apic_ids: [u8; MAX_CPUS],
    pub count: usize,
    /// Enabled CPUs beyond [`MAX_CPUS`], left out.
    pub left_out: usize,
}

impl Cpus {
    pub fn ids(&self) -> &[u8] {
        &self.apic_ids[..self.count]
    }
}

fn byte(phys: u64) -> u8 {
    // SAFETY: callers pass addresses below 4 GiB (checked where they come
    // from the tables), all of which the direct map covers (RAM write-back,
    // the rest uncached); reading them has no side effects on firmware
    // tables' memory.
    unsafe { core::ptr::read_volatile((DIRECT_MAP_OFFSET + phys) as *const u8) }
}

fn u32_at(phys: u64) -> u32 {
    u32::from_le_bytes([byte(phys), byte(phys + 1), byte(phys + 2), byte(phys + 3)])
}

fn u64_at(phys: u64) -> u64 {
    u32_at(phys) as u64 | (u32_at(phys + 4) as u64) << 32
}

fn sums_to_zero(phys: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(byte(phys + i))) == 0
}

fn signature(phys: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &b)| byte(phys + i as u64) == b)
}

const FOUR_GIB: u64 = 1 << 32;

/// The RSDP: at `hint` when it is one, else the first in the BIOS area.
fn rsdp(hint: u64) -> Option<u64> {
    let valid =
        |p: u64| p != 0 && p < FOUR_GIB - 36 && signature(p, b"RSD PTR ") && sums_to_zero(p, 20);
    if valid(hint) {
        return Some(hint);
    }
    (0xe_0000..0x10_0000).step_by(16).find(|&p| valid(p))
}

/// A system description table at `phys` with signature `sig`, checked.
fn table(phys: u64, sig: &[u8; 4]) -> Option<u64> {
    if phys == 0 || phys >= FOUR_GIB - 36 || !signature(phys, sig) {
        return None;
    }
    let len = u32_at(phys + 4) as u64;
    (len >= 36 && phys + len < FOUR_GIB && sums_to_zero(phys, len)).then_some(phys)
}

/// The MADT's enabled processors.
pub fn cpus(rsdp_hint: u64) -> Result<Cpus, &'static str> {
    let rsdp = rsdp(rsdp_hint).ok_or("no ACPI RSDP")?;
    // ACPI 2.0+: the XSDT's 64-bit entries; else the RSDT's 32-bit ones.
    let (root, entry) = match byte(rsdp + 15) {
        0 => (table(u32_at(rsdp + 16) as u64, b"RSDT"), 4),
        _ => (table(u64_at(rsdp + 24), b"XSDT"), 8),
    };
    let root = root.ok_or("the RSDT/XSDT is missing or corrupt")?;
    let entries = (u32_at(root + 4) as u64 - 36) / entry;
    let madt = (0..entries)
        .map(|i| {
            let at = root + 36 + i * entry;
            if entry == 4 {
                u32_at(at) as u64
            } else {
                u64_at(at)
            }
        })
        .find_map(|p| table(p, b"APIC"))
        .ok_or("no MADT")?;
    let end = madt + u32_at(madt + 4) as u64;
    let mut cpus = Cpus {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        left_out: 0,
    };
    // Entries follow the local APIC address and flags.
    let mut at = madt + 44;
    while at + 2 <= end {
        let (kind, len) = (byte(at), byte(at + 1) as u64);
        if len < 2 || at + len > end {
            return Err("a MADT entry runs past the table");
        }
        // Type 0: processor local APIC (uid, APIC id, flags: bit 0 enabled).
        if kind == 0 && len >= 8 && u32_at(at + 4) & 1 != 0 {
            if cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = byte(at + 3);
                cpus.count += 1;
            } else {
                cpus.left_out += 1;
            }
        }
        at += len;
    }
    if cpus.count == 0 {
        return Err("the MADT lists no enabled CPU");
    }
    Ok(cpus)
}
