//! Get-free-page flags: what a request may do and where it may be served.

use crate::flag_names;
use crate::zone::ZoneType;

/// A set of GFP flags, as in Linux's `gfp_t`.
///
/// `KERNEL` may reclaim (shrink slab caches, drain per-CPU lists) before
/// failing; `ATOMIC` never reclaims but may dip below the `min` watermark
/// into the reserve kept for exactly such callers. A request with neither is
/// Linux's `GFP_NOWAIT`: no reclaim and no reserve.
///
/// Shared with the protocol: memd-wire re-exports it and requests carry it
/// as its `u32`, so a decoded `Gfp` may hold any bits. Whoever takes one
/// from outside passes it through [`Gfp::from_bits`], which refuses unknown
/// bits and the kernel's own [`Gfp::MEMALLOC`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Gfp(pub u32);

impl Gfp {
    const RECLAIM: u32 = 1 << 0;
    const HIGH: u32 = 1 << 1;
    const ZONE_DMA: u32 = 1 << 2;
    const ZONE_DMA32: u32 = 1 << 3;
    const ZERO_BIT: u32 = 1 << 4;
    const NOWARN_BIT: u32 = 1 << 5;
    const MEMALLOC_BIT: u32 = 1 << 6;
    const MOVABLE_BIT: u32 = 1 << 7;
    /// Flags a request from outside (the wire) may carry.
    const ALL: u32 = ((1 << 6) - 1) | Self::MOVABLE_BIT;
    /// Every flag with its name, MEMALLOC last.
    const NAMES: &'static [(&'static str, Gfp)] = &[
        ("KERNEL", Gfp::KERNEL),
        ("ATOMIC", Gfp::ATOMIC),
        ("DMA", Gfp::DMA),
        ("DMA32", Gfp::DMA32),
        ("ZERO", Gfp::ZERO),
        ("NOWARN", Gfp::NOWARN),
        ("MOVABLE", Gfp::MOVABLE),
        ("MEMALLOC", Gfp::MEMALLOC),
    ];
    /// Every flag a request may carry, with its name (not MEMALLOC, which
    /// is the kernel's own).
    pub const NAMED: &'static [(&'static str, Gfp)] = Self::NAMES.split_at(Self::NAMES.len() - 1).0;

    /// Normal kernel allocation: may reclaim.
    pub const KERNEL: Gfp = Gfp(Self::RECLAIM);
    /// Cannot sleep or reclaim; may use the reserve below `min`.
    pub const ATOMIC: Gfp = Gfp(Self::HIGH);
    /// No reclaim, no reserve.
    pub const NOWAIT: Gfp = Gfp(0);
    /// Serve from ZONE_DMA only (below 16 MiB).
    pub const DMA: Gfp = Gfp(Self::ZONE_DMA);
    /// Serve from ZONE_DMA32 or below (below 4 GiB).
    pub const DMA32: Gfp = Gfp(Self::ZONE_DMA32);
    /// Return zeroed memory.
    pub const ZERO: Gfp = Gfp(Self::ZERO_BIT);
    /// Do not count the failure as a warning.
    pub const NOWARN: Gfp = Gfp(Self::NOWARN_BIT);
    /// The memory may be taken back: it may come from ZONE_MOVABLE, memory
    /// plugged at run time that is unplugged once free (Linux's
    /// `__GFP_MOVABLE`). Ignored with DMA or DMA32.
    pub const MOVABLE: Gfp = Gfp(Self::MOVABLE_BIT);
    /// The kernel's own heap (Linux's `__GFP_MEMALLOC`): may use the
    /// reserve below `min` whoever the current owner is. Never accepted
    /// from the wire, so clients cannot take the memory the kernel needs
    /// to keep answering them.
    pub const MEMALLOC: Gfp = Gfp(Self::MEMALLOC_BIT);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from outside (the wire): `None` for unknown bits and for
    /// MEMALLOC, which only the kernel may use.
    pub const fn from_bits(bits: u32) -> Option<Gfp> {
        if bits & !Self::ALL != 0 {
            None
        } else {
            Some(Gfp(bits))
        }
    }

    /// Parses `"KERNEL|ZERO"`: names of [`Gfp::NAMED`], case-insensitive,
    /// with or without `GFP_`, `|` or `,` separated (`NOWAIT` or nothing
    /// for none), or a number. `None` for an unknown name.
    pub fn parse(s: &str) -> Option<Gfp> {
        flag_names::parse(s, Self::NAMED, Gfp::bits, "GFP_", "NOWAIT").map(Gfp)
    }

    /// Both sets' flags.
    pub const fn union(self, other: Gfp) -> Gfp {
        Gfp(self.0 | other.0)
    }

    pub const fn contains(self, other: Gfp) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn without(self, other: Gfp) -> Gfp {
        Gfp(self.0 & !other.0)
    }

    pub const fn can_reclaim(self) -> bool {
        self.0 & Self::RECLAIM != 0
    }

    pub const fn is_atomic(self) -> bool {
        self.0 & Self::HIGH != 0
    }

    pub const fn zero(self) -> bool {
        self.0 & Self::ZERO_BIT != 0
    }

    pub const fn nowarn(self) -> bool {
        self.0 & Self::NOWARN_BIT != 0
    }

    pub const fn memalloc(self) -> bool {
        self.0 & Self::MEMALLOC_BIT != 0
    }

    /// The highest zone this request may use (Linux's `gfp_zone`).
    pub const fn highest_zone(self) -> ZoneType {
        if self.0 & Self::ZONE_DMA != 0 {
            ZoneType::Dma
        } else if self.0 & Self::ZONE_DMA32 != 0 {
            ZoneType::Dma32
        } else if self.0 & Self::MOVABLE_BIT != 0 {
            ZoneType::Movable
        } else {
            ZoneType::Normal
        }
    }
}

