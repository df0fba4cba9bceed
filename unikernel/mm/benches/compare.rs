//! `cargo xtask bench mm`: memd-mm against other allocators, side by side
//! in one process, on the same precomputed fixed-seed traces.
//!
//! Every allocator gets its own arena from the host and the same sequence
//! of operations. A workload is timed over several rounds and the median
//! round is reported, so a noisy moment on the machine does not decide a
//! ratio. Each timed loop is a function of its own, never inlined into
//! `main`, so the rest of `main` does not decide where its code lands.
//! `--json` prints one JSON array of rows for scripts.

use buddy_system_allocator::{FrameAllocator, Heap};
use memd_mm::HostMm;
use memd_mm::{DmaMask, Gfp, Prandom, FRAME_DESCRIPTOR_BYTES};
use rlsf::Tlsf;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::time::Instant;
use talc::{ErrOnOom, Talc};

const LIVE: usize = 10_000;
const STEPS: usize = 400_000;
const HOT_STEPS: usize = 1_000_000;
const ROUNDS: usize = 5;
const ARENA: usize = 512 << 20;
const MIB: u64 = 1 << 20;

/// Small-object allocator under test.
trait Objects {
    fn alloc(&mut self, layout: Layout) -> *mut u8;
    fn free(&mut self, ptr: *mut u8, layout: Layout);
}

/// Page allocator under test: one 4 KiB frame per call.
trait Pages {
    fn alloc_page(&mut self) -> usize;
    fn free_page(&mut self, page: usize);
}

fn host_arena(bytes: usize) -> &'static mut [MaybeUninit<u8>] {
    let layout = Layout::from_size_align(bytes, 4096).unwrap();
    // SAFETY: non-zero layout; leaked on purpose, it backs an allocator for
    // the rest of the run.
    let p = unsafe { System.alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: `bytes` bytes at `p` are ours.
    unsafe { std::slice::from_raw_parts_mut(p as *mut MaybeUninit<u8>, bytes) }
}

struct Memd(HostMm);
impl Memd {
    fn new(cmdline: &str) -> Memd {
        Memd(HostMm::boot(&[(MIB, MIB + ARENA as u64)], cmdline).unwrap())
    }
}
impl Objects for Memd {
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        self.0.kmalloc_layout(layout, Gfp::KERNEL).unwrap().as_ptr()
    }
    #[inline]
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        self.0.kfree_layout(NonNull::new(ptr).unwrap(), layout)
    }
}
impl Pages for Memd {
    #[inline]
    fn alloc_page(&mut self) -> usize {
        self.0.alloc_pages(0, Gfp::KERNEL).unwrap() as usize
    }
    #[inline]
    fn free_page(&mut self, page: usize) {
        self.0.free_pages(page as u64, 0).unwrap()
    }
}

struct BsaHeap(Heap<32>);
impl BsaHeap {
    fn new() -> Self {
        let mut h = Heap::<32>::new();
        let arena = host_arena(ARENA);
        // SAFETY: the arena is ours and leaked.
        unsafe { h.init(arena.as_mut_ptr() as usize, ARENA) };
        BsaHeap(h)
    }
}
impl Objects for BsaHeap {
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        self.0.alloc(layout).unwrap().as_ptr()
    }
    #[inline]
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        self.0.dealloc(NonNull::new(ptr).unwrap(), layout)
    }
}

struct BsaFrames(FrameAllocator<32>);
impl BsaFrames {
    fn new(frames: usize) -> Self {
        let mut f = FrameAllocator::<32>::new();
        f.add_frame(256, 256 + frames);
        BsaFrames(f)
    }
}
impl Pages for BsaFrames {
    #[inline]
    fn alloc_page(&mut self) -> usize {
        self.0.alloc(1).unwrap()
    }
    #[inline]
    fn free_page(&mut self, page: usize) {
        self.0.dealloc(page, 1)
    }
}

