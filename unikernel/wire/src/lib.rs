//! memd's control protocol.
//!
//! - [`framing`]: length-prefixed frames (u32 little-endian length, postcard
//!   body), [`MAX_FRAME`], and the streaming [`FrameDecoder`].
//! - [`msg`]: [`Request`] / [`Response`], the handshake, every [`Op`] and
//!   its [`Reply`].
//! - [`stats`]: the statistics views.
//! - [`memmap`]: the physical memory map.
//! - [`flags`]: GFP flags, slab flags, DMA masks.
//!
//! Where memd-mm's type carries what the wire does (`MemInfo`, `SlabInfo`,
//! `FaultAttr`, `RunKind`, `DmaSource`, the flag sets, the counters the
//! views embed) the wire carries memd-mm's, re-exported here; its field
//! order is the protocol's, pinned by `tests/encoding.rs`
//! (docs/design-notes.md).
//! - [`error`]: errno-style [`WireError`]s (numbers from hermit-abi).
//! - [`pattern`]: the DMA fill pattern and checksum, so clients can verify.
//! - [`passes`]: how long the service loop's passes took.
//! - `testing` (feature `proptest`): test support for the property tests
//!   of memd-wire and memd-service, not part of the protocol.
//!
//! A session: the client sends `Request::Hello` with [`PROTOCOL_VERSION`]
//! and the token; the service answers `Response::Hello` or
//! `Response::Error { closing: true }`. Then each request gets exactly one
//! response, in order.
#![no_std]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(feature = "proptest")]
extern crate std;

pub mod batch;
pub mod batch_decode;
pub mod error;
pub mod flags;
pub mod framing;
pub mod memmap;
pub mod msg;
pub mod passes;
pub mod pattern;
pub mod stats;
#[cfg(feature = "proptest")]
pub mod testing;

