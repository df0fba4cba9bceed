//! Decoding a `Request::Batch` without serde for its common operations.
//!
//! A batch is mostly `Kmalloc`, `Kfree`, `AllocPages` and `FreePages`.
//! Through serde, each costs about 150 guest instructions to decode
//! (measured under QEMU `-icount`), more than the allocation it asks for.
//! Here their variant tags are taken from postcard itself (once), and their
//! fields are read as postcard writes them (LEB128 varints, raw bytes).
//! Every other operation goes through postcard. The reader accepts only
//! what postcard accepts, with the same values: anything unusual (an
//! overlong varint, a tag in a non-shortest form, trailing bytes) makes it
//! give up, and the caller decodes the whole body with postcard, which
//! produces the error, if any.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::flags::Gfp;
use crate::framing::{decode_body, encode_into, leading_bytes, FrameError};
use crate::msg::{Batch, Op, Request, MAX_BATCH_OPS};

/// Decodes a request body: batches through the fast reader when it can,
/// everything else (and anything it gives up on) through postcard.
///
/// A batch announcing more than [`MAX_BATCH_OPS`] operations is refused
/// with [`FrameError::TooManyOps`] before anything is reserved for it.
pub fn decode_request(body: &[u8]) -> Result<Request, FrameError> {
    if let Some(count) = batch_count(body) {
        if count > MAX_BATCH_OPS as u64 {
            return Err(FrameError::TooManyOps { count });
        }
    }
    match read_batch(body) {
        Some(batch) => Ok(Request::Batch(batch)),
        None => decode_body(body),
    }
}

/// The bytes a `Request::Batch` body starts with: its variant tag, its
/// stop flag and the count of operations that follow, as postcard writes
/// them ([`batch_count`] reads them back). The operations are appended
/// after it; a client streaming a batch starts from it, and so do tests
/// that announce counts other than what follows.
pub fn batch_prefix(stop_on_error: bool, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let empty = Request::Batch(Batch {
        stop_on_error,
        ops: Vec::new(),
    });
    // Neither encoding can fail: both are a few bytes.
    let _ = encode_into(&empty, &mut out);
    // The empty batch ends with its count, zero: replaced by `count`,
    // written as postcard writes a length (a varint).
    out.pop();
    let _ = encode_into(&count, &mut out);
    out
}

/// The operation count a batch body announces, if `body` starts as a
/// batch does (its tag, its flag, a varint of up to ten bytes as postcard
/// writes it), whatever follows.
pub fn batch_count(body: &[u8]) -> Option<u64> {
    let mut r = Reader { rest: body };
    if r.byte()? != tags()?.batch || r.byte()? > 1 {
        return None;
    }
    r.varint(10)
}

/// The one-byte variant tags the reader looks for, as postcard writes
/// them.
#[derive(Clone, Copy)]
struct Tags {
    batch: u8,
    kmalloc: u8,
    kfree: u8,
    alloc_pages: u8,
    free_pages: u8,
}

/// [`Tags`] packed in bytes 0–4, bit 63 set once they are known: taken
/// from postcard on first use and kept, not encoded again for every
/// request. Two first callers store the same value.
static TAGS: AtomicU64 = AtomicU64::new(0);

fn tags() -> Option<Tags> {
    let packed = TAGS.load(Ordering::Relaxed);
    let t = if packed != 0 {
        let b = packed.to_le_bytes();
        Tags {
            batch: b[0],
            kmalloc: b[1],
            kfree: b[2],
            alloc_pages: b[3],
            free_pages: b[4],
        }
    } else {
        let gfp = Gfp(0);
        let empty = Request::Batch(Batch {
            stop_on_error: false,
            ops: Vec::new(),
        });
        let t = Tags {
            batch: tag_of(&empty, 2)?,
            kmalloc: tag_of(&Op::Kmalloc { size: 0, gfp }, 2)?,
            kfree: tag_of(&Op::Kfree { handle: 0 }, 1)?,
            alloc_pages: tag_of(&Op::AllocPages { order: 0, gfp }, 2)?,
            free_pages: tag_of(&Op::FreePages { handle: 0 }, 1)?,
        };
        let b = [
            t.batch,
            t.kmalloc,
            t.kfree,
            t.alloc_pages,
            t.free_pages,
            0,
            0,
            0x80,
        ];
        TAGS.store(u64::from_le_bytes(b), Ordering::Relaxed);
        t
    };
    Some(t)
}

