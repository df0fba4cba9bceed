//! The network: smoltcp on virtio-net, polled. A static IPv4 address
//! (`memd.ip=10.0.2.15/24`, `memd.gw=10.0.2.2`: QEMU user networking's
//! defaults) and a TCP server on `memd.port=` (default 5555) for up to
//! `MAX_CLIENTS` clients at once (fewer on small guests, see
//! `client_slots`). What the bytes mean is the job of a `Handler`.
//!
//! ACKs are delayed (smoltcp's default, 10 ms) so that a reply carries the
//! ACK of its request: one segment each way per request instead of two
//! from the guest.

mod client;
mod config;
mod phy;
mod sockets;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use crate::arch::{self, time};
use crate::drivers::virtio_net::NetDevice;

pub use config::{NetConfig, Timeouts};
use phy::{instant, now, Phy};
use sockets::{client_slots, listener_taken, Sockets};

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
/// Pageblocks (4 MiB each) of deferred frame-table initialisation per
/// pass: about 100 µs under TCG, most of it the host faulting in the
/// table's pages on first write.
const DEFERRED_PAGEBLOCKS: usize = 2;

/// Printed once every frame is initialised (at once when boot did it all).
pub const INITIALISED_LINE: &str = "memd: all memory initialised";

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

/// Sends what the sockets have queued, then tells the device.
fn send_queued(iface: &mut Interface, dev: &mut NetDevice, set: &mut SocketSet<'_>) {
    while iface.poll_egress(now(), &mut Phy(dev), set) != PollResult::None {}
    dev.kick();
}

/// Serves forever (or until a handler asks for shutdown).
pub fn serve(
    mut dev: NetDevice,
    cfg: NetConfig,
    timeouts: Timeouts,
    handler: &mut dyn Handler,
    balloon: &mut crate::balloon::Balloon,
    hotplug: &mut crate::hotplug::Hotplug,
) {
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
    // Sized for all of memory, what is initialised and what is to come.
    let slots = {
        let m = crate::ALLOC.lock().meminfo();
        client_slots(m.total + m.deferred)
    };
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
    let mut initialised = false;
    loop {
        let pass = time::uptime_ns();
        let packets = dev.stats.rx_packets + dev.stats.tx_packets;
        let t = instant(pass);
        iface.poll_maintenance(t);
        sockets.begin_pass(pass);
        while sockets.listening()
            && iface.poll_ingress_single(t, &mut Phy(&mut dev), &mut sockets.set)
                != PollIngressSingleResult::None
        {
            if sockets.listener_taken() {
                sockets.top_up_listeners(pass);
            }
        }
        // Receive buffers re-posted while taking packets in.
        dev.kick();
        let turns = sockets.serve(handler, &mut shutdown, pass, |set, listeners, starved| {
            // ACKs first (they open the window for the rest of a reply),
            // stopping at a SYN that took a listener: it is replaced later
            // (see `Sockets::listening` for when there is none).
            let t = now();
            while (!listeners.is_empty() || starved)
                && !listener_taken(set, listeners)
                && iface.poll_ingress_single(t, &mut Phy(&mut dev), set)
                    != PollIngressSingleResult::None
            {}
            send_queued(&mut iface, &mut dev, set);
        });
        // What departed connections held, a turn's worth per pass.
        let mut background = handler.background();
        // The frame table not initialised at boot, a few pageblocks a pass.
        if !initialised {
            initialised = crate::ALLOC.lock().deferred_init_step(DEFERRED_PAGEBLOCKS);
            if initialised {
                crate::logger::always(format_args!(
                    "{INITIALISED_LINE} after {} ms",
                    time::uptime_ns() / 1_000_000
                ));
            }
            background = true;
        }
        // The host's balloon target, and free memory to tell it about.
        background |= balloon.pass(time::uptime_ns());
        // The host's requested size for hot-plugged memory.
        background |= hotplug.pass(time::uptime_ns());
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
