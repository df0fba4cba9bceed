//! Hostile but well-formed frames against the service over the real memd-mm.
//!
//! `fuzz_ops.rs` sends what a client builds with ordinary values, random
//! bytes (which almost never form a frame) and single-byte mutations.
//! Here every frame has an honest length prefix and valid variant tags,
//! and its contents are what a hostile client would send:
//! batches whose count claims far more operations than follow (up to
//! `u64::MAX`), counts at and above [`MAX_BATCH_OPS`], strings and DMA
//! writes as large as a frame, extreme lengths, orders and offsets, valid
//! operations followed by garbage, and frames delivered whole, byte by
//! byte, in random chunks or split at every byte. Each frame goes to a
//! connection before its hello and to one after it. Asserted:
//!
//! - the service never panics, and every reply is a whole frame that
//!   decodes;
//! - before a hello, anything but a small, good hello closes the connection
//!   (one `Response::Error { closing: true }`), without the service
//!   allocating a batch for it, and without touching the memory manager;
//! - after a hello, every frame within [`MAX_FRAME`] gets exactly one reply
//!   once its last byte arrives, and never a close: a bad operation is an
//!   error reply, a batch counting more than [`MAX_BATCH_OPS`] is refused
//!   with `E2BIG` before anything (memory or heap) is reserved for it;
//! - once every connection has closed, free memory is what it was before.
//!
//! The binary's heap is memd-mm with the kernel's limits ([`KernelHeap`]:
//! a bounded arena, nothing above one 4 MiB buddy block), not the system
//! allocator. In the kernel the service's own allocations (the decoded
//! request, the reply) come from memd-mm, out of the clients' memory; a
//! hostile input that makes the service allocate beyond what the kernel's
//! heap gives aborts this test, as it would the guest, where the system
//! allocator would have served a 40 MiB vector without complaint.
//!
//! `cargo xtask fuzz` runs it with many more cases (PROPTEST_CASES).

mod kernel_heap;

use kernel_heap::{measure, HeapUse, KernelHeap};

#[global_allocator]
static HEAP: KernelHeap = KernelHeap::new();

use memd_mm::HostMm;
use memd_service::host::HostService;
use memd_service::{Config, ConnId, Flow};
use memd_wire::testing::{batch_counts, proptest_config};
use memd_wire::*;
use proptest::prelude::*;

const TOKEN: &str = "hostile-token";

/// Per-connection byte quota, so allocations past it are certain refusals.
const QUOTA_BYTES: u64 = 16 << 20;

/// Most operations one stress request may run.
const MAX_STRESS: u64 = 300;

/// Buddy orders of the memory manager the service runs over (the default,
/// as the kernel boots): orders from this one up are refused.
const MAX_ORDER: u8 = memd_mm::DEFAULT_MAX_ORDER as u8;

/// A frame longer than this is never a "small hello": before a hello the
/// service closes the connection on it. (The service's own limit is lower;
/// frames between the two may be answered either way.)
const HELLO_BOUND: usize = 4096;

/// The first byte of a hello's body: `Request::Hello`'s tag.
const HELLO_TAG: u8 = 0;

/// A good hello of at most this many bytes is always accepted.
const SMALL_HELLO: usize = 128;

/// Heap a refusal may take besides the frame's own bytes: the error
/// message, the reply's value and bookkeeping. A batch of more than a few
/// dozen decoded operations takes more than this.
const REFUSAL_SLACK: usize = 2048;

/// A request's body, or one operation as it sits inside a call or a
/// batch, as postcard writes it (with no frame limit: some tests need
/// bodies past it).
fn encoded<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    memd_wire::framing::encode_into(v, &mut out).expect("encodes");
    out
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// A handle: one from an earlier reply (counted back from the newest), or
/// made up.
#[derive(Debug, Clone, Copy)]
enum Hd {
    Seen(u8),
    Raw(u64),
}

/// A string or byte run described by its size, so that a failing case
/// prints a line, not a megabyte: `bytes` bytes of `ch` repeated (rounded
/// down to whole characters).
#[derive(Debug, Clone, Copy)]
struct Text {
    bytes: usize,
    ch: char,
}

impl Text {
    fn string(&self) -> String {
        std::iter::repeat_n(self.ch, self.bytes / self.ch.len_utf8()).collect()
    }

    fn data(&self) -> Vec<u8> {
        vec![self.ch as u32 as u8; self.bytes]
    }
}

/// An operation with hostile fields and symbolic handles.
#[derive(Debug, Clone)]
enum O {
    Status,
    AllocPages(u8, u32),
    FreePages(Hd),
    Kmalloc(u64, u32),
    Kfree(Hd),
    CacheCreate(Text, u32),
    DmaAlloc(u64, u64, u8),
    DmaFree(Hd),
    DmaWrite(Hd, u64, Text),
    DmaRead(Hd, u64, u32),
    DmaChecksum(Hd, u64, u64),
    Stress(u64, u64, u32),
}

