//! What kind of failure an error is: the classification every module gives its own errors.
//!
//! Owns [`Kind`] and the [`Fault`] trait. A module's typed error says what went wrong and
//! where (bad input, not found, an upstream that failed and whether a retry can help, a local
//! failure of this server); `http::error` alone turns a kind into a status code and a JSON
//! body. This module must never name an HTTP status, a header or a route: it is the
//! vocabulary the layers above share, after pingora's error taxonomy.

/// What kind of failure an error is, independent of how it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or breaks a rule.
    BadInput,
    /// The request body is larger than the endpoint takes.
    TooLarge,
    /// The thing asked for does not exist.
    NotFound,
    /// The endpoint exists but does not take this method.
    MethodNotAllowed,
    /// The request is well formed, but the current state forbids it.
    Conflict,
    /// No valid credentials were presented.
    Unauthorized,
    /// A setting forbids it for this caller.
    Forbidden,
    /// Asked before its time: the caller may retry after this many seconds.
    TooEarly { retry_after_s: u64 },
    /// This server cannot answer now (at capacity, not ready): retry after this many seconds.
    Unavailable { retry_after_s: u64 },
    /// A requested byte range lies outside a representation of `len` bytes.
    RangeNotSatisfiable { len: u64 },
    /// An upstream server failed; `retryable` says whether another try can help.
    Upstream { retryable: bool },
    /// This server failed: its disk, a poisoned lock, a bug. Never an upstream's fault.
    Local,
}

/// An error that knows what kind of failure it is.
pub trait Fault: std::fmt::Display {
    /// The kind of failure.
    fn kind(&self) -> Kind;

    /// A stable machine-readable code for the JSON error body, e.g. `bad_digest`.
    fn code(&self) -> &'static str;

    /// Extra fields of the JSON error body (for example `not_before` of a slot wait).
    fn details(&self) -> Option<serde_json::Value> {
        None
    }
}

/// A failure of this server's own machinery that is not worth a type of its own (a
/// poisoned lock, a task that died): always [`Kind::Local`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Internal(pub String);

impl Internal {
    /// A lock that a panicking thread left poisoned.
    pub fn poisoned(what: &str) -> Internal {
        Internal(format!("{what} lock poisoned"))
    }
}

impl Fault for Internal {
    fn kind(&self) -> Kind {
        Kind::Local
    }

    fn code(&self) -> &'static str {
        "internal"
    }
}
