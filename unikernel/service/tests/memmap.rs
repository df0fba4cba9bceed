//! The memory map request over the real memd-mm (host arena): what it
//! shows, that it stays within a frame however fragmented memory is, and
//! that it allocates nothing while the memory manager is borrowed.

mod common;

use std::sync::atomic::Ordering;

use common::{Harness, ALLOCS_UNDER_LOCK};

use memd_mm::HostMm;
use memd_mm::MemoryManager;
use memd_service::ConnId;
use memd_wire::*;

#[global_allocator]
static GLOBAL: common::Guard = common::Guard;

/// The service over a fresh memd-mm (64 MiB below 4 GiB, 32 MiB above),
/// booted with `cmdline`, lent through [`common::LockEnv`].
fn harness(cmdline: &str) -> Harness<HostMm> {
    Harness::new(HostMm::three_zones(64 << 20, 32 << 20, cmdline).unwrap())
}

/// The memory map, as connection `c` asks for it; nothing may be
/// allocated while the memory manager is borrowed.
fn map(h: &mut Harness<HostMm>, c: ConnId) -> MemMap {
    ALLOCS_UNDER_LOCK.store(0, Ordering::Relaxed);
    let r = h.ok(c, Op::MemMap);
    assert_eq!(
        ALLOCS_UNDER_LOCK.load(Ordering::Relaxed),
        0,
        "the map allocated while the memory manager was borrowed"
    );
    match r {
        Reply::MemMap(m) => *m,
        r => panic!("{r:?}"),
    }
}

fn covered(map: &MemMap) {
    let mut at = 0;
    for r in &map.runs {
        assert_eq!(r.start, at, "runs are contiguous");
        assert!(r.len > 0);
        at += r.len;
    }
    assert_eq!(at, map.end, "runs cover the frame table");
    assert!(map.runs.len() <= MAX_MAP_RUNS);
}

