//! One test per rule of the memory manager, each on a small host machine.

use memd_mm::*;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// DMA 1-16 MiB, DMA32 16-64 MiB, Normal 4 GiB .. 4 GiB + 32 MiB.
fn machine(cmdline: &str) -> HostMm {
    let mm = HostMm::three_zones(64 * MIB, 32 * MIB, cmdline).unwrap();
    mm.check().unwrap();
    mm
}

fn zone_of(phys: u64) -> ZoneType {
    ZoneType::of_pfn(phys / PAGE_SIZE)
}

fn fill_zone(mm: &mut HostMm, gfp: Gfp) -> Vec<u64> {
    let mut got = Vec::new();
    while let Ok(p) = mm.alloc_pages(0, gfp) {
        got.push(p);
    }
    got
}

#[test]
fn boot_builds_zones_from_the_map() {
    let mm = machine("");
    let zi = mm.zoneinfo();
    assert_eq!(zi[0].start_pfn, 256);
    assert_eq!(zi[0].end_pfn, 4096);
    assert_eq!(zi[1].start_pfn, 4096);
    assert_eq!(zi[2].start_pfn, (4 << 30) / PAGE_SIZE);
    // The frame table (16 bytes per frame up to the end of memory) and the
    // pageblock counts (28 bytes per 1024 frames, in whole pages) are
    // carved top-down from Normal.
    let frames = ((4 << 30) + 32 * MIB) / PAGE_SIZE;
    let table = frames * 16 + (frames / 1024 * 28).next_multiple_of(PAGE_SIZE);
    assert_eq!(zi[2].managed * PAGE_SIZE, 32 * MIB - table);
    assert_eq!(zi[0].managed, 4096 - 256, "DMA: 1-16 MiB");
    assert!(mm
        .reservations()
        .iter()
        .any(|r| r.kind == ReserveKind::FrameTable));
    assert_eq!(FRAME_DESCRIPTOR_BYTES, 16);
    for z in &zi[..3] {
        assert!(z.watermark.min > 0 && z.watermark.min < z.watermark.low);
    }
    assert_eq!(zi[3].managed, 0, "nothing plugged: Movable is empty");
}

#[test]
fn gfp_zone_flags_constrain_addresses() {
    let mut mm = machine("");
    let p = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
    assert_eq!(
        zone_of(p),
        ZoneType::Normal,
        "KERNEL prefers the highest zone"
    );
    let p = mm.alloc_pages(3, Gfp::KERNEL | Gfp::DMA32).unwrap();
    assert_eq!(zone_of(p), ZoneType::Dma32);
    let p = mm.alloc_pages(2, Gfp::KERNEL | Gfp::DMA).unwrap();
    assert!(p + (4 << 12) <= 16 * MIB);
    let dma = fill_zone(&mut mm, Gfp::KERNEL | Gfp::DMA);
    assert!(dma.iter().all(|&p| p < 16 * MIB));
    assert_eq!(
        mm.alloc_pages(0, Gfp::NOWAIT | Gfp::DMA),
        Err(MmError::NoMemory)
    );
    let reserve = mm.alloc_pages(0, Gfp::ATOMIC | Gfp::DMA).unwrap();
    assert!(reserve < 16 * MIB, "ATOMIC may still use the DMA reserve");
    mm.check().unwrap();
}

#[test]
fn zonelist_falls_back_and_lowmem_reserve_protects_dma() {
    let mut mm = machine("");
    let normal_free = mm.zoneinfo()[2].free;
    let got = fill_zone(&mut mm, Gfp::KERNEL);
    let zi = mm.zoneinfo();
    assert!(
        got.iter().any(|&p| zone_of(p) == ZoneType::Dma32),
        "fell back to DMA32"
    );
    assert!(
        got.iter()
            .filter(|&&p| zone_of(p) == ZoneType::Normal)
            .count() as u64
            <= normal_free
    );
    assert!(zi[1].counters.fallback > 0);
    // DMA keeps at least its min watermark plus the reserve against Normal.
    assert!(zi[0].free >= zi[0].watermark.min + zi[0].lowmem_reserve[2]);
    assert!(zi[0].lowmem_reserve[2] > 0);
    // A DMA request can still be served from what Normal could not take.
    assert!(mm.alloc_pages(0, Gfp::KERNEL | Gfp::DMA).is_ok());
    mm.check().unwrap();
}

#[test]
fn atomic_dips_below_min_but_nowait_and_kernel_do_not() {
    let mut mm = machine("");
    fill_zone(&mut mm, Gfp::KERNEL | Gfp::DMA32);
    assert_eq!(
        mm.alloc_pages(0, Gfp::NOWAIT | Gfp::DMA32),
        Err(MmError::NoMemory)
    );
    let zi = mm.zoneinfo()[1];
    assert!(zi.free >= zi.watermark.min);
    let atomic = fill_zone(&mut mm, Gfp::ATOMIC | Gfp::DMA32);
    assert!(!atomic.is_empty(), "ATOMIC got pages from the reserve");
    let zi = mm.zoneinfo()[1];
    assert!(zi.free < zi.watermark.min);
    assert!(zi.counters.atomic_reserve_used > 0);
    mm.check().unwrap();
}

