//! The JSON error every 4xx/5xx of our handlers carries: `{"error": code, "message": why}`.
//!
//! Owns the one mapping from a [`Fault`]'s kind to an HTTP status, its headers
//! (`Retry-After`, `Content-Range` of a 416, `WWW-Authenticate` of a 401) and its body, so
//! every module's typed error becomes an answer here and nowhere else. It must never decide
//! what went wrong: modules classify their errors (`core::fault`), this file only says how a
//! kind looks on the wire.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::core::fault::{Fault, Kind};

/// An error answered to an HTTP client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `bad_digest`.
    pub code: &'static str,
    pub message: String,
    /// Headers the kind asks for (`Retry-After`, `Content-Range`, `WWW-Authenticate`).
    pub headers: Vec<(&'static str, String)>,
    /// Extra JSON fields of the body (e.g. `not_before` on a 429).
    pub extra: Option<serde_json::Value>,
}

/// The status and headers of each kind of failure: the one place they are decided.
fn answer(kind: Kind) -> (StatusCode, Vec<(&'static str, String)>) {
    match kind {
        Kind::BadInput => (StatusCode::BAD_REQUEST, Vec::new()),
        Kind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Vec::new()),
        Kind::NotFound => (StatusCode::NOT_FOUND, Vec::new()),
        Kind::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, Vec::new()),
        Kind::Conflict => (StatusCode::CONFLICT, Vec::new()),
        Kind::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            vec![("www-authenticate", "Bearer".to_string())],
        ),
        Kind::Forbidden => (StatusCode::FORBIDDEN, Vec::new()),
        Kind::TooEarly { retry_after_s } => (
            StatusCode::TOO_MANY_REQUESTS,
            vec![("retry-after", retry_after_s.max(1).to_string())],
        ),
        Kind::Unavailable { retry_after_s } => (
            StatusCode::SERVICE_UNAVAILABLE,
            vec![("retry-after", retry_after_s.max(1).to_string())],
        ),
        Kind::RangeNotSatisfiable { len } => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            vec![("content-range", format!("bytes */{len}"))],
        ),
        Kind::Upstream { .. } => (StatusCode::BAD_GATEWAY, Vec::new()),
        Kind::Local => (StatusCode::INTERNAL_SERVER_ERROR, Vec::new()),
    }
}

impl<E: Fault> From<E> for ApiError {
    fn from(e: E) -> ApiError {
        let kind = e.kind();
        if kind == Kind::Local {
            // The caller sees a short answer; the log keeps what failed.
            tracing::error!(error = %e, "request failed on this server");
        }
        let (status, headers) = answer(kind);
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
            headers,
            extra: e.details(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut value = serde_json::json!({ "error": self.code, "message": self.message });
        if let (Some(obj), Some(serde_json::Value::Object(extra))) =
            (value.as_object_mut(), self.extra)
        {
            obj.extend(extra);
        }
        let body = serde_json::to_vec(&value)
            .unwrap_or_else(|_| b"{\"error\":\"internal\",\"message\":\"\"}".to_vec());
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}

/// A request the HTTP layer itself refuses: an unknown endpoint or method, a body or query
/// string that does not parse. Handlers' own errors are typed in their modules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no such endpoint")]
    NoEndpoint,
    #[error("this endpoint does not take that method")]
    Method,
    #[error("request body: {0}")]
    Json(String),
    #[error("the request body is larger than this endpoint takes ({0})")]
    BodyTooLarge(String),
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("query string: {0}")]
    Query(String),
    #[error("path: {0}")]
    Path(String),
}

impl Fault for Refused {
    fn kind(&self) -> Kind {
        match self {
            Refused::NoEndpoint => Kind::NotFound,
            Refused::Method => Kind::MethodNotAllowed,
            Refused::BodyTooLarge(_) => Kind::TooLarge,
            _ => Kind::BadInput,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Refused::NoEndpoint => "not_found",
            Refused::Method => "method_not_allowed",
            Refused::Json(_) => "bad_json",
            Refused::BodyTooLarge(_) => "body_too_large",
            Refused::Body(_) => "body_incomplete",
            Refused::Query(_) => "bad_query",
            Refused::Path(_) => "bad_path",
        }
    }
}