#[test]
fn map_shows_zones_reservations_cma_and_buffers() {
    let mut h = harness("memd.dma_reserve=8M@dma32");
    let c = h.login();
    let base = map(&mut h, c);
    assert_eq!(base.granule, 1, "a fresh manager fits exactly");
    covered(&base);
    let names: Vec<&str> = base.zones.iter().map(|z| z.name.as_str()).collect();
    assert_eq!(names, ["DMA", "DMA32", "Normal"]);
    assert_eq!(base.zones[0].start, 1 << 20);
    assert_eq!(base.zones[1].start, 16 << 20);
    assert!(base.zones[1].end <= 64 << 20);
    assert_eq!(base.zones[2].start, 4 << 30);
    assert_eq!(base.end, (4 << 30) + (32 << 20));
    let kinds: Vec<&str> = base.reservations.iter().map(|r| r.kind.as_str()).collect();
    for k in ["zero-page", "frame-table", "dma-reserve"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let cma = base.cma.clone().expect("CMA region");
    assert_eq!(cma.end - cma.base, 8 << 20);
    assert!(cma.extents.is_empty());
    // Between 64 MiB and 4 GiB there is no RAM.
    assert!(base
        .runs
        .iter()
        .any(|r| r.kind == RunKind::Absent && r.start <= 64 << 20 && r.start + r.len >= 4 << 30));

    // A large DMA buffer lands in CMA; a small one in the buddy.
    let big = match h.ok(
        c,
        Op::DmaAlloc {
            len: 6 << 20,
            align: 0,
            mask: DmaMask::Bits32,
            movable: false,
        },
    ) {
        Reply::Dma(b) => b,
        r => panic!("{r:?}"),
    };
    assert_eq!(big.source, DmaSource::Cma);
    let small = match h.ok(
        c,
        Op::DmaAlloc {
            len: 64 << 10,
            align: 0,
            mask: DmaMask::Bits64,
            movable: false,
        },
    ) {
        Reply::Dma(b) => b,
        r => panic!("{r:?}"),
    };
    let cache = match h.ok(
        c,
        Op::CacheCreate(CacheSpec {
            name: "maptest".into(),
            size: 512,
            align: 0,
            flags: SlabFlags(0),
            ctor: Ctor::None,
        }),
    ) {
        Reply::Created { handle } => handle,
        r => panic!("{r:?}"),
    };
    h.ok(
        c,
        Op::CacheAlloc {
            cache,
            gfp: Gfp::KERNEL,
        },
    );

    let m = map(&mut h, c);
    covered(&m);
    let cma = m.cma.clone().unwrap();
    assert_eq!(
        cma.extents,
        [MapRange {
            start: big.phys,
            end: big.phys + (6 << 20)
        }]
    );
    let phys: Vec<(u64, u64, DmaSource)> =
        m.dma.iter().map(|d| (d.phys, d.len, d.source)).collect();
    let mut want = vec![
        (big.phys, big.len, DmaSource::Cma),
        (small.phys, small.len, DmaSource::Buddy),
    ];
    want.sort_by_key(|w| w.0);
    assert_eq!(phys, want);
    // The buddy-served buffer is allocated memory in the map.
    assert!(m.runs.iter().any(|r| r.kind == RunKind::Allocated
        && r.start <= small.phys
        && r.start + r.len >= small.phys + small.len));
    let slab = |m: &MemMap| -> u64 {
        m.runs
            .iter()
            .filter(|r| r.kind == RunKind::Slab)
            .map(|r| r.len)
            .sum()
    };
    assert!(slab(&m) > slab(&base), "the new slab shows");
}

#[test]
fn fragmented_memory_is_summarised_within_bounds() {
    let mut h = harness("");
    let c = h.login();
    // 12 000 single pages, every other one freed again: more runs than a
    // map may carry.
    let n = 12_000;
    let mut replies = Vec::new();
    let mut left = n;
    while left > 0 {
        let chunk = left.min(memd_wire::MAX_BATCH_OPS);
        left -= chunk;
        replies.extend(h.batch(
            c,
            vec![
                Op::AllocPages {
                    order: 0,
                    gfp: Gfp::KERNEL,
                };
                chunk
            ],
            true,
        ));
    }
    let mut pages: Vec<(u64, Handle)> = replies
        .into_iter()
        .map(|r| match r {
            Ok(Reply::Pages { handle, phys, .. }) => (phys, handle),
            r => panic!("{r:?}"),
        })
        .collect();
    pages.sort();
    let frees: Vec<Op> = pages
        .iter()
        .step_by(2)
        .map(|&(_, handle)| Op::FreePages { handle })
        .collect();
    for chunk in frees.chunks(memd_wire::MAX_BATCH_OPS) {
        h.batch(c, chunk.to_vec(), true);
    }
    let m = map(&mut h, c);
    covered(&m);
    assert!(m.granule > 1, "summarised");
    assert!(m.granule.is_power_of_two());
    let frame = to_frame(&Response::Call(Ok(Reply::MemMap(Box::new(m.clone()))))).unwrap();
    assert!(frame.len() <= MAX_FRAME);
    // Cells are whole multiples of the granule (except the table's end).
    let cell = m.granule * m.page_size;
    for r in &m.runs {
        assert_eq!(r.start % cell, 0, "{r:?}");
    }
}

/// A clock that moves 1 ms at every reading: every turn's budget is spent
/// at its first look, so a map takes a turn per window.
struct SteppingEnv<'a>(&'a mut MemoryManager, u64);

impl memd_service::Env for SteppingEnv<'_> {
    type Mem = MemoryManager;
    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn memd_service::BlockDevice>) -> R,
    ) -> R {
        common::under_lock(|| f(self.0, None))
    }
    fn now_ns(&mut self) -> u64 {
        self.1 += 1_000_000;
        self.1
    }
}

