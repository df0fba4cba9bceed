//! Fuzzing the frame decoder and the message decoding with proptest (stable
//! Rust, runs in `cargo test`; `cargo xtask fuzz` runs it with many more
//! cases). Hostile input must give an error, never a panic, and the decoder
//! must stay failed after an error. Anything that decodes must re-encode to
//! the same value.
//!
//! Random bytes rarely form a frame, so most targets here build well-formed
//! ones with hostile contents: honest length prefixes and valid variant
//! tags around batch counts that claim up to `u64::MAX` operations with a
//! few bytes behind, counts at and past [`MAX_BATCH_OPS`], strings and data
//! as large as a frame (and one byte more), extreme lengths, orders and
//! offsets, valid operations followed by garbage, frames cut at every byte.
//!
//! Decoding must not reserve memory for what a body only claims. In the
//! kernel, the decoded request lives on memd-mm's heap, shared with the
//! clients; so the test binary's allocator ([`Counting`]) records the
//! largest block each decode asks for, and no decode may ask for more than
//! a frame or the vector of a full batch ([`decode_bound`]). A batch
//! announcing more than [`MAX_BATCH_OPS`] operations must be refused before
//! its vector is reserved.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use memd_wire::testing::{batch_counts, proptest_config};
use memd_wire::*;
use proptest::prelude::*;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, recording the largest block the current thread
/// asks for while [`largest_block`] watches. Its cells are const and have
/// no destructor, so touching them never allocates.
struct Counting;

fn note(size: usize) {
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
    }
}

// SAFETY: forwards every call to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the largest block this thread asked
/// for meanwhile.
fn largest_block<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|c| c.set(0));
    WATCHING.with(|c| c.set(true));
    let r = f();
    WATCHING.with(|c| c.set(false));
    (r, LARGEST.with(Cell::get))
}

/// The largest block decoding one body may take: a frame's worth (a
/// string or byte vector as long as the body, or what serde reserves ahead
/// for a sequence, at most 1 MiB) or the operation vector of a full batch.
fn decode_bound() -> usize {
    MAX_FRAME.max(MAX_BATCH_OPS * std::mem::size_of::<Op>())
}

/// The operation count a batch body announces (its `Request::Batch` tag,
/// its stop flag, then a varint of up to ten bytes), if it is one.
fn claimed_count(body: &[u8]) -> Option<u64> {
    let header = batch_prefix(false, 0);
    if body.len() <= header.len() || body[0] != header[0] || body[1] > 1 {
        return None;
    }
    let mut v = 0u64;
    for (i, b) in body[2..].iter().take(10).enumerate() {
        v |= ((b & 0x7f) as u64).checked_shl(7 * i as u32).unwrap_or(0);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Feeds `bytes` to a fresh decoder in chunks of the given sizes; every
/// frame body that comes out is decoded as a request (and as a response).
/// Returns the bodies and whether the decoder failed.
fn feed(bytes: &[u8], chunks: &[usize]) -> (Vec<Vec<u8>>, bool) {
    let mut d = FrameDecoder::new();
    let mut bodies = Vec::new();
    let mut rest = bytes;
    let mut ci = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(ci)
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        ci += 1;
        let mut chunk = &rest[..n];
        rest = &rest[n..];
        loop {
            match d.feed(&mut chunk) {
                Ok(Some(body)) => {
                    assert!(body.len() <= MAX_FRAME);
                    check_body(&body);
                    bodies.push(body);
                }
                Ok(None) => {
                    assert!(
                        chunk.is_empty(),
                        "the decoder stops only when input is used up"
                    );
                    break;
                }
                Err(e) => {
                    // Failed for good: the next call fails the same way.
                    let mut more: &[u8] = &[0, 0, 0, 0];
                    assert_eq!(d.feed(&mut more), Err(e));
                    return (bodies, true);
                }
            }
        }
    }
    (bodies, false)
}

/// Decoding a body never panics; what decodes re-encodes to the same
/// value, and the fast batch reader agrees with postcard. (Not always to
/// the same bytes: postcard accepts overlong varints, such as `80 00` for
/// 0, and writes them short.)
///
/// A batch that announces more than [`MAX_BATCH_OPS`] operations is refused
/// as such, whatever follows its count; no decode asks for a block above
/// [`decode_bound`].
fn check_body(body: &[u8]) {
    let (fast, largest) = largest_block(|| decode_request(body));
    assert!(
        largest <= decode_bound(),
        "decoding a body of {} bytes asked for a block of {largest} (bound {})",
        body.len(),
        decode_bound()
    );
    if let Some(count) = claimed_count(body).filter(|&n| n > MAX_BATCH_OPS as u64) {
        assert_eq!(fast, Err(FrameError::TooManyOps { count }));
        // Postcard would build the whole vector: nothing to compare.
        return;
    }
    if let Ok(req) = decode_body::<Request>(body) {
        let frame = to_frame(&req).expect("a decoded request re-encodes");
        assert_eq!(decode_body::<Request>(&frame[4..]).unwrap(), req);
        assert_eq!(fast.unwrap(), req, "decode_request agrees");
    } else {
        assert!(
            fast.is_err(),
            "decode_request refuses what postcard refuses"
        );
    }
    if let Ok(resp) = decode_body::<Response>(body) {
        let frame = to_frame(&resp).expect("a decoded response re-encodes");
        assert_eq!(decode_body::<Response>(&frame[4..]).unwrap(), resp);
    }
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Valid requests to mutate.
fn seeds() -> Vec<Request> {
    vec![
        Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: "token".into(),
            client: "fuzz".into(),
        }),
        Request::Call(Op::Meminfo),
        Request::Call(Op::AllocPages {
            order: 3,
            gfp: Gfp::KERNEL | Gfp::ZERO,
        }),
        Request::Call(Op::CacheCreate(CacheSpec {
            name: "fuzz".into(),
            size: 96,
            align: 8,
            flags: SlabFlags::POISON,
            ctor: Ctor::Fill(7),
        })),
        Request::Call(Op::DmaWrite {
            handle: 9,
            offset: 4096,
            data: vec![1, 2, 3, 4, 5],
        }),
        Request::Batch(Batch {
            stop_on_error: true,
            ops: vec![
                Op::Kmalloc {
                    size: 100,
                    gfp: Gfp::KERNEL,
                },
                Op::Kfree { handle: 1 },
                Op::FaultInject {
                    target: FaultTarget::Slab,
                    config: FaultConfig {
                        probability: 5,
                        interval: 1,
                        times: -1,
                    },
                },
                Op::Faults,
            ],
        }),
    ]
}

