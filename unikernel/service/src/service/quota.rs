//! A connection's limits: the handles, pages and bytes of its quota, and
//! its share of the slab caches and mempools all clients hold together.

use alloc::format;

use memd_wire::{errno, Quota, WireError};

use super::conn::Conn;
use super::{err, ConnId, Service};
use crate::memory::Memory;

/// Which of a connection's limits one more handle would pass.
pub(super) enum Over {
    Handles,
    Pages,
    Bytes,
}

impl<M: Memory> Conn<M> {
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
    /// Checks that `conn` may take one more handle charging (pages, bytes).
    pub(super) fn check_quota(
        &self,
        conn: ConnId,
        pages: u64,
        bytes: u64,
    ) -> Result<(), WireError> {
        let c = self
            .conns
            .get(&conn)
            .ok_or_else(|| err(errno::EBADF, "no connection"))?;
        let q = &self.config.quota;
        match c.over_quota(q, pages, bytes) {
            None => Ok(()),
            Some(Over::Handles) => Err(err(
                errno::EDQUOT,
                format!("handle quota of {} reached", q.handles),
            )),
            Some(Over::Pages) => Err(err(
                errno::EDQUOT,
                format!("page quota: {} held + {pages} > {}", c.pages, q.pages),
            )),
            Some(Over::Bytes) => Err(err(
                errno::EDQUOT,
                format!("byte quota: {} held + {bytes} > {}", c.bytes, q.bytes),
            )),
        }
    }

    /// Checks that `conn` may create one more slab cache (`pool` false) or
    /// mempool: its own quota (EDQUOT), then what all clients hold
    /// together (ENOSPC), so no one client fills the shared tables.
    pub(super) fn check_table_quota(&self, conn: ConnId, pool: bool) -> Result<(), WireError> {
        let c = self
            .conns
            .get(&conn)
            .ok_or_else(|| err(errno::EBADF, "no connection"))?;
        let q = self.config.quota.caches;
        if c.caches + c.pools >= q {
            return Err(err(
                errno::EDQUOT,
                format!("cache and mempool quota of {q} reached"),
            ));
        }
        let (held, cap, what) = if pool {
            let held = self.conns.values().map(|c| c.pools).sum::<u64>();
            (held, self.config.max_client_pools, "mempools")
        } else {
            let held = self.conns.values().map(|c| c.caches).sum::<u64>();
            (held, self.config.max_client_caches, "slab caches")
        };
        if held >= cap {
            return Err(err(
                errno::ENOSPC,
                format!("clients hold {held} {what}, the most allowed"),
            ));
        }
        Ok(())
    }
}
