//! virtio-mem (virtio 1.2, 5.15): the protocol layer of memory hot-plug.
//!
//! The device owns a region of guest-physical addresses (on q35 under QEMU
//! 7.2: `addr` at 4 GiB, or the first GiB boundary above the RAM above
//! 4 GiB) cut into blocks (2 MiB by default). The host sets
//! `requested_size`; the driver plugs blocks (the memory becomes usable)
//! until `plugged_size` reaches it and unplugs blocks (the host discards
//! them) when it falls. The device only checks the requests; which blocks
//! to plug or unplug, and mapping them ([`crate::drivers::hal::map_ram`]),
//! is the caller's business.
//!
//! This is the synchronous layer: each request (plug, unplug, unplug all,
//! state) goes on the one request queue (index 0) and is waited for, with
//! a bound ([`REQUEST_TIMEOUT_NS`]). QEMU answers under TCG inside the
//! notification itself and under KVM within microseconds; only a plug with
//! the device's `prealloc=on` takes longer (the host faults the blocks in).
//! A request that is not answered, or answered out of protocol, stops the
//! device: the buffers may still be the device's, so no more requests.
//!
//! Features: `VIRTIO_F_VERSION_1`, and `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`
//! when offered. QEMU 7.2 offers it when the memory backend has no shared
//! zero page (memory-backend-file, -memfd, hugetlbfs: `unplugged-
//! inaccessible=auto` becomes `on`) and then refuses `FEATURES_OK` to a
//! driver that does not accept it; with `memory-backend-ram` (what xtask
//! attaches) it is `off` and not offered. Accepting it promises what memd
//! does anyway: unplugged blocks are neither in the allocator nor in the
//! direct map, so nothing reads them. `VIRTIO_MEM_F_ACPI_PXM` is not
//! negotiated (memd has no NUMA nodes; `node_id` is ignored).
//!
//! Requests and responses live in one DMA page of memd-mm (direct map,
//! physically contiguous) rather than in boxes: a small box comes from
//! kmalloc, but `GlobalMm` falls back to vmalloc when kmalloc fails, and
//! `MemdHal::share` translates only direct-map and kernel-image addresses.

use alloc::string::String;
use core::hint::spin_loop;

use bitflags::bitflags;
use log::{debug, warn};
use memd_mm::{DmaBuffer, PAGE_SIZE};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, DeviceType, SomeTransport, Transport};

use super::hal::{self, MemdHal};
use crate::arch::time::uptime_ns;

bitflags! {
    /// The virtio-mem feature bits memd knows.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct Features: u64 {
        const ACPI_PXM = 1 << 0;
        const UNPLUGGED_INACCESSIBLE = 1 << 1;
        const VERSION_1 = 1 << 32;
    }
}

const REQUEST_QUEUE: u16 = 0;
/// Descriptors in the queue: one request (two descriptors) at a time.
const QUEUE_SIZE: usize = 4;

/// Configuration offsets (5.15.4): `block_size` u64, `node_id` u16 and
/// padding, then `addr`, `region_size`, `usable_region_size`,
/// `plugged_size`, `requested_size`, all u64. Read as pairs of u32:
/// virtio-drivers reads configuration fields of at most 4-byte alignment.
const CONFIG_BLOCK_SIZE: usize = 0;
const CONFIG_ADDR: usize = 16;
const CONFIG_REGION_SIZE: usize = 24;
const CONFIG_USABLE_REGION_SIZE: usize = 32;
const CONFIG_PLUGGED_SIZE: usize = 40;
const CONFIG_REQUESTED_SIZE: usize = 48;

/// Request types (`virtio_mem_req.type`).
const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
/// Response types (`virtio_mem_resp.type`).
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_BUSY: u16 = 2;
const RESP_ERROR: u16 = 3;
/// States in a `STATE` response.
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;

/// `virtio_mem_req`: type u16, padding u16[3], addr u64, nb_blocks u16,
/// padding u16[3].
const REQ_LEN: usize = 24;
/// `virtio_mem_resp`: type u16, padding u16[3], state u16.
const RESP_LEN: usize = 10;
/// Where the response sits in the DMA page.
const RESP_OFFSET: usize = 64;
/// A type no device answers: the response was not written.
const RESP_UNWRITTEN: u16 = 0xffff;

/// The longest memd waits for one answer.
pub const REQUEST_TIMEOUT_NS: u64 = 30_000_000_000;

