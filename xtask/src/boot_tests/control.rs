//! The control port end to end: roles and tokens, a hostile frame, many
//! clients at once and the memory they give back, the service's busy and
//! halted time.

use std::time::{Duration, Instant};

use crate::tokens::GuestTokens;

/// Clients this check holds at once (the control plane must serve at least 64).
const CLIENTS: usize = 64;

/// Through the host forward, across virtio-net, smoltcp and memd-service:
/// the operator's token gets the operator's role, the client's a client's
/// (EPERM for `check`, views allowed); a wrong token is refused; a hostile
/// frame (length prefix beyond the maximum) gets an error reply and a
/// close; 64 authenticated clients are connected at once and each holds a
/// page; after they all disconnect, free memory is back at its baseline
/// (the service released their pages). The service counts its busy time,
/// and halts when idle.
pub(super) fn control_port_check(port: u16, tokens: &GuestTokens) -> Result<(), String> {
    use memd_client::wire::{errno, Gfp, Role};
    use memd_client::{Client, Error, Options};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let addr = format!("127.0.0.1:{port}");
    // The clients hold the client token; the main connection, which drops
    // caches, the operator's.
    let opts = Options::new(addr.clone(), &tokens.client);
    let mut main = Client::connect(&Options::new(addr.clone(), &tokens.operator))
        .map_err(|e| format!("connect: {e}"))?;
    if main.hello().role != Role::Operator {
        return Err(format!(
            "the operator token got role {:?}",
            main.hello().role
        ));
    }
    let status = main.status().map_err(|e| format!("status: {e}"))?;
    // Free memory as the load test counts it: free pages plus every slab
    // byte that holds no live object. Connections allocate through
    // kmalloc, and which slab pages stay partly used depends on how
    // requests happened to interleave; counting the free slots makes the
    // figure exact whatever that fragmentation.
    let available = |c: &mut Client| crate::loadtest::available(c).map_err(|e| format!("{e:#}"));
    let baseline = available(&mut main)?;

    match Client::connect(&Options::new(addr.clone(), "wrong-token")) {
        Err(Error::Server(_)) => {}
        Err(e) => {
            return Err(format!(
                "wrong token: want a refusal from the server, got {e}"
            ))
        }
        Ok(_) => return Err("a wrong token was accepted".into()),
    }
    // The client token: a client's role, and EPERM for what only the
    // operator may do.
    let mut client = Client::connect(&opts).map_err(|e| format!("client connect: {e}"))?;
    if client.hello().role != Role::Client {
        return Err(format!(
            "the client token got role {:?}",
            client.hello().role
        ));
    }
    match client.check() {
        Err(e) if e.code() == Some(errno::EPERM) => {}
        other => {
            return Err(format!(
                "check with the client token: want EPERM, got {other:?}"
            ))
        }
    }
    if let Err(e) = client.meminfo() {
        return Err(format!("meminfo with the client token: {e}"));
    }
    drop(client);

    let mut s = TcpStream::connect(&addr).map_err(|e| format!("raw connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4])
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !reply.is_empty() => {}
        Err(e) => return Err(format!("oversize frame: reading the reply: {e}")),
    }
    if reply.len() < 5 {
        return Err(format!(
            "oversize frame: {} reply bytes, want an error frame",
            reply.len()
        ));
    }
    // Closed from this side too, so the guest's socket is gone before the
    // baseline: half-closed and never authenticated, it would be cut by
    // the guest's hello timeout in the middle of the rounds.
    drop(s);

    // Round 0 warms up what grows once and stays (the service's connection
    // table, socket buffers' first use); round 1 must then return every
    // byte: a per-connection leak shows as a drop below the baseline.
    let mut baseline = baseline;
    for round in 0..2 {
        let mut clients = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let mut c =
                Client::connect(&opts).map_err(|e| format!("client {i} of {CLIENTS}: {e}"))?;
            c.alloc_pages(0, Gfp::KERNEL)
                .map_err(|e| format!("client {i}: alloc_pages: {e}"))?;
            clients.push(c);
        }
        let during = available(&mut main)?;
        if during >= baseline {
            return Err(format!("{CLIENTS} clients hold a page each, yet free memory did not drop ({during} >= {baseline})"));
        }
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = 0;
        let mut stable = 0;
        loop {
            let now = available(&mut main)?;
            if round == 1 && now == baseline {
                break;
            }
            // Round 0: wait until the closes are processed (value stable).
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            if round == 0 && stable >= 5 {
                baseline = now;
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "round {round}: free memory {now} after all clients left, baseline {baseline}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if status.page_size != 4096 {
        return Err(format!("status reports page size {}", status.page_size));
    }
    // The kernel accounts the poll loop's work: it grew with the clients'
    // requests, and stays below the time the service has been up.
    let later = main.status().map_err(|e| format!("status: {e}"))?;
    match (status.busy_ns, later.busy_ns) {
        (Some(before), Some(after)) if after > before && after <= later.uptime_ns => {}
        other => {
            return Err(format!(
                "busy time before and after the clients: {other:?} (uptime {} ns)",
                later.uptime_ns
            ))
        }
    }
    // Idle, the poll loop halts on the APIC timer instead of spinning: over
    // half a second with no requests, most of the time is spent halted.
    let (a, b) = (main.status().map_err(|e| format!("status: {e}"))?, {
        std::thread::sleep(Duration::from_millis(500));
        main.status().map_err(|e| format!("status: {e}"))?
    });
    match (a.halted_ns, b.halted_ns) {
        (Some(x), Some(y)) if (y - x) * 2 > b.uptime_ns - a.uptime_ns => {}
        other => {
            return Err(format!(
                "halted time over {} ms idle: {other:?}",
                (b.uptime_ns - a.uptime_ns) / 1_000_000
            ))
        }
    }
    Ok(())
}
