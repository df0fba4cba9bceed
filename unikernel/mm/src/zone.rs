//! Zones: physical address ranges with their own free lists and watermarks.
//!
//! As on x86-64 Linux: ZONE_DMA below 16 MiB (ISA devices, 24-bit masks),
//! ZONE_DMA32 below 4 GiB (32-bit masks), ZONE_NORMAL above, and
//! ZONE_MOVABLE for memory plugged at run time (`memory_hotplug.rs`): only
//! requests that say `MOVABLE` are served there, so that what it holds can
//! be freed and the memory given back.

use crate::frame::{Frame, FrameState};
use crate::list::FrameList;
use crate::pcp::Pcp;

pub const DMA_LIMIT: u64 = 16 << 20;
pub const DMA32_LIMIT: u64 = 4 << 30;
pub const NR_ZONES: usize = 4;
/// The most free-list orders `memd.max_order=` may ask for (order 17 =
/// 512 MiB blocks).
pub const MAX_ORDER_LIMIT: usize = 18;
/// Linux's default: 11 lists, orders 0..=10, 4 MiB blocks.
pub const DEFAULT_MAX_ORDER: usize = 11;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ZoneType {
    Dma = 0,
    Dma32 = 1,
    Normal = 2,
    Movable = 3,
}

/// The zone a frame carries in its flags.
impl Frame {
    /// The zone this frame belongs to.
    #[inline(always)]
    pub fn zone(&self) -> ZoneType {
        ZoneType::from_index(self.zone_index())
    }

    /// Makes this frame the head of a block of `order` in `zone`.
    #[inline(always)]
    pub fn set(&mut self, state: FrameState, zone: ZoneType, order: u32) {
        self.set_head(state, zone as u8, order);
    }
}

impl ZoneType {
    pub const ALL: [ZoneType; NR_ZONES] = [
        ZoneType::Dma,
        ZoneType::Dma32,
        ZoneType::Normal,
        ZoneType::Movable,
    ];

    pub const fn from_index(i: usize) -> ZoneType {
        match i {
            0 => ZoneType::Dma,
            1 => ZoneType::Dma32,
            2 => ZoneType::Normal,
            _ => ZoneType::Movable,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ZoneType::Dma => "DMA",
            ZoneType::Dma32 => "DMA32",
            ZoneType::Normal => "Normal",
            ZoneType::Movable => "Movable",
        }
    }

    /// The zone a frame of boot memory belongs to (memory plugged at run
    /// time is Movable wherever it is).
    #[inline(always)]
    pub const fn of_pfn(pfn: u64) -> ZoneType {
        let addr = pfn << 12;
        if addr < DMA_LIMIT {
            ZoneType::Dma
        } else if addr < DMA32_LIMIT {
            ZoneType::Dma32
        } else {
            ZoneType::Normal
        }
    }

    /// Physical address range `[start, end)` the zone may span.
    pub const fn span(self) -> (u64, u64) {
        match self {
            ZoneType::Dma => (0, DMA_LIMIT),
            ZoneType::Dma32 => (DMA_LIMIT, DMA32_LIMIT),
            ZoneType::Normal => (DMA32_LIMIT, u64::MAX),
            ZoneType::Movable => (0, u64::MAX),
        }
    }
}

/// Watermarks in pages (Linux's `pages_min/low/high`). Shared with the
/// protocol: memd-wire's `ZoneInfo` carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Watermarks {
    /// `min`: after reclaim a request may take the zone down to this; only
    /// the kernel's own requests go below it (to a quarter of it).
    pub min: u64,
    /// `low`: a first attempt keeps the zone above this (`min * 5/4`).
    pub low: u64,
    /// `high` (`min * 3/2`), as Linux reports it; memd has no kswapd to
    /// reclaim up to it.
    pub high: u64,
}

/// Which watermark a request must stay above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// What a balloon takes: only memory above `high`.
    High,
    Low,
    Min,
    /// ATOMIC requests: a quarter of `min`.
    Atomic,
}

