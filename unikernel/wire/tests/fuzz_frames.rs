//! Fuzzing the frame decoder and the message decoding with proptest (stable
//! Rust, runs in `cargo test`; `cargo xtask fuzz` runs it with many more
//! cases). Hostile input must give an error, never a panic, never an
//! allocation beyond what arrived, and the decoder must stay failed after
//! an error. Anything that decodes must re-encode to the same bytes.

use memd_wire::*;
use proptest::prelude::*;

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
fn check_body(body: &[u8]) {
    let fast = decode_request(body);
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
        Request::Call(Op::CacheCreate {
            name: "fuzz".into(),
            size: 96,
            align: 8,
            flags: SlabFlags::POISON,
            ctor: Ctor::Fill(7),
        }),
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
    #![proptest_config(ProptestConfig {
        // Overridden by PROPTEST_CASES (cargo xtask fuzz).
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

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
