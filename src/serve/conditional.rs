//! Conditional requests and ranges (RFC 9110): the decisions, apart from any body.
//!
//! Owns how a request's `Range`, `If-Range` and `If-None-Match` are read against one strong
//! ETag, and JSON documents answered with an ETag or a 304. It must never read a blob or
//! decide what a document holds: callers pass the representation's length and tag.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::core::fault::Internal;
use crate::http::error::ApiError;

/// `Cache-Control` of the JSON documents (catalog, settings, policy, sync): kept, but checked
/// with the server (by ETag) before each use.
pub const DOCUMENT_CACHE: &str = "no-cache";

/// `Cache-Control` of blobs: named by their digest, they never change.
pub const BLOB_CACHE: &str = "public, max-age=31536000, immutable";

/// `Cache-Control` of health and metrics: never kept.
pub const NO_STORE: &str = "no-store";

/// A JSON body with a strong ETag, or 304 when the client has it.
pub fn json_with_etag<T: Serialize>(headers: &HeaderMap, etag: &str, value: &T) -> Response {
    if if_none_match(headers, etag) {
        return not_modified(etag, DOCUMENT_CACHE);
    }
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes_with_etag(headers, etag, body),
        Err(e) => ApiError::from(Internal(format!("encoding response: {e}"))).into_response(),
    }
}

/// Serialized JSON with a strong ETag, or 304 when the client has it.
pub fn json_bytes_with_etag(headers: &HeaderMap, etag: &str, body: impl IntoResponse) -> Response {
    if if_none_match(headers, etag) {
        return not_modified(etag, DOCUMENT_CACHE);
    }
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(DOCUMENT_CACHE),
    );
    resp
}

/// 304 with the tag the client holds and the `Cache-Control` the 200 would have carried (RFC
/// 9110 §15.4.5: else caches drop it from their stored copy).
pub fn not_modified(etag: &str, cache_control: &'static str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    resp
}

/// What a request asks of a representation of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeDecision {
    /// The whole representation (no Range, an ignored Range, or several ranges).
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// RFC 9110 §14.2 and §13.1.5: decides between 200, 206 and 416 for one representation.
pub fn decide_range(headers: &HeaderMap, etag: &str, len: u64) -> RangeDecision {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeDecision::Full;
    };
    // If-Range: the range applies only when the validator matches strongly. A date never
    // matches: blobs carry no Last-Modified.
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        let matches = if_range.to_str().map(|v| v.trim() == etag).unwrap_or(false);
        if !matches {
            return RangeDecision::Full;
        }
    }
    use http_range_header::{EndPosition, RangeUnsatisfiableError, StartPosition};
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        // "bytes=-0" is well-formed but selects nothing.
        Err(RangeUnsatisfiableError::ZeroSuffix) => return RangeDecision::Unsatisfiable,
        // A Range the server cannot parse is ignored (§14.2).
        Err(_) => return RangeDecision::Full,
    };
    if parsed.ranges.len() != 1 {
        return RangeDecision::Full;
    }
    let r = parsed.ranges[0];
    match r.start {
        StartPosition::Index(start) => {
            let end = match r.end {
                EndPosition::Index(end) if end < start => return RangeDecision::Full,
                EndPosition::Index(end) => end,
                EndPosition::LastByte => u64::MAX,
            };
            if start >= len {
                return RangeDecision::Unsatisfiable;
            }
            RangeDecision::Partial {
                start,
                end: end.min(len - 1),
            }
        }
        StartPosition::FromLast(n) => {
            if len == 0 || n == 0 {
                return RangeDecision::Unsatisfiable;
            }
            // A suffix longer than the representation selects all of it (§14.1.3).
            RangeDecision::Partial {
                start: len - n.min(len),
                end: len - 1,
            }
        }
    }
}

/// RFC 9110 §13.1.2: weak comparison against our one strong ETag; `*` matches.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == bare)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    const E: &str = "\"abc\"";

    #[test]
    fn ranges() {
        use RangeDecision::*;
        assert_eq!(decide_range(&h(&[]), E, 100), Full);
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-9")]), E, 100),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=90-")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=90-500")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-10")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-500")]), E, 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=100-")]), E, 100),
            Unsatisfiable
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-0")]), E, 100),
            Unsatisfiable
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-0")]), E, 0),
            Unsatisfiable
        );
        assert_eq!(decide_range(&h(&[("range", "bytes=5-3")]), E, 100), Full);
        assert_eq!(decide_range(&h(&[("range", "items=0-3")]), E, 100), Full);
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-1,5-6")]), E, 100),
            Full
        );
    }

    #[test]
    fn if_range_and_if_none_match() {
        use RangeDecision::*;
        let r = [("range", "bytes=0-9"), ("if-range", E)];
        assert_eq!(decide_range(&h(&r), E, 100), Partial { start: 0, end: 9 });
        let r = [("range", "bytes=0-9"), ("if-range", "\"other\"")];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        let r = [("range", "bytes=0-9"), ("if-range", "W/\"abc\"")];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        let r = [
            ("range", "bytes=0-9"),
            ("if-range", "Tue, 15 Nov 1994 08:12:31 GMT"),
        ];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        assert!(if_none_match(&h(&[("if-none-match", E)]), E));
        assert!(if_none_match(
            &h(&[("if-none-match", "\"x\", W/\"abc\"")]),
            E
        ));
        assert!(if_none_match(&h(&[("if-none-match", "*")]), E));
        assert!(!if_none_match(&h(&[("if-none-match", "\"x\"")]), E));
        assert!(!if_none_match(&h(&[]), E));
    }
}
