//! QEMU's floor: a PVH kernel whose first instruction ends QEMU through
//! `isa-debug-exit`. Timed from QEMU's start to its exit, it is what any
//! kernel pays before its own first instruction on this machine, for a
//! given guest size: memd's boot is reported beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where the image is loaded, as memd's own (1 MiB).
const LOAD: u64 = 0x10_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const PHYS32_ENTRY: u32 = 18;

/// The 32-bit entry: `mov al, 0x10; out 0xf4, al` (QEMU exits with
/// `GUEST_SUCCESS`), then `hlt` in a loop should the device be missing.
const CODE: [u8; 7] = [0xb0, 0x10, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];

/// The ELF image: header, a load segment and a note segment, the note
/// (the entry point) and the code.
pub fn image() -> Vec<u8> {
    let note_off = EHDR + 2 * PHDR;
    let note_len = 4 + 4 + 4 + 4 + 8;
    let code_off = note_off + note_len;
    let size = code_off + CODE.len();
    let entry = LOAD + code_off as u64;
    let mut e = Vec::with_capacity(size);
    // e_ident: ELF, 64-bit, little-endian, version 1.
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&entry.to_le_bytes());
    e.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&(EHDR as u16).to_le_bytes());
    e.extend_from_slice(&(PHDR as u16).to_le_bytes());
    e.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // PT_LOAD, read + execute: the whole file at LOAD.
    phdr(&mut e, 1, 5, 0, LOAD, size as u64, 0x1000);
    // PT_NOTE: the Xen note with the entry point.
    phdr(
        &mut e,
        4,
        4,
        note_off as u64,
        LOAD + note_off as u64,
        note_len as u64,
        4,
    );
    e.extend_from_slice(&4u32.to_le_bytes()); // namesz
    e.extend_from_slice(&8u32.to_le_bytes()); // descsz
    e.extend_from_slice(&PHYS32_ENTRY.to_le_bytes());
    e.extend_from_slice(b"Xen\0");
    e.extend_from_slice(&entry.to_le_bytes());
    e.extend_from_slice(&CODE);
    debug_assert_eq!(e.len(), size);
    e
}

fn phdr(e: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, len: u64, align: u64) {
    e.extend_from_slice(&kind.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    for v in [off, addr, addr, len, len, align] {
        e.extend_from_slice(&v.to_le_bytes());
    }
}

/// Writes the image under `dir` and returns its path.
pub fn write(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("floor.elf");
    std::fs::write(&path, image()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_image_is_an_elf_whose_note_points_at_its_code() {
        let e = super::image();
        assert_eq!(&e[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(e[24..32].try_into().unwrap());
        let note_entry = u64::from_le_bytes(e[e.len() - 15..e.len() - 7].try_into().unwrap());
        assert_eq!(entry, note_entry);
        assert_eq!(entry - super::LOAD, (e.len() - super::CODE.len()) as u64);
    }
}
