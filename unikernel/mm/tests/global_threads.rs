//! memd-mm's `HostGlobal` from many threads, as a property test: each
//! thread allocates objects and page blocks from and frees them to its own
//! CPU's caches, and DMA buffers charged to its own owner under the zones'
//! locks, frees what other threads allocated, and up to more
//! threads than CPU slots run at once (the rest take the lock), while
//! another thread checks every invariant under the manager's lock. At the
//! quiescent point after they are gone and the caches are drained, every
//! invariant holds and free memory is back where it was.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc;

use memd_mm::{
    DmaBuffer, DmaMask, DmaRequest, HostGlobal, Owner, Prandom, HOST_CPUS, PCP_MAX_ORDER,
};
use proptest::prelude::*;

static MEMD: HostGlobal = HostGlobal::new(256 << 20);

/// Something allocated: a heap object, a page block or a DMA buffer.
enum Item {
    Object(usize, Layout),
    Pages(memd_mm::PageBlock),
    Dma(DmaBuffer),
}

/// Items one thread hands another to free.
struct Batch(Vec<Item>);

/// A new item, filled with `fill`: one in eight a DMA buffer of up to
/// 64 KiB (4 KiB below 16 MiB) under a random mask, charged to `owner`; one in four a page block
/// of order up to `PCP_MAX_ORDER + 1` (the last past the CPU lists, so it
/// takes the lock); else a heap object.
fn alloc(rng: &mut Prandom, fill: u8, owner: Owner) -> Item {
    if rng.below(8) == 0 {
        let mask = [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64][rng.below(3) as usize];
        // The DMA zone is 15 MiB: buffers below 16 MiB are small, so that
        // every thread's fit in it at once.
        let (most, align) = match mask {
            DmaMask::Bits24 => (4 << 10, 13),
            _ => (64 << 10, 17),
        };
        let req = DmaRequest {
            len: 1 + rng.below(most) as usize,
            align: 1 << rng.below(align),
            mask,
            movable: false,
            zeroed: rng.below(2) == 0,
        };
        let b = MEMD
            .global_mm()
            .unwrap()
            .dma_alloc(req, owner)
            .expect("DMA buffer");
        assert_eq!(b.phys % req.align as u64, 0, "aligned as asked");
        assert!(b.phys + b.span() as u64 <= mask.limit(), "below the mask");
        // SAFETY: a fresh buffer of `span()` bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(b.virt as *mut u8, b.span()) };
        assert!(!req.zeroed || bytes.iter().all(|&x| x == 0), "zeroed");
        bytes.fill(fill);
        return Item::Dma(b);
    }
    if rng.below(4) == 0 {
        let order = rng.below(PCP_MAX_ORDER as u64 + 2) as u32;
        let b = MEMD
            .global_mm()
            .unwrap()
            .alloc_pages(order)
            .expect("page block");
        assert_eq!(b.phys() % (4096 << order), 0, "aligned to its size");
        let p = MEMD.page_ptr(&b).unwrap();
        // SAFETY: a fresh block of `4096 << order` bytes.
        unsafe { p.as_ptr().write_bytes(fill, 4096 << order) };
        return Item::Pages(b);
    }
    let size = 1 + rng.below(3000) as usize;
    let align = 1 << rng.below(7);
    let l = Layout::from_size_align(size, align).unwrap();
    // SAFETY: a non-zero layout.
    let p = unsafe { MEMD.alloc(l) };
    assert!(!p.is_null());
    assert_eq!(p as usize % l.align(), 0);
    // SAFETY: `p` has `l.size()` bytes.
    unsafe { p.write_bytes(fill, l.size()) };
    Item::Object(p as usize, l)
}

/// Frees `item`, allocated by `alloc` and freed once.
fn free(item: Item) {
    match item {
        // SAFETY: allocated with `l`, freed once.
        Item::Object(p, l) => unsafe { MEMD.dealloc(p as *mut u8, l) },
        Item::Pages(b) => MEMD.global_mm().unwrap().free_pages(b),
        Item::Dma(b) => assert_eq!(MEMD.global_mm().unwrap().dma_free(&b), Ok(())),
    }
}

