//! Errno-style errors carried in replies.

use alloc::string::String;
use core::fmt;

use serde::{Deserialize, Serialize};

pub use hermit_abi::errno;

/// An error reply: an errno number from [`mod@errno`] and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// errno number (`errno::ENOMEM`, `errno::EINVAL`, ...).
    pub code: i32,
    /// What happened, for humans.
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// The symbolic name of the code (`"ENOMEM"`), or `"E?"` when unknown.
    pub fn code_name(&self) -> &'static str {
        errno_name(self.code)
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code_name(), self.code, self.message)
    }
}

/// The symbolic name of an errno number used by memd.
pub fn errno_name(code: i32) -> &'static str {
    use errno::*;
    match code {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        ENODEV => "ENODEV",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        ERANGE => "ERANGE",
        ENOSYS => "ENOSYS",
        EPROTO => "EPROTO",
        EOVERFLOW => "EOVERFLOW",
        EMSGSIZE => "EMSGSIZE",
        EOPNOTSUPP => "EOPNOTSUPP",
        EDQUOT => "EDQUOT",
        ECANCELED => "ECANCELED",
        _ => "E?",
    }
}
