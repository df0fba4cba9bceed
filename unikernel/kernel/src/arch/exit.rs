//! Ending QEMU through `isa-debug-exit` (iobase 0xf4, iosize 4): writing `v`
//! makes QEMU exit with status `(v << 1) | 1`.

use super::{halt_forever, outl};

const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Value written on success: QEMU exits with status 33.
pub const SUCCESS: u32 = 0x10;
/// Value written on failure (panic, fault, failed self-test): status 35.
pub const FAILURE: u32 = 0x11;

/// Ends QEMU with the given debug-exit value. If the device is absent the
/// CPU halts instead.
pub fn exit_qemu(value: u32) -> ! {
    outl(DEBUG_EXIT_PORT, value);
    halt_forever()
}

pub fn success() -> ! {
    exit_qemu(SUCCESS)
}

pub fn failure() -> ! {
    exit_qemu(FAILURE)
}
