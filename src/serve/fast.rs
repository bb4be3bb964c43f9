//! The content endpoint's fast path: `GET|HEAD /v1/content/{sha256}` of a blob in the hot
//! cache, answered on a plain connection without hyper, axum or the router
//! ([`crate::http::fastconn`] frames it).
//!
//! Owns deciding which content requests are plain enough to answer here, and answering them
//! exactly as the router's handler (`content::content`) does: the same catalog membership,
//! the same hot-cache check against the store (`mark_read`), the same header fields in the
//! same order, the same counters (`gup_cache_hits_total`, served bytes and responses from
//! memory, download starts, `gup_request_duration_seconds{route="/v1/content/{sha256}"}`),
//! plus `gup_fast_responses_total`, which says how many took this path.
//! It must never answer anything the handler would answer differently: a request with
//! `Range`, any `If-*` field or `X-Gup-Client-Id` (slot admission), a digest that is not 64
//! lower-case hex, one outside the catalog, not hot, or whose copy is stale, and every request
//! while `serve.max_concurrent_downloads` or `serve.max_bytes_per_sec` is set, is declined
//! and goes to the router.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram;

use super::conditional::BLOB_CACHE;
use super::metrics::ServedFrom;
use super::Served;
use crate::core::digest::Digest;
use crate::http::fastconn::{FastAnswer, FastPath, FastRequest};

/// The route template the router records content requests under.
const ROUTE: &str = "/v1/content/{sha256}";

/// The fast path of one server's content endpoint.
pub struct ContentFast {
    served: Arc<Served>,
    /// `gup_request_duration_seconds{route=ROUTE}`, looked up once.
    duration: Histogram,
}

/// The fast path over `served`, for [`crate::http::server::Serving::fast`].
pub fn fast_path(served: Arc<Served>) -> Arc<dyn FastPath> {
    let duration = served.metrics.route_duration(ROUTE);
    Arc::new(ContentFast { served, duration })
}

/// The digest in a request target `/v1/content/<64 lower-case hex>` (nothing else: no query,
/// no escapes), as its hex.
fn content_digest(path: &str) -> Option<&str> {
    let hex = path.strip_prefix("/v1/content/")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// Whether a header field may change the handler's answer (then the router answers).
fn consulted(name: &str) -> bool {
    let name = name.as_bytes();
    name.eq_ignore_ascii_case(b"range")
        || name.eq_ignore_ascii_case(b"x-gup-client-id")
        || (name.len() > 3 && name[..3].eq_ignore_ascii_case(b"if-"))
}

impl FastPath for ContentFast {
    fn answer(&self, req: &FastRequest<'_>, fields: &mut Vec<u8>) -> Option<FastAnswer> {
        let started = Instant::now();
        let get = match req.method {
            "GET" => true,
            "HEAD" => false,
            _ => return None,
        };
        let hex = content_digest(req.path)?;
        if req.headers.iter().any(|h| consulted(h.name)) {
            return None;
        }
        let s = &self.served;
        if s.downloads.is_some() || !s.lan.is_unlimited() {
            return None;
        }
        let digest: Digest = hex.parse().ok()?;
        let size = s.catalog().ok()?.find(&digest)?.1.size;
        let (body, stored_at) = s.hot.get(&digest)?;
        if body.len() as u64 != size {
            return None;
        }
        // As the handler: the copy is good only while the store holds that very blob (a stale
        // one the router removes from the hot cache, after this same check).
        if s.store
            .mark_read(&digest)
            .is_none_or(|m| m.stored_at != stored_at)
        {
            return None;
        }
        s.metrics.cache_hits.inc();
        fields.extend_from_slice(b"content-type: application/octet-stream\r\netag: \"");
        fields.extend_from_slice(hex.as_bytes());
        fields.extend_from_slice(b"\"\r\naccept-ranges: bytes\r\ncache-control: ");
        fields.extend_from_slice(BLOB_CACHE.as_bytes());
        fields.extend_from_slice(b"\r\n");
        let body = if get {
            s.note_download_start(&digest);
            s.metrics.served(ServedFrom::Memory).inc_by(size);
            Some(body)
        } else {
            None
        };
        s.metrics.fast_responses.inc();
        self.duration.observe(started.elapsed().as_secs_f64());
        Some(FastAnswer {
            status: axum::http::StatusCode::OK,
            content_length: size,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_lower_case_digest_is_taken() {
        let hex = "ab".repeat(32);
        assert_eq!(
            content_digest(&format!("/v1/content/{hex}")),
            Some(&hex[..])
        );
        assert_eq!(
            content_digest(&format!("/v1/content/{}", hex.to_uppercase())),
            None
        );
        assert_eq!(content_digest(&format!("/v1/content/{hex}?x=1")), None);
        assert_eq!(content_digest(&format!("/v1/content/{hex}/")), None);
        assert_eq!(
            content_digest(&format!("/v1/content/%61{}", &hex[1..])),
            None
        );
        assert_eq!(content_digest("/v1/content/"), None);
        assert_eq!(content_digest(&format!("/v1/catalog/{hex}")), None);
    }

    #[test]
    fn fields_the_handler_reads_send_the_request_to_the_router() {
        for name in [
            "Range",
            "if-none-match",
            "If-Range",
            "IF-MATCH",
            "X-Gup-Client-Id",
        ] {
            assert!(consulted(name), "{name}");
        }
        for name in ["host", "accept", "user-agent", "if", "connection"] {
            assert!(!consulted(name), "{name}");
        }
    }
}
