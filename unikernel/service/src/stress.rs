//! The in-guest stress run: random page and kmalloc allocations and frees,
//! on one CPU or on several at once, timed inside the guest.
//!
//! Each CPU taking part keeps [`SLOTS`] slots of its own; each operation
//! picks one: a full slot is freed, an empty one gets an order-0..=3 page
//! block or a kmalloc of 8..=4096 bytes. The CPUs take operations from
//! one shared count, a chunk at a time, so they finish together whatever
//! else each is doing.
//!
//! The network loop's CPU runs its share a slice at a time, between the
//! loop's other work, like any long operation. Where the environment has
//! per-CPU memory ([`Env::percpu`]) every CPU allocates through its own
//! caches, in front of the manager's lock, and the run's memory is the
//! kernel's while it runs; the other CPUs run their shares whole, as jobs
//! ([`Env::queue_on`]). Without it the run takes one CPU and the manager
//! behind `with_mem`, charged to the client.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memd_mm::{KObj, PageBlock, Prandom};
use memd_wire::{errno, Gfp, StressReport};

use crate::check::CheckRun;
use crate::env::Env;
use crate::memory::{Memory, Obj};
use crate::percpu::PerCpuMemory;

/// Live allocations each CPU's share keeps at most.
pub const SLOTS: usize = 512;

/// Operations per hold of the memory manager: a slice of a run, short
/// enough that the caller's budget is looked at every few tens of
/// microseconds.
pub const SLICE_OPS: u64 = 64;

/// Operations a job on another CPU takes from the shared count at a time.
const JOB_CHUNK: u64 = 4 * SLICE_OPS;

/// What a run's operations allocate from.
trait Alloc {
    type Pages;
    type Object;
    fn alloc_pages(&mut self, order: u8) -> Option<Self::Pages>;
    fn free_pages(&mut self, pages: Self::Pages);
    fn kmalloc(&mut self, size: u64) -> Option<Self::Object>;
    fn kfree(&mut self, obj: Self::Object);
}

/// The manager, lent by `with_mem`.
struct Locked<'a, M>(&'a mut M);

impl<M: Memory> Alloc for Locked<'_, M> {
    type Pages = (u64, u8);
    type Object = Obj;

    fn alloc_pages(&mut self, order: u8) -> Option<(u64, u8)> {
        self.0
            .alloc_pages(order, Gfp::KERNEL)
            .ok()
            .map(|p| (p, order))
    }

    fn free_pages(&mut self, (phys, order): (u64, u8)) {
        let _ = self.0.free_pages(phys, order);
    }

    fn kmalloc(&mut self, size: u64) -> Option<Obj> {
        self.0.kmalloc(size, Gfp::KERNEL).ok()
    }

    fn kfree(&mut self, obj: Obj) {
        let _ = self.0.kfree(obj);
    }
}

