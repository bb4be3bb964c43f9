//! What can go wrong when a node talks to its upstreams, as typed errors.
//!
//! Owns [`UpstreamError`] (which server, whether a retry may help, whether the failure is
//! this node's own) and [`EnrolRelayError`] (a relayed enrolment's outcome), and how each
//! becomes an answer. It must never make a call or decide which server to try next: that is
//! `upstream`'s.

use reqwest::StatusCode;

use crate::store::StoreError;

/// What can go wrong talking to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{server}: {source}")]
    Http {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{server}: answered {status}")]
    Status { server: String, status: StatusCode },
    /// A 429 or 503 with `Retry-After`: the server is asked again no sooner.
    #[error("{server}: answered {status}, retry after {retry_after_s} s")]
    Busy {
        server: String,
        status: StatusCode,
        retry_after_s: u64,
    },
    /// Every upstream asked this node to wait (`Retry-After`) and none was asked now.
    #[error("every upstream asked this node to wait; the next try is in {retry_after_s} s")]
    Held { retry_after_s: u64 },
    #[error("{server}: no byte for {secs} s")]
    Idle { server: String, secs: u64 },
    /// The bytes a server sent are not the blob they should be.
    #[error("{server}: {source}")]
    Mismatch {
        server: String,
        #[source]
        source: StoreError,
    },
    /// This node failed to keep what a server sent (its disk): not the server's fault.
    #[error("this node: {0}")]
    Local(#[source] StoreError),
    #[error("no upstream answered: {}", .failures.join("; "))]
    AllFailed {
        failures: Vec<String>,
        /// Whether any of the failures may go away on a later try.
        retryable: bool,
    },
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("upstream.ca_file {path}: {reason}")]
    Ca { path: String, reason: String },
    /// `upstream.proxy` cannot be used; `shown` has its credentials redacted.
    #[error("upstream.proxy {shown}: {reason}")]
    Proxy { shown: String, reason: String },
    #[error("{server}: catalog refused: {reason}")]
    Signature { server: String, reason: String },
    #[error("{server}: refused: {reason}")]
    Refused { server: String, reason: String },
}

impl UpstreamError {
    /// A failure of this node itself, not of any upstream.
    pub fn is_local(&self) -> bool {
        matches!(self, UpstreamError::Local(_))
    }

    /// This node's disk refusing the bytes (full or failing).
    pub fn is_no_room(&self) -> bool {
        matches!(self, UpstreamError::Local(e) if e.is_disk_failure())
    }

    /// Whether trying again later (this server or another) may succeed: a connection that
    /// failed, an answer of 5xx, 408 or 429, silence. A refused body, a bad signature or a 4xx
    /// will be the same next time.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Http { .. }
            | UpstreamError::Idle { .. }
            | UpstreamError::Busy { .. }
            | UpstreamError::Held { .. } => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            UpstreamError::AllFailed { retryable, .. } => *retryable,
            UpstreamError::Local(_) => true,
            UpstreamError::Mismatch { .. }
            | UpstreamError::Client(_)
            | UpstreamError::Ca { .. }
            | UpstreamError::Proxy { .. }
            | UpstreamError::Signature { .. }
            | UpstreamError::Refused { .. } => false,
        }
    }

    /// The server the failure is about, when it is about one.
    pub fn server(&self) -> Option<&str> {
        match self {
            UpstreamError::Http { server, .. }
            | UpstreamError::Status { server, .. }
            | UpstreamError::Busy { server, .. }
            | UpstreamError::Idle { server, .. }
            | UpstreamError::Mismatch { server, .. }
            | UpstreamError::Signature { server, .. }
            | UpstreamError::Refused { server, .. } => Some(server),
            _ => None,
        }
    }
}

/// Why a relayed enrolment did not bring a credential.
#[derive(Debug, thiserror::Error)]
pub enum EnrolRelayError {
    /// The upstream refused it: its status, code and message, passed on.
    #[error("{message}")]
    Refused {
        status: u16,
        code: &'static str,
        message: String,
    },
    /// No upstream answered: a new client cannot enrol until one does.
    #[error("no upstream answers, so a new client cannot enrol now: {0}")]
    Unreachable(String),
}

impl crate::core::fault::Fault for EnrolRelayError {
    fn kind(&self) -> crate::core::fault::Kind {
        use crate::core::fault::Kind;
        match self {
            EnrolRelayError::Refused { status, .. } => match status {
                400 => Kind::BadInput,
                401 => Kind::Unauthorized,
                404 => Kind::NotFound,
                409 => Kind::Conflict,
                429 => Kind::TooEarly { retry_after_s: 60 },
                _ => Kind::Upstream { retryable: false },
            },
            EnrolRelayError::Unreachable(_) => Kind::Unavailable { retry_after_s: 10 },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            EnrolRelayError::Refused { code, .. } => code,
            EnrolRelayError::Unreachable(_) => "upstream_unavailable",
        }
    }
}
