//! The TCP sockets: listeners kept ready, clients served in turn, room
//! made when every slot is taken.

use alloc::vec::Vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;

use super::client::{cut, overdue, serve_client, Client, Cut};
use super::config::Timeouts;
use super::Handler;
use crate::arch::time;

/// Most clients connected at once.
/// 256 load-test clients plus control connections.
pub const MAX_CLIENTS: usize = 264;
/// Fewest client slots, whatever the guest's size.
const MIN_CLIENTS: usize = 16;
const SOCKET_BUF: usize = 64 * 1024;
/// Transmit buffer: a whole reply to a batch of 4096 operations (about
/// 80 KiB) fits, so it leaves in one go.
const TX_BUF: usize = 128 * 1024;

/// Client slots for a guest with `total` bytes under memd-mm: one per
/// 3 MiB, between `MIN_CLIENTS` and `MAX_CLIENTS`. Each connection holds
/// 192 KiB of socket buffers while it lasts, so 21 connections on a 64 MiB
/// guest take 3.9 MiB and 264 on a 1 GiB guest 50 MiB (5 %).
pub(super) fn client_slots(total: u64) -> usize {
    ((total / (3 << 20)) as usize).clamp(MIN_CLIENTS, MAX_CLIENTS)
}

/// A connection that has moved no byte for this long may be evicted to
/// make room for a new one when every slot is taken.
const EVICT_IDLE_NS: u64 = 1_000_000_000;

/// The TCP sockets. smoltcp has no accept queue (one socket serves one
/// connection) and looks at every socket for every packet and every poll,
/// so the set holds only the sockets in use plus `SPARE_LISTENERS`
/// listening ones, not one per client slot: with 264 sockets made up front
/// an idle poll cost 13 µs under TCG and smoltcp took 80 % of the guest's
/// time at 16 clients.
pub(super) struct Sockets {
    pub(super) set: SocketSet<'static>,
    /// Sockets in `Listen`, waiting for a SYN.
    pub(super) listeners: Vec<SocketHandle>,
    clients: Vec<Client>,
    /// Most connections at once (listeners not counted).
    slots: usize,
    port: u16,
    timeouts: Timeouts,
    /// Listeners this pass may still open.
    may_open: usize,
    /// This pass could not make a listener: memory is short.
    starved: bool,
}

/// Listening sockets kept beyond the connected ones. Packets are taken in
/// one at a time and the listeners topped up after each, so a burst of SYNs
/// never finds none while a slot is free.
const SPARE_LISTENERS: usize = 2;

/// Listeners a pass may open: each costs its 192 KiB of buffers, a few
/// hundred microseconds under TCG, so a burst of connections is taken in
/// over as many passes instead of one pass of milliseconds.
const NEW_LISTENERS_PER_PASS: usize = 1;

/// A client whose requests took longer than this has its replies sent
/// before the next client is served (a batch of 4096 operations takes
/// milliseconds under TCG; one operation, microseconds).
const FLUSH_AFTER_NS: u64 = 200_000;

impl Sockets {
    pub(super) fn new(slots: usize, port: u16, timeouts: Timeouts) -> Sockets {
        let mut sockets = Sockets {
            set: SocketSet::new(Vec::with_capacity(slots + SPARE_LISTENERS)),
            listeners: Vec::with_capacity(SPARE_LISTENERS),
            clients: Vec::with_capacity(slots + SPARE_LISTENERS),
            slots,
            port,
            timeouts,
            may_open: SPARE_LISTENERS,
            starved: false,
        };
        sockets.top_up_listeners(time::uptime_ns());
        sockets
    }

    /// Whether a listener took a SYN since the last top-up.
    pub(super) fn listener_taken(&self) -> bool {
        listener_taken(&self.set, &self.listeners)
    }

    /// Starts a pass: it may open [`NEW_LISTENERS_PER_PASS`] listeners,
    /// the first of them now if some are missing.
    pub(super) fn begin_pass(&mut self, now: u64) {
        self.may_open = NEW_LISTENERS_PER_PASS;
        self.starved = false;
        if self.listeners.len() < SPARE_LISTENERS {
            self.top_up_listeners(now);
        }
    }

    /// Whether packets may be taken in: a listener is waiting, or none
    /// could be made for want of memory (a SYN then gets a reset, and
    /// everyone else's packets, the frees that give memory back among
    /// them, still arrive). With none only because this pass opened its
    /// share, packets wait in the device for the next pass, so no SYN is
    /// refused.
    pub(super) fn listening(&self) -> bool {
        !self.listeners.is_empty() || self.starved
    }

