//! Property tests (proptest) for the parsers that face the network or the operator: the
//! HTTP Range decision (RFC 9110 §14), the digest parser, the config loader and the event
//! validator. None may panic on any input, and what they accept must obey their rules.

use axum::http::HeaderMap;
use gup::serve::conditional::{decide_range, RangeDecision};
use proptest::prelude::*;

fn headers(range: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = range.parse() {
        h.insert("range", v);
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any Range header: never panics; a partial answer is always inside the blob.
    #[test]
    fn range_decisions_stay_inside_the_blob(range in ".{0,40}", len in 0u64..10_000) {
        match decide_range(&headers(&range), "\"e\"", len) {
            RangeDecision::Partial { start, end } => {
                prop_assert!(start <= end);
                prop_assert!(end < len);
            }
            RangeDecision::Full | RangeDecision::Unsatisfiable => {}
        }
    }

    /// Well-formed single ranges are answered exactly as RFC 9110 §14.1.2 says.
    #[test]
    fn single_ranges_follow_the_rfc(a in 0u64..20_000, b in 0u64..20_000, len in 1u64..10_000) {
        let (first, last) = (a.min(b), a.max(b));
        let d = decide_range(&headers(&format!("bytes={first}-{last}")), "\"e\"", len);
        if first >= len {
            prop_assert_eq!(d, RangeDecision::Unsatisfiable);
        } else {
            prop_assert_eq!(d, RangeDecision::Partial { start: first, end: last.min(len - 1) });
        }
        let suffix = decide_range(&headers(&format!("bytes=-{}", a + 1)), "\"e\"", len);
        prop_assert_eq!(suffix, RangeDecision::Partial { start: len - (a + 1).min(len), end: len - 1 });
    }

    /// The digest parser accepts exactly 64 lower-case hex characters, and round-trips.
    #[test]
    fn digests(s in ".{0,70}") {
        let ok = s.len() == 64 && s.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'));
        let parsed = s.parse::<gup::core::digest::Digest>();
        prop_assert_eq!(parsed.is_ok(), ok);
        if let Ok(d) = parsed {
            prop_assert_eq!(d.to_hex(), s);
        }
    }

    #[test]
    fn hex_digests_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
        let s = hex::encode(bytes);
        prop_assert_eq!(s.parse::<gup::core::digest::Digest>().unwrap().to_hex(), s);
    }

    /// The config loader never panics, and its errors are one line naming a key.
    #[test]
    fn config_loader(text in "(\\[(node|upstream|cache|serve|limits|manager|log|x)\\]\n)?([a-z_]{1,20} = (\"[a-z0-9:./]{0,20}\"|[0-9]{1,12}|true|false|\\[\\])\n){0,4}") {
        for result in [
            gup::core::config::parse::<gup::core::config::NodeConfig>(&text).and_then(|c| c.validate()),
            gup::core::config::parse::<gup::core::config::ManagerConfig>(&text).and_then(|c| c.validate()),
        ] {
            if let Err(e) = result {
                prop_assert!(!e.key.is_empty());
                prop_assert!(!e.to_string().contains('\n'), "{}", e);
            }
        }
        let _ = gup::core::config::infer_role(&text);
    }

    /// The event validator never panics; what it accepts has ids of 1..=128 characters, a
    /// kind, and a time that parses.
    #[test]
    fn event_validation(id in ".{0,140}", kind in "[a-z_]{0,10}", time in "(2026-11-24T10:00:00Z|2026-02-30T00:00:00Z|[0-9T:Z+-]{0,25})", client in ".{0,3}") {
        let upload = gup::core::proto::EventUpload {
            client_id: client,
            events: vec![gup::core::proto::Event {
                id: id.clone(),
                kind: kind.clone(),
                subkind: None,
                time: time.clone(),
                data: serde_json::Value::Null,
            }],
        };
        if upload.validate().is_ok() {
            prop_assert!(!id.is_empty() && id.chars().count() <= 128);
            prop_assert!(!kind.is_empty());
            prop_assert!(upload.events[0].parsed_time().is_some());
        }
    }
}