#[test]
fn kernel_requests_reclaim_slab_before_failing() {
    let mut mm = machine("");
    let cache = mm
        .cache_create("reclaimable", 512, 8, SlabFlags::NONE, None)
        .unwrap();
    let objs: Vec<_> = (0..20_000)
        .map(|_| mm.cache_alloc(cache, Gfp::KERNEL).unwrap())
        .collect();
    for o in objs {
        mm.cache_free(cache, o).unwrap();
    }
    let held = mm
        .slabinfo()
        .find(|(id, _)| *id == cache)
        .unwrap()
        .1
        .num_slabs;
    assert!(held > 0, "freed objects leave empty slabs behind");
    // Exhaust without reclaim: NOWAIT cannot get the slab memory back.
    let mut pages = fill_zone(&mut mm, Gfp::NOWAIT);
    let before = mm.counters().reclaim_runs;
    pages.extend(fill_zone(&mut mm, Gfp::KERNEL));
    assert!(mm.counters().reclaim_runs > before);
    assert!(mm.counters().reclaimed_pages > 0);
    assert_eq!(
        mm.slabinfo()
            .find(|(id, _)| *id == cache)
            .unwrap()
            .1
            .num_slabs,
        0
    );
    mm.check().unwrap();
    for p in pages {
        mm.free_pages(p, 0).unwrap();
    }
    mm.check().unwrap();
}

#[test]
fn zero_flag_zeroes_reused_memory() {
    let mut mm = machine("");
    let p = mm.alloc_pages(1, Gfp::KERNEL).unwrap();
    let v = mm.direct_map().virt(p);
    // SAFETY: the order-1 block (8 KiB) at `p` is ours until it is freed.
    unsafe { core::ptr::write_bytes(v as *mut u8, 0xee, 8192) };
    mm.free_pages(p, 1).unwrap();
    let q = mm.alloc_pages(1, Gfp::KERNEL | Gfp::ZERO).unwrap();
    assert_eq!(p, q, "the same block comes back");
    // SAFETY: the order-1 block at `q` is ours, and nothing writes it while
    // `bytes` is read.
    let bytes = unsafe { core::slice::from_raw_parts(mm.direct_map().virt(q) as *const u8, 8192) };
    assert!(bytes.iter().all(|&b| b == 0));
}

#[test]
fn buddy_splits_and_coalesces_back() {
    let mut mm = machine("");
    mm.drain_all_pages();
    let before = mm.buddyinfo();
    let mut got = Vec::new();
    for order in [0, 3, 0, 5, 1, 10, 2, 0] {
        got.push((mm.alloc_pages(order, Gfp::KERNEL).unwrap(), order));
        mm.check().unwrap();
    }
    for (p, order) in got.into_iter().rev() {
        mm.free_pages(p, order).unwrap();
        mm.check().unwrap();
    }
    mm.drain_all_pages();
    assert_eq!(mm.buddyinfo(), before);
}

#[test]
fn bad_frees_are_refused() {
    let mut mm = machine("");
    let p = mm.alloc_pages(2, Gfp::KERNEL).unwrap();
    assert!(mm.free_pages(p, 1).is_err(), "wrong order");
    assert!(mm.free_pages(p + 4096, 0).is_err(), "inside the block");
    assert!(mm.free_pages(p + 1, 2).is_err(), "unaligned");
    mm.free_pages(p, 2).unwrap();
    assert!(mm.free_pages(p, 2).is_err(), "double free");
    assert!(mm.free_pages(1 << 50, 0).is_err(), "beyond memory");
    mm.check().unwrap();
}

#[test]
fn max_order_is_settable() {
    let mut mm = machine("memd.max_order=5");
    assert_eq!(mm.max_order(), 5);
    assert!(mm.alloc_pages(4, Gfp::KERNEL).is_ok());
    assert!(matches!(
        mm.alloc_pages(5, Gfp::KERNEL),
        Err(MmError::Invalid(_))
    ));
    assert_eq!(mm.zoneinfo()[1].nr_free[5], 0);
    mm.check().unwrap();
}

#[test]
fn memmap_hole_is_never_handed_out() {
    let mut mm = machine("memmap=2M$0x2000000");
    assert!(mm
        .reservations()
        .iter()
        .any(|r| r.kind == ReserveKind::Hole && r.start == 0x2000000));
    for p in fill_zone(&mut mm, Gfp::ATOMIC | Gfp::DMA32) {
        assert!(!(0x2000000..0x2200000).contains(&p));
    }
}

static CTOR_RUNS: AtomicUsize = AtomicUsize::new(0);
fn ctor(obj: &mut [u8]) {
    CTOR_RUNS.fetch_add(1, Ordering::SeqCst);
    obj.fill(0x5a);
}

#[test]
fn constructor_runs_when_a_slab_is_populated_not_per_alloc() {
    let mut mm = machine("");
    let c = mm
        .cache_create("ctor-test", 100, 8, SlabFlags::NONE, Some(ctor))
        .unwrap();
    let a = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
    let per_slab = mm.cache(c).unwrap().objs_per_slab as usize;
    assert_eq!(CTOR_RUNS.load(Ordering::SeqCst), per_slab);
    // SAFETY: `a` is a live 100-byte object of the cache, and ours.
    let obj = unsafe { core::slice::from_raw_parts_mut(a.as_ptr(), 100) };
    assert!(obj.iter().all(|&b| b == 0x5a));
    mm.cache_free(c, a).unwrap();
    for _ in 0..5 {
        let b = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
        // SAFETY: `b` is a live 100-byte object of the cache, and ours.
        let obj = unsafe { core::slice::from_raw_parts(b.as_ptr(), 100) };
        assert!(
            obj.iter().all(|&x| x == 0x5a),
            "constructed state survives free"
        );
        mm.cache_free(c, b).unwrap();
    }
    assert_eq!(
        CTOR_RUNS.load(Ordering::SeqCst),
        per_slab,
        "no constructor call on alloc"
    );
    mm.cache_destroy(c).unwrap();
    mm.check().unwrap();
}

