//! A batch answers exactly as its operations would one by one.
//!
//! Batches run their kmalloc, kfree, alloc-pages and free-pages operations
//! in bulk, under one hold of the memory manager, and fall back to the
//! general path for anything else. Two services over identical memd-mm
//! arenas get the same operations, one as batches and one as single calls;
//! every result, every handle and the free memory must agree, with tight
//! quotas and a small arena so that refusals of every kind happen mid-run.
//! The batched side must never touch the heap while it holds the manager.

mod common;

use std::sync::atomic::Ordering;

use common::{LockEnv, ALLOCS_UNDER_LOCK};
use memd_mm::HostMm;
use memd_mm::MemoryManager;
use memd_service::{Config, ConnId, Service};
use memd_wire::testing::proptest_cases;
use memd_wire::*;
use proptest::prelude::*;

/// An operation whose handle, if any, is picked from those seen so far.
#[derive(Debug, Clone)]
enum T {
    Kmalloc(u64, Gfp),
    Kfree(Pick),
    AllocPages(u8, Gfp),
    FreePages(Pick),
    /// Not a bulk operation: ends a run.
    Meminfo,
}

/// A handle seen earlier (counted back from the newest, or from the
/// oldest), or a made-up one.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Seen(u8),
    Oldest(usize),
    Raw(u64),
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![8 => any::<u8>().prop_map(Pick::Seen), 1 => any::<u64>().prop_map(Pick::Raw)]
}

fn gfp() -> impl Strategy<Value = Gfp> {
    prop_oneof![
        8 => Just(Gfp::KERNEL),
        1 => Just(Gfp::ATOMIC),
        1 => Just(Gfp::KERNEL | Gfp::ZERO),
        1 => Just(Gfp(1 << 30)),
    ]
}

fn op() -> impl Strategy<Value = T> {
    prop_oneof![
        6 => (prop_oneof![9 => 1u64..3000, 1 => 1u64..(8 << 20)], gfp())
            .prop_map(|(s, g)| T::Kmalloc(s, g)),
        5 => pick().prop_map(T::Kfree),
        4 => (prop_oneof![9 => 0u8..4, 1 => 0u8..70], gfp()).prop_map(|(o, g)| T::AllocPages(o, g)),
        4 => pick().prop_map(T::FreePages),
        1 => Just(T::Meminfo),
    ]
}

struct Side {
    mm: HostMm,
    svc: Service<MemoryManager>,
    conn: ConnId,
}

/// Tight limits, so that refusals of every kind happen mid-run.
const TIGHT: Quota = Quota {
    pages: 600,
    bytes: 3 << 20,
    handles: 40,
    caches: 8,
};

impl Side {
    fn new(quota: Quota, arena: u64) -> Side {
        let mut config = Config::new("t");
        config.quota = quota;
        let mut side = Side {
            mm: HostMm::three_zones(arena, 0, "").expect("boot"),
            svc: Service::new(config),
            conn: 0,
        };
        side.conn = side.svc.on_connect();
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            client: "bulk".into(),
        });
        assert!(matches!(side.send(&hello), Response::Hello(_)));
        side
    }

    fn send(&mut self, req: &Request) -> Response {
        let mut out = Vec::new();
        let frame = to_frame(req).unwrap();
        self.svc
            .on_bytes(&mut LockEnv::new(&mut self.mm), self.conn, &frame, &mut out);
        let mut d = FrameDecoder::new();
        let mut input = &out[..];
        let body = d.feed(&mut input).unwrap().expect("one whole frame");
        decode_body(&body).unwrap()
    }

    /// `r` with object addresses made physical: the two arenas sit at
    /// different host addresses.
    fn physical(&self, r: Result<Reply, WireError>) -> Result<Reply, WireError> {
        match r {
            Ok(Reply::Object { handle, addr, size }) => Ok(Reply::Object {
                handle,
                addr: self.mm.direct_map().phys(addr as usize),
                size,
            }),
            r => r,
        }
    }
}

fn handle_of(r: &Result<Reply, WireError>) -> Option<u64> {
    match r {
        Ok(Reply::Object { handle, .. } | Reply::Pages { handle, .. }) => Some(*handle),
        _ => None,
    }
}

fn resolve(p: Pick, seen: &[u64]) -> u64 {
    match p {
        Pick::Seen(i) if !seen.is_empty() => seen[seen.len() - 1 - i as usize % seen.len()],
        Pick::Seen(i) => i as u64,
        Pick::Oldest(i) => seen.get(i).copied().unwrap_or(i as u64),
        Pick::Raw(h) => h,
    }
}

