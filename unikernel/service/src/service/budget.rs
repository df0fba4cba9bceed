//! A turn's time: the most clock time one connection's turn takes, and
//! the share of it long work gets while other clients are being served.

use super::Service;
use crate::env::Env;
use crate::memory::Memory;

/// Default [`super::Config::budget_ns`]: the most guest time one
/// connection's turn takes before its work waits for the next pass.
pub const DEFAULT_BUDGET_NS: u64 = 200_000;

/// Long work's share of a turn while other clients are being served:
/// a quarter, so a client that only asks for heavy work takes a fifth of
/// the loop from those that do not.
const WORK_SHARE: u64 = 4;
/// Other clients count as being served if one's request ran this recently.
const CONTENDED_NS: u64 = 2_000_000;

/// The time a turn may take: `budget_ns` in all, of which long work
/// (and background frees) may take `work_ns`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Budget {
    start: u64,
    deadline: u64,
    work_deadline: u64,
}

impl Budget {
    /// A budget of `ns` from `start`, `work_ns` of it for long work.
    pub(super) fn new(start: u64, ns: u64, work_ns: u64) -> Budget {
        Budget {
            start,
            deadline: start.saturating_add(ns),
            work_deadline: start.saturating_add(work_ns.min(ns)),
        }
    }

    /// When the turn began.
    pub(super) fn start(&self) -> u64 {
        self.start
    }

    /// Whether the turn is over.
    pub(super) fn spent<E: Env>(&self, env: &mut E) -> bool {
        env.now_ns() >= self.deadline
    }

    /// Whether long work has had its share of the turn.
    pub(super) fn work_spent<E: Env>(&self, env: &mut E) -> bool {
        env.now_ns() >= self.work_deadline
    }
}

impl<M: Memory> Service<M> {
    /// A turn's budget: [`super::Config::budget_ns`], of which long work gets a
    /// [`WORK_SHARE`] part while other requests are being served.
    pub(super) fn turn_budget<E: Env<Mem = M>>(&mut self, env: &mut E) -> Budget {
        let ns = self.config.budget_ns;
        let now = env.now_ns();
        let contended = now.saturating_sub(self.served_at) < CONTENDED_NS;
        let work = if contended { ns / WORK_SHARE } else { ns };
        Budget::new(now, ns, work)
    }
}