#[test]
fn destroy_with_live_objects_fails_and_reports_them() {
    let mut mm = machine("");
    let c = mm
        .cache_create("leaky", 64, 8, SlabFlags::HWCACHE_ALIGN, None)
        .unwrap();
    let objs: Vec<_> = (0..3)
        .map(|_| mm.cache_alloc(c, Gfp::KERNEL).unwrap())
        .collect();
    assert_eq!(mm.cache_destroy(c), Err(MmError::Busy { live: 3 }));
    assert!(mm.cache(c).is_some(), "cache survives a refused destroy");
    for o in objs {
        mm.cache_free(c, o).unwrap();
    }
    let free_before = mm.meminfo().free;
    mm.cache_destroy(c).unwrap();
    assert!(
        mm.meminfo().free > free_before,
        "slabs returned to the buddy"
    );
    assert_eq!(mm.cache_destroy(c), Err(MmError::NotFound));
    assert_eq!(
        mm.cache_destroy(CacheId(0)),
        Err(MmError::NotPermitted),
        "kmalloc caches stay"
    );
    mm.check().unwrap();
}

#[test]
fn poison_catches_use_after_free() {
    let mut mm = machine("");
    let c = mm
        .cache_create("poisoned", 48, 8, SlabFlags::POISON, None)
        .unwrap();
    let a = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
    let _b = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
    mm.cache_free(c, a).unwrap();
    mm.cache_validate(c).unwrap();
    // SAFETY: the freed object still lies in the host arena, which stays
    // allocated while `mm` lives, and no reference to it exists; the write
    // after free is the bug this test plants for the poison check to find.
    unsafe { *a.as_ptr().add(10) = 1 };
    match mm.cache_validate(c) {
        Err(MmError::Corrupted(x)) => {
            assert_eq!(x.kind, CorruptionKind::UseAfterFree);
            assert_eq!(x.object, a.as_ptr() as usize);
            assert_eq!(x.offset, 10);
        }
        other => panic!("expected use-after-free, got {other:?}"),
    }
    assert!(mm.corruptions().total >= 1);
    mm.cache_free(c, _b).unwrap();
    assert!(
        matches!(mm.cache_destroy(c), Err(MmError::Corrupted(_))),
        "destroy reports it too"
    );
    assert!(mm.cache(c).is_none());
    mm.check().unwrap();
}

#[test]
fn red_zone_catches_overrun_and_double_free() {
    let mut mm = machine("");
    let c = mm
        .cache_create("guarded", 20, 8, SlabFlags::RED_ZONE, None)
        .unwrap();
    let a = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
    let b = mm.cache_alloc(c, Gfp::KERNEL).unwrap();
    // SAFETY: byte 21 of a 20-byte object lies in the red zone that follows
    // it, inside its slab in the host arena; the overrun is the bug this test
    // plants for the red-zone check to find.
    unsafe { *a.as_ptr().add(21) = 0 };
    match mm.cache_free(c, a) {
        Err(MmError::Corrupted(x)) => assert_eq!((x.kind, x.offset), (CorruptionKind::Overrun, 21)),
        other => panic!("expected overrun, got {other:?}"),
    }
    mm.cache_free(c, b).unwrap();
    match mm.cache_free(c, b) {
        Err(MmError::Corrupted(x)) => assert_eq!(x.kind, CorruptionKind::DoubleFree),
        other => panic!("expected double free, got {other:?}"),
    }
    mm.cache_destroy(c).unwrap();
    mm.check().unwrap();
}

#[test]
fn kmalloc_classes_ksize_large_and_bad_pointers() {
    let mut mm = machine("");
    // The manager's own tables are kmalloc'd too.
    let tables = mm.meminfo().kmalloc_large;
    let mut ptrs = Vec::new();
    for size in [
        1,
        8,
        9,
        96,
        100,
        192,
        200,
        4096,
        8192,
        8193,
        100_000,
        4 << 20,
    ] {
        let p = mm.kmalloc(size, Gfp::KERNEL).unwrap();
        let k = mm.ksize(p).unwrap();
        assert!(k >= size, "ksize({size}) = {k}");
        // SAFETY: `p` is a live kmalloc allocation of at least `size` bytes.
        unsafe { core::ptr::write_bytes(p.as_ptr(), 0xab, size) };
        ptrs.push(p);
    }
    assert!(
        mm.kmalloc(8 << 20, Gfp::KERNEL).is_err(),
        "beyond the largest block"
    );
    assert!(mm.meminfo().kmalloc_large > 0);
    mm.check().unwrap();
    let bogus = core::ptr::NonNull::new((ptrs[0].as_ptr() as usize + 1) as *mut u8).unwrap();
    assert!(mm.kfree(bogus).is_err());
    for p in ptrs {
        mm.kfree(p).unwrap();
    }
    assert_eq!(mm.meminfo().kmalloc_large, tables);
    let stack = 5u64;
    assert!(mm.kfree(core::ptr::NonNull::from(&stack).cast()).is_err());
    mm.check().unwrap();
}

