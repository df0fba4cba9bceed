//! Work on a DMA buffer's bytes, a slice at a time: zeroing a new buffer,
//! filling, checksumming, copying in and out, and moving it to and from
//! the disk. The buffer is leased meanwhile: freeing it gets EBUSY until
//! the work ends (see `Service::leased`). Zeroing, filling and
//! checksumming a large buffer go whole to another CPU when there is one
//! free (`offload`).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use memd_wire::{errno, Checksum, DiskTransfer, DmaBufferInfo, Op, Reply, WireError};

use super::offload::{self, ByteWork, Pending, OFFLOAD_MIN};
use super::{err, mem_err, Service};
use crate::env::{BlockDevice, Env, Transfer, SECTOR};
use crate::memory::{MemError, Memory};
use crate::ConnId;

/// Bytes of a DMA buffer filled or copied per slice.
const COPY_SLICE: usize = 32 << 10;
/// Bytes checksummed per slice (a byte-at-a-time hash, the slowest walk).
const CHECKSUM_SLICE: usize = 16 << 10;
/// Bytes zeroed per slice, and the largest DMA buffer zeroed at once when
/// it is allocated.
pub(super) const ZERO_SLICE: usize = 64 << 10;

/// Work on one DMA buffer: bytes `[pos, end)` are left.
pub(super) struct DmaWork {
    pub(super) handle: u64,
    start: usize,
    pos: usize,
    end: usize,
    kind: DmaKind,
    /// The work, whole, on another CPU.
    pending: Option<Pending>,
}

/// What the work does to the buffer.
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

/// A transfer between the buffer and the disk.
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

impl DmaWork {
    /// What the work is, and how far it got, for messages.
    pub(super) fn describe(&self) -> String {
        match self.pending {
            Some(_) => format!(
                "a {} of {} bytes on another CPU",
                self.kind.name(),
                self.end - self.start
            ),
            None => format!(
                "a {} ({} of {} bytes done)",
                self.kind.name(),
                self.pos - self.start,
                self.end - self.start
            ),
        }
    }

    /// The job on another CPU that holds the buffer's bytes, if any.
    pub(super) fn take_pending(&mut self) -> Option<Pending> {
        self.pending.take()
    }

    /// What of the work can go whole to another CPU.
    fn byte_work(&self) -> Option<ByteWork> {
        match self.kind {
            DmaKind::Zero(_) => Some(ByteWork::Zero),
            DmaKind::Fill { seed } => Some(ByteWork::Fill { seed }),
            DmaKind::Checksum(sum) => Some(ByteWork::Checksum(sum)),
            _ => None,
        }
    }

    /// The bytes `[from, to)` the device holds, if a disk request is in
    /// flight.
    pub(super) fn in_flight(&self) -> Option<(usize, usize)> {
        match &self.kind {
            DmaKind::Disk(Disk {
                in_flight: Some(to),
                ..
            }) => Some((self.pos, *to)),
            _ => None,
        }
    }

    /// The reply of work that has run to its end.
    pub(super) fn finish(&mut self) -> Reply {
        match &mut self.kind {
            DmaKind::Zero(info) => Reply::Dma(info.clone()),
            DmaKind::Fill { .. } | DmaKind::Write(_) => Reply::Done,
            DmaKind::Checksum(sum) => Reply::Checksum(sum.value()),
            DmaKind::Read(data) => Reply::Data(core::mem::take(data)),
            DmaKind::Disk(d) => Reply::Transfer(DiskTransfer {
                bytes: (self.end - self.start) as u64,
                sector: d.sector,
                requests: d.moved.requests,
                descriptors: d.moved.descriptors,
                data_descriptors: d.moved.data_descriptors,
                device_ns: d.device_ns,
            }),
        }
    }
}

impl DmaKind {
    /// What it is, for messages.
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

    /// Bytes per slice.
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
    Mem(MemError),
}

/// How far a slice got.
pub(super) enum Slice {
    Moved,
    /// Waiting for the device: nothing more to do this turn.
    Waiting,
    Done,
}

impl<M: Memory> Service<M> {
    /// Checks `op`, a long operation on a DMA buffer, and sets up its
    /// work; reads count against `io_budget`, the reply frame's room.
    pub(super) fn start_dma_work<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        op: Op,
        io_budget: &mut usize,
    ) -> Result<DmaWork, WireError> {
        let dma = |handle, start, end, kind| {
            Ok(DmaWork {
                handle,
                start,
                pos: start,
                end,
                kind,
                pending: None,
            })
        };
        match op {
            Op::DmaAlloc {
                len,
                align,
                mask,
                movable,
            } => {
                let at = crate::memory::Placement { mask, movable };
                let info = self.dma_alloc(env, conn, len, align, at, false)?;
                let (buf, _) = self.dma(conn, info.handle)?;
                let span = env.with_mem(|m, _| m.dma_span_bytes(buf).map(|b| b.len()));
                match span {
                    Ok(span) => dma(info.handle, 0, span, DmaKind::Zero(info)),
                    // Never given out unzeroed: the buffer goes back at once.
                    Err(e) => {
                        let page = self.page_size(env);
                        let _ = self.dma_free(env, conn, info.handle, page);
                        Err(mem_err(e))
                    }
                }
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

    /// One slice of `w`.
    pub(super) fn dma_slice<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        w: &mut DmaWork,
    ) -> Result<Slice, WireError> {
        let (buf, _) = self.dma(conn, w.handle)?;
        if let Some(pending) = &w.pending {
            let Some((bytes, sum)) = offload::finished::<M>(pending) else {
                return Ok(Slice::Waiting);
            };
            env.with_mem(|m, _| m.dma_unlend(bytes));
            w.pending = None;
            if let (DmaKind::Checksum(c), Some(sum)) = (&mut w.kind, sum) {
                *c = sum;
            }
            w.pos = w.end;
            return Ok(Slice::Done);
        }
        if w.pos == w.start && w.end - w.start >= OFFLOAD_MIN {
            if let Some(work) = w.byte_work() {
                let span = matches!(w.kind, DmaKind::Zero(_));
                w.pending = offload::start(env, buf, span, w.pos, w.end, work);
                if w.pending.is_some() {
                    return Ok(Slice::Waiting);
                }
            }
        }
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

/// Moves a disk transfer on: starts the next request of `bytes[from..end]`
/// (as much as the device takes at once) if none is in flight, and sees
/// whether the one in flight has completed. Some(position) once it has.
fn disk_step(
    d: &mut Disk,
    block: &mut dyn BlockDevice,
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
fn range(offset: u64, len: u64, total: u64) -> Result<usize, WireError> {
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(offset as usize),
        _ => Err(err(
            errno::EINVAL,
            format!("range {offset}+{len} outside the buffer of {total} bytes"),
        )),
    }
}
