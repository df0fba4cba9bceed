//! Fuzzing the service over the real memd-mm (host arena) with proptest:
//! random sequences of operations on several connections (handles taken
//! from earlier replies of any connection, or made up), batches, mutated
//! and random frames, reconnects, fault injection and tight quotas. After
//! every step the memory manager's invariant checker must pass and every
//! reply must decode; after every connection has closed, free memory must
//! be exactly what it was before. `cargo xtask fuzz` runs it with many more
//! cases (PROPTEST_CASES).
//!
//! The binary's heap is memd-mm with the kernel's limits
//! ([`kernel_heap::KernelHeap`]: a bounded arena, nothing above one 4 MiB
//! buddy block), not the system allocator: in the kernel the service's own
//! allocations come from memd-mm, and hostile input that makes it allocate
//! more than that heap gives must fail here as it would in the guest,
//! where the system allocator would have served it without complaint.

mod kernel_heap;

#[global_allocator]
static HEAP: kernel_heap::KernelHeap = kernel_heap::KernelHeap::new();

use memd_mm::HostMm;
use memd_service::host::HostService;
use memd_service::{Config, ConnId, Flow};
use memd_wire::testing::proptest_config;
use memd_wire::*;
use proptest::prelude::*;

const TOKEN: &str = "fuzz-token";

/// A handle: one seen in an earlier reply (counted back from the newest),
/// or a made-up number.
#[derive(Debug, Clone, Copy)]
enum H {
    Seen(u8),
    Raw(u64),
}

fn h() -> impl Strategy<Value = H> {
    prop_oneof![
        6 => any::<u8>().prop_map(H::Seen),
        1 => any::<u64>().prop_map(H::Raw),
    ]
}

fn gfp() -> impl Strategy<Value = Gfp> {
    any::<u8>().prop_map(|bits| {
        Gfp::NAMED
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .fold(
                Gfp::KERNEL,
                |g, (_, (_, f))| if bits == 0 { g } else { g | *f },
            )
    })
}

/// An operation with symbolic handles.
#[derive(Debug, Clone)]
enum T {
    AllocPages(u8, Gfp),
    FreePages(H),
    Kmalloc(u64, Gfp),
    Kfree(H),
    CacheCreate(u32, u32, u8, Option<u8>),
    CacheAlloc(H, Gfp),
    CacheFree(H, H),
    CacheShrink(H),
    CacheDestroy(H),
    PoolCreate(u8, u32, H, u32),
    PoolAlloc(H, Gfp),
    PoolFree(H, H),
    PoolDestroy(H),
    DmaAlloc(u64, u64, u8),
    DmaFree(H),
    DmaWrite(H, u64, Vec<u8>),
    DmaRead(H, u64, u32),
    DmaFill(H, u64),
    DmaChecksum(H, u64, u64),
    View(u8),
    Check,
    Stress(u16, u64),
    Fault(bool, u8, u32, i64),
}