/// A frame body.
#[derive(Debug, Clone)]
enum B {
    Call(O),
    /// An honest batch.
    Batch(bool, Vec<O>),
    /// A batch header claiming `count` operations, then `ops`, then `tail`
    /// (garbage).
    Claimed {
        stop: bool,
        count: u64,
        ops: Vec<O>,
        tail: Vec<u8>,
    },
    /// A batch of `n` copies of one small operation, counted honestly.
    Repeated {
        stop: bool,
        n: usize,
        op: O,
    },
    Hello {
        version: u32,
        good_token: bool,
        token: Text,
        client: Text,
    },
}

/// How a frame's bytes arrive.
#[derive(Debug, Clone)]
enum Feed {
    Whole,
    /// One byte at a time (frames above 16 KiB: 4093 at a time).
    Bytes,
    Chunks(Vec<usize>),
    /// Two parts, cut at this offset (modulo the length).
    Split(usize),
}

fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            u64::MAX,
            u64::MAX - 1,
            i64::MAX as u64,
            1 << 63,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            (4 << 20) - 1,
            4 << 20,
            (4 << 20) + 1,
            MAX_IO as u64,
            MAX_IO as u64 + 1,
            MAX_FRAME as u64,
            QUOTA_BYTES,
            QUOTA_BYTES + 1,
        ]),
        (0u32..64).prop_map(|s| 1u64 << s),
        (1u32..64).prop_map(|s| (1u64 << s) - 1),
        (0u32..63).prop_map(|s| (1u64 << s) + 1),
        0u64..9000,
        any::<u64>(),
    ]
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            u32::MAX,
            u32::MAX - 1,
            i32::MAX as u32,
            MAX_IO as u32,
            MAX_IO as u32 + 1,
            MAX_FRAME as u32,
        ]),
        (0u32..32).prop_map(|s| 1u32 << s),
        0u32..9000,
        any::<u32>(),
    ]
}

fn order() -> impl Strategy<Value = u8> {
    prop_oneof![0..MAX_ORDER, MAX_ORDER..64, 64u8..=255]
}

fn gfp_bits() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(Gfp::KERNEL.0), 1 => any::<u32>()]
}

fn hd() -> impl Strategy<Value = Hd> {
    prop_oneof![
        4 => any::<u8>().prop_map(Hd::Seen),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()].prop_map(Hd::Raw),
    ]
}

/// Sizes from nothing to past a whole frame, weighted to the edges.
fn size(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..64,
        2 => (MAX_NAME_LEN - 1)..=(MAX_NAME_LEN + 1),
        1 => (HELLO_BOUND - 8)..=(HELLO_BOUND + 8),
        1 => (max - 64)..=(max + 64),
        1 => 0..=max,
    ]
}

fn text(max: usize) -> impl Strategy<Value = Text> {
    (
        size(max),
        prop::sample::select(vec!['a', 'é', '\u{10ffff}', '\0']),
    )
        .prop_map(|(bytes, ch)| Text { bytes, ch })
}

/// A hostile operation; its strings and data reach `max_text` bytes (a
/// frame, for one operation alone).
fn op(max_text: usize) -> impl Strategy<Value = O> {
    prop_oneof![
        1 => Just(O::Status),
        2 => (order(), gfp_bits()).prop_map(|(o, g)| O::AllocPages(o, g)),
        1 => hd().prop_map(O::FreePages),
        2 => (extreme_u64(), gfp_bits()).prop_map(|(s, g)| O::Kmalloc(s, g)),
        1 => hd().prop_map(O::Kfree),
        1 => (text(max_text), extreme_u32()).prop_map(|(n, s)| O::CacheCreate(n, s)),
        3 => (extreme_u64(), extreme_u64(), 0u8..4).prop_map(|(l, a, m)| O::DmaAlloc(l, a, m)),
        1 => hd().prop_map(O::DmaFree),
        2 => (hd(), extreme_u64(), text(max_text)).prop_map(|(h, o, d)| O::DmaWrite(h, o, d)),
        2 => (hd(), extreme_u64(), extreme_u32()).prop_map(|(h, o, l)| O::DmaRead(h, o, l)),
        1 => (hd(), extreme_u64(), extreme_u64()).prop_map(|(h, o, l)| O::DmaChecksum(h, o, l)),
        1 => (prop_oneof![0..=MAX_STRESS, extreme_u64()], any::<u64>(), prop_oneof![0..=2u32, any::<u32>()])
            .prop_map(|(n, s, c)| O::Stress(n, s, c)),
    ]
}

