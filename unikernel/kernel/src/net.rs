//! The network: smoltcp on virtio-net, polled. A static IPv4 address
//! (`memd.ip=10.0.2.15/24`, `memd.gw=10.0.2.2`: QEMU user networking's
//! defaults) and a TCP server on `memd.port=` (default 5555) for up to
//! `MAX_CLIENTS` clients at once (fewer on small guests, see
//! `client_slots`). What the bytes mean is the job of a `Handler`.
//!
//! ACKs are delayed (smoltcp's default, 10 ms) so that a reply carries the
//! ACK of its request: one segment each way per request instead of two
//! from the guest.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::arch::{self, time};
use crate::cmdline;
use crate::drivers::virtio_net::NetDevice;

/// Most clients connected at once.
/// 256 load-test clients plus control connections.
pub const MAX_CLIENTS: usize = 264;
/// Fewest client slots, whatever the guest's size.
const MIN_CLIENTS: usize = 16;
const SOCKET_BUF: usize = 64 * 1024;
/// Transmit buffer: a whole reply to a batch of 4096 operations (about
/// 80 KiB) fits, so it leaves in one go.
const TX_BUF: usize = 128 * 1024;
/// Stop reading a client while this much of its output is still unsent.
const MAX_PENDING_OUT: usize = 256 * 1024;
/// Largest Ethernet frame (no FCS).
const MTU: usize = 1514;

/// Client slots for a guest with `total` bytes under memd-mm: one per
/// 3 MiB, between `MIN_CLIENTS` and `MAX_CLIENTS`. Each connection holds
/// 192 KiB of socket buffers while it lasts, so 21 connections on a 64 MiB
/// guest take 3.9 MiB and 264 on a 1 GiB guest 50 MiB (5 %).
fn client_slots(total: u64) -> usize {
    ((total / (3 << 20)) as usize).clamp(MIN_CLIENTS, MAX_CLIENTS)
}

/// Nanoseconds spent in poll-loop passes that moved packets: the loop's
/// work, as opposed to its idle polling.
static BUSY_NS: AtomicU64 = AtomicU64::new(0);

/// [`BUSY_NS`], for the status view.
pub fn busy_ns() -> u64 {
    BUSY_NS.load(Ordering::Relaxed)
}

/// How long the loop must have moved no packet before it halts the CPU:
/// long enough that a loaded service (requests microseconds apart) never
/// halts, short enough that an idle one stops spinning at once.
pub const IDLE_BEFORE_HALT_NS: u64 = 1_000_000;
/// The longest halt, and so the most a packet arriving at an idle service
/// waits before it is seen (the device does not interrupt; the timer wakes
/// the loop).
const MAX_HALT_NS: u64 = 1_000_000;
/// Nanoseconds halted while idle.
static HALTED_NS: AtomicU64 = AtomicU64::new(0);

/// [`HALTED_NS`].
pub fn halted_ns() -> u64 {
    HALTED_NS.load(Ordering::Relaxed)
}

/// What to do with a connection after its bytes were handled: the
/// service's own answer.
pub use memd_service::Flow;

/// The service behind the sockets.
pub trait Handler {
    fn on_connect(&mut self) -> u64;
    /// One turn of `conn`: takes a prefix of `input` (returns its length),
    /// appending replies to `out`; stops taking once `out` holds `max_out`
    /// bytes or the turn is over.
    fn on_bytes(
        &mut self,
        conn: u64,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> (usize, Flow);
    fn on_close(&mut self, conn: u64);
    /// Whether `conn` has authenticated.
    fn authenticated(&self, conn: u64) -> bool;
    /// Whether `conn` has part of a request buffered.
    fn partial_request(&self, conn: u64) -> bool;
    /// Whether `conn` has a request in progress: its turn comes each pass,
    /// input or not.
    fn busy(&self, conn: u64) -> bool;
    /// One turn of work that belongs to no connection (what departed ones
    /// held); true when there was some.
    fn background(&mut self) -> bool;
}

/// How long a connection may take to authenticate, to finish a request it
/// started, to take its replies, and to stay silent (`memd.idle_timeout=`
/// seconds; 0 keeps idle connections forever).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub hello_ns: u64,
    pub partial_ns: u64,
    pub send_ns: u64,
    pub idle_ns: Option<u64>,
}

