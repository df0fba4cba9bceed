//! memd's control service.
//!
//! The kernel drives a [`Service`] purely with bytes: [`Service::on_connect`]
//! when a client connects, [`Service::on_bytes_bounded`] with whatever
//! arrived (any chunking; replies are appended to an output buffer), one
//! turn of bounded time per call, again each pass while
//! [`Service::has_work`] says a request is in progress, and
//! [`Service::on_close`] when the connection goes away, which queues every
//! handle the connection held for [`Service::background`] to free.
//! [`Service::on_bytes`] and [`Service::on_close_now`] do it all at once,
//! for hosts without a loop.
//!
//! Each connection first awaits a hello with the right protocol version and
//! token; anything else closes it. After that every request gets one reply.
//! Resources are handles in a per-connection table, checked on every use and
//! bounded by a per-connection [`memd_wire::Quota`]. Hostile input gets an
//! error reply or a [`Flow::Close`]; it never panics and never touches other
//! connections.
//!
//! The memory manager is reached through the [`Memory`] trait (implemented
//! for memd-mm's `MemoryManager`) and lent per call through an
//! [`Env`], so the kernel can keep it behind its lock.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(feature = "host")]
extern crate std;

mod check;
mod conns;
mod env;
mod handles;
#[cfg(feature = "host")]
pub mod host;
mod memmap;
mod memory;
mod mm;
mod percpu;
mod service;
mod stress;

pub use env::{BlockDevice, DeviceDma, DirectEnv, Env, Transfer, SECTOR};
pub use memmap::MapSnapshot;
pub use memory::{Backing, DmaFacts, MemError, Memory, Obj, Placement, View};
pub use percpu::{Job, PerCpuMemory};
pub use service::{Config, ConnId, Flow, Service, DEFAULT_BUDGET_NS, MAX_HELLO_FRAME};
