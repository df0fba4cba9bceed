//! Memory hot-plug from the poll loop: the virtio-mem device's requested
//! size, followed a step per pass.
//!
//! - **Growing.** The lowest unplugged blocks, up to [`STEP_BYTES`] a pass:
//!   plugged on the device, mapped in the direct map, then put online in
//!   memd-mm's ZONE_MOVABLE (`online_pages`), where only movable requests
//!   are served.
//! - **Shrinking.** The highest plugged blocks that are wholly free:
//!   taken offline (`offline_pages` refuses memory in use: memd has no
//!   page migration), then unplugged and unmapped. Blocks in use are
//!   skipped; when no free block is left, what is still plugged beyond the
//!   request is the shortfall, and the loop looks again every
//!   [`RETRY_NS`] as clients free memory.
//!
//! The device is unplugged whole at start, as Linux does, so what memd
//! holds is what it plugged. Device requests and mapping run outside the
//! allocator's lock; memd-mm's calls inside it.
//!
//! When a step fails half way (the device refuses to unplug blocks memd
//! took offline and memd cannot put them online again, or refuses to
//! unplug blocks memd could not put online), the blocks are plugged on the
//! device but not memd's: they are kept apart as stranded, and every
//! shrink tries to unplug them first.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use log::{info, warn};
use memd_mm::ZoneType;
use spin::Mutex;

use crate::drivers::hal;
use crate::drivers::virtio_mem::{BlockState, MemConfig, MemDevice};
use crate::ALLOC;

/// Most memory plugged or unplugged in one pass (one 128 MiB section's
/// frame descriptors to initialise), so a pass stays short.
const STEP_BYTES: u64 = 128 << 20;
/// Most blocks looked at for unplugging in one pass.
const SCAN_BLOCKS: usize = 256;
/// How often the requested size is read while it is met (a configuration
/// read is a QEMU exit).
const LOOK_NS: u64 = 20_000_000;
/// How often a shortfall or a device refusal is tried again.
const RETRY_NS: u64 = 1_000_000_000;

/// What the status view shows beside memd-mm's figures.
#[derive(Clone, Copy)]
struct Shown {
    config: MemConfig,
    shortfall: u64,
    error: Option<&'static str>,
}

static SHOWN: Mutex<Option<Shown>> = Mutex::new(None);

/// One bit per block of the region.
struct Blocks(Vec<u64>);

impl Blocks {
    fn get(&self, b: usize) -> bool {
        self.0[b / 64] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, first: usize, n: usize, on: bool) {
        for b in first..first + n {
            if on {
                self.0[b / 64] |= 1 << (b % 64);
            } else {
                self.0[b / 64] &= !(1 << (b % 64));
            }
        }
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|w| w.count_ones() as u64).sum()
    }
}

pub struct Hotplug {
    dev: Option<MemDevice>,
    /// Blocks plugged on the device.
    plugged: Blocks,
    /// Of those, blocks memd-mm does not have online (see the module
    /// comment).
    stranded: Blocks,
    blocks: usize,
    /// Where the next unplug scan starts (block index, scanning down).
    scan_from: usize,
    next_look: u64,
}

