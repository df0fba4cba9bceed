//! A `Response::Batch` frame written result by result.
//!
//! The service used to collect a batch's results in a vector, measure each
//! one's encoding to keep the frame under [`MAX_FRAME`], then encode the
//! whole vector twice (size, then bytes): three encodings and a 56-byte move
//! per operation. This writer encodes each result once, straight after the
//! ones before it, and knows the frame's size as it goes. Its bytes are
//! exactly those of `encode_frame(&Response::Batch(results))`, so clients
//! decode it like any other response.

use alloc::vec::Vec;

use crate::frame::{encode_frame, encode_into, seal_frame, FrameError, MAX_FRAME};
use crate::msg::{Reply, Response};
use crate::WireError;

/// Longest varint of a `usize` count.
const MAX_COUNT_LEN: usize = 10;

/// Builds one `Response::Batch` frame.
pub struct BatchReplyWriter {
    /// The encoded results so far.
    results: Vec<u8>,
    count: usize,
}

impl Default for BatchReplyWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchReplyWriter {
    /// An empty batch reply.
    pub fn new() -> Self {
        BatchReplyWriter {
            results: Vec::new(),
            count: 0,
        }
    }

    /// Results written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes the frame body could still take, allowing for the header.
    pub fn room(&self) -> usize {
        MAX_FRAME.saturating_sub(self.results.len() + 1 + MAX_COUNT_LEN)
    }

    /// Appends `result` if the frame body stays within `MAX_FRAME - reserve`
    /// (`reserve` keeps space for a final entry); otherwise appends nothing
    /// and says how large the body would have grown.
    pub fn push(
        &mut self,
        result: &Result<Reply, WireError>,
        reserve: usize,
    ) -> Result<(), FrameError> {
        let before = self.results.len();
        encode_into(result, &mut self.results)?;
        let body = self.results.len() + 1 + MAX_COUNT_LEN;
        if body.saturating_add(reserve) > MAX_FRAME {
            self.results.truncate(before);
            return Err(FrameError::TooLarge { len: body });
        }
        self.count += 1;
        Ok(())
    }

    /// Appends the finished frame to `out`.
    pub fn finish(self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        // The variant's tag as postcard writes it: the encoding of an empty
        // batch less its zero count byte.
        let start = out.len();
        encode_frame(&Response::Batch(Vec::new()), out)?;
        out.pop();
        encode_into(&self.count, out)?;
        out.extend_from_slice(&self.results);
        seal_frame(out, start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PREFIX_LEN;
    use crate::{errno, to_frame};
    use alloc::vec;

    fn results() -> Vec<Result<Reply, WireError>> {
        let mut v = Vec::new();
        for i in 0..300u64 {
            v.push(match i % 4 {
                0 => Ok(Reply::Object {
                    handle: i << 40 | i,
                    addr: 0xffff_8000_0000_0000 + i * 64,
                    size: 64,
                }),
                1 => Ok(Reply::Done),
                2 => Ok(Reply::Pages {
                    handle: i,
                    phys: i << 12,
                    order: (i % 11) as u8,
                }),
                _ => Err(WireError::new(errno::ENOMEM, "no memory")),
            });
        }
        v
    }

    #[test]
    fn same_bytes_as_the_whole_vector() {
        for n in [0, 1, 127, 128, 129, 300] {
            let results = &results()[..n];
            let mut w = BatchReplyWriter::new();
            for r in results {
                w.push(r, 0).unwrap();
            }
            assert_eq!(w.count(), n);
            let mut out = vec![9u8];
            w.finish(&mut out).unwrap();
            assert_eq!(
                out[1..],
                to_frame(&Response::Batch(results.to_vec())).unwrap()[..],
                "{n} results"
            );
        }
    }

    #[test]
    fn a_result_that_would_overflow_the_frame_is_refused() {
        let mut w = BatchReplyWriter::new();
        let big = Ok(Reply::Data(vec![7u8; MAX_FRAME / 2]));
        w.push(&big, 0).unwrap();
        let room = w.room();
        assert!(matches!(w.push(&big, 0), Err(FrameError::TooLarge { .. })));
        assert_eq!((w.count(), w.room()), (1, room), "nothing appended");
        w.push(&Ok(Reply::Done), 0).unwrap();
        let mut out = Vec::new();
        w.finish(&mut out).unwrap();
        assert!(out.len() <= MAX_FRAME + PREFIX_LEN);
    }
}
