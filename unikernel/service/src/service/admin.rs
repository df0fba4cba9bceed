//! The operator's operations: a stress run (the invariant check, also
//! run as work, is `crate::check`), fault injection, dropping the caches, and shutting down.

use alloc::format;

use memd_wire::{errno, FaultConfig, FaultTarget, Reply, WireError};

use super::work::Work;
use super::{err, mem_err, Service};
use crate::env::Env;
use crate::memory::Memory;
use crate::stress;

impl<M: Memory> Service<M> {
    /// A stress run of `ops` operations with `seed`'s sequence on `cpus`
    /// CPUs, to run as work.
    pub(super) fn start_stress<E: Env<Mem = M>>(
        &self,
        env: &mut E,
        ops: u64,
        seed: u64,
        cpus: u32,
    ) -> Result<Work, WireError> {
        if ops > self.config.max_stress_ops {
            return Err(err(
                errno::E2BIG,
                format!(
                    "at most {} stress ops per request",
                    self.config.max_stress_ops
                ),
            ));
        }
        stress::Run::start(env, ops, seed, cpus)
            .map(Work::Stress)
            .map_err(|(code, message)| err(code, message))
    }

    /// Sets a fault-injection rule.
    pub(super) fn fault_inject<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        target: FaultTarget,
        config: FaultConfig,
    ) -> Result<Reply, WireError> {
        if config.probability > 100 {
            return Err(err(errno::EINVAL, "probability is a percentage (0..=100)"));
        }
        env.with_mem(|m, _| m.set_fault(target, config))
            .map_err(mem_err)?;
        Ok(Reply::Done)
    }

    /// Shrinks every cache and drains the per-CPU page lists.
    pub(super) fn drop_caches<E: Env<Mem = M>>(&mut self, env: &mut E) -> Reply {
        Reply::Shrunk {
            pages: env.with_mem(|m, _| m.drop_caches()),
        }
    }

    /// Stops the service once the reply is sent.
    pub(super) fn shutdown(&mut self) -> Reply {
        self.shutdown = true;
        Reply::Done
    }
}
