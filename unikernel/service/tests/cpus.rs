//! Work on several CPUs, host threads standing in for the CPUs that take
//! jobs: a stress run over memd-mm's per-CPU caches (each thread with a
//! CPU slot of its own, `HostGlobal`'s), and DMA buffers zeroed, filled
//! and checksummed whole by a job. Once the work is over, or cut short and
//! its jobs ended, the invariants hold and free memory is back to the
//! byte.

mod common;

use std::sync::Mutex;
use std::thread::JoinHandle;

use common::{Backend, Harness, RamDisk};
use memd_mm::{DmaBuffer, HostGlobal, MemoryManager};
use memd_service::{BlockDevice, Config, Env, Job, MemError, PerCpuMemory, Placement};
use memd_wire::*;

/// The manager the runs use (not this program's allocator).
static MEMD: HostGlobal = HostGlobal::new(64 << 20);

/// CPUs besides the test's own thread.
const WORKERS: usize = 3;

/// The jobs handed out, by CPU.
static JOBS: Mutex<Vec<Option<JoinHandle<()>>>> = Mutex::new(Vec::new());
/// Jobs handed out in all.
static JOBS_RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits for every job handed out so far.
fn join_jobs() {
    let handles: Vec<_> = JOBS
        .lock()
        .unwrap()
        .iter_mut()
        .filter_map(Option::take)
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// The environment: the manager under `MEMD`'s lock, its per-CPU caches,
/// and a thread per job.
struct CpusEnv;

impl Env for CpusEnv {
    type Mem = MemoryManager;

    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        f(&mut mm(), None)
    }

    fn now_ns(&mut self) -> u64 {
        common::clock()
    }

    fn dma_alloc(
        &mut self,
        owner: u64,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<DmaBuffer, MemError> {
        PerCpuMemory::dma_alloc(MEMD.global_mm().unwrap(), owner, len, align, at, zeroed)
    }

    fn dma_free(&mut self, buf: DmaBuffer) -> Result<(), MemError> {
        PerCpuMemory::dma_free(MEMD.global_mm().unwrap(), &buf)
    }

    fn percpu(&mut self) -> Option<&'static dyn PerCpuMemory> {
        Some(MEMD.global_mm().unwrap())
    }

    fn work_cpus(&mut self) -> usize {
        WORKERS
    }

    fn cpu_pagesets(&mut self) -> Vec<[u64; memd_mm::NR_ZONES]> {
        MEMD.global_mm().unwrap().cpu_pagesets().collect()
    }

    fn cpu_stats(&mut self) -> Vec<memd_mm::stats::CpuStats> {
        MEMD.global_mm().unwrap().cpu_stats().collect()
    }

    fn queue_on(&mut self, cpu: usize, job: Job) -> Result<(), Job> {
        let mut jobs = JOBS.lock().unwrap();
        jobs.resize_with(WORKERS + 1, || None);
        if jobs[cpu].as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(job);
        }
        if let Some(h) = jobs[cpu].take() {
            h.join().unwrap();
        }
        jobs[cpu] = Some(std::thread::spawn(job));
        JOBS_RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

struct Cpus;

impl Backend for Cpus {
    type Mem = MemoryManager;
    type Env<'a> = CpusEnv;
    fn env<'a>(&'a mut self, _: Option<&'a mut RamDisk>) -> CpusEnv {
        CpusEnv
    }
}

/// The manager, its arena had on first use.
fn mm() -> memd_mm::MmGuard<'static> {
    MEMD.global_mm().expect("the arena").lock()
}

/// Free memory once the manager has given back what it caches.
fn free() -> u64 {
    let mut mm = mm();
    mm.reclaim();
    mm.meminfo().free
}

/// Frames the zoneinfo view shows in the CPUs' pagesets, all zones.
fn pageset_frames(t: &mut Harness<Cpus>, conn: memd_service::ConnId) -> u64 {
    match t.ok(conn, Op::Zoneinfo) {
        Reply::Zoneinfo(zones) => zones
            .iter()
            .flat_map(|z| &z.cpu_pagesets)
            .map(|p| p.count)
            .sum(),
        r => panic!("{r:?}"),
    }
}

/// The slabinfo view's `cpustat` summed over the caches that have one,
/// checking that exactly the kmalloc caches do.
fn cpustat(t: &mut Harness<Cpus>, conn: memd_service::ConnId) -> memd_wire::CpuStat {
    let Reply::Slabinfo(caches) = t.ok(conn, Op::Slabinfo { start: 0 }) else {
        panic!("slabinfo");
    };
    let mut sum = memd_wire::CpuStat::default();
    for c in &caches {
        assert_eq!(
            c.cpustat.is_some(),
            c.name.starts_with("kmalloc-"),
            "{}: per-CPU arrays are in front of the kmalloc caches only",
            c.name
        );
        sum += c.cpustat.unwrap_or_default();
    }
    sum
}

/// One test at a time: they share `MEMD` and compare free memory.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A service whose connections get one slice of long work a turn.
fn one_slice_a_turn() -> Harness<Cpus> {
    let mut config = Config::new(common::TOKEN);
    config.budget_ns = 1;
    Harness::with_config(Cpus, config)
}

fn operator(t: &mut Harness<Cpus>) -> memd_service::ConnId {
    t.login()
}

