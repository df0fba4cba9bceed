//! PCI for virtio: configuration space through the legacy port-I/O
//! mechanism (0xcf8/0xcfc: q35 under SeaBIOS), or, where no host bridge
//! answers there, through the ECAM window of microvm's PCIe host
//! (`-M microvm,pcie=on`, ECAM at 0xe0000000); the buses behind bridges
//! too (libvirt puts its devices behind PCIe root ports, whose buses the
//! firmware numbered); BAR assignment on bus 0 where the firmware left
//! BARs at zero (qboot does), memory decoding and bus mastering switched
//! on, then virtio-drivers' PCI transport.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::ops::Range;

use log::{info, warn};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, HeaderType,
    MemoryBarType, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::hal::MemdHal;
use crate::arch;

/// Where BARs the firmware left unassigned are placed, per root complex:
/// q35's 32-bit window above its ECAM (0xb0000000..0xc0000000), below the
/// IOAPIC; microvm's 32-bit PCIe MMIO window, below its ECAM.
const Q35_BAR_WINDOW: Range<u64> = 0xc000_0000..0xfec0_0000;
const MICROVM_BAR_WINDOW: Range<u64> = 0xc000_0000..0xe000_0000;
/// microvm's PCIe ECAM (QEMU's MICROVM_PCIE_ECAM_BASE), 256 MiB.
const MICROVM_ECAM: u64 = 0xe000_0000;
const ECAM_SIZE: u64 = 256 << 20;

/// Configuration access through ports 0xcf8/0xcfc.
pub struct PortIoCam;

impl ConfigurationAccess for PortIoCam {
    fn read_word(&self, df: DeviceFunction, register_offset: u8) -> u32 {
        arch::pci_config_read(df.bus, df.device, df.function, register_offset)
    }

    fn write_word(&mut self, df: DeviceFunction, register_offset: u8, data: u32) {
        arch::pci_config_write(df.bus, df.device, df.function, register_offset, data)
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortIoCam
    }
}

/// End of the highest memory BAR already assigned inside `BAR_WINDOW`.
fn assigned_top<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    devices: &[DeviceFunction],
    window: &Range<u64>,
) -> u64 {
    let mut top = window.start;
    for &df in devices {
        let Ok(bars) = root.bars(df) else { continue };
        for bar in bars.iter().flatten() {
            if let BarInfo::Memory { address, size, .. } = *bar {
                if address != 0 && window.contains(&address) {
                    top = top.max(address + size);
                }
            }
        }
    }
    top
}

/// Gives every zero memory BAR of `df` an address in `window`.
fn assign_bars<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    df: DeviceFunction,
    next: &mut u64,
    window: &Range<u64>,
) -> Result<(), &'static str> {
    let bars = root.bars(df).map_err(|_| "cannot read BARs")?;
    for (index, bar) in bars.iter().enumerate() {
        let Some(BarInfo::Memory {
            address_type,
            address: 0,
            size,
            ..
        }) = *bar
        else {
            continue;
        };
        if size == 0 {
            continue;
        }
        let at = next.next_multiple_of(size.max(4096));
        if at + size > window.end {
            return Err("no room left for BARs in the 32-bit PCI window");
        }
        match address_type {
            MemoryBarType::Width32 => root.set_bar_32(df, index as u8, at as u32),
            MemoryBarType::Width64 => root.set_bar_64(df, index as u8, at),
            MemoryBarType::Below1MiB => return Err("BAR must be below 1 MiB"),
        }
        info!("pci {df}: BAR{index} assigned {at:#x} ({size:#x} bytes)");
        *next = at + size;
    }
    Ok(())
}

/// Configuration offset of a bridge's primary, secondary and subordinate
/// bus numbers (header type 1).
const BRIDGE_BUSES: u8 = 0x18;

/// The first virtio PCI device of type `want` behind the port-I/O
/// configuration mechanism (q35).
pub fn find(want: DeviceType) -> Option<(SomeTransport<'static>, String)> {
    // No host bridge at 00:00.0 (microvm has no port-I/O PCI): skip the scan.
    let id = arch::pci_config_read(0, 0, 0, 0);
    if id == 0 || id == u32::MAX {
        return None;
    }
    let probe = PortIoCam;
    let buses = move |df: DeviceFunction| probe.read_word(df, BRIDGE_BUSES);
    find_on(
        PciRoot::new(PortIoCam),
        &buses,
        want,
        &Q35_BAR_WINDOW,
        "PCI",
    )
}