fn t() -> impl Strategy<Value = T> {
    prop_oneof![
        4 => (0u8..14, gfp()).prop_map(|(o, g)| T::AllocPages(o, g)),
        3 => h().prop_map(T::FreePages),
        4 => (prop_oneof![0u64..9000, 0u64..(8 << 20), any::<u64>()], gfp()).prop_map(|(s, g)| T::Kmalloc(s, g)),
        3 => h().prop_map(T::Kfree),
        1 => (prop_oneof![1u32..2048, any::<u32>()], prop_oneof![Just(0u32), 1u32..8192], any::<u8>(), proptest::option::of(any::<u8>()))
            .prop_map(|(s, a, f, c)| T::CacheCreate(s, a, f, c)),
        3 => (h(), gfp()).prop_map(|(c, g)| T::CacheAlloc(c, g)),
        2 => (h(), h()).prop_map(|(c, o)| T::CacheFree(c, o)),
        1 => h().prop_map(T::CacheShrink),
        1 => h().prop_map(T::CacheDestroy),
        1 => (0u8..3, 0u32..5000, h(), prop_oneof![0u32..8, any::<u32>()]).prop_map(|(k, a, c, n)| T::PoolCreate(k, a, c, n)),
        2 => (h(), gfp()).prop_map(|(p, g)| T::PoolAlloc(p, g)),
        2 => (h(), h()).prop_map(|(p, o)| T::PoolFree(p, o)),
        1 => h().prop_map(T::PoolDestroy),
        2 => (prop_oneof![0u64..(64 << 10), 0u64..(12 << 20), any::<u64>()], prop_oneof![Just(0u64), any::<u64>(), (0u32..24).prop_map(|s| 1u64 << s)], 0u8..4)
            .prop_map(|(l, a, m)| T::DmaAlloc(l, a, m)),
        2 => h().prop_map(T::DmaFree),
        1 => (h(), prop_oneof![0u64..8192, any::<u64>()], proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(b, o, d)| T::DmaWrite(b, o, d)),
        1 => (h(), prop_oneof![0u64..8192, any::<u64>()], prop_oneof![0u32..4096, any::<u32>()]).prop_map(|(b, o, l)| T::DmaRead(b, o, l)),
        1 => (h(), any::<u64>()).prop_map(|(b, s)| T::DmaFill(b, s)),
        1 => (h(), prop_oneof![0u64..8192, any::<u64>()], any::<u64>()).prop_map(|(b, o, l)| T::DmaChecksum(b, o, l)),
        2 => any::<u8>().prop_map(T::View),
        1 => Just(T::Check),
        1 => (0u16..300, any::<u64>()).prop_map(|(n, s)| T::Stress(n, s)),
        1 => (any::<bool>(), prop_oneof![0u8..=100, any::<u8>()], 0u32..4, -1i64..4).prop_map(|(s, p, i, n)| T::Fault(s, p, i, n)),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Call(u8, T),
    Batch(u8, Vec<T>, bool),
    /// A valid frame with a byte changed.
    Mutated(u8, T, usize, u8),
    /// Random bytes (they usually break the connection's framing).
    Raw(u8, Vec<u8>),
    /// Close and reconnect; the hello carries a wrong token when false.
    Reconnect(u8, bool),
    /// A batch header (stop flag, count) claiming any number of
    /// operations up to `u64::MAX`, those operations, then garbage.
    Claimed(u8, bool, u64, Vec<T>, Vec<u8>),
    /// A batch of `n` copies of one operation, `n` at and around
    /// [`MAX_BATCH_OPS`].
    Repeated(u8, usize, T),
}

/// Batch counts at, around and far past the limit.
fn claimed_count() -> impl Strategy<Value = u64> {
    let max = MAX_BATCH_OPS as u64;
    prop_oneof![0..=max + 2, Just(u64::MAX), any::<u64>()]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        20 => (0u8..3, t()).prop_map(|(c, t)| Step::Call(c, t)),
        3 => (0u8..3, proptest::collection::vec(t(), 0..12), any::<bool>()).prop_map(|(c, v, s)| Step::Batch(c, v, s)),
        2 => (0u8..3, t(), any::<usize>(), 1u8..=255).prop_map(|(c, t, i, x)| Step::Mutated(c, t, i, x)),
        1 => (0u8..3, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(c, b)| Step::Raw(c, b)),
        2 => (0u8..3, prop_oneof![5 => Just(true), 1 => Just(false)]).prop_map(|(c, ok)| Step::Reconnect(c, ok)),
        1 => (0u8..3, any::<bool>(), claimed_count(), proptest::collection::vec(t(), 0..4), proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(c, stop, n, ts, tail)| Step::Claimed(c, stop, n, ts, tail)),
        1 => (0u8..3, (MAX_BATCH_OPS - 1)..=(MAX_BATCH_OPS + 1), t()).prop_map(|(c, n, t)| Step::Repeated(c, n, t)),
    ]
}

