//! The service on the host, for tests: memd-mm's host arena and a
//! [`Service`] behind one lock, served over TCP on loopback with a thread
//! per connection and one request at a time under the lock, as the kernel's
//! loop serves them.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use std::{io::Read, io::Write, string::String, string::ToString, thread, vec, vec::Vec};

use memd_mm::HostMm;
use memd_mm::MemoryManager;

use crate::{Config, ConnId, DirectEnv, Flow, Service};

/// Nanoseconds since the first call: the service's clock on the host.
pub fn host_clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A service over a host arena.
pub struct HostService {
    /// The memory manager.
    pub mm: HostMm,
    /// The service.
    pub svc: Service<MemoryManager>,
}

impl HostService {
    /// A service with `config` over `mm`.
    pub fn new(mm: HostMm, config: Config) -> HostService {
        HostService {
            mm,
            svc: Service::new(config),
        }
    }

    /// Free memory as the baselines of tests count it: free pages plus
    /// every slab byte that holds no live object, so it returns to the
    /// byte once everything clients took is back, whatever the slabs'
    /// fragmentation.
    pub fn available(&self) -> u64 {
        let m = self.mm.meminfo();
        let live: u64 = self
            .mm
            .slabinfo()
            .map(|(_, s)| s.active_objs * s.stride)
            .sum();
        m.free + m.slab - live
    }

    /// A service with `token` and the default quotas over `mm`, shared.
    /// The one token is the operator's: it may run every operation.
    pub fn shared(mm: HostMm, token: &str) -> Arc<Mutex<HostService>> {
        Arc::new(Mutex::new(HostService::new(mm, Config::new(token))))
    }

    /// As [`HostService::shared`], with both roles: `operator_token` may
    /// run every operation, `client_token` allocation work and views only.
    pub fn shared_with_roles(
        mm: HostMm,
        operator_token: &str,
        client_token: &str,
    ) -> Arc<Mutex<HostService>> {
        let config = Config::new(operator_token).with_client_token(client_token);
        Arc::new(Mutex::new(HostService::new(mm, config)))
    }

    fn env(mm: &mut HostMm) -> DirectEnv<'_, MemoryManager> {
        DirectEnv {
            mem: mm,
            block: None,
            clock: host_clock,
        }
    }

    /// [`Service::on_bytes`] with the arena.
    pub fn on_bytes(&mut self, conn: ConnId, input: &[u8], out: &mut Vec<u8>) -> Flow {
        self.svc
            .on_bytes(&mut Self::env(&mut self.mm), conn, input, out)
    }

    /// [`Service::on_close`] with the arena.
    pub fn on_close(&mut self, conn: ConnId) {
        self.svc.on_close_now(&mut Self::env(&mut self.mm), conn)
    }
}

/// Serves `shared` on `listener` until the process ends: each connection on
/// its own thread. Returns the listener's address.
pub fn serve_on(listener: TcpListener, shared: Arc<Mutex<HostService>>) -> String {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let shared = shared.clone();
            thread::spawn(move || {
                let Ok(id) = shared.lock().map(|mut h| h.svc.on_connect()) else {
                    return;
                };
                let mut buf = vec![0u8; 65536];
                let mut out = Vec::new();
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    out.clear();
                    let Ok(flow) = shared
                        .lock()
                        .map(|mut h| h.on_bytes(id, &buf[..n], &mut out))
                    else {
                        break;
                    };
                    if stream.write_all(&out).is_err() || flow != Flow::Continue {
                        break;
                    }
                }
                if let Ok(mut h) = shared.lock() {
                    h.on_close(id);
                }
            });
        }
    });
    addr
}

/// [`serve_on`] a new listener on a free loopback port.
pub fn serve(shared: Arc<Mutex<HostService>>) -> std::io::Result<String> {
    Ok(serve_on(TcpListener::bind("127.0.0.1:0")?, shared))
}