proptest! {
    // PROPTEST_CASES overrides the count (cargo xtask fuzz).
    #![proptest_config(proptest_config(512))]

    /// Random bytes in random chunks.
    #[test]
    fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                    chunks in proptest::collection::vec(1usize..64, 0..64)) {
        feed(&bytes, &chunks);
    }

    /// Random bodies behind honest length prefixes: every frame comes out
    /// whole, whatever the chunking, and decoding it never panics.
    #[test]
    fn random_bodies_in_honest_frames(bodies in proptest::collection::vec(
                                          proptest::collection::vec(any::<u8>(), 0..256), 0..8),
                                      chunks in proptest::collection::vec(1usize..32, 0..128)) {
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame_of(b)).collect();
        let (got, failed) = feed(&stream, &chunks);
        prop_assert!(!failed);
        prop_assert_eq!(got, bodies);
    }

    /// Valid requests with bytes flipped, inserted or cut: decoding gives
    /// a request or an error, never a panic.
    #[test]
    fn mutated_requests(seed in 0usize..6,
                        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
                        cut in proptest::option::of(any::<usize>()),
                        insert in proptest::option::of((any::<usize>(), any::<u8>()))) {
        let req = &seeds()[seed];
        let mut body = to_frame(req).unwrap()[4..].to_vec();
        for (i, x) in flips {
            if !body.is_empty() {
                let n = body.len();
                body[i % n] ^= x;
            }
        }
        if let Some((i, b)) = insert {
            let at = i % (body.len() + 1);
            body.insert(at, b);
        }
        if let Some(c) = cut {
            body.truncate(c % (body.len() + 1));
        }
        check_body(&body);
        feed(&frame_of(&body), &[3, 1, 7]);
    }

    /// A length prefix beyond the maximum fails as soon as the prefix is
    /// complete, without waiting for (or buffering) the body.
    #[test]
    fn oversize_prefix_fails_at_once(len in (MAX_FRAME as u32 + 1)..=u32::MAX,
                                     split in 1usize..4) {
        let prefix = len.to_le_bytes();
        let mut d = FrameDecoder::new();
        let mut a = &prefix[..split];
        prop_assert_eq!(d.feed(&mut a), Ok(None));
        let mut b = &prefix[split..];
        let too_large = matches!(d.feed(&mut b), Err(FrameError::TooLarge { .. }));
        prop_assert!(too_large);
    }
}