struct TalcAlloc(Talc<ErrOnOom>);
impl TalcAlloc {
    fn new() -> Self {
        let mut t = Talc::new(ErrOnOom);
        let arena = host_arena(ARENA);
        let base = arena.as_mut_ptr() as *mut u8;
        // SAFETY: the arena is ours and leaked.
        unsafe { t.claim((base..base.wrapping_add(ARENA)).into()).unwrap() };
        TalcAlloc(t)
    }
}
impl Objects for TalcAlloc {
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: non-zero layouts only.
        unsafe { self.0.malloc(layout).unwrap().as_ptr() }
    }
    #[inline]
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { self.0.free(NonNull::new(ptr).unwrap(), layout) }
    }
}

struct RlsfAlloc(Tlsf<'static, u32, u32, 30, 32>);
impl RlsfAlloc {
    fn new() -> Self {
        let mut t = Tlsf::new();
        t.insert_free_block(host_arena(ARENA));
        RlsfAlloc(t)
    }
}
impl Objects for RlsfAlloc {
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        self.0.allocate(layout).unwrap().as_ptr()
    }
    #[inline]
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this alignment.
        unsafe {
            self.0
                .deallocate(NonNull::new(ptr).unwrap(), layout.align())
        }
    }
}

struct SystemAlloc;
impl Objects for SystemAlloc {
    #[inline]
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: non-zero layouts only.
        unsafe { System.alloc(layout) }
    }
    #[inline]
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Pages through an object allocator: 4 KiB blocks aligned to 4 KiB.
struct PagesVia<T: Objects>(T);
const PAGE: Layout = match Layout::from_size_align(4096, 4096) {
    Ok(l) => l,
    Err(_) => panic!(),
};
impl<T: Objects> Pages for PagesVia<T> {
    #[inline]
    fn alloc_page(&mut self) -> usize {
        self.0.alloc(PAGE) as usize
    }
    #[inline]
    fn free_page(&mut self, page: usize) {
        self.0.free(page as *mut u8, PAGE)
    }
}

/// Sizes log-uniform in 8..=4096.
fn log_uniform_size(rng: &mut Prandom) -> usize {
    let log = 3.0 + (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 9.0;
    (2f64.powf(log) as usize).clamp(8, 4096)
}

struct SteadyTrace {
    initial: Vec<usize>,
    steps: Vec<(u32, u32)>,
}

/// The same trace for every allocator and every run of one seed.
fn steady_trace(seed: u64, sizes: bool) -> SteadyTrace {
    let mut rng = Prandom::new(seed);
    let initial = (0..LIVE)
        .map(|_| {
            if sizes {
                log_uniform_size(&mut rng)
            } else {
                4096
            }
        })
        .collect();
    let steps = (0..STEPS)
        .map(|_| {
            (
                rng.below(LIVE as u64) as u32,
                if sizes {
                    log_uniform_size(&mut rng) as u32
                } else {
                    4096
                },
            )
        })
        .collect();
    SteadyTrace { initial, steps }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Steady state: `LIVE` objects, then free a random one and allocate a new
/// one. ns per operation (each step is two).
#[inline(never)]
fn objects_steady<A: Objects>(a: &mut A, t: &SteadyTrace) -> f64 {
    let layout = |s: usize| Layout::from_size_align(s, 8).unwrap();
    let mut live: Vec<(*mut u8, usize)> =
        t.initial.iter().map(|&s| (a.alloc(layout(s)), s)).collect();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for &(victim, size) in &t.steps {
            let slot = &mut live[victim as usize];
            a.free(slot.0, layout(slot.1));
            *slot = (black_box(a.alloc(layout(size as usize))), size as usize);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / (2 * t.steps.len()) as f64);
    }
    for (p, s) in live {
        a.free(p, layout(s));
    }
    median(rounds)
}

#[inline(never)]
fn objects_hot64<A: Objects>(a: &mut A) -> f64 {
    let layout = Layout::from_size_align(64, 8).unwrap();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..HOT_STEPS {
            let p = black_box(a.alloc(layout));
            a.free(p, layout);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / (2 * HOT_STEPS) as f64);
    }
    median(rounds)
}

