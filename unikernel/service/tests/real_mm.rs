//! The service over the real memd-mm (host arena): every operation, release
//! on close back to the baseline, and no heap allocation while the memory
//! manager is borrowed (in the kernel that would deadlock on its lock).

mod common;

use std::sync::atomic::Ordering;

use common::{handle, Harness, RamDisk, ALLOCS_UNDER_LOCK};
use memd_service::ConnId;

use memd_mm::HostMm;
use memd_mm::MemoryManager;
use memd_wire::*;

#[global_allocator]
static GLOBAL: common::Guard = common::Guard;

/// The service over a fresh memd-mm (64 MiB, a 16 MiB DMA reservation in
/// DMA32), lent through [`common::LockEnv`].
fn harness() -> Harness<HostMm> {
    Harness::new(HostMm::three_zones(64 << 20, 0, "memd.dma_reserve=16M@dma32").expect("boot"))
}

/// Free memory now.
fn free(t: &Harness<HostMm>) -> u64 {
    t.mem.meminfo().free
}

#[test]
fn every_operation_over_memd_mm_and_back_to_baseline() {
    let mut t = harness();
    let a = t.login();
    // Warm up kmalloc caches the service itself does not use, then take
    // the baseline after a shrink-free state: the service's own heap is the
    // host's here, so free memory must return exactly.
    t.mem.reclaim();
    let base = free(&t);
    let b = t.login();

    match t.ok(a, Op::Status) {
        Reply::Status(s) => assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes),
        r => panic!("{r:?}"),
    }
    assert!(
        matches!(t.ok(a, Op::Meminfo), Reply::Meminfo(m) if m.total > 0 && m.cma_total == 16 << 20)
    );
    assert!(
        matches!(t.ok(a, Op::Zoneinfo), Reply::Zoneinfo(z) if z.len() == 4 && z[0].name == "DMA" && z[3].name == "Movable")
    );
    assert!(
        matches!(t.ok(a, Op::Buddyinfo), Reply::Buddyinfo(z) if !z.is_empty() && z[0].free.len() == 11)
    );
    assert!(
        matches!(t.ok(a, Op::Slabinfo { start: 0 }), Reply::Slabinfo(s) if s.iter().any(|c| c.builtin))
    );
    assert!(matches!(t.ok(a, Op::Cma), Reply::Cma(c) if c.present && c.total == 16 << 20));

    let p = t.ok(
        a,
        Op::AllocPages {
            order: 3,
            gfp: Gfp::KERNEL | Gfp::ZERO,
        },
    );
    assert!(matches!(p, Reply::Pages { order: 3, phys, .. } if phys % (8 * 4096) == 0));
    let k = t.ok(
        a,
        Op::Kmalloc {
            size: 100,
            gfp: Gfp::KERNEL,
        },
    );
    assert!(matches!(k, Reply::Object { size: 128, .. }), "{k:?}");
    t.ok(
        a,
        Op::Kmalloc {
            size: 100_000,
            gfp: Gfp::KERNEL,
        },
    );
    let cache = handle(&t.ok(
        a,
        Op::CacheCreate(CacheSpec {
            name: "svc-test".into(),
            size: 200,
            align: 64,
            flags: SlabFlags::HWCACHE_ALIGN,
            ctor: Ctor::Fill(0x5a),
        }),
    ));
    let objs: Vec<u64> = (0..50).map(|_| t.cache_alloc(a, cache)).collect();
    match t.ok(a, Op::Slabinfo { start: 0 }) {
        Reply::Slabinfo(s) => {
            let c = s.iter().find(|c| c.name == "svc-test").unwrap();
            assert_eq!(c.active_objs, 50);
            assert!(c.has_ctor && !c.builtin);
        }
        r => panic!("{r:?}"),
    }
    let e = t.call(a, Op::CacheDestroy { cache }).unwrap_err();
    assert_eq!(e.code, errno::EBUSY);
    for o in &objs[..25] {
        t.ok(a, Op::CacheFree { cache, object: *o });
    }
    let pool = t.pool_create(a, PoolBacking::Pages { order: 1 }, 4);
    t.pool_alloc(a, pool, Gfp::ATOMIC);
    let kpool = t.pool_create(a, PoolBacking::Cache(cache), 2);
    let el = t.pool_alloc(a, kpool, Gfp::KERNEL);
    assert!(
        matches!(t.ok(a, Op::Mempools { start: 0 }), Reply::Mempools(v) if v.len() == 2 && v.iter().any(|p| p.min_nr == 4))
    );
    t.pool_free(a, kpool, el).unwrap();

    // DMA: buddy-sized and CMA-sized, with I/O and the disk.
    let small = t.dma_alloc(a, 3 * 4096, 0, DmaMask::Bits24);
    let big = match t.ok(
        a,
        Op::DmaAlloc {
            len: 8 << 20,
            align: 1 << 20,
            mask: DmaMask::Bits32,
            movable: false,
        },
    ) {
        Reply::Dma(i) => {
            assert_eq!(i.source, DmaSource::Cma);
            assert_eq!(i.phys % (1 << 20), 0);
            i.handle
        }
        r => panic!("{r:?}"),
    };
    t.ok(
        a,
        Op::DmaWrite {
            handle: small,
            offset: 10,
            data: b"memd".to_vec(),
        },
    );
    assert_eq!(
        t.ok(
            a,
            Op::DmaRead {
                handle: small,
                offset: 10,
                len: 4
            }
        ),
        Reply::Data(b"memd".to_vec())
    );
    t.dma_fill(a, big, 99);
    let mut expect = vec![0u8; 8 << 20];
    fill_pattern(99, 0, &mut expect);
    t.assert_dma_holds(a, big, &expect);
    assert_eq!(
        t.call(
            a,
            Op::DmaWriteDisk {
                handle: big,
                sector: 0
            }
        )
        .unwrap_err()
        .code,
        errno::ENODEV
    );
    t.disk = Some(RamDisk::new(vec![0; 16 << 20]));
    t.write_disk(a, big, 8);
    t.dma_fill(a, big, 1);
    t.read_disk(a, big, 8);
    t.assert_dma_holds(a, big, &expect);
    let Reply::DmaBuffers(listed) = t.ok(b, Op::DmaBuffers { start: 0 }) else {
        panic!("dma list")
    };
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(
        listed
            .iter()
            .filter(|d| matches!(d.owner, DmaOwner::Client { .. }) && d.handle != 0)
            .count(),
        2,
        "{listed:?}"
    );
    let dev = listed
        .iter()
        .find(|d| matches!(&d.owner, DmaOwner::DeviceQueue { device } if device == "virtio-test queue 0 ring"))
        .unwrap_or_else(|| panic!("device ring not listed: {listed:?}"));
    assert_eq!(
        (
            dev.handle,
            dev.conn,
            dev.phys,
            dev.len,
            dev.zone.as_str(),
            dev.source
        ),
        (0, 0, 0x20_0000, 8192, "DMA", DmaSource::Buddy)
    );

    // b cannot touch a's handles.
    assert_eq!(
        t.call(b, Op::DmaFree { handle: big }).unwrap_err().code,
        errno::ENOENT
    );

    match t.ok(
        a,
        Op::Stress {
            ops: 20_000,
            seed: 5,
            cpus: 1,
        },
    ) {
        Reply::Stress(s) => assert!(s.check_ok && s.ops_per_sec > 0),
        r => panic!("{r:?}"),
    }
    t.ok(
        a,
        Op::FaultInject {
            target: FaultTarget::Pages,
            config: FaultConfig {
                probability: 100,
                interval: 1,
                times: 1,
            },
        },
    );
    assert_eq!(
        t.call(
            a,
            Op::AllocPages {
                order: 0,
                gfp: Gfp::KERNEL
            }
        )
        .unwrap_err()
        .code,
        errno::ENOMEM
    );
    assert!(matches!(t.ok(a, Op::Check), Reply::Check(r) if r.ok));

    t.close(a);
    t.close(b);
    assert!(matches!(MemoryManager::check(&t.mem), Ok(())));
    // Empty slabs the connection's caches grew are gone with the caches;
    // kmalloc's own caches may keep empty slabs and per-CPU objects:
    // shrink them before comparing.
    t.mem.reclaim();
    let c = t.login();
    assert!(matches!(t.ok(c, Op::Clients), Reply::Clients(v) if v.len() == 1));
    t.close(c);
    t.mem.reclaim();
    assert_eq!(free(&t), base, "free memory back to the baseline");
    assert_eq!(
        ALLOCS_UNDER_LOCK.load(Ordering::Relaxed),
        0,
        "heap used while the memory manager was borrowed"
    );
}