impl Timeouts {
    pub fn from_cmdline(line: &str) -> Result<Timeouts, &'static str> {
        let secs = |key: &str, default: u64| -> Result<u64, &'static str> {
            match cmdline::get(line, key) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| "a memd.*_timeout= is not a number of seconds"),
            }
        };
        const S: u64 = 1_000_000_000;
        let idle = secs("memd.idle_timeout", 300)?;
        Ok(Timeouts {
            hello_ns: secs("memd.hello_timeout", 5)?.max(1) * S,
            partial_ns: secs("memd.request_timeout", 10)?.max(1) * S,
            send_ns: secs("memd.send_timeout", 10)?.max(1) * S,
            idle_ns: (idle > 0).then_some(idle * S),
        })
    }
}

/// A connection that has moved no byte for this long may be evicted to
/// make room for a new one when every slot is taken.
const EVICT_IDLE_NS: u64 = 1_000_000_000;

/// Network settings from the command line.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub addr: Ipv4Cidr,
    pub gateway: Ipv4Address,
    pub port: u16,
}

impl NetConfig {
    pub fn from_cmdline(line: &str) -> Result<NetConfig, &'static str> {
        let addr = match cmdline::get(line, "memd.ip") {
            None => Ipv4Cidr::new(Ipv4Address::new(10, 0, 2, 15), 24),
            Some(v) => {
                let (ip, prefix) = v.split_once('/').unwrap_or((v, "24"));
                let ip: Ipv4Address = ip.parse().map_err(|_| "memd.ip: not an IPv4 address")?;
                let prefix: u8 = prefix
                    .parse()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or("memd.ip: bad prefix length")?;
                Ipv4Cidr::new(ip, prefix)
            }
        };
        let gateway = match cmdline::get(line, "memd.gw") {
            None => Ipv4Address::new(10, 0, 2, 2),
            Some(v) => v.parse().map_err(|_| "memd.gw: not an IPv4 address")?,
        };
        let port = match cmdline::get(line, "memd.port") {
            None => 5555,
            Some(v) => v
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or("memd.port: not a port number")?,
        };
        Ok(NetConfig {
            addr,
            gateway,
            port,
        })
    }
}

/// smoltcp's view of the virtio-net device.
struct Phy<'a>(&'a mut NetDevice);

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut NetDevice);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // `transmit` checked for a free slot, so this only fails for an
        // oversized frame; smoltcp never builds one above the MTU.
        let mut f = Some(f);
        match self
            .0
            .transmit(len, |buf| (f.take().expect("consume runs once"))(buf))
        {
            Some(r) => r,
            None => {
                // Dropped like on a full ring; TCP retransmits.
                let mut scratch = vec![0u8; len];
                (f.take().expect("consume runs once"))(&mut scratch)
            }
        }
    }
}