/// Operations that encode in a few bytes, for batches of thousands.
fn small_op() -> impl Strategy<Value = O> {
    prop_oneof![
        Just(O::Status),
        (0u8..4).prop_map(|o| O::AllocPages(o, Gfp::KERNEL.0)),
        (1u64..100).prop_map(|s| O::Kmalloc(s, Gfp::KERNEL.0)),
        (0u64..100).prop_map(|h| O::Kfree(Hd::Raw(h))),
        (0u64..100).prop_map(|h| O::DmaRead(Hd::Raw(h), 0, 1)),
    ]
}

/// Repeat counts: at and around the limit, and up to what a frame holds of
/// one-byte operations.
fn repeat() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![MAX_BATCH_OPS, MAX_BATCH_OPS + 1]),
        (MAX_BATCH_OPS - 2)..=(MAX_BATCH_OPS + 2),
        1usize..=64,
        (MAX_BATCH_OPS + 1)..(MAX_FRAME - 16),
    ]
}

/// Strings and data of the operations in a batch: a batch of them still
/// fits a frame, and the test's own copies stay below the heap's 4 MiB
/// blocks.
const BATCH_TEXT: usize = MAX_FRAME / 8;

fn body() -> impl Strategy<Value = B> {
    prop_oneof![
        4 => op(MAX_FRAME).prop_map(B::Call),
        2 => (any::<bool>(), prop::collection::vec(op(BATCH_TEXT), 0..8)).prop_map(|(s, v)| B::Batch(s, v)),
        3 => (any::<bool>(), batch_counts(), prop::collection::vec(op(BATCH_TEXT), 0..6), prop::collection::vec(any::<u8>(), 0..24))
            .prop_map(|(stop, count, ops, tail)| B::Claimed { stop, count, ops, tail }),
        2 => (any::<bool>(), repeat(), small_op()).prop_map(|(stop, n, op)| B::Repeated { stop, n, op }),
        2 => (
            prop_oneof![3 => Just(PROTOCOL_VERSION), 1 => any::<u32>()],
            any::<bool>(),
            text(MAX_FRAME),
            text(MAX_FRAME),
        )
            .prop_map(|(version, good_token, token, mut client)| {
                // Each up to the frame limit, together not far past it.
                client.bytes = client.bytes.min((MAX_FRAME + 128).saturating_sub(token.bytes));
                B::Hello {
                    version,
                    good_token,
                    token,
                    client,
                }
            }),
    ]
}

fn feed() -> impl Strategy<Value = Feed> {
    prop_oneof![
        3 => Just(Feed::Whole),
        1 => Just(Feed::Bytes),
        2 => prop::collection::vec(1usize..5000, 1..16).prop_map(Feed::Chunks),
        2 => any::<usize>().prop_map(Feed::Split),
    ]
}

/// The pieces `frame` arrives in.
fn pieces<'a>(frame: &'a [u8], feed: &Feed) -> Vec<&'a [u8]> {
    match feed {
        Feed::Whole => vec![frame],
        Feed::Bytes if frame.len() <= 16 << 10 => frame.chunks(1).collect(),
        Feed::Bytes => frame.chunks(4093).collect(),
        Feed::Split(at) => {
            let at = at % (frame.len() + 1);
            vec![&frame[..at], &frame[at..]]
        }
        Feed::Chunks(sizes) => {
            let mut v = Vec::new();
            let mut rest = frame;
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].clamp(1, rest.len());
                v.push(&rest[..n]);
                rest = &rest[n..];
                i += 1;
            }
            v
        }
    }
}

/// Heap the frame decoder may take to buffer a body of `len` bytes: the
/// body itself when it arrives in one piece, less than four times it when
/// its buffer grows piece by piece (a doubling vector's sizes sum to less
/// than twice its last, which is less than twice the body).
fn buffer_budget(len: usize, pieces: usize) -> usize {
    if pieces <= 1 {
        len
    } else {
        4 * len
    }
}

/// What one frame's delivery produced.
#[derive(Debug)]
struct Sent {
    replies: Vec<Response>,
    flow: Flow,
    /// Bytes fed before the service said to stop (all of them when it
    /// did not).
    fed: usize,
    /// Replies that came out before the frame's last byte went in.
    early: usize,
    /// The heap this thread took inside the service.
    heap: HeapUse,
    /// Pieces the frame was fed in.
    pieces: usize,
}

fn is_e2big(r: &Response) -> bool {
    match r {
        Response::Error { error, closing } => error.code == errno::E2BIG && !closing,
        Response::Batch(rs) => matches!(&rs[..], [Err(e)] if e.code == errno::E2BIG),
        _ => false,
    }
}

struct World {
    host: HostService,
    authed: ConnId,
    /// Handles the authenticated connection was given, oldest first.
    seen: Vec<u64>,
    baseline: u64,
}

