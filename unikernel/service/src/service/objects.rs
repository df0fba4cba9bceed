//! Objects of slab caches and mempools: handles of their own that
//! remember their parent, so a parent cannot go while it has objects out
//! and a client sees `EBUSY` with the count rather than memd-mm's leak
//! report.

use alloc::format;

use memd_wire::{errno, Gfp, Reply, WireError};

use super::res::{wrong_kind, Res};
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::{MemError, Memory, Obj};
use crate::ConnId;

/// A handle kind that hands out child objects: a slab cache (children
/// are `Res::CacheObj`) or a mempool (children are `Res::PoolObj`).
#[derive(Clone, Copy)]
pub(super) enum Parent {
    Cache,
    Pool,
}

/// A parent's id in the memory manager.
enum ParentId<M: Memory> {
    Cache(M::CacheId),
    Pool(M::PoolId),
}

impl<M: Memory> Clone for ParentId<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M: Memory> Copy for ParentId<M> {}

impl<M: Memory> ParentId<M> {
    /// Runs inside [`Env::with_mem`]: must not allocate.
    fn alloc(self, m: &mut M, gfp: Gfp) -> Result<Obj, MemError> {
        match self {
            ParentId::Cache(id) => m.cache_alloc(id, gfp),
            ParentId::Pool(id) => m.pool_alloc(id, gfp),
        }
    }

    /// Runs inside [`Env::with_mem`]: must not allocate.
    fn free(self, m: &mut M, addr: u64) -> Result<(), MemError> {
        match self {
            ParentId::Cache(id) => m.cache_free(id, addr),
            ParentId::Pool(id) => m.pool_free(id, addr),
        }
    }
}

impl Parent {
    /// The parent's kind, as [`Res::kind`] names it.
    fn name(self) -> &'static str {
        match self {
            Parent::Cache => "cache",
            Parent::Pool => "mempool",
        }
    }

    /// The child's kind, as [`Res::kind`] names it.
    fn child_name(self) -> &'static str {
        match self {
            Parent::Cache => "cache object",
            Parent::Pool => "mempool element",
        }
    }

    /// The id and per-object size of `res`, if it is a parent of this kind.
    fn id_size<M: Memory>(self, res: &Res<M>) -> Option<(ParentId<M>, u64)> {
        match (self, res) {
            (Parent::Cache, Res::Cache { id, size, .. }) => Some((ParentId::Cache(*id), *size)),
            (Parent::Pool, Res::Pool { id, elem, .. }) => Some((ParentId::Pool(*id), *elem)),
            _ => None,
        }
    }

    /// The count of children out, if `res` is a parent of this kind.
    fn objects<M: Memory>(self, res: &mut Res<M>) -> Option<&mut u64> {
        match (self, res) {
            (Parent::Cache, Res::Cache { objects, .. })
            | (Parent::Pool, Res::Pool { objects, .. }) => Some(objects),
            _ => None,
        }
    }

    /// A child of handle `parent`, whose id is `id`.
    fn child<M: Memory>(parent: u64, id: ParentId<M>, obj: Obj) -> Res<M> {
        match id {
            ParentId::Cache(id) => Res::CacheObj {
                cache: parent,
                id,
                obj,
            },
            ParentId::Pool(id) => Res::PoolObj {
                pool: parent,
                id,
                obj,
            },
        }
    }

    /// The parent handle and object of `res`, if it is a child of this kind.
    fn child_of<M: Memory>(self, res: &Res<M>) -> Option<(u64, Obj)> {
        match (self, res) {
            (Parent::Cache, Res::CacheObj { cache: p, obj, .. })
            | (Parent::Pool, Res::PoolObj { pool: p, obj, .. }) => Some((*p, *obj)),
            _ => None,
        }
    }

    /// `object` is a child of `actual`, not of `parent`.
    fn not_its_child(self, object: u64, actual: u64, parent: u64) -> WireError {
        let msg = match self {
            Parent::Cache => format!("object {object} belongs to cache {actual}, not {parent}"),
            Parent::Pool => format!("element {object} belongs to pool {actual}, not {parent}"),
        };
        err(errno::EINVAL, msg)
    }
}

impl<M: Memory> Service<M> {
    /// Allocates one object from the cache or mempool `parent` names
    /// (`Op::CacheAlloc`, `Op::PoolAlloc`).
    pub(super) fn alloc_child<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        kind: Parent,
        parent: u64,
        gfp: Gfp,
        page: u64,
    ) -> Result<Reply, WireError> {
        let r = self.get(conn, parent)?;
        let (id, size) = match kind.id_size(r) {
            Some(v) => v,
            None => return Err(wrong_kind(parent, kind.name(), r.kind())),
        };
        self.check_quota(conn, 0, size)?;
        let obj = env
            .with_mem_as(self.owner(conn), |m, _| id.alloc(m, gfp))
            .map_err(mem_err)?;
        if let Some(objects) = self.get_mut(conn, parent).and_then(|r| kind.objects(r)) {
            *objects += 1;
        }
        let handle = self.insert(conn, Parent::child(parent, id, obj), page);
        Ok(Reply::Object {
            handle,
            addr: obj.addr,
            size: obj.size,
        })
    }

    /// Frees `object` back to the cache or mempool `parent` names
    /// (`Op::CacheFree`, `Op::PoolFree`).
    pub(super) fn free_child<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        kind: Parent,
        parent: u64,
        object: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        let r = self.get(conn, parent)?;
        let id = match kind.id_size(r) {
            Some((id, _)) => id,
            None => return Err(wrong_kind(parent, kind.name(), r.kind())),
        };
        let r = self.get(conn, object)?;
        let addr = match kind.child_of(r) {
            Some((p, obj)) if p == parent => obj.addr,
            Some((p, _)) => return Err(kind.not_its_child(object, p, parent)),
            None => return Err(wrong_kind(object, kind.child_name(), r.kind())),
        };
        env.with_mem(|m, _| id.free(m, addr)).map_err(mem_err)?;
        self.remove(conn, object, page);
        if let Some(objects) = self.get_mut(conn, parent).and_then(|r| kind.objects(r)) {
            *objects -= 1;
        }
        Ok(Reply::Done)
    }
}
