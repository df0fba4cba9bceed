//! virtio-balloon: the host's target and free page reporting.
//!
//! - **Target.** The host sets `num_pages` in the device's configuration;
//!   memd inflates by taking 2 MiB blocks above its zones' `high`
//!   watermarks (memd-mm's `balloon_take`) and sending their frame numbers
//!   on the inflate queue (0), deflates by sending them on the deflate queue
//!   (1) and giving them back (`balloon_give`), and keeps `actual` up to
//!   date. `VIRTIO_BALLOON_F_MUST_TELL_HOST` is not negotiated;
//!   `DEFLATE_ON_OOM` is, and then an allocation that would fail takes
//!   blocks back from the balloon first (memd-mm lists the balloon's
//!   blocks), and `actual` follows.
//! - **Free page reporting** (`VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`):
//!   memd lends the host free blocks of 2 MiB or more (`report_take`), the
//!   host discards their memory, and the blocks come back marked reported
//!   (`report_put`), so the host's copy of memd's free memory is given back
//!   without memd touching it. The queue is QEMU 7.2's index 3: QEMU
//!   numbers the balloon's queues as it creates them (inflate, deflate,
//!   stats, then reporting while free page hinting is off), not as the
//!   specification's 4. Page poisoning is not negotiated: the host may hand
//!   a discarded page back as zeroes, which memd never relies on either
//!   way.
//!
//! - **Statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): free, total and available
//!   memory and reclaimable caches, refreshed whenever the host takes them
//!   (`guest-stats` in QMP, `virsh dommemstat`).
//!
//! One request (a balloon block or a report) is in flight at a time; the
//! poll loop starts the next and completes it without waiting.

use alloc::string::String;

use alloc::boxed::Box;
use bitflags::bitflags;
use memd_mm::{MemoryManager, ReportBlock};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};
use zerocopy::IntoBytes;

use super::hal::MemdHal;

bitflags! {
    /// The balloon's feature bits memd knows.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Features: u64 {
        const STATS_VQ = 1 << 1;
        const DEFLATE_ON_OOM = 1 << 2;
        const FREE_PAGE_REPORTING = 1 << 5;
        const VERSION_1 = 1 << 32;
    }
}

const INFLATE_QUEUE: u16 = 0;
const DEFLATE_QUEUE: u16 = 1;
const STATS_QUEUE: u16 = 2;
/// The statistics memd reports, as the specification tags them: free
/// memory, total memory, available memory (free plus the slab caches'
/// reclaimable part) and disk caches (memd has none but its reclaimable
/// slab memory). Each is a little-endian `u16` tag and `u64` value.
const STAT_TAGS: [u16; 4] = [4, 5, 6, 7];
const STAT_BYTES: usize = 10;
/// The reporting queue's index on QEMU 7.2 (see the module comment).
const REPORTING_QUEUE: u16 = 3;
/// Configuration: the host's target and the driver's count, in 4 KiB pages.
const CONFIG_NUM_PAGES: usize = 0;
const CONFIG_ACTUAL: usize = 4;
/// Most frame numbers per balloon block: 2 MiB of 4 KiB pages (memd-mm's
/// blocks are that size, or smaller with a small `memd.max_order`).
const BLOCK_PFNS: usize = 512;
/// Descriptors in the queue: one per block reported.
const QUEUE_SIZE: usize = 32;
/// Blocks per report (Linux's `PAGE_REPORTING_CAPACITY` is 32): up to
/// 64 MiB of 4 MiB blocks.
pub const BATCH: usize = 16;

/// The request the device holds (one at a time, kept inline: a report's
/// blocks are a few hundred bytes).
#[allow(clippy::large_enum_variant)]
enum InFlight {
    Report {
        token: u16,
        blocks: [ReportBlock; BATCH],
        n: usize,
    },
    /// A balloon block going to the host (inflate) or coming back.
    Block {
        token: u16,
        phys: u64,
        inflate: bool,
    },
}