pub use batch::{BatchReplyMark, BatchReplyWriter, PLAIN_RESULT_MAX};
pub use batch_decode::{batch_count, batch_prefix, decode_request};
pub use error::{errno, errno_name, WireError};
pub use flags::{DmaMask, Gfp, SlabFlags};
pub use framing::{decode_body, encode_frame, to_frame, FrameDecoder, FrameError, MAX_FRAME};
pub use memmap::*;
pub use msg::*;
pub use passes::{LoopPasses, PassHistogram, PASS_BUCKETS};
pub use pattern::{checksum, fill_pattern, Checksum};
pub use stats::*;

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec;
    use alloc::vec::Vec;

    fn roundtrip<T>(v: &T)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + core::fmt::Debug,
    {
        let frame = to_frame(v).unwrap();
        let mut d = FrameDecoder::new();
        let mut input = &frame[..];
        let body = d.feed(&mut input).unwrap().unwrap();
        assert!(input.is_empty());
        assert_eq!(&decode_body::<T>(&body).unwrap(), v);
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: "secret".into(),
            client: "test".into(),
        }));
        let ops = vec![
            Op::Status,
            Op::AllocPages {
                order: 3,
                gfp: Gfp::KERNEL | Gfp::ZERO,
            },
            Op::CacheCreate(CacheSpec {
                name: "foo".into(),
                size: 96,
                align: 8,
                flags: SlabFlags::POISON,
                ctor: Ctor::Fill(0xa5),
            }),
            Op::PoolCreate {
                backing: PoolBacking::Pages { order: 1 },
                min_nr: 4,
            },
            Op::DmaAlloc {
                len: 64 << 20,
                align: 4096,
                mask: DmaMask::Bits32,
                movable: false,
            },
            Op::DmaWrite {
                handle: 9,
                offset: 5,
                data: vec![1, 2, 3],
            },
            Op::FaultInject {
                target: FaultTarget::Slab,
                config: FaultConfig {
                    probability: 10,
                    interval: 1,
                    times: -1,
                },
            },
            Op::Shutdown,
        ];
        for op in &ops {
            roundtrip(&Request::Call(op.clone()));
        }
        roundtrip(&Request::Batch(Batch {
            stop_on_error: true,
            ops,
        }));
    }

    #[test]
    fn responses_roundtrip() {
        roundtrip(&Response::Hello(HelloAck {
            version: 1,
            conn: 3,
            quota: Quota {
                pages: 1,
                bytes: 2,
                handles: 3,
                caches: 4,
            },
            role: Role::Operator,
        }));
        roundtrip(&Response::Call(Ok(Reply::Zoneinfo(vec![ZoneInfo {
            name: "DMA".into(),
            free_blocks: vec![1, 2, 3],
            lowmem_reserve: vec![0, 10, 20],
            ..Default::default()
        }]))));
        roundtrip(&Response::Batch(vec![
            Ok(Reply::Object {
                handle: 1,
                addr: 0x1000,
                size: 64,
            }),
            Err(WireError::new(errno::ENOMEM, "out of memory")),
        ]));
        roundtrip(&Response::Error {
            error: WireError::new(errno::EACCES, "bad token"),
            closing: true,
        });
    }

    #[test]
    fn errno_names() {
        let e = WireError::new(errno::EBUSY, "2 objects live");
        assert_eq!(e.code_name(), "EBUSY");
        assert_eq!(alloc::format!("{e}"), "EBUSY (16): 2 objects live");
        assert_eq!(
            errno_name(9999),
            "E?",
            "an unknown code has a name that says so"
        );
        for (code, name) in [
            (errno::ENOMEM, "ENOMEM"),
            (errno::EDQUOT, "EDQUOT"),
            (errno::EPERM, "EPERM"),
            (errno::E2BIG, "E2BIG"),
            (errno::ENOSPC, "ENOSPC"),
        ] {
            assert_eq!(errno_name(code), name);
            assert_eq!(WireError::new(code, "x").code_name(), name);
        }
        let names: Vec<String> = [errno::ENOENT, errno::EIO, errno::EINVAL, errno::EPROTO]
            .iter()
            .map(|&c| errno_name(c).into())
            .collect();
        assert_eq!(names, ["ENOENT", "EIO", "EINVAL", "EPROTO"]);
    }

    #[test]
    fn max_io_read_reply_fits_a_frame() {
        let r = Response::Call(Ok(Reply::Data(vec![0xff; MAX_IO])));
        assert!(to_frame(&r).is_ok());
        let batch: Vec<Result<Reply, WireError>> = vec![
            Ok(Reply::Data(vec![0; MAX_IO])),
            Ok(Reply::Data(vec![0; MAX_IO])),
        ];
        assert!(matches!(
            to_frame(&Response::Batch(batch)),
            Err(FrameError::TooLarge { .. })
        ));
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Op::Status),
            Just(Op::Buddyinfo),
            (any::<u8>(), any::<u32>())
                .prop_map(|(order, g)| Op::AllocPages { order, gfp: Gfp(g) }),
            (any::<u64>(), any::<u32>()).prop_map(|(size, g)| Op::Kmalloc { size, gfp: Gfp(g) }),
            (".{0,40}", any::<u32>(), any::<u32>(), any::<u8>()).prop_map(
                |(name, size, align, b)| Op::CacheCreate(CacheSpec {
                    name,
                    size,
                    align,
                    flags: SlabFlags(align),
                    ctor: Ctor::Fill(b),
                })
            ),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(handle, offset, data)| Op::DmaWrite {
                    handle,
                    offset,
                    data
                }),
            (any::<u64>(), any::<u32>()).prop_map(|(pool, min_nr)| Op::PoolCreate {
                backing: PoolBacking::Cache(pool),
                min_nr,
            }),
            (any::<u8>(), any::<u32>(), any::<i64>()).prop_map(|(probability, interval, times)| {
                Op::FaultInject {
                    target: FaultTarget::Pages,
                    config: FaultConfig {
                        probability,
                        interval,
                        times,
                    },
                }
            }),
        ]
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_requests_roundtrip(ops in proptest::collection::vec(arb_op(), 0..20), stop in proptest::bool::ANY) {
            roundtrip(&Request::Batch(Batch { stop_on_error: stop, ops: ops.clone() }));
            for op in ops {
                roundtrip(&Request::Call(op));
            }
        }
    }
}