impl Device for Phy<'_> {
    type RxToken<'a>
        = RxToken
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.0.receive()?;
        Some((RxToken(frame), TxToken(self.0)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.0.can_transmit().then_some(TxToken(self.0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(16);
        caps
    }
}

fn now() -> Instant {
    instant(time::uptime_ns())
}

/// smoltcp's time for an uptime reading.
fn instant(uptime_ns: u64) -> Instant {
    Instant::from_micros((uptime_ns / 1000) as i64)
}

/// A socket that has left `Listen`: handshaking, connected or closing.
struct Client {
    handle: SocketHandle,
    conn: Option<u64>,
    out: Vec<u8>,
    closing: bool,
    /// When the SYN arrived.
    opened_ns: u64,
    /// When a byte last moved: taken in, queued out, or acknowledged.
    active_ns: u64,
    /// The socket's unacknowledged output at the last look, to see ACKs.
    send_queue: usize,
    /// Cut by memd: the socket is kept for one more pass, so its reset
    /// leaves and the peer learns the connection is gone.
    cut: bool,
    /// The handler had a request of this connection in progress after its
    /// last turn: it gets a turn every pass, input or not.
    busy: bool,
}

impl Client {
    fn new(handle: SocketHandle, now: u64) -> Client {
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
enum Cut {
    NoHello,
    PartialRequest,
    NotReading,
    Idle,
    Evicted,
}

/// Connections cut, by reason, for the log.
static CUTS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// The TCP sockets. smoltcp has no accept queue (one socket serves one
/// connection) and looks at every socket for every packet and every poll,
/// so the set holds only the sockets in use plus `SPARE_LISTENERS`
/// listening ones, not one per client slot: with 264 sockets made up front
/// an idle poll cost 13 µs under TCG and smoltcp took 80 % of the guest's
/// time at 16 clients.
struct Sockets {
    set: SocketSet<'static>,
    /// Sockets in `Listen`, waiting for a SYN.
    listeners: Vec<SocketHandle>,
    clients: Vec<Client>,
    /// Most connections at once (listeners not counted).
    slots: usize,
    port: u16,
    timeouts: Timeouts,
}

/// Listening sockets kept beyond the connected ones. Packets are taken in
/// one at a time and the listeners topped up after each, so a burst of SYNs
/// never finds none while a slot is free.
const SPARE_LISTENERS: usize = 2;

/// A client whose requests took longer than this has its replies sent
/// before the next client is served (a batch of 4096 operations takes
/// milliseconds under TCG; one operation, microseconds).
const FLUSH_AFTER_NS: u64 = 200_000;

impl Sockets {
    fn new(slots: usize, port: u16, timeouts: Timeouts) -> Sockets {
        let mut sockets = Sockets {
            set: SocketSet::new(Vec::with_capacity(slots + SPARE_LISTENERS)),
            listeners: Vec::with_capacity(SPARE_LISTENERS),
            clients: Vec::with_capacity(slots + SPARE_LISTENERS),
            slots,
            port,
            timeouts,
        };
        sockets.top_up_listeners(time::uptime_ns());
        sockets
    }

    /// Whether a listener took a SYN since the last top-up.
    fn listener_taken(&self) -> bool {
        listener_taken(&self.set, &self.listeners)
    }

    /// Moves listeners that took a SYN to the clients and opens new ones.
    /// Listeners are kept even when every slot is taken: a new connection
    /// then takes the slot of one that is not using it (see `make_room`).
    /// Their buffers are allocated fallibly: near exhaustion there are
    /// simply fewer listeners until memory returns.
    fn top_up_listeners(&mut self, now: u64) {
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
        while self.listeners.len() < SPARE_LISTENERS {
            let (Some(rx), Some(tx)) = (zeroed(SOCKET_BUF), zeroed(TX_BUF)) else {
                return;
            };
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
    fn serve(
        &mut self,
        handler: &mut dyn Handler,
        shutdown: &mut Option<u64>,
        now: u64,
        mut flush: impl FnMut(&mut SocketSet<'static>, &[SocketHandle]),
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
                flush(&mut self.set, &self.listeners);
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

    fn all_flushed(&self) -> bool {
        self.clients.iter().all(|c| c.out.is_empty())
    }
}

/// Whether one of `listeners` left `Listen` (took a SYN).
fn listener_taken(set: &SocketSet<'_>, listeners: &[SocketHandle]) -> bool {
    listeners
        .iter()
        .any(|h| set.get::<tcp::Socket>(*h).state() != tcp::State::Listen)
}

/// Sends what the sockets have queued, then tells the device.
fn send_queued(iface: &mut Interface, dev: &mut NetDevice, set: &mut SocketSet<'_>) {
    while iface.poll_egress(now(), &mut Phy(dev), set) != PollResult::None {}
    dev.kick();
}

/// One client's turn: input to the handler, output to the socket, and the
/// end of its connection. Returns whether its turn wrote replies.
fn serve_client(
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

/// A zeroed buffer of `len` bytes, or None when the heap cannot hold it.
fn zeroed(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}

/// Whether `c` has outstayed a timeout, and which.
fn overdue(
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
fn cut(c: &mut Client, s: &mut tcp::Socket, handler: &mut dyn Handler, why: Cut) {
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

/// Serves forever (or until a handler asks for shutdown).
pub fn serve(mut dev: NetDevice, cfg: NetConfig, timeouts: Timeouts, handler: &mut dyn Handler) {
    let mac = EthernetAddress(dev.mac());
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(mac)),
        &mut Phy(&mut dev),
        now(),
    );
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::Ipv4(cfg.addr));
    });
    if iface
        .routes_mut()
        .add_default_ipv4_route(cfg.gateway)
        .is_err()
    {
        warn!("net: could not add the default route via {}", cfg.gateway);
    }
    let slots = client_slots(crate::ALLOC.lock().meminfo().total);
    let mut sockets = Sockets::new(slots, cfg.port, timeouts);
    info!(
        "net: {} mac {mac} ip {} gw {}, TCP port {} ({slots} client slots)",
        dev.location, cfg.addr, cfg.gateway, cfg.port
    );
    crate::logger::always(format_args!(
        "memd: ready, listening on {}:{}",
        cfg.addr.address(),
        cfg.port
    ));

    // Set when a client asks for shutdown: the deadline for flushing replies
    // (a client that never reads must not keep the service up).
    let mut shutdown: Option<u64> = None;
    let mut last_work = time::uptime_ns();
    loop {
        let pass = time::uptime_ns();
        let packets = dev.stats.rx_packets + dev.stats.tx_packets;
        let t = instant(pass);
        iface.poll_maintenance(t);
        while iface.poll_ingress_single(t, &mut Phy(&mut dev), &mut sockets.set)
            != PollIngressSingleResult::None
        {
            if sockets.listener_taken() {
                sockets.top_up_listeners(pass);
            }
        }
        // Receive buffers re-posted while taking packets in.
        dev.kick();
        let turns = sockets.serve(handler, &mut shutdown, pass, |set, listeners| {
            // ACKs first (they open the window for the rest of a reply),
            // stopping at a SYN that took a listener: it is replaced later.
            let t = now();
            while !listener_taken(set, listeners)
                && iface.poll_ingress_single(t, &mut Phy(&mut dev), set)
                    != PollIngressSingleResult::None
            {}
            send_queued(&mut iface, &mut dev, set);
        });
        // What departed connections held, a turn's worth per pass.
        let background = handler.background();
        send_queued(&mut iface, &mut dev, &mut sockets.set);
        let end = time::uptime_ns();
        if dev.stats.rx_packets + dev.stats.tx_packets != packets || turns || background {
            BUSY_NS.fetch_add(end - pass, Ordering::Relaxed);
            crate::passes::record(pass, end);
            last_work = end;
        } else if end - last_work > IDLE_BEFORE_HALT_NS && shutdown.is_none() {
            let due = iface
                .poll_delay(instant(end), &sockets.set)
                .map_or(MAX_HALT_NS, |d| d.total_micros().saturating_mul(1000));
            if due > 0 {
                let halt = time::uptime_ns();
                arch::apic::halt_for(due.min(MAX_HALT_NS));
                HALTED_NS.fetch_add(time::uptime_ns() - halt, Ordering::Relaxed);
            }
        }
        if shutdown.is_some_and(|deadline| sockets.all_flushed() || time::uptime_ns() > deadline) {
            // Let the last replies and FINs leave.
            let until = time::uptime_ns() + 50_000_000;
            while time::uptime_ns() < until {
                iface.poll(now(), &mut Phy(&mut dev), &mut sockets.set);
                dev.kick();
            }
            info!("net: shutdown requested; {:?}", dev.stats);
            return;
        }
        core::hint::spin_loop();
    }
}