fn concrete(t: &T, seen: &[u64]) -> Op {
    match *t {
        T::Kmalloc(size, gfp) => Op::Kmalloc { size, gfp },
        T::Kfree(p) => Op::Kfree {
            handle: resolve(p, seen),
        },
        T::AllocPages(order, gfp) => Op::AllocPages { order, gfp },
        T::FreePages(p) => Op::FreePages {
            handle: resolve(p, seen),
        },
        T::Meminfo => Op::Meminfo,
    }
}

/// Sends `batches` to one side as batches and to the other op by op, and
/// checks that they answer alike and end alike.
fn compare(batches: &[(Vec<T>, bool)], quota: Quota, arena: u64) -> Result<(), TestCaseError> {
    let (mut bulk, mut single) = (Side::new(quota, arena), Side::new(quota, arena));
    let mut seen = Vec::new();
    for (ts, stop_on_error) in batches {
        let ops: Vec<Op> = ts.iter().map(|t| concrete(t, &seen)).collect();
        ALLOCS_UNDER_LOCK.store(0, Ordering::Relaxed);
        let Response::Batch(batched) = bulk.send(&Request::Batch(Batch {
            stop_on_error: *stop_on_error,
            ops: ops.clone(),
        })) else {
            panic!("a batch reply");
        };
        let batched: Vec<_> = batched.into_iter().map(|r| bulk.physical(r)).collect();
        prop_assert_eq!(
            ALLOCS_UNDER_LOCK.load(Ordering::Relaxed),
            0,
            "heap use under the lock"
        );
        let mut one_by_one = Vec::new();
        for op in ops {
            let Response::Call(r) = single.send(&Request::Call(op)) else {
                panic!("a call reply");
            };
            let failed = r.is_err();
            one_by_one.push(single.physical(r));
            if failed && *stop_on_error {
                break;
            }
        }
        prop_assert_eq!(&batched, &one_by_one);
        seen.extend(batched.iter().filter_map(handle_of));
        prop_assert_eq!(bulk.mm.meminfo(), single.mm.meminfo());
        prop_assert!(bulk.mm.check().is_ok());
    }
    let Response::Call(Ok(Reply::Clients(b))) = bulk.send(&Request::Call(Op::Clients)) else {
        panic!("clients");
    };
    let Response::Call(Ok(Reply::Clients(s))) = single.send(&Request::Call(Op::Clients)) else {
        panic!("clients");
    };
    prop_assert_eq!(b.len(), 1);
    prop_assert_eq!(
        (
            b[0].handles,
            b[0].pages,
            b[0].bytes,
            b[0].requests,
            b[0].errors
        ),
        (
            s[0].handles,
            s[0].pages,
            s[0].bytes,
            s[0].requests,
            s[0].errors
        )
    );
    Ok(())
}

proptest! {
    // PROPTEST_CASES overrides the count (cargo xtask fuzz); failures are
    // kept in bulk.proptest-regressions.
    #![proptest_config(ProptestConfig::with_cases(proptest_cases(64)))]

    #[test]
    fn a_batch_answers_as_its_ops_one_by_one(
        batches in prop::collection::vec(
            (prop::collection::vec(op(), 1..80), any::<bool>()),
            1..6,
        ),
    ) {
        compare(&batches, TIGHT, 8 << 20)?;
    }
}

/// Handle tables grow by chunks of 1024 slots: batches that cross chunk
/// boundaries, with slots freed in between, get the handles single calls
/// would.
#[test]
fn batches_across_handle_table_chunks() {
    let roomy = Quota {
        pages: 1 << 20,
        bytes: 1 << 30,
        handles: 10_000,
        caches: 8,
    };
    let kmallocs = |n| (vec![T::Kmalloc(64, Gfp::KERNEL); n], false);
    // Every third of the handles seen so far, oldest first.
    let frees = |n: usize| {
        (
            (0..n).map(|i| T::Kfree(Pick::Oldest(3 * i))).collect(),
            false,
        )
    };
    let batches = [
        kmallocs(1000),
        frees(50),
        kmallocs(1500),
        frees(700),
        kmallocs(2000),
    ];
    compare(&batches, roomy, 64 << 20).unwrap();
}

/// A batch of refusals (every op left to the general path) answers like
/// single calls too.
#[test]
fn a_batch_of_refusals() {
    let batches = vec![(vec![T::Kfree(Pick::Raw(12345)); 4096], false)];
    compare(&batches, TIGHT, 8 << 20).unwrap();
}