#[inline(never)]
fn pages_steady<P: Pages>(p: &mut P, t: &SteadyTrace) -> f64 {
    let mut live: Vec<usize> = t.initial.iter().map(|_| p.alloc_page()).collect();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for &(victim, _) in &t.steps {
            let slot = &mut live[victim as usize];
            p.free_page(*slot);
            *slot = black_box(p.alloc_page());
        }
        rounds.push(start.elapsed().as_nanos() as f64 / (2 * t.steps.len()) as f64);
    }
    for page in live {
        p.free_page(page);
    }
    median(rounds)
}

#[inline(never)]
fn pages_hot<P: Pages>(p: &mut P) -> f64 {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..HOT_STEPS {
            let page = black_box(p.alloc_page());
            p.free_page(page);
        }
        rounds.push(start.elapsed().as_nanos() as f64 / (2 * HOT_STEPS) as f64);
    }
    median(rounds)
}

/// Fragmentation: fill 256 MiB with pages, free a random half, then try
/// 64 MiB contiguous requests (each freed again on success).
fn frag_rate(
    fill: &mut dyn FnMut() -> Option<usize>,
    free: &mut dyn FnMut(usize),
    big: &mut dyn FnMut() -> bool,
) -> f64 {
    let mut pages = Vec::new();
    while let Some(p) = fill() {
        pages.push(p);
        if pages.len() == (256 << 20) / 4096 {
            break;
        }
    }
    let mut rng = Prandom::new(42);
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let half = pages.len() / 2;
    for p in pages.drain(..half) {
        free(p);
    }
    let tries = 8;
    (0..tries).filter(|_| big()).count() as f64 / tries as f64
}

struct Row {
    workload: &'static str,
    allocator: &'static str,
    value: f64,
    unit: &'static str,
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |workload, allocator, value, unit| {
        if !json {
            eprintln!("  {workload:<18} {allocator:<24} {value:>10.2} {unit}");
        }
        rows.push(Row {
            workload,
            allocator,
            value,
            unit,
        });
    };

    let objs = steady_trace(1, true);
    push(
        "kmalloc-steady",
        "memd",
        objects_steady(&mut Memd::new(""), &objs),
        "ns/op",
    );
    push(
        "kmalloc-steady",
        "buddy_system_allocator",
        objects_steady(&mut BsaHeap::new(), &objs),
        "ns/op",
    );
    push(
        "kmalloc-steady",
        "talc",
        objects_steady(&mut TalcAlloc::new(), &objs),
        "ns/op",
    );
    push(
        "kmalloc-steady",
        "rlsf",
        objects_steady(&mut RlsfAlloc::new(), &objs),
        "ns/op",
    );
    push(
        "kmalloc-steady",
        "system",
        objects_steady(&mut SystemAlloc, &objs),
        "ns/op",
    );

    push(
        "kmalloc-hot64",
        "memd",
        objects_hot64(&mut Memd::new("")),
        "ns/op",
    );
    push(
        "kmalloc-hot64",
        "buddy_system_allocator",
        objects_hot64(&mut BsaHeap::new()),
        "ns/op",
    );
    push(
        "kmalloc-hot64",
        "talc",
        objects_hot64(&mut TalcAlloc::new()),
        "ns/op",
    );
    push(
        "kmalloc-hot64",
        "rlsf",
        objects_hot64(&mut RlsfAlloc::new()),
        "ns/op",
    );
    push(
        "kmalloc-hot64",
        "system",
        objects_hot64(&mut SystemAlloc),
        "ns/op",
    );