/// The calling CPU's caches.
struct Cpu(&'static dyn PerCpuMemory);

impl Alloc for Cpu {
    type Pages = PageBlock;
    type Object = KObj;

    fn alloc_pages(&mut self, order: u8) -> Option<PageBlock> {
        self.0.alloc_pages(order as u32)
    }

    fn free_pages(&mut self, pages: PageBlock) {
        self.0.free_pages(pages);
    }

    fn kmalloc(&mut self, size: u64) -> Option<KObj> {
        self.0.kmalloc(size as usize)
    }

    fn kfree(&mut self, obj: KObj) {
        self.0.kfree(obj);
    }
}

enum Slot<P, O> {
    Empty,
    Pages(P),
    Object(O),
}

/// One CPU's share: its slots and its sequence. The slot table is
/// allocated before the share runs, so the timed loop does no heap work of
/// its own.
struct Part<P, O> {
    slots: Vec<Slot<P, O>>,
    rng: Prandom,
    ops: u64,
    failed: u64,
}

impl<P, O> Part<P, O> {
    fn new(seed: u64) -> Self {
        Part {
            slots: (0..SLOTS).map(|_| Slot::Empty).collect(),
            rng: Prandom::new(seed),
            ops: 0,
            failed: 0,
        }
    }

    fn run<A: Alloc<Pages = P, Object = O>>(&mut self, a: &mut A, n: u64) {
        for _ in 0..n {
            let r = self.rng.next_u64();
            let i = (r % SLOTS as u64) as usize;
            let slot = &mut self.slots[i];
            *slot = match core::mem::replace(slot, Slot::Empty) {
                Slot::Pages(p) => {
                    a.free_pages(p);
                    Slot::Empty
                }
                Slot::Object(o) => {
                    a.kfree(o);
                    Slot::Empty
                }
                Slot::Empty if (r >> 32) & 1 == 0 => match a.alloc_pages(((r >> 33) % 4) as u8) {
                    Some(p) => Slot::Pages(p),
                    None => {
                        self.failed += 1;
                        Slot::Empty
                    }
                },
                Slot::Empty => match a.kmalloc(8 + (r >> 33) % 4089) {
                    Some(o) => Slot::Object(o),
                    None => {
                        self.failed += 1;
                        Slot::Empty
                    }
                },
            };
        }
        self.ops += n;
    }

    /// Frees what the share still holds.
    fn release<A: Alloc<Pages = P, Object = O>>(&mut self, a: &mut A) {
        for slot in &mut self.slots {
            match core::mem::replace(slot, Slot::Empty) {
                Slot::Pages(p) => a.free_pages(p),
                Slot::Object(o) => a.kfree(o),
                Slot::Empty => {}
            }
        }
    }
}

/// What the CPUs of a run share.
struct Shared {
    /// Operations no CPU has taken yet.
    left: AtomicU64,
    /// Jobs on other CPUs not yet done.
    running: AtomicU32,
    /// Failed allocations of the jobs.
    failed: AtomicU64,
    /// Operations each CPU ran, the network loop's first.
    cpu_ops: Vec<AtomicU64>,
}

impl Shared {
    /// Takes up to `n` operations; how many.
    fn take(&self, n: u64) -> u64 {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left - left.min(n))
            })
            .map_or(0, |left| left.min(n))
    }
}

/// The network loop's CPU's share.
enum Home {
    Locked(Part<(u64, u8), Obj>),
    Cpu(Part<PageBlock, KObj>, &'static dyn PerCpuMemory),
    /// Its operations are done and what it held is freed.
    Released,
}

/// A stress run in progress: `ops` operations, run by [`Run::step`] (and
/// by jobs on other CPUs), then the invariants checked a slice at a time;
/// [`Run::finish`] reports.
pub struct Run {
    ops: u64,
    cpus: u32,
    home: Home,
    shared: Arc<Shared>,
    started_ns: u64,
    /// From the start to the last operation's end.
    elapsed_ns: u64,
    /// The check that ends the run, once every CPU is done.
    check: Option<CheckRun>,
}

/// What a [`Run::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ran a slice; more to come.
    Ran,
    /// Nothing to do until jobs on other CPUs end.
    Waiting,
    /// The run is over.
    Done,
}

impl Run {
    /// Starts a run of `ops` operations with `seed`'s sequence on `cpus`
    /// CPUs (0 counts as 1): the jobs for the other CPUs are queued now.
    pub fn start<E: Env>(
        env: &mut E,
        ops: u64,
        seed: u64,
        cpus: u32,
    ) -> Result<Run, (i32, String)> {
        let cpus = cpus.max(1);
        let percpu = env.percpu();
        let have = 1 + if percpu.is_some() { env.work_cpus() } else { 0 };
        if cpus as usize > have {
            return Err((
                errno::EINVAL,
                format!("--cpus {cpus}: memd runs stress on {have} CPU(s) here"),
            ));
        }
        let shared = Arc::new(Shared {
            left: AtomicU64::new(ops),
            running: AtomicU32::new(0),
            failed: AtomicU64::new(0),
            cpu_ops: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
        });
        let home = match percpu {
            Some(mem) => Home::Cpu(Part::new(seed), mem),
            None => Home::Locked(Part::new(seed)),
        };
        let started_ns = env.now_ns();
        for (cpu, mem) in (1..cpus as usize).filter_map(|k| Some((k, percpu?))) {
            let job_shared = Arc::clone(&shared);
            shared.running.fetch_add(1, Ordering::AcqRel);
            let job = alloc::boxed::Box::new(move || job(mem, job_shared, cpu, seed));
            if env.queue_on(cpu, job).is_err() {
                shared.running.fetch_sub(1, Ordering::AcqRel);
                // The jobs queued already find nothing left and end.
                shared.left.store(0, Ordering::Relaxed);
                return Err((
                    errno::EBUSY,
                    format!("CPU {cpu} is still running an earlier job"),
                ));
            }
        }
        Ok(Run {
            ops,
            cpus,
            home,
            shared,
            started_ns,
            elapsed_ns: 0,
            check: None,
        })
    }

