//! A batch's runs of plain allocations and frees, each run under one hold
//! of the memory manager, like Linux's `kmem_cache_alloc_bulk` and
//! `release_pages` take a lock once for many objects.
//!
//! Through the general path each kmalloc takes and drops the allocator's
//! lock and builds a `Result<Reply, WireError>` to drop it again: more
//! work than the allocation itself. Here consecutive kmalloc, kfree,
//! alloc-pages and free-pages operations run inside one
//! [`Env::with_mem_as`], and their results go straight into the reply
//! frame.
//!
//! Nothing in a run may allocate: the reply buffer is grown beforehand,
//! the handle table by the chunk its next insertion would add (so handles
//! come out as they would one by one), and every step checks that they
//! still have room. Whatever a run cannot finish without the heap — an
//! operation of another kind, an unknown handle, a quota refusal, a full
//! frame, a used-up chunk of handles — ends the run before that operation,
//! which then takes the general path and gets the reply it gets there.
//! Only the memory manager's own refusal happens inside a run; its message
//! is static, and the caller reports it.

use memd_wire::{BatchReplyWriter, Gfp, Op};

use super::res::{Holdings, Res};
use super::Service;
use crate::env::Env;
use crate::handles::HandleTable;
use crate::memory::{MemError, Memory};
use crate::ConnId;

/// Bytes of a batch's reply frame kept free for a final error entry.
pub(super) const FINAL_ENTRY_ROOM: usize = 128;

/// An operation a run takes.
#[derive(Clone, Copy)]
enum BulkOp {
    Kmalloc { size: u64, gfp: Gfp },
    Kfree { handle: u64 },
    AllocPages { order: u8, gfp: Gfp },
    FreePages { handle: u64 },
}

impl BulkOp {
    fn of(op: &Op) -> Option<BulkOp> {
        Some(match *op {
            Op::Kmalloc { size, gfp } => BulkOp::Kmalloc { size, gfp },
            Op::Kfree { handle } => BulkOp::Kfree { handle },
            Op::AllocPages { order, gfp } => BulkOp::AllocPages { order, gfp },
            Op::FreePages { handle } => BulkOp::FreePages { handle },
            _ => return None,
        })
    }

    fn allocates(self) -> bool {
        matches!(self, BulkOp::Kmalloc { .. } | BulkOp::AllocPages { .. })
    }
}

/// How far a run got.
pub(super) struct Run {
    /// Operations run, their results written, except for `refused`'s.
    pub ran: usize,
    /// The memory manager refused the last operation run; its error entry
    /// is the caller's to write.
    pub refused: Option<MemError>,
}

/// What one step of a run did.
enum Step {
    Ran,
    Refused(MemError),
    /// Not run: the general path takes it.
    Leave,
}

/// The stretch of consecutive bulk operations at the front of what is left
/// of a batch, and what it holds. Worked out once per stretch and counted
/// down as its operations run, by a run or by the general path, so that a
/// run cut short (an unknown handle, a quota) resumes without scanning
/// again: a batch of 4096 refusals stays linear.
#[derive(Default)]
pub(super) struct Stretch {
    left: usize,
    allocs: usize,
    frees: usize,
}

impl Stretch {
    /// The stretch at the front of `ops` (empty when the first is not a
    /// bulk operation), unless one is still being worked through.
    pub(super) fn renew(&mut self, ops: &[Op]) {
        if self.left > 0 {
            return;
        }
        for op in ops.iter().map_while(BulkOp::of) {
            self.count(op, 1);
        }
    }

    /// `op`, the stretch's next operation, ran (by a run or by the general
    /// path).
    pub(super) fn consume(&mut self, op: &Op) {
        if self.left > 0 {
            if let Some(op) = BulkOp::of(op) {
                self.count(op, -1);
            }
        }
    }

    fn count(&mut self, op: BulkOp, by: isize) {
        self.left = self.left.wrapping_add_signed(by);
        if op.allocates() {
            self.allocs = self.allocs.wrapping_add_signed(by);
        } else {
            self.frees = self.frees.wrapping_add_signed(by);
        }
    }
}

