//! virtio-blk: the disk behind memd-service's disk DMA operations. Reads and
//! writes go straight between the client's DMA buffer and the device
//! (virtio-drivers shares the buffer through `MemdHal`, no copy), in requests
//! of at most `MAX_REQUEST` bytes.
//!
//! Descriptors: virtio-drivers is built without its `alloc` feature, so a
//! request is three direct descriptors in the ring (header, the data, the
//! status byte), never an indirect table. The driver negotiates neither
//! `VIRTIO_BLK_F_SIZE_MAX` nor `VIRTIO_BLK_F_SEG_MAX`, so the device sets no
//! per-segment limit below the descriptor's 32-bit length: a physically
//! contiguous buffer of up to `MAX_REQUEST` bytes is one data descriptor.
//! One request is in flight at a time and the driver does not wait for it:
//! `start` queues it and returns, `poll` completes it once the device has
//! used it, so the loop serves other clients while the disk works.

use alloc::boxed::Box;
use alloc::string::String;

use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use memd_service::Transfer;

use super::hal::MemdHal;

/// Largest single request: 1 GiB, below both the descriptor's 32-bit length
/// and QEMU's per-request limit (`BDRV_REQUEST_MAX_BYTES`, just under 2 GiB).
const MAX_REQUEST: usize = 1 << 30;

/// Descriptors one request takes: header, data, status.
const DESCRIPTORS_PER_REQUEST: u64 = 3;

fn transfer(requests: usize) -> Transfer {
    Transfer {
        requests: requests as u64,
        descriptors: requests as u64 * DESCRIPTORS_PER_REQUEST,
        data_descriptors: requests as u64,
    }
}

pub struct BlkDevice {
    dev: VirtIOBlk<MemdHal, SomeTransport<'static>>,
    /// Where the device was found.
    pub location: String,
    /// The request header and status of the request in flight: boxed, as
    /// the device holds their addresses until it completes.
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
    in_flight: Option<InFlight>,
}

/// The request the device holds.
struct InFlight {
    token: u16,
    write: bool,
    /// The buffer's address and length, to know it again in `poll`.
    addr: usize,
    len: usize,
}

impl BlkDevice {
    /// Finds and initialises the first virtio-blk device.
    pub fn probe() -> Result<BlkDevice, &'static str> {
        let (transport, location) = super::find(DeviceType::Block).ok_or("no virtio-blk device")?;
        let dev = super::hal::with_device("virtio-blk", || VirtIOBlk::new(transport))
            .map_err(|_| "virtio-blk initialisation failed")?;
        Ok(BlkDevice {
            dev,
            location,
            req: Box::default(),
            resp: Box::default(),
            in_flight: None,
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.dev.capacity()
    }

    pub fn readonly(&self) -> bool {
        self.dev.readonly()
    }
}

fn check(sector: u64, len: usize, capacity: u64) -> Result<(), &'static str> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err("length is not a whole number of sectors");
    }
    match sector.checked_add((len / SECTOR_SIZE) as u64) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err("beyond the end of the disk"),
    }
}

impl memd_service::BlockDevice for BlkDevice {
    fn capacity_sectors(&self) -> u64 {
        self.dev.capacity()
    }

    fn max_request(&self) -> usize {
        MAX_REQUEST
    }

    fn start(&mut self, write: bool, sector: u64, buf: &mut [u8]) -> Result<bool, &'static str> {
        check(sector, buf.len(), self.dev.capacity())?;
        if buf.len() > MAX_REQUEST {
            return Err("larger than one request");
        }
        if write && self.dev.readonly() {
            return Err("the disk is read-only");
        }
        if self.in_flight.is_some() {
            return Ok(false);
        }
        let block = sector as usize;
        // SAFETY: `BlockDevice`'s contract: the caller passes this same
        // buffer to `poll` until the request completes and neither touches
        // nor frees it meanwhile (memd-service leases it); `req` and `resp`
        // are boxed and only touched again by the completion in `poll`.
        let token = unsafe {
            if write {
                self.dev
                    .write_blocks_nb(block, &mut self.req, buf, &mut self.resp)
            } else {
                self.dev
                    .read_blocks_nb(block, &mut self.req, buf, &mut self.resp)
            }
        }
        .map_err(|_| "virtio-blk: the request could not be queued")?;
        self.in_flight = Some(InFlight {
            token,
            write,
            addr: buf.as_ptr() as usize,
            len: buf.len(),
        });
        Ok(true)
    }

    fn poll(&mut self, buf: &mut [u8]) -> Option<Result<Transfer, &'static str>> {
        let f = self.in_flight.as_ref()?;
        if f.addr != buf.as_ptr() as usize || f.len != buf.len() {
            return None;
        }
        if self.dev.peek_used() != Some(f.token) {
            return None;
        }
        let (token, write) = (f.token, f.write);
        // SAFETY: the same buffer (checked above), header and status as
        // `start` queued with this token.
        let r = unsafe {
            if write {
                self.dev
                    .complete_write_blocks(token, &self.req, buf, &mut self.resp)
            } else {
                self.dev
                    .complete_read_blocks(token, &self.req, buf, &mut self.resp)
            }
        };
        self.in_flight = None;
        Some(
            r.map(|()| transfer(1))
                .map_err(|_| "virtio-blk: the device failed the request"),
        )
    }
}
