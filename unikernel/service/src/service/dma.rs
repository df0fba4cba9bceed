//! DMA buffers for clients: allocation from the buddy or the contiguous
//! reservation under a device's address mask, and the data operations on
//! them (write, read, fill, checksum, and transfers to and from the disk).
//!
//! A refusal says why in terms of the reservation and the mask, since "no
//! memory" alone does not tell a kernel engineer which limit they hit.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use memd_wire::{
    errno, DmaBufferInfo, DmaMask, DmaOwner, DmaSource, Reply, WireError, DMA_LIST_PAGE,
};

use super::{err, mem_err, no_handle, stats, wrong_kind, Res, Service};
use crate::env::{Env, SECTOR};
use crate::memory::{MemError, Memory, View};
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// One page of the DMA listing: the devices' buffers, then every
    /// connection's, from position `start`.
    pub(super) fn dma_list<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        start: u64,
    ) -> Result<Reply, WireError> {
        let page = memd_mm::PAGE_SIZE;
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        let devices = env.device_dma();
        let clients = self
            .conns
            .values()
            .flat_map(|c| c.handles.values())
            .filter_map(|r| match r {
                Res::Dma { info, .. } => Some(info),
                _ => None,
            });
        let mut list = Vec::new();
        list.try_reserve_exact(DMA_LIST_PAGE)
            .map_err(|_| err(errno::ENOMEM, "no memory to list the DMA buffers"))?;
        let device_infos = devices.into_iter().map(|d| DmaBufferInfo {
            handle: 0,
            conn: 0,
            phys: d.phys,
            len: d.len,
            align: page,
            mask: DmaMask::Bits64,
            source: if d.cma {
                DmaSource::Cma
            } else {
                DmaSource::Buddy
            },
            zone: memd_mm::ZoneType::of_pfn(d.phys / page).name().into(),
            owner: DmaOwner::DeviceQueue { device: d.owner },
        });
        list.extend(
            device_infos
                .chain(clients.map(|i| DmaBufferInfo::clone(i)))
                .skip(start)
                .take(DMA_LIST_PAGE),
        );
        Ok(Reply::DmaBuffers(list))
    }

    pub(super) fn dma_alloc<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        len: u64,
        align: u64,
        mask: DmaMask,
        page: u64,
    ) -> Result<Reply, WireError> {
        if len == 0 {
            return Err(err(errno::EINVAL, "zero-length DMA buffer"));
        }
        if align != 0 && !align.is_power_of_two() {
            return Err(err(
                errno::EINVAL,
                format!("alignment {align} is not a power of two"),
            ));
        }
        let max_block = page << env.with_mem(|m, _| m.max_order()).saturating_sub(1);
        // A request the reservation can never serve is refused with
        // the reason, before the quota or the allocator see it.
        if len > max_block {
            if let Some(why) = dma_refusal(&cma_info(env), len, mask, max_block) {
                return Err(err(errno::ENOMEM, why));
            }
        }
        self.check_quota(conn, len.div_ceil(page), len)?;
        let buf = env
            .with_mem(|m, _| {
                m.set_owner(conn);
                m.dma_alloc(len, align, mask)
            })
            .map_err(|e| {
                if e.code != errno::ENOMEM {
                    return mem_err(e);
                }
                let why = if len > max_block {
                    let c = cma_info(env);
                    format!(
                        "no free {} contiguous below the {}-bit mask: the DMA reservation's largest free range is {}",
                        size(len),
                        mask.bits(),
                        size(c.largest_free)
                    )
                } else {
                    format!(
                        "no free {} block below the {}-bit mask ({:#x}) in the buddy, and the DMA reservation cannot serve it",
                        size(len.next_power_of_two().max(page)),
                        mask.bits(),
                        mask_limit(mask)
                    )
                };
                err(errno::ENOMEM, why)
            })?;
        let facts = env.with_mem(|m, _| m.dma_facts(&buf));
        let mut info = DmaBufferInfo {
            // Known once filed, below.
            handle: 0,
            conn,
            phys: facts.phys,
            len: facts.len,
            align: if align == 0 { page } else { align },
            mask,
            source: facts.source,
            zone: memd_mm::ZoneType::of_pfn(facts.phys / page).name().into(),
            owner: memd_wire::DmaOwner::Client {
                name: self
                    .conns
                    .get(&conn)
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
            },
        };
        let res: Res<M> = Res::Dma {
            buf,
            info: Box::new(info.clone()),
        };
        info.handle = self.insert(conn, res, page);
        if let Some(Res::Dma { info: filed, .. }) = self.get_mut(conn, info.handle) {
            filed.handle = info.handle;
        }
        Ok(Reply::Dma(Box::new(info)))
    }

    pub(super) fn dma_free<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        match self.get(conn, handle)? {
            Res::Dma { .. } => {
                let Some(Res::Dma { buf, .. }) = self.remove(conn, handle, page) else {
                    return Err(no_handle(handle));
                };
                env.with_mem(|m, _| m.dma_free(buf)).map_err(mem_err)?;
                Ok(Reply::Done)
            }
            r => Err(wrong_kind(handle, "DMA buffer", r.kind())),
        }
    }

    pub(super) fn dma_write<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Reply, WireError> {
        let (buf, buf_len) = self.dma(conn, handle)?;
        let start = range(offset, data.len() as u64, buf_len)?;
        env.with_mem(|m, _| {
            m.dma_bytes(buf)
                .map(|b| b[start..start + data.len()].copy_from_slice(data))
        })
        .map_err(mem_err)?;
        Ok(Reply::Done)
    }

    /// Reads into the reply, within what `io_budget` leaves of its frame.
    pub(super) fn dma_read<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        offset: u64,
        len: u32,
        io_budget: &mut usize,
    ) -> Result<Reply, WireError> {
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
        let (buf, buf_len) = self.dma(conn, handle)?;
        let start = range(offset, len as u64, buf_len)?;
        let mut data = Vec::new();
        data.try_reserve_exact(len).map_err(|_| {
            err(
                errno::ENOMEM,
                format!("no memory for a read of {len} bytes"),
            )
        })?;
        data.resize(len, 0);
        env.with_mem(|m, _| {
            m.dma_bytes(buf)
                .map(|b| data.copy_from_slice(&b[start..start + len]))
        })
        .map_err(mem_err)?;
        *io_budget -= len;
        Ok(Reply::Data(data))
    }

    pub(super) fn dma_fill<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        seed: u64,
    ) -> Result<Reply, WireError> {
        let (buf, _) = self.dma(conn, handle)?;
        env.with_mem(|m, _| {
            m.dma_bytes(buf)
                .map(|b| memd_wire::fill_pattern(seed, 0, b))
        })
        .map_err(mem_err)?;
        Ok(Reply::Done)
    }

    /// The checksum of `len` bytes at `offset` (0: to the end).
    pub(super) fn dma_checksum<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        offset: u64,
        len: u64,
    ) -> Result<Reply, WireError> {
        let (buf, buf_len) = self.dma(conn, handle)?;
        let total = buf_len;
        let len = if len == 0 {
            total.saturating_sub(offset)
        } else {
            len
        };
        let start = range(offset, len, total)?;
        let sum = env
            .with_mem(|m, _| {
                m.dma_bytes(buf)
                    .map(|b| memd_wire::checksum(&b[start..start + len as usize]))
            })
            .map_err(mem_err)?;
        Ok(Reply::Checksum(sum))
    }

    /// Moves the whole buffer to (`write`) or from the disk at `sector`.
    pub(super) fn dma_disk<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        sector: u64,
        write: bool,
    ) -> Result<Reply, WireError> {
        let (buf, buf_len) = self.dma(conn, handle)?;
        let len = buf_len;
        if len % SECTOR != 0 {
            return Err(err(
                errno::EINVAL,
                format!("buffer of {len} bytes is not a whole number of sectors"),
            ));
        }
        // No formatting inside: the closure runs under the allocator lock.
        let started = env.now_ns();
        let r = env.with_mem(|m, block| {
            let Some(block) = block else {
                return Err(DiskError::NoDevice);
            };
            let cap = block.capacity_sectors();
            if sector.checked_add(len / SECTOR).is_none_or(|e| e > cap) {
                return Err(DiskError::PastEnd(cap));
            }
            let bytes = m.dma_bytes(buf).map_err(DiskError::Mem)?;
            let r = if write {
                block.write(sector, bytes)
            } else {
                block.read(sector, bytes)
            };
            r.map_err(DiskError::Io)
        });
        let device_ns = env.now_ns().saturating_sub(started);
        match r {
            Ok(t) => Ok(Reply::Transfer(memd_wire::DiskTransfer {
                bytes: len,
                sector,
                requests: t.requests,
                descriptors: t.descriptors,
                data_descriptors: t.data_descriptors,
                device_ns,
            })),
            Err(DiskError::NoDevice) => Err(err(errno::ENODEV, "no block device attached")),
            Err(DiskError::PastEnd(cap)) => Err(err(
                errno::EINVAL,
                format!(
                    "sectors {sector}+{} past the end of the disk ({cap} sectors)",
                    len / SECTOR
                ),
            )),
            Err(DiskError::Io(e)) => Err(err(errno::EIO, e)),
            Err(DiskError::Mem(e)) => Err(mem_err(e)),
        }
    }

    fn dma(&self, conn: ConnId, h: u64) -> Result<(&M::DmaBuf, u64), WireError> {
        match self.get(conn, h)? {
            Res::Dma { buf, info } => Ok((buf, info.len)),
            r => Err(wrong_kind(h, "DMA buffer", r.kind())),
        }
    }
}

