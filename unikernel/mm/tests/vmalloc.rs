//! vmalloc on the host: the architecture's page tables are a recording
//! double (a map from virtual page to frame, one pretend table per 2 MiB
//! and per 1 GiB), so the range allocator, the frame accounting and the
//! page-table traffic are tested without a real MMU. Nothing here turns a
//! vmalloc address into a pointer: the pages are reached through the
//! direct map of the frames the double recorded.

use memd_mm::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ptr::NonNull;
use std::sync::Mutex;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const WINDOW: u64 = 0xffff_c900_0000_0000;

#[derive(Default)]
struct Tables {
    /// Virtual page → frame.
    ptes: BTreeMap<u64, u64>,
    /// 2 MiB chunk → its pretend last-level table's frame.
    pt: BTreeMap<u64, u64>,
    /// 1 GiB chunk → its pretend middle table's frame.
    pd: BTreeMap<u64, u64>,
    /// Unmapped pages whose translation has not been flushed yet.
    stale: BTreeSet<u64>,
    maps: u64,
    flushes: u64,
    /// Fail `map_page` once this many more maps have succeeded.
    fail_after: Option<u64>,
}

/// The recording double for [`VmapOps`].
struct Recorder {
    window: (u64, u64),
    t: Mutex<Tables>,
}

impl Recorder {
    fn new(size: u64) -> Recorder {
        Recorder {
            window: (WINDOW, size),
            t: Mutex::new(Tables::default()),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.t.lock().unwrap()
    }
}

impl VmapOps for Recorder {
    fn window(&self) -> (u64, u64) {
        self.window
    }

    fn map_page(&self, virt: u64, phys: u64, tables: &mut dyn PgtableAlloc) -> Result<(), MmError> {
        let mut t = self.tables();
        assert!(virt >= self.window.0 && virt < self.window.0 + self.window.1);
        assert_eq!((virt % PAGE_SIZE, phys % PAGE_SIZE), (0, 0));
        assert!(!t.ptes.contains_key(&virt), "{virt:#x} mapped twice");
        assert!(
            !t.stale.contains(&virt),
            "{virt:#x} reused before its flush"
        );
        if let Some(n) = t.fail_after.as_mut() {
            if *n == 0 {
                t.fail_after = None;
                return Err(MmError::NoMemory);
            }
            *n -= 1;
        }
        if let std::collections::btree_map::Entry::Vacant(e) = t.pd.entry(virt / GIB) {
            e.insert(tables.alloc_table().ok_or(MmError::NoMemory)?);
        }
        if let std::collections::btree_map::Entry::Vacant(e) = t.pt.entry(virt / (2 * MIB)) {
            e.insert(tables.alloc_table().ok_or(MmError::NoMemory)?);
        }
        t.ptes.insert(virt, phys);
        t.maps += 1;
        Ok(())
    }

    fn unmap_page(&self, virt: u64) -> Option<u64> {
        let mut t = self.tables();
        let phys = t.ptes.remove(&virt)?;
        t.stale.insert(virt);
        Some(phys)
    }

    fn flush_tlb_page(&self, virt: u64) {
        let mut t = self.tables();
        t.stale.remove(&virt);
        t.flushes += 1;
    }

    fn translate(&self, virt: u64) -> Option<u64> {
        self.tables().ptes.get(&virt).copied()
    }