/// Event counters per zone (the interesting lines of /proc/vmstat).
/// Shared with the protocol: memd-wire's `ZoneInfo` carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ZoneCounters {
    /// Successful allocations.
    pub alloc_success: u64,
    /// Failed allocations.
    pub alloc_fail: u64,
    /// Allocations served below `min` (ATOMIC reserve).
    pub atomic_reserve_used: u64,
    /// Allocations that fell back to this zone from a higher one.
    pub fallback: u64,
    /// Per-CPU list refills from the buddy.
    pub pcp_refill: u64,
    /// Per-CPU list drains back to the buddy.
    pub pcp_drain: u64,
}

/// Buddy free list of one order.
#[derive(Clone, Copy, Debug, Default)]
pub struct FreeArea {
    pub list: FrameList,
}

pub struct Zone {
    pub ty: ZoneType,
    /// First and one-past-last frame the zone's managed memory touches.
    pub start_pfn: u64,
    pub end_pfn: u64,
    /// Frames handed to the buddy at boot (Linux's managed_pages).
    pub managed: u64,
    /// Frames on the buddy free lists.
    pub free: u64,
    /// Free frames taken off the lists while the host is told about them.
    pub isolated: u64,
    /// Free frames on the lists in blocks reported to the host (Linux's
    /// `zone->reported_pages`): counted as blocks are marked, uncounted as
    /// marked blocks leave the lists.
    pub reported: u64,
    /// Frames in the balloon (the host's, on its request).
    pub balloon: u64,
    pub free_area: [FreeArea; MAX_ORDER_LIMIT],
    pub watermark: Watermarks,
    /// Pages this zone keeps back from requests that could have been served
    /// by a higher zone, indexed by that request's highest zone.
    pub lowmem_reserve: [u64; NR_ZONES],
    pub pcp: Pcp,
    pub counters: ZoneCounters,
}

impl Zone {
    pub const fn new(ty: ZoneType) -> Self {
        Zone {
            ty,
            start_pfn: 0,
            end_pfn: 0,
            managed: 0,
            free: 0,
            isolated: 0,
            reported: 0,
            balloon: 0,
            free_area: [FreeArea {
                list: FrameList::new(),
            }; MAX_ORDER_LIMIT],
            watermark: Watermarks {
                min: 0,
                low: 0,
                high: 0,
            },
            lowmem_reserve: [0; NR_ZONES],
            pcp: Pcp::new(),
            counters: ZoneCounters {
                alloc_success: 0,
                alloc_fail: 0,
                atomic_reserve_used: 0,
                fallback: 0,
                pcp_refill: 0,
                pcp_drain: 0,
            },
        }
    }

    pub fn is_populated(&self) -> bool {
        self.managed > 0
    }

    /// The level of free pages an allocation of `order` must leave behind.
    pub fn mark_pages(&self, mark: Mark, highest: ZoneType) -> u64 {
        let base = match mark {
            Mark::High => self.watermark.high,
            Mark::Low => self.watermark.low,
            Mark::Min => self.watermark.min,
            Mark::Atomic => self.watermark.min / 4,
        };
        base + self.lowmem_reserve[highest as usize]
    }

    /// Linux's `zone_watermark_ok`: free pages after taking `1 << order`
    /// stay above the mark, and a block of the order exists.
    pub fn watermark_ok(&self, order: u32, mark: Mark, highest: ZoneType) -> bool {
        let need = 1u64 << order;
        self.free >= need && self.free - need >= self.mark_pages(mark, highest)
    }
}

