//! Slab caches for clients: creating one, shrinking it, destroying it
//! (refused while it has objects out or backs a mempool). Allocating and
//! freeing its objects is `objects`'s.

use alloc::format;

use memd_wire::{errno, CacheSpec, Reply, WireError, MAX_NAME_LEN};

use super::res::{wrong_kind, Res};
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::Memory;
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// A slab cache for `conn`, named and shaped as Linux's
    /// `kmem_cache_create` takes one: the operation's spec as it is.
    pub(super) fn cache_create<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        spec: &CacheSpec,
    ) -> Result<Reply, WireError> {
        if spec.name.is_empty() || spec.name.len() > MAX_NAME_LEN {
            return Err(err(
                errno::EINVAL,
                format!("cache name must be 1..={MAX_NAME_LEN} bytes"),
            ));
        }
        self.check_quota(conn, 0, 0)?;
        self.check_table_quota(conn)?;
        let id = env.with_mem(|m, _| m.cache_create(spec)).map_err(mem_err)?;
        let res = Res::Cache {
            id,
            size: spec.size as u64,
            objects: 0,
            pools: 0,
        };
        let page = self.page_size(env);
        Ok(Reply::Created {
            handle: self.insert(conn, res, page),
        })
    }

    /// Gives `cache`'s empty slabs back.
    pub(super) fn cache_shrink<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        cache: u64,
    ) -> Result<Reply, WireError> {
        let id = match self.get(conn, cache)? {
            Res::Cache { id, .. } => *id,
            r => return Err(wrong_kind(cache, "cache", r.kind())),
        };
        let pages = env.with_mem(|m, _| m.cache_shrink(id)).map_err(mem_err)?;
        Ok(Reply::Shrunk { pages })
    }

    /// Destroys `cache`.
    pub(super) fn cache_destroy<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        cache: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        let id = match self.get(conn, cache)? {
            Res::Cache { pools, .. } if *pools > 0 => {
                return Err(err(
                    errno::EBUSY,
                    format!("cache {cache} backs {pools} mempool(s)"),
                ))
            }
            Res::Cache { id, .. } => *id,
            r => return Err(wrong_kind(cache, "cache", r.kind())),
        };
        env.with_mem(|m, _| m.cache_destroy(id)).map_err(mem_err)?;
        self.remove(conn, cache, page);
        Ok(Reply::Done)
    }
}