    let pages = steady_trace(2, false);
    let frames = ARENA / 4096;
    push(
        "page0-steady",
        "memd",
        pages_steady(&mut Memd::new(""), &pages),
        "ns/op",
    );
    push(
        "page0-steady",
        "buddy_system_allocator",
        pages_steady(&mut BsaFrames::new(frames), &pages),
        "ns/op",
    );
    push(
        "page0-steady",
        "talc",
        pages_steady(&mut PagesVia(TalcAlloc::new()), &pages),
        "ns/op",
    );
    push(
        "page0-steady",
        "rlsf",
        pages_steady(&mut PagesVia(RlsfAlloc::new()), &pages),
        "ns/op",
    );
    push(
        "page0-steady",
        "system",
        pages_steady(&mut PagesVia(SystemAlloc), &pages),
        "ns/op",
    );

    // Hot pair with 10k pages live around it.
    let mut m = Memd::new("");
    let _keep: Vec<usize> = (0..LIVE).map(|_| m.alloc_page()).collect();
    push("page0-hot", "memd", pages_hot(&mut m), "ns/op");
    let mut b = BsaFrames::new(frames);
    let _keep: Vec<usize> = (0..LIVE).map(|_| b.alloc_page()).collect();
    push(
        "page0-hot",
        "buddy_system_allocator",
        pages_hot(&mut b),
        "ns/op",
    );
    let mut t = PagesVia(TalcAlloc::new());
    let _keep: Vec<usize> = (0..LIVE).map(|_| t.alloc_page()).collect();
    push("page0-hot", "talc", pages_hot(&mut t), "ns/op");
    let mut r = PagesVia(RlsfAlloc::new());
    let _keep: Vec<usize> = (0..LIVE).map(|_| r.alloc_page()).collect();
    push("page0-hot", "rlsf", pages_hot(&mut r), "ns/op");
    push(
        "page0-hot",
        "system",
        pages_hot(&mut PagesVia(SystemAlloc)),
        "ns/op",
    );

    // Hot pair on an empty allocator: the first request splits the largest
    // block all the way down, the free merges it back up.
    push(
        "page-empty-worst",
        "memd",
        pages_hot(&mut Memd::new("")),
        "ns/op",
    );
    push(
        "page-empty-worst",
        "buddy_system_allocator",
        pages_hot(&mut BsaFrames::new(frames)),
        "ns/op",
    );
    push(
        "page-empty-worst",
        "talc",
        pages_hot(&mut PagesVia(TalcAlloc::new())),
        "ns/op",
    );
    push(
        "page-empty-worst",
        "rlsf",
        pages_hot(&mut PagesVia(RlsfAlloc::new())),
        "ns/op",
    );
    push(
        "page-empty-worst",
        "system",
        pages_hot(&mut PagesVia(SystemAlloc)),
        "ns/op",
    );

    // Fragmentation. memd: 256 MiB of ordinary memory plus a 64 MiB
    // memd.dma_reserve; the 64 MiB requests are DMA allocations.
    {
        let mm = std::cell::RefCell::new(
            HostMm::boot(
                &[(MIB, MIB + (256 + 64 + 17) * MIB)],
                "memd.dma_reserve=64M",
            )
            .unwrap(),
        );
        let rate = frag_rate(
            &mut || {
                mm.borrow_mut()
                    .alloc_pages(0, Gfp::ATOMIC)
                    .ok()
                    .map(|p| p as usize)
            },
            &mut |p| mm.borrow_mut().free_pages(p as u64, 0).unwrap(),
            &mut || {
                let mut mm = mm.borrow_mut();
                match mm.dma_alloc(64 << 20, 4096, DmaMask::Bits64) {
                    Ok(b) => mm.dma_free(&b).is_ok(),
                    Err(_) => false,
                }
            },
        );
        push("frag-64M", "memd", rate, "success_rate");
    }
    {
        let fa = std::cell::RefCell::new(FrameAllocator::<32>::new());
        fa.borrow_mut().add_frame(0, (256 << 20) / 4096);
        let rate = frag_rate(
            &mut || fa.borrow_mut().alloc(1),
            &mut |p| fa.borrow_mut().dealloc(p, 1),
            &mut || match fa.borrow_mut().alloc((64 << 20) / 4096) {
                Some(f) => {
                    fa.borrow_mut().dealloc(f, (64 << 20) / 4096);
                    true
                }
                None => false,
            },
        );
        push("frag-64M", "buddy_system_allocator", rate, "success_rate");
    }
    fn frag_objects<A: Objects + TryAlloc>(a: A) -> f64 {
        let a = std::cell::RefCell::new(a);
        let big = Layout::from_size_align(64 << 20, 4096).unwrap();
        let mut fill = || {
            // The object allocators get a 512 MiB arena; stop at 256 MiB as
            // the others do (frag_rate caps the count).
            let p = a.borrow_mut().alloc_try(PAGE);
            (!p.is_null()).then_some(p as usize)
        };
        frag_rate(
            &mut fill,
            &mut |p| a.borrow_mut().free(p as *mut u8, PAGE),
            &mut || {
                let mut a = a.borrow_mut();
                let p = a.alloc_try(big);
                if p.is_null() {
                    false
                } else {
                    a.free(p, big);
                    true
                }
            },
        )
    }
    push(
        "frag-64M",
        "talc",
        frag_objects(TalcSmall::new()),
        "success_rate",
    );
    push(
        "frag-64M",
        "rlsf",
        frag_objects(RlsfSmall::new()),
        "success_rate",
    );

