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
//! Transfers are synchronous: `read`/`write` return once the device has
//! used every request, with the allocator lock held throughout.

use alloc::string::String;

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
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
}

impl BlkDevice {
    /// Finds and initialises the first virtio-blk device.
    pub fn probe() -> Result<BlkDevice, &'static str> {
        let (transport, location) = super::find(DeviceType::Block).ok_or("no virtio-blk device")?;
        let dev = super::hal::with_device("virtio-blk", || VirtIOBlk::new(transport))
            .map_err(|_| "virtio-blk initialisation failed")?;
        Ok(BlkDevice { dev, location })
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

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<Transfer, &'static str> {
        check(sector, buf.len(), self.dev.capacity())?;
        let requests = buf.len().div_ceil(MAX_REQUEST);
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let block = sector as usize + i * (MAX_REQUEST / SECTOR_SIZE);
            self.dev
                .read_blocks(block, chunk)
                .map_err(|_| "virtio-blk read failed")?;
        }
        Ok(transfer(requests))
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<Transfer, &'static str> {
        check(sector, buf.len(), self.dev.capacity())?;
        if self.dev.readonly() {
            return Err("the disk is read-only");
        }
        let requests = buf.len().div_ceil(MAX_REQUEST);
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let block = sector as usize + i * (MAX_REQUEST / SECTOR_SIZE);
            self.dev
                .write_blocks(block, chunk)
                .map_err(|_| "virtio-blk write failed")?;
        }
        Ok(transfer(requests))
    }
}