struct World {
    host: HostService,
    conns: [Option<ConnId>; 3],
    /// Whether the connection's stream is at a frame boundary: random
    /// bytes may leave a frame half sent, and then the next frame's bytes
    /// are read as its rest.
    framed: [bool; 3],
    seen: Vec<u64>,
}

impl World {
    fn new() -> World {
        let mm = HostMm::three_zones(64 << 20, 0, "memd.dma_reserve=8M@dma32").unwrap();
        let mut config = Config::new(TOKEN);
        // Tight quotas, so EDQUOT paths run too.
        config.quota = Quota {
            pages: 4096,
            bytes: 16 << 20,
            handles: 200,
            caches: 8,
        };
        config.max_stress_ops = 300;
        let mut w = World {
            host: HostService::new(mm, config),
            conns: [None; 3],
            framed: [true; 3],
            seen: Vec::new(),
        };
        for c in 0..3 {
            w.reconnect(c, true);
        }
        w
    }

    fn h(&self, h: H) -> u64 {
        match h {
            H::Raw(x) => x,
            H::Seen(i) if !self.seen.is_empty() => {
                let n = self.seen.len();
                self.seen[n - 1 - (i as usize % n)]
            }
            H::Seen(i) => i as u64,
        }
    }

    fn op(&self, t: &T) -> Op {
        match t.clone() {
            T::AllocPages(order, gfp) => Op::AllocPages { order, gfp },
            T::FreePages(x) => Op::FreePages { handle: self.h(x) },
            T::Kmalloc(size, gfp) => Op::Kmalloc { size, gfp },
            T::Kfree(x) => Op::Kfree { handle: self.h(x) },
            T::CacheCreate(size, align, flags, ctor) => Op::CacheCreate(CacheSpec {
                name: format!("fz{size}"),
                size,
                align,
                flags: SlabFlags::NAMED
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| flags & (1 << i) != 0)
                    .fold(SlabFlags::default(), |a, (_, (_, f))| a | *f),
                ctor: ctor.map_or(Ctor::None, Ctor::Fill),
            }),
            T::CacheAlloc(c, gfp) => Op::CacheAlloc {
                cache: self.h(c),
                gfp,
            },
            T::CacheFree(c, o) => Op::CacheFree {
                cache: self.h(c),
                object: self.h(o),
            },
            T::CacheShrink(c) => Op::CacheShrink { cache: self.h(c) },
            T::CacheDestroy(c) => Op::CacheDestroy { cache: self.h(c) },
            T::PoolCreate(kind, arg, cache, min_nr) => Op::PoolCreate {
                backing: match kind {
                    0 => PoolBacking::Cache(self.h(cache)),
                    1 => PoolBacking::Kmalloc { size: arg },
                    _ => PoolBacking::Pages {
                        order: (arg % 12) as u8,
                    },
                },
                min_nr,
            },
            T::PoolAlloc(p, gfp) => Op::PoolAlloc {
                pool: self.h(p),
                gfp,
            },
            T::PoolFree(p, o) => Op::PoolFree {
                pool: self.h(p),
                object: self.h(o),
            },
            T::PoolDestroy(p) => Op::PoolDestroy { pool: self.h(p) },
            T::DmaAlloc(len, align, mask) => Op::DmaAlloc {
                len,
                align,
                mask: match mask {
                    0 => DmaMask::Bits24,
                    1 => DmaMask::Bits32,
                    _ => DmaMask::Bits64,
                },
                movable: false,
            },
            T::DmaFree(b) => Op::DmaFree { handle: self.h(b) },
            T::DmaWrite(b, offset, data) => Op::DmaWrite {
                handle: self.h(b),
                offset,
                data,
            },
            T::DmaRead(b, offset, len) => Op::DmaRead {
                handle: self.h(b),
                offset,
                len,
            },
            T::DmaFill(b, seed) => Op::DmaFill {
                handle: self.h(b),
                seed,
            },
            T::DmaChecksum(b, offset, len) => Op::DmaChecksum {
                handle: self.h(b),
                offset,
                len,
            },
            T::View(v) => Op::VIEWS[v as usize % Op::VIEWS.len()].clone(),
            T::Check => Op::Check,
            T::Stress(ops, seed) => Op::Stress {
                ops: ops as u64,
                seed,
                cpus: 1,
            },
            T::Fault(slab, probability, interval, times) => Op::FaultInject {
                target: if slab {
                    FaultTarget::Slab
                } else {
                    FaultTarget::Pages
                },
                config: FaultConfig {
                    probability,
                    interval,
                    times,
                },
            },
        }
    }

    fn note(&mut self, r: &Result<Reply, WireError>) {
        if let Ok(
            Reply::Pages { handle, .. } | Reply::Object { handle, .. } | Reply::Created { handle },
        ) = r
        {
            self.seen.push(*handle);
        }
        if let Ok(Reply::Dma(b)) = r {
            self.seen.push(b.handle);
        }
    }

    /// Sends bytes on connection `c`; checks the replies decode and the
    /// memory manager's invariants hold. Returns the replies (none when the
    /// connection is closed).
    fn send(&mut self, c: usize, bytes: &[u8]) -> Vec<Response> {
        let Some(id) = self.conns[c] else {
            return Vec::new();
        };
        let mut replies = Vec::new();
        let mut out = Vec::new();
        let flow = self.host.on_bytes(id, bytes, &mut out);
        let mut d = FrameDecoder::new();
        let mut rest = &out[..];
        while let Some(body) = d.feed(&mut rest).expect("the service frames its replies") {
            let reply = decode_body::<Response>(&body).expect("replies decode");
            match &reply {
                Response::Call(r) => self.note(r),
                Response::Batch(rs) => rs.iter().for_each(|r| self.note(r)),
                Response::Hello(_) | Response::Error { .. } => {}
            }
            replies.push(reply);
        }
        assert!(rest.is_empty(), "whole reply frames only");
        // A mutated frame can be a valid Shutdown request: the kernel would
        // stop the service after replying; here the connection just closes.
        if flow != Flow::Continue {
            self.host.on_close(id);
            self.conns[c] = None;
        }
        if let Err(e) = self.host.mm.check() {
            panic!("invariant broken after a request: {e:?}");
        }
        replies
    }

    fn reconnect(&mut self, c: usize, good_token: bool) {
        if let Some(id) = self.conns[c].take() {
            self.host.on_close(id);
        }
        self.conns[c] = Some(self.host.svc.on_connect());
        self.framed[c] = true;
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: if good_token { TOKEN } else { "wrong" }.into(),
            client: format!("fuzz-{c}"),
        });
        self.send(c, &to_frame(&hello).unwrap());
    }

    fn run(&mut self, s: &Step) {
        match s {
            Step::Call(c, t) => {
                let f = to_frame(&Request::Call(self.op(t))).unwrap();
                self.send(*c as usize, &f);
            }
            Step::Batch(c, ts, stop) => {
                let ops = ts.iter().map(|t| self.op(t)).collect();
                let f = to_frame(&Request::Batch(Batch {
                    stop_on_error: *stop,
                    ops,
                }))
                .unwrap();
                self.send(*c as usize, &f);
            }
            Step::Mutated(c, t, i, x) => {
                let mut f = to_frame(&Request::Call(self.op(t))).unwrap();
                let body = f.len() - 4;
                if body > 0 {
                    f[4 + i % body] ^= x;
                }
                self.send(*c as usize, &f);
            }
            Step::Raw(c, b) => {
                self.framed[*c as usize] = false;
                self.send(*c as usize, b);
            }
            Step::Reconnect(c, ok) => self.reconnect(*c as usize, *ok),
            Step::Claimed(c, stop, count, ts, tail) => {
                let mut body = to_frame(&Request::Batch(Batch {
                    stop_on_error: *stop,
                    ops: Vec::new(),
                }))
                .unwrap()[4..]
                    .to_vec();
                // The empty batch's count (0) becomes the claimed one.
                body.pop();
                let mut n = *count;
                while n >= 0x80 {
                    body.push(n as u8 | 0x80);
                    n >>= 7;
                }
                body.push(n as u8);
                for t in ts {
                    body.extend_from_slice(&to_frame(&self.op(t)).unwrap()[4..]);
                }
                body.extend_from_slice(tail);
                let mut f = (body.len() as u32).to_le_bytes().to_vec();
                f.extend_from_slice(&body);
                self.batch_past_the_limit(*c as usize, &f, *count);
            }
            Step::Repeated(c, n, t) => {
                let f = to_frame(&Request::Batch(Batch {
                    stop_on_error: false,
                    ops: vec![self.op(t); *n],
                }))
                .unwrap();
                let was_open = self.conns[*c as usize].is_some() && self.framed[*c as usize];
                let replies = self.batch_past_the_limit(*c as usize, &f, *n as u64);
                if was_open && *n <= MAX_BATCH_OPS {
                    // Every op answered, unless the reply filled its frame
                    // (then the last entry says so).
                    let [Response::Batch(rs)] = &replies[..] else {
                        panic!("a batch of {n} gets a batch reply: {replies:?}");
                    };
                    assert!(
                        rs.len() == *n
                            || matches!(rs.last(), Some(Err(e)) if e.code == errno::E2BIG),
                        "{} results for {n} ops",
                        rs.len()
                    );
                }
            }
        }
    }

    /// Sends a batch frame announcing `count` operations on connection
    /// `c`: when it is open (authenticated), at a frame boundary, and
    /// `count` is past [`MAX_BATCH_OPS`], the one reply is an E2BIG
    /// refusal, nothing runs and the connection stays open.
    fn batch_past_the_limit(&mut self, c: usize, frame: &[u8], count: u64) -> Vec<Response> {
        let Some(id) = self.conns[c] else {
            return Vec::new();
        };
        let framed = self.framed[c];
        let handles = self.host.svc.handles_of(id);
        let replies = self.send(c, frame);
        if framed && count > MAX_BATCH_OPS as u64 {
            let refused = match &replies[..] {
                [Response::Batch(rs)] => matches!(&rs[..], [Err(e)] if e.code == errno::E2BIG),
                [Response::Error { error, closing }] => error.code == errno::E2BIG && !closing,
                _ => false,
            };
            assert!(refused, "a batch counting {count} ops: {replies:?}");
            assert_eq!(self.conns[c], Some(id), "the connection stays open");
            assert_eq!(self.host.svc.handles_of(id), handles, "nothing ran");
        }
        replies
    }
}

fn run_sequence(steps: &[Step]) {
    let mut w = World::new();
    // What the connections' first requests grow once (nothing, on the
    // host: the service's own state lives on the test's heap).
    let baseline = w.host.available();
    for s in steps {
        w.run(s);
    }
    for c in 0..3 {
        if let Some(id) = w.conns[c].take() {
            w.host.on_close(id);
        }
    }
    w.host.mm.set_fault(true, 0, 0, 0, 0).unwrap();
    w.host.mm.set_fault(false, 0, 0, 0, 0).unwrap();
    w.host.mm.check().unwrap();
    assert_eq!(w.host.svc.connections(), 0);
    assert_eq!(
        w.host.available(),
        baseline,
        "memory returned to the baseline"
    );
}

#[test]
fn the_heap_has_the_kernels_limits() {
    kernel_heap::assert_kernel_limits(&HEAP);
}

proptest! {
    // PROPTEST_CASES overrides the count (cargo xtask fuzz).
    #![proptest_config(proptest_config(64))]

    #[test]
    fn random_sessions_keep_invariants_and_baseline(steps in proptest::collection::vec(step(), 1..120)) {
        run_sequence(&steps);
    }
}
