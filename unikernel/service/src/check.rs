//! The invariant check as work: memd-mm's [`CheckWalk`], a few pageblocks
//! a slice, so neither the operator's `check` nor the check that ends a
//! stress run holds the loop for a walk of the whole frame table.

use alloc::format;
use alloc::vec::Vec;

use memd_mm::CheckWalk;
use memd_wire::CheckReport;

use crate::env::Env;
use crate::memory::Memory;

/// Pageblocks (4 MiB of frames each, at the default `max_order`) walked
/// per hold of the memory manager: tens of microseconds under TCG.
pub const SLICE_PAGEBLOCKS: usize = 2;

/// A check in progress, or ended with what it found.
pub struct CheckRun {
    walk: CheckWalk,
    ended: Option<Result<(), (&'static str, u64)>>,
}

impl CheckRun {
    /// A check from the start.
    pub fn new() -> CheckRun {
        CheckRun {
            walk: CheckWalk::new(),
            ended: None,
        }
    }

    /// One slice; true once the check has ended.
    pub fn step<E: Env>(&mut self, env: &mut E) -> bool {
        if self.ended.is_none() {
            let walk = &mut self.walk;
            self.ended = match env.with_mem(|m, _| m.check_step(walk, SLICE_PAGEBLOCKS)) {
                Ok(false) => None,
                Ok(true) => Some(Ok(())),
                Err(found) => Some(Err(found)),
            };
        }
        self.ended.is_some()
    }

    /// Pageblocks walked so far.
    pub fn walked(&self) -> usize {
        self.walk.walked()
    }

    /// Whether it ended with nothing found.
    pub fn ok(&self) -> bool {
        matches!(self.ended, Some(Ok(())))
    }

    /// What it found, for the reply.
    pub fn report(&self) -> CheckReport {
        match self.ended {
            Some(Err((what, at))) => CheckReport {
                ok: false,
                violations: alloc::vec![format!("{what} (at {at:#x})")],
                left_out: left_out(),
            },
            _ => CheckReport {
                ok: self.ok(),
                violations: Vec::new(),
                left_out: left_out(),
            },
        }
    }
}

/// [`CheckWalk::LEFT_OUT`], for the report.
fn left_out() -> Vec<alloc::string::String> {
    CheckWalk::LEFT_OUT.iter().map(|s| (*s).into()).collect()
}
