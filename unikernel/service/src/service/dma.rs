//! DMA buffers for clients: allocation from the buddy or the contiguous
//! reservation under a device's address mask, and freeing (refused while
//! a long operation leases the buffer). The data operations on them run
//! as `dma_work`, the listing is a view (`views`).
//!
//! A refusal says why in terms of the reservation and the mask, since "no
//! memory" alone does not tell a kernel engineer which limit they hit.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;

use memd_wire::{errno, DmaBufferInfo, DmaMask, Reply, WireError};

use super::res::{no_handle, wrong_kind, Res};
use super::views::stats;
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::{Memory, Placement, View};
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// A DMA buffer for `conn`, zeroed unless `zeroed` is false (the
    /// caller zeroes it, see `dma_work`).
    pub(super) fn dma_alloc<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        len: u64,
        align: u64,
        at: Placement,
        zeroed: bool,
    ) -> Result<Box<DmaBufferInfo>, WireError> {
        let mask = at.mask;
        let page = self.page_size(env);
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
            .dma_alloc(self.owner(conn), len, align, at, zeroed)
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
                        size(c.usage.largest_free)
                    )
                } else {
                    format!(
                        "no free {} block below the {}-bit mask ({:#x}) in the buddy, and the DMA reservation cannot serve it",
                        size(len.next_power_of_two().max(page)),
                        mask.bits(),
                        mask.limit()
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
        Ok(Box::new(info))
    }

    /// Frees the DMA buffer of `handle`.
    pub(super) fn dma_free<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        match self.get(conn, handle)? {
            Res::Dma { .. } => {
                if let Some(work) = self.leased(conn, handle) {
                    return Err(err(
                        errno::EBUSY,
                        format!(
                            "DMA buffer {handle} is in use by {work}: free it once that reply has come"
                        ),
                    ));
                }
                let Some(Res::Dma { buf, .. }) = self.remove(conn, handle, page) else {
                    return Err(no_handle(handle));
                };
                env.dma_free(buf).map_err(mem_err)?;
                Ok(Reply::Done)
            }
            r => Err(wrong_kind(handle, "DMA buffer", r.kind())),
        }
    }

    /// The DMA buffer of `h` and its length.
    pub(super) fn dma(&self, conn: ConnId, h: u64) -> Result<(&M::DmaBuf, u64), WireError> {
        match self.get(conn, h)? {
            Res::Dma { buf, info } => Ok((buf, info.len)),
            r => Err(wrong_kind(h, "DMA buffer", r.kind())),
        }
    }
}

fn cma_info<E: Env>(env: &mut E) -> memd_wire::CmaInfo {
    match stats(env, View::Cma) {
        Ok(Reply::Cma(c)) => *c,
        _ => memd_wire::CmaInfo::default(),
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
    let limit = mask.limit();
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
