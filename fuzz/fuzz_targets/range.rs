//! Fuzzes the Range / If-Range decision (RFC 9110 §14): never panics, and a partial answer
//! always lies inside the blob.
#![no_main]

use gup::serve::conditional::{decide_range, RangeDecision};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, u32)| {
    let (range, if_range, len) = input;
    let len = len as u64;
    let mut headers = axum::http::HeaderMap::new();
    if let Ok(v) = range.parse() {
        headers.insert("range", v);
    }
    if let Ok(v) = if_range.parse() {
        headers.insert("if-range", v);
    }
    if let RangeDecision::Partial { start, end } = decide_range(&headers, "\"e\"", len) {
        assert!(start <= end && end < len);
    }
});
