//! virtio-blk: the disk behind memd-service's disk DMA operations. Reads and
//! writes go straight between the client's DMA buffer and the device
//! (virtio-drivers shares the buffer through `MemdHal`, no copy), in requests
//! of at most `MAX_REQUEST` bytes.

use alloc::string::String;

use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::hal::MemdHal;

/// Largest single request (QEMU splits bigger ones anyway; this keeps each
/// poll short).
const MAX_REQUEST: usize = 1 << 20;

pub struct BlkDevice {
    dev: VirtIOBlk<MemdHal, SomeTransport<'static>>,
    /// Where the device was found.
    pub location: String,
}

impl BlkDevice {
    /// Finds and initialises the first virtio-blk device.
    pub fn probe() -> Result<BlkDevice, &'static str> {
        let (transport, location) = super::find(DeviceType::Block).ok_or("no virtio-blk device")?;
        let dev = VirtIOBlk::new(transport).map_err(|_| "virtio-blk initialisation failed")?;
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

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), &'static str> {
        check(sector, buf.len(), self.dev.capacity())?;
        for (i, chunk) in buf.chunks_mut(MAX_REQUEST).enumerate() {
            let block = sector as usize + i * (MAX_REQUEST / SECTOR_SIZE);
            self.dev
                .read_blocks(block, chunk)
                .map_err(|_| "virtio-blk read failed")?;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), &'static str> {
        check(sector, buf.len(), self.dev.capacity())?;
        if self.dev.readonly() {
            return Err("the disk is read-only");
        }
        for (i, chunk) in buf.chunks(MAX_REQUEST).enumerate() {
            let block = sector as usize + i * (MAX_REQUEST / SECTOR_SIZE);
            self.dev
                .write_blocks(block, chunk)
                .map_err(|_| "virtio-blk write failed")?;
        }
        Ok(())
    }
}