/// Linux's `min_free_kbytes` rule: `sqrt(lowmem_kbytes * 16)`, clamped to
/// 128 KiB .. 256 MiB, shared among the kernel's zones by size; low =
/// min * 5/4, high = min * 3/2. ZONE_MOVABLE is not lowmem: plugging
/// memory leaves the kernel's reserve as it was, and the zone gets a small
/// `min` of its own, 1/1024 of it within 32..=128 pages (Linux's rule for
/// zones the kernel cannot use).
pub fn set_watermarks(zones: &mut [Zone; NR_ZONES]) {
    let lowmem = |z: &Zone| z.ty != ZoneType::Movable;
    let total: u64 = zones.iter().filter(|z| lowmem(z)).map(|z| z.managed).sum();
    if total == 0 {
        return;
    }
    let kbytes = total * 4;
    let min_free_kbytes = isqrt(kbytes * 16).clamp(128, 256 * 1024);
    let min_free_pages = min_free_kbytes / 4;
    for zone in zones.iter_mut() {
        let min = match zone.ty {
            ZoneType::Movable if zone.managed == 0 => 0,
            ZoneType::Movable => (zone.managed / 1024).clamp(32, 128),
            _ => min_free_pages * zone.managed / total,
        };
        zone.watermark = Watermarks {
            min,
            low: min + min / 4,
            high: min + min / 2,
        };
    }
    // lowmem_reserve_ratio: 256 for DMA and DMA32 (Linux's defaults): a
    // lower zone keeps 1/256 of the memory above it back from requests that
    // could have used that higher memory.
    for lower in 0..NR_ZONES {
        for highest in 0..NR_ZONES {
            let above: u64 = if highest > lower {
                zones[lower + 1..=highest].iter().map(|z| z.managed).sum()
            } else {
                0
            };
            zones[lower].lowmem_reserve[highest] = above / 256;
        }
    }
}

/// Each zonelist's first populated zone (Linux's preferred zone), by the
/// request's highest zone: a Normal request on a machine without Normal
/// memory starts at DMA32, a Movable one without plugged memory at Normal.
pub fn preferred_zones(zones: &[Zone; NR_ZONES]) -> [ZoneType; NR_ZONES] {
    ZoneType::ALL.map(|highest| {
        ZoneType::ALL[..=highest as usize]
            .iter()
            .rev()
            .copied()
            .find(|&z| zones[z as usize].is_populated())
            .unwrap_or(highest)
    })
}

fn isqrt(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let mut x = n;
    let mut y = x.div_ceil(2);
    while y < x {
        x = y;
        y = (x + n / x) / 2;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isqrt_matches_float() {
        for n in [0u64, 1, 2, 3, 4, 15, 16, 17, 1 << 40, 123_456_789] {
            let r = isqrt(n);
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "{n}");
        }
    }

    #[test]
    fn zone_of_pfn_follows_limits() {
        assert_eq!(ZoneType::of_pfn((DMA_LIMIT >> 12) - 1), ZoneType::Dma);
        assert_eq!(ZoneType::of_pfn(DMA_LIMIT >> 12), ZoneType::Dma32);
        assert_eq!(ZoneType::of_pfn((DMA32_LIMIT >> 12) - 1), ZoneType::Dma32);
        assert_eq!(ZoneType::of_pfn(DMA32_LIMIT >> 12), ZoneType::Normal);
    }

    #[test]
    fn watermarks_grow_with_size_and_reserve_protects_lower_zones() {
        let mut zones = [
            Zone::new(ZoneType::Dma),
            Zone::new(ZoneType::Dma32),
            Zone::new(ZoneType::Normal),
            Zone::new(ZoneType::Movable),
        ];
        zones[0].managed = 3840;
        zones[1].managed = 1 << 18;
        zones[2].managed = 1 << 19;
        set_watermarks(&mut zones);
        for z in &zones[..3] {
            assert!(z.watermark.min < z.watermark.low && z.watermark.low < z.watermark.high);
        }
        assert!(zones[2].watermark.min > zones[1].watermark.min);
        assert_eq!(zones[0].lowmem_reserve[0], 0);
        assert_eq!(zones[0].lowmem_reserve[2], ((1 << 18) + (1 << 19)) / 256);
        assert_eq!(zones[1].lowmem_reserve[2], (1 << 19) / 256);
        assert_eq!(zones[2].lowmem_reserve, [0, 0, 0, 0]);
        assert_eq!(
            zones[3].watermark,
            Watermarks::default(),
            "no memory plugged"
        );
        let normal = zones[2].watermark;
        zones[3].managed = 1 << 19;
        set_watermarks(&mut zones);
        assert_eq!(
            zones[2].watermark, normal,
            "plugging leaves the kernel's reserve"
        );
        assert_eq!(zones[3].watermark.min, 128);
        assert_eq!(zones[2].lowmem_reserve[3], (1 << 19) / 256);
        assert_eq!(zones[0].lowmem_reserve[3], ((1 << 18) + (1 << 20)) / 256);
    }
}