impl World {
    fn new() -> World {
        let mm = HostMm::three_zones(64 << 20, 0, "memd.dma_reserve=8M@dma32").unwrap();
        let mut config = Config::new(TOKEN);
        config.quota.bytes = QUOTA_BYTES;
        config.max_stress_ops = MAX_STRESS;
        let mut w = World {
            host: HostService::new(mm, config),
            authed: 0,
            seen: Vec::new(),
            baseline: 0,
        };
        w.baseline = w.host.available();
        w.login();
        w
    }

    fn login(&mut self) {
        self.authed = self.host.svc.on_connect();
        self.seen.clear();
        let hello = to_frame(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: TOKEN.into(),
            client: "hostile".into(),
        }))
        .unwrap();
        let s = self.send(self.authed, &hello, &Feed::Whole);
        assert!(
            matches!(
                (&s.replies[..], s.flow),
                ([Response::Hello(_)], Flow::Continue)
            ),
            "{s:?}"
        );
    }

    fn handle(&self, h: Hd) -> u64 {
        match h {
            Hd::Raw(x) => x,
            Hd::Seen(i) if !self.seen.is_empty() => {
                self.seen[self.seen.len() - 1 - i as usize % self.seen.len()]
            }
            Hd::Seen(i) => i as u64,
        }
    }

    fn op(&self, o: &O) -> Op {
        match o {
            O::Status => Op::Status,
            O::AllocPages(order, g) => Op::AllocPages {
                order: *order,
                gfp: Gfp(*g),
            },
            O::FreePages(h) => Op::FreePages {
                handle: self.handle(*h),
            },
            O::Kmalloc(size, g) => Op::Kmalloc {
                size: *size,
                gfp: Gfp(*g),
            },
            O::Kfree(h) => Op::Kfree {
                handle: self.handle(*h),
            },
            O::CacheCreate(name, size) => Op::CacheCreate(CacheSpec {
                name: name.string(),
                size: *size,
                align: 0,
                flags: SlabFlags::default(),
                ctor: Ctor::None,
            }),
            O::DmaAlloc(len, align, mask) => Op::DmaAlloc {
                len: *len,
                align: *align,
                mask: [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64][*mask as usize % 3],
                movable: false,
            },
            O::DmaFree(h) => Op::DmaFree {
                handle: self.handle(*h),
            },
            O::DmaWrite(h, offset, data) => Op::DmaWrite {
                handle: self.handle(*h),
                offset: *offset,
                data: data.data(),
            },
            O::DmaRead(h, offset, len) => Op::DmaRead {
                handle: self.handle(*h),
                offset: *offset,
                len: *len,
            },
            O::DmaChecksum(h, offset, len) => Op::DmaChecksum {
                handle: self.handle(*h),
                offset: *offset,
                len: *len,
            },
            O::Stress(ops, seed, cpus) => Op::Stress {
                ops: *ops,
                seed: *seed,
                cpus: *cpus,
            },
        }
    }

    fn body(&self, b: &B) -> Vec<u8> {
        match b {
            B::Call(o) => encoded(&Request::Call(self.op(o))),
            B::Batch(stop, ops) => encoded(&Request::Batch(Batch {
                stop_on_error: *stop,
                ops: ops.iter().map(|o| self.op(o)).collect(),
            })),
            B::Claimed {
                stop,
                count,
                ops,
                tail,
            } => {
                let mut body = batch_prefix(*stop, *count);
                for o in ops {
                    body.extend_from_slice(&encoded(&self.op(o)));
                }
                body.extend_from_slice(tail);
                body
            }
            B::Repeated { stop, n, op } => {
                let one = encoded(&self.op(op));
                // Within a frame: as many as fit (after the tag, the flag
                // and a count of up to ten bytes) when `n` would not.
                let n = (*n).min((MAX_FRAME - 12) / one.len());
                let mut body = batch_prefix(*stop, n as u64);
                body.reserve(n * one.len());
                for _ in 0..n {
                    body.extend_from_slice(&one);
                }
                body
            }
            B::Hello {
                version,
                good_token,
                token,
                client,
            } => encoded(&Request::Hello(Hello {
                version: *version,
                token: if *good_token {
                    TOKEN.into()
                } else {
                    token.string()
                },
                client: client.string(),
            })),
        }
    }

    /// Feeds `frame` to `conn` as `feed` says, stopping when the service
    /// closes it; checks that the output is whole frames that decode and
    /// that the memory manager's invariants hold.
    fn send(&mut self, conn: ConnId, frame: &[u8], feed: &Feed) -> Sent {
        // Room for any reply to a refusal, so the heap measured is the
        // service's own work, not the growth of this buffer.
        let mut out = Vec::with_capacity(64 << 10);
        let parts = pieces(frame, feed);
        let mut sent = Sent {
            replies: Vec::new(),
            flow: Flow::Continue,
            fed: 0,
            early: 0,
            heap: HeapUse {
                largest: 0,
                total: 0,
                count: 0,
            },
            pieces: parts.len(),
        };
        let mut frames = 0;
        for part in &parts {
            let host = &mut self.host;
            let (flow, used) = measure(|| host.on_bytes(conn, part, &mut out));
            sent.heap.largest = sent.heap.largest.max(used.largest);
            sent.heap.total += used.total;
            sent.heap.count += used.count;
            sent.fed += part.len();
            sent.flow = flow;
            frames = count_frames(&out);
            if sent.fed < frame.len() {
                sent.early = frames;
            }
            if flow != Flow::Continue {
                break;
            }
        }
        let mut d = FrameDecoder::new();
        let mut rest = &out[..];
        while let Some(body) = d.feed(&mut rest).expect("the service frames its replies") {
            sent.replies
                .push(decode_body::<Response>(&body).expect("every reply decodes"));
        }
        assert!(rest.is_empty() && d.is_idle(), "whole reply frames only");
        assert_eq!(sent.replies.len(), frames);
        if let Err(e) = self.host.mm.check() {
            panic!("invariant broken: {e:?}");
        }
        sent
    }

    /// Notes the handles an authenticated reply gave.
    fn note(&mut self, r: &Response) {
        let mut one = |r: &Result<Reply, WireError>| match r {
            Ok(
                Reply::Pages { handle, .. }
                | Reply::Object { handle, .. }
                | Reply::Created { handle },
            ) => self.seen.push(*handle),
            Ok(Reply::Dma(b)) => self.seen.push(b.handle),
            _ => {}
        };
        match r {
            Response::Call(r) => one(r),
            Response::Batch(rs) => rs.iter().for_each(one),
            _ => {}
        }
    }

    /// Sends `frame` on a new connection that has not said hello, checks
    /// what a hostile frame there may and may not do, and closes it.
    fn unauthenticated(&mut self, frame: &[u8], feed: &Feed) {
        let body = &frame[4..];
        let before = self.host.available();
        let conn = self.host.svc.on_connect();
        let s = self.send(conn, frame, feed);
        // Only a hello is decoded here: the test runs on the kernel's heap
        // too, where postcard's vector of a million operations would not
        // fit.
        let good_hello = body.first() == Some(&HELLO_TAG)
            && matches!(decode_body::<Request>(body),
                Ok(Request::Hello(h)) if h.version == PROTOCOL_VERSION && h.token == TOKEN);
        if good_hello && frame.len() <= SMALL_HELLO {
            assert!(
                matches!(
                    (&s.replies[..], s.flow),
                    ([Response::Hello(_)], Flow::Continue)
                ),
                "a small good hello is accepted: {s:?}"
            );
        } else if good_hello && frame.len() <= HELLO_BOUND {
            // Within the service's hello limit or not: accepted or closed.
            assert!(
                matches!(
                    (&s.replies[..], s.flow),
                    ([Response::Hello(_)], Flow::Continue)
                        | ([Response::Error { closing: true, .. }], Flow::Close)
                ),
                "{s:?}"
            );
        } else {
            assert_eq!(
                s.flow,
                Flow::Close,
                "before a hello, a frame of {} bytes that is not a small good hello closes the connection",
                frame.len()
            );
            assert!(
                matches!(&s.replies[..], [Response::Error { closing: true, .. }]),
                "one closing error: {:?}",
                s.replies
            );
        }
        // What the connection could have buffered: the body, up to the
        // hello bound; no decoded batch on top of it.
        let budget = buffer_budget(body.len().min(HELLO_BOUND), s.pieces) + REFUSAL_SLACK;
        assert!(
            s.heap.total <= budget,
            "before a hello the service took {} bytes of heap ({} requests, largest {}) for a frame of {} bytes (budget {budget}): it allocated for the request itself",
            s.heap.total,
            s.heap.count,
            s.heap.largest,
            frame.len()
        );
        self.host.on_close(conn);
        assert_eq!(
            self.host.available(),
            before,
            "an unauthenticated connection takes nothing from the memory manager"
        );
    }

    /// Sends `frame` on the authenticated connection and checks the reply.
    fn authenticated(&mut self, frame: &[u8], feed: &Feed) {
        let body = &frame[4..];
        let conn = self.authed;
        let before = self.host.available();
        let handles = self.host.svc.handles_of(conn);
        let s = self.send(conn, frame, feed);
        if body.len() > MAX_FRAME {
            assert_eq!(
                s.flow,
                Flow::Close,
                "a frame past the limit loses the framing"
            );
            assert!(
                matches!(&s.replies[..], [Response::Error { error, closing: true }] if error.code == errno::E2BIG),
                "{:?}",
                s.replies
            );
            assert!(
                s.heap.total <= REFUSAL_SLACK,
                "refused at its prefix, nothing buffered: {:?}",
                s.heap
            );
            self.host.on_close(conn);
            self.login();
            return;
        }
        let over = batch_count(body).filter(|&count| count > MAX_BATCH_OPS as u64);
        // Postcard, decoding the body, says what it holds (not for a batch
        // past the limit: it may not fit the test's heap either).
        let reference = over.is_none().then(|| decode_body::<Request>(body));
        let shutdown = match &reference {
            Some(Ok(Request::Batch(b))) => b.ops.contains(&Op::Shutdown),
            Some(Ok(Request::Call(op))) => *op == Op::Shutdown,
            _ => false,
        };
        if !shutdown {
            assert_eq!(
                s.flow,
                Flow::Continue,
                "an authenticated connection is never closed for what a frame holds: {:?}",
                s.replies
            );
        }
        assert_eq!(s.early, 0, "no reply before the frame's last byte");
        let [reply] = &s.replies[..] else {
            panic!("one reply per frame, got {:?}", s.replies);
        };
        self.note(reply);
        if shutdown && s.flow == Flow::Shutdown {
            // Garbage that decodes as a shutdown stops the service (the
            // kernel would stop): check this one, go on with a new one.
            self.restart();
            return;
        }
        if let Some(count) = over {
            assert!(
                is_e2big(reply),
                "a batch counting {count} ops is refused with E2BIG, got {}",
                short(reply)
            );
            assert_eq!(self.host.available(), before, "nothing ran");
            assert_eq!(self.host.svc.handles_of(conn), handles);
            let budget = buffer_budget(body.len(), s.pieces) + REFUSAL_SLACK;
            assert!(
                s.heap.total <= budget,
                "refusing a batch counting {count} ops took {} bytes of heap ({} requests, largest {}; budget {budget}): it reserved for the batch",
                s.heap.total,
                s.heap.count,
                s.heap.largest
            );
            return;
        }
        let reference = reference.expect("decoded unless past the limit");
        match (reference, reply) {
            (Err(_), Response::Error { closing, .. }) => {
                assert!(!closing, "a malformed body is an error reply, not a close")
            }
            (Ok(Request::Hello(_)), Response::Error { error, closing }) => {
                assert!(
                    !closing && error.code == errno::EPROTO,
                    "second hello: {error}"
                )
            }
            (Ok(Request::Call(op)), Response::Call(r)) => {
                if self.must_fail(&op) {
                    assert!(r.is_err(), "{} must fail: {r:?}", describe(&op));
                }
            }
            (Ok(Request::Batch(b)), Response::Batch(rs)) => {
                assert!(rs.len() <= b.ops.len(), "{} results", rs.len());
                let full =
                    |r: &Result<Reply, WireError>| matches!(r, Err(e) if e.code == errno::E2BIG);
                if rs.len() < b.ops.len() {
                    // Stopped: by an error (stop_on_error), or because the
                    // reply filled its frame.
                    let last = rs.last();
                    assert!(
                        last.is_some_and(|r| full(r) || (b.stop_on_error && r.is_err())),
                        "a batch of {} stopped after {} without an error",
                        b.ops.len(),
                        rs.len()
                    );
                }
                if b.stop_on_error && !rs.is_empty() {
                    assert!(
                        rs[..rs.len() - 1].iter().all(Result::is_ok),
                        "stop on error"
                    );
                }
                for (op, r) in b.ops.iter().zip(rs) {
                    if self.must_fail(op) {
                        assert!(r.is_err(), "{} must fail in a batch: {r:?}", describe(op));
                    }
                }
            }
            (reference, reply) => panic!(
                "reply {} does not answer {:?}",
                short(reply),
                reference.map(|r| short_req(&r))
            ),
        }
    }

    /// Whether `op` fails whatever state the connection is in: values no
    /// buffer, quota or buddy can satisfy, and handles never given.
    fn must_fail(&self, op: &Op) -> bool {
        let unknown = |h: &u64| !self.seen.contains(h);
        let past_any_buffer =
            |offset: u64, len: u64| offset.checked_add(len).is_none_or(|end| end > QUOTA_BYTES);
        match op {
            Op::AllocPages { order, .. } => *order >= MAX_ORDER,
            Op::Kmalloc { size, .. } => *size > kernel_heap::LARGEST_BLOCK as u64,
            Op::DmaAlloc { len, align, .. } => {
                *len == 0 || (*align != 0 && !align.is_power_of_two()) || *len > QUOTA_BYTES
            }
            Op::DmaRead {
                handle,
                offset,
                len,
            } => unknown(handle) || *len as usize > MAX_IO || past_any_buffer(*offset, *len as u64),
            Op::DmaWrite {
                handle,
                offset,
                data,
            } => unknown(handle) || past_any_buffer(*offset, data.len() as u64),
            Op::DmaChecksum { handle, offset, .. } => unknown(handle) || *offset > QUOTA_BYTES,
            Op::FreePages { handle } | Op::Kfree { handle } | Op::DmaFree { handle } => {
                unknown(handle)
            }
            Op::CacheCreate(CacheSpec { name, .. }) => name.is_empty() || name.len() > MAX_NAME_LEN,
            // The host has one CPU for stress.
            Op::Stress { ops, cpus, .. } => *ops > MAX_STRESS || *cpus > 1,
            _ => false,
        }
    }

    /// Sends one frame before and after a hello.
    fn both(&mut self, b: &B, feed: &Feed) {
        let frame = frame_of(&self.body(b));
        self.unauthenticated(&frame, feed);
        self.authenticated(&frame, feed);
    }

    /// [`World::finish`] this service, then carry on with a new one.
    fn restart(&mut self) {
        let old = std::mem::replace(self, World::new());
        old.finish();
    }

    /// Closes everything; free memory must be back at the baseline.
    fn finish(mut self) {
        self.host.on_close(self.authed);
        self.host.mm.set_fault(true, 0, 0, 0, 0).unwrap();
        self.host.mm.set_fault(false, 0, 0, 0, 0).unwrap();
        self.host.mm.check().unwrap();
        assert_eq!(self.host.svc.connections(), 0);
        assert_eq!(
            self.host.available(),
            self.baseline,
            "memory returned to the baseline"
        );
    }
}

