//! smoltcp's view of the virtio-net device, and smoltcp's clock.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::arch::time;
use crate::drivers::virtio_net::NetDevice;

/// Largest Ethernet frame (no FCS).
const MTU: usize = 1514;

/// smoltcp's view of the virtio-net device.
pub(super) struct Phy<'a>(pub(super) &'a mut NetDevice);

pub(super) struct RxToken(Vec<u8>);
pub(super) struct TxToken<'a>(&'a mut NetDevice);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // `transmit` checked for a free slot, so this only fails for an
        // oversized frame; smoltcp never builds one above the MTU.
        let mut f = Some(f);
        match self
            .0
            .transmit(len, |buf| (f.take().expect("consume runs once"))(buf))
        {
            Some(r) => r,
            None => {
                // Dropped like on a full ring; TCP retransmits.
                let mut scratch = vec![0u8; len];
                (f.take().expect("consume runs once"))(&mut scratch)
            }
        }
    }
}

impl Device for Phy<'_> {
    type RxToken<'a>
        = RxToken
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.0.receive()?;
        Some((RxToken(frame), TxToken(self.0)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.0.can_transmit().then_some(TxToken(self.0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(16);
        caps
    }
}

pub(super) fn now() -> Instant {
    instant(time::uptime_ns())
}

/// smoltcp's time for an uptime reading.
pub(super) fn instant(uptime_ns: u64) -> Instant {
    Instant::from_micros((uptime_ns / 1000) as i64)
}