#[test]
fn mempool_makes_progress_when_the_backing_allocator_fails() {
    let mut mm = machine("");
    let c = mm
        .cache_create("bio", 256, 8, SlabFlags::NONE, None)
        .unwrap();
    let pool = mm.mempool_create(PoolBacking::Cache(c), 4).unwrap();
    let info = mm.mempool_info().next().unwrap();
    assert_eq!((info.curr_nr, info.idle_bytes), (4, 4 * 256));
    // Every slab allocation fails now.
    mm.set_fault(true, 100, 0, -1, 1).unwrap();
    assert!(mm.cache_alloc(c, Gfp::KERNEL).is_err());
    let got: Vec<_> = (0..4)
        .map(|_| mm.mempool_alloc(pool, Gfp::KERNEL).unwrap())
        .collect();
    assert_eq!(mm.mempool(pool).unwrap().counters.from_reserve, 4);
    assert!(
        mm.mempool_alloc(pool, Gfp::KERNEL).is_err(),
        "reserve exhausted"
    );
    mm.check().unwrap();
    mm.mempool_free(pool, got[0]).unwrap();
    assert_eq!(
        mm.mempool(pool).unwrap().curr_nr,
        1,
        "free refills the reserve first"
    );
    assert!(mm.mempool_alloc(pool, Gfp::KERNEL).is_ok());
    mm.set_fault(true, 0, 0, 0, 0).unwrap();
    assert_eq!(mm.mempool_destroy(pool), Err(MmError::Busy { live: 4 }));
    mm.check().unwrap();
}

#[test]
fn page_mempool_under_real_exhaustion() {
    let mut mm = machine("");
    let pool = mm.mempool_create(PoolBacking::Pages(0), 8).unwrap();
    let hog = fill_zone(&mut mm, Gfp::ATOMIC);
    assert!(mm.alloc_pages(0, Gfp::ATOMIC).is_err());
    let got: Vec<_> = (0..8)
        .map(|_| mm.mempool_alloc(pool, Gfp::ATOMIC).unwrap())
        .collect();
    assert!(mm.mempool_alloc(pool, Gfp::ATOMIC).is_err());
    for e in got {
        mm.mempool_free(pool, e).unwrap();
    }
    for p in hog {
        mm.free_pages(p, 0).unwrap();
    }
    mm.mempool_destroy(pool).unwrap();
    mm.check().unwrap();
}

#[test]
fn contiguous_buffers_beyond_max_order_after_fragmentation() {
    let mut mm = machine("memd.dma_reserve=24M@dma32");
    let cma = mm.cma_info().unwrap();
    assert_eq!(cma.size, 24 * MIB);
    assert_eq!(cma.zone, ZoneType::Dma32);
    // Fragment ordinary memory: every other page stays allocated.
    let mut pages = fill_zone(&mut mm, Gfp::ATOMIC);
    pages.sort_unstable();
    let mut kept = Vec::new();
    for (i, p) in pages.into_iter().enumerate() {
        if i % 2 == 0 {
            mm.free_pages(p, 0).unwrap();
        } else {
            kept.push(p);
        }
    }
    mm.drain_all_pages();
    assert!(
        mm.alloc_pages(10, Gfp::KERNEL).is_err(),
        "no 4 MiB block left in the buddy"
    );
    let buf = mm
        .dma_alloc(16 * MIB_USIZE, 1 << 20, DmaMask::Bits32)
        .unwrap();
    assert_eq!(buf.source, DmaSource::Cma);
    assert!(buf.phys >= cma.base && buf.phys + 16 * MIB <= cma.base + cma.size);
    assert_eq!(buf.phys % (1 << 20), 0);
    assert!(mm.dma_bytes(&buf).unwrap().iter().all(|&b| b == 0));
    assert_eq!(
        mm.dma_alloc(16 * MIB_USIZE, 4096, DmaMask::Bits32),
        Err(MmError::NoMemory)
    );
    assert_eq!(
        mm.dma_alloc(4 * MIB_USIZE, 4096, DmaMask::Bits24),
        Err(MmError::NoMemory),
        "outside the mask"
    );
    mm.check().unwrap();
    mm.dma_free(&buf).unwrap();
    assert!(mm.dma_bytes(&buf).is_err(), "freed buffers are refused");
    assert_eq!(mm.cma_info().unwrap().usage.largest_free, 24 * MIB);
    for p in kept {
        mm.free_pages(p, 0).unwrap();
    }
    mm.check().unwrap();
}

#[test]
fn small_dma_buffers_come_from_the_buddy_below_the_mask() {
    let mut mm = machine("");
    let b = mm.dma_alloc(10_000, 4096, DmaMask::Bits24).unwrap();
    assert_eq!((b.source, b.order), (DmaSource::Buddy, 2));
    assert_eq!(b.zone(), ZoneType::Dma);
    let c = mm.dma_alloc(4096, 64 << 10, DmaMask::Bits32).unwrap();
    assert_eq!(c.phys % (64 << 10), 0);
    assert!(c.phys < 4 << 30);
    assert!(
        matches!(
            mm.dma_alloc(64 * MIB_USIZE, 4096, DmaMask::Bits64),
            Err(MmError::Invalid(_))
        ),
        "no reserve"
    );
    assert!(mm.dma_alloc(0, 4096, DmaMask::Bits64).is_err());
    assert!(mm.dma_alloc(4096, 3, DmaMask::Bits64).is_err());
    mm.dma_free(&b).unwrap();
    mm.dma_free(&c).unwrap();
    mm.check().unwrap();
}

