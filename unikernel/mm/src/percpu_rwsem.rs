//! A reader-writer lock whose readers touch only their own CPU's count
//! (Linux's `percpu_rw_semaphore`): the node lock (`node.rs`).
//!
//! Its readers are the per-CPU caches' batches: frequent, short, on every
//! CPU at once. A reader-writer lock with one shared count would move that
//! count's cache line between the CPUs on every batch, which costs more
//! than the zone and cache locks the batches take after it. Here a reader
//! adds one to its CPU's count, on a cache line of its own, and then looks
//! at the writer's flag; a writer raises the flag, then waits for every
//! count to reach zero. Each side writes before it reads what the other
//! writes (sequentially consistent), so at least one sees the other: a
//! reader that sees the flag backs off and waits, which also keeps a
//! stream of readers from starving the writer.

use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

/// Counts: one per CPU slot below `READERS - 1`, and one that callers
/// without a slot (or with a higher one) share.
pub(crate) const READERS: usize = 17;

/// One count, on cache lines of its own.
#[repr(align(128))]
struct Count(AtomicUsize);

pub(crate) struct PercpuRwsem {
    writer: AtomicBool,
    readers: [Count; READERS],
}

/// A reader's hold; dropping it lets the lock go.
pub(crate) struct ReadGuard<'a>(&'a AtomicUsize);

/// The writer's hold; dropping it lets the lock go.
pub(crate) struct WriteGuard<'a>(&'a AtomicBool);

impl PercpuRwsem {
    pub(crate) const fn new() -> Self {
        PercpuRwsem {
            writer: AtomicBool::new(false),
            readers: [const { Count(AtomicUsize::new(0)) }; READERS],
        }
    }

    /// Takes the lock for reading, counted on CPU `cpu`'s count.
    #[inline]
    pub(crate) fn read(&self, cpu: Option<usize>) -> ReadGuard<'_> {
        let k = cpu.filter(|&k| k < READERS - 1).unwrap_or(READERS - 1);
        let count = &self.readers[k].0;
        loop {
            count.fetch_add(1, SeqCst);
            if !self.writer.load(SeqCst) {
                return ReadGuard(count);
            }
            count.fetch_sub(1, Release);
            while self.writer.load(Relaxed) {
                spin_loop();
            }
        }
    }

    /// Takes the lock for writing: no reader holds it once this returns.
    #[inline]
    pub(crate) fn write(&self) -> WriteGuard<'_> {
        while self
            .writer
            .compare_exchange_weak(false, true, SeqCst, Relaxed)
            .is_err()
        {
            spin_loop();
        }
        for r in &self.readers {
            while r.0.load(SeqCst) != 0 {
                spin_loop();
            }
        }
        WriteGuard(&self.writer)
    }
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.fetch_sub(1, Release);
    }
}

impl Drop for WriteGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Readers on several CPUs and a writer: a reader never sees the
    /// writer's half-done update, nor the writer a reader inside.
    #[test]
    fn readers_and_a_writer_exclude_each_other() {
        let lock = PercpuRwsem::new();
        // Written in two halves by the writer; equal whenever no writer
        // holds the lock.
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let inside = AtomicUsize::new(0);
        let start = std::sync::Barrier::new(5);
        std::thread::scope(|s| {
            for cpu in [Some(0), Some(1), None, Some(READERS + 3)] {
                let (lock, a, b, inside, start) = (&lock, &a, &b, &inside, &start);
                s.spawn(move || {
                    start.wait();
                    for _ in 0..20_000 {
                        let _r = lock.read(cpu);
                        inside.fetch_add(1, Relaxed);
                        let seen = a.load(Relaxed);
                        (0..20).for_each(|_| spin_loop());
                        assert_eq!(seen, b.load(Relaxed), "a half-done write");
                        inside.fetch_sub(1, Relaxed);
                    }
                });
            }
            s.spawn(|| {
                start.wait();
                for i in 1..=4_000 {
                    {
                        let _w = lock.write();
                        assert_eq!(inside.load(Relaxed), 0, "a reader inside");
                        a.store(i, Relaxed);
                        (0..300).for_each(|_| spin_loop());
                        assert_eq!(inside.load(Relaxed), 0, "a reader came in");
                        b.store(i, Relaxed);
                    }
                    // Room for the readers between writes.
                    (0..400).for_each(|_| spin_loop());
                }
            });
        });
        assert_eq!(a.load(Relaxed), 4_000);
        assert!(lock.readers.iter().all(|r| r.0.load(Relaxed) == 0));
    }
}
