//! The service's settings.

use alloc::format;
use alloc::string::String;

use memd_wire::Quota;

use super::budget::DEFAULT_BUDGET_NS;

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The operator's token: every operation ([`memd_wire::Role::Operator`]).
    pub operator_token: String,
    /// The clients' token, if clients are told apart from the operator:
    /// allocation work and views only ([`memd_wire::Role::Client`]).
    pub client_token: Option<String>,
    /// Per-connection limits.
    pub quota: Quota,
    /// Server name shown in the status.
    pub server: String,
    /// Clock reading when the service started.
    pub started_ns: u64,
    /// Most operations one stress request may run.
    pub max_stress_ops: u64,
    /// Most work one request may ask for: a stress operation counts one,
    /// a DMA buffer one per 64 bytes it covers, anything else one. A
    /// batch's operations count together.
    pub max_request_work: u64,
    /// Most clock time one connection's turn takes before the rest of its
    /// work waits for its next turn.
    pub budget_ns: u64,
}

impl Config {
    /// Defaults with one token, the operator's: 64 Ki pages, 256 MiB,
    /// 65 536 handles per connection.
    pub fn new(operator_token: impl Into<String>) -> Self {
        Config {
            operator_token: operator_token.into(),
            client_token: None,
            quota: Quota {
                pages: 64 * 1024,
                bytes: 256 << 20,
                handles: 65_536,
                caches: 8,
            },
            server: format!("memd {}", env!("CARGO_PKG_VERSION")),
            started_ns: 0,
            max_stress_ops: 50_000_000,
            max_request_work: 50_000_000,
            budget_ns: DEFAULT_BUDGET_NS,
        }
    }

    /// Adds a client token, for [`memd_wire::Role::Client`] connections.
    pub fn with_client_token(mut self, token: impl Into<String>) -> Self {
        self.client_token = Some(token.into());
        self
    }
}