/// The device configuration, as read now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemConfig {
    /// Bytes in a block: the unit of plugging (a power of two).
    pub block_size: u64,
    /// Guest-physical start of the device's region (block aligned).
    pub addr: u64,
    /// Bytes in the region.
    pub region_size: u64,
    /// Bytes at the region's start that may be plugged now (the device
    /// grows it with `requested_size`; QEMU 7.2 on x86 keeps it 256 MiB
    /// above, and shrinks it on `unplug_all`).
    pub usable_region_size: u64,
    /// Bytes plugged, as the device counts them.
    pub plugged_size: u64,
    /// Bytes the host wants plugged.
    pub requested_size: u64,
}

/// The state of a range of blocks (`STATE` request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    Plugged,
    Unplugged,
    /// Some plugged, some not.
    Mixed,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemError {
    /// `NACK`: the device refused for now (a plug beyond `requested_size`,
    /// or an unplug it does not allow at the moment).
    Nack,
    /// `BUSY`: the device cannot change state now (QEMU: migration running,
    /// or the host failed to discard or preallocate); retry later.
    Busy,
    /// `ERROR`: the request is invalid: outside the usable region, or the
    /// blocks are not all in the opposite state.
    Error,
    /// Refused before asking the device: no blocks, or an address that is
    /// not a multiple of the block size.
    Invalid,
    /// No answer within [`REQUEST_TIMEOUT_NS`]; the device is stopped.
    Timeout,
    /// The queue failed, or the device answered out of protocol (another
    /// request, an unknown type or state, a short response); the device is
    /// stopped.
    Protocol,
    /// An earlier `Timeout` or `Protocol` stopped the device.
    Stopped,
}

impl core::fmt::Display for MemError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        f.write_str(match self {
            MemError::Nack => "the device refused (NACK)",
            MemError::Busy => "the device is busy (BUSY)",
            MemError::Error => "invalid request (ERROR)",
            MemError::Invalid => "not a block-aligned, non-empty range",
            MemError::Timeout => "no answer from the device",
            MemError::Protocol => "the device answered out of protocol",
            MemError::Stopped => "the device was stopped after an earlier failure",
        })
    }
}

pub struct MemDevice {
    transport: SomeTransport<'static>,
    queue: VirtQueue<MemdHal, QUEUE_SIZE>,
    /// One page: the request at 0, the response at `RESP_OFFSET`.
    dma: DmaBuffer,
    /// The configuration generation last seen by `config_changed`.
    generation: u32,
    /// A request failed out of protocol or timed out: no more requests.
    stopped: bool,
    /// Where the device was found.
    pub location: String,
    /// The feature bits the device offered, and those negotiated.
    pub offered: u64,
    pub negotiated: u64,
}