#[test]
fn fault_injection_fails_exactly_as_configured() {
    let mut mm = machine("");
    mm.set_fault(false, 100, 0, 3, 7).unwrap();
    for _ in 0..3 {
        assert_eq!(mm.alloc_pages(0, Gfp::KERNEL), Err(MmError::InjectedFault));
    }
    assert!(mm.alloc_pages(0, Gfp::KERNEL).is_ok());
    assert_eq!(mm.faults().0.injected, 3);
    mm.set_fault(false, 100, 4, -1, 7).unwrap();
    let results: Vec<bool> = (0..8)
        .map(|_| mm.alloc_pages(0, Gfp::KERNEL).is_ok())
        .collect();
    assert_eq!(results, [true, true, true, false, true, true, true, false]);
    assert!(mm.set_fault(true, 101, 0, 1, 0).is_err());
}

#[test]
fn owners_are_charged_per_page() {
    let mut mm = machine("");
    let (seven, nine) = (mm.owner_alloc().unwrap(), mm.owner_alloc().unwrap());
    assert_ne!(seven, nine);
    mm.set_owner(seven).unwrap();
    let a = mm.alloc_pages(3, Gfp::KERNEL).unwrap();
    mm.set_owner(nine).unwrap();
    let b = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
    assert_eq!(mm.owner_pages(seven), 8);
    assert_eq!(mm.owner_pages(nine), 1);
    mm.check().unwrap();
    mm.free_pages(a, 3).unwrap();
    mm.free_pages(b, 0).unwrap();
    assert_eq!(mm.owners().count(), 0);
    mm.owner_free(seven).unwrap();
    assert!(mm.set_owner(seven).is_err(), "a freed id is not live");
    assert!(mm.owner_free(seven).is_err(), "freed twice");
    assert!(mm.owner_free(Owner::KERNEL).is_err());
    assert!(mm.set_owner(Owner(60_000)).is_err(), "never handed out");
}

#[test]
fn an_owner_id_is_not_reused_while_it_holds_pages() {
    let mut mm = machine("");
    let gone = mm.owner_alloc().unwrap();
    mm.set_owner(gone).unwrap();
    let page = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
    mm.set_owner(Owner::KERNEL).unwrap();
    mm.owner_free(gone).unwrap();
    // Thousands of owners come and go; none gets the id that still holds
    // a page, and each one's charge is its own.
    let mut live = Vec::new();
    for i in 0..3000u64 {
        let o = mm.owner_alloc().unwrap();
        assert_ne!(o, gone, "id {} handed out while it holds a page", gone.0);
        mm.set_owner(o).unwrap();
        let order = (i % 3) as u32;
        live.push((o, mm.alloc_pages(order, Gfp::KERNEL).unwrap(), order));
    }
    mm.set_owner(Owner::KERNEL).unwrap();
    assert!(mm.owner_capacity() >= 3002);
    assert_eq!(mm.owner_pages(gone), 1);
    for &(o, _, order) in &live {
        assert_eq!(mm.owner_pages(o), 1 << order);
    }
    mm.check().unwrap();
    for (o, phys, order) in live {
        mm.free_pages(phys, order).unwrap();
        mm.owner_free(o).unwrap();
    }
    mm.free_pages(page, 0).unwrap();
    assert_eq!(
        mm.owner_alloc().unwrap(),
        gone,
        "free and charged nothing: reused"
    );
    assert_eq!(mm.owner_capacity(), 256, "the table shrank back");
    mm.check().unwrap();
}

#[test]
fn clients_never_reach_the_kernel_reserve() {
    let mut mm = machine("");
    let client = mm.owner_alloc().unwrap();
    mm.set_owner(client).unwrap();
    let client = fill_zone(&mut mm, Gfp::ATOMIC);
    assert!(!client.is_empty());
    for z in mm.zoneinfo() {
        assert!(
            z.free >= z.watermark.min,
            "{:?}: a client's ATOMIC stopped at min",
            z.zone
        );
    }
    // The kernel's heap still gets memory, from the reserve.
    mm.set_owner(Owner::KERNEL).unwrap();
    let heap = mm.kmalloc(8192 * 4, Gfp::KERNEL | Gfp::MEMALLOC).unwrap();
    assert!(
        mm.alloc_pages(0, Gfp::ATOMIC).is_ok(),
        "the kernel's own ATOMIC may dip below min"
    );
    assert!(
        Gfp::from_bits(Gfp::MEMALLOC.bits()).is_none(),
        "MEMALLOC is not accepted from the wire"
    );
    mm.kfree(heap).unwrap();
    mm.check().unwrap();
}

#[test]
fn bytes_of_accepts_only_live_allocations() {
    let mut mm = machine("memd.dma_reserve=8M");
    let dmap = mm.direct_map();
    let page = mm.alloc_pages(2, Gfp::KERNEL).unwrap();
    let inside = dmap.virt(page + 3 * 4096);
    assert_eq!(
        mm.bytes_of(inside, 4096).unwrap().len(),
        4096,
        "last page of an order-2 block"
    );
    assert!(mm.bytes_of(inside, 4097).is_err(), "past the block");
    let obj = mm.kmalloc(100, Gfp::KERNEL).unwrap();
    assert!(
        mm.bytes_of(obj.as_ptr() as usize, 128).is_ok(),
        "kmalloc-128 object"
    );
    assert!(
        mm.bytes_of(obj.as_ptr() as usize, 129).is_err(),
        "into the next object"
    );
    let dma = mm.dma_alloc(6 << 20, 4096, DmaMask::Bits32).unwrap();
    assert!(mm.dma_bytes(&dma).is_ok());
    mm.free_pages(page, 2).unwrap();
    assert!(mm.bytes_of(inside, 1).is_err(), "freed block");
    mm.kfree(obj).unwrap();
    mm.dma_free(&dma).unwrap();
    assert!(mm.dma_bytes(&dma).is_err(), "freed CMA buffer");
    assert!(
        mm.bytes_of(dmap.virt(0x5000), 1).is_err(),
        "never allocated"
    );
}

