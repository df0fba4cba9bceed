//! Writing replies: a call's, one that does not fit, and the error that
//! closes a connection.

use alloc::format;
use alloc::vec::Vec;

use memd_wire::{encode_frame, errno, FrameError, Reply, Response, WireError};

use super::conn::State;
use super::{err, ConnId, Flow, Service};
use crate::memory::Memory;

impl<M: Memory> Service<M> {
    /// Writes a call's reply; one that does not fit or cannot be allocated
    /// is replaced by an error saying so.
    pub(super) fn write_call(
        &mut self,
        conn: ConnId,
        r: Result<Reply, WireError>,
        out: &mut Vec<u8>,
    ) -> Flow {
        // Its own statement: a reply that did not fit is dropped before the
        // error that replaces it is written.
        let sent = encode_frame(&Response::Call(r), out);
        match sent {
            Ok(()) => self.flow(),
            Err(e) => self.unsent_reply(conn, out, e, "reply", |e| Response::Call(Err(e))),
        }
    }

    /// A `what` that could not be written (`e`): an ENOMEM or E2BIG error,
    /// made a response by `wrap`, takes its place; when even that cannot be
    /// written, the connection closes.
    pub(super) fn unsent_reply(
        &mut self,
        conn: ConnId,
        out: &mut Vec<u8>,
        e: FrameError,
        what: &str,
        wrap: fn(WireError) -> Response,
    ) -> Flow {
        let error = match e {
            FrameError::NoMemory { len } => err(
                errno::ENOMEM,
                format!("no memory for a {what} of {len}+ bytes"),
            ),
            _ => err(errno::E2BIG, format!("{what} larger than a frame")),
        };
        if write_response(out, &wrap(error)) {
            self.flow()
        } else {
            self.close_with(conn, out, err(errno::ENOMEM, "no memory for replies"))
        }
    }

    /// Closes `conn` with `error` as its last reply.
    pub(super) fn close_with(&mut self, conn: ConnId, out: &mut Vec<u8>, error: WireError) -> Flow {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = State::Closing;
        }
        write_response(
            out,
            &Response::Error {
                error,
                closing: true,
            },
        );
        Flow::Close
    }

    /// [`Flow::Continue`], or [`Flow::Shutdown`] once one was asked for.
    pub(super) fn flow(&self) -> Flow {
        if self.shutdown {
            Flow::Shutdown
        } else {
            Flow::Continue
        }
    }
}

/// Appends a small response (an error, a hello): false when the heap
/// could not take even that.
pub(super) fn write_response(out: &mut Vec<u8>, resp: &Response) -> bool {
    encode_frame(resp, out).is_ok()
}