impl core::ops::BitOr for Gfp {
    type Output = Gfp;
    fn bitor(self, rhs: Gfp) -> Gfp {
        self.union(rhs)
    }
}

/// Names `|` separated (`KERNEL|ZERO`), unknown bits in hex, `NOWAIT` for
/// none.
impl core::fmt::Display for Gfp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        flag_names::write(f, self.0, Self::NAMES, Gfp::bits, "NOWAIT")
    }
}

impl core::fmt::Debug for Gfp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn parse_and_print() {
        assert_eq!(Gfp::parse("KERNEL|ZERO"), Some(Gfp::KERNEL | Gfp::ZERO));
        assert_eq!(
            Gfp::parse("gfp_atomic, dma32"),
            Some(Gfp::ATOMIC | Gfp::DMA32)
        );
        assert_eq!(Gfp::parse("nowait"), Some(Gfp(0)));
        assert_eq!(Gfp::parse("GFP_NOWAIT"), Some(Gfp(0)));
        assert_eq!(Gfp::parse("0x3"), Some(Gfp(3)));
        assert_eq!(Gfp::parse("BOGUS"), None);
        assert_eq!(Gfp::parse("MEMALLOC"), None, "not a request's flag");
        assert_eq!(Gfp::parse("gfp\u{e9}"), None, "no panic inside a character");
        assert_eq!((Gfp::KERNEL | Gfp::ZERO).to_string(), "KERNEL|ZERO");
        assert_eq!(Gfp(0).to_string(), "NOWAIT");
        assert_eq!(
            (Gfp::MEMALLOC | Gfp(1 << 20)).to_string(),
            "MEMALLOC|0x100000"
        );
        assert_eq!(Gfp::from_bits(Gfp::MEMALLOC.bits()), None);
        assert_eq!(Gfp::NAMED.len(), 7);
        assert_eq!(
            Gfp::parse("KERNEL|MOVABLE").map(Gfp::highest_zone),
            Some(ZoneType::Movable)
        );
        assert_eq!((Gfp::MOVABLE | Gfp::DMA32).highest_zone(), ZoneType::Dma32);
    }
}
