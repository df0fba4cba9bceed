//! The 16550 UART at 0x3f8 (COM1): the console.

use super::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;

/// Programs COM1 for 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1: 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR, RTS
}

/// Transmit FIFO depth of a 16550A (enabled in `init`).
const FIFO: usize = 16;

/// Waits (bounded: a missing or wedged UART must not hang the kernel) until
/// the transmitter is empty, i.e. the FIFO can take `FIFO` bytes.
fn wait_empty() {
    for _ in 0..100_000 {
        if inb(COM1 + 5) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
}

/// Writes bytes, turning `\n` into `\r\n`: one status read per FIFO-full
/// instead of one per byte (each port access is a VM exit or a TCG helper).
pub fn write_bytes(bytes: &[u8]) {
    let mut room = 0;
    let mut put = |b: u8| {
        if room == 0 {
            wait_empty();
            room = FIFO;
        }
        outb(COM1, b);
        room -= 1;
    };
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
}

/// A `fmt::Write` sink on COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}
