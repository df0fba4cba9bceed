//! Long operations, run a slice at a time.
//!
//! Filling, checksumming, copying or moving a DMA buffer to and from the
//! disk (`dma_work`), walking the memory map (`map`) and a stress run take
//! as long as their size makes them: a 4 MiB buffer is milliseconds of
//! guest time under TCG. Each runs here as [`Work`], in slices of a few
//! tens of microseconds, until the turn's [`Budget`] is spent; what is
//! left waits for the connection's next turn, like a long loop in Linux
//! that calls `cond_resched()`.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use memd_wire::{errno, Batch, Op, Reply, WireError};

use super::budget::Budget;
use super::dma_work::{DmaWork, Slice, ZERO_SLICE};
use super::map::MapWork;
use super::offload::Pending;
use super::{err, Service};
use crate::check::CheckRun;
use crate::env::Env;
use crate::memory::Memory;
use crate::stress;
use crate::ConnId;

/// Whether `op` runs as [`Work`], in slices.
pub(super) fn is_long(op: &Op) -> bool {
    // A buffer from the buddy is a whole block, as large as its alignment:
    // that span is what gets zeroed.
    matches!(op, Op::DmaAlloc { len, align, .. } if (*len).max(*align) > ZERO_SLICE as u64)
        || matches!(
            op,
            Op::MemMap
                | Op::DmaFill { .. }
                | Op::DmaChecksum { .. }
                | Op::DmaWrite { .. }
                | Op::DmaRead { .. }
                | Op::DmaWriteDisk { .. }
                | Op::DmaReadDisk { .. }
                | Op::Stress { .. }
                | Op::Check
        )
}

/// A long operation in progress.
pub(super) enum Work {
    Dma(DmaWork),
    Stress(stress::Run),
    Check(CheckRun),
    Map(Box<MapWork>),
}

/// What a departed connection's DMA buffer `handle` is waiting for before
/// it can be freed.
pub(super) struct InFlight {
    pub(super) handle: u64,
    pub(super) wait: Wait,
}

/// Who holds a departed connection's DMA buffer.
pub(super) enum Wait {
    /// The device: bytes `[from, to)` are in a request in flight.
    Disk { from: usize, to: usize },
    /// A job on another CPU, with the buffer's bytes.
    Job(Pending),
}

impl Work {
    /// The DMA buffer this work leases, if any.
    pub(super) fn leases(&self) -> Option<u64> {
        match self {
            Work::Dma(w) => Some(w.handle),
            Work::Stress(_) | Work::Check(_) | Work::Map(_) => None,
        }
    }

    /// What the work is, and how far it got, for messages.
    pub(super) fn describe(&self) -> String {
        match self {
            Work::Dma(w) => w.describe(),
            Work::Stress(r) => r.describe(),
            Work::Check(c) => format!("a check ({} pageblocks walked)", c.walked()),
            Work::Map(m) => format!(
                "a memory map ({} of {} frames walked)",
                m.walked(),
                m.frames()
            ),
        }
    }

    /// Gives back what the work holds of its own, for a connection that
    /// left before it ended (a stress run's allocations). A disk request
    /// in flight, or a job on another CPU, is returned: the buffer is the
    /// device's, or the job's, until it is done.
    pub(super) fn abandon<E: Env>(mut self, env: &mut E) -> Option<InFlight> {
        match &mut self {
            Work::Stress(r) => {
                r.release(env);
                None
            }
            Work::Dma(w) => {
                let wait = match w.take_pending() {
                    Some(job) => Some(Wait::Job(job)),
                    None => w.in_flight().map(|(from, to)| Wait::Disk { from, to }),
                };
                wait.map(|wait| InFlight {
                    handle: w.handle,
                    wait,
                })
            }
            Work::Check(_) | Work::Map(_) => None,
        }
    }
}

