//! A `Response::Batch` frame written result by result.
//!
//! The writer encodes each result once, in place in the output buffer that
//! goes to the socket, and knows the frame's size as it goes, so the frame
//! stays under [`MAX_FRAME`] without a second encoding to measure it; only
//! the count is filled in at the end. Its bytes are exactly
//! those of `encode_frame(&Response::Batch(results))`, so clients decode it
//! like any other response.
//!
//! The results a batch is mostly made of (`Ok(Done)`, `Ok(Object)`,
//! `Ok(Pages)`) are written without serde: their variant tags, taken once
//! per batch from postcard itself, then one LEB128 varint per field, as
//! postcard writes them. Under TCG the serde path's calls cost more than
//! the allocation they report; the tests hold both paths to the same bytes.

use alloc::vec::Vec;

use crate::framing::{
    encode_frame, encode_into, leading_bytes, seal_frame, FrameError, MAX_FRAME, PREFIX_LEN,
};
use crate::msg::{Reply, Response};
use crate::WireError;

/// The leading bytes of a result's encoding: its `Result` and `Reply`
/// variant tags.
#[derive(Clone, Copy)]
struct Tags {
    bytes: [u8; 8],
    len: usize,
}

impl Tags {
    const NONE: Tags = Tags {
        bytes: [0; 8],
        len: 0,
    };

    /// The tags of `sample`, whose fields encode to `fields` bytes.
    fn of(sample: &Result<Reply, WireError>, fields: usize) -> Tags {
        let leading = leading_bytes(sample, fields);
        let len = leading.len().min(8);
        let mut bytes = [0; 8];
        bytes[..len].copy_from_slice(&leading[..len]);
        Tags { bytes, len }
    }
}

/// One result's bytes, assembled on the stack and appended in one copy of
/// fixed size: pushing them one by one onto the vector cost a length and
/// capacity update per byte, and a copy of variable length is a call.
struct Scratch {
    bytes: [u8; PLAIN_RESULT_MAX],
    len: usize,
}

impl Scratch {
    fn new(tags: &Tags) -> Scratch {
        let mut s = Scratch {
            bytes: [0; PLAIN_RESULT_MAX],
            len: tags.len,
        };
        s.bytes[..8].copy_from_slice(&tags.bytes);
        s
    }

    fn written(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// `v` as postcard writes integers wider than a byte.
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    fn byte(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }

    fn append_to(&self, out: &mut Vec<u8>) {
        let end = out.len() + self.len;
        out.extend_from_slice(&self.bytes);
        out.truncate(end);
    }
}

/// Most bytes one plain result (`Ok` of `Done`, `Object` or `Pages`)
/// takes: its tags and three varints.
pub const PLAIN_RESULT_MAX: usize = 8 + 3 * 10;

/// Bytes kept for the result count: two varint bytes hold counts up to
/// 16 383, above [`crate::MAX_BATCH_OPS`].
const COUNT_ROOM: usize = 2;

/// Where a suspended batch reply stands in its buffer.
#[derive(Clone, Copy)]
pub struct BatchReplyMark {
    start: usize,
    results: usize,
    count: usize,
    /// The writer's tags, worked out once per reply.
    tags: Option<[Tags; 3]>,
}

impl BatchReplyMark {
    /// Where the frame starts in its buffer.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The same reply once its bytes were moved to start at `start`.
    pub fn rebased(self, start: usize) -> Self {
        BatchReplyMark {
            start,
            results: self.results - self.start + start,
            count: self.count,
            tags: self.tags,
        }
    }
}

/// Builds one `Response::Batch` frame in place at the end of an output
/// buffer: the results are encoded where they will be sent, and only the
/// count is filled in at the end.
pub struct BatchReplyWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Where the frame starts in `out`.
    start: usize,
    /// Where the results start (after the count's room).
    results: usize,
    count: usize,
    done: Tags,
    object: Tags,
    pages: Tags,
}

impl<'a> BatchReplyWriter<'a> {
    /// Starts a batch reply at the end of `out`, with room for about
    /// `expected_bytes` of results.
    pub fn new(out: &'a mut Vec<u8>, expected_bytes: usize) -> Result<Self, FrameError> {
        let start = out.len();
        // The frame of an empty batch is the prefix, the variant's tag and
        // a zero count: keep the first two, make room for the real count.
        encode_frame(&Response::Batch(Vec::new()), out)?;
        out.pop();
        out.extend_from_slice(&[0; COUNT_ROOM]);
        let room = expected_bytes.min(MAX_FRAME);
        if out.try_reserve(room).is_err() {
            out.truncate(start);
            return Err(FrameError::NoMemory { len: room });
        }
        let results = out.len();
        Ok(Self::resume(
            out,
            BatchReplyMark {
                start,
                results,
                count: 0,
                tags: None,
            },
        ))
    }