impl MemDevice {
    /// Finds the virtio-mem device and initialises it; `None` when there is
    /// none or it cannot be used (said in the log). Blocks an earlier
    /// driver plugged (`plugged_size` above 0: a kernel started without a
    /// system reset) stay plugged: callers start with
    /// [`MemDevice::unplug_all`], as Linux does.
    pub fn probe() -> Option<MemDevice> {
        let Some((mut transport, location)) = super::find(DeviceType::Memory) else {
            debug!("virtio-mem: no device");
            return None;
        };
        let negotiated =
            transport.begin_init(Features::VERSION_1 | Features::UNPLUGGED_INACCESSIBLE);
        let offered = transport.read_device_features();
        if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
            warn!(
                "virtio-mem on {location}: the device refused features {negotiated:?} (it offers {offered:#x})"
            );
            transport.set_status(DeviceStatus::FAILED);
            return None;
        }
        let config = read_config(&transport);
        if config.block_size < PAGE_SIZE
            || !config.block_size.is_power_of_two()
            || !config.addr.is_multiple_of(config.block_size)
        {
            warn!("virtio-mem on {location}: unusable configuration {config:?}");
            transport.set_status(DeviceStatus::FAILED);
            return None;
        }
        let dma = match hal::dma_alloc(PAGE_SIZE as usize) {
            Ok(b) => b,
            Err(e) => {
                warn!("virtio-mem: no DMA page for requests: {e}");
                transport.set_status(DeviceStatus::FAILED);
                return None;
            }
        };
        let queue = match hal::with_device("virtio-mem", || {
            VirtQueue::new(&mut transport, REQUEST_QUEUE, false, false)
        }) {
            Ok(q) => q,
            Err(e) => {
                warn!("virtio-mem: the request queue could not be set up: {e:?}");
                transport.set_status(DeviceStatus::FAILED);
                let _ = hal::dma_free(&dma);
                return None;
            }
        };
        hal::register_device_dma("virtio-mem", "request and response", &dma);
        transport.finish_init();
        debug!("virtio-mem: features offered {offered:#x}, negotiated {negotiated:?}");
        let generation = transport.read_config_generation();
        Some(MemDevice {
            transport,
            queue,
            dma,
            generation,
            stopped: false,
            location,
            offered,
            negotiated: negotiated.bits(),
        })
    }

    /// The configuration, read now (the host changes `requested_size` at
    /// any time; the generation counter keeps the fields consistent).
    pub fn config(&self) -> MemConfig {
        read_config(&self.transport)
    }

    /// Whether the configuration changed since the last call (or since
    /// probe): one register read, cheap enough for every poll-loop pass.
    /// QEMU bumps the generation when the host sets `requested-size`.
    pub fn config_changed(&mut self) -> bool {
        let g = self.transport.read_config_generation();
        let changed = g != self.generation;
        self.generation = g;
        changed
    }

    /// Plugs `nb_blocks` blocks from `addr` (block aligned), in requests of
    /// at most `u16::MAX` blocks. Plugged memory's content is undefined.
    /// When a request fails, the blocks of the requests before it stay
    /// plugged (`state` tells).
    pub fn plug(&mut self, addr: u64, nb_blocks: u64) -> Result<(), MemError> {
        self.split(REQ_PLUG, addr, nb_blocks)
    }

    /// Unplugs `nb_blocks` blocks from `addr` (block aligned), which must
    /// all be plugged; the host may discard them at once. Split and
    /// failing as `plug`.
    pub fn unplug(&mut self, addr: u64, nb_blocks: u64) -> Result<(), MemError> {
        self.split(REQ_UNPLUG, addr, nb_blocks)
    }

    /// Unplugs every block (and QEMU shrinks the usable region to what is
    /// requested).
    pub fn unplug_all(&mut self) -> Result<(), MemError> {
        self.request(REQ_UNPLUG_ALL, 0, 0).map(|_| ())
    }

    /// The state of `nb_blocks` blocks from `addr` (block aligned), asked in
    /// requests of at most `u16::MAX` blocks.
    pub fn state(&mut self, addr: u64, nb_blocks: u64) -> Result<BlockState, MemError> {
        let block = self.checked(addr, nb_blocks)?;
        let mut seen: Option<BlockState> = None;
        let mut at = addr;
        let mut left = nb_blocks;
        while left > 0 {
            let n = left.min(u16::MAX as u64) as u16;
            let s = match self.request(REQ_STATE, at, n)? {
                STATE_PLUGGED => BlockState::Plugged,
                STATE_UNPLUGGED => BlockState::Unplugged,
                STATE_MIXED => BlockState::Mixed,
                other => return Err(self.stop(format_args!("unknown block state {other}"))),
            };
            seen = match seen {
                None => Some(s),
                Some(prev) if prev == s => Some(s),
                Some(_) => Some(BlockState::Mixed),
            };
            if seen == Some(BlockState::Mixed) {
                break;
            }
            at += n as u64 * block;
            left -= n as u64;
        }
        Ok(seen.unwrap_or(BlockState::Unplugged))
    }

    /// The block size, after checking `addr` and `nb_blocks`.
    fn checked(&self, addr: u64, nb_blocks: u64) -> Result<u64, MemError> {
        let block = self.config().block_size;
        if nb_blocks == 0 || block == 0 || !addr.is_multiple_of(block) {
            return Err(MemError::Invalid);
        }
        nb_blocks
            .checked_mul(block)
            .and_then(|len| addr.checked_add(len))
            .ok_or(MemError::Invalid)?;
        Ok(block)
    }

    /// A plug or unplug of any number of blocks, as requests of at most
    /// `u16::MAX`.
    fn split(&mut self, kind: u16, addr: u64, nb_blocks: u64) -> Result<(), MemError> {
        let block = self.checked(addr, nb_blocks)?;
        let mut at = addr;
        let mut left = nb_blocks;
        while left > 0 {
            let n = left.min(u16::MAX as u64) as u16;
            self.request(kind, at, n)?;
            at += n as u64 * block;
            left -= n as u64;
        }
        Ok(())
    }

    /// Stops the device after `what`; the error to return.
    fn stop(&mut self, what: core::fmt::Arguments) -> MemError {
        warn!("virtio-mem: {what}; no more requests");
        self.stopped = true;
        MemError::Protocol
    }

    /// Sends one request and waits for its answer: the response's `state`
    /// field on `ACK`.
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> Result<u16, MemError> {
        if self.stopped {
            return Err(MemError::Stopped);
        }
        let base = self.dma.virt as *mut u8;
        // SAFETY: `dma` is a page of memd-mm's DMA memory owned by this
        // device for its lifetime, reached through the direct map; the
        // request (0..24) and response (64..74) do not overlap, and the
        // device holds neither now (one request at a time, each completed
        // or the device stopped before this point).
        let (req, resp) = unsafe {
            (
                core::slice::from_raw_parts_mut(base, REQ_LEN),
                core::slice::from_raw_parts_mut(base.add(RESP_OFFSET), RESP_LEN),
            )
        };
        req.fill(0);
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        resp.fill(0);
        resp[0..2].copy_from_slice(&RESP_UNWRITTEN.to_le_bytes());
        // SAFETY: both buffers stay valid and untouched by the CPU until
        // `pop_used` below returns them, or the device is stopped and they
        // are never used again until `Drop` resets it.
        let token = match unsafe { self.queue.add(&[&*req], &mut [&mut *resp]) } {
            Ok(t) => t,
            Err(e) => return Err(self.stop(format_args!("queueing a request: {e:?}"))),
        };
        if self.queue.should_notify() {
            self.transport.notify(REQUEST_QUEUE);
        }
        let start = uptime_ns();
        while !self.queue.can_pop() {
            if uptime_ns().wrapping_sub(start) > REQUEST_TIMEOUT_NS {
                warn!("virtio-mem: request {kind} at {addr:#x} ({nb_blocks} blocks) not answered; no more requests");
                self.stopped = true;
                return Err(MemError::Timeout);
            }
            spin_loop();
        }
        // SAFETY: the buffers added with this token.
        let len = match unsafe { self.queue.pop_used(token, &[&*req], &mut [&mut *resp]) } {
            Ok(len) => len as usize,
            Err(e) => return Err(self.stop(format_args!("completing a request: {e:?}"))),
        };
        let kind_answered = u16::from_le_bytes([resp[0], resp[1]]);
        let state = u16::from_le_bytes([resp[8], resp[9]]);
        if len < 2 || kind_answered == RESP_UNWRITTEN || (kind == REQ_STATE && len < RESP_LEN) {
            return Err(self.stop(format_args!("a response of {len} bytes")));
        }
        match kind_answered {
            RESP_ACK => Ok(state),
            RESP_NACK => Err(MemError::Nack),
            RESP_BUSY => Err(MemError::Busy),
            RESP_ERROR => Err(MemError::Error),
            other => Err(self.stop(format_args!("unknown response type {other}"))),
        }
    }
}