fn count_frames(out: &[u8]) -> usize {
    let mut n = 0;
    let mut rest = out;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        if rest.len() < 4 + len {
            break;
        }
        rest = &rest[4 + len..];
        n += 1;
    }
    n
}

/// An operation without its bulk (a DMA write's data, a long name).
fn describe(op: &Op) -> String {
    match op {
        Op::DmaWrite {
            handle,
            offset,
            data,
        } => format!(
            "DmaWrite {{ handle: {handle}, offset: {offset}, {} bytes }}",
            data.len()
        ),
        Op::CacheCreate(CacheSpec { name, size, .. }) => {
            format!("CacheCreate {{ {}-byte name, size: {size} }}", name.len())
        }
        op => format!("{op:?}"),
    }
}

fn short(r: &Response) -> String {
    match r {
        Response::Batch(rs) if rs.len() > 4 => {
            format!("Batch of {} results, first {:?}", rs.len(), rs[0])
        }
        r => {
            let s = format!("{r:?}");
            s.chars().take(300).collect()
        }
    }
}

fn short_req(r: &Request) -> String {
    match r {
        Request::Batch(b) => format!("Batch of {} ops", b.ops.len()),
        Request::Call(op) => describe(op),
        Request::Hello(h) => format!(
            "Hello v{} ({}-byte token, {}-byte client)",
            h.version,
            h.token.len(),
            h.client.len()
        ),
    }
}