    /// How far the run got, for messages.
    pub fn describe(&self) -> String {
        match &self.check {
            Some(check) => format!(
                "a stress run ({} pageblocks of its check walked)",
                check.walked()
            ),
            None => format!(
                "a stress run ({} ops left, {} CPUs)",
                self.shared.left.load(Ordering::Relaxed),
                self.cpus
            ),
        }
    }

    /// Runs up to [`SLICE_OPS`] of the network loop's CPU's operations for
    /// `owner`; once they are done, waits for the other CPUs, then runs
    /// the check that ends the run a slice at a time.
    pub fn step<E: Env>(&mut self, env: &mut E, owner: u64) -> Step {
        if let Some(check) = &mut self.check {
            return if check.step(env) {
                Step::Done
            } else {
                Step::Ran
            };
        }
        let n = self.shared.take(SLICE_OPS);
        if n > 0 {
            match &mut self.home {
                Home::Locked(part) => env.with_mem_as(owner, |m, _| part.run(&mut Locked(m), n)),
                Home::Cpu(part, mem) => {
                    mem.enter();
                    part.run(&mut Cpu(*mem), n);
                    mem.pause();
                }
                Home::Released => {}
            }
            return Step::Ran;
        }
        self.release(env);
        if self.shared.running.load(Ordering::Acquire) > 0 {
            return Step::Waiting;
        }
        self.elapsed_ns = env.now_ns().saturating_sub(self.started_ns);
        // Memory is as the run leaves it: every CPU's caches emptied.
        self.check = Some(CheckRun::new());
        Step::Ran
    }

    /// Frees what the network loop's CPU's share holds and stops the other
    /// CPUs' jobs at their next chunk (for a run cut short, too).
    pub fn release<E: Env>(&mut self, env: &mut E) {
        self.shared.left.store(0, Ordering::Relaxed);
        let (ops, failed) = match core::mem::replace(&mut self.home, Home::Released) {
            Home::Locked(mut part) => {
                env.with_mem(|m, _| part.release(&mut Locked(m)));
                (part.ops, part.failed)
            }
            Home::Cpu(mut part, mem) => {
                mem.enter();
                part.release(&mut Cpu(mem));
                mem.leave();
                (part.ops, part.failed)
            }
            Home::Released => return,
        };
        self.shared.cpu_ops[0].store(ops, Ordering::Relaxed);
        self.shared.failed.fetch_add(failed, Ordering::Relaxed);
    }

    /// The report of a run that is over.
    pub fn finish(&self) -> StressReport {
        let elapsed_ns = self.elapsed_ns.max(1);
        StressReport {
            ops: self.ops,
            failed_allocs: self.shared.failed.load(Ordering::Relaxed),
            elapsed_ns,
            ops_per_sec: ((self.ops as u128 * 1_000_000_000) / elapsed_ns as u128) as u64,
            check_ok: self.check.as_ref().is_some_and(CheckRun::ok),
            cpus: self.cpus,
            cpu_ops: self
                .shared
                .cpu_ops
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// CPU `cpu`'s share, run whole on that CPU through its caches, which it
/// empties before it ends; it says it is done once it holds nothing of the
/// heap's but its share of `shared`, which the run still holds too.
fn job(mem: &'static dyn PerCpuMemory, shared: Arc<Shared>, cpu: usize, seed: u64) {
    let mut part = Part::new(seed ^ (cpu as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    mem.enter();
    loop {
        let n = shared.take(JOB_CHUNK);
        if n == 0 {
            break;
        }
        part.run(&mut Cpu(mem), n);
    }
    part.release(&mut Cpu(mem));
    mem.leave();
    shared.cpu_ops[cpu].store(part.ops, Ordering::Relaxed);
    shared.failed.fetch_add(part.failed, Ordering::Relaxed);
    drop(part);
    shared.running.fetch_sub(1, Ordering::AcqRel);
}
