//! Long operations, run a slice at a time.
//!
//! Filling, checksumming, copying or moving a DMA buffer to and from the
//! disk, and a stress run, take as long as their size makes them: a 4 MiB
//! buffer is milliseconds of guest time under TCG. Each runs here as
//! [`Work`], in slices of a few tens of microseconds, until the turn's
//! [`Budget`] is spent; what is left waits for the connection's next turn,
//! like a long loop in Linux that calls `cond_resched()`. The buffer being
//! worked on is leased meanwhile: freeing it gets EBUSY until the work
//! ends (see `Service::leased`).

use alloc::format;
use alloc::vec::Vec;

use alloc::boxed::Box;
use memd_wire::{errno, Batch, Checksum, DiskTransfer, DmaBufferInfo, Op, Reply, WireError};

use super::map::MapWork;
use super::{err, mem_err, Service};
use crate::env::{Env, Transfer, SECTOR};
use crate::memory::Memory;
use crate::stress;
use crate::ConnId;

/// Bytes of a DMA buffer filled or copied per slice.
const COPY_SLICE: usize = 32 << 10;
/// Bytes checksummed per slice (a byte-at-a-time hash, the slowest walk).
const CHECKSUM_SLICE: usize = 16 << 10;
/// Bytes zeroed per slice, and the largest DMA buffer zeroed at once when
/// it is allocated.
const ZERO_SLICE: usize = 64 << 10;

/// Default [`super::Config::budget_ns`]: the most guest time one
/// connection's turn takes before its work waits for the next pass.
pub const DEFAULT_BUDGET_NS: u64 = 200_000;

/// Long work's share of a turn while other clients are being served:
/// a quarter, so a client that only asks for heavy work takes a fifth of
/// the loop from those that do not.
pub const WORK_SHARE: u64 = 4;
/// Other clients count as being served if one's request ran this recently.
pub const CONTENDED_NS: u64 = 2_000_000;

/// The time a turn may take: `budget_ns` in all, of which long work
/// (and background frees) may take `work_ns`.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    start: u64,
    deadline: u64,
    work_deadline: u64,
}

impl Budget {
    /// A budget of `ns` from `start`, `work_ns` of it for long work.
    pub fn new(start: u64, ns: u64, work_ns: u64) -> Budget {
        Budget {
            start,
            deadline: start.saturating_add(ns),
            work_deadline: start.saturating_add(work_ns.min(ns)),
        }
    }

    /// When the turn began.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Whether the turn is over.
    pub fn spent<E: Env>(&self, env: &mut E) -> bool {
        env.now_ns() >= self.deadline
    }

    /// Whether long work has had its share of the turn.
    pub fn work_spent<E: Env>(&self, env: &mut E) -> bool {
        env.now_ns() >= self.work_deadline
    }
}

/// Whether `op` runs as [`Work`], in slices.
pub(super) fn is_long(op: &Op) -> bool {
    matches!(op, Op::DmaAlloc { len, .. } if *len > ZERO_SLICE as u64)
        || matches!(
            op,
            Op::MemMap
                | Op::DmaFill { .. }
                | Op::DmaChecksum { .. }
                | Op::DmaWrite { .. }
                | Op::DmaRead { .. }
                | Op::DmaWriteDisk { .. }
                | Op::DmaReadDisk { .. }
                | Op::Stress { .. }
        )
}

/// A long operation in progress.
pub(super) enum Work {
    Dma(DmaWork),
    Stress(stress::Run),
    Map(Box<MapWork>),
}

/// A disk request a departed connection left in flight: bytes
/// `[from, to)` of its DMA buffer `handle` are the device's.
pub(super) struct InFlight {
    pub handle: u64,
    pub from: usize,
    pub to: usize,
}

/// Work on one DMA buffer: bytes `[pos, end)` are left.
pub(super) struct DmaWork {
    pub handle: u64,
    start: usize,
    pos: usize,
    end: usize,
    kind: DmaKind,
}

enum DmaKind {
    /// A new buffer, zeroed before its handle is given out.
    Zero(Box<DmaBufferInfo>),
    Fill {
        seed: u64,
    },
    Checksum(Checksum),
    Write(Vec<u8>),
    Read(Vec<u8>),
    Disk(Disk),
}

struct Disk {
    write: bool,
    sector: u64,
    moved: Transfer,
    /// When the first request started, and the time to the last one's
    /// completion.
    first_start: Option<u64>,
    device_ns: u64,
    /// The end of the request the device holds, if one is in flight.
    in_flight: Option<usize>,
}

