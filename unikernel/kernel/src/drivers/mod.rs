//! Devices: virtio-drivers' `Hal` on memd-mm's DMA API, transport discovery
//! (PCI through port-I/O configuration access on q35, virtio-mmio slots on
//! microvm, PCIe through ECAM on `microvm,pcie=on`), the virtio-net,
//! virtio-blk, virtio-balloon and virtio-mem devices, and QEMU's fw_cfg
//! files.
//!
//! One of the kernel's `unsafe` modules: virtio hands buffers to devices.

#![allow(unsafe_code)]

pub mod fw_cfg;
pub mod hal;
pub mod notify;
pub mod pci;
pub mod virtio_balloon;
pub mod virtio_blk;
pub mod virtio_mem;
pub mod virtio_net;

use alloc::string::String;
use core::fmt::Write;
use core::ptr::NonNull;

use log::{debug, info, warn};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, SomeTransport, Transport};

/// microvm's virtio-mmio slots: 0xfeb00000 + i * 0x200.
const MMIO_BASE: u64 = 0xfeb0_0000;
const MMIO_SLOT: u64 = 0x200;
const MMIO_SLOTS: u64 = 32;
/// "virt", little-endian.
const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;

/// A transport for the first virtio device of type `want`, and where it was
/// found (for the log).
pub fn find(want: DeviceType) -> Option<(SomeTransport<'static>, String)> {
    pci::find(want)
        .or_else(|| find_mmio(want))
        .or_else(|| pci::find_ecam(want))
}

fn find_mmio(want: DeviceType) -> Option<(SomeTransport<'static>, String)> {
    let virt = match hal::map_device(MMIO_BASE, MMIO_SLOT * MMIO_SLOTS) {
        Ok(v) => v,
        Err(e) => {
            warn!("virtio-mmio window at {MMIO_BASE:#x} not mappable: {e:?}");
            return None;
        }
    };
    for slot in 0..MMIO_SLOTS {
        let base = virt + slot * MMIO_SLOT;
        // Peek at magic and device id first: a transport that is dropped
        // resets its device, so only the wanted one gets a transport.
        // SAFETY: `base` is the start of a 0x200-byte virtio-mmio register
        // window, mapped uncached; offsets 0 (magic) and 8 (device id) are
        // read-only registers without read side effects.
        let (magic, id) = unsafe {
            (
                core::ptr::read_volatile(base as *const u32),
                core::ptr::read_volatile((base + 8) as *const u32),
            )
        };
        if magic != VIRTIO_MMIO_MAGIC || DeviceType::try_from(id).ok() != Some(want) {
            continue;
        }
        let header = NonNull::new(base as *mut VirtIOHeader)?;
        // SAFETY: the slot is a 0x200-byte virtio-mmio register window,
        // mapped uncached for the kernel's lifetime; a transport is only made
        // for a slot holding the wanted device type, and each device is
        // found once (the kernel probes each type once), so no two transports
        // alias a window.
        let transport = match unsafe { MmioTransport::new(header, MMIO_SLOT as usize) } {
            Ok(t) => t,
            Err(e) => {
                debug!("virtio-mmio slot {slot}: {e:?}");
                continue;
            }
        };
        if transport.device_type() == want {
            let mut at = String::new();
            let _ = write!(
                at,
                "virtio-mmio slot {slot} at {:#x} ({:?})",
                MMIO_BASE + slot * MMIO_SLOT,
                transport.version()
            );
            info!("virtio: {want:?} on {at}");
            return Some((transport.into(), at));
        }
    }
    None
}