#[test]
fn a_run_on_several_cpus_gives_everything_back() {
    let _one = one_at_a_time();
    let mut t = Harness::new(Cpus);
    let c = operator(&mut t);
    let before = free();
    let stat = cpustat(&mut t, c);
    const OPS: u64 = 200_000;
    match t.ok(
        c,
        Op::Stress {
            ops: OPS,
            seed: 3,
            cpus: WORKERS as u32 + 1,
        },
    ) {
        Reply::Stress(r) => {
            assert!(r.check_ok, "{r:?}");
            assert_eq!(r.cpus, WORKERS as u32 + 1);
            assert_eq!(r.cpu_ops.len(), WORKERS + 1);
            assert_eq!(r.cpu_ops.iter().sum::<u64>(), OPS, "{r:?}");
        }
        r => panic!("{r:?}"),
    }
    join_jobs();
    assert_eq!(free(), before, "free memory is back once the run is over");
    assert!(mm().check().is_ok());
    let after = cpustat(&mut t, c);
    assert!(
        after.allochit > stat.allochit && after.freehit > stat.freehit,
        "the CPUs' arrays served the run's kmallocs: {stat:?} then {after:?}"
    );
    assert!(
        after.allocmiss > stat.allocmiss && after.freemiss > stat.freemiss,
        "and refilled and flushed in batches"
    );
}

#[test]
fn more_cpus_than_there_are_is_refused() {
    let _one = one_at_a_time();
    let mut t = Harness::new(Cpus);
    let c = operator(&mut t);
    let stress = |cpus| Op::Stress {
        ops: 1000,
        seed: 1,
        cpus,
    };
    assert_eq!(t.code(c, stress(WORKERS as u32 + 2)), errno::EINVAL);
    assert_eq!(t.code(c, stress(u32::MAX)), errno::EINVAL);
    assert!(matches!(t.ok(c, stress(0)), Reply::Stress(r) if r.cpus == 1 && r.check_ok));
}

#[test]
fn a_run_cut_short_gives_everything_back_once_its_jobs_end() {
    let _one = one_at_a_time();
    // One slice a turn: the run is still going when its client leaves.
    let mut t = one_slice_a_turn();
    let c = operator(&mut t);
    let before = free();
    let frame = to_frame(&Request::Call(Op::Stress {
        ops: 50_000_000,
        seed: 9,
        cpus: WORKERS as u32 + 1,
    }))
    .unwrap();
    let mut out = Vec::new();
    let mut env = CpusEnv;
    let (taken, _) = t
        .svc
        .on_bytes_bounded(&mut env, c, &frame, &mut out, usize::MAX);
    assert_eq!(taken, frame.len());
    assert!(t.svc.has_work(c), "the run is still going");
    let watcher = t.login();
    assert!(
        pageset_frames(&mut t, watcher) > 0,
        "zoneinfo shows the frames the CPUs' page lists hold"
    );
    t.svc.on_close_now(&mut env, c);
    join_jobs();
    assert_eq!(
        free(),
        before,
        "free memory is back once the jobs have ended"
    );
    assert_eq!(
        pageset_frames(&mut t, watcher),
        0,
        "every CPU's lists emptied"
    );
    assert!(mm().check().is_ok());
}

/// The checksum memd-wire computes over `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.value()
}

/// Jobs handed out so far.
fn jobs_run() -> u64 {
    JOBS_RUN.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn large_buffers_are_zeroed_filled_and_checksummed_by_jobs() {
    let _one = one_at_a_time();
    let mut t = Harness::new(Cpus);
    let c = t.login();
    let before = free();
    let jobs = jobs_run();
    const LEN: usize = 1 << 20;
    let h = t.dma_alloc(c, LEN as u64, 4096, DmaMask::Bits64);
    let owners: Vec<_> = mm().owners().collect();
    assert!(
        owners
            .iter()
            .any(|&(o, pages)| o != memd_mm::Owner::KERNEL && pages == (LEN / 4096) as u64),
        "the buffer, taken under the zone's lock, is charged to the client: {owners:?}"
    );
    assert!(
        jobs_run() > jobs,
        "zeroing a 1 MiB buffer went to another CPU"
    );
    let zeros = checksum(&vec![0; LEN]);
    assert_eq!(t.dma_checksum(c, h, 0, 0), Reply::Checksum(zeros), "zeroed");
    assert!(matches!(t.dma_fill(c, h, 42), Reply::Done));
    let mut want = vec![0; LEN];
    fill_pattern(42, 0, &mut want);
    let sum = checksum(&want);
    assert_eq!(t.dma_checksum(c, h, 0, 0), Reply::Checksum(sum), "filled");
    assert_eq!(
        t.dma_checksum(c, h, 4096, 8192),
        Reply::Checksum(checksum(&want[4096..4096 + 8192])),
        "a small range, checksummed here"
    );
    assert!(
        jobs_run() >= jobs + 4,
        "zero, fill and two checksums: {}",
        jobs_run() - jobs
    );
    t.ok(c, Op::DmaFree { handle: h });
    join_jobs();
    assert_eq!(free(), before, "free memory is back");
    assert!(mm().check().is_ok());
}

#[test]
fn a_buffer_left_with_a_job_is_freed_once_the_job_ends() {
    let _one = one_at_a_time();
    let mut t = one_slice_a_turn();
    let c = t.login();
    let before = free();
    let h = t.dma_alloc(c, 16 << 20, 4096, DmaMask::Bits64);
    let frame = to_frame(&Request::Call(Op::DmaFill { handle: h, seed: 5 })).unwrap();
    let mut out = Vec::new();
    let mut env = CpusEnv;
    let jobs = jobs_run();
    t.svc
        .on_bytes_bounded(&mut env, c, &frame, &mut out, usize::MAX);
    assert!(t.svc.has_work(c), "the fill is on another CPU");
    assert_eq!(jobs_run(), jobs + 1);
    t.svc.on_close_now(&mut env, c);
    join_jobs();
    assert_eq!(free(), before, "the buffer is freed once its job is done");
    assert!(mm().check().is_ok());
}