    push(
        "frame-metadata",
        "memd",
        FRAME_DESCRIPTOR_BYTES as f64,
        "bytes_per_frame",
    );

    if json {
        let body: Vec<String> = rows
            .iter()
            .map(|r| {
                let key = match r.unit {
                    "ns/op" => "ns_per_op",
                    "success_rate" => "success_rate",
                    _ => "bytes_per_frame",
                };
                format!(
                    "{{\"workload\": \"{}\", \"allocator\": \"{}\", \"{}\": {:.3}}}",
                    r.workload, r.allocator, key, r.value
                )
            })
            .collect();
        println!("[{}]", body.join(", "));
    }
}

/// Object allocators with a 256 MiB arena for the fragmentation run, and a
/// non-panicking allocation for the big request.
trait TryAlloc {
    fn alloc_try(&mut self, layout: Layout) -> *mut u8;
}

struct TalcSmall(Talc<ErrOnOom>);
impl TalcSmall {
    fn new() -> Self {
        let mut t = Talc::new(ErrOnOom);
        let bytes = (256 << 20) + 4096;
        let arena = host_arena(bytes);
        let base = arena.as_mut_ptr() as *mut u8;
        // SAFETY: the arena is ours and leaked.
        unsafe { t.claim((base..base.wrapping_add(bytes)).into()).unwrap() };
        TalcSmall(t)
    }
}
impl Objects for TalcSmall {
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        self.alloc_try(layout)
    }
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: from `alloc` with this layout.
        unsafe { self.0.free(NonNull::new(ptr).unwrap(), layout) }
    }
}
impl TryAlloc for TalcSmall {
    fn alloc_try(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: non-zero layout.
        unsafe {
            self.0
                .malloc(layout)
                .map_or(std::ptr::null_mut(), |p| p.as_ptr())
        }
    }
}

struct RlsfSmall(Tlsf<'static, u32, u32, 30, 32>);
impl RlsfSmall {
    fn new() -> Self {
        let mut t = Tlsf::new();
        t.insert_free_block(host_arena((256 << 20) + 4096));
        RlsfSmall(t)
    }
}
impl Objects for RlsfSmall {
    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        self.alloc_try(layout)
    }
    fn free(&mut self, ptr: *mut u8, layout: Layout) {
        // SAFETY: from `alloc` with this alignment.
        unsafe {
            self.0
                .deallocate(NonNull::new(ptr).unwrap(), layout.align())
        }
    }
}
impl TryAlloc for RlsfSmall {
    fn alloc_try(&mut self, layout: Layout) -> *mut u8 {
        self.0
            .allocate(layout)
            .map_or(std::ptr::null_mut(), |p| p.as_ptr())
    }
}
