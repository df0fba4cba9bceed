//! Connections, sessions, handles, quotas and dispatch.
//!
//! Each call of [`Service::on_bytes_bounded`] is one connection's turn,
//! bounded by [`Config::budget_ns`] of the clock: what does not finish in
//! it (a long operation, a batch, a departed connection's handles) waits
//! for the next turn, so one client never holds the others.
//!
//! The operation families that need more than a few lines live beside it:
//! `work` runs long operations in slices, `map` walks the memory map a
//! window at a time, `batch` runs batches in turns,
//! `bulk` a batch's plain allocations and frees under one hold of the
//! memory manager, `release` frees what a departed connection held,
//! `caches` has slab caches and mempools, `dma` the DMA buffers.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use memd_wire::{
    decode_request, encode_frame, errno, CheckReport, ClientInfo, DmaBufferInfo, FrameDecoder,
    FrameError, Hello, HelloAck, Op, Quota, Reply, Request, Response, Role, Status, WireError,
    MAX_BATCH_OPS, MAX_IO, MAX_NAME_LEN, PROTOCOL_VERSION,
};

use crate::conns::ConnTable;
use crate::env::Env;
use crate::handles::{HandleTable, MAX_HANDLES};
use crate::memory::{MemError, Memory, Obj, View};

mod batch;
mod bulk;
mod caches;
mod dma;
mod map;
mod release;
mod work;

use batch::BatchJob;
use caches::Parent;
use release::Releases;
pub use work::DEFAULT_BUDGET_NS;
use work::{is_long, Budget, Work, CONTENDED_NS, WORK_SHARE};

/// A connection's id; also the owner tag of what it allocates.
pub use crate::conns::ConnId;

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The operator's token: every operation ([`Role::Operator`]).
    pub operator_token: String,
    /// The clients' token, if clients are told apart from the operator:
    /// allocation work and views only ([`Role::Client`]).
    pub client_token: Option<String>,
    /// Per-connection limits.
    pub quota: Quota,
    /// Server name shown in the status.
    pub server: String,
    /// Clock reading when the service started.
    pub started_ns: u64,
    /// Most operations one stress request may run.
    pub max_stress_ops: u64,
    /// Most slab caches all clients together may hold: the memory
    /// manager's cache table is shared with the kernel's own caches.
    pub max_client_caches: u64,
    /// Most mempools all clients together may hold.
    pub max_client_pools: u64,
    /// Most work one request may ask for: a stress operation counts one,
    /// a DMA buffer one per 64 bytes it covers, anything else one. A
    /// batch's operations count together.
    pub max_request_work: u64,
    /// Most clock time one connection's turn takes before the rest of its
    /// work waits for its next turn.
    pub budget_ns: u64,
}

impl Config {
    /// Defaults with one token, the operator's: 64 Ki pages, 256 MiB,
    /// 65 536 handles per connection.
    pub fn new(operator_token: impl Into<String>) -> Self {
        Config {
            operator_token: operator_token.into(),
            client_token: None,
            quota: Quota {
                pages: 64 * 1024,
                bytes: 256 << 20,
                handles: 65_536,
                caches: 8,
            },
            server: format!("memd {}", env!("CARGO_PKG_VERSION")),
            started_ns: 0,
            max_stress_ops: 50_000_000,
            max_client_caches: 96,
            max_client_pools: 192,
            max_request_work: 50_000_000,
            budget_ns: DEFAULT_BUDGET_NS,
        }
    }

    /// Adds a client token, for [`Role::Client`] connections.
    pub fn with_client_token(mut self, token: impl Into<String>) -> Self {
        self.client_token = Some(token.into());
        self
    }

    /// The role `token` grants, if any. Both tokens are compared in full
    /// whatever the outcome, so the time taken says nothing of either.
    fn role_of(&self, token: &str) -> Option<Role> {
        let operator = tokens_equal(token, &self.operator_token);
        let client = self
            .client_token
            .as_deref()
            .is_some_and(|t| tokens_equal(token, t));
        if operator {
            Some(Role::Operator)
        } else if client {
            Some(Role::Client)
        } else {
            None
        }
    }
}