#[test]
fn the_heap_has_the_kernels_limits() {
    kernel_heap::assert_kernel_limits(&HEAP);
}

#[test]
fn the_hello_tag_is_postcards() {
    let hello = encoded(&Request::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: TOKEN.into(),
        client: String::new(),
    }));
    assert_eq!(hello[0], HELLO_TAG);
    assert_ne!(batch_prefix(false, 0)[0], HELLO_TAG);
}

proptest! {
    // PROPTEST_CASES overrides the count (cargo xtask fuzz).
    #![proptest_config(proptest_config(24))]

    /// Frames of every hostile shape, before and after a hello.
    #[test]
    fn hostile_frames_before_and_after_hello(frames in prop::collection::vec((body(), feed()), 1..6)) {
        let mut w = World::new();
        for (b, f) in &frames {
            w.both(b, f);
        }
        w.finish();
    }

    /// Batch headers counting anything from nothing to `u64::MAX`, with a
    /// few operations behind and garbage after.
    #[test]
    fn batch_counts_claim_what_is_not_there(
        batches in prop::collection::vec(
            (any::<bool>(), batch_counts(), prop::collection::vec(op(BATCH_TEXT), 0..4), prop::collection::vec(any::<u8>(), 0..8), feed()),
            1..8,
        )
    ) {
        let mut w = World::new();
        for (stop, count, ops, tail, f) in batches {
            w.both(&B::Claimed { stop, count, ops, tail }, &f);
        }
        w.finish();
    }

    /// Small hostile frames cut into two at every byte, and fed one byte
    /// at a time.
    #[test]
    fn small_frames_split_at_every_byte(b in prop_oneof![
        small_op().prop_map(B::Call),
        (any::<bool>(), prop::collection::vec(small_op(), 0..6)).prop_map(|(s, v)| B::Batch(s, v)),
        (any::<bool>(), batch_counts(), prop::collection::vec(small_op(), 0..3), prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(stop, count, ops, tail)| B::Claimed { stop, count, ops, tail }),
        (any::<bool>(), text(64), text(64)).prop_map(|(good_token, token, client)| B::Hello {
            version: PROTOCOL_VERSION, good_token, token, client,
        }),
    ]) {
        let mut w = World::new();
        let frame = frame_of(&w.body(&b));
        if frame.len() <= 512 {
            for at in 0..=frame.len() {
                w.unauthenticated(&frame, &Feed::Split(at));
                w.authenticated(&frame, &Feed::Split(at));
            }
        }
        w.both(&b, &Feed::Bytes);
        w.finish();
    }
}