/// The byte postcard writes before the fields of `sample`, whose fields
/// take `fields` bytes: its variant tag, when that is one byte (below 128).
fn tag_of<T: serde::Serialize>(sample: &T, fields: usize) -> Option<u8> {
    match leading_bytes(sample, fields)[..] {
        [tag] => Some(tag),
        _ => None,
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// A varint of at most `max_bytes` bytes (fewer than postcard allows,
    /// so no value needs postcard's last-byte range check).
    fn varint(&mut self, max_bytes: u32) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            value |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn u64(&mut self) -> Option<u64> {
        self.varint(9)
    }

    fn gfp(&mut self) -> Option<Gfp> {
        self.varint(4).map(|v| Gfp(v as u32))
    }
}

fn read_batch(body: &[u8]) -> Option<Batch> {
    let Tags {
        batch,
        kmalloc,
        kfree,
        alloc_pages,
        free_pages,
    } = tags()?;
    let mut r = Reader { rest: body };
    if r.byte()? != batch {
        return None;
    }
    let stop_on_error = match r.byte()? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let count = r.u64()? as usize;
    // Each op takes a byte at least: a larger count cannot be honest.
    let mut ops = Vec::with_capacity(count.min(r.rest.len()));
    for _ in 0..count {
        let tag = *r.rest.first()?;
        let op = if tag == kmalloc {
            r.byte();
            Op::Kmalloc {
                size: r.u64()?,
                gfp: r.gfp()?,
            }
        } else if tag == kfree {
            r.byte();
            Op::Kfree { handle: r.u64()? }
        } else if tag == alloc_pages {
            r.byte();
            Op::AllocPages {
                order: r.byte()?,
                gfp: r.gfp()?,
            }
        } else if tag == free_pages {
            r.byte();
            Op::FreePages { handle: r.u64()? }
        } else {
            let (op, rest) = postcard::take_from_bytes::<Op>(r.rest).ok()?;
            r.rest = rest;
            op
        };
        ops.push(op);
    }
    r.rest.is_empty().then_some(Batch { stop_on_error, ops })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::encode_into;
    use alloc::vec;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u64>(), any::<u32>()).prop_map(|(size, g)| Op::Kmalloc { size, gfp: Gfp(g) }),
            any::<u64>().prop_map(|handle| Op::Kfree { handle }),
            (any::<u8>(), any::<u32>())
                .prop_map(|(order, g)| Op::AllocPages { order, gfp: Gfp(g) }),
            any::<u64>().prop_map(|handle| Op::FreePages { handle }),
            Just(Op::Meminfo),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(ops, seed, cpus)| Op::Stress {
                ops,
                seed,
                cpus
            }),
        ]
    }

    proptest! {
        #[test]
        fn batches_decode_as_postcard_decodes_them(
            ops in proptest::collection::vec(op(), 0..300),
            stop_on_error: bool,
        ) {
            let req = Request::Batch(Batch { stop_on_error, ops });
            let mut body = Vec::new();
            encode_into(&req, &mut body).unwrap();
            if let Some(fast) = read_batch(&body) {
                prop_assert_eq!(Request::Batch(fast), req.clone());
            }
            prop_assert_eq!(decode_request(&body).unwrap(), req);
        }

        #[test]
        fn whatever_the_reader_accepts_postcard_accepts_alike(
            ops in proptest::collection::vec(op(), 1..20),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut body = Vec::new();
            encode_into(&Request::Batch(Batch { stop_on_error: true, ops }), &mut body).unwrap();
            for (at, b) in flips {
                let at = at % body.len();
                body[at] = b;
            }
            body.truncate(body.len() - cut % 3);
            if let Some(fast) = read_batch(&body) {
                prop_assert_eq!(decode_body::<Request>(&body).ok(), Some(Request::Batch(fast)));
            }
        }
    }

    #[test]
    fn everyday_batches_take_the_fast_reader() {
        let ops = vec![
            Op::Kmalloc {
                size: 64,
                gfp: Gfp::KERNEL | Gfp::ZERO,
            },
            Op::Kfree {
                handle: 7 << 40 | 3 << 20 | 12,
            },
            Op::AllocPages {
                order: 10,
                gfp: Gfp::DMA32,
            },
            Op::FreePages {
                handle: u64::MAX >> 1,
            },
            Op::Meminfo,
        ];
        let req = Request::Batch(Batch {
            stop_on_error: true,
            ops,
        });
        let mut body = Vec::new();
        encode_into(&req, &mut body).unwrap();
        assert_eq!(read_batch(&body).map(Request::Batch), Some(req));
    }

    #[test]
    fn a_batch_is_its_prefix_and_its_ops() {
        let ops = vec![
            Op::Kfree { handle: 9 },
            Op::Meminfo,
            Op::Kfree { handle: 300 },
        ];
        for stop_on_error in [false, true] {
            let mut body = batch_prefix(stop_on_error, ops.len() as u64);
            for op in &ops {
                encode_into(op, &mut body).unwrap();
            }
            let mut whole = Vec::new();
            encode_into(
                &Request::Batch(Batch {
                    stop_on_error,
                    ops: ops.clone(),
                }),
                &mut whole,
            )
            .unwrap();
            assert_eq!(body, whole);
            assert_eq!(batch_count(&body), Some(3));
        }
        assert_eq!(batch_count(&batch_prefix(false, u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn a_count_above_the_limit_is_refused_before_decoding() {
        // The batch of the hostile client: a huge count, a few bytes.
        for count in [MAX_BATCH_OPS as u64 + 1, 200_000, u64::MAX] {
            let mut body = batch_prefix(false, count);
            body.extend_from_slice(&[0; 64]);
            assert_eq!(decode_request(&body), Err(FrameError::TooManyOps { count }));
        }
        // At the limit it decodes (as far as its bytes go).
        let req = Request::Batch(Batch {
            stop_on_error: false,
            ops: vec![Op::Kfree { handle: 1 }; MAX_BATCH_OPS],
        });
        let mut body = Vec::new();
        encode_into(&req, &mut body).unwrap();
        assert_eq!(decode_request(&body), Ok(req));
    }

    #[test]
    fn overlong_varints_fall_back_to_postcard() {
        let mut body = Vec::new();
        encode_into(
            &Request::Batch(Batch {
                stop_on_error: false,
                ops: vec![Op::Kfree { handle: 1 }],
            }),
            &mut body,
        )
        .unwrap();
        // The handle's varint written in ten bytes: postcard's business.
        let handle_at = body.len() - 1;
        body.truncate(handle_at);
        body.extend_from_slice(&[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]);
        assert!(read_batch(&body).is_none());
        assert_eq!(
            decode_request(&body).ok(),
            decode_body::<Request>(&body).ok()
        );
    }
}
