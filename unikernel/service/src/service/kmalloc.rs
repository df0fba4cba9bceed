//! kmalloc'd objects for clients: `kmalloc` of a size and `kfree`.

use memd_wire::{Gfp, Reply, WireError};

use super::res::{wrong_kind, Res};
use super::{mem_err, Service};
use crate::env::Env;
use crate::memory::Memory;
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// An object of at least `size` bytes for `conn`.
    pub(super) fn kmalloc<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        size: u64,
        gfp: Gfp,
        page: u64,
    ) -> Result<Reply, WireError> {
        self.check_quota(conn, 0, size)?;
        let obj = env
            .with_mem_as(self.owner(conn), |m, _| m.kmalloc(size, gfp))
            .map_err(mem_err)?;
        let handle = self.insert(conn, Res::Kmalloc(obj), page);
        Ok(Reply::Object {
            handle,
            addr: obj.addr,
            size: obj.size,
        })
    }

    /// Frees the object of `handle`.
    pub(super) fn kfree<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        match self.get(conn, handle)? {
            Res::Kmalloc(obj) => {
                let obj = *obj;
                env.with_mem(|m, _| m.kfree(obj)).map_err(mem_err)?;
                self.remove(conn, handle, page);
                Ok(Reply::Done)
            }
            r => Err(wrong_kind(handle, "kmalloc object", r.kind())),
        }
    }
}
