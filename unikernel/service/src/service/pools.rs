//! Mempools for clients: a reserve of elements from a cache, kmalloc or
//! page blocks, created and destroyed (refused while elements are out).
//! Allocating and freeing its elements is `objects`'s.

use alloc::format;

use memd_wire::{errno, PoolBacking, Reply, WireError};

use super::res::{wrong_kind, Res};
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::{Backing, Memory};
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// A mempool of `min_nr` elements' reserve for `conn`.
    pub(super) fn pool_create<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        backing: PoolBacking,
        min_nr: u32,
        page: u64,
    ) -> Result<Reply, WireError> {
        let (backing, cache, elem) = match backing {
            PoolBacking::Cache(h) => match self.get(conn, h)? {
                Res::Cache { id, size, .. } => (Backing::Cache(*id), Some(h), *size),
                r => return Err(wrong_kind(h, "cache", r.kind())),
            },
            PoolBacking::Kmalloc { size } => (Backing::Kmalloc(size), None, size as u64),
            PoolBacking::Pages { order } => {
                if order >= 64 {
                    return Err(err(errno::EINVAL, format!("order {order} out of range")));
                }
                (Backing::Pages(order), None, page << order)
            }
        };
        let reserve = elem.saturating_mul(min_nr as u64);
        self.check_quota(conn, 0, reserve)?;
        self.check_table_quota(conn)?;
        let (id, elem) = env
            .with_mem_as(self.owner(conn), |m, _| m.pool_create(backing, min_nr))
            .map_err(mem_err)?;
        if let Some(h) = cache {
            if let Some(Res::Cache { pools, .. }) = self.get_mut(conn, h) {
                *pools += 1;
            }
        }
        let reserve = elem.saturating_mul(min_nr as u64);
        let res = Res::Pool {
            id,
            cache,
            elem,
            objects: 0,
            reserve,
        };
        Ok(Reply::Created {
            handle: self.insert(conn, res, page),
        })
    }

    /// Destroys `pool`; its reserve goes back to its backing.
    pub(super) fn pool_destroy<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        pool: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        let (id, cache) = match self.get(conn, pool)? {
            Res::Pool { objects, .. } if *objects > 0 => {
                return Err(err(
                    errno::EBUSY,
                    format!("mempool {pool} has {objects} element(s) out"),
                ))
            }
            Res::Pool { id, cache, .. } => (*id, *cache),
            r => return Err(wrong_kind(pool, "mempool", r.kind())),
        };
        env.with_mem(|m, _| m.pool_destroy(id)).map_err(mem_err)?;
        self.remove(conn, pool, page);
        if let Some(h) = cache {
            if let Some(Res::Cache { pools, .. }) = self.get_mut(conn, h) {
                *pools -= 1;
            }
        }
        Ok(Reply::Done)
    }
}
