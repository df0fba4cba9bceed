//! Batches, run in turns: operations go one after another (plain
//! allocations and frees in runs, see `bulk`) until the turn's budget is
//! spent; then the batch, its reply so far and any long operation it is in
//! the middle of wait for the connection's next turn. The reply is one
//! frame, in operation order, whatever the number of turns.

use alloc::format;
use alloc::vec::Vec;

use memd_wire::{
    errno, Batch, BatchReplyMark, BatchReplyWriter, FrameError, Op, Reply, Response, WireError,
    MAX_BATCH_OPS, MAX_IO,
};

use super::budget::Budget;
use super::bulk::{Stretch, FINAL_ENTRY_ROOM};
use super::work::Work;
use super::{err, mem_err, Flow, Outcome, Service};
use crate::env::Env;
use crate::memory::Memory;
use crate::ConnId;

/// Plain operations per hold of the memory manager: about 100 µs under
/// TCG, so the budget is looked at between runs.
const BULK_SLICE: usize = 256;

/// A batch in progress.
pub(super) struct BatchJob {
    state: State,
    /// The reply so far once the batch has waited for a turn (its
    /// `state.mark` is set then); before that it is built straight into
    /// the connection's output.
    reply: Vec<u8>,
}

struct State {
    ops: alloc::vec::IntoIter<Op>,
    total: usize,
    stop_on_error: bool,
    stretch: Stretch,
    /// Reply bytes DMA reads may still take.
    io_budget: usize,
    mark: Option<BatchReplyMark>,
    /// The long operation the batch is in the middle of.
    work: Option<Work>,
}

impl State {
    /// Operations taken from the batch so far (run, or the one running).
    fn done(&self) -> usize {
        self.total - self.ops.len()
    }
}

impl BatchJob {
    /// `batch`, not started.
    pub(super) fn new(batch: Batch) -> Self {
        BatchJob {
            state: State {
                total: batch.ops.len(),
                ops: batch.ops.into_iter(),
                stop_on_error: batch.stop_on_error,
                stretch: Stretch::default(),
                io_budget: MAX_IO,
                mark: None,
                work: None,
            },
            reply: Vec::new(),
        }
    }

    /// The long operation in progress, if any.
    pub(super) fn work(&self) -> Option<&Work> {
        self.state.work.as_ref()
    }

    /// The long operation in progress, taken out (the connection left).
    pub(super) fn take_work(&mut self) -> Option<Work> {
        self.state.work.take()
    }
}

/// Appends op `i`'s result to a batch reply of `total` ops, keeping room
/// for one final error entry. When it does not fit, the entry says how far
/// the batch got instead, and the batch stops (false): the op ran, so its
/// result is not silently dropped.
fn push_result(
    reply: &mut BatchReplyWriter,
    r: &Result<Reply, WireError>,
    i: usize,
    total: usize,
) -> bool {
    if reply.push(r, FINAL_ENTRY_ROOM).is_ok() {
        return true;
    }
    let _ = reply.push(
        &Err(err(
            errno::E2BIG,
            format!(
                "batch reply full: op {i} ran but its result was dropped; {} ops not run",
                total - i - 1
            ),
        )),
        0,
    );
    false
}

impl<M: Memory> Service<M> {
    /// What a batch's turn (`turn`, from `batch_turn`) means for its
    /// connection; None while the batch waits for another turn.
    pub(super) fn batch_flow(
        &mut self,
        conn: ConnId,
        turn: Result<bool, FrameError>,
        out: &mut Vec<u8>,
    ) -> Option<Flow> {
        match turn {
            Ok(false) => None,
            Ok(true) => Some(self.flow()),
            Err(e) => {
                Some(
                    self.unsent_reply(conn, out, e, "batch reply", |error| Response::Error {
                        error,
                        closing: false,
                    }),
                )
            }
        }
    }