/// Findings kept as regression tests.
#[test]
fn regression_inputs() {
    // A zero-length frame is a valid frame with an empty body (which does
    // not decode as a message).
    let (bodies, failed) = feed(&[0, 0, 0, 0], &[]);
    assert!(!failed);
    assert_eq!(bodies, vec![Vec::<u8>::new()]);
    assert!(decode_body::<Request>(&[]).is_err());
    // A batch claiming 2^32 operations with no bytes behind them.
    assert!(decode_body::<Request>(&[2, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    // A string length far beyond the body.
    assert!(decode_body::<Request>(&[0, 1, 0xff, 0xff, 0xff, 0x7f]).is_err());
    // A batch with an overlong varint (`80 00`, 0) in an operation that
    // goes through postcard: accepted, and re-encoded short.
    check_body(&[2, 1, 4, 12, 100, 1, 13, 1, 33, 128, 0, 5, 1, 1, 35]);
    assert!(decode_body::<Request>(&[2, 1, 4, 12, 100, 1, 13, 1, 33, 128, 0, 5, 1, 1, 35]).is_ok());
}

/// A request's or an operation's encoding, with no frame limit (some
/// bodies here are past it).
fn body_of<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    memd_wire::framing::encode_into(v, &mut out).expect("encodes");
    out
}

fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            u64::MAX,
            i64::MAX as u64,
            1 << 63,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            4 << 20,
            (4 << 20) + 1,
            MAX_IO as u64 + 1,
            MAX_FRAME as u64,
        ]),
        (0u32..64).prop_map(|s| 1u64 << s),
        (1u32..64).prop_map(|s| (1u64 << s) - 1),
        any::<u64>(),
    ]
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![0, 1, u32::MAX, MAX_IO as u32 + 1, MAX_FRAME as u32]),
        (0u32..32).prop_map(|s| 1u32 << s),
        any::<u32>(),
    ]
}

/// A length from nothing to a little past a frame, weighted to the edges.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..64,
        1 => (MAX_NAME_LEN - 1)..=(MAX_NAME_LEN + 1),
        1 => (MAX_FRAME - 64)..=(MAX_FRAME + 64),
        1 => 0..=MAX_FRAME,
    ]
}

/// Operations with extreme fields; strings and data up to `max_len` bytes.
fn hostile_op(max_len: usize) -> impl Strategy<Value = Op> {
    let len = move || length().prop_map(move |n| n.min(max_len));
    prop_oneof![
        Just(Op::Status),
        (any::<u8>(), any::<u32>()).prop_map(|(order, g)| Op::AllocPages { order, gfp: Gfp(g) }),
        (extreme_u64(), any::<u32>()).prop_map(|(size, g)| Op::Kmalloc { size, gfp: Gfp(g) }),
        extreme_u64().prop_map(|handle| Op::Kfree { handle }),
        (len(), extreme_u32()).prop_map(|(n, size)| Op::CacheCreate(CacheSpec {
            name: "é".repeat(n / 2),
            size,
            align: 0,
            flags: SlabFlags::default(),
            ctor: Ctor::None,
        })),
        (extreme_u64(), extreme_u64(), 0u8..3).prop_map(|(len, align, m)| Op::DmaAlloc {
            len,
            align,
            mask: [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64][m as usize],
            movable: false,
        }),
        (extreme_u64(), extreme_u64(), len()).prop_map(|(handle, offset, n)| Op::DmaWrite {
            handle,
            offset,
            data: vec![0xa5; n],
        }),
        (extreme_u64(), extreme_u64(), extreme_u32()).prop_map(|(handle, offset, len)| {
            Op::DmaRead {
                handle,
                offset,
                len,
            }
        }),
        (extreme_u64(), extreme_u64(), extreme_u64()).prop_map(|(handle, offset, len)| {
            Op::DmaChecksum {
                handle,
                offset,
                len,
            }
        }),
        (extreme_u64(), any::<u64>(), any::<u32>()).prop_map(|(ops, seed, cpus)| Op::Stress {
            ops,
            seed,
            cpus
        }),
        (any::<u8>(), any::<u32>(), any::<i64>()).prop_map(|(probability, interval, times)| {
            Op::FaultInject {
                target: FaultTarget::Slab,
                config: FaultConfig {
                    probability,
                    interval,
                    times,
                },
            }
        }),
    ]
}