impl Hotplug {
    /// Sets the device up: everything unplugged, the region declared to
    /// memd-mm. Without a device, or when that fails (said in the log),
    /// the loop has nothing to do.
    pub fn new(dev: Option<MemDevice>) -> Hotplug {
        let none = Hotplug {
            dev: None,
            plugged: Blocks(Vec::new()),
            stranded: Blocks(Vec::new()),
            blocks: 0,
            scan_from: 0,
            next_look: 0,
        };
        let Some(mut dev) = dev else {
            return none;
        };
        let cfg = dev.config();
        // Plugged memory is mapped and unmapped in 2 MiB pages.
        if cfg.block_size < 2 << 20 || !cfg.addr.is_multiple_of(2 << 20) {
            warn!(
                "hotplug: blocks of {} KiB at {:#x}: memd maps plugged memory in aligned 2 MiB pages; the device is not used",
                cfg.block_size >> 10,
                cfg.addr
            );
            return none;
        }
        if cfg.plugged_size > 0 {
            if let Err(e) = dev.unplug_all() {
                warn!("hotplug: unplug all at start: {e}; the device is not used");
                return none;
            }
        }
        let blocks = (cfg.region_size / cfg.block_size) as usize;
        // Only the usable part of the region has a state to ask about.
        let usable = dev.config().usable_region_size / cfg.block_size;
        match (usable, dev.state(cfg.addr, usable)) {
            (0, _) | (_, Ok(BlockState::Unplugged)) => {}
            (_, other) => {
                warn!("hotplug: the region is not unplugged at start ({other:?}); the device is not used");
                return none;
            }
        }
        let words = blocks.div_ceil(64);
        let (plugged, stranded) = (Blocks(vec![0; words]), Blocks(vec![0; words]));
        if let Err(e) = ALLOC.lock().add_memory_region(cfg.addr, cfg.region_size) {
            warn!("hotplug: memd-mm refused the region: {e}; the device is not used");
            return none;
        }
        info!(
            "hotplug: virtio-mem region [{:#x}-{:#x}) in blocks of {} KiB on {} (features {:#x} of {:#x}), ZONE_MOVABLE",
            cfg.addr,
            cfg.addr + cfg.region_size,
            cfg.block_size >> 10,
            dev.location,
            dev.negotiated,
            dev.offered
        );
        *SHOWN.lock() = Some(Shown {
            config: cfg,
            shortfall: 0,
            error: None,
        });
        Hotplug {
            dev: Some(dev),
            plugged,
            stranded,
            blocks,
            scan_from: blocks,
            next_look: 0,
        }
    }

    /// One pass at `now`: true while there is more to do at once (the loop
    /// then does not halt).
    pub fn pass(&mut self, now: u64) -> bool {
        let Some(dev) = self.dev.as_mut() else {
            return false;
        };
        // A new requested size is looked at at once (the configuration's
        // generation is one register); otherwise every `LOOK_NS`.
        if now < self.next_look && !dev.config_changed() {
            return false;
        }
        let cfg = dev.config();
        let plugged = self.plugged.count() * cfg.block_size;
        // Whole blocks (the specification requires that of the device).
        let requested = cfg.requested_size.min(cfg.region_size) / cfg.block_size * cfg.block_size;
        let (more, error) = if plugged < requested {
            self.grow(&cfg, (requested - plugged).min(STEP_BYTES))
        } else if plugged > requested {
            self.shrink(&cfg, (plugged - requested).min(STEP_BYTES))
        } else {
            (false, None)
        };
        let plugged = self.plugged.count() * cfg.block_size;
        let shortfall = plugged.saturating_sub(requested);
        self.next_look = match (more, error.is_some() || shortfall > 0) {
            (true, _) => now,
            (false, true) => now + RETRY_NS,
            (false, false) => now + LOOK_NS,
        };
        let mut shown = SHOWN.lock();
        if let Some(s) = shown.as_mut() {
            s.config = cfg;
            s.shortfall = if more { 0 } else { shortfall };
            if error.is_some() || plugged == requested {
                s.error = error;
            }
        }
        more
    }

    /// Plugs up to `bytes` of the lowest unplugged blocks in one run;
    /// (plugged any, what failed).
    fn grow(&mut self, cfg: &MemConfig, bytes: u64) -> (bool, Option<&'static str>) {
        let usable = ((cfg.usable_region_size / cfg.block_size) as usize).min(self.blocks);
        let Some(first) = (0..usable).find(|&b| !self.plugged.get(b)) else {
            return (false, Some("no unplugged block in the usable region"));
        };
        let want = (bytes / cfg.block_size).max(1) as usize;
        let n = (first..usable)
            .take(want)
            .take_while(|&b| !self.plugged.get(b))
            .count();
        let (addr, len) = (
            cfg.addr + first as u64 * cfg.block_size,
            n as u64 * cfg.block_size,
        );
        let Some(dev) = self.dev.as_mut() else {
            return (false, None);
        };
        if let Err(e) = dev.plug(addr, n as u64) {
            warn!("hotplug: plug [{addr:#x}+{len:#x}): {e}");
            return (false, Some("the device refused to plug"));
        }
        let failed = match hal::map_ram(addr, len) {
            Err(e) => {
                warn!("hotplug: mapping [{addr:#x}+{len:#x}): {e:?}");
                Some("no page tables to map plugged memory")
            }
            Ok(_) => match ALLOC.lock().online_pages(addr, len) {
                Err(e) => {
                    warn!("hotplug: online [{addr:#x}+{len:#x}): {e}");
                    Some("no memory for the frame descriptors of plugged memory")
                }
                Ok(()) => None,
            },
        };
        self.plugged.set(first, n, true);
        if failed.is_some() {
            let _ = hal::unmap_ram(addr, len);
            self.stranded.set(first, n, true);
            let _ = self.unplug_run(cfg, first, first + n);
        }
        (failed.is_none(), failed)
    }

