//! The kernel command-line options memd-mm understands.
//!
//! - `memd.dma_reserve=SIZE[@dma|@dma32|@normal]`: reserve a physically
//!   contiguous region at boot for large DMA buffers (Linux's
//!   `cma=SIZE[@START[-END]]`), served by [`crate::cma`].
//! - `memmap=SIZE$ADDR`: a hole; the range is never used.
//! - `memd.max_order=N`: number of buddy free lists (orders `0..N`).
//! - `memd.deferred_init=on|off`: initialise only the start of memory at
//!   boot and the rest afterwards (`deferred.rs`); the kernel's default is
//!   on, the host arena's off.
//!
//! Sizes take Linux's `memparse` suffixes K, M, G, T (powers of 1024).

use crate::zone::{ZoneType, MAX_ORDER_LIMIT};
use crate::MmError;

pub const MAX_HOLES: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaReserve {
    pub size: u64,
    pub zone: ZoneType,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmOptions {
    pub dma_reserve: Option<DmaReserve>,
    pub holes: [(u64, u64); MAX_HOLES],
    pub nr_holes: usize,
    pub max_order: Option<usize>,
    /// `memd.deferred_init=on|off`, when given.
    pub deferred_init: Option<bool>,
}

impl MmOptions {
    pub fn holes(&self) -> &[(u64, u64)] {
        &self.holes[..self.nr_holes]
    }

    /// Parses the options memd-mm knows and ignores all others (they belong
    /// to the kernel or the service).
    pub fn parse(cmdline: &str) -> Result<MmOptions, MmError> {
        let mut opts = MmOptions::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "memd.dma_reserve" => {
                    let (size, zone) = match value.split_once('@') {
                        Some((s, z)) => (s, parse_zone(z)?),
                        None => (value, ZoneType::Dma32),
                    };
                    let size = parse_size(size)?;
                    if size == 0 {
                        return Err(MmError::Invalid("memd.dma_reserve: size is zero"));
                    }
                    opts.dma_reserve = Some(DmaReserve { size, zone });
                }
                "memmap" => {
                    let Some((size, addr)) = value.split_once('$') else {
                        return Err(MmError::Invalid("memmap: expected SIZE$ADDR"));
                    };
                    let size = parse_size(size)?;
                    let addr = parse_size(addr)?;
                    if opts.nr_holes == MAX_HOLES {
                        return Err(MmError::Invalid("memmap: too many holes"));
                    }
                    let end = addr
                        .checked_add(size)
                        .ok_or(MmError::Invalid("memmap: range overflows"))?;
                    opts.holes[opts.nr_holes] = (addr, end);
                    opts.nr_holes += 1;
                }
                "memd.max_order" => {
                    let n = parse_size(value)? as usize;
                    if !(1..=MAX_ORDER_LIMIT).contains(&n) {
                        return Err(MmError::Invalid("memd.max_order: must be 1..=18"));
                    }
                    opts.max_order = Some(n);
                }
                "memd.deferred_init" => {
                    opts.deferred_init = Some(match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(MmError::Invalid("memd.deferred_init: on or off")),
                    });
                }
                _ => {}
            }
        }
        Ok(opts)
    }
}

fn parse_zone(s: &str) -> Result<ZoneType, MmError> {
    match s {
        "dma" | "DMA" => Ok(ZoneType::Dma),
        "dma32" | "DMA32" => Ok(ZoneType::Dma32),
        "normal" | "Normal" => Ok(ZoneType::Normal),
        _ => Err(MmError::Invalid(
            "memd.dma_reserve: zone must be dma, dma32 or normal",
        )),
    }
}

/// Linux's `memparse`: decimal or 0x-hex, optional K/M/G/T suffix.
pub fn parse_size(s: &str) -> Result<u64, MmError> {
    const BAD: MmError = MmError::Invalid("bad size: expected NUMBER[K|M|G|T]");
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        Some(b't' | b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).map_err(|_| BAD)?
    } else {
        digits.parse::<u64>().map_err(|_| BAD)?
    };
    value.checked_mul(1 << shift).ok_or(BAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("0x1000").unwrap(), 0x1000);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn options() {
        let o = MmOptions::parse(
            "console=ttyS0 memd.dma_reserve=256M@dma32 memmap=1M$0x2000000 memd.max_order=12 memd.port=5555",
        )
        .unwrap();
        assert_eq!(
            o.dma_reserve,
            Some(DmaReserve {
                size: 256 << 20,
                zone: ZoneType::Dma32
            })
        );
        assert_eq!(o.holes(), &[(0x2000000, 0x2100000)]);
        assert_eq!(o.max_order, Some(12));
        let o = MmOptions::parse("memd.dma_reserve=8M@dma").unwrap();
        assert_eq!(o.dma_reserve.unwrap().zone, ZoneType::Dma);
        let o = MmOptions::parse("memd.dma_reserve=8M").unwrap();
        assert_eq!(o.dma_reserve.unwrap().zone, ZoneType::Dma32);
        assert!(MmOptions::parse("memd.dma_reserve=8M@node3").is_err());
        assert!(MmOptions::parse("memd.max_order=0").is_err());
        assert!(MmOptions::parse("memd.max_order=19").is_err());
        assert!(MmOptions::parse("memmap=4K").is_err());
    }
}
