//! Glue between the network and memd-service: the service's `Env` lends it
//! memd-mm under the global allocator's lock, and `net::Handler` feeds it
//! the bytes of each connection.

use alloc::string::String;
use alloc::vec::Vec;

use memd_mm::{DmaBuffer, MemoryManager};
use memd_service::{
    BlockDevice, Config, DeviceDma, Env, Job, MemError, PerCpuMemory, Placement, Service,
};

use crate::arch::time;
use crate::drivers::hal;
use crate::drivers::virtio_blk::BlkDevice;
use crate::net::{Flow, Handler};
use crate::ALLOC;

struct KernelEnv {
    disk: Option<BlkDevice>,
    /// The service's turn budget, for the status view.
    budget_ns: u64,
}

impl Env for KernelEnv {
    type Mem = MemoryManager;

    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        // memd-service's `Memory` calls never allocate (the manager is the
        // heap), and the disk driver does not either once it is set up, so
        // holding the allocator's lock here cannot deadlock.
        // What the service charges to a client is charged inside
        // `Memory::as_owner`, which gives the kernel its owner back.
        let mut mm = ALLOC.lock();
        match &mut self.disk {
            Some(d) => f(&mut mm, Some(d)),
            None => f(&mut mm, None),
        }
    }

    fn dma_alloc(
        &mut self,
        owner: u64,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<DmaBuffer, MemError> {
        PerCpuMemory::dma_alloc(&ALLOC, owner, len, align, at, zeroed)
    }

    fn dma_free(&mut self, buf: DmaBuffer) -> Result<(), MemError> {
        PerCpuMemory::dma_free(&ALLOC, &buf)
    }

    fn now_ns(&mut self) -> u64 {
        time::uptime_ns()
    }

    fn percpu(&mut self) -> Option<&'static dyn PerCpuMemory> {
        Some(&ALLOC)
    }

    fn cpu_pagesets(&mut self) -> Vec<[u64; memd_mm::NR_ZONES]> {
        let online = crate::arch::smpboot::online() as usize;
        ALLOC.cpu_pagesets().take(online).collect()
    }

    fn cpu_stats(&mut self) -> Vec<memd_mm::stats::CpuStats> {
        let online = crate::arch::smpboot::online() as usize;
        ALLOC.cpu_stats().take(online).collect()
    }

    fn work_cpus(&mut self) -> usize {
        crate::arch::smpboot::online().saturating_sub(1) as usize
    }

    fn queue_on(&mut self, cpu: usize, job: Job) -> Result<(), Job> {
        crate::workqueue::queue_work_on(cpu, job)
    }

    fn busy_ns(&mut self) -> Option<u64> {
        Some(crate::net::busy_ns())
    }

    fn halted_ns(&mut self) -> Option<u64> {
        Some(crate::net::halted_ns())
    }

    fn balloon_target_bytes(&mut self) -> Option<u64> {
        crate::balloon::target_bytes()
    }

    fn cpus(&mut self) -> Vec<memd_wire::Cpu> {
        let now = time::uptime_ns();
        let mut cpus = Vec::new();
        let stats: Vec<_> = ALLOC.cpu_stats().collect();
        for k in 0..crate::arch::percpu::MAX_CPUS {
            let Some((apic_id, since)) = crate::arch::smpboot::cpu(k) else {
                continue;
            };
            let (pages, objects) = stats
                .get(k)
                .map_or_else(Default::default, |s| (s.pages, s.objects_summed()));
            cpus.push(if k == 0 {
                let halted = crate::net::halted_ns();
                memd_wire::Cpu {
                    apic_id,
                    role: "network loop".into(),
                    busy_ns: now.saturating_sub(halted),
                    halted_ns: halted,
                    pages,
                    objects,
                }
            } else {
                // The others halt from the moment they are up but for the
                // jobs they run.
                let busy = crate::workqueue::busy_ns(k);
                memd_wire::Cpu {
                    apic_id,
                    role: if crate::workqueue::busy(k) {
                        "worker (running a job)"
                    } else {
                        "worker"
                    }
                    .into(),
                    busy_ns: busy,
                    halted_ns: now.saturating_sub(since).saturating_sub(busy),
                    pages,
                    objects,
                }
            });
        }
        cpus
    }

    fn hotplug(&mut self) -> Option<memd_wire::Hotplug> {
        crate::hotplug::snapshot()
    }

    fn loop_passes(&mut self) -> Option<memd_wire::LoopPasses> {
        Some(crate::passes::snapshot(self.budget_ns, time::uptime_ns()))
    }

    fn device_dma(&mut self) -> Vec<DeviceDma> {
        // Copied out of the registry first: building the strings allocates,
        // and the allocator is never taken while the registry is locked.
        let held = hal::device_dma();
        held.iter()
            .flatten()
            .map(|d| {
                let mut owner = String::from(d.device);
                owner.push(' ');
                owner.push_str(d.purpose);
                DeviceDma {
                    owner,
                    phys: d.phys,
                    len: d.len,
                    cma: d.cma,
                }
            })
            .collect()
    }
}

pub struct MemdService {
    svc: Service<MemoryManager>,
    env: KernelEnv,
}

impl MemdService {
    /// The service with both roles: `operator_token` may do everything,
    /// `client_token` allocation work and views only.
    pub fn new(operator_token: String, client_token: String, disk: Option<BlkDevice>) -> Self {
        let mut config = Config::new(operator_token).with_client_token(client_token);
        config.started_ns = time::uptime_ns();
        let budget_ns = config.budget_ns;
        MemdService {
            svc: Service::new(config),
            env: KernelEnv { disk, budget_ns },
        }
    }
}

impl Handler for MemdService {
    fn on_connect(&mut self) -> u64 {
        self.svc.on_connect()
    }

    fn on_bytes(
        &mut self,
        conn: u64,
        input: &[u8],
        out: &mut Vec<u8>,
        max_out: usize,
    ) -> (usize, Flow) {
        self.svc
            .on_bytes_bounded(&mut self.env, conn, input, out, max_out)
    }

    fn authenticated(&self, conn: u64) -> bool {
        self.svc.is_authenticated(conn)
    }

    fn partial_request(&self, conn: u64) -> bool {
        self.svc.has_partial_request(conn)
    }

    fn on_close(&mut self, conn: u64) {
        self.svc.on_close(&mut self.env, conn)
    }

    fn busy(&self, conn: u64) -> bool {
        self.svc.has_work(conn)
    }

    fn background(&mut self) -> bool {
        if self.svc.pending_release() == 0 {
            return false;
        }
        self.svc.background(&mut self.env);
        true
    }
}
