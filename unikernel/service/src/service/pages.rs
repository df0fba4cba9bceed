//! Page blocks for clients: `alloc_pages` and `free_pages` of an order.

use alloc::format;

use memd_wire::{errno, Gfp, Reply, WireError};

use super::res::{wrong_kind, Res};
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::Memory;
use crate::ConnId;

impl<M: Memory> Service<M> {
    /// `2^order` pages for `conn`.
    pub(super) fn alloc_pages<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        order: u8,
        gfp: Gfp,
        page: u64,
    ) -> Result<Reply, WireError> {
        if order >= 64 {
            return Err(err(errno::EINVAL, format!("order {order} out of range")));
        }
        self.check_quota(conn, 1u64 << order, page << order)?;
        let phys = env
            .with_mem_as(self.owner(conn), |m, _| m.alloc_pages(order, gfp))
            .map_err(mem_err)?;
        let handle = self.insert(conn, Res::Pages { phys, order }, page);
        Ok(Reply::Pages {
            handle,
            phys,
            order,
        })
    }

    /// Frees the pages of `handle`.
    pub(super) fn free_pages<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        handle: u64,
        page: u64,
    ) -> Result<Reply, WireError> {
        match self.get(conn, handle)? {
            Res::Pages { phys, order } => {
                let (phys, order) = (*phys, *order);
                env.with_mem(|m, _| m.free_pages(phys, order))
                    .map_err(mem_err)?;
                self.remove(conn, handle, page);
                Ok(Reply::Done)
            }
            r => Err(wrong_kind(handle, "pages", r.kind())),
        }
    }
}
