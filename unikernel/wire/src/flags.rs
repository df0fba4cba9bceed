//! Flag sets carried on the wire: GFP flags, slab cache flags, DMA masks.
//!
//! These mirror Linux's names. The service translates them to memd-mm's own
//! types; unknown bits are rejected there with `EINVAL`.

use core::fmt;

use serde::{Deserialize, Serialize};

macro_rules! flag_set {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $flag:ident = $bit:expr),* $(,)? } default $default:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        pub struct $name(pub u32);

        impl $name {
            $($(#[$fm])* pub const $flag: $name = $name($bit);)*
            /// Every defined flag, with its name.
            pub const NAMED: &'static [(&'static str, $name)] = &[$((stringify!($flag), $name::$flag)),*];
            /// All defined bits.
            pub const ALL: u32 = 0 $(| $bit)*;

            /// The raw bits.
            pub const fn bits(self) -> u32 {
                self.0
            }

            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// Bits set here that no flag defines.
            pub const fn unknown_bits(self) -> u32 {
                self.0 & !Self::ALL
            }

            /// Parse `"A|B"` (case-insensitive names, `|` or `,` separated,
            /// or a number).
            pub fn parse(s: &str) -> Option<$name> {
                let s = s.trim();
                if let Some(hex) = s.strip_prefix("0x") {
                    return u32::from_str_radix(hex, 16).ok().map($name);
                }
                if let Ok(n) = s.parse::<u32>() {
                    return Some($name(n));
                }
                let mut bits = 0;
                for part in s.split(|c| c == '|' || c == ',') {
                    let part = part.trim();
                    if part.is_empty() || part.eq_ignore_ascii_case($default) {
                        continue;
                    }
                    let (_, f) = Self::NAMED.iter().find(|(n, _)| n.eq_ignore_ascii_case(part)
                        || part.len() > 4 && part[..4].eq_ignore_ascii_case("GFP_") && n.eq_ignore_ascii_case(&part[4..])
                        || part.len() > 5 && part[..5].eq_ignore_ascii_case("SLAB_") && n.eq_ignore_ascii_case(&part[5..]))?;
                    bits |= f.0;
                }
                Some($name(bits))
            }
        }

        impl core::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut first = true;
                for (n, flag) in Self::NAMED {
                    if self.contains(*flag) && flag.0 != 0 {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(n)?;
                        first = false;
                    }
                }
                let unknown = self.unknown_bits();
                if unknown != 0 {
                    if !first {
                        f.write_str("|")?;
                    }
                    write!(f, "{unknown:#x}")?;
                    first = false;
                }
                if first {
                    f.write_str($default)?;
                }
                Ok(())
            }
        }
    };
}

flag_set! {
    /// GFP flags (Linux `gfp_t`). No flag at all is `NOWAIT`: no reclaim,
    /// no reserve.
    Gfp {
        /// May reclaim (shrink caches, drain per-CPU lists) before failing.
        KERNEL = 1 << 0,
        /// Never reclaims; may dip below the `min` watermark.
        ATOMIC = 1 << 1,
        /// Only ZONE_DMA (below 16 MiB).
        DMA = 1 << 2,
        /// ZONE_DMA32 or below (below 4 GiB).
        DMA32 = 1 << 3,
        /// Zeroed memory.
        ZERO = 1 << 4,
        /// Do not count the failure as a warning.
        NOWARN = 1 << 5,
    } default "NOWAIT"
}

flag_set! {
    /// Slab cache creation flags (Linux `SLAB_*`).
    SlabFlags {
        /// Align objects to the hardware cache line.
        HWCACHE_ALIGN = 1 << 0,
        /// Poison free objects and check the poison on allocation.
        POISON = 1 << 1,
        /// Guard bytes around each object, checked on free.
        RED_ZONE = 1 << 2,
    } default "NONE"
}

/// The address limit a DMA buffer must sit under (a device's DMA mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DmaMask {
    /// Below 16 MiB (ISA-style devices).
    Bits24,
    /// Below 4 GiB.
    Bits32,
    /// Anywhere.
    Bits64,
}

impl DmaMask {
    /// The mask width in bits.
    pub const fn bits(self) -> u32 {
        match self {
            DmaMask::Bits24 => 24,
            DmaMask::Bits32 => 32,
            DmaMask::Bits64 => 64,
        }
    }

    /// The mask for a width of 24, 32 or 64 bits.
    pub const fn from_bits(bits: u32) -> Option<DmaMask> {
        match bits {
            24 => Some(DmaMask::Bits24),
            32 => Some(DmaMask::Bits32),
            64 => Some(DmaMask::Bits64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn gfp_parse_and_print() {
        assert_eq!(Gfp::parse("KERNEL|ZERO"), Some(Gfp::KERNEL | Gfp::ZERO));
        assert_eq!(
            Gfp::parse("gfp_atomic, dma32"),
            Some(Gfp::ATOMIC | Gfp::DMA32)
        );
        assert_eq!(Gfp::parse("nowait"), Some(Gfp(0)));
        assert_eq!(Gfp::parse("0x3"), Some(Gfp(3)));
        assert_eq!(Gfp::parse("BOGUS"), None);
        assert_eq!((Gfp::KERNEL | Gfp::ZERO).to_string(), "KERNEL|ZERO");
        assert_eq!(Gfp(0).to_string(), "NOWAIT");
        assert_eq!(Gfp(1 << 20).unknown_bits(), 1 << 20);
        assert_eq!(
            SlabFlags::parse("SLAB_HWCACHE_ALIGN|poison"),
            Some(SlabFlags::HWCACHE_ALIGN | SlabFlags::POISON)
        );
    }

    #[test]
    fn dma_mask_bits() {
        for m in [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64] {
            assert_eq!(DmaMask::from_bits(m.bits()), Some(m));
        }
        assert_eq!(DmaMask::from_bits(31), None);
    }
}