/// A batch header claiming `count` operations, then `ops` (however many
/// that is), then `tail`.
fn claimed_batch(stop: bool, count: u64, ops: &[Op], tail: &[u8]) -> Vec<u8> {
    let mut body = batch_prefix(stop, count);
    for op in ops {
        body.extend_from_slice(&body_of(op));
    }
    body.extend_from_slice(tail);
    body
}

/// Feeds one frame in every two-part split (small frames) or in the given
/// chunks (large ones): a frame within [`MAX_FRAME`] comes out whole, one
/// past it fails at its prefix.
fn feed_frame(body: &[u8], chunks: &[usize]) {
    let frame = frame_of(body);
    let within = body.len() <= MAX_FRAME;
    let check = |(bodies, failed): (Vec<Vec<u8>>, bool)| {
        if within {
            assert!(!failed);
            assert_eq!(bodies.len(), 1);
            assert_eq!(bodies[0], body);
        } else {
            assert!(failed && bodies.is_empty(), "refused at the prefix");
        }
    };
    if frame.len() <= 512 {
        for at in 0..=frame.len() {
            check(feed(&frame, &[at, frame.len()]));
        }
    }
    check(feed(&frame, chunks));
}

proptest! {
    // PROPTEST_CASES overrides the count (cargo xtask fuzz).
    #![proptest_config(proptest_config(64))]

    /// Batches whose count claims anything up to `u64::MAX`, with a few
    /// hostile operations behind it and garbage after.
    #[test]
    fn batch_counts_claim_what_is_not_there(
        stop: bool,
        count in batch_counts(),
        ops in prop::collection::vec(hostile_op(MAX_FRAME / 16), 0..6),
        tail in prop::collection::vec(any::<u8>(), 0..16),
        chunks in prop::collection::vec(1usize..5000, 0..8),
    ) {
        let body = claimed_batch(stop, count, &ops, &tail);
        feed_frame(&body, &chunks);
        if count == ops.len() as u64 && tail.is_empty() && body.len() <= MAX_FRAME {
            // Honest: decodes to exactly these operations.
            prop_assert_eq!(decode_request(&body), Ok(Request::Batch(Batch { stop_on_error: stop, ops })));
        }
    }

    /// Honest batches of one small operation repeated at, around and far
    /// past the limit (up to a frame of one-byte operations).
    #[test]
    fn repeated_ops_around_the_limit(
        n in prop_oneof![
            (MAX_BATCH_OPS - 2)..=(MAX_BATCH_OPS + 2),
            (MAX_BATCH_OPS + 1)..(MAX_FRAME - 16),
        ],
        op in prop_oneof![
            Just(Op::Status),
            (0u64..100).prop_map(|handle| Op::Kfree { handle }),
            (1u64..100).prop_map(|size| Op::Kmalloc { size, gfp: Gfp::KERNEL }),
        ],
        stop: bool,
    ) {
        let one = body_of(&op);
        let n = n.min((MAX_FRAME - 16) / one.len());
        let ops = vec![op; n];
        let body = claimed_batch(stop, n as u64, &ops, &[]);
        prop_assert!(body.len() <= MAX_FRAME);
        feed_frame(&body, &[65536]);
        if n <= MAX_BATCH_OPS {
            prop_assert_eq!(decode_request(&body), Ok(Request::Batch(Batch { stop_on_error: stop, ops })));
        } else {
            prop_assert_eq!(decode_request(&body), Err(FrameError::TooManyOps { count: n as u64 }));
        }
    }

    /// Calls and hellos with strings and data up to a frame and past it,
    /// and extreme lengths, orders and offsets.
    #[test]
    fn hostile_calls_and_hellos(
        msg in prop_oneof![
            hostile_op(MAX_FRAME + 64).prop_map(Request::Call),
            (any::<u32>(), length(), length()).prop_map(|(version, t, c)| Request::Hello(Hello {
                version,
                token: "t".repeat(t),
                client: "c".repeat(c),
            })),
        ],
        tail in prop::collection::vec(any::<u8>(), 0..4),
        chunks in prop::collection::vec(1usize..70000, 0..8),
    ) {
        let mut body = body_of(&msg);
        body.extend_from_slice(&tail);
        feed_frame(&body, &chunks);
        if body.len() <= MAX_FRAME {
            let want = if tail.is_empty() { Ok(msg) } else { Err(FrameError::TrailingBytes) };
            prop_assert_eq!(decode_request(&body), want);
        }
    }
}