/// A body of exactly `len` bytes: `make(n)` for the `n` that gets there
/// (the length prefix of a string or vector grows with it).
fn exactly(len: usize, make: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    let overhead = make(0).len() - 1;
    for prefix in 1..=5 {
        if let Some(n) = len.checked_sub(overhead + prefix) {
            let body = make(n);
            if body.len() == len {
                return body;
            }
        }
    }
    panic!("no body of {len} bytes");
}

/// Strings, DMA data and batches filling a frame exactly, and one byte
/// past it.
#[test]
fn frames_at_the_frame_limit() {
    let mut w = World::new();
    let name = |n: usize| {
        encoded(&Request::Call(Op::CacheCreate(CacheSpec {
            name: "n".repeat(n),
            size: 64,
            align: 0,
            flags: SlabFlags::default(),
            ctor: Ctor::None,
        })))
    };
    let write = |n: usize| {
        encoded(&Request::Call(Op::DmaWrite {
            handle: 1,
            offset: 0,
            data: vec![0xee; n],
        }))
    };
    let hello = |n: usize| {
        encoded(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: TOKEN.into(),
            client: "c".repeat(n),
        }))
    };
    let token = |n: usize| {
        encoded(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: "t".repeat(n),
            client: String::new(),
        }))
    };
    for make in [&name as &dyn Fn(usize) -> Vec<u8>, &write, &hello, &token] {
        for len in [MAX_FRAME, MAX_FRAME + 1] {
            let frame = frame_of(&exactly(len, make));
            assert_eq!(frame.len(), len + 4);
            for feed in [Feed::Whole, Feed::Chunks(vec![65536, 1, 4093])] {
                w.unauthenticated(&frame, &feed);
                w.authenticated(&frame, &feed);
            }
        }
    }
    // A batch of one-byte operations filling the frame: 1 MiB of them,
    // 256 times the limit.
    let status = encoded(&Op::Status);
    assert_eq!(status.len(), 1);
    // The tag, the flag and a three-byte count, then the operations.
    let n = MAX_FRAME - 5;
    let mut body = batch_prefix(false, n as u64);
    body.resize(body.len() + n, status[0]);
    assert_eq!(body.len(), MAX_FRAME);
    let frame = frame_of(&body);
    w.unauthenticated(&frame, &Feed::Whole);
    w.authenticated(&frame, &Feed::Whole);
    w.finish();
}