/// A client's pages are charged to its connection's owner tag, and the
/// kernel owns the memory manager again between calls.
#[test]
fn allocations_are_charged_to_the_client_and_the_kernel_owns_the_rest() {
    let mut t = harness();
    let c = t.login();
    let kernel = t.mem.owner_pages(memd_mm::Owner::KERNEL);
    let clients = |mm: &MemoryManager| -> u64 {
        mm.owners()
            .filter(|(o, _)| *o != memd_mm::Owner::KERNEL)
            .map(|(_, pages)| pages)
            .sum()
    };
    let p = handle(&t.ok(
        c,
        Op::AllocPages {
            order: 2,
            gfp: Gfp::KERNEL,
        },
    ));
    assert_eq!(t.mem.owner(), memd_mm::Owner::KERNEL);
    assert_eq!(clients(&t.mem), 4);
    assert_eq!(t.mem.owner_pages(memd_mm::Owner::KERNEL), kernel);
    t.ok(c, Op::FreePages { handle: p });
    assert_eq!(clients(&t.mem), 0);
    t.close(c);
}

/// 300 clients: each one's pages are charged to an owner id of its own
/// and the clients view shows them exactly; the 600 caches and 300 pools
/// they hold together fill no table and are listed page by page. Once they
/// leave, memd-mm holds what it held before they came.
#[test]
fn three_hundred_clients_are_charged_exactly_and_leave_nothing_behind() {
    let mut t = Harness::new(HostMm::three_zones(256 << 20, 0, "").expect("boot"));
    let viewer = t.login();
    t.mem.reclaim();
    let base = free(&t);
    let owner_ids = t.mem.owner_capacity();
    let clients: Vec<ConnId> = (0..300).map(|_| t.login()).collect();
    for (i, &c) in clients.iter().enumerate() {
        for _ in 0..i % 5 + 1 {
            t.ok(
                c,
                Op::AllocPages {
                    order: 1,
                    gfp: Gfp::KERNEL,
                },
            );
        }
        t.cache_create(c, "per-client", 48 + i as u32);
        t.cache_create(c, "per-client-2", 1000 + i as u32);
        t.pool_create(c, PoolBacking::Kmalloc { size: 100 }, 2);
    }
    let Reply::Clients(view) = t.ok(viewer, Op::Clients) else {
        panic!("clients view")
    };
    let mut owners: Vec<u64> = view.iter().map(|c| c.owner).collect();
    owners.sort_unstable();
    owners.dedup();
    assert_eq!(owners.len(), 301, "one owner id per client");
    for (i, &c) in clients.iter().enumerate() {
        let line = view.iter().find(|l| l.conn == c).expect("listed");
        assert_eq!(line.charged_pages, 2 * (i as u64 % 5 + 1), "client {i}");
    }
    // 600 caches beside the kernel's: more than a page of the listing.
    let mut caches = 0;
    while let Reply::Slabinfo(page) = t.ok(
        viewer,
        Op::Slabinfo {
            start: caches as u64,
        },
    ) {
        caches += page.len();
        if page.len() < VIEW_PAGE {
            break;
        }
    }
    assert!(caches > VIEW_PAGE);
    assert_eq!(caches, t.mem.caches().count());
    let Reply::Mempools(pools) = t.ok(viewer, Op::Mempools { start: 0 }) else {
        panic!("mempools view")
    };
    assert_eq!(pools.len(), 300);
    for c in clients {
        t.close(c);
    }
    t.mem.reclaim();
    assert_eq!(free(&t), base, "free memory back to the baseline");
    assert_eq!(
        t.mem.owner_capacity(),
        owner_ids,
        "owner table back to its size"
    );
    assert!(matches!(MemoryManager::check(&t.mem), Ok(())));
    assert_eq!(
        ALLOCS_UNDER_LOCK.load(Ordering::Relaxed),
        0,
        "heap used while the memory manager was borrowed"
    );
}
