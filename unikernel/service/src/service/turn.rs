//! A connection's turn: its request in progress carried on, then its
//! frames decoded and run one after another until the output or the
//! turn's time is spent.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::vec::Vec;

use memd_wire::{decode_request, errno, FrameError, Request, Response, WireError, MAX_IO};

use super::batch::BatchJob;
use super::budget::Budget;
use super::conn::{Job, State};
use super::reply::write_response;
use super::work::is_long;
use super::{err, ConnId, Flow, Outcome, Service};
use crate::env::Env;
use crate::memory::Memory;

impl<M: Memory> Service<M> {
    /// Bytes arrived on `conn`; replies are appended to `out`. All of
    /// `input` is taken and run to the end, in as many turns as that
    /// takes, however much output it makes: see
    /// [`Service::on_bytes_bounded`] for a caller that bounds both.
    pub fn on_bytes<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Flow {
        let mut taken = 0;
        loop {
            let (n, flow) = self.on_bytes_bounded(env, conn, &input[taken..], out, usize::MAX);
            taken += n;
            if flow != Flow::Continue || (taken == input.len() && !self.has_work(conn)) {
                return flow;
            }
        }
    }

    /// As [`Service::on_bytes`], but one turn: it stops at the first frame
    /// boundary after `out` has reached `max_out` bytes or after the turn's
    /// budget ([`Config::budget_ns`](super::Config::budget_ns)) is spent,
    /// and returns how much of `input` it took: the rest waits (in the
    /// socket) for the next turn.
    /// A request in progress ([`Service::has_work`]) carries on first, even
    /// with no input. One reply is at most a frame, so `out` stays below
    /// `max_out` plus one frame.
    pub fn on_bytes_bounded<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> (usize, Flow) {
        let budget = self.turn_budget(env);
        let mut rest = input;
        let flow = self.resume(env, conn, out, &budget);
        if flow != Flow::Continue {
            return (0, flow);
        }
        loop {
            let taken = input.len() - rest.len();
            let Some(c) = self.conns.get_mut(&conn) else {
                return (taken, Flow::Close);
            };
            if c.state == State::Closing {
                return (taken, Flow::Close);
            }
            if out.len() + c.held.len() >= max_out || c.waiting.is_some() || rest.is_empty() {
                return (taken, Flow::Continue);
            }
            // One frame at least per turn, so every turn moves on.
            if taken > 0 && budget.spent(env) {
                return (taken, Flow::Continue);
            }
            let body = match c.decoder.feed(&mut rest) {
                Ok(Some(body)) => body,
                Ok(None) => return (input.len(), Flow::Continue),
                Err(e) => {
                    let code = match e {
                        FrameError::TooLarge { .. } | FrameError::OverLimit { .. } => errno::E2BIG,
                        FrameError::NoMemory { .. } => errno::ENOMEM,
                        _ => errno::EPROTO,
                    };
                    let msg = if c.state == State::AwaitHello {
                        format!("{e} before a hello")
                    } else {
                        e.to_string()
                    };
                    let error = err(code, msg);
                    let flow =
                        self.with_output(conn, out, |svc, out| svc.close_with(conn, out, error));
                    return (input.len() - rest.len(), flow);
                }
            };
            let flow = self.on_frame(env, conn, &body, out, &budget);
            if flow != Flow::Continue {
                return (input.len() - rest.len(), flow);
            }
        }
    }

