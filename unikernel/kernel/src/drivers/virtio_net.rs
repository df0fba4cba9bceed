//! virtio-net: receive and transmit buffers carved from two memd-mm DMA
//! buffers, posted to the device without blocking (virtio-drivers'
//! `VirtIONetRaw`: transmit_begin / poll_transmit, receive_begin /
//! poll_receive).

use alloc::string::String;
use alloc::vec::Vec;

use memd_mm::DmaBuffer;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::hal::MemdHal;
use super::notify::{Deferred, Notifier};

/// The owner name in the device DMA list.
const DEVICE: &str = "virtio-net";

/// Descriptors per queue (a power of two), QEMU's largest: with 64, a
/// guest busy for a few milliseconds left QEMU out of receive buffers, and
/// then every re-posted buffer cost a notification that delivered one frame.
const QUEUE: usize = 256;
/// Bytes per buffer slot: virtio-net header + a 1514-byte frame, rounded.
const SLOT: usize = 2048;
/// Transmit slots.
const TX_SLOTS: usize = 32;

type Raw = VirtIONetRaw<MemdHal, Deferred<SomeTransport<'static>>, QUEUE>;

/// Counters for the log and statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_busy: u64,
    pub tx_dropped: u64,
    pub rx_errors: u64,
}

pub struct NetDevice {
    raw: Raw,
    /// Sends the notifications the driver held back: see [`NetDevice::kick`].
    notifier: &'static Notifier<SomeTransport<'static>>,
    /// Where the device was found.
    pub location: String,
    rx: DmaBuffer,
    tx: DmaBuffer,
    /// Receive slot of each outstanding receive token.
    rx_token_slot: [Option<usize>; QUEUE],
    /// Transmit slot and frame length of each outstanding transmit token.
    tx_token_slot: [Option<(usize, usize)>; QUEUE],
    tx_free: Vec<usize>,
    pub stats: NetStats,
}

fn slot(buf: &DmaBuffer, index: usize) -> &'static mut [u8] {
    // SAFETY: `buf` is one of this device's own DMA buffers, allocated at
    // init and never freed while the device exists; every slot index is
    // below the buffer's slot count, and a slot is only touched while the
    // device does not own it (before submit or after completion).
    unsafe { memd_mm::slice_mut(buf.virt + index * SLOT, SLOT) }
}

impl NetDevice {
    /// Finds and initialises the first virtio-net device.
    pub fn probe() -> Result<NetDevice, &'static str> {
        let (transport, location) =
            super::find(DeviceType::Network).ok_or("no virtio-net device")?;
        let notifier = Notifier::leak(transport);
        let raw = super::hal::with_device(DEVICE, || Raw::new(Deferred(notifier)))
            .map_err(|_| "virtio-net initialisation failed")?;
        let rx =
            super::hal::dma_alloc(QUEUE * SLOT).map_err(|_| "no DMA memory for receive buffers")?;
        let tx = match super::hal::dma_alloc(TX_SLOTS * SLOT) {
            Ok(tx) => tx,
            Err(_) => {
                let _ = super::hal::dma_free(&rx);
                return Err("no DMA memory for transmit buffers");
            }
        };
        super::hal::register_device_dma(DEVICE, "receive buffers (queue 0)", &rx);
        super::hal::register_device_dma(DEVICE, "transmit buffers (queue 1)", &tx);
        let mut dev = NetDevice {
            raw,
            notifier,
            location,
            rx,
            tx,
            rx_token_slot: [None; QUEUE],
            tx_token_slot: [None; QUEUE],
            tx_free: (0..TX_SLOTS).rev().collect(),
            stats: NetStats::default(),
        };
        for i in 0..QUEUE {
            dev.post_rx(i)?;
        }
        dev.kick();
        Ok(dev)
    }

    fn post_rx(&mut self, index: usize) -> Result<(), &'static str> {
        let buf = slot(&self.rx, index);
        // SAFETY: slot `index` of the receive DMA buffer belongs to the
        // device until `receive_complete` for this token; the driver does not
        // touch it before then (the slot is only named again through the
        // token map).
        let token = unsafe { self.raw.receive_begin(buf) }
            .map_err(|_| "virtio-net: receive_begin failed")?;
        self.rx_token_slot[token as usize] = Some(index);
        Ok(())
    }

    /// Tells the device of the buffers posted and frames queued since the
    /// last kick: once per pass of the poll loop, not once per buffer.
    pub fn kick(&self) {
        self.notifier.kick();
    }

    pub fn mac(&self) -> [u8; 6] {
        self.raw.mac_address()
    }

    /// The next received frame, if any (copied out; the slot is re-posted).
    pub fn receive(&mut self) -> Option<Vec<u8>> {
        let token = self.raw.poll_receive()?;
        let Some(index) = self.rx_token_slot[token as usize].take() else {
            self.stats.rx_errors += 1;
            return None;
        };
        let buf = slot(&self.rx, index);
        // SAFETY: `buf` is the slot that was passed to `receive_begin` for
        // this token.
        let frame = match unsafe { self.raw.receive_complete(token, buf) } {
            Ok((hdr, len)) => Some(buf[hdr..hdr + len].to_vec()),
            Err(_) => {
                self.stats.rx_errors += 1;
                None
            }
        };
        if let Some(f) = &frame {
            self.stats.rx_packets += 1;
            self.stats.rx_bytes += f.len() as u64;
        }
        if self.post_rx(index).is_err() {
            self.stats.rx_errors += 1;
        }
        frame
    }

    /// Reclaims transmit slots the device has finished with.
    pub fn reclaim_tx(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some((index, len)) = self.tx_token_slot[token as usize].take() else {
                break;
            };
            let buf = slot(&self.tx, index);
            // SAFETY: the same slot prefix that was passed to
            // `transmit_begin` for this token.
            let _ = unsafe { self.raw.transmit_complete(token, &buf[..len]) };
            self.tx_free.push(index);
        }
    }

    /// Whether a frame can be queued now.
    pub fn can_transmit(&mut self) -> bool {
        self.reclaim_tx();
        let ok = !self.tx_free.is_empty() && self.raw.can_send();
        if !ok {
            self.stats.tx_busy += 1;
        }
        ok
    }

    /// Queues a frame of `len` bytes written by `fill`; never waits for the
    /// device. Returns `None`, without calling `fill`, when no slot is free
    /// or the frame is too large.
    pub fn transmit<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        self.reclaim_tx();
        let index = self.tx_free.pop()?;
        let buf = slot(&self.tx, index);
        let hdr = match self.raw.fill_buffer_header(buf) {
            Ok(h) if h + len <= SLOT => h,
            _ => {
                self.tx_free.push(index);
                return None;
            }
        };
        let r = fill(&mut buf[hdr..hdr + len]);
        // SAFETY: the slot prefix stays untouched until `transmit_complete`
        // for the returned token (the slot is off the free list until then).
        match unsafe { self.raw.transmit_begin(&buf[..hdr + len]) } {
            Ok(token) => {
                self.tx_token_slot[token as usize] = Some((index, hdr + len));
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += len as u64;
                Some(r)
            }
            Err(_) => {
                // The frame is lost, as on a full ring; the caller's
                // protocol (TCP) retransmits.
                self.tx_free.push(index);
                self.stats.tx_dropped += 1;
                Some(r)
            }
        }
    }
}