/// What the kernel should do with a connection after [`Service::on_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep it open.
    Continue,
    /// Send what was written, then close it (and call [`Service::on_close`]).
    Close,
    /// Send what was written, then stop the service.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    Ready,
    Closing,
}

enum Res<M: Memory> {
    Pages {
        phys: u64,
        order: u8,
    },
    Kmalloc(Obj),
    Cache {
        id: M::CacheId,
        size: u64,
        objects: u64,
        pools: u64,
    },
    CacheObj {
        cache: u64,
        /// The cache's id, so a departing connection's objects can be
        /// freed in any order.
        id: M::CacheId,
        obj: Obj,
    },
    Pool {
        id: M::PoolId,
        cache: Option<u64>,
        elem: u64,
        objects: u64,
        reserve: u64,
    },
    PoolObj {
        pool: u64,
        /// The pool's id, as for a cache object.
        id: M::PoolId,
        obj: Obj,
    },
    Dma {
        buf: M::DmaBuf,
        /// Boxed: inline it would triple every handle's size (and the
        /// copies into and out of the handle table).
        info: Box<DmaBufferInfo>,
    },
}

impl<M: Memory> Res<M> {
    /// (pages, bytes) this resource counts against the quota.
    fn charge(&self, page: u64) -> (u64, u64) {
        match self {
            Res::Pages { order, .. } => (1 << order, page << order),
            Res::Kmalloc(o) | Res::CacheObj { obj: o, .. } | Res::PoolObj { obj: o, .. } => {
                (0, o.size)
            }
            Res::Cache { .. } => (0, 0),
            Res::Pool { reserve, .. } => (0, *reserve),
            Res::Dma { info, .. } => (info.len.div_ceil(page), info.len),
        }
    }

    /// (caches, pools) this resource takes of the shared tables.
    fn tables(&self) -> (u64, u64) {
        match self {
            Res::Cache { .. } => (1, 0),
            Res::Pool { .. } => (0, 1),
            _ => (0, 0),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Res::Pages { .. } => "pages",
            Res::Kmalloc(_) => "kmalloc object",
            Res::Cache { .. } => "cache",
            Res::CacheObj { .. } => "cache object",
            Res::Pool { .. } => "mempool",
            Res::PoolObj { .. } => "mempool element",
            Res::Dma { .. } => "DMA buffer",
        }
    }
}

/// A request that did not finish in its turn.
enum Job {
    /// A long operation of a single call; later calls of the connection
    /// that are not long run meanwhile, their replies held back.
    Call(Work),
    /// A batch: the connection's later requests wait for it.
    Batch(Box<BatchJob>),
}

/// How far [`Service::run_op`] got.
enum Outcome {
    Done(Result<Reply, WireError>),
    /// Long work, not finished in the turn.
    Pending(Work),
}

struct Conn<M: Memory> {
    state: State,
    /// Set by the hello.
    role: Role,
    decoder: FrameDecoder,
    name: String,
    handles: HandleTable<Res<M>>,
    pages: u64,
    bytes: u64,
    /// Slab caches held.
    caches: u64,
    /// Mempools held.
    pools: u64,
    requests: u64,
    errors: u64,
    /// The request in progress.
    job: Option<Job>,
    /// Replies to calls that ran while `job` did, sent after its reply.
    held: Vec<u8>,
    /// A request that waits for `job` to end (a long one, or a batch).
    waiting: Option<Request>,
}

/// Which of a connection's limits one more handle would pass.
enum Over {
    Handles,
    Pages,
    Bytes,
}

impl<M: Memory> Conn<M> {
    /// Which limit of `q` one more handle charging (pages, bytes) would
    /// pass, if any. Allocates nothing, so it may run under the memory
    /// manager's lock.
    fn over_quota(&self, q: &Quota, pages: u64, bytes: u64) -> Option<Over> {
        if self.handles.len() as u64 >= q.handles {
            Some(Over::Handles)
        } else if self.pages.saturating_add(pages) > q.pages {
            Some(Over::Pages)
        } else if self.bytes.saturating_add(bytes) > q.bytes {
            Some(Over::Bytes)
        } else {
            None
        }
    }
}