/// Exactly [`MAX_BATCH_OPS`] operations run, every one answered; one more
/// is refused whole.
#[test]
fn batches_at_and_past_the_limit() {
    let mut w = World::new();
    let kmallocs = |n| B::Repeated {
        stop: false,
        n,
        op: O::Kmalloc(64, Gfp::KERNEL.0),
    };
    let frame = frame_of(&w.body(&kmallocs(MAX_BATCH_OPS)));
    let s = w.send(w.authed, &frame, &Feed::Whole);
    let [Response::Batch(rs)] = &s.replies[..] else {
        panic!("{:?}", s.replies.iter().map(short).collect::<Vec<_>>());
    };
    assert_eq!(rs.len(), MAX_BATCH_OPS, "every op at the limit runs");
    assert!(rs.iter().all(|r| matches!(r, Ok(Reply::Object { .. }))));
    assert_eq!(w.host.svc.handles_of(w.authed), Some(MAX_BATCH_OPS));

    let before = w.host.available();
    let frame = frame_of(&w.body(&kmallocs(MAX_BATCH_OPS + 1)));
    let s = w.send(w.authed, &frame, &Feed::Whole);
    assert!(
        matches!(&s.replies[..], [r] if is_e2big(r)),
        "one op past the limit: {:?}",
        s.replies.iter().map(short).collect::<Vec<_>>()
    );
    assert_eq!(s.flow, Flow::Continue);
    assert_eq!(w.host.available(), before, "none of it ran");
    assert_eq!(w.host.svc.handles_of(w.authed), Some(MAX_BATCH_OPS));
    // And the general checks, for both sides of the hello.
    w.both(&kmallocs(MAX_BATCH_OPS + 1), &Feed::Chunks(vec![7, 4096]));
    w.finish();
}