fn cma_info<E: Env>(env: &mut E) -> memd_wire::CmaInfo {
    match stats(env, View::Cma) {
        Reply::Cma(c) => *c,
        _ => memd_wire::CmaInfo::default(),
    }
}

/// One past the highest address a device with `mask` reaches.
fn mask_limit(mask: DmaMask) -> u64 {
    match mask.bits() {
        24 => 1 << 24,
        32 => 1 << 32,
        _ => u64::MAX,
    }
}

/// Bytes as "N MiB" (or KiB, GiB, bytes) for messages.
fn size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} bytes")
    }
}

/// Why a DMA buffer larger than the buddy's largest block can never be
/// served from the reservation `cma`, if it cannot.
fn dma_refusal(
    cma: &memd_wire::CmaInfo,
    len: u64,
    mask: DmaMask,
    max_block: u64,
) -> Option<String> {
    if !cma.present {
        return Some(format!(
            "{} is larger than the buddy's largest block ({}) and no DMA region was reserved at boot (memd.dma_reserve=SIZE@ZONE)",
            size(len),
            size(max_block)
        ));
    }
    if len > cma.total {
        return Some(format!(
            "{} is larger than the DMA reservation ({} at {:#x}, memd.dma_reserve)",
            size(len),
            size(cma.total),
            cma.base
        ));
    }
    let limit = mask_limit(mask);
    if cma.base.saturating_add(len) > limit {
        return Some(format!(
            "the DMA reservation [{:#x}-{:#x}) does not reach below the {}-bit mask ({:#x}) far enough for {}",
            cma.base,
            cma.base + cma.total,
            mask.bits(),
            limit,
            size(len)
        ));
    }
    None
}

enum DiskError {
    NoDevice,
    PastEnd(u64),
    Io(&'static str),
    Mem(MemError),
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
