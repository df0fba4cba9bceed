//! The control service: connections, their requests, and the dispatch of
//! each operation to the module that runs it.
//!
//! Each call of [`Service::on_bytes_bounded`] is one connection's turn,
//! bounded by [`Config::budget_ns`] of the clock: what does not finish in
//! it (a long operation, a batch, a departed connection's handles) waits
//! for the next turn, so one client never holds the others.
//!
//! One idea per module:
//! - the session: `config` (the settings), `hello` (the handshake and its
//!   tokens), `conn` (a connection's state), `res` (what its handles hold),
//!   `quota` (its limits);
//! - turns: `turn` (a connection's frames, one after another), `budget` (a
//!   turn's time), `reply` (writing replies), `batch` (batches across
//!   turns), `bulk` (a batch's plain allocations and frees under one hold
//!   of the memory manager), `release` (what a departed connection held);
//! - operations: `pages`, `kmalloc`, `caches`, `pools`, `objects` (the
//!   objects of caches and pools), `dma` (DMA buffers), `views` (status and
//!   statistics), `admin` (the operator's);
//! - long operations: `work` (run in slices), `dma_work` (on a DMA
//!   buffer's bytes), `map` (the memory map).

use alloc::format;
use alloc::string::String;

use memd_wire::{errno, Op, Reply, Role, WireError};

use crate::conns::ConnTable;
use crate::env::Env;
use crate::handles::MAX_HANDLES;
use crate::memory::{MemError, Memory, View};

mod admin;
mod batch;
mod budget;
mod bulk;
mod caches;
mod config;
mod conn;
mod dma;
mod dma_work;
mod hello;
mod kmalloc;
mod map;
mod objects;
mod offload;
mod pages;
mod pools;
mod quota;
mod release;
mod reply;
mod res;
mod turn;
mod views;
mod work;

pub use budget::DEFAULT_BUDGET_NS;
pub use config::Config;
pub use conn::MAX_HELLO_FRAME;

use budget::Budget;
use conn::{Conn, Job, State};
use hello::hello_tag;
use objects::Parent;
use release::Releases;
use res::Res;
use views::stats;
use work::{is_long, Work};

/// A connection's id; also the owner tag of what it allocates.
pub use crate::conns::ConnId;

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

/// How far [`Service::run_op`] got.
enum Outcome {
    Done(Result<Reply, WireError>),
    /// Long work, not finished in the turn.
    Pending(Work),
}

/// An error reply.
fn err(code: i32, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

/// The memory manager's error `e` as a reply.
fn mem_err(e: MemError) -> WireError {
    match e.live {
        Some(n) => WireError::new(e.code, format!("{} ({n} live)", e.message)),
        None => WireError::new(e.code, e.message),
    }
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
    /// A service with no connections. A quota of more handles than a
    /// handle table holds (2^20) is lowered to that.
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
        self.conns.get(&conn).map(|c| c.holdings.handles.len())
    }

    /// Whether a shutdown was requested.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// A new connection, awaiting its hello.
    pub fn on_connect(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(id, Conn::new(id));
        id
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

    /// The owner id `conn`'s allocations are charged to (the kernel's, 0,
    /// for a connection that has not said hello).
    fn owner(&self, conn: ConnId) -> u64 {
        self.conns.get(&conn).map_or(0, |c| c.owner)
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
        let mut handles = c.holdings.handles;
        if let Some(f) = work.and_then(|w| w.abandon(env)) {
            // The device or another CPU holds that buffer: it is freed when
            // it comes back.
            if let Some(Res::Dma { buf, .. }) = handles.remove(f.handle) {
                self.releases.push_in_flight(buf, f.wait);
            }
        }
        if let Some(owner) = self.releases.push(handles, c.owner) {
            if owner != 0 {
                env.with_mem(|m, _| m.owner_free(owner));
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
        let role = self.conns.get_mut(&conn).map(|c| {
            c.requests += 1;
            c.role
        });
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
        if r.is_err() {
            self.count_error(conn);
        }
    }

    /// Counts an error reply against `conn`.
    fn count_error(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.errors += 1;
        }
    }

    /// The memory manager's page size.
    fn page_size<E: Env<Mem = M>>(&mut self, env: &mut E) -> u64 {
        *self
            .page_size
            .get_or_insert_with(|| env.with_mem(|m, _| m.page_size()))
    }

    /// Runs `op`, one that is not long, to its reply.
    fn dispatch<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
    ) -> Result<Reply, WireError> {
        let page = self.page_size(env);
        match op {
            Op::Status => Ok(self.status(env, page)),
            Op::Meminfo => stats(env, View::Meminfo),
            Op::Zoneinfo => stats(env, View::Zoneinfo),
            Op::Buddyinfo => stats(env, View::Buddyinfo),
            Op::Slabinfo { start } => stats(
                env,
                View::Slabinfo {
                    start: index(start),
                },
            ),
            Op::Mempools { start } => stats(
                env,
                View::Mempools {
                    start: index(start),
                },
            ),
            Op::Cma => stats(env, View::Cma),
            Op::Clients => Ok(Reply::Clients(self.clients(env))),
            Op::DmaBuffers { start } => self.dma_list(env, start),
            Op::Faults => Ok(views::faults(env)),

            Op::AllocPages { order, gfp } => self.alloc_pages(env, conn, order, gfp, page),
            Op::FreePages { handle } => self.free_pages(env, conn, handle, page),
            Op::Kmalloc { size, gfp } => self.kmalloc(env, conn, size, gfp, page),
            Op::Kfree { handle } => self.kfree(env, conn, handle, page),

            Op::CacheCreate(spec) => self.cache_create(env, conn, &spec),
            Op::CacheAlloc { cache, gfp } => {
                self.alloc_child(env, conn, Parent::Cache, cache, gfp, page)
            }
            Op::CacheFree { cache, object } => {
                self.free_child(env, conn, Parent::Cache, cache, object, page)
            }
            Op::CacheShrink { cache } => self.cache_shrink(env, conn, cache),
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

            Op::DmaAlloc {
                len,
                align,
                mask,
                movable,
            } => self
                .dma_alloc(
                    env,
                    conn,
                    len,
                    align,
                    crate::memory::Placement { mask, movable },
                    true,
                )
                .map(Reply::Dma),
            Op::DmaFree { handle } => self.dma_free(env, conn, handle, page),

            Op::FaultInject { target, config } => self.fault_inject(env, target, config),
            Op::DropCaches => Ok(self.drop_caches(env)),
            Op::Shutdown => Ok(self.shutdown()),

            // Long operations run as work (`run_op`).
            Op::MemMap
            | Op::DmaWrite { .. }
            | Op::DmaRead { .. }
            | Op::DmaFill { .. }
            | Op::DmaChecksum { .. }
            | Op::DmaWriteDisk { .. }
            | Op::DmaReadDisk { .. }
            | Op::Stress { .. }
            | Op::Check => Err(err(errno::EINVAL, "a long operation out of turn")),
        }
    }
}

/// A listing position from the wire: past any listing when it does not fit.
fn index(start: u64) -> usize {
    usize::try_from(start).unwrap_or(usize::MAX)
}