fn worker(
    seed: u64,
    rounds: usize,
    steps: usize,
    to_next: mpsc::Sender<Batch>,
    from_prev: mpsc::Receiver<Batch>,
) -> Owner {
    let mut rng = Prandom::new(seed);
    let owner = MEMD.lock().owner_alloc().unwrap();
    let mut live: Vec<Item> = Vec::new();
    for round in 0..rounds {
        for _ in 0..steps {
            if live.len() > steps / 4 && rng.below(2) == 0 {
                free(live.swap_remove(rng.below(live.len() as u64) as usize));
            } else {
                live.push(alloc(&mut rng, seed as u8, owner));
            }
        }
        // Half of what is live goes to the next thread to free.
        let give: Vec<_> = live.drain(..live.len() / 2).collect();
        to_next.send(Batch(give)).unwrap();
        if round > 0 {
            // Allocated by the previous thread, handed over whole.
            from_prev.recv().unwrap().0.into_iter().for_each(free);
        }
    }
    live.into_iter().for_each(free);
    // The last batch the previous thread sent.
    from_prev.recv().unwrap().0.into_iter().for_each(free);
    owner
}

/// One run: `threads` workers of `rounds` rounds of `steps` steps each.
fn run(seed: u64, threads: usize, rounds: usize, steps: usize) -> Result<(), TestCaseError> {
    // One run at a time: the tests share `MEMD`, and each compares its
    // free memory against its own baseline.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // First use boots the arena; then the baseline.
    let l = Layout::new::<u64>();
    // SAFETY: a non-zero layout; freed at once with it.
    unsafe { MEMD.dealloc(MEMD.alloc(l), l) };
    MEMD.drain_cpu_caches();
    let before = {
        let mut mm = MEMD.lock();
        mm.reclaim();
        mm.meminfo().free
    };
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..threads).map(|_| mpsc::channel()).unzip();
    let mut receivers: Vec<Option<mpsc::Receiver<Batch>>> =
        receivers.into_iter().map(Some).collect();
    // Joined by handle: a join returns once the thread is gone, its CPU
    // slot given back (a scope's end does not wait for that).
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let to_next = senders[(t + 1) % threads].clone();
            let from_prev = receivers[t].take().unwrap();
            std::thread::spawn(move || worker(seed + t as u64, rounds, steps, to_next, from_prev))
        })
        .collect();
    // Meanwhile the whole manager is checked again and again: its lock
    // waits for batches in flight, so no check sees one half done.
    let done = std::sync::atomic::AtomicBool::new(false);
    let checks = std::thread::scope(|s| {
        let checker = s.spawn(|| {
            let mut checks = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) && checks.len() < 1000 {
                checks.push(MEMD.lock().check());
                std::thread::yield_now();
            }
            checks
        });
        let owners: Vec<Owner> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (owners, checker.join().unwrap())
    });
    let (owners, checks) = checks;
    prop_assert!(
        checks.iter().all(|c| c.is_ok()),
        "a check while the threads ran: {:?}",
        checks.iter().find(|c| c.is_err())
    );
    drop(senders);
    let drained = MEMD.drain_cpu_caches();
    let (check, charged, dma, after) = {
        let mut mm = MEMD.lock();
        let check = mm.check();
        let charged: Vec<u64> = owners.iter().map(|&o| mm.owner_pages(o)).collect();
        owners.iter().for_each(|&o| mm.owner_free(o).unwrap());
        mm.reclaim();
        (check, charged, mm.meminfo().dma_buddy, mm.meminfo().free)
    };
    prop_assert!(
        charged.iter().all(|&c| c == 0),
        "owners still charged: {charged:?}"
    );
    prop_assert_eq!(dma, 0, "DMA buffers still counted");
    prop_assert!(drained.objects > 0, "the threads' CPU arrays held objects");
    prop_assert!(
        drained.blocks > 0,
        "the threads' CPU page lists held blocks"
    );
    prop_assert!(check.is_ok(), "{check:?}");
    prop_assert_eq!(
        after,
        before,
        "free memory is back once the arrays are drained"
    );
    Ok(())
}

#[test]
fn more_threads_than_cpu_slots() {
    run(0x5eed, HOST_CPUS + 4, 20, 2_000).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => 24,
    }))]

    #[test]
    fn threads_share_objects_through_their_cpu_arrays(
        seed in any::<u64>(),
        threads in 1usize..=HOST_CPUS + 2,
        rounds in 1usize..6,
        steps in 50usize..1500,
    ) {
        run(seed, threads, rounds, steps)?;
    }
}

#[global_allocator]
static GLOBAL: Forward = Forward;

/// The test binary's own allocations (the harness, channels, vectors) go
/// to the system allocator, so that the figures above are only the
/// workers'.
struct Forward;

// SAFETY: forwards to the system allocator.
unsafe impl GlobalAlloc for Forward {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}
