//! Get-free-page flags: what a request may do and where it may be served.

use crate::zone::ZoneType;

/// A set of GFP flags, as in Linux's `gfp_t`.
///
/// `KERNEL` may reclaim (shrink slab caches, drain per-CPU lists) before
/// failing; `ATOMIC` never reclaims but may dip below the `min` watermark
/// into the reserve kept for exactly such callers. A request with neither is
/// Linux's `GFP_NOWAIT`: no reclaim and no reserve.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gfp(u32);

impl Gfp {
    const RECLAIM: u32 = 1 << 0;
    const HIGH: u32 = 1 << 1;
    const ZONE_DMA: u32 = 1 << 2;
    const ZONE_DMA32: u32 = 1 << 3;
    const ZERO_BIT: u32 = 1 << 4;
    const NOWARN_BIT: u32 = 1 << 5;
    const MEMALLOC_BIT: u32 = 1 << 6;
    /// Flags a request from outside (the wire) may carry.
    const ALL: u32 = (1 << 6) - 1;

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
    /// The kernel's own heap (Linux's `__GFP_MEMALLOC`): may use the
    /// reserve below `min` whoever the current owner is. Never accepted
    /// from the wire, so clients cannot take the memory the kernel needs
    /// to keep answering them.
    pub const MEMALLOC: Gfp = Gfp(Self::MEMALLOC_BIT);

    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Parses flags from the wire; unknown bits are rejected.
    pub const fn from_bits(bits: u32) -> Option<Gfp> {
        if bits & !Self::ALL != 0 {
            None
        } else {
            Some(Gfp(bits))
        }
    }

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

impl core::fmt::Debug for Gfp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [
            (Self::RECLAIM, "KERNEL"),
            (Self::HIGH, "ATOMIC"),
            (Self::ZONE_DMA, "DMA"),
            (Self::ZONE_DMA32, "DMA32"),
            (Self::ZERO_BIT, "ZERO"),
            (Self::NOWARN_BIT, "NOWARN"),
            (Self::MEMALLOC_BIT, "MEMALLOC"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("NOWAIT")?;
        }
        Ok(())
    }
}