pub struct BalloonDevice {
    transport: SomeTransport<'static>,
    queue: VirtQueue<MemdHal, QUEUE_SIZE>,
    inflate: VirtQueue<MemdHal, 8>,
    deflate: VirtQueue<MemdHal, 8>,
    /// The statistics buffer, held by the device until the host asks
    /// (its stats polling interval) and then refilled: its token, if
    /// negotiated and given.
    stats: Option<(VirtQueue<MemdHal, 2>, Option<u16>)>,
    stat_buf: Box<[u8; STAT_TAGS.len() * STAT_BYTES]>,
    /// The frame numbers of the block in flight (the device reads them).
    pfns: Box<[u32; BLOCK_PFNS]>,
    /// `DEFLATE_ON_OOM` was negotiated: memd-mm is told once, on the first
    /// step.
    deflate_on_oom: Option<bool>,
    /// The `actual` last written to the device.
    actual: u32,
    /// Pages in one of memd-mm's balloon blocks (learnt on the first step).
    block_pages: u64,
    /// The device gave back something it was not given: no more requests.
    failed: bool,
    in_flight: Option<InFlight>,
    /// Where the device was found.
    pub location: String,
}

impl BalloonDevice {
    /// Finds the balloon and sets up its reporting queue.
    pub fn probe() -> Result<BalloonDevice, &'static str> {
        let (mut transport, location) =
            super::find(DeviceType::MemoryBalloon).ok_or("no virtio-balloon device")?;
        let features = transport.begin_init(
            Features::FREE_PAGE_REPORTING
                | Features::STATS_VQ
                | Features::DEFLATE_ON_OOM
                | Features::VERSION_1,
        );
        if !features.contains(Features::FREE_PAGE_REPORTING) {
            return Err("the balloon offers no free page reporting (QEMU: free-page-reporting=on)");
        }
        let stats_vq = features.contains(Features::STATS_VQ);
        let (queue, inflate, deflate, stats) = super::hal::with_device("virtio-balloon", || {
            Ok::<_, virtio_drivers::Error>((
                VirtQueue::new(&mut transport, REPORTING_QUEUE, false, false)?,
                VirtQueue::new(&mut transport, INFLATE_QUEUE, false, false)?,
                VirtQueue::new(&mut transport, DEFLATE_QUEUE, false, false)?,
                match stats_vq {
                    true => Some((
                        VirtQueue::new(&mut transport, STATS_QUEUE, false, false)?,
                        None,
                    )),
                    false => None,
                },
            ))
        })
        .map_err(|_| "virtio-balloon: the queues could not be set up")?;
        transport.finish_init();
        Ok(BalloonDevice {
            transport,
            queue,
            inflate,
            deflate,
            stats,
            stat_buf: Box::new([0; STAT_TAGS.len() * STAT_BYTES]),
            pfns: Box::new([0; BLOCK_PFNS]),
            deflate_on_oom: Some(features.contains(Features::DEFLATE_ON_OOM)),
            actual: 0,
            block_pages: BLOCK_PFNS as u64,
            failed: false,
            in_flight: None,
            location,
        })
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some() && !self.failed
    }

    /// Stops using a device that returned what it was not given: whatever
    /// it holds stays set aside.
    fn fail(&mut self, what: core::fmt::Arguments) {
        log::warn!("balloon: {what}; the balloon is no longer used");
        self.failed = true;
    }

    /// Lends the device up to [`BATCH`] unreported free blocks of `mm`, if
    /// no report is in flight; the bytes lent.
    pub fn start(&mut self, mm: &mut MemoryManager) -> u64 {
        if self.in_flight.is_some() || self.failed {
            return 0;
        }
        let mut blocks = [ReportBlock::default(); BATCH];
        let n = mm.report_take(&mut blocks);
        if n == 0 {
            return 0;
        }
        let dmap = mm.direct_map();
        let mut bufs = buffers(&blocks[..n], dmap);
        // SAFETY: the blocks are isolated in memd-mm until `report_put`
        // (nothing allocates, merges or touches them), so the slices alias
        // nothing while the device holds them; they stay valid until
        // `pop_used` in `poll`.
        let token = match unsafe { self.queue.add(&[], &mut bufs[..n]) } {
            Ok(token) => token,
            Err(_) => {
                mm.report_put(&blocks[..n], false);
                return 0;
            }
        };
        if self.queue.should_notify() {
            self.transport.notify(REPORTING_QUEUE);
        }
        self.in_flight = Some(InFlight::Report { token, blocks, n });
        blocks[..n].iter().map(ReportBlock::bytes).sum()
    }

    /// What the host asks the balloon to hold (`num_pages`), in bytes.
    pub fn target_bytes(&self) -> u64 {
        let pages = self
            .transport
            .read_config_space::<u32>(CONFIG_NUM_PAGES)
            .unwrap_or(0);
        pages as u64 * 4096
    }

    /// Tells the device the balloon's size when it changed (a step, or
    /// memd-mm taking blocks back for allocations that would have failed).
    fn write_actual(&mut self, mm: &MemoryManager) {
        let actual = (mm.balloon_blocks() * self.block_pages) as u32;
        if actual != self.actual {
            let _ = self.transport.write_config_space(CONFIG_ACTUAL, actual);
            self.actual = actual;
        }
    }

    /// Whether the device wants statistics: it has used the last ones, or
    /// has none yet.
    pub fn stats_wanted(&self) -> bool {
        match &self.stats {
            Some((queue, Some(_))) => queue.can_pop(),
            Some((_, None)) => true,
            None => false,
        }
    }

    /// Hands the device fresh statistics when it has used the last ones
    /// (the host asked for them), or the first ones; true when it did.
    pub fn refresh_stats(&mut self, mm: &MemoryManager) -> bool {
        let Some((queue, token)) = &mut self.stats else {
            return false;
        };
        if let Some(t) = *token {
            if !queue.can_pop() {
                return false;
            }
            // SAFETY: the buffer added with this token.
            let _ = unsafe { queue.pop_used(t, &[self.stat_buf.as_slice()], &mut []) };
            *token = None;
        }
        let m = mm.meminfo();
        let values = [
            m.free,
            m.total,
            m.free + m.slab_reclaimable,
            m.slab_reclaimable,
        ];
        for (i, (tag, value)) in STAT_TAGS.iter().zip(values).enumerate() {
            let at = &mut self.stat_buf[i * STAT_BYTES..(i + 1) * STAT_BYTES];
            at[..2].copy_from_slice(&tag.to_le_bytes());
            at[2..].copy_from_slice(&value.to_le_bytes());
        }
        // SAFETY: `stat_buf` is boxed and written only when the device
        // does not hold it; it stays valid until `pop_used` above.
        if let Ok(t) = unsafe { queue.add(&[self.stat_buf.as_slice()], &mut []) } {
            *token = Some(t);
            if queue.should_notify() {
                self.transport.notify(STATS_QUEUE);
            }
        }
        true
    }

    /// Moves the balloon one block towards the host's target (`target_bytes`,
    /// as [`BalloonDevice::target_bytes`] read it): takes a block above the
    /// watermarks and sends it (inflate), or sends one back (deflate).
    /// False when it is at the target or no block can be taken.
    pub fn step(&mut self, mm: &mut MemoryManager, target_bytes: u64) -> bool {
        if let Some(on) = self.deflate_on_oom.take() {
            mm.set_balloon_deflate_on_oom(on);
            self.block_pages = mm.balloon_block_pages().min(BLOCK_PFNS as u64);
        }
        if self.failed {
            return false;
        }
        self.write_actual(mm);
        if self.in_flight.is_some() {
            return false;
        }
        // In blocks, rounded down.
        let target = target_bytes / (self.block_pages * 4096);
        let actual = mm.balloon_blocks();
        let (phys, inflate) = if target > actual {
            match mm.balloon_take() {
                Some(phys) => (phys, true),
                None => return false,
            }
        } else if target < actual {
            match mm.balloon_pop() {
                Some(phys) => (phys, false),
                None => return false,
            }
        } else {
            return false;
        };
        let first = (phys / 4096) as u32;
        let n = self.block_pages as usize;
        for (i, pfn) in self.pfns[..n].iter_mut().enumerate() {
            *pfn = first + i as u32;
        }
        let queue = if inflate {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        // SAFETY: `pfns` is boxed and only written when no request is in
        // flight; it stays valid until `pop_used` in `poll`.
        let token = match unsafe { queue.add(&[self.pfns[..n].as_bytes()], &mut []) } {
            Ok(token) => token,
            Err(_) => {
                if inflate {
                    let _ = mm.balloon_give(phys);
                } else {
                    mm.balloon_keep(phys);
                }
                return false;
            }
        };
        if queue.should_notify() {
            self.transport.notify(if inflate {
                INFLATE_QUEUE
            } else {
                DEFLATE_QUEUE
            });
        }
        self.in_flight = Some(InFlight::Block {
            token,
            phys,
            inflate,
        });
        true
    }

    /// Completes the request in flight once the device has used it: a
    /// report's blocks go back to `mm` marked reported, an inflated block
    /// joins the balloon, a deflated one goes back to `mm`; true when one
    /// completed.
    pub fn poll(&mut self, mm: &mut MemoryManager) -> bool {
        if self.failed {
            return false;
        }
        match self.in_flight {
            Some(InFlight::Report { token, blocks, n }) => {
                if !self.queue.can_pop() {
                    return false;
                }
                let mut bufs = buffers(&blocks[..n], mm.direct_map());
                // SAFETY: the same buffers `start` added with this token.
                match unsafe { self.queue.pop_used(token, &[], &mut bufs[..n]) } {
                    Ok(_) => mm.report_put(&blocks[..n], true),
                    // The device gave back something else: it may still
                    // hold these blocks, so they stay isolated (lost to
                    // memd) rather than be used while the host may discard
                    // them, and the device is not trusted again.
                    Err(e) => {
                        self.fail(format_args!("report of {n} block(s) not returned ({e:?})"));
                        return true;
                    }
                }
            }
            Some(InFlight::Block {
                token,
                phys,
                inflate,
            }) => {
                let queue = if inflate {
                    &mut self.inflate
                } else {
                    &mut self.deflate
                };
                if !queue.can_pop() {
                    return false;
                }
                // SAFETY: the buffer `step` added with this token.
                let n = self.block_pages as usize;
                let done = unsafe { queue.pop_used(token, &[self.pfns[..n].as_bytes()], &mut []) };
                match (done, inflate) {
                    // The host has it: now memd-mm lists it (and may take
                    // it back for an allocation that would fail).
                    (Ok(_), true) => mm.balloon_keep(phys),
                    (Ok(_), false) => {
                        let _ = mm.balloon_give(phys);
                    }
                    // Not returned: the block stays the host's, and the
                    // device is not trusted again.
                    (Err(e), _) => {
                        mm.balloon_keep(phys);
                        self.fail(format_args!("block {phys:#x} not returned ({e:?})"));
                        return true;
                    }
                }
                self.write_actual(mm);
            }
            None => return false,
        }
        self.in_flight = None;
        true
    }
}

/// The blocks' memory as the device-writable buffers of one report.
fn buffers(blocks: &[ReportBlock], dmap: memd_mm::DirectMap) -> [&'static mut [u8]; BATCH] {
    core::array::from_fn(|i| match blocks.get(i) {
        // SAFETY: an isolated free block of memd-mm, reached through the
        // direct map; see `start`.
        Some(b) => unsafe {
            core::slice::from_raw_parts_mut(dmap.virt(b.phys) as *mut u8, b.bytes() as usize)
        },
        None => &mut [],
    })
}
