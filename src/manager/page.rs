//! The bounds every admin listing shares: page sizes, the scan bound, cursors, key parts.
//!
//! Owns how a `limit` is checked (400 naming `limit` beyond the largest page), how many
//! records one request may visit before it answers the page found so far, and how free text
//! becomes part of a record key without being able to reach into a neighbouring key. It must
//! never read or write a record: `events`, `applications` and `registry` do, through these.

use std::borrow::Cow;

use crate::core::fault::{Fault, Kind};

/// Default page of the event, notification and client listings.
pub const DEFAULT_LIMIT: usize = 1000;
/// Largest page of the event, notification and client listings.
pub const MAX_LIMIT: usize = 10_000;

/// Records (or index entries) one listing request may visit before it answers. A filter
/// that matches little could otherwise walk millions of records in one request; at this
/// bound the request answers the page found so far, possibly short or empty, with `next`
/// set to where it stopped. Measured over 3 million events (`cargo bench --bench events`,
/// 2 cores under a load average of 5), 100,000 index entries took 59 to 77 ms warm; 50,000
/// take 44 to 57 ms warm (about 100 ms on the first query after a start, the pages still
/// on disk), so a request that hits the bound answers in well under 100 ms once warm.
pub const SCAN_LIMIT: usize = 50_000;

/// A `limit` outside 1 to the largest page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit: must be 1 to {max} (got {got})")]
pub struct BadLimit {
    pub got: usize,
    pub max: usize,
}

impl Fault for BadLimit {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }

    fn code(&self) -> &'static str {
        "bad_request"
    }
}

/// The page size asked for, or `default`; refused beyond `max` or at 0.
pub fn limit(asked: Option<usize>, default: usize, max: usize) -> Result<usize, BadLimit> {
    match asked.unwrap_or(default) {
        n @ 1.. if n <= max => Ok(n),
        got => Err(BadLimit { got, max }),
    }
}

/// Free text as one part of a record key: `%` and NUL escaped, so that the NUL that ends
/// the part in a key is never inside it, and a prefix built for one value never matches
/// the keys of another.
pub fn part(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '\0']) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.replace('%', "%25").replace('\0', "%00"))
}

/// A sequence number as a key part that sorts in numeric order.
pub fn seq_part(seq: u64) -> String {
    format!("{seq:020}")
}

/// The sequence number that ends `key` after `prefix` (None when the rest is not one).
pub fn seq_after(key: &str, prefix: &str) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    if rest.len() != 20 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_refuse_outside_the_range() {
        assert_eq!(limit(None, 1000, 10_000), Ok(1000));
        assert_eq!(limit(Some(10_000), 1000, 10_000), Ok(10_000));
        assert!(limit(Some(0), 1000, 10_000).is_err());
        let e = limit(Some(10_001), 1000, 10_000).unwrap_err();
        assert!(e.to_string().starts_with("limit:"), "{e}");
    }

    #[test]
    fn key_parts_cannot_reach_into_a_neighbour() {
        assert_eq!(part("risk"), "risk");
        assert_eq!(part("a\0b%"), "a%00b%25");
        assert!(!part("a\0b").contains('\0'));
        assert_eq!(seq_after("k/risk\0x", "k/risk\0"), None);
        let key = format!("k/risk\0{}", seq_part(42));
        assert_eq!(seq_after(&key, "k/risk\0"), Some(42));
        assert_eq!(seq_after(&format!("{key}x"), "k/risk\0"), None);
        assert_eq!(seq_part(u64::MAX).len(), 20);
    }
}
