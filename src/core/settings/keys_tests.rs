//! Unit tests of the leaf keys: the key table and its scopes, every validation rule (each
//! error names its key, and nothing changes on error), boundaries, and the ordering of the
//! management server list.

use serde_json::{json, Value};

use super::{key_spec, Scope, KEYS};
use crate::core::fault::{Fault, Kind};
use crate::core::settings::test_support::{bad_key, tree};
use crate::core::settings::Directory;

// --- key table ---

#[test]
fn keys_table_has_eleven_keys_with_contract_scopes() {
    assert_eq!(KEYS.len(), 11);
    let group_only: Vec<&str> = KEYS
        .iter()
        .filter(|k| k.scope == Scope::GroupOnly)
        .map(|k| k.path)
        .collect();
    assert_eq!(
        group_only,
        [
            "management_servers",
            "download_policies_and_content",
            "reconnection.use_last_group",
            "reconnection.use_last_mode"
        ]
    );
    assert_eq!(
        key_spec("randomization.window_s").unwrap().default_value(),
        json!(3600)
    );
    assert_eq!(key_spec("mode").unwrap().default_value(), json!("pull"));
    assert_eq!(
        key_spec("management_servers").unwrap().default_value(),
        json!([])
    );
    // Every key's default survives its own validator.
    for k in KEYS {
        k.validate(&k.default_value()).unwrap();
    }
}

// --- validation ---

#[test]
fn every_validation_rule_names_the_key() {
    let cases: &[(Value, &str)] = &[
        (
            json!({"communication_enabled": "yes"}),
            "communication_enabled",
        ),
        (
            json!({"download_policies_and_content": 1}),
            "download_policies_and_content",
        ),
        (
            json!({"learn_applications": null, "upload_critical_events_immediately": 0}),
            "upload_critical_events_immediately",
        ),
        (json!({"learn_applications": "true"}), "learn_applications"),
        (
            json!({"randomization": {"enabled": 1}}),
            "randomization.enabled",
        ),
        (
            json!({"reconnection": {"use_last_group": "on"}}),
            "reconnection.use_last_group",
        ),
        (
            json!({"reconnection.use_last_mode": []}),
            "reconnection.use_last_mode",
        ),
        (json!({"heartbeat_interval_s": 0}), "heartbeat_interval_s"),
        (
            json!({"heartbeat_interval_s": 604801}),
            "heartbeat_interval_s",
        ),
        (json!({"heartbeat_interval_s": 1.5}), "heartbeat_interval_s"),
        (json!({"heartbeat_interval_s": -5}), "heartbeat_interval_s"),
        (
            json!({"heartbeat_interval_s": "60"}),
            "heartbeat_interval_s",
        ),
        (
            json!({"randomization": {"window_s": 604801}}),
            "randomization.window_s",
        ),
        (
            json!({"randomization.window_s": -1}),
            "randomization.window_s",
        ),
        (json!({"mode": "PUSH"}), "mode"),
        (json!({"mode": 1}), "mode"),
        (
            json!({"management_servers": "http://x"}),
            "management_servers",
        ),
        (json!({"management_servers": [1]}), "management_servers"),
        (
            json!({"management_servers": [{"url": "ftp://x", "priority": 1}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "not a url", "priority": 1}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "http://x", "priority": 0}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "http://x", "priority": 4294967296u64}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "http://x"}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"priority": 1}]}),
            "management_servers",
        ),
        (
            json!({"management_servers": [{"url": "http://x", "priority": 1, "weight": 2}]}),
            "management_servers",
        ),
        (json!({"bogus": 1}), "bogus"),
        (
            json!({"randomization": {"bogus": 1}}),
            "randomization.bogus",
        ),
        (json!({"randomization": 5}), "randomization"),
        (json!({"randomization.bogus": 5}), "randomization.bogus"),
    ];
    for (body, key) in cases {
        let mut d = tree();
        let before = d.clone();
        let e = d.put_settings("a", None, body).unwrap_err();
        assert_eq!(e.kind(), Kind::BadInput);
        assert_eq!(&bad_key(e), key, "body {body}");
        assert_eq!(d, before, "nothing changes on error: {body}");
    }
    let mut d = tree();
    let e = d.put_settings("a", None, &json!([1])).unwrap_err();
    assert_eq!(bad_key(e), "body");
}

#[test]
fn validation_is_all_or_nothing() {
    let mut d = tree();
    let before = d.clone();
    let e = d
        .put_settings(
            "a",
            None,
            &json!({"mode": "push", "heartbeat_interval_s": 0}),
        )
        .unwrap_err();
    assert_eq!(bad_key(e), "heartbeat_interval_s");
    assert_eq!(d, before);
    let e = d
        .put_settings(
            "a",
            Some("office"),
            &json!({"mode": "push", "management_servers": []}),
        )
        .unwrap_err();
    assert_eq!(bad_key(e), "management_servers");
    assert_eq!(d, before);
}

#[test]
fn boundaries_accepted() {
    let mut d = Directory::default();
    d.put_settings(
        "default",
        None,
        &json!({"heartbeat_interval_s": 604800, "randomization": {"window_s": 0}}),
    )
    .unwrap();
    d.put_settings("default", None, &json!({"heartbeat_interval_s": 1}))
        .unwrap();
    let s = d.effective("default", None);
    assert_eq!(s.heartbeat_interval_s, 1);
    assert_eq!(s.randomization.window_s, 0);
    d.put_settings("default", None, &json!({"randomization.window_s": 604800}))
        .unwrap();
}

#[test]
fn management_servers_sorted_stably_by_priority() {
    let mut d = tree();
    d.put_settings(
        "a",
        None,
        &json!({"management_servers": [
            {"url": "https://c.example", "priority": 2},
            {"priority": 1, "url": "http://a.example:8014"},
            {"url": "https://b.example", "priority": 2},
            {"url": "http://z.example", "priority": 1}
        ]}),
    )
    .unwrap();
    let s = d.effective("b", None);
    let urls: Vec<&str> = s
        .management_servers
        .iter()
        .map(|m| m.url.as_str())
        .collect();
    assert_eq!(
        urls,
        [
            "http://a.example:8014",
            "http://z.example",
            "https://c.example",
            "https://b.example"
        ]
    );
    // Empty list is a real value: "the manager itself", overriding a parent's list.
    d.put_settings("b", None, &json!({"management_servers": []}))
        .unwrap();
    assert!(d.effective("b", None).management_servers.is_empty());
    assert_eq!(d.effective("a", None).management_servers.len(), 4);
}