impl Work {
    /// The DMA buffer this work leases, if any.
    pub(super) fn leases(&self) -> Option<u64> {
        match self {
            Work::Dma(w) => Some(w.handle),
            Work::Stress(_) | Work::Map(_) => None,
        }
    }

    /// What the work is, and how far it got, for messages.
    pub(super) fn describe(&self) -> alloc::string::String {
        match self {
            Work::Dma(w) => format!(
                "a {} ({} of {} bytes done)",
                w.kind.name(),
                w.pos - w.start,
                w.end - w.start
            ),
            Work::Stress(r) => format!("a stress run ({} ops left)", r.left()),
            Work::Map(m) => format!(
                "a memory map ({} of {} frames walked)",
                m.walked(),
                m.frames()
            ),
        }
    }

    /// Gives back what the work holds of its own, for a connection that
    /// left before it ended (a stress run's allocations). A disk request
    /// in flight is returned: its buffer is the device's until it
    /// completes.
    pub(super) fn abandon<E: Env>(mut self, env: &mut E) -> Option<InFlight> {
        match &mut self {
            Work::Stress(r) => {
                r.release(env);
                None
            }
            Work::Dma(w) => match &w.kind {
                DmaKind::Disk(Disk {
                    in_flight: Some(to),
                    ..
                }) => Some(InFlight {
                    handle: w.handle,
                    from: w.pos,
                    to: *to,
                }),
                _ => None,
            },
            Work::Map(_) => None,
        }
    }
}

impl DmaKind {
    fn name(&self) -> &'static str {
        match self {
            DmaKind::Zero(_) => "zeroing",
            DmaKind::Fill { .. } => "fill",
            DmaKind::Checksum(_) => "checksum",
            DmaKind::Write(_) => "write",
            DmaKind::Read(_) => "read",
            DmaKind::Disk(d) if d.write => "disk write",
            DmaKind::Disk(_) => "disk read",
        }
    }

    fn slice(&self) -> usize {
        match self {
            DmaKind::Checksum(_) => CHECKSUM_SLICE,
            DmaKind::Disk(_) => usize::MAX,
            DmaKind::Zero(_) => ZERO_SLICE,
            _ => COPY_SLICE,
        }
    }
}

/// What moving a slice to or from the disk ran into.
enum DiskError {
    NoDevice,
    Io(&'static str),
    Mem(crate::memory::MemError),
}

impl<M: Memory> Service<M> {
    /// Checks `op` (one [`is_long`] says yes to) and sets up its work;
    /// reads count against `io_budget`, the reply frame's room.
    pub(super) fn start_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
        io_budget: &mut usize,
    ) -> Result<Work, WireError> {
        let dma = |handle, start, end, kind| {
            Ok(Work::Dma(DmaWork {
                handle,
                start,
                pos: start,
                end,
                kind,
            }))
        };
        match op {
            Op::MemMap => self.start_map(env),
            Op::DmaAlloc { len, align, mask } => {
                let Reply::Dma(info) = self.dma_alloc(env, conn, len, align, mask, false)? else {
                    return Err(err(errno::EINVAL, "not a DMA buffer"));
                };
                let (buf, _) = self.dma(conn, info.handle)?;
                let span = env
                    .with_mem(|m, _| m.dma_span_bytes(buf).map(|b| b.len()))
                    .map_err(mem_err)?;
                dma(info.handle, 0, span, DmaKind::Zero(info))
            }
            Op::Stress { ops, seed } => {
                if ops > self.config.max_stress_ops {
                    return Err(err(
                        errno::E2BIG,
                        format!(
                            "at most {} stress ops per request",
                            self.config.max_stress_ops
                        ),
                    ));
                }
                Ok(Work::Stress(stress::Run::new(ops, seed)))
            }
            Op::DmaFill { handle, seed } => {
                let (_, len) = self.dma(conn, handle)?;
                dma(handle, 0, len as usize, DmaKind::Fill { seed })
            }
            Op::DmaChecksum {
                handle,
                offset,
                len,
            } => {
                let (_, total) = self.dma(conn, handle)?;
                let len = if len == 0 {
                    total.saturating_sub(offset)
                } else {
                    len
                };
                let start = range(offset, len, total)?;
                dma(
                    handle,
                    start,
                    start + len as usize,
                    DmaKind::Checksum(Checksum::new()),
                )
            }
            Op::DmaWrite {
                handle,
                offset,
                data,
            } => {
                let (_, total) = self.dma(conn, handle)?;
                let start = range(offset, data.len() as u64, total)?;
                dma(handle, start, start + data.len(), DmaKind::Write(data))
            }
            Op::DmaRead {
                handle,
                offset,
                len,
            } => {
                let len = len as usize;
                if len > *io_budget {
                    return Err(err(
                        errno::E2BIG,
                        format!(
                            "read of {len} bytes exceeds the {} left in this reply",
                            *io_budget
                        ),
                    ));
                }
                let (_, total) = self.dma(conn, handle)?;
                let start = range(offset, len as u64, total)?;
                let mut data = Vec::new();
                data.try_reserve_exact(len).map_err(|_| {
                    err(
                        errno::ENOMEM,
                        format!("no memory for a read of {len} bytes"),
                    )
                })?;
                *io_budget -= len;
                dma(handle, start, start + len, DmaKind::Read(data))
            }
            Op::DmaWriteDisk { handle, sector } | Op::DmaReadDisk { handle, sector } => {
                let write = matches!(op, Op::DmaWriteDisk { .. });
                let (_, len) = self.dma(conn, handle)?;
                if len % SECTOR != 0 {
                    return Err(err(
                        errno::EINVAL,
                        format!("buffer of {len} bytes is not a whole number of sectors"),
                    ));
                }
                let cap = env.with_mem(|_, b| b.map(|b| b.capacity_sectors()));
                let Some(cap) = cap else {
                    return Err(err(errno::ENODEV, "no block device attached"));
                };
                if sector.checked_add(len / SECTOR).is_none_or(|e| e > cap) {
                    return Err(err(
                        errno::EINVAL,
                        format!(
                            "sectors {sector}+{} past the end of the disk ({cap} sectors)",
                            len / SECTOR
                        ),
                    ));
                }
                let disk = Disk {
                    write,
                    sector,
                    moved: Transfer::default(),
                    first_start: None,
                    device_ns: 0,
                    in_flight: None,
                };
                dma(handle, 0, len as usize, DmaKind::Disk(disk))
            }
            _ => Err(err(errno::EINVAL, "not a long operation")),
        }
    }