/// [`HandleTable::insert`] or [`HandleTable::insert_reserved`].
type Inserter<M> = fn(&mut HandleTable<Res<M>>, Res<M>) -> Result<u64, Res<M>>;

impl<M: Memory> Conn<M> {
    /// Files `res` under a new handle by `insert` (which may or may not
    /// grow the table) and charges it; None when the table is full.
    fn file(&mut self, res: Res<M>, page: u64, insert: Inserter<M>) -> Option<u64> {
        let (pages, bytes) = res.charge(page);
        let (caches, pools) = res.tables();
        let handle = insert(&mut self.handles, res).ok()?;
        self.pages += pages;
        self.bytes += bytes;
        self.caches += caches;
        self.pools += pools;
        Some(handle)
    }

    /// Takes `handle`'s resource out and uncharges it.
    fn unfile(&mut self, handle: u64, page: u64) -> Option<Res<M>> {
        let res = self.handles.remove(handle)?;
        let (pages, bytes) = res.charge(page);
        let (caches, pools) = res.tables();
        self.pages -= pages;
        self.bytes -= bytes;
        self.caches -= caches;
        self.pools -= pools;
        Some(res)
    }
}

/// Largest frame a connection may send before its hello is accepted: a
/// hello with a 256-byte token and a client name fits with room to spare.
/// Anything larger closes the connection before its body is buffered.
pub const MAX_HELLO_FRAME: usize = 1024;

/// Bytes of a batch's reply frame kept free for a final error entry.
const FINAL_ENTRY_ROOM: usize = 128;