#[test]
fn kmalloc_size_roundup_is_what_ksize_reports() {
    let mut mm = machine("");
    let sizes = (1..=300)
        .chain([511, 512, 513, 4095, 4096, 4097, 8192, 8193, 20_000, 70_000])
        .collect::<Vec<usize>>();
    for size in sizes {
        let p = mm.kmalloc(size, Gfp::KERNEL).unwrap();
        assert_eq!(
            memd_mm::kmalloc_size_roundup(size),
            mm.ksize(p).unwrap(),
            "kmalloc({size})"
        );
        mm.kfree(p).unwrap();
    }
    mm.check().unwrap();
}

/// Free pages once the caches have given back what nobody uses.
fn settled_free(mm: &mut MemoryManager) -> u64 {
    mm.reclaim();
    mm.meminfo().free
}

#[test]
fn caches_and_pools_are_limited_by_memory_alone_and_leave_nothing_behind() {
    let mut mm = machine("");
    let builtin = mm.caches().count();
    let before = settled_free(&mut mm);
    let descriptors = |mm: &MemoryManager| {
        mm.slabinfo()
            .find(|(_, s)| s.name.as_str() == "kmem_cache")
            .map(|(_, s)| s.active_objs)
            .unwrap()
    };
    let boot_descriptors = descriptors(&mm);
    assert_eq!(
        boot_descriptors as usize, builtin,
        "every cache's descriptor is an object of kmem_cache"
    );
    let caches: Vec<CacheId> = (0..3000)
        .map(|i| {
            mm.cache_create(&format!("c{i}"), 64 + i % 512, 8, SlabFlags::NONE, None)
                .unwrap()
        })
        .collect();
    assert_eq!(mm.caches().count(), builtin + 3000);
    assert_eq!(descriptors(&mm), boot_descriptors + 3000);
    let pools: Vec<PoolId> = (0..3000)
        .map(|_| mm.mempool_create(PoolBacking::Kmalloc(32), 1).unwrap())
        .collect();
    assert_eq!(mm.mempools().count(), 3000);
    mm.check().unwrap();

    // A destroyed cache's id is the next one handed out.
    let freed = caches[1234];
    mm.cache_destroy(freed).unwrap();
    let again = mm
        .cache_create("again", 64, 8, SlabFlags::NONE, None)
        .unwrap();
    assert_eq!(again, freed);
    let freed = pools[77];
    mm.mempool_destroy(freed).unwrap();
    assert_eq!(mm.mempool_create(PoolBacking::Pages(0), 1).unwrap(), freed);

    for id in pools {
        mm.mempool_destroy(id).unwrap();
    }
    for id in caches {
        mm.cache_destroy(id).unwrap();
    }
    mm.check().unwrap();
    assert_eq!(descriptors(&mm), boot_descriptors);
    assert_eq!(settled_free(&mut mm), before, "every page back");
}

#[test]
fn deferred_memory_is_initialised_on_demand_before_any_allocation_fails() {
    // 512 MiB of DMA32: 128 MiB initialised at boot, the rest deferred.
    let full = HostMm::three_zones(512 * MIB, 0, "").unwrap();
    let mut mm = HostMm::three_zones(512 * MIB, 0, "memd.deferred_init=on").unwrap();
    assert_eq!(mm.initialised_frames() as u64, BOOT_INIT_BYTES / PAGE_SIZE);
    let deferred = mm.deferred_pages();
    assert!(
        deferred > (300 * MIB) / PAGE_SIZE,
        "{deferred} pages deferred"
    );
    assert_eq!(
        mm.meminfo().total + deferred * PAGE_SIZE,
        full.meminfo().total,
        "memory counts as it arrives"
    );
    mm.check().unwrap();
    // Every order-9 block a fully initialised manager would give.
    let mut full = full;
    let want = fill(&mut full, 9);
    let got = fill(&mut mm, 9);
    // Watermarks grow as memory arrives, so a block taken early may be
    // one a fully initialised manager keeps back: at least as many.
    assert!(
        got >= want,
        "{got} blocks where a fully initialised memd gives {want}"
    );
    assert_eq!(mm.deferred_pages(), 0);
    mm.check().unwrap();
}

#[test]
fn deferred_steps_hand_memory_over_and_keep_every_invariant() {
    let full = HostMm::three_zones(512 * MIB, 0, "").unwrap();
    let mut mm = HostMm::three_zones(512 * MIB, 0, "memd.deferred_init=on").unwrap();
    let mut steps = 0;
    let mut walk = CheckWalk::new();
    while !mm.deferred_init_step(3) {
        steps += 1;
        mm.check().unwrap();
        if mm.check_step(&mut walk, 5).unwrap() {
            walk = CheckWalk::new();
        }
    }
    assert!(steps > 10, "{steps} steps");
    assert_eq!(mm.deferred_pages(), 0);
    assert_eq!(mm.initialised_frames(), mm.nr_frames());
    assert_eq!(mm.meminfo().free, full.meminfo().free);
    // The boot's own allocations (the owner and cache tables, the cache
    // of caches) split different blocks when less memory was there to
    // choose from: free blocks per order may differ, nothing else.
    let unsplit = |zones: [stats::ZoneInfo; NR_ZONES]| {
        zones.map(|z| stats::ZoneInfo {
            nr_free: Default::default(),
            ..z
        })
    };
    assert_eq!(
        unsplit(mm.zoneinfo()),
        unsplit(full.zoneinfo()),
        "zones and watermarks as if at boot"
    );
    mm.check().unwrap();
}

