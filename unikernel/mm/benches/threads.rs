//! Allocation from several threads at once, through each allocator's
//! `GlobalAlloc`: `kmalloc-steady-mt` (each thread keeps 10k live objects
//! of 8 to 4096 bytes, about log-uniform, and replaces a random one per
//! step) and `page0-steady-mt` (the same with 4 KiB, 4 KiB-aligned
//! objects: memd-mm serves them from kmalloc-4096, not from its page
//! allocator as `compare`'s `page0-steady` does), with 1, 2, ... threads.
//! The figure is aggregate operations per second (an operation is one
//! allocation or one free, the random draws included) from the first
//! worker's start to the last one's end, the median of 3 rounds. memd-mm
//! through `HostGlobal` (per-CPU caches in front of its lock), glibc's malloc and
//! mimalloc, side by side in one process.
//!
//! `cargo xtask bench mm --threads 1,2 [--json]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Barrier;
use std::time::Instant;

use memd_mm::{HostGlobal, Prandom};

const LIVE: usize = 10_000;
const STEPS: usize = 2_000_000;
const ROUNDS: usize = 3;

static MEMD: HostGlobal = HostGlobal::new(2 << 30);
static MIMALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn layout(rng: &mut Prandom, pages: bool) -> Layout {
    if pages {
        return Layout::from_size_align(4096, 4096).expect("page layout");
    }
    // A power of two from 8 to 4096, plus up to as much again (cut at 4096).
    let bits = 3 + rng.below(10) as u32;
    let size = (1usize << bits) + rng.below(1 << bits) as usize;
    Layout::from_size_align(size.clamp(8, 4096), 8).expect("object layout")
}

/// A failed allocation ends the whole program: the other workers would
/// wait at a barrier forever.
fn check(p: *mut u8) -> *mut u8 {
    if p.is_null() {
        eprintln!("threads: an allocation failed");
        std::process::exit(1);
    }
    p
}

/// One thread's run: fill, wait for the others, then `STEPS` replacements;
/// when they began and ended.
fn worker(a: &dyn GlobalAlloc, seed: u64, pages: bool, start: &Barrier) -> (Instant, Instant) {
    let mut rng = Prandom::new(seed);
    let mut live: Vec<(*mut u8, Layout)> = (0..LIVE)
        .map(|_| {
            let l = layout(&mut rng, pages);
            // SAFETY: a non-zero-sized layout.
            (check(unsafe { a.alloc(l) }), l)
        })
        .collect();
    start.wait();
    let began = Instant::now();
    for _ in 0..STEPS {
        let i = rng.below(LIVE as u64) as usize;
        let (p, l) = live[i];
        // SAFETY: `p` came from `a.alloc(l)` and is freed once.
        unsafe { a.dealloc(p, l) };
        let l = layout(&mut rng, pages);
        // SAFETY: a non-zero-sized layout.
        live[i] = (check(unsafe { a.alloc(l) }), l);
    }
    let ended = Instant::now();
    for (p, l) in live {
        // SAFETY: as above.
        unsafe { a.dealloc(p, l) };
    }
    (began, ended)
}

/// Aggregate operations per second of `threads` threads on `a`, from the
/// first worker's start to the last one's end.
fn round(a: &'static (dyn GlobalAlloc + Sync), pages: bool, threads: usize) -> f64 {
    let start = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || worker(a, 0x5eed + t as u64, pages, start))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let began = spans.iter().map(|s| s.0).min().expect("a worker");
    let ended = spans.iter().map(|s| s.1).max().expect("a worker");
    (2 * STEPS * threads) as f64 / ended.duration_since(began).as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let threads: Vec<usize> = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let allocators: [(&str, &'static (dyn GlobalAlloc + Sync)); 3] =
        [("memd", &MEMD), ("glibc", &System), ("mimalloc", &MIMALLOC)];
    let mut rows = Vec::new();
    for (workload, pages) in [("kmalloc-steady-mt", false), ("page0-steady-mt", true)] {
        for (name, a) in allocators {
            for &n in &threads {
                let mut r: Vec<f64> = (0..ROUNDS).map(|_| round(a, pages, n)).collect();
                r.sort_by(f64::total_cmp);
                let median = r[ROUNDS / 2];
                if !json {
                    println!(
                        "  {workload:<18} {name:<10} {n} thread(s) {:>8.1} M ops/s",
                        median / 1e6
                    );
                }
                rows.push((workload, name, n, median));
            }
        }
    }
    if json {
        let rows: Vec<String> = rows
            .iter()
            .map(|(w, a, n, ops)| {
                format!(
                    "{{\"workload\":\"{w}\",\"allocator\":\"{a}\",\"threads\":{n},\"ops_per_sec\":{ops:.0}}}"
                )
            })
            .collect();
        println!("[{}]", rows.join(","));
        return;
    }
    for workload in ["kmalloc-steady-mt", "page0-steady-mt"] {
        for (name, _) in allocators {
            let at = |n: usize| {
                rows.iter()
                    .find(|r| r.0 == workload && r.1 == name && r.2 == n)
                    .map(|r| r.3)
            };
            if let (Some(one), Some(&last)) = (at(1), threads.iter().max()) {
                if let Some(many) = at(last) {
                    println!(
                        "  {workload:<18} {name:<10} {last} threads / 1: {:.2}x",
                        many / one
                    );
                }
            }
        }
    }
}