    /// Moves listeners that took a SYN to the clients and opens new ones,
    /// as many as the pass may still open. Listeners are kept even when
    /// every slot is taken: a new connection then takes the slot of one
    /// that is not using it (see `make_room`). Their buffers are allocated
    /// fallibly: near exhaustion there are simply fewer listeners until
    /// memory returns.
    pub(super) fn top_up_listeners(&mut self, now: u64) {
        let mut i = 0;
        while i < self.listeners.len() {
            let handle = self.listeners[i];
            if self.set.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
                i += 1;
            } else {
                self.listeners.swap_remove(i);
                self.clients.push(Client::new(handle, now));
            }
        }
        while self.listeners.len() < SPARE_LISTENERS && self.may_open > 0 {
            let (Some(rx), Some(tx)) = (zeroed(SOCKET_BUF), zeroed(TX_BUF)) else {
                self.starved = true;
                return;
            };
            self.may_open -= 1;
            let mut s = tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx));
            s.set_nagle_enabled(false);
            if s.listen(self.port).is_err() {
                return;
            }
            self.listeners.push(self.set.add(s));
        }
    }

    /// With more connections than slots, cuts those that use theirs least:
    /// unauthenticated ones first (oldest first), then the longest idle
    /// that has moved nothing for `EVICT_IDLE_NS`; failing both, the
    /// newest connection itself. A crowd of silent sockets never locks a
    /// real client out.
    fn make_room(&mut self, handler: &mut dyn Handler, now: u64) {
        // The common case, every pass: no more sockets than slots at all.
        if self.clients.len() <= self.slots {
            return;
        }
        loop {
            let live: Vec<usize> = (0..self.clients.len())
                .filter(|&i| {
                    let c = &self.clients[i];
                    !c.cut && self.set.get::<tcp::Socket>(c.handle).is_open()
                })
                .collect();
            if live.len() <= self.slots {
                return;
            }
            let (&newest, older) = live.split_last().expect("more than slots");
            let unauth = older
                .iter()
                .copied()
                .filter(|&i| {
                    !self.clients[i]
                        .conn
                        .is_some_and(|c| handler.authenticated(c))
                })
                .min_by_key(|&i| self.clients[i].opened_ns);
            let idle = || {
                older
                    .iter()
                    .copied()
                    .filter(|&i| now.saturating_sub(self.clients[i].active_ns) > EVICT_IDLE_NS)
                    .min_by_key(|&i| self.clients[i].active_ns)
            };
            let victim = unauth.or_else(idle).unwrap_or(newest);
            let c = &mut self.clients[victim];
            let s = self.set.get_mut::<tcp::Socket>(c.handle);
            cut(c, s, handler, Cut::Evicted);
        }
    }

    /// Feeds each client's input to `handler` and queues its output; closes
    /// and drops the sockets whose connection ended. Sets the shutdown
    /// deadline if a client asked for it. `flush` runs after a client whose
    /// requests took longer than `FLUSH_AFTER_NS`, so its reply is on the
    /// wire while the next client's request runs (the host's side of the
    /// connection, QEMU's network thread and the client, works meanwhile on
    /// the other CPU). Short requests wait for the one flush after the loop:
    /// each flush visits every socket.
    pub(super) fn serve(
        &mut self,
        handler: &mut dyn Handler,
        shutdown: &mut Option<u64>,
        now: u64,
        mut flush: impl FnMut(&mut SocketSet<'static>, &[SocketHandle], bool),
    ) -> bool {
        self.make_room(handler, now);
        let mut turns = false;
        let mut i = 0;
        while i < self.clients.len() {
            let c = &mut self.clients[i];
            let s = self.set.get_mut::<tcp::Socket>(c.handle);
            // Timed only when there is input or work in progress: the clock
            // costs a QEMU call.
            let start = (s.can_recv() || c.busy).then(time::uptime_ns);
            let wrote = serve_client(c, s, handler, shutdown, now);
            turns |= start.is_some();
            // A turn that wrote nothing (work set aside) has nothing to send.
            if wrote && start.is_some_and(|t| time::uptime_ns() - t > FLUSH_AFTER_NS) {
                flush(&mut self.set, &self.listeners, self.starved);
            }
            let c = &mut self.clients[i];
            let s = self.set.get_mut::<tcp::Socket>(c.handle);
            if let Some(why) = overdue(c, s, handler, &self.timeouts, now) {
                cut(c, s, handler, why);
            }
            let c = &mut self.clients[i];
            let s = self.set.get::<tcp::Socket>(c.handle);
            if s.is_open() && s.state() != tcp::State::Listen {
                i += 1;
            } else if c.cut {
                // Kept until its reset has left (the flush after the loop).
                c.cut = false;
                c.closing = true;
                i += 1;
            } else {
                // Closed or in TIME-WAIT (nothing left to deliver), or a
                // handshake reset back to Listen: the slot is free again.
                self.set.remove(c.handle);
                self.clients.swap_remove(i);
            }
        }
        // Short of listeners (memory was short), or a flush took a SYN.
        if self.listeners.len() < SPARE_LISTENERS || self.listener_taken() {
            self.top_up_listeners(now);
        }
        turns
    }

    pub(super) fn all_flushed(&self) -> bool {
        self.clients.iter().all(|c| c.out.is_empty())
    }
}

/// Whether one of `listeners` left `Listen` (took a SYN).
pub(super) fn listener_taken(set: &SocketSet<'_>, listeners: &[SocketHandle]) -> bool {
    listeners
        .iter()
        .any(|h| set.get::<tcp::Socket>(*h).state() != tcp::State::Listen)
}

/// A zeroed buffer of `len` bytes, or None when the heap cannot hold it.
fn zeroed(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}