#[test]
fn a_map_walked_over_turns_covers_memory_while_it_changes() {
    let mut h = harness("memd.dma_reserve=8M@dma32");
    let c = h.login();
    let other = h.login();
    let whole = map(&mut h, c);
    let frame = to_frame(&Request::Call(Op::MemMap)).unwrap();
    let mut env = SteppingEnv(&mut h.mem, 0);
    let mut out = Vec::new();
    let (taken, _) = h
        .svc
        .on_bytes_bounded(&mut env, c, &frame, &mut out, usize::MAX);
    assert_eq!(taken, frame.len());
    let mut turns = 1;
    let mut held = Vec::new();
    while h.svc.has_work(c) {
        assert!(turns < 1000, "no end");
        // Another client allocates between the map's turns.
        let alloc = to_frame(&Request::Call(Op::AllocPages {
            order: (turns % 4) as u8,
            gfp: Gfp::KERNEL,
        }))
        .unwrap();
        let mut reply = Vec::new();
        h.svc
            .on_bytes_bounded(&mut env, other, &alloc, &mut reply, usize::MAX);
        held.push(reply);
        h.svc
            .on_bytes_bounded(&mut env, c, &[], &mut out, usize::MAX);
        turns += 1;
    }
    assert!(turns > 2, "the map took {turns} turn(s)");
    let mut d = FrameDecoder::new();
    let mut input = &out[..];
    let body = d.feed(&mut input).unwrap().expect("one whole frame");
    let m = match decode_body::<Response>(&body).unwrap() {
        Response::Call(Ok(Reply::MemMap(m))) => *m,
        r => panic!("{r:?}"),
    };
    covered(&m);
    assert_eq!(m.end, whole.end);
    assert_eq!(m.zones.len(), whole.zones.len());
    // The other client's pages show as allocated somewhere in it.
    let allocated: u64 = m
        .runs
        .iter()
        .filter(|r| r.kind == RunKind::Allocated)
        .map(|r| r.len)
        .sum();
    let before: u64 = whole
        .runs
        .iter()
        .filter(|r| r.kind == RunKind::Allocated)
        .map(|r| r.len)
        .sum();
    assert!(allocated > before, "{allocated} <= {before}");
    assert!(
        held.iter().all(|r| !r.is_empty()),
        "the other client waited"
    );
}

#[test]
fn memory_not_initialised_yet_is_shown_until_it_arrives() {
    // DMA32 up to 64 MiB, Normal at 4 GiB: boot initialises the first
    // 128 MiB, so the hole and all of Normal are still to come.
    let mut h = harness("memd.deferred_init=on");
    let c = h.login();
    let before = match h.ok(c, Op::Meminfo) {
        Reply::Meminfo(m) => m,
        r => panic!("{r:?}"),
    };
    // All of Normal but the frame table carved from its top.
    assert!(
        before.deferred > 8 << 20,
        "{} bytes to come",
        before.deferred
    );
    match h.ok(c, Op::Zoneinfo) {
        Reply::Zoneinfo(z) => {
            let normal = z
                .iter()
                .find(|z| z.name == "Normal")
                .expect("Normal listed");
            assert_eq!(
                (normal.managed, normal.deferred),
                (0, before.deferred / 4096)
            );
        }
        r => panic!("{r:?}"),
    }
    let m = map(&mut h, c);
    covered(&m);
    // Past what is initialised the boot map tells what frames are: memory
    // still to come (exactly what meminfo says), the hole below 4 GiB, and
    // the frame table carved from the top of Normal.
    let to_come: u64 = m
        .runs
        .iter()
        .filter(|r| r.kind == RunKind::Uninitialised)
        .map(|r| r.len)
        .sum();
    assert_eq!(to_come, before.deferred);
    assert!(m
        .runs
        .iter()
        .any(|r| r.kind == RunKind::Absent && r.start + r.len == 4 << 30));
    assert_eq!(
        m.runs.last().unwrap().kind,
        RunKind::Reserved,
        "the frame table, at the top"
    );

    while !h.mem.deferred_init_step(64) {}
    let after = match h.ok(c, Op::Meminfo) {
        Reply::Meminfo(m) => m,
        r => panic!("{r:?}"),
    };
    assert_eq!(after.deferred, 0);
    assert_eq!(
        after.total,
        before.total + before.deferred,
        "it arrived whole"
    );
    let m = map(&mut h, c);
    covered(&m);
    assert!(m.runs.iter().all(|r| r.kind != RunKind::Uninitialised));
    assert!(h.mem.check().is_ok());
}
