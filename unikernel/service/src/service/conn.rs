//! A connection: where it is in its session, what it holds, its counters,
//! and the request in progress.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;

use memd_wire::{FrameDecoder, Request, Role};

use super::batch::BatchJob;
use super::res::Holdings;
use super::work::Work;
use super::ConnId;
use crate::memory::Memory;

/// Where a connection is in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    AwaitHello,
    Ready,
    Closing,
}

/// Largest frame a connection may send before its hello is accepted: a
/// hello with a 256-byte token and a client name fits with room to spare.
/// Anything larger closes the connection before its body is buffered.
pub const MAX_HELLO_FRAME: usize = 1024;

/// A request that did not finish in its turn.
pub(super) enum Job {
    /// A long operation of a single call; later calls of the connection
    /// that are not long run meanwhile, their replies held back.
    Call(Work),
    /// A batch: the connection's later requests wait for it.
    Batch(Box<BatchJob>),
}

impl Job {
    /// The long operation in progress, if any (a batch may be between
    /// operations).
    pub(super) fn work(&self) -> Option<&Work> {
        match self {
            Job::Call(work) => Some(work),
            Job::Batch(b) => b.work(),
        }
    }
}

/// A connection's session.
pub(super) struct Conn<M: Memory> {
    pub(super) state: State,
    /// Set by the hello.
    pub(super) role: Role,
    pub(super) decoder: FrameDecoder,
    pub(super) name: String,
    /// Its owner id in the memory manager, from the hello on (0, the
    /// kernel's, before).
    pub(super) owner: u64,
    /// Its handles and what they charge.
    pub(super) holdings: Holdings<M>,
    pub(super) requests: u64,
    pub(super) errors: u64,
    /// The request in progress.
    pub(super) job: Option<Job>,
    /// Replies to calls that ran while `job` did, sent after its reply.
    pub(super) held: Vec<u8>,
    /// A request that waits for `job` to end (a long one, or a batch).
    pub(super) waiting: Option<Request>,
}

impl<M: Memory> Conn<M> {
    /// Connection `id`, awaiting its hello.
    pub(super) fn new(id: ConnId) -> Self {
        let mut decoder = FrameDecoder::new();
        decoder.set_limit(MAX_HELLO_FRAME);
        Conn {
            state: State::AwaitHello,
            role: Role::Client,
            decoder,
            name: String::new(),
            owner: 0,
            holdings: Holdings::new(id),
            requests: 0,
            errors: 0,
            job: None,
            held: Vec::new(),
            waiting: None,
        }
    }
}
