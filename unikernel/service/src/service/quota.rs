//! A connection's limits: the handles, pages and bytes of its quota, and
//! its share of the slab caches and mempools all clients hold together.

use alloc::format;

use memd_wire::{errno, WireError};

use super::{err, ConnId, Service};
use crate::memory::Memory;

/// Which of a connection's limits one more handle would pass.
pub(super) enum Over {
    Handles,
    Pages,
    Bytes,
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
        match c.holdings.over_quota(q, pages, bytes) {
            None => Ok(()),
            Some(Over::Handles) => Err(err(
                errno::EDQUOT,
                format!("handle quota of {} reached", q.handles),
            )),
            Some(Over::Pages) => Err(err(
                errno::EDQUOT,
                format!(
                    "page quota: {} held + {pages} > {}",
                    c.holdings.pages, q.pages
                ),
            )),
            Some(Over::Bytes) => Err(err(
                errno::EDQUOT,
                format!(
                    "byte quota: {} held + {bytes} > {}",
                    c.holdings.bytes, q.bytes
                ),
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
        if c.holdings.caches + c.holdings.pools >= q {
            return Err(err(
                errno::EDQUOT,
                format!("cache and mempool quota of {q} reached"),
            ));
        }
        let (held, cap, what) = if pool {
            let held = self.conns.values().map(|c| c.holdings.pools).sum::<u64>();
            (held, self.config.max_client_pools, "mempools")
        } else {
            let held = self.conns.values().map(|c| c.holdings.caches).sum::<u64>();
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
