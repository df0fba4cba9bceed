//! The hello: the protocol version and a token, checked before anything
//! else a connection sends, and the role the token grants.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use memd_wire::{errno, Hello, HelloAck, Request, Response, Role, MAX_NAME_LEN, PROTOCOL_VERSION};

use super::conn::State;
use super::reply::write_response;
use super::{err, mem_err, Config, ConnId, Flow, Service};
use crate::env::Env;
use crate::memory::Memory;

impl<M: Memory> Service<M> {
    /// Accepts the hello `h` of `conn` and gives it an owner id, or closes
    /// the connection.
    pub(super) fn hello<E: Env<Mem = M>>(
        &mut self,
        env: &mut E,
        conn: ConnId,
        h: Hello,
        out: &mut Vec<u8>,
    ) -> Flow {
        if h.version != PROTOCOL_VERSION {
            let e = err(
                errno::EPROTO,
                format!(
                    "protocol version {} not supported (server speaks {PROTOCOL_VERSION})",
                    h.version
                ),
            );
            return self.close_with(conn, out, e);
        }
        let Some(role) = role_of(&self.config, &h.token) else {
            return self.close_with(conn, out, err(errno::EACCES, "wrong token"));
        };
        if self.conns.get(&conn).is_none() {
            return Flow::Close;
        }
        let owner = match env.with_mem(|m, _| m.owner_new()) {
            Ok(owner) => owner,
            Err(e) => return self.close_with(conn, out, mem_err(e)),
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Flow::Close;
        };
        c.owner = owner;
        c.state = State::Ready;
        c.role = role;
        c.decoder.set_limit(memd_wire::MAX_FRAME);
        c.name = h.client.chars().take(MAX_NAME_LEN).collect();
        write_response(
            out,
            &Response::Hello(HelloAck {
                version: PROTOCOL_VERSION,
                conn,
                quota: self.config.quota,
                role,
            }),
        );
        Flow::Continue
    }
}

/// The role `token` grants, if any. Both tokens are compared in full
/// whatever the outcome, so the time taken says nothing of either.
fn role_of(config: &Config, token: &str) -> Option<Role> {
    let operator = tokens_equal(token, &config.operator_token);
    let client = config
        .client_token
        .as_deref()
        .is_some_and(|t| tokens_equal(token, t));
    if operator {
        Some(Role::Operator)
    } else if client {
        Some(Role::Client)
    } else {
        None
    }
}

fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// The first byte of every `Request::Hello` body: its variant tag, as
/// postcard writes it.
pub(super) fn hello_tag() -> Option<u8> {
    let hello = Request::Hello(Hello {
        version: 0,
        token: String::new(),
        client: String::new(),
    });
    let mut sample = Vec::new();
    memd_wire::framing::encode_into(&hello, &mut sample).ok()?;
    sample.first().copied()
}