/// As `find`, behind microvm's PCIe ECAM, if that host bridge exists.
pub fn find_ecam(want: DeviceType) -> Option<(SomeTransport<'static>, String)> {
    let virt = super::hal::map_device(MICROVM_ECAM, ECAM_SIZE).ok()?;
    // Without a host bridge at 00:00.0 there is no PCIe here: skip the scan.
    // SAFETY: the first word of the ECAM window (vendor/device id of
    // 00:00.0), mapped uncached just above; a read-only register.
    let id = unsafe { core::ptr::read_volatile(virt as *const u32) };
    if id == 0 || id == u32::MAX {
        return None;
    }
    // SAFETY: the 256 MiB ECAM window is mapped uncached for the kernel's
    // lifetime (`map_device`) and nothing else in the kernel touches it; if
    // no host bridge decodes it, reads return all-ones and enumeration finds
    // no device.
    let cam = unsafe { MmioCam::new(virt as *mut u8, Cam::Ecam) };
    // SAFETY: the clone only reads bridges' bus-number registers, which
    // nothing writes while the scan runs.
    let probe = unsafe { cam.unsafe_clone() };
    let buses = move |df: DeviceFunction| probe.read_word(df, BRIDGE_BUSES);
    find_on(
        PciRoot::new(cam),
        &buses,
        want,
        &MICROVM_BAR_WINDOW,
        "PCIe (ECAM)",
    )
}

/// Every function on bus 0 and on the buses behind its bridges, bus 0's
/// first. `buses` reads a bridge's bus-number register.
fn functions<C: ConfigurationAccess>(
    root: &PciRoot<C>,
    buses: &dyn Fn(DeviceFunction) -> u32,
) -> Vec<(DeviceFunction, DeviceFunctionInfo)> {
    let mut all = Vec::new();
    let mut seen = [false; 256];
    let mut queue = alloc::vec![0u8];
    seen[0] = true;
    let mut next = 0;
    while let Some(&bus) = queue.get(next) {
        next += 1;
        for (df, info) in root.enumerate_bus(bus) {
            if info.header_type == HeaderType::PciPciBridge {
                let secondary = (buses(df) >> 8) as u8;
                if secondary != 0 && !seen[secondary as usize] {
                    seen[secondary as usize] = true;
                    queue.push(secondary);
                }
            }
            all.push((df, info));
        }
    }
    all
}

fn find_on<C: ConfigurationAccess>(
    mut root: PciRoot<C>,
    buses: &dyn Fn(DeviceFunction) -> u32,
    want: DeviceType,
    window: &Range<u64>,
    bus_name: &str,
) -> Option<(SomeTransport<'static>, String)> {
    let all = functions(&root, buses);
    if all.is_empty() {
        return None;
    }
    let on_bus0: Vec<DeviceFunction> = all
        .iter()
        .map(|(df, _)| *df)
        .filter(|df| df.bus == 0)
        .collect();
    let (df, info) = all
        .into_iter()
        .find(|(_, info)| virtio_device_type(info) == Some(want))?;
    // Behind a bridge, BARs must sit in its window: only the firmware that
    // set the windows assigns them there.
    if df.bus == 0 {
        let mut next = assigned_top(&mut root, &on_bus0, window);
        if let Err(e) = assign_bars(&mut root, df, &mut next, window) {
            warn!("pci {df}: {e}");
            return None;
        }
    }
    let (_, command) = root.get_status_command(df);
    root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
    match PciTransport::new::<MemdHal, _>(&mut root, df) {
        Ok(t) => {
            let mut at = String::new();
            let _ = write!(
                at,
                "{bus_name} {df} ({:04x}:{:04x})",
                info.vendor_id, info.device_id
            );
            info!("virtio: {want:?} on {at}");
            Some((t.into(), at))
        }
        Err(e) => {
            warn!("pci {df}: virtio transport: {e:?}");
            None
        }
    }
}