    fn free_empty_tables(&self, start: u64, end: u64, tables: &mut dyn PgtableAlloc) {
        let mut t = self.tables();
        let chunks = |size: u64| start / size..end.div_ceil(size);
        for c in chunks(2 * MIB) {
            let range = c * 2 * MIB..(c + 1) * 2 * MIB;
            if t.ptes.range(range).next().is_none() {
                if let Some(f) = t.pt.remove(&c) {
                    tables.free_table(f);
                }
            }
        }
        for c in chunks(GIB) {
            let range = c * GIB..(c + 1) * GIB;
            if t.ptes.range(range).next().is_none() {
                if let Some(f) = t.pd.remove(&c) {
                    tables.free_table(f);
                }
            }
        }
    }
}

/// DMA 1-16 MiB, DMA32 16-64 MiB, Normal 4 GiB .. 4 GiB + 32 MiB, with a
/// vmalloc window of `window` bytes.
fn machine(window: u64) -> (HostMm, Recorder) {
    let mut mm = HostMm::three_zones(64 * MIB, 32 * MIB, "").unwrap();
    let rec = Recorder::new(window);
    mm.vmalloc_init(WINDOW, window).unwrap();
    mm.check().unwrap();
    (mm, rec)
}

fn addr(p: NonNull<u8>) -> u64 {
    p.as_ptr() as u64
}

fn ptr(a: u64) -> NonNull<u8> {
    NonNull::new(a as usize as *mut u8).unwrap()
}

/// The frames behind `pages` pages at `start`, as the double recorded them.
fn frames_of(rec: &Recorder, start: u64, pages: u64) -> Vec<u64> {
    let t = rec.tables();
    (0..pages)
        .map(|i| *t.ptes.get(&(start + i * PAGE_SIZE)).expect("page mapped"))
        .collect()
}

#[test]
fn larger_than_any_buddy_block_and_back_exactly() {
    let (mut mm, rec) = machine(64 * GIB);
    let before = mm.meminfo();
    assert_eq!(before.vmalloc_total, 64 * GIB);
    assert_eq!(before.vmalloc_chunk, 64 * GIB);
    let size = 24 * MIB as usize; // six times the largest (4 MiB) block
    assert!(mm.kmalloc(size, Gfp::KERNEL).is_err());
    let p = mm.vmalloc(size, 8, Gfp::KERNEL, &rec).unwrap();
    assert_eq!(addr(p), WINDOW, "first fit: the bottom of the window");
    mm.check().unwrap();
    let m = mm.meminfo();
    assert_eq!(m.vmalloc_used, size as u64);
    assert_eq!(m.vmalloc_chunk, 64 * GIB - size as u64 - PAGE_SIZE);
    let tables = mm.counters().pgtable_pages;
    // 12 last-level tables for 24 MiB plus one middle one.
    assert_eq!(tables, 13);
    assert_eq!(
        before.free - m.free,
        size as u64 + tables * PAGE_SIZE,
        "the area's pages and its tables, nothing else"
    );
    let frames = frames_of(&rec, addr(p), size as u64 / PAGE_SIZE);
    assert_eq!(
        frames.iter().collect::<BTreeSet<_>>().len(),
        frames.len(),
        "distinct frames"
    );
    for &f in &frames {
        assert_eq!(mm.frame(f).unwrap().state(), FrameState::Vmalloc);
    }
    // The pages hold what is written to them (through the direct map).
    let dmap = mm.direct_map();
    for (i, &f) in frames.iter().enumerate() {
        let page = mm.bytes_of(dmap.virt(f), 1);
        assert!(page.is_err(), "vmalloc pages are not kmalloc/page blocks");
        // SAFETY: the frame is mapped into our live vmalloc area.
        unsafe { *(dmap.virt(f) as *mut u64) = i as u64 };
    }
    for (i, &f) in frames.iter().enumerate() {
        // SAFETY: as above.
        assert_eq!(unsafe { *(dmap.virt(f) as *const u64) }, i as u64);
    }
    assert_eq!(
        mm.vmallocinfo().collect::<Vec<_>>(),
        vec![VmallocArea {
            start: WINDOW,
            pages: size as u64 / PAGE_SIZE,
            first_pfn: frames[0] / PAGE_SIZE,
        }]
    );
    mm.vfree(p, &rec).unwrap();
    mm.check().unwrap();
    let after = mm.meminfo();
    assert_eq!(after.vmalloc_used, 0);
    assert_eq!(after.free, before.free, "free memory returns exactly");
    assert_eq!(
        after.vmalloc_chunk,
        64 * GIB,
        "the window is one area again"
    );
    assert_eq!(mm.counters().pgtable_pages, 0);
    let t = rec.tables();
    assert!(t.ptes.is_empty() && t.pt.is_empty() && t.pd.is_empty());
    assert!(t.stale.is_empty(), "every unmapped page was flushed");
    assert_eq!(t.flushes, size as u64 / PAGE_SIZE);
}

#[test]
fn fragmented_memory_still_serves_a_large_area() {
    let (mut mm, rec) = machine(64 * GIB);
    // Take every page, then give back every other one: no two free frames
    // are buddies, so no block above order 0 can form.
    let mut held = Vec::new();
    while let Ok(p) = mm.alloc_pages(0, Gfp::ATOMIC) {
        held.push(p);
    }
    held.sort_unstable();
    let mut kept = Vec::new();
    for p in held {
        if (p / PAGE_SIZE).is_multiple_of(2) {
            mm.free_pages(p, 0).unwrap();
        } else {
            kept.push(p);
        }
    }
    // What stayed free below the watermarks may still be whole blocks:
    // hold those too, largest first so that none is split.
    mm.drain_all_pages();
    let mut blocks = Vec::new();
    for order in (1..mm.max_order()).rev() {
        for zone in [Gfp::DMA, Gfp::DMA32, Gfp::NOWAIT] {
            while mm
                .buddyinfo()
                .iter()
                .any(|(z, n)| n[order as usize] > 0 && *z <= zone.highest_zone())
            {
                let Ok(p) = mm.alloc_pages(order, Gfp::ATOMIC | zone) else {
                    break;
                };
                blocks.push((p, order));
            }
        }
    }
    let high: u64 = mm
        .buddyinfo()
        .iter()
        .map(|(_, n)| n[1..].iter().sum::<u64>())
        .sum();
    assert_eq!(high, 0, "no free block above order 0");
    assert!(mm.meminfo().free > 8 * MIB);
    assert!(mm.kmalloc(MIB as usize, Gfp::KERNEL).is_err());
    let p = mm.vmalloc(MIB as usize, 8, Gfp::KERNEL, &rec).unwrap();
    assert_eq!(mm.meminfo().vmalloc_used, MIB);
    mm.check().unwrap();
    mm.vfree(p, &rec).unwrap();
    for p in kept {
        mm.free_pages(p, 0).unwrap();
    }
    for (p, order) in blocks {
        mm.free_pages(p, order).unwrap();
    }
    mm.check().unwrap();
}

#[test]
fn guard_pages_first_fit_and_coalescing() {
    let (mut mm, rec) = machine(64 * GIB);
    let page = PAGE_SIZE as usize;
    let a = addr(mm.vmalloc(3 * page, 8, Gfp::KERNEL, &rec).unwrap());
    let b = addr(mm.vmalloc(5 * page, 8, Gfp::KERNEL, &rec).unwrap());
    let c = addr(mm.vmalloc(page, 8, Gfp::KERNEL, &rec).unwrap());
    assert_eq!(b, a + 4 * PAGE_SIZE, "one unmapped guard page after A");
    assert_eq!(c, b + 6 * PAGE_SIZE);
    assert_eq!(rec.translate(a + 3 * PAGE_SIZE), None, "A's guard page");
    assert_eq!(mm.meminfo().vmalloc_used, 9 * PAGE_SIZE);
    mm.vfree(ptr(b), &rec).unwrap();
    // B's hole is six pages: a four-page area fits at its start, a
    // six-page one does not (it needs a seventh for its guard).
    let big = addr(mm.vmalloc(6 * page, 8, Gfp::KERNEL, &rec).unwrap());
    assert!(big > c, "six pages and a guard do not fit in the hole");
    let d = addr(mm.vmalloc(4 * page, 8, Gfp::KERNEL, &rec).unwrap());
    assert_eq!(d, b, "first fit takes the lowest hole");
    mm.check().unwrap();
    // Freeing in an order that needs merging both ways.
    for p in [a, c, d, big] {
        mm.vfree(ptr(p), &rec).unwrap();
        mm.check().unwrap();
    }
    let m = mm.meminfo();
    assert_eq!((m.vmalloc_used, m.vmalloc_chunk), (0, 64 * GIB));
    assert_eq!(mm.vmallocinfo().count(), 0);
}

#[test]
fn alignment_is_honoured() {
    let (mut mm, rec) = machine(64 * GIB);
    let first = addr(mm.vmalloc(1, 1, Gfp::KERNEL, &rec).unwrap());
    assert_eq!(first, WINDOW);
    for align in [8192usize, 64 << 10, 2 << 20] {
        let p = addr(mm.vmalloc(3 * 4096, align, Gfp::KERNEL, &rec).unwrap());
        assert_eq!(p % align as u64, 0, "{p:#x} not aligned to {align:#x}");
    }
    mm.check().unwrap();
    assert!(mm.vmalloc(4096, 3000, Gfp::KERNEL, &rec).is_err());
}

#[test]
fn vfree_refuses_what_it_did_not_hand_out() {
    let (mut mm, rec) = machine(64 * GIB);
    let p = mm.vmalloc(4 * 4096, 8, Gfp::KERNEL, &rec).unwrap();
    let inside = ptr(addr(p) + PAGE_SIZE);
    assert!(
        mm.vfree(inside, &rec).is_err(),
        "an address inside the area"
    );
    let guard = ptr(addr(p) + 4 * PAGE_SIZE);
    assert!(mm.vfree(guard, &rec).is_err(), "the guard page");
    assert!(
        mm.vfree(ptr(WINDOW + GIB), &rec).is_err(),
        "never allocated"
    );
    let k = mm.kmalloc(64, Gfp::KERNEL).unwrap();
    assert!(mm.vfree(k, &rec).is_err(), "a kmalloc pointer");
    let frame = rec.translate(addr(p)).unwrap();
    let alias = ptr(mm.direct_map().virt(frame) as u64);
    assert!(mm.kfree(alias).is_err(), "kfree of a vmalloc page's alias");
    mm.check().unwrap();
    mm.vfree(p, &rec).unwrap();
    assert!(mm.vfree(p, &rec).is_err(), "a second free");
    mm.kfree(k).unwrap();
    mm.check().unwrap();
}

#[test]
fn zeroed_areas_read_zero() {
    let (mut mm, rec) = machine(64 * GIB);
    let dmap = mm.direct_map();
    // Dirty some pages, free them, then ask for zeroed ones.
    let p = mm.vmalloc(64 * 4096, 8, Gfp::KERNEL, &rec).unwrap();
    for f in frames_of(&rec, addr(p), 64) {
        mm.bytes_of(dmap.virt(f), 1).unwrap_err();
        // SAFETY: the frame is mapped into our live vmalloc area.
        unsafe { core::ptr::write_bytes(dmap.virt(f) as *mut u8, 0xa5, 4096) };
    }
    mm.vfree(p, &rec).unwrap();
    let p = mm
        .vmalloc(64 * 4096, 8, Gfp::KERNEL | Gfp::ZERO, &rec)
        .unwrap();
    for f in frames_of(&rec, addr(p), 64) {
        // SAFETY: as above.
        let page = unsafe { core::slice::from_raw_parts(dmap.virt(f) as *const u8, 4096) };
        assert!(page.iter().all(|&b| b == 0));
    }
    mm.vfree(p, &rec).unwrap();
}

#[test]
fn a_failed_map_rolls_everything_back() {
    let (mut mm, rec) = machine(64 * GIB);
    let before = mm.meminfo();
    for n in [0u64, 1, 511, 512, 700] {
        rec.tables().fail_after = Some(n);
        let r = mm.vmalloc(4 * MIB as usize, 8, Gfp::KERNEL, &rec);
        assert_eq!(r, Err(MmError::NoMemory), "map {n} fails");
        mm.check().unwrap();
        let m = mm.meminfo();
        assert_eq!((m.free, m.vmalloc_used), (before.free, 0), "after map {n}");
        assert_eq!(mm.counters().pgtable_pages, 0);
        let t = rec.tables();
        assert!(t.ptes.is_empty() && t.pt.is_empty() && t.pd.is_empty());
    }
    assert_eq!(mm.counters().vmalloc_failures, 5);
    // The window is whole again: the next request lands at its start.
    let p = mm.vmalloc(4096, 8, Gfp::KERNEL, &rec).unwrap();
    assert_eq!(addr(p), WINDOW);
}

#[test]
fn running_out_of_memory_or_window_fails_cleanly() {
    let (mut mm, rec) = machine(64 * MIB);
    let before = mm.meminfo();
    // More than the machine has: fails part-way, gives everything back.
    let r = mm.vmalloc(63 * MIB as usize, 8, Gfp::KERNEL, &rec);
    assert!(r.is_ok(), "63 MiB fit the window and memory");
    mm.vfree(r.unwrap(), &rec).unwrap();
    let (mut mm2, rec2) = machine(GIB);
    let free = mm2.meminfo().free;
    assert_eq!(
        mm2.vmalloc(free as usize + 4096, 8, Gfp::KERNEL, &rec2),
        Err(MmError::NoMemory)
    );
    mm2.check().unwrap();
    assert_eq!(mm2.meminfo().free, free);
    // The 64 MiB window holds 64 MiB less one guard page in one area.
    let a = mm.vmalloc(40 * MIB as usize, 8, Gfp::KERNEL, &rec).unwrap();
    assert_eq!(
        mm.vmalloc(24 * MIB as usize, 8, Gfp::KERNEL, &rec),
        Err(MmError::NoMemory),
        "40 MiB + guard + 24 MiB + guard exceed 64 MiB"
    );
    let b = mm.vmalloc(24 * MIB as usize - 2 * 4096, 8, Gfp::KERNEL, &rec);
    assert!(b.is_ok(), "exactly what is left, guard included");
    assert_eq!(mm.meminfo().vmalloc_chunk, 0);
    mm.vfree(a, &rec).unwrap();
    mm.vfree(b.unwrap(), &rec).unwrap();
    mm.check().unwrap();
    assert_eq!(mm.meminfo().free, before.free);
}

// --- The model ---

#[derive(Clone, Debug)]
enum Op {
    Alloc { pages: u64, align_log: u32 },
    Free { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop_oneof![1u64..8, 1u64..600], 12u32..19).prop_map(|(pages, align_log)| Op::Alloc { pages, align_log }),
        2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

/// Where first fit must put `pages` pages (plus a guard) aligned to
/// `align`, given the live areas `(start, pages)` sorted by address.
fn first_fit(live: &[(u64, u64)], window: (u64, u64), pages: u64, align: u64) -> Option<u64> {
    let mut gap_start = window.0;
    let ends = live
        .iter()
        .map(|&(s, p)| (s, s + (p + 1) * PAGE_SIZE))
        .chain([(window.0 + window.1, 0)]);
    for (next_start, next_end) in ends {
        let at = gap_start.next_multiple_of(align);
        if at + (pages + 1) * PAGE_SIZE <= next_start {
            return Some(at);
        }
        gap_start = next_end;
    }
    None
}

fn largest_gap(live: &[(u64, u64)], window: (u64, u64)) -> u64 {
    let mut gap_start = window.0;
    let mut best = 0;
    for &(s, p) in live {
        best = best.max(s - gap_start);
        gap_start = s + (p + 1) * PAGE_SIZE;
    }
    best.max(window.0 + window.1 - gap_start)
}

proptest! {
    // 64 cases unless PROPTEST_CASES says otherwise (`cargo xtask fuzz`).
    #![proptest_config(ProptestConfig::with_cases(match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => 64,
    }))]

    /// Random vmalloc/vfree sequences in a 16 MiB window against a model
    /// of the live areas: every placement is first fit, the chunk is the
    /// largest gap, the double's mappings are exactly the live pages on
    /// distinct vmalloc frames, and every invariant holds after each step;
    /// at the end free memory and the window are back exactly.
    #[test]
    fn vmalloc_matches_a_first_fit_model(ops in prop::collection::vec(op(), 1..200)) {
        let window = (WINDOW, 16 * MIB);
        let (mut mm, rec) = machine(window.1);
        // Records come from kmalloc-64: compare with its caches shrunk.
        mm.reclaim();
        let base = mm.meminfo();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for op in &ops {
            match *op {
                Op::Alloc { pages, align_log } => {
                    let align = 1u64 << align_log;
                    let want = first_fit(&live, window, pages, align);
                    let got = mm.vmalloc((pages * PAGE_SIZE) as usize - 7, align as usize, Gfp::KERNEL, &rec);
                    match (want, got) {
                        (Some(w), Ok(p)) => {
                            prop_assert_eq!(addr(p), w, "first fit");
                            live.push((w, pages));
                            live.sort_unstable();
                        }
                        (None, Err(MmError::NoMemory)) => {}
                        (w, g) => prop_assert!(false, "model {:x?}, vmalloc {:?}", w, g),
                    }
                }
                Op::Free { pick } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (s, _) = live.remove(pick % live.len());
                    mm.vfree(ptr(s), &rec).unwrap();
                }
            }
            if let Err(e) = mm.check() {
                prop_assert!(false, "invariant broken: {}", e);
            }
            let m = mm.meminfo();
            let pages: u64 = live.iter().map(|&(_, p)| p).sum();
            prop_assert_eq!(m.vmalloc_used, pages * PAGE_SIZE);
            prop_assert_eq!(m.vmalloc_chunk, largest_gap(&live, window));
            let t = rec.tables();
            prop_assert_eq!(t.ptes.len() as u64, pages);
            prop_assert_eq!(t.ptes.values().collect::<BTreeSet<_>>().len() as u64, pages);
            for &(s, p) in &live {
                for i in 0..p {
                    let f = t.ptes.get(&(s + i * PAGE_SIZE));
                    prop_assert!(f.is_some_and(|&f| mm.frame(f).unwrap().state() == FrameState::Vmalloc));
                }
                prop_assert!(!t.ptes.contains_key(&(s + p * PAGE_SIZE)), "guard page mapped");
            }
            prop_assert!(t.stale.is_empty());
            let want: Vec<(u64, u64)> = mm.vmallocinfo().map(|a| (a.start, a.pages)).collect();
            prop_assert_eq!(&want, &live);
        }
        for (s, _) in live.drain(..) {
            mm.vfree(ptr(s), &rec).unwrap();
        }
        mm.check().unwrap();
        mm.reclaim();
        let m = mm.meminfo();
        prop_assert_eq!(m.free, base.free);
        prop_assert_eq!((m.vmalloc_used, m.vmalloc_chunk), (0, window.1));
        prop_assert_eq!(mm.counters().pgtable_pages, 0);
    }
}
