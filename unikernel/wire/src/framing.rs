//! Length-prefixed frames.
//!
//! A frame is a 4-byte little-endian body length followed by that many bytes
//! of postcard-encoded message. [`MAX_FRAME`] bounds the body; a length above
//! it is rejected as soon as the 4 prefix bytes are seen, before anything is
//! allocated for the body.

use alloc::vec::Vec;
use core::fmt;

use serde::{de::DeserializeOwned, Serialize};

/// Largest frame body accepted or produced, in bytes (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// What went wrong while framing or encoding a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces a body larger than [`MAX_FRAME`].
    TooLarge {
        /// The announced length.
        len: usize,
    },
    /// The body is not a valid postcard encoding of the expected message.
    Malformed,
    /// The body decoded but bytes were left over after the message.
    TrailingBytes,
    /// Encoding failed (only possible for messages larger than [`MAX_FRAME`]).
    Encode,
    /// A batch announces more operations than [`crate::MAX_BATCH_OPS`];
    /// refused before anything is reserved for them.
    TooManyOps {
        /// The announced count.
        count: u64,
    },
    /// The length prefix announces a body larger than the decoder's
    /// current limit ([`FrameDecoder::set_limit`]), below [`MAX_FRAME`].
    OverLimit {
        /// The announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The buffer for a frame could not be allocated.
    NoMemory {
        /// Bytes that were needed.
        len: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {MAX_FRAME}")
            }
            FrameError::Malformed => f.write_str("malformed message"),
            FrameError::TrailingBytes => f.write_str("trailing bytes after message"),
            FrameError::Encode => f.write_str("message could not be encoded"),
            FrameError::TooManyOps { count } => {
                write!(f, "batch of {count} ops exceeds {}", crate::MAX_BATCH_OPS)
            }
            FrameError::OverLimit { len, limit } => {
                write!(f, "frame of {len} bytes exceeds the {limit} allowed here")
            }
            FrameError::NoMemory { len } => write!(f, "no memory for a frame of {len} bytes"),
        }
    }
}

impl core::error::Error for FrameError {}

/// postcard output appended to a vector a slice at a time (postcard's
/// `Extend` flavor goes byte by byte). Growing the vector is fallible: a
/// reply the heap cannot hold is an error, not an abort.
struct Appender<'a> {
    out: &'a mut Vec<u8>,
    /// Set when growing `out` failed.
    no_memory: &'a mut bool,
}

impl postcard::ser_flavors::Flavor for Appender<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if self.out.try_reserve(data.len()).is_err() {
            *self.no_memory = true;
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.out.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn append<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    let mut no_memory = false;
    let flavor = Appender {
        out,
        no_memory: &mut no_memory,
    };
    postcard::serialize_with_flavor(msg, flavor).map_err(|_| {
        let len = out.len() - start;
        if no_memory {
            FrameError::NoMemory { len }
        } else {
            FrameError::Encode
        }
    })
}

/// Append one frame holding `msg` to `out`.
///
/// The body is encoded once, in place after a placeholder prefix; a message
/// whose body would exceed [`MAX_FRAME`] is refused with
/// [`FrameError::TooLarge`] and `out` is left as it was.
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.try_reserve(PREFIX_LEN)
        .map_err(|_| FrameError::NoMemory { len: PREFIX_LEN })?;
    out.extend_from_slice(&[0; PREFIX_LEN]);
    if let Err(e) = append(msg, out) {
        out.truncate(start);
        return Err(e);
    }
    seal_frame(out, start)
}

/// Finishes the frame that starts at `out[start]` with a placeholder
/// prefix: writes the body's length there, or removes the frame when the
/// body exceeds [`MAX_FRAME`].
pub(crate) fn seal_frame(out: &mut Vec<u8>, start: usize) -> Result<(), FrameError> {
    let len = out.len() - start - PREFIX_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(FrameError::TooLarge { len });
    }
    out[start..start + PREFIX_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// What postcard writes for `sample` before its last `fields` bytes: the
/// variant tags leading an enum value. The paths that skip serde for the
/// common messages take their tags from here, so they follow the enums'
/// order.
pub(crate) fn leading_bytes<T: Serialize + ?Sized>(sample: &T, fields: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = encode_into(sample, &mut bytes);
    bytes.truncate(bytes.len().saturating_sub(fields));
    bytes
}

/// Append `msg`'s encoding (no frame prefix) to `out`.
pub fn encode_into<T: Serialize + ?Sized>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    append(msg, out)
}

/// One frame holding `msg`, as a new vector.
pub fn to_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Decode a frame body (without its prefix) as a `T`; the whole body must be
/// consumed.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((msg, [])) => Ok(msg),
        Ok(_) => Err(FrameError::TrailingBytes),
        Err(_) => Err(FrameError::Malformed),
    }
}