impl<M: Memory> Service<M> {
    /// The long operation that leases DMA buffer `handle` of `conn`, if
    /// one does, described for a message.
    pub(super) fn leased(&self, conn: ConnId, handle: u64) -> Option<String> {
        let work = self.conns.get(&conn)?.job.as_ref()?.work()?;
        (work.leases() == Some(handle)).then(|| work.describe())
    }

    /// Checks `op` (one [`is_long`] says yes to) and sets up its work;
    /// reads count against `io_budget`, the reply frame's room.
    pub(super) fn start_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
        io_budget: &mut usize,
    ) -> Result<Work, WireError> {
        match op {
            Op::MemMap => self.start_map(env).map(Work::Map),
            Op::Stress { ops, seed, cpus } => self.start_stress(env, ops, seed, cpus),
            Op::Check => Ok(Work::Check(CheckRun::new())),
            op => self.start_dma_work(env, conn, op, io_budget).map(Work::Dma),
        }
    }

    /// Refuses a batch that asks for more work than one request may
    /// ([`super::Config::max_request_work`]), before any of it runs.
    pub(super) fn check_batch_work(&self, conn: ConnId, batch: &Batch) -> Result<(), WireError> {
        let cap = self.config.max_request_work;
        let mut total: u64 = 0;
        for op in &batch.ops {
            total = total.saturating_add(self.work_of(conn, op));
            if total > cap {
                return Err(err(
                    errno::E2BIG,
                    format!(
                        "batch asks for more than {cap} units of work (a stress op is one, a DMA buffer one per 64 bytes)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The work `op` asks for, in [`super::Config::max_request_work`]'s units.
    fn work_of(&self, conn: ConnId, op: &Op) -> u64 {
        let buffer = |h: u64| self.dma(conn, h).map_or(1, |(_, len)| len.div_ceil(64));
        match *op {
            Op::Stress { ops, .. } => ops,
            Op::DmaFill { handle, .. }
            | Op::DmaWriteDisk { handle, .. }
            | Op::DmaReadDisk { handle, .. } => buffer(handle),
            Op::DmaChecksum { handle, len: 0, .. } => buffer(handle),
            Op::DmaChecksum { len, .. } => len.div_ceil(64),
            Op::DmaRead { len, .. } => u64::from(len).div_ceil(64),
            Op::DmaWrite { ref data, .. } => (data.len() as u64).div_ceil(64),
            _ => 1,
        }
    }

    /// Runs slices of `work` until it ends (its result) or `budget` is
    /// spent (None: call again on a later turn).
    pub(super) fn run_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        work: &mut Work,
        budget: &Budget,
    ) -> Option<Result<Reply, WireError>> {
        loop {
            let done = match work {
                Work::Stress(run) => match run.step(env, self.owner(conn)) {
                    stress::Step::Done => true,
                    stress::Step::Ran => false,
                    stress::Step::Waiting => return None,
                },
                Work::Check(check) => check.step(env),
                Work::Map(map) => self.map_slice(env, map),
                Work::Dma(w) => match self.dma_slice(env, conn, w) {
                    Ok(Slice::Done) => true,
                    Ok(Slice::Moved) => false,
                    Ok(Slice::Waiting) => return None,
                    // The device still holds the buffer: the error waits
                    // for it (a lookup cannot fail while the lease holds
                    // the handle).
                    Err(_) if w.in_flight().is_some() => return None,
                    Err(e) => return Some(Err(e)),
                },
            };
            if done {
                return Some(self.finish_work(work));
            }
            if budget.work_spent(env) {
                return None;
            }
        }
    }

    /// The reply of work that has run to its end.
    fn finish_work(&mut self, work: &mut Work) -> Result<Reply, WireError> {
        match work {
            Work::Map(map) => self.finish_map(map),
            Work::Stress(run) => Ok(Reply::Stress(run.finish())),
            Work::Check(check) => Ok(Reply::Check(check.report())),
            Work::Dma(w) => Ok(w.finish()),
        }
    }
}
