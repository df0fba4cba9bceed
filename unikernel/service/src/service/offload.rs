//! Byte work on another CPU: zeroing, filling or checksumming a DMA
//! buffer whole, as a job ([`Env::queue_on`]), instead of a slice per turn
//! on the network loop's CPU.
//!
//! The buffer's bytes are lent out ([`Memory::dma_lend`]) and put in an
//! [`Offload`] before the job is queued; the job takes them, does the
//! work, and puts them back with its result. The loop looks at each turn
//! and takes them back ([`Memory::dma_unlend`]) once they are there. When
//! no CPU takes the job, the loop takes the bytes straight back and works
//! in slices as before.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::any::Any;

use memd_wire::Checksum;
use spin::Mutex;

use crate::env::Env;
use crate::memory::Memory;

/// Buffers at least this long go to another CPU when one is free.
pub(super) const OFFLOAD_MIN: usize = 256 << 10;

/// What a job does to its bytes.
#[derive(Clone, Copy)]
pub(super) enum ByteWork {
    Zero,
    Fill { seed: u64 },
    Checksum(Checksum),
}

enum State<L> {
    /// Lent and waiting for the job, which works on bytes `[from, to)`.
    Queued {
        bytes: L,
        from: usize,
        to: usize,
        work: ByteWork,
    },
    /// The job has them.
    Running,
    /// Back, with the checksum if it made one.
    Done(L, Option<Checksum>),
    /// Taken back.
    Returned,
}

/// Lent bytes on their way to another CPU and back.
pub(super) struct Offload<L> {
    state: Mutex<State<L>>,
}

/// An offload, its bytes' type erased (the work that holds it is not
/// generic over the memory manager).
pub(super) type Pending = Arc<dyn Any + Send + Sync>;

impl<L: core::ops::DerefMut<Target = [u8]> + Send + 'static> Offload<L> {
    fn run(&self) {
        let (mut bytes, from, to, work) = {
            let mut state = self.state.lock();
            match core::mem::replace(&mut *state, State::Running) {
                State::Queued {
                    bytes,
                    from,
                    to,
                    work,
                } => (bytes, from, to, work),
                other => {
                    *state = other;
                    return;
                }
            }
        };
        let span = &mut bytes[from..to];
        let sum = match work {
            ByteWork::Zero => {
                span.fill(0);
                None
            }
            ByteWork::Fill { seed } => {
                memd_wire::fill_pattern(seed, from as u64, span);
                None
            }
            ByteWork::Checksum(mut sum) => {
                sum.update(span);
                Some(sum)
            }
        };
        *self.state.lock() = State::Done(bytes, sum);
    }

    /// The bytes and the checksum once the job is done; `None` before.
    /// Takes nothing from the heap.
    fn take_done(&self) -> Option<(L, Option<Checksum>)> {
        let mut state = self.state.lock();
        match core::mem::replace(&mut *state, State::Returned) {
            State::Done(bytes, sum) => Some((bytes, sum)),
            other => {
                *state = other;
                None
            }
        }
    }

    /// The bytes of a job no CPU took.
    fn take_queued(&self) -> Option<L> {
        let mut state = self.state.lock();
        match core::mem::replace(&mut *state, State::Returned) {
            State::Queued { bytes, .. } => Some(bytes),
            other => {
                *state = other;
                None
            }
        }
    }
}

/// Lends `buf`'s bytes and queues `work` on bytes `[from, to)` of them on
/// the first CPU that takes it; `None` (the bytes taken back) when the
/// bytes cannot be lent or every CPU is busy.
pub(super) fn start<E: Env>(
    env: &mut E,
    buf: &<E::Mem as Memory>::DmaBuf,
    span: bool,
    from: usize,
    to: usize,
    work: ByteWork,
) -> Option<Pending> {
    let cpus = env.work_cpus();
    if cpus == 0 {
        return None;
    }
    let bytes = env.with_mem(|m, _| m.dma_lend(buf, span)).ok()?;
    let off = Arc::new(Offload {
        state: Mutex::new(State::Queued {
            bytes,
            from,
            to,
            work,
        }),
    });
    for cpu in 1..=cpus {
        let job = Arc::clone(&off);
        if env.queue_on(cpu, Box::new(move || job.run())).is_ok() {
            return Some(off);
        }
    }
    if let Some(bytes) = off.take_queued() {
        env.with_mem(|m, _| m.dma_unlend(bytes));
    }
    None
}

/// The bytes of `pending` and the job's checksum once it is done; `None`
/// while it runs.
pub(super) fn finished<M: Memory>(pending: &Pending) -> Option<(M::Lent, Option<Checksum>)> {
    pending
        .downcast_ref::<Offload<M::Lent>>()
        .and_then(Offload::take_done)
}
