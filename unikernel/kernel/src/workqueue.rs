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
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;

use crate::arch::percpu::MAX_CPUS;
use crate::arch::{apic, smpboot, time};

/// A job: runs once, on the CPU it was queued on.
pub type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    job: Mutex<Option<Job>>,
    /// Taken and not yet finished (set under `job`'s lock).
    running: AtomicBool,
    /// Time spent on jobs: read and written whole, under its own lock.
    time: Mutex<JobTime>,
}

#[derive(Clone, Copy)]
struct JobTime {
    /// Jobs that ended.
    ended_ns: u64,
    /// When the running job started, if one runs.
    started_ns: Option<u64>,
}

static WORKERS: [Worker; MAX_CPUS] = [const {
    Worker {
        job: Mutex::new(None),
        running: AtomicBool::new(false),
        time: Mutex::new(JobTime {
            ended_ns: 0,
            started_ns: None,
        }),
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
    WORKERS.get(cpu).is_some_and(|w| {
        let slot = w.job.lock();
        slot.is_some() || w.running.load(Ordering::Acquire)
    })
}

/// Time CPU `cpu` has spent running jobs, the running one's so far
/// included.
pub fn busy_ns(cpu: usize) -> u64 {
    let Some(w) = WORKERS.get(cpu) else {
        return 0;
    };
    let t = *w.time.lock();
    t.ended_ns
        + t.started_ns
            .map_or(0, |s| time::uptime_ns().saturating_sub(s))
}

/// CPU `cpu`'s worker loop (what `smpboot` runs on each CPU it starts).
/// When a job ends, CPU 0 is woken: the network loop may be halted,
/// waiting for it.
pub fn worker(cpu: usize) -> ! {
    let w = &WORKERS[cpu];
    loop {
        let job = {
            let mut slot = w.job.lock();
            let job = slot.take();
            if job.is_some() {
                w.time.lock().started_ns = Some(time::uptime_ns());
                w.running.store(true, Ordering::Release);
            }
            job
        };
        match job {
            Some(job) => {
                job();
                {
                    let mut t = w.time.lock();
                    let started = t.started_ns.take().unwrap_or(0);
                    t.ended_ns += time::uptime_ns().saturating_sub(started);
                }
                w.running.store(false, Ordering::Release);
                if let Some((loop_cpu, _)) = smpboot::cpu(0) {
                    apic::send_wakeup(loop_cpu);
                }
            }
            None => apic::wait_for_wakeup(),
        }
    }
}
