//! QEMU's firmware configuration device (fw_cfg), through its legacy I/O
//! ports: a 16-bit selector at 0x510 and an 8-bit data port at 0x511 that
//! reads the selected item one byte at a time. Both `-M microvm` and
//! `-M q35` have it there. Item 0x0000 holds the signature "QEMU"; item
//! 0x0019 is the file directory: a big-endian count, then 64-byte entries
//! (big-endian size, big-endian selector, two reserved bytes, a
//! NUL-padded name of up to 56 bytes). QEMU adds a file for every
//! `-fw_cfg name=NAME,file=PATH`, which is how the host hands the kernel
//! its auth tokens without putting them on a command line.

use crate::arch::{inb, outw};
use alloc::string::String;

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
const SIGNATURE: u16 = 0x0000;
const FILE_DIR: u16 = 0x0019;
/// The bytes of a directory entry, and of the name inside it.
const DIR_ENTRY: usize = 64;
const NAME_LEN: usize = 56;

/// The fw_cfg device, once its signature has been seen.
pub struct FwCfg(());

/// A file in the directory.
#[derive(Clone, Copy, Debug)]
pub struct File {
    pub select: u16,
    pub size: u32,
}

/// Why a file could not give a secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretError {
    /// No file of that name.
    Missing,
    /// The file is larger than the bound given (its size).
    TooLong(u32),
    /// Nothing but whitespace in it.
    Empty,
    /// Not UTF-8 text, or control characters inside.
    NotText,
}

impl core::fmt::Display for SecretError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SecretError::Missing => f.write_str("no such fw_cfg file"),
            SecretError::TooLong(n) => write!(f, "{n} bytes, more than {MAX_SECRET} allowed"),
            SecretError::Empty => f.write_str("empty"),
            SecretError::NotText => f.write_str("not printable UTF-8 text"),
        }
    }
}

/// The largest secret file accepted, in bytes (whitespace included).
pub const MAX_SECRET: usize = 256;

/// Chooses the item the data port reads next.
fn select(key: u16) {
    outw(SELECTOR_PORT, key);
}

fn read(buf: &mut [u8]) {
    for b in buf {
        *b = inb(DATA_PORT);
    }
}

impl FwCfg {
    /// The device, if the signature item reads "QEMU".
    pub fn probe() -> Option<FwCfg> {
        select(SIGNATURE);
        let mut sig = [0u8; 4];
        read(&mut sig);
        (&sig == b"QEMU").then_some(FwCfg(()))
    }

    /// The directory entry named `name`.
    pub fn find(&self, name: &str) -> Option<File> {
        select(FILE_DIR);
        let mut count = [0u8; 4];
        read(&mut count);
        let count = u32::from_be_bytes(count);
        for _ in 0..count {
            let mut entry = [0u8; DIR_ENTRY];
            read(&mut entry);
            if let Some(file) = parse_entry(&entry, name) {
                return Some(file);
            }
        }
        None
    }

    /// Reads the first `buf.len()` bytes of `file` (at most its size);
    /// returns how many were read.
    pub fn read_file(&self, file: File, buf: &mut [u8]) -> usize {
        let n = buf.len().min(file.size as usize);
        select(file.select);
        read(&mut buf[..n]);
        n
    }

    /// The text of file `name`, trimmed of surrounding whitespace: at most
    /// [`MAX_SECRET`] bytes, printable (no control characters inside).
    pub fn read_secret(&self, name: &str) -> Result<String, SecretError> {
        let file = self.find(name).ok_or(SecretError::Missing)?;
        if file.size as usize > MAX_SECRET {
            return Err(SecretError::TooLong(file.size));
        }
        let mut buf = [0u8; MAX_SECRET];
        let n = self.read_file(file, &mut buf);
        secret_text(&buf[..n])
    }
}

/// The file in a directory entry, if it is named `name`.
fn parse_entry(entry: &[u8; DIR_ENTRY], name: &str) -> Option<File> {
    let raw = &entry[8..8 + NAME_LEN];
    let len = raw.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    (&raw[..len] == name.as_bytes()).then(|| File {
        size: u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]),
        select: u16::from_be_bytes([entry[4], entry[5]]),
    })
}

/// `bytes` as trimmed text, refused when empty or not printable.
fn secret_text(bytes: &[u8]) -> Result<String, SecretError> {
    let text = core::str::from_utf8(bytes).map_err(|_| SecretError::NotText)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::Empty);
    }
    if text.chars().any(char::is_control) {
        return Err(SecretError::NotText);
    }
    Ok(String::from(text))
}
