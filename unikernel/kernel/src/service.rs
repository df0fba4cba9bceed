//! Glue between the network and memd-service: the service's `Env` lends it
//! memd-mm under the global allocator's lock, and `net::Handler` feeds it
//! the bytes of each connection.

use alloc::string::String;
use alloc::vec::Vec;

use memd_mm::MemoryManager;
use memd_service::{BlockDevice, Config, Env, Flow as SvcFlow, Service};

use crate::arch::time;
use crate::net::{Flow, Handler};
use crate::ALLOC;

struct KernelEnv;

impl Env for KernelEnv {
    type Mem = MemoryManager;

    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        // memd-service's `Memory` calls never allocate (the manager is the
        // heap), so holding its lock here cannot deadlock.
        let mut mm = ALLOC.lock();
        f(&mut mm, None)
    }

    fn now_ns(&mut self) -> u64 {
        time::uptime_ns()
    }
}

pub struct MemdService {
    svc: Service<MemoryManager>,
    env: KernelEnv,
}

impl MemdService {
    pub fn new(token: String) -> Self {
        let mut config = Config::new(token);
        config.started_ns = time::uptime_ns();
        MemdService {
            svc: Service::new(config),
            env: KernelEnv,
        }
    }
}

impl Handler for MemdService {
    fn on_connect(&mut self) -> u64 {
        self.svc.on_connect()
    }

    fn on_bytes(&mut self, conn: u64, input: &[u8], out: &mut Vec<u8>) -> Flow {
        match self.svc.on_bytes(&mut self.env, conn, input, out) {
            SvcFlow::Continue => Flow::Continue,
            SvcFlow::Close => Flow::Close,
            SvcFlow::Shutdown => Flow::Shutdown,
        }
    }

    fn on_close(&mut self, conn: u64) {
        self.svc.on_close(&mut self.env, conn)
    }
}
