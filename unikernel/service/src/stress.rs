//! The in-guest stress run: random page and kmalloc allocations and frees,
//! timed inside the guest.

use alloc::vec;

use memd_wire::{Gfp, StressReport};

use crate::env::Env;
use crate::memory::{Memory, Obj};

/// Live allocations a run keeps at most.
pub const SLOTS: usize = 512;

#[derive(Clone, Copy)]
enum Slot {
    Empty,
    Pages(u64, u8),
    Object(Obj),
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Run `ops` operations (each an allocation or a free) for `owner`, then
/// free whatever is left and check the invariants.
///
/// Each step picks one of [`SLOTS`] slots: a full slot is freed, an empty
/// one gets an order-0..=3 page block or a kmalloc of 8..=4096 bytes. The
/// slot table is allocated before the memory manager is borrowed, so the
/// timed loop does no heap work of its own.
pub fn run<E: Env>(env: &mut E, owner: u64, ops: u64, seed: u64) -> StressReport {
    let mut slots = vec![Slot::Empty; SLOTS];
    let mut rng = Rng(seed | 1);
    let start = env.now_ns();
    let mut failed = 0u64;
    env.with_mem(|m, _| {
        m.set_owner(owner);
        for _ in 0..ops {
            let r = rng.next();
            let i = (r % SLOTS as u64) as usize;
            slots[i] = match slots[i] {
                Slot::Pages(phys, order) => {
                    let _ = m.free_pages(phys, order);
                    Slot::Empty
                }
                Slot::Object(obj) => {
                    let _ = m.kfree(obj);
                    Slot::Empty
                }
                Slot::Empty if (r >> 32) & 1 == 0 => {
                    let order = ((r >> 33) % 4) as u8;
                    match m.alloc_pages(order, Gfp::KERNEL) {
                        Ok(phys) => Slot::Pages(phys, order),
                        Err(_) => {
                            failed += 1;
                            Slot::Empty
                        }
                    }
                }
                Slot::Empty => {
                    let size = 8 + (r >> 33) % 4089;
                    match m.kmalloc(size, Gfp::KERNEL) {
                        Ok(obj) => Slot::Object(obj),
                        Err(_) => {
                            failed += 1;
                            Slot::Empty
                        }
                    }
                }
            };
        }
    });
    let elapsed_ns = env.now_ns().saturating_sub(start).max(1);
    let check_ok = env.with_mem(|m, _| {
        for s in slots.iter_mut() {
            match *s {
                Slot::Pages(phys, order) => {
                    let _ = m.free_pages(phys, order);
                }
                Slot::Object(obj) => {
                    let _ = m.kfree(obj);
                }
                Slot::Empty => {}
            }
            *s = Slot::Empty;
        }
        m.check().is_ok()
    });
    StressReport {
        ops,
        failed_allocs: failed,
        elapsed_ns,
        ops_per_sec: ((ops as u128 * 1_000_000_000) / elapsed_ns as u128) as u64,
        check_ok,
    }
}