    /// Carries on with a reply [`BatchReplyWriter::suspend`] set aside,
    /// in the buffer it was written to (or moved to, see
    /// [`BatchReplyMark::rebased`]).
    pub fn resume(out: &'a mut Vec<u8>, mark: BatchReplyMark) -> Self {
        let [done, object, pages] = mark.tags.unwrap_or_else(|| {
            let object = Reply::Object {
                handle: 0,
                addr: 0,
                size: 0,
            };
            let pages = Reply::Pages {
                handle: 0,
                phys: 0,
                order: 0,
            };
            [
                Tags::of(&Ok(Reply::Done), 0),
                Tags::of(&Ok(object), 3),
                Tags::of(&Ok(pages), 3),
            ]
        });
        BatchReplyWriter {
            out,
            start: mark.start,
            results: mark.results,
            count: mark.count,
            done,
            object,
            pages,
        }
    }

    /// Stops writing for now: the frame so far stays in the buffer, and the
    /// mark says where it is and how many results it holds.
    pub fn suspend(self) -> BatchReplyMark {
        BatchReplyMark {
            start: self.start,
            results: self.results,
            count: self.count,
            tags: Some([self.done, self.object, self.pages]),
        }
    }

    /// Results written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The frame body's size so far.
    fn body(&self) -> usize {
        self.out.len() - self.start - PREFIX_LEN
    }

    /// Bytes the frame body can still take.
    pub fn room(&self) -> usize {
        MAX_FRAME.saturating_sub(self.body())
    }

    /// Appends `result` if the frame body stays within `MAX_FRAME - reserve`
    /// (`reserve` keeps space for a final entry); otherwise appends nothing
    /// and says how large the body would have grown.
    pub fn push(
        &mut self,
        result: &Result<Reply, WireError>,
        reserve: usize,
    ) -> Result<(), FrameError> {
        let before = self.out.len();
        if matches!(
            result,
            Ok(Reply::Done | Reply::Object { .. } | Reply::Pages { .. })
        ) && self.out.try_reserve(PLAIN_RESULT_MAX).is_err()
        {
            return Err(FrameError::NoMemory {
                len: PLAIN_RESULT_MAX,
            });
        }
        match result {
            Ok(Reply::Done) => self.write_done(),
            Ok(Reply::Object { handle, addr, size }) => self.write_object(*handle, *addr, *size),
            Ok(Reply::Pages {
                handle,
                phys,
                order,
            }) => self.write_pages(*handle, *phys, *order),
            r => encode_into(r, self.out)?,
        }
        let body = self.body();
        if body.saturating_add(reserve) > MAX_FRAME {
            self.out.truncate(before);
            return Err(FrameError::TooLarge { len: body });
        }
        self.count += 1;
        Ok(())
    }

    /// Whether one more plain result ([`BatchReplyWriter::push_done`],
    /// `push_object`, `push_pages`) fits both the frame, keeping `reserve`
    /// bytes, and the buffer's capacity: then writing it cannot allocate,
    /// which matters under the memory manager's lock.
    pub fn plain_fits(&self, reserve: usize) -> bool {
        self.out.capacity() - self.out.len() >= PLAIN_RESULT_MAX
            && self.room() >= PLAIN_RESULT_MAX.saturating_add(reserve)
    }

    /// Makes room in the buffer for `n` more plain results, if the heap
    /// has it ([`BatchReplyWriter::plain_fits`] tells).
    pub fn reserve_plain(&mut self, n: usize) {
        let _ = self
            .out
            .try_reserve(n.saturating_mul(PLAIN_RESULT_MAX).min(self.room()));
    }

    /// Appends `Ok(Reply::Done)`. The frame's limit is the caller's to
    /// check ([`BatchReplyWriter::plain_fits`]).
    pub fn push_done(&mut self) {
        self.write_done();
        self.count += 1;
    }

    /// Appends `Ok(Reply::Object { handle, addr, size })`; see
    /// [`BatchReplyWriter::push_done`].
    pub fn push_object(&mut self, handle: u64, addr: u64, size: u64) {
        self.write_object(handle, addr, size);
        self.count += 1;
    }

    /// Appends `Ok(Reply::Pages { handle, phys, order })`; see
    /// [`BatchReplyWriter::push_done`].
    pub fn push_pages(&mut self, handle: u64, phys: u64, order: u8) {
        self.write_pages(handle, phys, order);
        self.count += 1;
    }

    fn write_done(&mut self) {
        Scratch::new(&self.done).append_to(self.out);
    }

    fn write_object(&mut self, handle: u64, addr: u64, size: u64) {
        let mut s = Scratch::new(&self.object);
        s.varint(handle);
        s.varint(addr);
        s.varint(size);
        s.append_to(self.out);
    }

    fn write_pages(&mut self, handle: u64, phys: u64, order: u8) {
        let mut s = Scratch::new(&self.pages);
        s.varint(handle);
        s.varint(phys);
        s.byte(order);
        s.append_to(self.out);
    }