    /// Runs `job` for one turn. Ok(true): the batch ended and its reply
    /// frame is at the end of `out`; Ok(false): it waits for another turn.
    pub(super) fn batch_turn<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        job: &mut BatchJob,
        out: &mut Vec<u8>,
        budget: &Budget,
    ) -> Result<bool, FrameError> {
        // Set aside after an earlier turn: its frame is in `job.reply`.
        let moved = job.state.mark.is_some();
        let buf = if moved { &mut job.reply } else { &mut *out };
        let st = &mut job.state;
        let mut reply = match st.mark {
            Some(mark) => BatchReplyWriter::resume(buf, mark),
            None => {
                // Room for the usual reply: an object's handle, address and size.
                let mut reply = BatchReplyWriter::new(buf, st.total.min(MAX_BATCH_OPS) * 24)?;
                if st.total > MAX_BATCH_OPS {
                    let _ = reply.push(
                        &Err(err(
                            errno::E2BIG,
                            format!("batch of {} ops exceeds {MAX_BATCH_OPS}", st.total),
                        )),
                        0,
                    );
                    reply.finish()?;
                    return Ok(true);
                }
                reply
            }
        };
        let finished = self.batch_ops(env, conn, st, &mut reply, budget);
        if finished {
            reply.finish()?;
            if moved {
                if out.is_empty() {
                    core::mem::swap(out, &mut job.reply);
                } else {
                    out.try_reserve(job.reply.len())
                        .map_err(|_| FrameError::NoMemory {
                            len: job.reply.len(),
                        })?;
                    out.append(&mut job.reply);
                }
            }
            return Ok(true);
        }
        let mark = reply.suspend();
        if !moved && mark.start() == 0 {
            // Set aside: the output buffer is sent as it is, so the partial
            // frame moves to the batch's own buffer; alone there, it moves
            // whole, uncopied.
            core::mem::swap(out, &mut job.reply);
            st.mark = Some(mark);
        } else if !moved {
            let part = &out[mark.start()..];
            job.reply
                .try_reserve_exact(part.len())
                .map_err(|_| FrameError::NoMemory { len: part.len() })?;
            job.reply.extend_from_slice(part);
            out.truncate(mark.start());
            st.mark = Some(mark.rebased(0));
        } else {
            st.mark = Some(mark);
        }
        Ok(false)
    }

    /// Runs the batch's operations until it ends (true) or `budget` is
    /// spent.
    fn batch_ops<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        st: &mut State,
        reply: &mut BatchReplyWriter,
        budget: &Budget,
    ) -> bool {
        let total = st.total;
        if let Some(work) = st.work.as_mut() {
            let Some(r) = self.run_work(env, conn, work, budget) else {
                return false;
            };
            st.work = None;
            self.count_result(conn, &r);
            if !push_result(reply, &r, st.done() - 1, total) || (r.is_err() && st.stop_on_error) {
                return true;
            }
        }
        loop {
            if st.ops.as_slice().is_empty() {
                return true;
            }
            if budget.spent(env) {
                return false;
            }
            st.stretch.renew(st.ops.as_slice());
            let run = self.run_bulk(
                env,
                conn,
                st.ops.as_slice(),
                &mut st.stretch,
                reply,
                BULK_SLICE,
            );
            if run.ran > 0 {
                st.ops.nth(run.ran - 1);
                if let Some(e) = run.refused {
                    let r = Err(mem_err(e));
                    if !push_result(reply, &r, st.done() - 1, total) || st.stop_on_error {
                        return true;
                    }
                }
                continue;
            }
            let Some(op) = st.ops.next() else {
                return true;
            };
            st.stretch.consume(&op);
            let r = match self.run_op(env, conn, op, &mut st.io_budget, budget) {
                Outcome::Done(r) => r,
                Outcome::Pending(work) => {
                    st.work = Some(work);
                    return false;
                }
            };
            if !push_result(reply, &r, st.done() - 1, total) || (r.is_err() && st.stop_on_error) {
                return true;
            }
        }
    }
}