impl<M: Memory> Service<M> {
    /// Runs the plain allocations and frees at the front of `ops`, the
    /// stretch `stretch` describes (at most `limit` of them), under one
    /// hold of the memory manager.
    pub(super) fn run_bulk<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        ops: &[Op],
        stretch: &mut Stretch,
        reply: &mut BatchReplyWriter,
        limit: usize,
    ) -> Run {
        let mut run = Run {
            ran: 0,
            refused: None,
        };
        if stretch.left == 0 {
            return run;
        }
        let page = self.page_size(env);
        let quota = self.config.quota;
        let owner = self.owner(conn);
        let Some(c) = self.conns.get_mut(&conn) else {
            return run;
        };
        c.holdings.handles.reserve(stretch.allocs, stretch.frees);
        reply.reserve_plain(stretch.left);
        env.with_mem_as(owner, |m, _| {
            for op in ops[..stretch.left.min(limit)].iter().map_while(BulkOp::of) {
                if !reply.plain_fits(FINAL_ENTRY_ROOM) {
                    break;
                }
                let step = step(m, &mut c.holdings, &quota, page, op, reply);
                if matches!(step, Step::Leave) {
                    break;
                }
                stretch.count(op, -1);
                run.ran += 1;
                if let Step::Refused(e) = step {
                    run.refused = Some(e);
                    break;
                }
            }
        });
        c.requests += run.ran as u64;
        c.errors += u64::from(run.refused.is_some());
        self.requests += run.ran as u64;
        run
    }
}

/// One operation of a run, as the general path (`pages`, `kmalloc`) runs it,
/// or [`Step::Leave`] when that would need the heap or end in an error
/// of the service's own.
fn step<M: Memory>(
    m: &mut M,
    c: &mut Holdings<M>,
    quota: &memd_wire::Quota,
    page: u64,
    op: BulkOp,
    reply: &mut BatchReplyWriter,
) -> Step {
    match op {
        BulkOp::Kmalloc { size, gfp } => {
            if c.handles.free_slots() == 0 || c.over_quota(quota, 0, size).is_some() {
                return Step::Leave;
            }
            match m.kmalloc(size, gfp) {
                Ok(obj) => {
                    let Some(handle) =
                        c.file(Res::Kmalloc(obj), page, HandleTable::insert_reserved)
                    else {
                        unreachable!("step checked for a free slot")
                    };
                    reply.push_object(handle, obj.addr, obj.size);
                    Step::Ran
                }
                Err(e) => Step::Refused(e),
            }
        }
        BulkOp::AllocPages { order, gfp } => {
            if order >= 64
                || c.handles.free_slots() == 0
                || c.over_quota(quota, 1 << order, page << order).is_some()
            {
                return Step::Leave;
            }
            match m.alloc_pages(order, gfp) {
                Ok(phys) => {
                    let Some(handle) = c.file(
                        Res::Pages { phys, order },
                        page,
                        HandleTable::insert_reserved,
                    ) else {
                        unreachable!("step checked for a free slot")
                    };
                    reply.push_pages(handle, phys, order);
                    Step::Ran
                }
                Err(e) => Step::Refused(e),
            }
        }
        BulkOp::Kfree { handle } => {
            let Some(&Res::Kmalloc(obj)) = c.handles.get(handle) else {
                return Step::Leave;
            };
            if c.handles.removes_without_growing() == 0 {
                return Step::Leave;
            }
            match m.kfree(obj) {
                Ok(()) => {
                    c.unfile(handle, page);
                    reply.push_done();
                    Step::Ran
                }
                Err(e) => Step::Refused(e),
            }
        }
        BulkOp::FreePages { handle } => {
            let Some(&Res::Pages { phys, order }) = c.handles.get(handle) else {
                return Step::Leave;
            };
            if c.handles.removes_without_growing() == 0 {
                return Step::Leave;
            }
            match m.free_pages(phys, order) {
                Ok(()) => {
                    c.unfile(handle, page);
                    reply.push_done();
                    Step::Ran
                }
                Err(e) => Step::Refused(e),
            }
        }
    }
}
