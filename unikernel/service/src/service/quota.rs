//! A connection's limits: the handles, pages, bytes, slab caches and
//! mempools of its quota. Nothing else limits what clients hold together
//! but memory: the memory manager allocates caches and pools from itself.

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

    /// Checks that `conn` may create one more slab cache or mempool
    /// (EDQUOT past its quota).
    pub(super) fn check_table_quota(&self, conn: ConnId) -> Result<(), WireError> {
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
        Ok(())
    }
}
