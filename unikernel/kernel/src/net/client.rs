//! One connection's socket: its turn (input to the handler, output to the
//! socket), its timeouts, and cutting it.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use log::info;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use super::config::Timeouts;
use super::{Flow, Handler};
use crate::arch::time;

/// Stop reading a client while this much of its output is still unsent.
const MAX_PENDING_OUT: usize = 256 * 1024;

/// A socket that has left `Listen`: handshaking, connected or closing.
pub(super) struct Client {
    pub(super) handle: SocketHandle,
    pub(super) conn: Option<u64>,
    pub(super) out: Vec<u8>,
    pub(super) closing: bool,
    /// When the SYN arrived.
    pub(super) opened_ns: u64,
    /// When a byte last moved: taken in, queued out, or acknowledged.
    pub(super) active_ns: u64,
    /// The socket's unacknowledged output at the last look, to see ACKs.
    pub(super) send_queue: usize,
    /// Cut by memd: the socket is kept for one more pass, so its reset
    /// leaves and the peer learns the connection is gone.
    pub(super) cut: bool,
    /// The handler had a request of this connection in progress after its
    /// last turn: it gets a turn every pass, input or not.
    pub(super) busy: bool,
}

impl Client {
    pub(super) fn new(handle: SocketHandle, now: u64) -> Client {
        Client {
            handle,
            conn: None,
            out: Vec::new(),
            closing: false,
            opened_ns: now,
            active_ns: now,
            send_queue: 0,
            cut: false,
            busy: false,
        }
    }
}

/// Why a connection was cut.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cut {
    NoHello,
    PartialRequest,
    NotReading,
    Idle,
    Evicted,
}

/// Connections cut, by reason, for the log.
static CUTS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// One client's turn: input to the handler, output to the socket, and the
/// end of its connection. Returns whether its turn wrote replies.
pub(super) fn serve_client(
    c: &mut Client,
    s: &mut tcp::Socket,
    handler: &mut dyn Handler,
    shutdown: &mut Option<u64>,
    now: u64,
) -> bool {
    let handshaking = matches!(
        s.state(),
        tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent
    );
    if c.conn.is_none() && s.is_active() && !handshaking {
        c.conn = Some(handler.on_connect());
    }
    let Some(conn) = c.conn else {
        return false;
    };
    let mut wrote = false;
    while !c.closing && c.out.len() < MAX_PENDING_OUT {
        let busy = c.busy;
        if !busy && !s.can_recv() {
            break;
        }
        let before = c.out.len();
        let (taken, offered, flow) = if s.can_recv() {
            s.recv(|input| {
                let (taken, flow) = handler.on_bytes(conn, input, &mut c.out, MAX_PENDING_OUT);
                (taken, (taken, input.len(), flow))
            })
            .unwrap_or((0, 0, Flow::Close))
        } else {
            let (_, flow) = handler.on_bytes(conn, &[], &mut c.out, MAX_PENDING_OUT);
            (0, 0, flow)
        };
        if taken > 0 || busy {
            c.active_ns = now;
        }
        wrote |= c.out.len() > before;
        c.busy = handler.busy(conn);
        match flow {
            Flow::Continue => {}
            Flow::Close => c.closing = true,
            Flow::Shutdown => {
                c.closing = true;
                shutdown.get_or_insert(time::uptime_ns() + 1_000_000_000);
            }
        }
        // The turn ended before the input did (its budget, the output
        // bound, or a request waiting for the one in progress), or there
        // was none: the rest is for the next pass.
        if taken < offered || offered == 0 {
            break;
        }
    }
    if !c.out.is_empty() && s.can_send() {
        if let Ok(n) = s.send_slice(&c.out) {
            c.out.drain(..n);
            if n > 0 {
                c.active_ns = now;
            }
        }
    }
    // Acknowledged output is progress too: the peer is reading.
    let queued = s.send_queue();
    if queued < c.send_queue {
        c.active_ns = now;
    }
    c.send_queue = queued;
    if !s.may_recv() && !s.can_recv() {
        // The peer finished sending (FIN) or the connection is gone.
        c.closing = true;
    }
    if !s.may_send() {
        c.out.clear();
    }
    if c.closing && c.out.is_empty() {
        s.close();
    }
    if !s.is_active() {
        handler.on_close(conn);
        c.conn = None;
        c.out = Vec::new();
        c.busy = false;
    }
    wrote
}

/// Whether `c` has outstayed a timeout, and which.
pub(super) fn overdue(
    c: &Client,
    s: &tcp::Socket,
    handler: &dyn Handler,
    t: &Timeouts,
    now: u64,
) -> Option<Cut> {
    if !s.is_active() {
        return None;
    }
    let quiet = now.saturating_sub(c.active_ns);
    let authenticated = c.conn.is_some_and(|conn| handler.authenticated(conn));
    if !authenticated && now.saturating_sub(c.opened_ns) > t.hello_ns {
        Some(Cut::NoHello)
    } else if (!c.out.is_empty() || s.send_queue() > 0) && quiet > t.send_ns {
        Some(Cut::NotReading)
    } else if c.conn.is_some_and(|conn| handler.partial_request(conn)) && quiet > t.partial_ns {
        Some(Cut::PartialRequest)
    } else if t.idle_ns.is_some_and(|idle| quiet > idle) {
        Some(Cut::Idle)
    } else {
        None
    }
}

/// Cuts a connection: reset, and what it held released at once, as on a
/// disconnect.
pub(super) fn cut(c: &mut Client, s: &mut tcp::Socket, handler: &mut dyn Handler, why: Cut) {
    let n = CUTS[why as usize].fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        info!("net: cut a connection ({why:?}; {n} so far)");
    }
    s.abort();
    if let Some(conn) = c.conn.take() {
        handler.on_close(conn);
    }
    c.out = Vec::new();
    c.busy = false;
    c.closing = true;
    c.cut = true;
}