impl Drop for MemDevice {
    /// Resets the device first, so it no longer holds the request page,
    /// then frees the page (the queue and transport go after).
    fn drop(&mut self) {
        self.transport.set_status(DeviceStatus::empty());
        let mut spins = 0u32;
        while self.transport.get_status() != DeviceStatus::empty() && spins < 1_000_000 {
            spins += 1;
            spin_loop();
        }
        if self.transport.get_status() != DeviceStatus::empty() {
            warn!("virtio-mem: the device did not reset; its request page stays allocated");
            return;
        }
        hal::unregister_device_dma(self.dma.phys);
        if let Err(e) = hal::dma_free(&self.dma) {
            warn!("virtio-mem: freeing the request page: {e}");
        }
    }
}

/// A u64 configuration field, as two u32 reads.
fn config_u64(t: &SomeTransport<'static>, offset: usize) -> virtio_drivers::Result<u64> {
    let lo = t.read_config_space::<u32>(offset)?;
    let hi = t.read_config_space::<u32>(offset + 4)?;
    Ok(lo as u64 | (hi as u64) << 32)
}

fn read_config(t: &SomeTransport<'static>) -> MemConfig {
    t.read_consistent(|| {
        Ok(MemConfig {
            block_size: config_u64(t, CONFIG_BLOCK_SIZE)?,
            addr: config_u64(t, CONFIG_ADDR)?,
            region_size: config_u64(t, CONFIG_REGION_SIZE)?,
            usable_region_size: config_u64(t, CONFIG_USABLE_REGION_SIZE)?,
            plugged_size: config_u64(t, CONFIG_PLUGGED_SIZE)?,
            requested_size: config_u64(t, CONFIG_REQUESTED_SIZE)?,
        })
    })
    .unwrap_or_default()
}