fn fill(mm: &mut HostMm, order: u32) -> usize {
    let mut n = 0;
    while mm.alloc_pages(order, Gfp::KERNEL).is_ok() {
        n += 1;
    }
    n
}

#[test]
fn free_blocks_are_reported_once_and_used_again_as_they_are() {
    let mut mm = machine("");
    mm.drain_all_pages();
    let (unreported, reported) = mm.reportable_bytes();
    assert!(unreported >= 16 * MIB && reported == 0);
    let free = mm.meminfo().free;
    let mut blocks = [ReportBlock::default(); 8];
    let n = mm.report_take(&mut blocks);
    assert_eq!(n, 8);
    assert!(blocks.iter().all(|b| b.order >= REPORT_ORDER));
    // Isolated blocks are still free memory, but not on the free lists.
    assert_eq!(mm.meminfo().free, free);
    mm.check().unwrap();
    let taken: u64 = blocks.iter().map(|b| b.bytes()).sum();
    assert_eq!(mm.reportable_bytes().0, unreported - taken);
    mm.report_put(&blocks[..n], true);
    mm.check().unwrap();
    assert_eq!(mm.reportable_bytes(), (unreported - taken, taken));
    // The next report takes other blocks.
    let mut again = [ReportBlock::default(); 64];
    let m = mm.report_take(&mut again);
    assert!(again[..m].iter().all(|b| !blocks.contains(b)));
    mm.report_put(&again[..m], false);
    assert_eq!(
        mm.reportable_bytes().1,
        taken,
        "blocks put back unreported stay so"
    );
    // Allocating (down to the watermarks) uses reported memory as it is,
    // and what was allocated is no longer marked.
    let mut got = Vec::new();
    while let Ok(p) = mm.alloc_pages(REPORT_ORDER, Gfp::KERNEL) {
        got.push(p);
    }
    assert!(
        mm.reportable_bytes().1 < taken,
        "reported blocks were allocated"
    );
    for p in got {
        mm.free_pages(p, REPORT_ORDER).unwrap();
    }
    mm.check().unwrap();
}

#[test]
fn dma_reserve_buffers_work_before_their_frames_are_initialised() {
    // The reservation is carved top-down from DMA32, far past the 128 MiB
    // initialised at boot.
    let mut mm = HostMm::three_zones(
        512 * MIB,
        0,
        "memd.deferred_init=on memd.dma_reserve=32M@dma32",
    )
    .unwrap();
    let base = mm.cma().unwrap().base;
    assert!(
        base / PAGE_SIZE >= mm.initialised_frames() as u64,
        "the reservation is still to come"
    );
    let b = mm.dma_alloc(8 * MIB_USIZE, 4096, DmaMask::Bits32).unwrap();
    assert_eq!(b.source, DmaSource::Cma);
    let bytes = mm.dma_bytes(&b).unwrap();
    assert!(bytes.iter().all(|&x| x == 0));
    bytes.fill(7);
    assert_eq!(mm.dma_span_bytes(&b).unwrap().len(), 8 * MIB_USIZE);
    mm.dma_free(&b).unwrap();
    assert!(mm.dma_bytes(&b).is_err(), "a freed buffer is not live");
    mm.check().unwrap();
}

#[test]
fn the_balloon_takes_only_memory_above_high_and_gives_it_back() {
    let mut mm = machine("");
    mm.drain_all_pages();
    let free = mm.meminfo().free;
    let mut blocks = Vec::new();
    while let Some(p) = mm.balloon_take() {
        blocks.push(p);
    }
    assert!(!blocks.is_empty());
    for z in mm.zoneinfo() {
        assert!(
            z.free >= z.watermark.high,
            "{:?} below high: {} < {}",
            z.zone,
            z.free,
            z.watermark.high
        );
    }
    let taken = blocks.len() as u64 * (PAGE_SIZE << BALLOON_ORDER);
    assert_eq!(mm.meminfo().balloon, taken);
    assert_eq!(mm.owner_pages(Owner::BALLOON) * PAGE_SIZE, taken);
    let in_zones: u64 = mm.zoneinfo().iter().map(|z| z.balloon).sum();
    assert_eq!(in_zones * PAGE_SIZE, taken, "zoneinfo shows the balloon");
    let in_map: u64 = mm
        .frame_runs()
        .filter(|r| r.kind == RunKind::Balloon)
        .map(|r| r.pages * PAGE_SIZE)
        .sum();
    assert_eq!(in_map, taken, "the memory map shows the balloon");
    assert_eq!(mm.meminfo().free, free - taken);
    mm.check().unwrap();
    // Ordinary allocations still find what lies between min and high.
    let p = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
    mm.free_pages(p, 0).unwrap();
    assert!(
        mm.balloon_give(p).is_err(),
        "only balloon blocks go back as such"
    );
    for b in blocks {
        mm.balloon_give(b).unwrap();
    }
    mm.drain_all_pages();
    assert_eq!(mm.meminfo().balloon, 0);
    assert_eq!(mm.meminfo().free, free);
    mm.check().unwrap();
}

