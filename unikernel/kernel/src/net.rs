//! The network: smoltcp on virtio-net, polled. A static IPv4 address
//! (`memd.ip=10.0.2.15/24`, `memd.gw=10.0.2.2`: QEMU user networking's
//! defaults) and a TCP server on `memd.port=` (default 5555) with one
//! listening socket per client slot, so up to `MAX_CLIENTS` clients can be
//! connected at once (fewer on small guests, see `client_slots`). What the bytes mean is the job of a `Handler`.

use alloc::vec;
use alloc::vec::Vec;

use log::{info, warn};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::arch::time;
use crate::cmdline;
use crate::drivers::net::NetDevice;

/// Most clients connected at once.
/// 256 load-test clients plus control connections.
pub const MAX_CLIENTS: usize = 264;
/// Fewest client slots, whatever the guest's size.
const MIN_CLIENTS: usize = 16;
const SOCKET_BUF: usize = 64 * 1024;
/// Stop reading a client while this much of its output is still unsent.
const MAX_PENDING_OUT: usize = 256 * 1024;
/// Largest Ethernet frame (no FCS).
const MTU: usize = 1514;

/// Client slots for a guest with `total` bytes under memd-mm: one per
/// 3 MiB, between `MIN_CLIENTS` and `MAX_CLIENTS`. Each slot holds 128 KiB
/// of socket buffers, so a 64 MiB guest keeps 21 slots (2.6 MiB) and a
/// 1 GiB guest serves 264 clients for 33 MiB (3 %).
fn client_slots(total: u64) -> usize {
    ((total / (3 << 20)) as usize).clamp(MIN_CLIENTS, MAX_CLIENTS)
}

/// What to do with a connection after its bytes were handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Send what was written, then close.
    Close,
    /// Send what was written, then stop serving.
    Shutdown,
}

/// The service behind the sockets.
pub trait Handler {
    fn on_connect(&mut self) -> u64;
    fn on_bytes(&mut self, conn: u64, input: &[u8], out: &mut Vec<u8>) -> Flow;
    fn on_close(&mut self, conn: u64);
}

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
    Instant::from_micros((time::uptime_ns() / 1000) as i64)
}

struct Client {
    handle: SocketHandle,
    conn: Option<u64>,
    out: Vec<u8>,
    closing: bool,
}

/// Serves forever (or until a handler asks for shutdown).
pub fn serve(mut dev: NetDevice, cfg: NetConfig, handler: &mut dyn Handler) {
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
    let mut sockets = SocketSet::new(Vec::with_capacity(slots));
    let mut clients: Vec<Client> = (0..slots)
        .map(|_| {
            let rx = tcp::SocketBuffer::new(vec![0u8; SOCKET_BUF]);
            let tx = tcp::SocketBuffer::new(vec![0u8; SOCKET_BUF]);
            let mut s = tcp::Socket::new(rx, tx);
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            let _ = s.listen(cfg.port);
            Client {
                handle: sockets.add(s),
                conn: None,
                out: Vec::new(),
                closing: false,
            }
        })
        .collect();
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
    loop {
        iface.poll(now(), &mut Phy(&mut dev), &mut sockets);
        for c in clients.iter_mut() {
            let s = sockets.get_mut::<tcp::Socket>(c.handle);
            let handshaking = matches!(
                s.state(),
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent
            );
            if c.conn.is_none() && s.is_active() && !handshaking {
                c.conn = Some(handler.on_connect());
                c.out.clear();
                c.closing = false;
            }
            if let Some(conn) = c.conn {
                while !c.closing && c.out.len() < MAX_PENDING_OUT && s.can_recv() {
                    let flow = s
                        .recv(|input| {
                            let flow = handler.on_bytes(conn, input, &mut c.out);
                            (input.len(), flow)
                        })
                        .unwrap_or(Flow::Close);
                    match flow {
                        Flow::Continue => {}
                        Flow::Close => c.closing = true,
                        Flow::Shutdown => {
                            c.closing = true;
                            shutdown.get_or_insert(time::uptime_ns() + 1_000_000_000);
                        }
                    }
                }
                if !c.out.is_empty() && s.can_send() {
                    if let Ok(n) = s.send_slice(&c.out) {
                        c.out.drain(..n);
                    }
                }
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
                }
            }
            if !s.is_open() {
                let _ = s.listen(cfg.port);
            }
        }
        let flushed = clients.iter().all(|c| c.out.is_empty());
        if shutdown.is_some_and(|deadline| flushed || time::uptime_ns() > deadline) {
            // Let the last replies and FINs leave.
            let until = time::uptime_ns() + 50_000_000;
            while time::uptime_ns() < until {
                iface.poll(now(), &mut Phy(&mut dev), &mut sockets);
            }
            info!("net: shutdown requested; {:?}", dev.stats);
            return;
        }
        core::hint::spin_loop();
    }
}
