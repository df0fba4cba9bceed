//! virtio-balloon's free page reporting (`VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`):
//! memd lends the host free blocks of 2 MiB or more (memd-mm's
//! `report_take`), the host discards their memory, and the blocks come back
//! marked reported (`report_put`), so the host's copy of memd's free memory
//! is given back without memd touching it. The queue is QEMU 7.2's index 3:
//! QEMU numbers the balloon's queues as it creates them (inflate, deflate,
//! stats, then reporting while free page hinting is off), not as the
//! specification's 4. Page poisoning is not negotiated: the host may hand a
//! discarded page back as zeroes, which memd never relies on either way.
//!
//! One report is in flight at a time; the poll loop starts one when some
//! unreported free memory has gathered and completes it without waiting.

use alloc::string::String;

use bitflags::bitflags;
use memd_mm::{MemoryManager, ReportBlock};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};

use super::hal::MemdHal;

bitflags! {
    /// The balloon's feature bits memd knows.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Features: u64 {
        const FREE_PAGE_REPORTING = 1 << 5;
        const VERSION_1 = 1 << 32;
    }
}

/// The reporting queue's index on QEMU 7.2 (see the module comment).
const REPORTING_QUEUE: u16 = 3;
/// Descriptors in the queue: one per block reported.
const QUEUE_SIZE: usize = 32;
/// Blocks per report (Linux's `PAGE_REPORTING_CAPACITY` is 32): up to
/// 64 MiB of 4 MiB blocks.
pub const BATCH: usize = 16;

/// The report the device holds.
struct InFlight {
    token: u16,
    blocks: [ReportBlock; BATCH],
    n: usize,
}

pub struct BalloonDevice {
    transport: SomeTransport<'static>,
    queue: VirtQueue<MemdHal, QUEUE_SIZE>,
    in_flight: Option<InFlight>,
    /// Where the device was found.
    pub location: String,
    /// Bytes reported to the host so far, and reports made.
    pub reported_bytes: u64,
    pub reports: u64,
}

impl BalloonDevice {
    /// Finds the balloon and sets up its reporting queue.
    pub fn probe() -> Result<BalloonDevice, &'static str> {
        let (mut transport, location) =
            super::find(DeviceType::MemoryBalloon).ok_or("no virtio-balloon device")?;
        let features = transport.begin_init(Features::FREE_PAGE_REPORTING | Features::VERSION_1);
        if !features.contains(Features::FREE_PAGE_REPORTING) {
            return Err("the balloon offers no free page reporting (QEMU: free-page-reporting=on)");
        }
        let queue = super::hal::with_device("virtio-balloon", || {
            VirtQueue::new(&mut transport, REPORTING_QUEUE, false, false)
        })
        .map_err(|_| "virtio-balloon: the reporting queue could not be set up")?;
        transport.finish_init();
        Ok(BalloonDevice {
            transport,
            queue,
            in_flight: None,
            location,
            reported_bytes: 0,
            reports: 0,
        })
    }

    /// Whether a report is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Lends the device up to [`BATCH`] unreported free blocks of `mm`, if
    /// no report is in flight; the bytes lent.
    pub fn start(&mut self, mm: &mut MemoryManager) -> u64 {
        if self.in_flight.is_some() {
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
        self.in_flight = Some(InFlight { token, blocks, n });
        blocks[..n].iter().map(ReportBlock::bytes).sum()
    }

    /// Completes the report in flight once the device has used it, giving
    /// the blocks back to `mm` marked reported; true when one completed.
    pub fn poll(&mut self, mm: &mut MemoryManager) -> bool {
        let Some(f) = &self.in_flight else {
            return false;
        };
        if !self.queue.can_pop() {
            return false;
        }
        let mut bufs = buffers(&f.blocks[..f.n], mm.direct_map());
        // SAFETY: the same buffers `start` added with this token.
        let done = unsafe { self.queue.pop_used(f.token, &[], &mut bufs[..f.n]) };
        match done {
            Ok(_) => {
                mm.report_put(&f.blocks[..f.n], true);
                self.reported_bytes += f.blocks[..f.n].iter().map(ReportBlock::bytes).sum::<u64>();
                self.reports += 1;
            }
            // The device gave back something else: it may still hold these
            // blocks, so they stay isolated (lost to memd) rather than be
            // used while the host may discard them.
            Err(e) => log::warn!(
                "balloon: report of {} block(s) not returned ({e:?}); they stay set aside",
                f.n
            ),
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
