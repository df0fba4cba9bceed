//! What a handle holds, what it charges against the quota, and the
//! lookups of a connection's handles.

use alloc::boxed::Box;
use alloc::format;

use memd_wire::{errno, DmaBufferInfo, WireError};

use super::{err, ConnId, Service};
use crate::handles::HandleTable;
use crate::memory::{Memory, Obj};

/// A resource a connection holds under a handle.
pub(super) enum Res<M: Memory> {
    Pages {
        phys: u64,
        order: u8,
    },
    Kmalloc(Obj),
    Cache {
        id: M::CacheId,
        size: u64,
        objects: u64,
        pools: u64,
    },
    CacheObj {
        cache: u64,
        /// The cache's id, so a departing connection's objects can be
        /// freed in any order.
        id: M::CacheId,
        obj: Obj,
    },
    Pool {
        id: M::PoolId,
        cache: Option<u64>,
        elem: u64,
        objects: u64,
        reserve: u64,
    },
    PoolObj {
        pool: u64,
        /// The pool's id, as for a cache object.
        id: M::PoolId,
        obj: Obj,
    },
    Dma {
        buf: M::DmaBuf,
        /// Boxed: inline it would triple every handle's size (and the
        /// copies into and out of the handle table).
        info: Box<DmaBufferInfo>,
    },
}

impl<M: Memory> Res<M> {
    /// (pages, bytes) this resource counts against the quota.
    pub(super) fn charge(&self, page: u64) -> (u64, u64) {
        match self {
            Res::Pages { order, .. } => (1 << order, page << order),
            Res::Kmalloc(o) | Res::CacheObj { obj: o, .. } | Res::PoolObj { obj: o, .. } => {
                (0, o.size)
            }
            Res::Cache { .. } => (0, 0),
            Res::Pool { reserve, .. } => (0, *reserve),
            Res::Dma { info, .. } => (info.len.div_ceil(page), info.len),
        }
    }

    /// (caches, pools) this resource takes of the shared tables.
    pub(super) fn tables(&self) -> (u64, u64) {
        match self {
            Res::Cache { .. } => (1, 0),
            Res::Pool { .. } => (0, 1),
            _ => (0, 0),
        }
    }

    /// What it is, for messages.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Res::Pages { .. } => "pages",
            Res::Kmalloc(_) => "kmalloc object",
            Res::Cache { .. } => "cache",
            Res::CacheObj { .. } => "cache object",
            Res::Pool { .. } => "mempool",
            Res::PoolObj { .. } => "mempool element",
            Res::Dma { .. } => "DMA buffer",
        }
    }
}

impl<M: Memory> Service<M> {
    /// Files `res` under a new handle of `conn`. Callers checked the quota
    /// first, and the quota is at most what a table holds.
    pub(super) fn insert(&mut self, conn: ConnId, res: Res<M>, page: u64) -> u64 {
        match self.conns.get_mut(&conn) {
            Some(c) => c
                .file(res, page, HandleTable::insert)
                .unwrap_or_else(|| unreachable!("check_quota keeps tables below MAX_HANDLES")),
            None => 0,
        }
    }

    /// Takes `h`'s resource out of `conn`'s table and uncharges it.
    pub(super) fn remove(&mut self, conn: ConnId, h: u64, page: u64) -> Option<Res<M>> {
        self.conns.get_mut(&conn)?.unfile(h, page)
    }

    /// `h`'s resource, or ENOENT.
    pub(super) fn get(&self, conn: ConnId, h: u64) -> Result<&Res<M>, WireError> {
        self.conns
            .get(&conn)
            .and_then(|c| c.handles.get(h))
            .ok_or_else(|| no_handle(h))
    }

    /// `h`'s resource, to change its counts.
    pub(super) fn get_mut(&mut self, conn: ConnId, h: u64) -> Option<&mut Res<M>> {
        self.conns.get_mut(&conn)?.handles.get_mut(h)
    }
}

pub(super) fn no_handle(h: u64) -> WireError {
    err(errno::ENOENT, format!("no handle {h} on this connection"))
}

pub(super) fn wrong_kind(h: u64, want: &str, got: &str) -> WireError {
    err(
        errno::EINVAL,
        format!("handle {h} is a {got}, not a {want}"),
    )
}