fn err(code: i32, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn mem_err(e: MemError) -> WireError {
    match e.live {
        Some(n) => WireError::new(e.code, format!("{} ({n} live)", e.message)),
        None => WireError::new(e.code, e.message),
    }
}

fn no_handle(h: u64) -> WireError {
    err(errno::ENOENT, format!("no handle {h} on this connection"))
}

fn wrong_kind(h: u64, want: &str, got: &str) -> WireError {
    err(
        errno::EINVAL,
        format!("handle {h} is a {got}, not a {want}"),
    )
}

fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// The control service: feed it each connection's bytes, send what it
/// writes back.
pub struct Service<M: Memory> {
    config: Config,
    conns: ConnTable<Conn<M>>,
    next_conn: ConnId,
    /// The memory manager's page size, asked once: every operation needs
    /// it, and asking takes the manager's lock.
    page_size: Option<u64>,
    requests: u64,
    shutdown: bool,
    /// [`hello_tag`]: before its hello, a connection's frames are looked at
    /// this far and no further.
    hello_tag: Option<u8>,
    /// What departed connections held, being freed.
    releases: Releases<M>,
    /// When the last turn began that ran a request other than long work:
    /// other clients are being served, and long work gets its share.
    served_at: u64,
}

impl<M: Memory> Service<M> {
    /// A service with no connections.
    /// A quota of more handles than a handle table holds
    /// ([`MAX_HANDLES`]) is lowered to that.
    pub fn new(mut config: Config) -> Self {
        config.quota.handles = config.quota.handles.min(MAX_HANDLES);
        Service {
            config,
            conns: ConnTable::new(),
            next_conn: 1,
            page_size: None,
            requests: 0,
            shutdown: false,
            hello_tag: hello_tag(),
            releases: Releases::new(),
            served_at: 0,
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Handles held by `conn` (None when it does not exist).
    pub fn handles_of(&self, conn: ConnId) -> Option<usize> {
        self.conns.get(&conn).map(|c| c.handles.len())
    }

    /// Whether a shutdown was requested.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// A new connection, awaiting its hello.
    pub fn on_connect(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let mut decoder = FrameDecoder::new();
        decoder.set_limit(MAX_HELLO_FRAME);
        self.conns.insert(
            id,
            Conn {
                state: State::AwaitHello,
                role: Role::Client,
                decoder,
                name: String::new(),
                handles: HandleTable::new(id),
                pages: 0,
                bytes: 0,
                caches: 0,
                pools: 0,
                requests: 0,
                errors: 0,
                job: None,
                held: Vec::new(),
                waiting: None,
            },
        );
        id
    }

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

    /// [`Service::on_close`], and everything `conn` held freed before it
    /// returns: for hosts without a loop that calls
    /// [`Service::background`].
    pub fn on_close_now<E: Env<Mem = M>>(&mut self, env: &mut E, conn: ConnId) {
        self.on_close(env, conn);
        while self.background(env) {}
    }

    /// As [`Service::on_bytes`], but one turn: it stops at the first frame
    /// boundary after `out` has reached `max_out` bytes or after the turn's
    /// budget ([`Config::budget_ns`]) is spent, and returns how much of
    /// `input` it took: the rest waits (in the socket) for the next turn.
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

    /// A turn's budget: [`Config::budget_ns`], of which long work gets a
    /// [`WORK_SHARE`] part while other requests are being served.
    fn turn_budget<E: Env<Mem = M>>(&mut self, env: &mut E) -> Budget {
        let ns = self.config.budget_ns;
        let now = env.now_ns();
        let contended = now.saturating_sub(self.served_at) < CONTENDED_NS;
        let work = if contended { ns / WORK_SHARE } else { ns };
        Budget::new(now, ns, work)
    }

    /// Sets `job` aside for `conn`'s next turn.
    fn park(&mut self, conn: ConnId, job: Job) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.job = Some(job);
        }
    }

    /// Whether `conn` has a request in progress or waiting: its next turn
    /// has work even without input.
    pub fn has_work(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.job.is_some() || c.waiting.is_some())
    }

    /// Frees some of what departed connections held, within one turn's
    /// budget; true while some is left (call again on the next pass).
    pub fn background<E: Env<Mem = M>>(&mut self, env: &mut E) -> bool {
        let budget = self.turn_budget(env);
        !self.release_some(env, &budget)
    }

    /// Handles of departed connections not freed yet.
    pub fn pending_release(&self) -> usize {
        self.releases.pending()
    }

    /// Whether `conn` has part of a frame buffered (a request started and
    /// not finished).
    pub fn has_partial_request(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.decoder.is_idle())
    }

    /// Whether `conn` has presented a valid hello.
    pub fn is_authenticated(&self, conn: ConnId) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.state == State::Ready)
    }

    /// `conn` is gone: what it held is queued for [`Service::background`]
    /// to free, after the long operation it was in the middle of (if any)
    /// has given back what it holds of its own.
    pub fn on_close<E: Env<Mem = M>>(&mut self, env: &mut E, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let work = match c.job {
            Some(Job::Call(work)) => Some(work),
            Some(Job::Batch(mut b)) => b.take_work(),
            None => None,
        };
        let mut handles = c.handles;
        if let Some(f) = work.and_then(|w| w.abandon(env)) {
            // The device holds that buffer: it is freed when it gives it back.
            if let Some(Res::Dma { buf, .. }) = handles.remove(f.handle) {
                self.releases.push_in_flight(buf, f.from, f.to);
            }
        }
        self.releases.push(handles);
    }

    /// The long operation that leases DMA buffer `handle` of `conn`, if
    /// one does, described for a message.
    fn leased(&self, conn: ConnId, handle: u64) -> Option<String> {
        let work = match self.conns.get(&conn)?.job.as_ref()? {
            Job::Call(work) => work,
            Job::Batch(b) => b.work()?,
        };
        (work.leases() == Some(handle)).then(|| work.describe())
    }

    fn close_with(&mut self, conn: ConnId, out: &mut Vec<u8>, error: WireError) -> Flow {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::Closing;
        }
        write_response(
            out,
            &Response::Error {
                error,
                closing: true,
            },
        );
        Flow::Close
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
        if let FrameError::TooManyOps { count } = e {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.errors += 1;
            }
            // A batch reply of one refusal, as for any batch refused whole.
            write_response(
                out,
                &Response::Batch(alloc::vec![Err(err(
                    errno::E2BIG,
                    format!("batch of {count} ops exceeds {MAX_BATCH_OPS}"),
                ))]),
            );
            return Flow::Continue;
        }
        let error = err(errno::EPROTO, format!("bad request: {e}"));
        if state == State::AwaitHello {
            return self.close_with(conn, out, error);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.errors += 1;
        }
        write_response(
            out,
            &Response::Error {
                error,
                closing: false,
            },
        );
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
            (State::AwaitHello, Request::Hello(h)) => self.hello(conn, h, out),
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
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.errors += 1;
                    }
                    write_response(out, &Response::Batch(alloc::vec![Err(e)]));
                    return Flow::Continue;
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

    /// What a batch's turn (`turn`, from `batch_turn`) means for its
    /// connection; None while the batch waits for another turn.
    fn batch_flow(
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

    /// Writes a call's reply; one that does not fit or cannot be allocated
    /// is replaced by an error saying so.
    fn write_call(&mut self, conn: ConnId, r: Result<Reply, WireError>, out: &mut Vec<u8>) -> Flow {
        // Its own statement: a reply that did not fit is dropped before the
        // error that replaces it is written.
        let sent = encode_frame(&Response::Call(r), out);
        match sent {
            Ok(()) => self.flow(),
            Err(e) => self.unsent_reply(conn, out, e, "reply", |e| Response::Call(Err(e))),
        }
    }

    /// A `what` that could not be written (`e`): an ENOMEM or E2BIG error,
    /// made a response by `wrap`, takes its place; when even that cannot be
    /// written, the connection closes.
    fn unsent_reply(
        &mut self,
        conn: ConnId,
        out: &mut Vec<u8>,
        e: FrameError,
        what: &str,
        wrap: fn(WireError) -> Response,
    ) -> Flow {
        let error = match e {
            FrameError::NoMemory { len } => err(
                errno::ENOMEM,
                format!("no memory for a {what} of {len}+ bytes"),
            ),
            _ => err(errno::E2BIG, format!("{what} larger than a frame")),
        };
        if write_response(out, &wrap(error)) {
            self.flow()
        } else {
            self.close_with(conn, out, err(errno::ENOMEM, "no memory for replies"))
        }
    }

    fn flow(&self) -> Flow {
        if self.shutdown {
            Flow::Shutdown
        } else {
            Flow::Continue
        }
    }

    fn hello(&mut self, conn: ConnId, h: Hello, out: &mut Vec<u8>) -> Flow {
        if h.version != PROTOCOL_VERSION {
            let e = err(
                errno::EPROTO,
                format!(
                    "protocol version {} not supported (server speaks {PROTOCOL_VERSION})",
                    h.version
                ),
            );
            return self.close_with(conn, out, e);
        }
        let Some(role) = self.config.role_of(&h.token) else {
            return self.close_with(conn, out, err(errno::EACCES, "wrong token"));
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Flow::Close;
        };
        c.state = State::Ready;
        c.role = role;
        c.decoder.set_limit(memd_wire::MAX_FRAME);
        c.name = h.client.chars().take(MAX_NAME_LEN).collect();
        write_response(
            out,
            &Response::Hello(HelloAck {
                version: PROTOCOL_VERSION,
                conn,
                quota: self.config.quota,
                role,
            }),
        );
        Flow::Continue
    }

    /// Runs `op`, or starts it when it is long and leaves the rest for a
    /// later turn.
    fn run_op<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
        io_budget: &mut usize,
        budget: &Budget,
    ) -> Outcome {
        self.requests += 1;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.requests += 1;
        }
        let role = self.conns.get(&conn).map(|c| c.role);
        let r = if op.operator_only() && role != Some(Role::Operator) {
            Err(err(
                errno::EPERM,
                format!("{} needs the operator token", op.name()),
            ))
        } else if is_long(&op) {
            match self.start_work(env, conn, op, io_budget) {
                Ok(mut work) => match self.run_work(env, conn, &mut work, budget) {
                    Some(r) => r,
                    None => return Outcome::Pending(work),
                },
                Err(e) => Err(e),
            }
        } else {
            self.dispatch(env, conn, op)
        };
        self.count_result(conn, &r);
        Outcome::Done(r)
    }

    /// Counts a failed request against `conn`.
    fn count_result(&mut self, conn: ConnId, r: &Result<Reply, WireError>) {
        if let (Some(c), true) = (self.conns.get_mut(&conn), r.is_err()) {
            c.errors += 1;
        }
    }

    /// Checks that `conn` may take one more handle charging (pages, bytes).
    fn check_quota(&self, conn: ConnId, pages: u64, bytes: u64) -> Result<(), WireError> {
        let c = self
            .conns
            .get(&conn)
            .ok_or_else(|| err(errno::EBADF, "no connection"))?;
        let q = &self.config.quota;
        match c.over_quota(q, pages, bytes) {
            None => Ok(()),
            Some(Over::Handles) => Err(err(
                errno::EDQUOT,
                format!("handle quota of {} reached", q.handles),
            )),
            Some(Over::Pages) => Err(err(
                errno::EDQUOT,
                format!("page quota: {} held + {pages} > {}", c.pages, q.pages),
            )),
            Some(Over::Bytes) => Err(err(
                errno::EDQUOT,
                format!("byte quota: {} held + {bytes} > {}", c.bytes, q.bytes),
            )),
        }
    }

    /// Checks that `conn` may create one more slab cache (`pool` false) or
    /// mempool: its own quota (EDQUOT), then what all clients hold
    /// together (ENOSPC), so no one client fills the shared tables.
    fn check_table_quota(&self, conn: ConnId, pool: bool) -> Result<(), WireError> {
        let c = self
            .conns
            .get(&conn)
            .ok_or_else(|| err(errno::EBADF, "no connection"))?;
        let q = self.config.quota.caches;
        if c.caches + c.pools >= q {
            return Err(err(
                errno::EDQUOT,
                format!("cache and mempool quota of {q} reached"),
            ));
        }
        let (held, cap, what) = if pool {
            let held = self.conns.values().map(|c| c.pools).sum::<u64>();
            (held, self.config.max_client_pools, "mempools")
        } else {
            let held = self.conns.values().map(|c| c.caches).sum::<u64>();
            (held, self.config.max_client_caches, "slab caches")
        };
        if held >= cap {
            return Err(err(
                errno::ENOSPC,
                format!("clients hold {held} {what}, the most allowed"),
            ));
        }
        Ok(())
    }

    /// Files `res` under a new handle of `conn`. Callers checked the quota
    /// first, and the quota is at most what a table holds.
    fn insert(&mut self, conn: ConnId, res: Res<M>, page: u64) -> u64 {
        match self.conns.get_mut(&conn) {
            Some(c) => c
                .file(res, page, HandleTable::insert)
                .unwrap_or_else(|| unreachable!("check_quota keeps tables below MAX_HANDLES")),
            None => 0,
        }
    }

    fn remove(&mut self, conn: ConnId, h: u64, page: u64) -> Option<Res<M>> {
        self.conns.get_mut(&conn)?.unfile(h, page)
    }

    fn get(&self, conn: ConnId, h: u64) -> Result<&Res<M>, WireError> {
        self.conns
            .get(&conn)
            .and_then(|c| c.handles.get(h))
            .ok_or_else(|| no_handle(h))
    }

    fn get_mut(&mut self, conn: ConnId, h: u64) -> Option<&mut Res<M>> {
        self.conns.get_mut(&conn)?.handles.get_mut(h)
    }

    fn page_size<E: Env<Mem = M>>(&mut self, env: &mut E) -> u64 {
        *self
            .page_size
            .get_or_insert_with(|| env.with_mem(|m, _| m.page_size()))
    }

    fn dispatch<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
    ) -> Result<Reply, WireError> {
        let page = self.page_size(env);
        match op {
            Op::Status => {
                let now = env.now_ns();
                let (total, free, max_order, has_block) = env
                    .with_mem(|m, b| (m.total_bytes(), m.free_bytes(), m.max_order(), b.is_some()));
                Ok(Reply::Status(Box::new(Status {
                    version: PROTOCOL_VERSION,
                    server: self.config.server.clone(),
                    uptime_ns: now.saturating_sub(self.config.started_ns),
                    connections: self.conns.len() as u64,
                    requests: self.requests,
                    page_size: page,
                    max_order,
                    total_bytes: total,
                    free_bytes: free,
                    block_device: has_block,
                    busy_ns: env.busy_ns(),
                    halted_ns: env.halted_ns(),
                    loop_passes: env.loop_passes(),
                })))
            }
            Op::Meminfo => Ok(stats(env, View::Meminfo)),
            Op::Zoneinfo => Ok(stats(env, View::Zoneinfo)),
            Op::Buddyinfo => Ok(stats(env, View::Buddyinfo)),
            Op::Slabinfo => Ok(stats(env, View::Slabinfo)),
            Op::Mempools => Ok(stats(env, View::Mempools)),
            Op::Cma => Ok(stats(env, View::Cma)),
            Op::Clients => Ok(Reply::Clients(self.clients())),
            Op::DmaBuffers { start } => self.dma_list(env, start),

            Op::AllocPages { order, gfp } => {
                if order >= 64 {
                    return Err(err(errno::EINVAL, format!("order {order} out of range")));
                }
                self.check_quota(conn, 1u64 << order, page << order)?;
                let phys = env
                    .with_mem_as(conn, |m, _| m.alloc_pages(order, gfp))
                    .map_err(mem_err)?;
                let handle = self.insert(conn, Res::Pages { phys, order }, page);
                Ok(Reply::Pages {
                    handle,
                    phys,
                    order,
                })
            }
            Op::FreePages { handle } => match self.get(conn, handle)? {
                Res::Pages { phys, order } => {
                    let (phys, order) = (*phys, *order);
                    env.with_mem(|m, _| m.free_pages(phys, order))
                        .map_err(mem_err)?;
                    self.remove(conn, handle, page);
                    Ok(Reply::Done)
                }
                r => Err(wrong_kind(handle, "pages", r.kind())),
            },
            Op::Kmalloc { size, gfp } => {
                self.check_quota(conn, 0, size)?;
                let obj = env
                    .with_mem_as(conn, |m, _| m.kmalloc(size, gfp))
                    .map_err(mem_err)?;
                let handle = self.insert(conn, Res::Kmalloc(obj), page);
                Ok(Reply::Object {
                    handle,
                    addr: obj.addr,
                    size: obj.size,
                })
            }
            Op::Kfree { handle } => match self.get(conn, handle)? {
                Res::Kmalloc(obj) => {
                    let obj = *obj;
                    env.with_mem(|m, _| m.kfree(obj)).map_err(mem_err)?;
                    self.remove(conn, handle, page);
                    Ok(Reply::Done)
                }
                r => Err(wrong_kind(handle, "kmalloc object", r.kind())),
            },

            Op::CacheCreate {
                name,
                size,
                align,
                flags,
                ctor,
            } => {
                if name.is_empty() || name.len() > MAX_NAME_LEN {
                    return Err(err(
                        errno::EINVAL,
                        format!("cache name must be 1..={MAX_NAME_LEN} bytes"),
                    ));
                }
                self.check_quota(conn, 0, 0)?;
                self.check_table_quota(conn, false)?;
                let id = env
                    .with_mem(|m, _| m.cache_create(&name, size, align, flags, ctor))
                    .map_err(mem_err)?;
                let res = Res::Cache {
                    id,
                    size: size as u64,
                    objects: 0,
                    pools: 0,
                };
                Ok(Reply::Created {
                    handle: self.insert(conn, res, page),
                })
            }
            Op::CacheAlloc { cache, gfp } => {
                self.alloc_child(env, conn, Parent::Cache, cache, gfp, page)
            }
            Op::CacheFree { cache, object } => {
                self.free_child(env, conn, Parent::Cache, cache, object, page)
            }
            Op::CacheShrink { cache } => self.cache_shrink(env, conn, cache),
            Op::DropCaches => Ok(Reply::Shrunk {
                pages: env.with_mem(|m, _| m.drop_caches()),
            }),
            Op::CacheDestroy { cache } => self.cache_destroy(env, conn, cache, page),
            Op::PoolCreate { backing, min_nr } => {
                self.pool_create(env, conn, backing, min_nr, page)
            }
            Op::PoolAlloc { pool, gfp } => {
                self.alloc_child(env, conn, Parent::Pool, pool, gfp, page)
            }
            Op::PoolFree { pool, object } => {
                self.free_child(env, conn, Parent::Pool, pool, object, page)
            }
            Op::PoolDestroy { pool } => self.pool_destroy(env, conn, pool, page),

            Op::DmaAlloc { len, align, mask } => self.dma_alloc(env, conn, len, align, mask, true),
            Op::DmaFree { handle } => self.dma_free(env, conn, handle, page),
            Op::Check => Ok(Reply::Check(match env.with_mem(|m, _| m.check()) {
                Ok(()) => CheckReport {
                    ok: true,
                    violations: Vec::new(),
                },
                Err((what, at)) => CheckReport {
                    ok: false,
                    violations: alloc::vec![format!("{what} (at {at:#x})")],
                },
            })),
            // Long operations run as work (`run_op`).
            Op::MemMap
            | Op::DmaWrite { .. }
            | Op::DmaRead { .. }
            | Op::DmaFill { .. }
            | Op::DmaChecksum { .. }
            | Op::DmaWriteDisk { .. }
            | Op::DmaReadDisk { .. }
            | Op::Stress { .. } => Err(err(errno::EINVAL, "a long operation out of turn")),
            Op::FaultInject { target, config } => {
                if config.probability > 100 {
                    return Err(err(errno::EINVAL, "probability is a percentage (0..=100)"));
                }
                env.with_mem(|m, _| m.set_fault(target, config))
                    .map_err(mem_err)?;
                Ok(Reply::Done)
            }
            Op::Faults => {
                let faults = env.with_mem(|m, _| m.faults());
                Ok(Reply::Faults(Box::new(faults)))
            }
            Op::Shutdown => {
                self.shutdown = true;
                Ok(Reply::Done)
            }
        }
    }

    fn clients(&self) -> Vec<ClientInfo> {
        self.conns
            .iter()
            .map(|(id, c)| ClientInfo {
                conn: *id,
                name: c.name.clone(),
                authenticated: c.state == State::Ready,
                handles: c.handles.len() as u64,
                pages: c.pages,
                bytes: c.bytes,
                requests: c.requests,
                errors: c.errors,
                quota: (c.state == State::Ready).then_some(self.config.quota),
            })
            .collect()
    }
}

/// A statistics reply: snapshot under the lock into a buffer allocated
/// before it, render after.
fn stats<E: Env>(env: &mut E, view: View) -> Reply {
    let mut snap = alloc::boxed::Box::<<E::Mem as Memory>::Stats>::default();
    env.with_mem(|m, _| m.snapshot(view, &mut snap));
    <E::Mem as Memory>::render(view, &snap)
}

/// Appends a small response (an error, a hello): false when the heap
/// could not take even that.
fn write_response(out: &mut Vec<u8>, resp: &Response) -> bool {
    encode_frame(resp, out).is_ok()
}

/// The first byte of every `Request::Hello` body: its variant tag, as
/// postcard writes it.
fn hello_tag() -> Option<u8> {
    let hello = Request::Hello(Hello {
        version: 0,
        token: String::new(),
        client: String::new(),
    });
    let mut sample = Vec::new();
    memd_wire::frame::encode_into(&hello, &mut sample).ok()?;
    sample.first().copied()
}
