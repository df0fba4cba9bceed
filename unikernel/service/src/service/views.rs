//! What the service shows: its status, the memory manager's statistics
//! views, the clients, the DMA buffers, and the fault-injection rules.

use alloc::boxed::Box;
use alloc::vec::Vec;

use memd_wire::{
    errno, ClientInfo, DmaBufferInfo, DmaMask, DmaOwner, DmaSource, Reply, Status, WireError,
    DMA_LIST_PAGE, PROTOCOL_VERSION,
};

use super::conn::State;
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::{Memory, View};

impl<M: Memory> Service<M> {
    /// The service's status.
    pub(super) fn status<E: Env<Mem = M>>(&mut self, env: &mut E, page: u64) -> Reply {
        let now = env.now_ns();
        let (total, free, reported, balloon, max_order, has_block) = env.with_mem(|m, b| {
            (
                m.total_bytes(),
                m.free_bytes(),
                m.reported_bytes(),
                m.balloon_bytes(),
                m.max_order(),
                b.is_some(),
            )
        });
        Reply::Status(Box::new(Status {
            version: PROTOCOL_VERSION,
            server: self.config.server.clone(),
            uptime_ns: now.saturating_sub(self.config.started_ns),
            connections: self.conns.len() as u64,
            requests: self.requests,
            page_size: page,
            max_order,
            total_bytes: total,
            free_bytes: free,
            block_device: has_block,
            busy_ns: env.busy_ns(),
            halted_ns: env.halted_ns(),
            loop_passes: env.loop_passes(),
            reported_bytes: reported,
            balloon_bytes: balloon,
            balloon_target_bytes: env.balloon_target_bytes(),
            hotplug: env.hotplug(),
            cpus: env.cpus(),
        }))
    }

    /// Every connection, for the clients view, with the pages the memory
    /// manager charges to each one's owner id.
    pub(super) fn clients<E: Env<Mem = M>>(&self, env: &mut E) -> Vec<ClientInfo> {
        let mut list: Vec<ClientInfo> = self
            .conns
            .iter()
            .map(|(id, c)| ClientInfo {
                conn: *id,
                name: c.name.clone(),
                authenticated: c.state == State::Ready,
                handles: c.holdings.handles.len() as u64,
                owner: c.owner,
                charged_pages: 0,
                pages: c.holdings.pages,
                bytes: c.holdings.bytes,
                requests: c.requests,
                errors: c.errors,
                quota: (c.state == State::Ready).then_some(self.config.quota),
            })
            .collect();
        env.with_mem(|m, _| {
            for c in list.iter_mut().filter(|c| c.owner != 0) {
                c.charged_pages = m.owner_pages(c.owner);
            }
        });
        list
    }

    /// One page of the DMA listing: the devices' buffers, then every
    /// connection's, from position `start`.
    pub(super) fn dma_list<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        start: u64,
    ) -> Result<Reply, WireError> {
        let page = memd_mm::PAGE_SIZE;
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        let devices = env.device_dma();
        let clients = self.client_dma();
        let mut list = Vec::new();
        list.try_reserve_exact(DMA_LIST_PAGE)
            .map_err(|_| err(errno::ENOMEM, "no memory to list the DMA buffers"))?;
        let device_infos = devices.into_iter().map(|d| DmaBufferInfo {
            handle: 0,
            conn: 0,
            phys: d.phys,
            len: d.len,
            align: page,
            mask: DmaMask::Bits64,
            source: if d.cma {
                DmaSource::Cma
            } else {
                DmaSource::Buddy
            },
            zone: memd_mm::ZoneType::of_pfn(d.phys / page).name().into(),
            owner: DmaOwner::DeviceQueue { device: d.owner },
        });
        list.extend(
            device_infos
                .chain(clients.cloned())
                .skip(start)
                .take(DMA_LIST_PAGE),
        );
        Ok(Reply::DmaBuffers(list))
    }
}

/// A statistics reply: the entries counted under the lock, room for them
/// made outside it, the snapshot taken under it again, rendered after.
pub(super) fn stats<E: Env>(env: &mut E, view: View) -> Result<Reply, WireError> {
    let entries = env.with_mem(|m, _| m.view_len(view));
    let mut snap = <E::Mem as Memory>::stats_room(view, entries)
        .map(Box::new)
        .map_err(mem_err)?;
    env.with_mem(|m, _| m.snapshot(view, &mut snap));
    let mut reply = <E::Mem as Memory>::render(view, &snap);
    match (&mut reply, view) {
        (Reply::Zoneinfo(zones), _) => add_cpu_pagesets(zones, &env.cpu_pagesets()),
        (Reply::Slabinfo(caches), View::Slabinfo { start }) => {
            add_cpustat(caches, start, &env.cpu_stats())
        }
        _ => {}
    }
    Ok(reply)
}

/// The kmalloc caches' `cpustat`, every CPU's arrays summed. They are the
/// first caches listed, in size-class order (ids 0 to `NR_KMALLOC - 1`,
/// made at boot and never destroyed); a listing from `start` begins with
/// the cache of id `start`'s class, if any. Nothing without CPU caches.
fn add_cpustat(
    caches: &mut [memd_wire::SlabInfo],
    start: usize,
    cpus: &[memd_mm::stats::CpuStats],
) {
    if cpus.is_empty() {
        return;
    }
    for (class, cache) in (start..memd_mm::NR_KMALLOC).zip(caches) {
        let mut sum = memd_mm::stats::CpuStat::default();
        for cpu in cpus {
            sum += cpu.objects[class];
        }
        debug_assert!(cache.builtin, "kmalloc caches come first");
        cache.cpustat = Some(sum);
    }
}

/// Each CPU's pageset in each zone, from the frames its page lists hold
/// there.
fn add_cpu_pagesets(zones: &mut [memd_wire::ZoneInfo], cpus: &[[u64; memd_mm::NR_ZONES]]) {
    for zone in zones {
        let Some(z) = memd_mm::ZoneType::ALL
            .iter()
            .position(|t| t.name() == zone.name)
        else {
            continue;
        };
        zone.cpu_pagesets = (0..)
            .zip(cpus)
            .map(|(cpu, frames)| memd_wire::CpuPageset {
                cpu,
                count: frames[z],
                high: memd_mm::CPU_PAGES_HIGH,
                batch: memd_mm::PCP_BATCH as u64,
            })
            .collect();
    }
}

/// Both fault-injection rules with their counters.
pub(super) fn faults<E: Env>(env: &mut E) -> Reply {
    Reply::Faults(Box::new(env.with_mem(|m, _| m.faults())))
}
