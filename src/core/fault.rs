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

/// An error and its causes on one line, each cause once: reqwest's "error sending request
/// for url (...)" alone does not say that the connection was refused; its sources do.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The first I/O error among `e` and its causes, said plainly when it is a common one
/// ("connection refused"), for a message that leads with the cause.
pub fn io_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return Some(match io.kind() {
                K::ConnectionRefused => "connection refused (nothing listens there)".into(),
                K::ConnectionReset => "connection reset".into(),
                K::TimedOut => "timed out".into(),
                K::AddrNotAvailable => "address not available".into(),
                _ => io.to_string(),
            });
        }
        cur = err.source();
    }
    None
}