    /// Refuses a batch that asks for more work than one request may
    /// ([`super::Config::max_request_work`]), before any of it runs.
    pub(super) fn check_batch_work(&self, conn: ConnId, batch: &Batch) -> Result<(), WireError> {
        let cap = self.config.max_request_work;
        let mut total: u64 = 0;
        for op in &batch.ops {
            total = total.saturating_add(self.work_of(conn, op));
            if total > cap {
                return Err(err(
                    errno::E2BIG,
                    format!(
                        "batch asks for more than {cap} units of work (a stress op is one, a DMA buffer one per 64 bytes)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The work `op` asks for, in [`super::Config::max_request_work`]'s units.
    fn work_of(&self, conn: ConnId, op: &Op) -> u64 {
        let buffer = |h: u64| self.dma(conn, h).map_or(1, |(_, len)| len.div_ceil(64));
        match *op {
            Op::Stress { ops, .. } => ops,
            Op::DmaFill { handle, .. }
            | Op::DmaWriteDisk { handle, .. }
            | Op::DmaReadDisk { handle, .. } => buffer(handle),
            Op::DmaChecksum { handle, len: 0, .. } => buffer(handle),
            Op::DmaChecksum { len, .. } => len.div_ceil(64),
            Op::DmaRead { len, .. } => u64::from(len).div_ceil(64),
            Op::DmaWrite { ref data, .. } => (data.len() as u64).div_ceil(64),
            _ => 1,
        }
    }

    /// Runs slices of `work` until it ends (its result) or `budget` is
    /// spent (None: call again on a later turn).
    pub(super) fn run_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        work: &mut Work,
        budget: &Budget,
    ) -> Option<Result<Reply, WireError>> {
        loop {
            let done = match work {
                Work::Stress(run) => run.step(env, conn),
                Work::Map(map) => self.map_slice(env, map),
                Work::Dma(w) => match self.dma_slice(env, conn, w) {
                    Ok(Slice::Done) => true,
                    Ok(Slice::Moved) => false,
                    Ok(Slice::Waiting) => return None,
                    Err(e) => {
                        if let DmaKind::Disk(d) = &w.kind {
                            if d.in_flight.is_some() {
                                // The device still holds the buffer: the
                                // error waits for it (a lookup cannot fail
                                // while the lease holds the handle).
                                return None;
                            }
                        }
                        return Some(Err(e));
                    }
                },
            };
            if done {
                return Some(self.finish_work(env, work));
            }
            if budget.work_spent(env) {
                return None;
            }
        }
    }

    /// The reply of work that has run to its end.
    fn finish_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        work: &mut Work,
    ) -> Result<Reply, WireError> {
        Ok(match work {
            Work::Map(map) => return self.finish_map(map),
            Work::Stress(run) => Reply::Stress(run.finish(env)),
            Work::Dma(w) => match &mut w.kind {
                DmaKind::Zero(info) => Reply::Dma(info.clone()),
                DmaKind::Fill { .. } | DmaKind::Write(_) => Reply::Done,
                DmaKind::Checksum(sum) => Reply::Checksum(sum.value()),
                DmaKind::Read(data) => Reply::Data(core::mem::take(data)),
                DmaKind::Disk(d) => Reply::Transfer(DiskTransfer {
                    bytes: (w.end - w.start) as u64,
                    sector: d.sector,
                    requests: d.moved.requests,
                    descriptors: d.moved.descriptors,
                    data_descriptors: d.moved.data_descriptors,
                    device_ns: d.device_ns,
                }),
            },
        })
    }

    /// One slice of `w`.
    fn dma_slice<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        w: &mut DmaWork,
    ) -> Result<Slice, WireError> {
        let (buf, _) = self.dma(conn, w.handle)?;
        let (from, base, end) = (w.pos, w.start, w.end);
        let to = end.min(from.saturating_add(w.kind.slice()));
        let now = env.now_ns();
        if let DmaKind::Disk(d) = &mut w.kind {
            d.first_start.get_or_insert(now);
        }
        // No formatting or heap work inside: it runs under the allocator's
        // lock.
        let r = env.with_mem(|m, block| {
            let bytes = match w.kind {
                DmaKind::Zero(_) => m.dma_span_bytes(buf),
                _ => m.dma_bytes(buf),
            }
            .map_err(DiskError::Mem)?;
            let span = &mut bytes[from..to];
            match &mut w.kind {
                DmaKind::Zero(_) => span.fill(0),
                DmaKind::Fill { seed } => memd_wire::fill_pattern(*seed, from as u64, span),
                DmaKind::Checksum(sum) => sum.update(span),
                DmaKind::Write(data) => span.copy_from_slice(&data[from - base..to - base]),
                DmaKind::Read(data) => data.extend_from_slice(span),
                DmaKind::Disk(d) => {
                    let block = block.ok_or(DiskError::NoDevice)?;
                    return disk_step(d, block, bytes, from, end);
                }
            }
            Ok(Some(to))
        });
        match r {
            Ok(Some(to)) => {
                w.pos = to;
                if let (DmaKind::Disk(d), true) = (&mut w.kind, to == end) {
                    let started = d.first_start.unwrap_or(now);
                    d.device_ns = env.now_ns().saturating_sub(started);
                }
                Ok(if to == end { Slice::Done } else { Slice::Moved })
            }
            Ok(None) => Ok(Slice::Waiting),
            Err(DiskError::NoDevice) => Err(err(errno::ENODEV, "no block device attached")),
            Err(DiskError::Io(e)) => Err(err(errno::EIO, e)),
            Err(DiskError::Mem(e)) => Err(mem_err(e)),
        }
    }
}

/// How far a slice got.
enum Slice {
    Moved,
    /// Waiting for the device: nothing more to do this turn.
    Waiting,
    Done,
}

/// Moves a disk transfer on: starts the next request of `bytes[from..end]`
/// (as much as the device takes at once) if none is in flight, and sees
/// whether the one in flight has completed. Some(position) once it has.
fn disk_step(
    d: &mut Disk,
    block: &mut dyn crate::env::BlockDevice,
    bytes: &mut [u8],
    from: usize,
    end: usize,
) -> Result<Option<usize>, DiskError> {
    let to = match d.in_flight {
        Some(to) => to,
        None => {
            let to = end.min(from + block.max_request().max(SECTOR as usize));
            let sector = d.sector + (from as u64) / SECTOR;
            if !block
                .start(d.write, sector, &mut bytes[from..to])
                .map_err(DiskError::Io)?
            {
                // Another connection's request is in flight.
                return Ok(None);
            }
            d.in_flight = Some(to);
            to
        }
    };
    let Some(t) = block.poll(&mut bytes[from..to]) else {
        return Ok(None);
    };
    d.in_flight = None;
    let t = t.map_err(DiskError::Io)?;
    d.moved.requests += t.requests;
    d.moved.descriptors += t.descriptors;
    d.moved.data_descriptors += t.data_descriptors;
    Ok(Some(to))
}

/// Checks `[offset, offset+len)` lies within `total`; returns `offset` as usize.
pub(super) fn range(offset: u64, len: u64, total: u64) -> Result<usize, WireError> {
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(offset as usize),
        _ => Err(err(
            errno::EINVAL,
            format!("range {offset}+{len} outside the buffer of {total} bytes"),
        )),
    }
}