/// A streaming frame decoder.
///
/// Feed it bytes in chunks of any size; it yields whole frame bodies. It
/// buffers at most one frame: the body buffer grows only as body bytes
/// arrive, so a peer announcing a large frame and sending nothing costs
/// nothing. After an error the decoder stays failed: the stream has lost
/// its framing and the connection should be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// Body length of the frame in progress, once the prefix is complete.
    body_len: Option<usize>,
    body: Vec<u8>,
    failed: Option<FrameError>,
    /// Largest body accepted now (at most [`MAX_FRAME`]).
    limit: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder at a frame boundary.
    pub const fn new() -> Self {
        FrameDecoder {
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            body_len: None,
            body: Vec::new(),
            failed: None,
            limit: MAX_FRAME,
        }
    }

    /// Accepts bodies of at most `limit` bytes (capped at [`MAX_FRAME`])
    /// from the next length prefix on: a server allows only small frames
    /// until a peer has authenticated.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME);
    }

    /// Consume bytes from the front of `input` until one frame is complete
    /// (returned as its body) or `input` is exhausted (`Ok(None)`).
    ///
    /// Call it again with the remaining `input` to get further frames; bytes
    /// after a complete frame are never consumed by that call.
    pub fn feed(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        loop {
            let Some(len) = self.body_len else {
                if input.is_empty() {
                    return Ok(None);
                }
                let take = (PREFIX_LEN - self.prefix_len).min(input.len());
                self.prefix[self.prefix_len..self.prefix_len + take]
                    .copy_from_slice(&input[..take]);
                self.prefix_len += take;
                *input = &input[take..];
                if self.prefix_len == PREFIX_LEN {
                    let len = u32::from_le_bytes(self.prefix) as usize;
                    let err = if len > MAX_FRAME {
                        Some(FrameError::TooLarge { len })
                    } else if len > self.limit {
                        Some(FrameError::OverLimit {
                            len,
                            limit: self.limit,
                        })
                    } else {
                        None
                    };
                    if let Some(err) = err {
                        self.failed = Some(err.clone());
                        return Err(err);
                    }
                    self.body_len = Some(len);
                }
                continue;
            };
            let take = (len - self.body.len()).min(input.len());
            // The body grows as its bytes arrive, and fallibly: a heap that
            // cannot hold it fails this stream, not the program.
            if self.body.try_reserve(take).is_err() {
                let err = FrameError::NoMemory { len };
                self.failed = Some(err.clone());
                self.body = Vec::new();
                return Err(err);
            }
            self.body.extend_from_slice(&input[..take]);
            *input = &input[take..];
            if self.body.len() == len {
                self.prefix_len = 0;
                self.body_len = None;
                return Ok(Some(core::mem::take(&mut self.body)));
            }
            return Ok(None);
        }
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.prefix_len == 0 && self.body_len.is_none()
    }

    /// Bytes held for the frame in progress (prefix and body).
    pub fn buffered(&self) -> usize {
        self.prefix_len + self.body.len()
    }

    /// Whether the decoder has failed and the stream must be abandoned.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn frames_of(bodies: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn a_lowered_limit_refuses_larger_frames_before_their_body() {
        let mut d = FrameDecoder::new();
        d.set_limit(16);
        let ok = frames_of(&[vec![1; 16]]);
        let mut input = &ok[..];
        assert_eq!(d.feed(&mut input).unwrap(), Some(vec![1; 16]));
        let big = 17u32.to_le_bytes();
        let mut input = &big[..];
        assert_eq!(
            d.feed(&mut input),
            Err(FrameError::OverLimit { len: 17, limit: 16 })
        );
        assert!(d.is_failed());
        assert_eq!(d.buffered(), 4, "nothing beyond the prefix was taken");
    }

    #[test]
    fn oversize_prefix_is_rejected_before_body() {
        let mut d = FrameDecoder::new();
        let bytes = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let mut input = &bytes[..];
        assert_eq!(
            d.feed(&mut input),
            Err(FrameError::TooLarge { len: MAX_FRAME + 1 })
        );
        assert!(d.is_failed());
        let mut more: &[u8] = &[1, 2, 3];
        assert!(d.feed(&mut more).is_err());
    }

    #[test]
    fn max_frame_is_accepted() {
        let body = vec![7u8; MAX_FRAME];
        let stream = frames_of(core::slice::from_ref(&body));
        let mut d = FrameDecoder::new();
        let mut input = &stream[..];
        assert_eq!(d.feed(&mut input).unwrap(), Some(body));
        assert!(input.is_empty());
        assert!(d.is_idle());
    }

    #[test]
    fn truncated_frame_waits() {
        let stream = frames_of(&[vec![1, 2, 3, 4, 5]]);
        let mut d = FrameDecoder::new();
        let mut input = &stream[..stream.len() - 1];
        assert_eq!(d.feed(&mut input).unwrap(), None);
        assert_eq!(d.buffered(), stream.len() - 1);
        assert!(!d.is_idle());
    }

    #[test]
    fn empty_body_frame() {
        let stream = frames_of(&[vec![], vec![9]]);
        let mut d = FrameDecoder::new();
        let mut input = &stream[..];
        assert_eq!(d.feed(&mut input).unwrap(), Some(vec![]));
        assert_eq!(d.feed(&mut input).unwrap(), Some(vec![9]));
        assert_eq!(d.feed(&mut input).unwrap(), None);
    }

    #[test]
    fn encode_refuses_oversize() {
        let big = vec![0u8; MAX_FRAME + 1];
        let mut out = vec![1, 2];
        assert!(matches!(
            encode_frame(&big, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut body = postcard::to_allocvec(&5u32).unwrap();
        body.push(0);
        assert_eq!(decode_body::<u32>(&body), Err(FrameError::TrailingBytes));
        assert_eq!(decode_body::<u32>(&[]), Err(FrameError::Malformed));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_chunking_yields_the_same_frames(
            bodies in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..20),
            cuts in proptest::collection::vec(1usize..64, 1..200),
        ) {
            let stream = frames_of(&bodies);
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                let mut chunk = &rest[..n];
                rest = &rest[n..];
                while let Some(f) = d.feed(&mut chunk).unwrap() {
                    got.push(f);
                }
                proptest::prop_assert!(chunk.is_empty());
            }
            proptest::prop_assert_eq!(got, bodies);
            proptest::prop_assert!(d.is_idle());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let mut d = FrameDecoder::new();
            let mut input = &bytes[..];
            while let Ok(Some(body)) = d.feed(&mut input) {
                let _ = decode_body::<crate::Request>(&body);
            }
        }
    }
}