    /// Runs `f` with the buffer `conn`'s next reply goes to: `out`, or the
    /// held replies while a long call is in progress (they follow its
    /// reply).
    fn with_output(
        &mut self,
        conn: ConnId,
        out: &mut Vec<u8>,
        f: impl FnOnce(&mut Self, &mut Vec<u8>) -> Flow,
    ) -> Flow {
        let busy = self.conns.get(&conn).is_some_and(|c| c.job.is_some());
        if !busy {
            return f(self, out);
        }
        let mut held = self
            .conns
            .get_mut(&conn)
            .map(|c| core::mem::take(&mut c.held))
            .unwrap_or_default();
        let flow = f(self, &mut held);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.held = held;
        }
        flow
    }

    /// Carries on with `conn`'s request in progress, then with the request
    /// that waited for it, within `budget`.
    fn resume<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        out: &mut Vec<u8>,
        budget: &Budget,
    ) -> Flow {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Flow::Close;
        };
        let Some(job) = c.job.take() else {
            return match c.waiting.take() {
                Some(req) => self.on_request(env, conn, req, out, budget),
                None => Flow::Continue,
            };
        };
        let flow = match job {
            Job::Call(mut work) => match self.run_work(env, conn, &mut work, budget) {
                None => {
                    self.park(conn, Job::Call(work));
                    return Flow::Continue;
                }
                Some(r) => {
                    self.count_result(conn, &r);
                    self.write_call(conn, r, out)
                }
            },
            Job::Batch(mut b) => {
                let turn = self.batch_turn(env, conn, &mut b, out, budget);
                match self.batch_flow(conn, turn, out) {
                    Some(flow) => flow,
                    None => {
                        self.park(conn, Job::Batch(b));
                        return Flow::Continue;
                    }
                }
            }
        };
        // The replies held back while it ran follow its own.
        if let Some(c) = self.conns.get_mut(&conn) {
            if out.try_reserve(c.held.len()).is_err() {
                c.held.clear();
                return self.close_with(conn, out, err(errno::ENOMEM, "no memory for replies"));
            }
            out.append(&mut c.held);
        }
        if flow != Flow::Continue || budget.spent(env) {
            return flow;
        }
        self.resume(env, conn, out, budget)
    }

    /// Sets `job` aside for `conn`'s next turn.
    fn park(&mut self, conn: ConnId, job: Job) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.job = Some(job);
        }
    }

    /// A frame from `conn`: decoded, then run (or set to wait for the
    /// request in progress).
    fn on_frame<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        body: &[u8],
        out: &mut Vec<u8>,
        budget: &Budget,
    ) -> Flow {
        let Some(c) = self.conns.get(&conn) else {
            return Flow::Close;
        };
        let state = c.state;
        // Quick calls may run beside a long call, not inside a batch.
        let beside = match &c.job {
            None => None,
            Some(Job::Call(_)) => Some(true),
            Some(Job::Batch(_)) => Some(false),
        };
        if state == State::AwaitHello && body.first().copied() != self.hello_tag {
            return self.close_with(conn, out, err(errno::EACCES, "hello with the token first"));
        }
        let req = match decode_request(body) {
            Ok(r) => r,
            Err(e) => {
                return self.with_output(conn, out, |svc, out| svc.undecodable(conn, state, e, out))
            }
        };
        if let Some(beside) = beside {
            // Calls that are quick run now beside a long call, their
            // replies held back; the rest waits for the request in progress.
            let quick = beside && matches!(&req, Request::Call(op) if !is_long(op));
            if !quick {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.waiting = Some(req);
                }
                return Flow::Continue;
            }
        }
        self.with_output(conn, out, |svc, out| {
            svc.on_request(env, conn, req, out, budget)
        })
    }

    /// The reply to a frame that did not decode.
    fn undecodable(
        &mut self,
        conn: ConnId,
        state: State,
        e: FrameError,
        out: &mut Vec<u8>,
    ) -> Flow {
        if let FrameError::TooManyOps { .. } = e {
            return self.refuse_batch(conn, err(errno::E2BIG, e.to_string()), out);
        }
        let error = err(errno::EPROTO, format!("bad request: {e}"));
        if state == State::AwaitHello {
            return self.close_with(conn, out, error);
        }
        self.count_error(conn);
        write_response(
            out,
            &Response::Error {
                error,
                closing: false,
            },
        );
        Flow::Continue
    }

    /// Refuses a batch whole: a batch reply of the one error.
    fn refuse_batch(&mut self, conn: ConnId, error: WireError, out: &mut Vec<u8>) -> Flow {
        self.count_error(conn);
        write_response(out, &Response::Batch(alloc::vec![Err(error)]));
        Flow::Continue
    }

    /// Runs a decoded request, or starts it and leaves it as the
    /// connection's job.
    fn on_request<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        req: Request,
        out: &mut Vec<u8>,
        budget: &Budget,
    ) -> Flow {
        let Some(state) = self.conns.get(&conn).map(|c| c.state) else {
            return Flow::Close;
        };
        match (state, req) {
            (State::AwaitHello, Request::Hello(h)) => self.hello(env, conn, h, out),
            (State::AwaitHello, _) => {
                self.close_with(conn, out, err(errno::EACCES, "hello with the token first"))
            }
            (_, Request::Hello(_)) => {
                write_response(
                    out,
                    &Response::Error {
                        error: err(errno::EPROTO, "already authenticated"),
                        closing: false,
                    },
                );
                Flow::Continue
            }
            (_, Request::Call(op)) => {
                if !is_long(&op) {
                    self.served_at = budget.start();
                }
                let mut io_budget = MAX_IO;
                match self.run_op(env, conn, op, &mut io_budget, budget) {
                    Outcome::Done(r) => self.write_call(conn, r, out),
                    Outcome::Pending(work) => {
                        self.park(conn, Job::Call(work));
                        Flow::Continue
                    }
                }
            }
            (_, Request::Batch(batch)) => {
                if let Err(e) = self.check_batch_work(conn, &batch) {
                    return self.refuse_batch(conn, e, out);
                }
                self.served_at = budget.start();
                let mut job = Box::new(BatchJob::new(batch));
                let turn = self.batch_turn(env, conn, &mut job, out, budget);
                self.batch_flow(conn, turn, out).unwrap_or_else(|| {
                    self.park(conn, Job::Batch(job));
                    Flow::Continue
                })
            }
        }
    }
}