#[test]
fn with_deflate_on_oom_allocations_take_the_balloon_back_before_failing() {
    let mut mm = machine("");
    let mut taken = 0;
    while let Some(p) = mm.balloon_take() {
        // The host acknowledged it.
        mm.balloon_keep(p);
        taken += 1;
    }
    assert!(taken > 4);
    // Without it, memory runs out with the balloon full.
    let mut got = fill_zone(&mut mm, Gfp::KERNEL);
    assert_eq!(mm.balloon_blocks(), taken);
    mm.set_balloon_deflate_on_oom(true);
    got.extend(fill_zone(&mut mm, Gfp::KERNEL));
    assert_eq!(
        mm.balloon_blocks(),
        0,
        "every block went back before ENOMEM"
    );
    assert_eq!(mm.meminfo().balloon, 0);
    mm.check().unwrap();
    for p in got {
        mm.free_pages(p, 0).unwrap();
    }
    mm.check().unwrap();
}

#[test]
fn the_contiguous_region_holds_as_many_buffers_as_fit() {
    // Blocks of at most 16 KiB, so every 32 KiB buffer comes from the
    // region: 1000 of them, far past a page of extents.
    let mut mm = machine("memd.dma_reserve=40M memd.max_order=3");
    let tables = mm.meminfo().kmalloc_large;
    let bufs: Vec<DmaBuffer> = (0..1000)
        .map(|i| {
            let b = mm
                .dma_alloc(32 << 10, 4096, DmaMask::Bits64)
                .unwrap_or_else(|e| panic!("buffer {i}: {e:?}"));
            assert_eq!(b.source, DmaSource::Cma);
            b
        })
        .collect();
    assert_eq!(mm.cma_info().unwrap().usage.buffers, 1000);
    assert!(
        mm.meminfo().kmalloc_large > tables,
        "the extent table is memd-mm's own memory"
    );
    mm.check().unwrap();
    for b in &bufs {
        mm.dma_free(b).unwrap();
    }
    mm.check().unwrap();
    assert_eq!(
        mm.meminfo().kmalloc_large,
        tables,
        "the table is back to its boot size"
    );
}

#[test]
fn memd_mms_own_structures_are_out_of_callers_reach() {
    let mut mm = machine("memd.dma_reserve=8M");
    let user = mm
        .cache_create("user", 64, 8, SlabFlags::NONE, None)
        .unwrap();
    let pool = mm.mempool_create(PoolBacking::Kmalloc(64), 1).unwrap();
    // A cache's descriptor is an object of the cache of caches, a pool's
    // of `mempool_t`: neither is reachable through the public calls.
    let internal: Vec<CacheId> = mm
        .slabinfo()
        .filter(|(_, s)| ["kmem_cache", "mempool_t"].contains(&s.name.as_str()))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(internal.len(), 2);
    let descriptors = [
        NonNull::from(mm.cache(user).unwrap()).cast::<u8>(),
        NonNull::from(mm.mempool(pool).unwrap()).cast::<u8>(),
    ];
    for (&id, &d) in internal.iter().zip(&descriptors) {
        assert_eq!(mm.cache_free(id, d), Err(MmError::NotPermitted));
        assert_eq!(mm.cache_alloc(id, Gfp::KERNEL), Err(MmError::NotPermitted));
        assert_eq!(mm.cache_destroy(id), Err(MmError::NotPermitted));
        assert_eq!(
            mm.mempool_create(PoolBacking::Cache(id), 1),
            Err(MmError::NotPermitted)
        );
        assert!(mm.kfree(d).is_err());
        assert!(mm.bytes_of(d.as_ptr() as usize, 8).is_err());
    }
    // The tables (ids, owners, the contiguous region's buffers) are the
    // only large kmalloc blocks now: kfree, ksize and bytes_of refuse each.
    let large = mm.meminfo().kmalloc_large;
    assert!(large > 0);
    let dmap = mm.direct_map();
    let tables: Vec<u64> = (0..mm.initialised_frames() as u64)
        .map(|pfn| pfn * PAGE_SIZE)
        .filter(|&p| mm.frame(p).is_some_and(|f| f.is(FrameState::Large)))
        .collect();
    assert!(tables.len() >= 3, "{} tables", tables.len());
    for p in tables {
        let ptr = NonNull::new(dmap.virt(p) as *mut u8).unwrap();
        assert!(mm.kfree(ptr).is_err());
        assert!(mm.ksize(ptr).is_err());
        assert!(mm.bytes_of(dmap.virt(p), 8).is_err());
    }
    assert_eq!(mm.meminfo().kmalloc_large, large);
    mm.mempool_destroy(pool).unwrap();
    mm.cache_destroy(user).unwrap();
    mm.check().unwrap();
}

#[test]
fn the_owner_table_shrinks_once_a_freed_owners_last_page_goes() {
    let mut mm = machine("");
    let owners: Vec<Owner> = (0..600).map(|_| mm.owner_alloc().unwrap()).collect();
    let last = *owners.last().unwrap();
    mm.set_owner(last).unwrap();
    let page = mm.alloc_pages(0, Gfp::KERNEL).unwrap();
    mm.set_owner(Owner::KERNEL).unwrap();
    for o in owners {
        mm.owner_free(o).unwrap();
    }
    assert!(mm.owner_capacity() > 600, "still charged: its id stays");
    mm.free_pages(page, 0).unwrap();
    mm.owners_shrink();
    assert_eq!(mm.owner_capacity(), 256);
    mm.check().unwrap();
}
