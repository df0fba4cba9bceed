//! Notification suppression for virtio-net: a transport that hides
//! `VIRTIO_F_RING_EVENT_IDX` from the driver, so the queues fall back to
//! the used ring's `NO_NOTIFY` flag.
//!
//! Why: QEMU "disables" a queue's notifications under event-idx by setting
//! `avail_event` to the current available index, so the next buffer the
//! guest posts notifies anyway, and virtio-net re-posts a receive buffer
//! after every packet. Each notification is an MMIO exit that takes QEMU's
//! global lock and runs device code on the vCPU; measured at 16 clients,
//! posting buffers took 60 % of the guest's network time. With the flag,
//! QEMU sets `NO_NOTIFY` while it has receive buffers and while a transmit
//! flush is already scheduled, and the guest stays quiet.

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `VIRTIO_F_RING_EVENT_IDX` (virtio 1.2, 6 Reserved Feature Bits).
const RING_EVENT_IDX: u64 = 1 << 29;

/// `T` without the event-index feature; everything else passes through.
pub struct FlagNotify<T>(pub T);

impl<T: Transport> Transport for FlagNotify<T> {
    fn device_type(&self) -> DeviceType {
        self.0.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.read_device_features() & !RING_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.0.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.0.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.0.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.0.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.0.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.0.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.0
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.0.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.0.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.0.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.0.read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        self.0.read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.0.write_config_space(offset, value)
    }
}