    /// Writes the count and the frame's length: the frame is complete.
    pub fn finish(self) -> Result<(), FrameError> {
        let mut count = Scratch::new(&Tags::NONE);
        count.varint(self.count as u64);
        let room = self.results - COUNT_ROOM..self.results;
        if count.len == COUNT_ROOM {
            self.out[room].copy_from_slice(count.written());
        } else {
            // Fewer than 128 results: a short move.
            self.out.splice(room, count.written().iter().copied());
        }
        seal_frame(self.out, self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            let mut out = vec![9u8];
            let mut w = BatchReplyWriter::new(&mut out, 0).unwrap();
            for r in results {
                w.push(r, 0).unwrap();
            }
            assert_eq!(w.count(), n);
            w.finish().unwrap();
            assert_eq!(
                out[1..],
                to_frame(&Response::Batch(results.to_vec())).unwrap()[..],
                "{n} results"
            );
        }
    }

    #[test]
    fn a_suspended_reply_moved_and_resumed_is_the_same_frame() {
        for (n, cut) in [(0, 0), (5, 2), (300, 128), (300, 299)] {
            let results = &results()[..n];
            let mut out = vec![1u8, 2, 3];
            let mut w = BatchReplyWriter::new(&mut out, 0).unwrap();
            for r in &results[..cut] {
                w.push(r, 0).unwrap();
            }
            let mark = w.suspend();
            assert_eq!(mark.start(), 3);
            let mut moved = vec![7u8];
            moved.extend(out.drain(mark.start()..));
            let mut w = BatchReplyWriter::resume(&mut moved, mark.rebased(1));
            for r in &results[cut..] {
                w.push(r, 0).unwrap();
            }
            assert_eq!(w.count(), n);
            w.finish().unwrap();
            assert_eq!(out, [1, 2, 3]);
            assert_eq!(
                moved[1..],
                to_frame(&Response::Batch(results.to_vec())).unwrap()[..],
                "{n} results, cut at {cut}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn hand_written_results_match_postcard(
            handle: u64,
            addr: u64,
            size: u64,
            order: u8,
        ) {
            let results = vec![
                Ok(Reply::Object { handle, addr, size }),
                Ok(Reply::Pages { handle, phys: addr, order }),
                Ok(Reply::Done),
                Ok(Reply::Shrunk { pages: size }),
                Err(WireError::new(errno::EINVAL, "x")),
            ];
            let mut out = Vec::new();
            let mut w = BatchReplyWriter::new(&mut out, 64).unwrap();
            for r in &results {
                w.push(r, 0).unwrap();
            }
            w.finish().unwrap();
            proptest::prop_assert_eq!(&out, &to_frame(&Response::Batch(results.clone())).unwrap());

            let mut plain = Vec::new();
            let mut w = BatchReplyWriter::new(&mut plain, 0).unwrap();
            w.push_object(handle, addr, size);
            w.push_pages(handle, addr, order);
            w.push_done();
            for r in &results[3..] {
                w.push(r, 0).unwrap();
            }
            w.finish().unwrap();
            proptest::prop_assert_eq!(plain, out);
        }
    }

    #[test]
    fn varints_match_postcard_at_every_length_boundary() {
        let edges: Vec<u64> = (0..64)
            .flat_map(|k| [(1u64 << k) - 1, 1 << k, (1 << k) + 1])
            .chain([u64::MAX])
            .collect();
        for &v in &edges {
            let results = vec![
                Ok(Reply::Object {
                    handle: v,
                    addr: v,
                    size: v,
                }),
                Ok(Reply::Pages {
                    handle: v,
                    phys: v,
                    order: 3,
                }),
            ];
            let mut out = Vec::new();
            let mut w = BatchReplyWriter::new(&mut out, 0).unwrap();
            w.push_object(v, v, v);
            w.push_pages(v, v, 3);
            w.finish().unwrap();
            assert_eq!(out, to_frame(&Response::Batch(results)).unwrap(), "{v:#x}");
        }
    }

    #[test]
    fn reserved_plain_results_never_grow_the_buffer() {
        let mut out = Vec::new();
        let mut w = BatchReplyWriter::new(&mut out, 0).unwrap();
        w.reserve_plain(1000);
        let capacity = w.out.capacity();
        for i in 0..1000u64 {
            assert!(w.plain_fits(128));
            w.push_object(u64::MAX - i, u64::MAX, u64::MAX);
        }
        while w.plain_fits(128) {
            w.push_object(u64::MAX, u64::MAX, u64::MAX);
        }
        assert_eq!(w.out.capacity(), capacity, "the buffer never grew");
        assert!(w.out.capacity() - w.out.len() < PLAIN_RESULT_MAX);
    }

    #[test]
    fn a_result_that_would_overflow_the_frame_is_refused() {
        let mut out = Vec::new();
        let mut w = BatchReplyWriter::new(&mut out, 0).unwrap();
        let big = Ok(Reply::Data(vec![7u8; MAX_FRAME / 2]));
        w.push(&big, 0).unwrap();
        let room = w.room();
        assert!(matches!(w.push(&big, 0), Err(FrameError::TooLarge { .. })));
        assert_eq!((w.count(), w.room()), (1, room), "nothing appended");
        w.push(&Ok(Reply::Done), 0).unwrap();
        w.finish().unwrap();
        assert!(out.len() <= MAX_FRAME + PREFIX_LEN);
    }
}
