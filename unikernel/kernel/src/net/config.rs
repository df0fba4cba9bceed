//! The network's settings from the kernel command line: the address and
//! port, and how long a connection may take at each step.

use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

use crate::cmdline;

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
