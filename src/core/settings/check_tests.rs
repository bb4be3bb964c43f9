//! Unit tests of the bounds a directory keeps: tree depth, policy size, the damper, and a
//! check of a hostile mirror that stays linear.

use serde_json::json;

use super::super::directory::{Group, Policy};
use super::*;
use crate::core::fault::{Fault, Kind};
use crate::core::settings::test_support::bad_key;
use crate::core::settings::{MAX_DAMPER_S, MAX_GROUP_DEPTH, MAX_POLICY_BYTES};

/// default -> g1 -> g2 -> ... -> g`n`, made through the admin's own calls.
fn chain(n: usize) -> Directory {
    let mut d = Directory::default();
    for i in 1..=n {
        let parent = if i == 1 {
            DEFAULT_GROUP.to_string()
        } else {
            format!("g{}", i - 1)
        };
        d.put_group(&format!("g{i}"), &parent).unwrap();
    }
    d
}

#[test]
fn a_group_tree_stops_at_its_depth_bound() {
    let mut d = chain(MAX_GROUP_DEPTH);
    assert!(d.check().is_ok());
    let e = d
        .put_group("too-deep", &format!("g{MAX_GROUP_DEPTH}"))
        .unwrap_err();
    assert_eq!(bad_key(e), "parent");
    // Moving a subtree under a deep group counts the subtree's own levels.
    d.put_group("top", DEFAULT_GROUP).unwrap();
    d.put_group("child", "top").unwrap();
    let e = d
        .put_group("top", &format!("g{}", MAX_GROUP_DEPTH - 1))
        .unwrap_err();
    assert_eq!(bad_key(e), "parent");
    assert!(d.put_group("top", "g1").is_ok());
}

#[test]
fn a_hostile_mirror_with_a_hundred_thousand_deep_chain_is_refused() {
    // Built by hand, as a hostile upstream would send it: the admin calls refuse it.
    let mut d = Directory::default();
    for i in 1..=100_000usize {
        let parent = if i == 1 {
            DEFAULT_GROUP.to_string()
        } else {
            format!("g{}", i - 1)
        };
        d.groups.insert(
            format!("g{i}"),
            Group {
                parent: Some(parent),
                ..Group::default()
            },
        );
    }
    let e = d.check().unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict, "{e}");
    assert!(e.to_string().contains("levels below default"), "{e}");
}

#[test]
fn a_parent_cycle_in_a_mirror_is_refused() {
    let mut d = Directory::default();
    for (g, p) in [("a", "b"), ("b", "a")] {
        d.groups.insert(
            g.into(),
            Group {
                parent: Some(p.into()),
                ..Group::default()
            },
        );
    }
    let e = d.check().unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
}

#[test]
fn a_policy_over_its_bound_is_refused_naming_the_group() {
    let mut d = Directory::default();
    d.put_group("branch", DEFAULT_GROUP).unwrap();
    let big = "x".repeat(MAX_POLICY_BYTES);
    let e = d.put_policy("branch", json!({ "blob": big })).unwrap_err();
    assert_eq!(e.kind(), Kind::TooLarge);
    assert!(e.to_string().contains("branch"), "{e}");
    assert!(d.put_policy("branch", json!({"scan": true})).is_ok());
    // The same bound holds for a mirror.
    let text = format!("{{\"blob\":\"{big}\"}}");
    if let Some(g) = d.groups.get_mut("branch") {
        g.policy = Some(Policy {
            serial: 99,
            document: serde_json::value::RawValue::from_string(text).unwrap(),
        });
    }
    assert_eq!(d.check().unwrap_err().kind(), Kind::TooLarge);
}

#[test]
fn the_damper_is_at_most_a_year() {
    let mut d = Directory::default();
    assert!(d
        .put_site(&json!({ "notification_damper_s": MAX_DAMPER_S }))
        .is_ok());
    let e = d
        .put_site(&json!({ "notification_damper_s": 9_223_372_036_854_775_808u64 }))
        .unwrap_err();
    assert_eq!(bad_key(e), "notification_damper_s");
    assert_eq!(d.site.notification_damper_s, MAX_DAMPER_S);
}
