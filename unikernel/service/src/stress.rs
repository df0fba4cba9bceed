//! The in-guest stress run: random page and kmalloc allocations and frees,
//! timed inside the guest.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use memd_mm::Prandom;
use memd_wire::{Gfp, StressReport};

use crate::check::CheckRun;
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

/// Operations per hold of the memory manager: a slice of a run, short
/// enough that the caller's budget is looked at every few tens of
/// microseconds.
pub const SLICE_OPS: u64 = 64;

/// A stress run in progress: `ops` operations (each an allocation or a
/// free) for one owner, run a slice at a time by [`Run::step`], then what
/// is left freed and the invariants checked, a slice at a time too;
/// [`Run::finish`] reports.
///
/// Each step picks one of [`SLOTS`] slots: a full slot is freed, an empty
/// one gets an order-0..=3 page block or a kmalloc of 8..=4096 bytes. The
/// slot table is allocated before the memory manager is borrowed, so the
/// timed loop does no heap work of its own.
pub struct Run {
    slots: alloc::vec::Vec<Slot>,
    rng: Prandom,
    ops: u64,
    done: u64,
    failed: u64,
    /// Time spent inside steps: the run's own time, not the passes it
    /// waited for.
    elapsed_ns: u64,
    /// The check that ends the run, once its operations are done.
    check: Option<CheckRun>,
}

impl Run {
    /// A run of `ops` operations with `seed`'s sequence.
    pub fn new(ops: u64, seed: u64) -> Run {
        Run {
            slots: vec![Slot::Empty; SLOTS],
            rng: Prandom::new(seed),
            ops,
            done: 0,
            failed: 0,
            elapsed_ns: 0,
            check: None,
        }
    }

    /// Operations left.
    pub fn left(&self) -> u64 {
        self.ops - self.done
    }

    /// How far the run got, for messages.
    pub fn describe(&self) -> String {
        match &self.check {
            Some(check) => format!(
                "a stress run ({} pageblocks of its check walked)",
                check.walked()
            ),
            None => format!("a stress run ({} ops left)", self.left()),
        }
    }

    /// Runs up to [`SLICE_OPS`] operations for `owner`, or once they are
    /// done a slice of the check that ends the run; true when the run is
    /// over.
    pub fn step<E: Env>(&mut self, env: &mut E, owner: u64) -> bool {
        if let Some(check) = &mut self.check {
            return check.step(env);
        }
        let n = self.left().min(SLICE_OPS);
        let start = env.now_ns();
        let (slots, rng, failed) = (&mut self.slots, &mut self.rng, &mut self.failed);
        env.with_mem_as(owner, |m, _| {
            for _ in 0..n {
                one_op(m, slots, rng, failed);
            }
        });
        self.elapsed_ns += env.now_ns().saturating_sub(start);
        self.done += n;
        if self.left() == 0 {
            // What is left is freed before the check, which then sees
            // memory as the run leaves it.
            self.release(env);
            self.check = Some(CheckRun::new());
        }
        false
    }

    /// Frees what the run still holds (for a run cut short, too).
    pub fn release<E: Env>(&mut self, env: &mut E) {
        let slots = &mut self.slots;
        env.with_mem(|m, _| {
            for s in slots.iter_mut() {
                free_slot(m, *s);
                *s = Slot::Empty;
            }
        });
    }

    /// The report of a run that is over.
    pub fn finish(&self) -> StressReport {
        let elapsed_ns = self.elapsed_ns.max(1);
        StressReport {
            ops: self.ops,
            failed_allocs: self.failed,
            elapsed_ns,
            ops_per_sec: ((self.ops as u128 * 1_000_000_000) / elapsed_ns as u128) as u64,
            check_ok: self.check.as_ref().is_some_and(CheckRun::ok),
        }
    }
}

fn free_slot<M: Memory>(m: &mut M, s: Slot) {
    match s {
        Slot::Pages(phys, order) => {
            let _ = m.free_pages(phys, order);
        }
        Slot::Object(obj) => {
            let _ = m.kfree(obj);
        }
        Slot::Empty => {}
    }
}

fn one_op<M: Memory>(m: &mut M, slots: &mut [Slot], rng: &mut Prandom, failed: &mut u64) {
    let r = rng.next_u64();
    let i = (r % SLOTS as u64) as usize;
    slots[i] = match slots[i] {
        full @ (Slot::Pages(..) | Slot::Object(_)) => {
            free_slot(m, full);
            Slot::Empty
        }
        Slot::Empty if (r >> 32) & 1 == 0 => {
            let order = ((r >> 33) % 4) as u8;
            match m.alloc_pages(order, Gfp::KERNEL) {
                Ok(phys) => Slot::Pages(phys, order),
                Err(_) => {
                    *failed += 1;
                    Slot::Empty
                }
            }
        }
        Slot::Empty => {
            let size = 8 + (r >> 33) % 4089;
            match m.kmalloc(size, Gfp::KERNEL) {
                Ok(obj) => Slot::Object(obj),
                Err(_) => {
                    *failed += 1;
                    Slot::Empty
                }
            }
        }
    };
}
