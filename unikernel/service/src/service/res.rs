//! What a handle holds and what it charges, what a connection holds
//! (its handles and their charges against its quota), and the lookups of
//! a connection's handles.

use alloc::boxed::Box;
use alloc::format;

use memd_wire::{errno, DmaBufferInfo, Quota, WireError};

use super::quota::Over;
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

/// What a connection holds: its handles, and the pages, bytes, slab caches
/// and mempools they charge against its quota.
pub(super) struct Holdings<M: Memory> {
    pub(super) handles: HandleTable<Res<M>>,
    pub(super) pages: u64,
    pub(super) bytes: u64,
    /// Slab caches held.
    pub(super) caches: u64,
    /// Mempools held.
    pub(super) pools: u64,
}

/// [`HandleTable::insert`] or [`HandleTable::insert_reserved`].
pub(super) type Inserter<M> = fn(&mut HandleTable<Res<M>>, Res<M>) -> Result<u64, Res<M>>;

impl<M: Memory> Holdings<M> {
    /// Nothing yet, for connection `id`.
    pub(super) fn new(id: ConnId) -> Self {
        Holdings {
            handles: HandleTable::new(id),
            pages: 0,
            bytes: 0,
            caches: 0,
            pools: 0,
        }
    }

    /// Files `res` under a new handle by `insert` (which may or may not
    /// grow the table) and charges it; None when the table is full.
    pub(super) fn file(&mut self, res: Res<M>, page: u64, insert: Inserter<M>) -> Option<u64> {
        let (pages, bytes) = res.charge(page);
        let (caches, pools) = res.tables();
        let handle = insert(&mut self.handles, res).ok()?;
        self.pages += pages;
        self.bytes += bytes;
        self.caches += caches;
        self.pools += pools;
        Some(handle)
    }

    /// Takes `handle`'s resource out and uncharges it.
    pub(super) fn unfile(&mut self, handle: u64, page: u64) -> Option<Res<M>> {
        let res = self.handles.remove(handle)?;
        let (pages, bytes) = res.charge(page);
        let (caches, pools) = res.tables();
        self.pages -= pages;
        self.bytes -= bytes;
        self.caches -= caches;
        self.pools -= pools;
        Some(res)
    }

    /// Which limit of `q` one more handle charging (pages, bytes) would
    /// pass, if any. Allocates nothing, so it may run under the memory
    /// manager's lock.
    pub(super) fn over_quota(&self, q: &Quota, pages: u64, bytes: u64) -> Option<Over> {
        if self.handles.len() as u64 >= q.handles {
            Some(Over::Handles)
        } else if self.pages.saturating_add(pages) > q.pages {
            Some(Over::Pages)
        } else if self.bytes.saturating_add(bytes) > q.bytes {
            Some(Over::Bytes)
        } else {
            None
        }
    }
}

impl<M: Memory> Service<M> {
    /// Every client's DMA buffers, connection by connection.
    pub(super) fn client_dma(&self) -> impl Iterator<Item = &DmaBufferInfo> {
        self.conns
            .values()
            .flat_map(|c| c.holdings.handles.values())
            .filter_map(|r| match r {
                Res::Dma { info, .. } => Some(&**info),
                _ => None,
            })
    }

    /// Files `res` under a new handle of `conn`. Callers checked the quota
    /// first, and the quota is at most what a table holds.
    pub(super) fn insert(&mut self, conn: ConnId, res: Res<M>, page: u64) -> u64 {
        match self.conns.get_mut(&conn) {
            Some(c) => c
                .holdings
                .file(res, page, HandleTable::insert)
                .unwrap_or_else(|| unreachable!("check_quota keeps tables below MAX_HANDLES")),
            None => 0,
        }
    }

    /// Takes `h`'s resource out of `conn`'s table and uncharges it.
    pub(super) fn remove(&mut self, conn: ConnId, h: u64, page: u64) -> Option<Res<M>> {
        self.conns.get_mut(&conn)?.holdings.unfile(h, page)
    }

    /// `h`'s resource, or ENOENT.
    pub(super) fn get(&self, conn: ConnId, h: u64) -> Result<&Res<M>, WireError> {
        self.conns
            .get(&conn)
            .and_then(|c| c.holdings.handles.get(h))
            .ok_or_else(|| no_handle(h))
    }

    /// `h`'s resource, to change its counts.
    pub(super) fn get_mut(&mut self, conn: ConnId, h: u64) -> Option<&mut Res<M>> {
        self.conns.get_mut(&conn)?.holdings.handles.get_mut(h)
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