    /// Unplugs up to `bytes` of plugged blocks that are wholly free,
    /// highest first, looking at [`SCAN_BLOCKS`] blocks at most; (freed
    /// any, what failed).
    fn shrink(&mut self, cfg: &MemConfig, bytes: u64) -> (bool, Option<&'static str>) {
        let want = (bytes / cfg.block_size).max(1) as usize;
        let mut done = 0;
        let mut error = None;
        // The run of blocks taken offline, not unplugged yet: [lo, hi).
        let (mut lo, mut hi) = (0, 0);
        let mut looked = 0;
        if self.scan_from == 0 {
            self.scan_from = self.blocks;
        }
        // Stranded blocks first: they need no taking offline.
        let mut b = self.blocks;
        while b > 0 {
            b -= 1;
            if self.stranded.get(b) {
                let lo = (0..b)
                    .rev()
                    .take_while(|&x| self.stranded.get(x))
                    .last()
                    .unwrap_or(b);
                error = error.or(self.unplug_run(cfg, lo, b + 1));
                b = lo;
            }
        }
        while self.scan_from > 0 && looked < SCAN_BLOCKS && done < want {
            let b = self.scan_from - 1;
            self.scan_from -= 1;
            looked += 1;
            if !self.plugged.get(b) || self.stranded.get(b) {
                continue;
            }
            let addr = cfg.addr + b as u64 * cfg.block_size;
            if ALLOC.lock().offline_pages(addr, cfg.block_size).is_err() {
                continue;
            }
            if hi > lo && b + 1 != lo {
                // Not adjacent to the run: unplug the run, start another.
                error = error.or(self.unplug_run(cfg, lo, hi));
                hi = b + 1;
            } else if hi == lo {
                hi = b + 1;
            }
            lo = b;
            done += 1;
        }
        if hi > lo {
            error = error.or(self.unplug_run(cfg, lo, hi));
        }
        // Go on at once while blocks were freed or the sweep is not over;
        // a sweep that reached the bottom starts again from the top.
        let more = (done > 0 && error.is_none()) || (self.scan_from > 0 && looked == SCAN_BLOCKS);
        if self.scan_from == 0 {
            self.scan_from = self.blocks;
        }
        (more, error)
    }

    /// Unplugs blocks `[lo, hi)`, offline already; on a refusal, blocks
    /// memd had online go back online, or else are stranded.
    fn unplug_run(&mut self, cfg: &MemConfig, lo: usize, hi: usize) -> Option<&'static str> {
        let (addr, len) = (
            cfg.addr + lo as u64 * cfg.block_size,
            (hi - lo) as u64 * cfg.block_size,
        );
        let dev = self.dev.as_mut()?;
        if let Err(e) = dev.unplug(addr, (hi - lo) as u64) {
            warn!("hotplug: unplug [{addr:#x}+{len:#x}): {e}");
            if !self.stranded.get(lo) && ALLOC.lock().online_pages(addr, len).is_err() {
                self.stranded.set(lo, hi - lo, true);
            }
            return Some("the device refused to unplug");
        }
        let _ = hal::unmap_ram(addr, len);
        self.plugged.set(lo, hi - lo, false);
        self.stranded.set(lo, hi - lo, false);
        None
    }
}

/// The status view's hot-plug figures; `None` without a device.
/// Allocates: call it outside the allocator's lock.
pub fn snapshot() -> Option<memd_wire::Hotplug> {
    let shown = (*SHOWN.lock())?;
    let (region, used) = {
        let mm = ALLOC.lock();
        let z = &mm.zoneinfo()[ZoneType::Movable as usize];
        (
            mm.hotplug_region()?,
            z.managed.saturating_sub(z.free + z.pcp_count),
        )
    };
    let c = shown.config;
    Some(memd_wire::Hotplug {
        region_start: c.addr,
        region_size: c.region_size,
        block_size: c.block_size,
        requested_bytes: c.requested_size,
        plugged_bytes: region.plugged,
        used_bytes: used * memd_mm::PAGE_SIZE,
        shortfall_bytes: shown.shortfall,
        memmap_bytes: region.memmap_bytes,
        error: shown.error.map(String::from),
    })
}
