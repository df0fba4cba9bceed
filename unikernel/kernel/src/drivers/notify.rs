//! Fewer virtio-net notifications: a transport that hides
//! `VIRTIO_F_RING_EVENT_IDX` from the driver, so the queues fall back to
//! the used ring's `NO_NOTIFY` flag, and that holds the notifications the
//! driver asks for until the device's owner sends them, once per batch of
//! buffers (like Linux's `virtqueue_kick` after a burst of adds).
//!
//! Why: QEMU "disables" a queue's notifications under event-idx by setting
//! `avail_event` to the current available index, so the next buffer the
//! guest posts notifies anyway, and virtio-net re-posts a receive buffer
//! after every packet. Each notification is an MMIO exit that takes QEMU's
//! global lock and runs device code on the vCPU; measured at 16 clients,
//! posting buffers took 60 % of the guest's network time. With the flag,
//! QEMU sets `NO_NOTIFY` while it has receive buffers and while a transmit
//! flush is already scheduled, and the guest stays quiet. Deferring the
//! rest to one kick per poll-loop pass turns a burst of transmitted frames
//! into one exit instead of one per QEMU flush.

use core::sync::atomic::{AtomicU32, Ordering};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `VIRTIO_F_RING_EVENT_IDX` (virtio 1.2, 6 Reserved Feature Bits).
const RING_EVENT_IDX: u64 = 1 << 29;

/// A device's transport and the notifications it owes.
pub struct Notifier<T> {
    transport: spin::Mutex<T>,
    /// Bit `q` set: queue `q` has new buffers the device was not told of.
    pending: AtomicU32,
}

impl<T: Transport> Notifier<T> {
    /// Takes `transport` for the kernel's lifetime (devices are never
    /// removed); the driver gets a [`Deferred`] view of it.
    pub fn leak(transport: T) -> &'static Notifier<T> {
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Notifier {
            transport: spin::Mutex::new(transport),
            pending: AtomicU32::new(0),
        }))
    }

    /// Sends the notifications held since the last kick.
    pub fn kick(&self) {
        let pending = self.pending.swap(0, Ordering::Relaxed);
        if pending != 0 {
            let mut t = self.transport.lock();
            for queue in 0..32 {
                if pending & (1 << queue) != 0 {
                    t.notify(queue);
                }
            }
        }
    }
}

/// The driver's transport: `T` without the event-index feature, and
/// notifications held for [`Notifier::kick`]; everything else passes
/// through.
pub struct Deferred<T: 'static>(pub &'static Notifier<T>);

impl<T: Transport> Deferred<T> {
    fn t(&self) -> spin::MutexGuard<'_, T> {
        self.0.transport.lock()
    }
}

impl<T: Transport> Transport for Deferred<T> {
    fn device_type(&self) -> DeviceType {
        self.t().device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.t().read_device_features() & !RING_EVENT_IDX
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.t().write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.t().max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        if queue < 32 {
            self.0.pending.fetch_or(1 << queue, Ordering::Relaxed);
        } else {
            self.t().notify(queue)
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.t().get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.t().set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.t().set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.t().requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.t()
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.t().queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.t().queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.t().ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.t().read_config_generation()
    }

    fn read_config_space<V: FromBytes + IntoBytes>(&self, offset: usize) -> Result<V> {
        self.t().read_config_space(offset)
    }

    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> Result<()> {
        self.t().write_config_space(offset, value)
    }
}
