//! Work for the application processors (Linux's `queue_work_on` with one
//! bound worker per CPU): CPU 0 runs the network loop; another CPU runs a
//! job it is handed, whole, then halts until the next.
//!
//! Each CPU has a slot for one job. `queue_work_on` fills an empty slot of
//! an idle CPU and wakes it with an IPI; the CPU's worker loop takes the
//! job, runs it, and looks again. A CPU that finds its slot empty halts
//! with interrupts off but for the `hlt` itself, so a wake-up sent after
//! it looked is not lost: it ends the `hlt` at once.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Mutex;

use crate::arch::percpu::MAX_CPUS;
use crate::arch::{apic, smpboot, time};

/// A job: runs once, on the CPU it was queued on.
pub type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    job: Mutex<Option<Job>>,
    /// Taken and not yet finished.
    running: AtomicBool,
    /// Time spent running jobs that ended.
    busy_ns: AtomicU64,
    /// When the running job started.
    started_ns: AtomicU64,
}

static WORKERS: [Worker; MAX_CPUS] = [const {
    Worker {
        job: Mutex::new(None),
        running: AtomicBool::new(false),
        busy_ns: AtomicU64::new(0),
        started_ns: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Queues `job` on CPU `cpu` (not CPU 0, which runs the network loop) and
/// wakes it; gives `job` back when that CPU is not running or still has
/// a job queued or running.
pub fn queue_work_on(cpu: usize, job: Job) -> Result<(), Job> {
    let Some((apic_id, _)) = smpboot::cpu(cpu).filter(|_| cpu != 0) else {
        return Err(job);
    };
    let w = &WORKERS[cpu];
    {
        let mut slot = w.job.lock();
        if slot.is_some() || w.running.load(Ordering::Acquire) {
            return Err(job);
        }
        *slot = Some(job);
    }
    apic::send_wakeup(apic_id);
    Ok(())
}

/// Whether CPU `cpu` runs a job, or has one queued.
pub fn busy(cpu: usize) -> bool {
    WORKERS
        .get(cpu)
        .is_some_and(|w| w.running.load(Ordering::Acquire) || w.job.lock().is_some())
}

/// Time CPU `cpu` has spent running jobs, the running one's so far
/// included.
pub fn busy_ns(cpu: usize) -> u64 {
    let Some(w) = WORKERS.get(cpu) else {
        return 0;
    };
    let ended = w.busy_ns.load(Ordering::Acquire);
    if !w.running.load(Ordering::Acquire) {
        return ended;
    }
    let started = w.started_ns.load(Ordering::Relaxed);
    ended + time::uptime_ns().saturating_sub(started)
}

/// CPU `cpu`'s worker loop (what `smpboot` runs on each CPU it starts).
pub fn worker(cpu: usize) -> ! {
    let w = &WORKERS[cpu];
    loop {
        let job = {
            let mut slot = w.job.lock();
            let job = slot.take();
            if job.is_some() {
                w.started_ns.store(time::uptime_ns(), Ordering::Relaxed);
                w.running.store(true, Ordering::Release);
            }
            job
        };
        match job {
            Some(job) => {
                job();
                let ran = time::uptime_ns() - w.started_ns.load(Ordering::Relaxed);
                w.busy_ns.fetch_add(ran, Ordering::Release);
                w.running.store(false, Ordering::Release);
            }
            None => apic::wait_for_wakeup(),
        }
    }
}
