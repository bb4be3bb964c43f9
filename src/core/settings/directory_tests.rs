//! Unit tests of the directory: inheritance and locations, settings bodies, the group tree,
//! serials and policies, site settings, and serde round trips and corrupt mirrors.

use serde_json::json;

use super::{Directory, PutOutcome};
use crate::core::fault::{Fault, Kind};
use crate::core::settings::test_support::{bad_key, tree};
use crate::core::settings::{ClientAuth, ConnectionMode, Settings, SettingsError};

// --- inheritance and locations ---

#[test]
fn inheritance_three_levels() {
    let mut d = tree();
    d.put_settings(
        "default",
        None,
        &json!({"heartbeat_interval_s": 60, "mode": "push"}),
    )
    .unwrap();
    d.put_settings(
        "a",
        None,
        &json!({"randomization": {"window_s": 120}, "mode": "pull"}),
    )
    .unwrap();
    d.put_settings("b", None, &json!({"randomization.enabled": false}))
        .unwrap();
    let b = d.effective("b", None);
    assert_eq!(b.heartbeat_interval_s, 60); // from default
    assert_eq!(b.mode, ConnectionMode::Pull); // from a, beats default
    assert_eq!(b.randomization.window_s, 120); // from a
    assert!(!b.randomization.enabled); // from b
    assert!(b.communication_enabled); // built-in
    let a = d.effective("a", None);
    assert!(a.randomization.enabled);
    let c = d.effective("c", None);
    assert_eq!(c.mode, ConnectionMode::Push);
    assert_eq!(c.randomization.window_s, 3600);
}

#[test]
fn unknown_group_resolves_to_default() {
    let mut d = tree();
    d.put_settings("default", None, &json!({"heartbeat_interval_s": 77}))
        .unwrap();
    assert_eq!(d.effective("nope", None).heartbeat_interval_s, 77);
    assert_eq!(d.resolve_group("nope"), "default");
    assert_eq!(d.resolve_group("b"), "b");
    assert_eq!(d.settings_serial("nope"), d.settings_serial("default"));
}

#[test]
fn location_precedence_follows_resolution_order() {
    let mut d = tree();
    let w = |d: &Directory, g: &str, l: Option<&str>| d.effective(g, l).randomization.window_s;
    // default@L beats built-in only.
    d.put_settings(
        "default",
        Some("office"),
        &json!({"randomization.window_s": 1}),
    )
    .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 1);
    assert_eq!(w(&d, "b", None), 3600);
    // default beats default@L? No: default@L beats default.
    d.put_settings("default", None, &json!({"randomization.window_s": 2}))
        .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 1);
    assert_eq!(w(&d, "b", None), 2);
    // parent (a) beats default@L.
    d.put_settings("a", None, &json!({"randomization.window_s": 3}))
        .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 3);
    // parent@L beats parent.
    d.put_settings("a", Some("office"), &json!({"randomization.window_s": 4}))
        .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 4);
    assert_eq!(w(&d, "b", Some("remote")), 3);
    // G beats parent@L.
    d.put_settings("b", None, &json!({"randomization.window_s": 5}))
        .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 5);
    // G@L beats G.
    d.put_settings("b", Some("office"), &json!({"randomization.window_s": 6}))
        .unwrap();
    assert_eq!(w(&d, "b", Some("office")), 6);
    assert_eq!(w(&d, "b", None), 5);
    // A location override only overrides the keys it sets.
    assert_eq!(d.effective("b", Some("office")).mode, ConnectionMode::Pull);
}

#[test]
fn group_only_key_rejected_on_location_naming_it() {
    let mut d = tree();
    for body in [
        json!({"download_policies_and_content": false}),
        json!({"management_servers": []}),
        json!({"reconnection": {"use_last_group": true}}),
        json!({"reconnection.use_last_mode": true}),
    ] {
        let e = d.put_settings("a", Some("office"), &body).unwrap_err();
        let SettingsError::BadRequest { key, message } = e else {
            panic!()
        };
        assert!(message.contains("group-only"), "{message}");
        assert!(message.contains(&key));
    }
    assert!(d.groups["a"].locations.is_empty());
    // A corrupt mirror holding a group-only key on a location is not read.
    d.groups
        .get_mut("a")
        .unwrap()
        .locations
        .entry("office".into())
        .or_default()
        .0
        .insert("download_policies_and_content".into(), json!(false));
    assert!(
        d.effective("a", Some("office"))
            .download_policies_and_content
    );
    assert!(d.check().is_err());
}

#[test]
fn use_group_settings_clears_and_creates() {
    let mut d = tree();
    let changed = d
        .put_settings("a", Some("office"), &json!({"use_group_settings": false}))
        .unwrap();
    assert_eq!(changed, ["a", "b"]);
    assert!(d.groups["a"].locations["office"].is_empty());
    d.put_settings("a", Some("office"), &json!({"mode": "push"}))
        .unwrap();
    assert_eq!(d.effective("a", Some("office")).mode, ConnectionMode::Push);
    d.put_settings("a", Some("office"), &json!({"use_group_settings": true}))
        .unwrap();
    assert!(!d.groups["a"].locations.contains_key("office"));
    assert_eq!(d.effective("a", Some("office")).mode, ConnectionMode::Pull);
    // Clearing what is not there changes nothing.
    let before = d.clone();
    assert!(d
        .put_settings("a", Some("office"), &json!({"use_group_settings": true}))
        .unwrap()
        .is_empty());
    assert_eq!(d, before);
    // true with other keys is contradictory.
    let e = d
        .put_settings(
            "a",
            Some("office"),
            &json!({"use_group_settings": true, "mode": "push"}),
        )
        .unwrap_err();
    assert_eq!(bad_key(e), "use_group_settings");
    // Not a boolean; not on a group.
    let e = d
        .put_settings("a", Some("office"), &json!({"use_group_settings": 1}))
        .unwrap_err();
    assert_eq!(bad_key(e), "use_group_settings");
    let e = d
        .put_settings("a", None, &json!({"use_group_settings": true}))
        .unwrap_err();
    assert_eq!(bad_key(e), "use_group_settings");
}

#[test]
fn null_goes_back_to_inheriting() {
    let mut d = tree();
    d.put_settings("default", None, &json!({"heartbeat_interval_s": 30}))
        .unwrap();
    d.put_settings(
        "a",
        None,
        &json!({"heartbeat_interval_s": 90, "randomization": {"enabled": false, "window_s": 5}}),
    )
    .unwrap();
    assert_eq!(d.effective("b", None).heartbeat_interval_s, 90);
    d.put_settings("a", None, &json!({"heartbeat_interval_s": null}))
        .unwrap();
    assert_eq!(d.effective("b", None).heartbeat_interval_s, 30);
    assert!(d.groups["a"].own.get("heartbeat_interval_s").is_none());
    // A null object resets every key under it.
    d.put_settings("a", None, &json!({"randomization": null}))
        .unwrap();
    assert!(d.groups["a"].own.is_empty());
    // Dotted null, on a location.
    d.put_settings("a", Some("remote"), &json!({"mode": "push"}))
        .unwrap();
    d.put_settings("a", Some("remote"), &json!({"mode": null}))
        .unwrap();
    assert!(d.groups["a"].locations["remote"].is_empty());
    // Null for something never set changes nothing.
    let serial = d.groups["a"].serial;
    assert!(d
        .put_settings("a", None, &json!({"mode": null}))
        .unwrap()
        .is_empty());
    assert_eq!(d.groups["a"].serial, serial);
}

#[test]
fn nested_and_dotted_bodies_are_equivalent() {
    let mut d1 = Directory::default();
    let mut d2 = Directory::default();
    d1.put_settings(
        "default",
        None,
        &json!({"randomization": {"window_s": 60}, "mode": "push"}),
    )
    .unwrap();
    d2.put_settings(
        "default",
        None,
        &json!({"randomization.window_s": 60, "mode": "push"}),
    )
    .unwrap();
    assert_eq!(d1, d2);
    assert_eq!(
        d1.groups["default"].own.to_nested(),
        json!({"randomization": {"window_s": 60}, "mode": "push"})
    );
    let e = d1
        .put_settings(
            "default",
            None,
            &json!({"randomization": {"window_s": 1}, "randomization.window_s": 2}),
        )
        .unwrap_err();
    assert_eq!(bad_key(e), "randomization.window_s");
}

// --- settings bodies ---

#[test]
fn put_settings_unknown_group_and_bad_location() {
    let mut d = tree();
    let e = d
        .put_settings("nope", None, &json!({"mode": "push"}))
        .unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    let e = d
        .put_settings("a", Some("bad/loc"), &json!({"mode": "push"}))
        .unwrap_err();
    assert_eq!(bad_key(e), "location");
    let e = d
        .put_settings("a", Some(""), &json!({"mode": "push"}))
        .unwrap_err();
    assert_eq!(bad_key(e), "location");
}

#[test]
fn put_settings_returns_group_and_descendants_and_bumps() {
    let mut d = tree();
    let c0 = d.counter;
    let changed = d.put_settings("a", None, &json!({"mode": "push"})).unwrap();
    assert_eq!(changed, ["a", "b"]);
    assert_eq!(d.counter, c0 + 1);
    assert_eq!(d.groups["a"].serial, d.counter);
    let changed = d
        .put_settings("default", None, &json!({"mode": "push"}))
        .unwrap();
    assert_eq!(changed, ["default", "a", "b", "c"]);
    // Same value again: no change, no bump.
    let c1 = d.counter;
    assert!(d
        .put_settings("a", None, &json!({"mode": "push"}))
        .unwrap()
        .is_empty());
    assert!(d
        .put_settings("a", Some("office"), &json!({}))
        .unwrap()
        .is_empty());
    assert_eq!(d.counter, c1);
}

// --- group tree ---

#[test]
fn put_group_outcomes_and_name_rules() {
    let mut d = Directory::default();
    assert_eq!(d.put_group("a", "default").unwrap(), PutOutcome::Created);
    assert_eq!(d.put_group("a", "default").unwrap(), PutOutcome::Unchanged);
    assert_eq!(d.put_group("b", "default").unwrap(), PutOutcome::Created);
    let s = d.groups["a"].serial;
    assert_eq!(d.put_group("a", "b").unwrap(), PutOutcome::Changed);
    assert!(d.groups["a"].serial > s);
    assert_eq!(d.groups["a"].parent.as_deref(), Some("b"));
    let long = "x".repeat(65);
    for bad in ["", "a b", "a/b", "é", ".", "..", long.as_str()] {
        let e = d.put_group(bad, "default").unwrap_err();
        assert_eq!(bad_key(e), "group", "{bad:?}");
    }
    d.put_group(&"x".repeat(64), "default").unwrap();
    d.put_group("A-z_0.9", "default").unwrap();
    let e = d.put_group("q", "missing").unwrap_err();
    assert_eq!(bad_key(e), "parent");
    // default stays the root.
    for p in ["default", "a"] {
        let e = d.put_group("default", p).unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict);
    }
    assert_eq!(d.groups["default"].parent, None);
}

#[test]
fn reparenting_cycle_rejected_naming_the_cycle() {
    let mut d = tree();
    d.put_group("x", "b").unwrap(); // default -> a -> b -> x
    let before = d.clone();
    let e = d.put_group("a", "x").unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict);
    let msg = e.to_string();
    assert!(msg.contains("a -> b -> x -> a"), "{msg}");
    let e = d.put_group("a", "a").unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    assert_eq!(d, before);
    // A legal move.
    assert_eq!(d.put_group("x", "c").unwrap(), PutOutcome::Changed);
    assert_eq!(d.descendants("a"), ["a", "b"]);
    assert_eq!(d.descendants("c"), ["c", "x"]);
}

#[test]
fn reparenting_changes_inheritance_and_serials() {
    let mut d = tree();
    d.put_settings("a", None, &json!({"heartbeat_interval_s": 10}))
        .unwrap();
    d.put_settings("c", None, &json!({"heartbeat_interval_s": 20}))
        .unwrap();
    assert_eq!(d.effective("b", None).heartbeat_interval_s, 10);
    let s = d.settings_serial("b");
    d.put_group("b", "c").unwrap();
    assert_eq!(d.effective("b", None).heartbeat_interval_s, 20);
    assert!(d.settings_serial("b") > s);
}

#[test]
fn delete_group_rules() {
    let mut d = tree();
    let e = d.delete_group("default", false).unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict);
    let e = d.delete_group("a", false).unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict);
    assert!(e.to_string().contains('b'), "{e}");
    let e = d.delete_group("b", true).unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict);
    assert!(e.to_string().contains("clients"));
    let e = d.delete_group("nope", false).unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    d.delete_group("b", false).unwrap();
    d.delete_group("a", false).unwrap();
    assert!(!d.groups.contains_key("a"));
    assert_eq!(d.resolve_group("a"), "default");
}

#[test]
fn descendants_and_listing() {
    let mut d = tree();
    assert_eq!(d.descendants("default"), ["default", "a", "b", "c"]);
    assert_eq!(d.descendants("b"), ["b"]);
    assert!(d.descendants("nope").is_empty());
    d.put_settings("a", None, &json!({"randomization.window_s": 60}))
        .unwrap();
    d.put_settings("a", Some("office"), &json!({"mode": "push"}))
        .unwrap();
    let serial = d.put_policy("a", json!({"av": true})).unwrap();
    let list = d.groups_list();
    let names: Vec<&str> = list.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "default"]);
    let a = &list[0];
    assert_eq!(a.parent.as_deref(), Some("default"));
    assert_eq!(a.children, 1);
    assert_eq!(a.settings, json!({"randomization": {"window_s": 60}}));
    assert_eq!(a.locations["office"], json!({"mode": "push"}));
    assert_eq!(a.policy_serial, Some(serial));
    assert_eq!(list[3].children, 2);
    assert_eq!(list[3].policy_serial, None);
}

// --- serials and policies ---

#[test]
fn settings_serial_follows_ancestors_and_site() {
    let mut d = tree();
    let b0 = d.settings_serial("b");
    let c0 = d.settings_serial("c");
    d.put_settings("default", None, &json!({"mode": "push"}))
        .unwrap();
    let b1 = d.settings_serial("b");
    assert!(b1 > b0);
    assert!(d.settings_serial("c") > c0);
    d.put_settings("a", Some("office"), &json!({"mode": "pull"}))
        .unwrap();
    let b2 = d.settings_serial("b");
    assert!(b2 > b1);
    let c2 = d.settings_serial("c");
    // A sibling's change does not touch c.
    d.put_settings("b", None, &json!({"mode": "pull"})).unwrap();
    assert_eq!(d.settings_serial("c"), c2);
    // Site changes move every serial.
    d.put_site(&json!({"application_learning": true})).unwrap();
    assert!(d.settings_serial("c") > c2);
    assert_eq!(d.settings_serial("c"), d.site_serial);
    // ETags name the resolved group.
    assert_ne!(d.settings_etag("nope", None), d.settings_etag("c", None));
    assert_eq!(
        d.settings_etag("nope", None),
        d.settings_etag("default", None)
    );
    assert!(d.settings_etag("c", Some("office")).starts_with('"'));
}

#[test]
fn policy_inheritance_and_one_counter() {
    let mut d = tree();
    assert!(d.policy("b").is_none());
    let s1 = d.put_policy("default", json!({"p": 1})).unwrap();
    let (owner, p) = d.policy("b").unwrap();
    assert_eq!((owner, p.serial), ("default", s1));
    d.put_settings("c", None, &json!({"mode": "push"})).unwrap();
    let s2 = d.put_policy("a", json!({"p": 2})).unwrap();
    assert!(s2 > s1 + 1, "settings and policy share the counter");
    assert!(s2 > d.groups["c"].serial);
    let (owner, p) = d.policy("b").unwrap();
    assert_eq!((owner, p.serial, p.value()), ("a", s2, json!({"p": 2})));
    assert_eq!(d.policy("c").unwrap().0, "default");
    assert_eq!(d.policy("unknown").unwrap().0, "default");
    let s3 = d.put_policy("a", json!({"p": 3})).unwrap();
    assert!(s3 > s2);
    assert_eq!(
        d.put_policy("nope", json!(null)).unwrap_err().code(),
        "not_found"
    );
    // Policies do not move settings serials.
    let before = d.settings_serial("b");
    d.put_policy("b", json!({})).unwrap();
    assert_eq!(d.settings_serial("b"), before);
}

// --- site ---

#[test]
fn learn_applications_gated_by_site() {
    let mut d = tree();
    d.put_settings("a", None, &json!({"learn_applications": true}))
        .unwrap();
    assert!(!d.effective("b", None).learn_applications);
    d.put_site(&json!({"application_learning": true})).unwrap();
    assert!(d.effective("b", None).learn_applications);
    assert!(!d.effective("c", None).learn_applications);
    d.put_site(&json!({"application_learning": false})).unwrap();
    assert!(!d.effective("a", None).learn_applications);
}

#[test]
fn put_site_rules() {
    let mut d = Directory::default();
    d.put_site(&json!({"notification_damper_s": 0})).unwrap();
    assert_eq!(d.site.notification_damper_s, 0);
    assert!(!d.site.application_learning);
    let before = d.clone();
    for (body, key) in [
        (
            json!({"application_learning": "yes"}),
            "application_learning",
        ),
        (
            json!({"notification_damper_s": -1}),
            "notification_damper_s",
        ),
        (
            json!({"notification_damper_s": 1.5}),
            "notification_damper_s",
        ),
        (json!({"application_learning": true, "color": 1}), "color"),
        (json!(true), "body"),
    ] {
        let e = d.put_site(&body).unwrap_err();
        assert_eq!(bad_key(e), key);
        assert_eq!(d, before);
    }
    d.put_site(&json!({"notification_damper_s": null})).unwrap();
    assert_eq!(d.site.notification_damper_s, 3600);
    let c = d.counter;
    d.put_site(&json!({"notification_damper_s": 3600})).unwrap();
    assert_eq!(d.counter, c, "no change, no bump");
}

// --- serde and mirrors ---

#[test]
fn directory_serde_round_trip() {
    let mut d = tree();
    d.put_settings(
        "a",
        None,
        &json!({"management_servers": [{"url": "http://m:8014", "priority": 1}]}),
    )
    .unwrap();
    d.put_settings("b", Some("remote"), &json!({"heartbeat_interval_s": 900}))
        .unwrap();
    d.put_policy("a", json!({"rules": [1, 2]})).unwrap();
    d.put_site(&json!({"application_learning": true})).unwrap();
    let text = serde_json::to_string(&d).unwrap();
    let back: Directory = serde_json::from_str(&text).unwrap();
    assert_eq!(back, d);
    back.check().unwrap();
    assert_eq!(
        back.effective("b", Some("remote")),
        d.effective("b", Some("remote"))
    );
    // Overrides serialize as a plain map of dotted keys.
    let v = serde_json::to_value(&d.groups["b"]).unwrap();
    assert_eq!(
        v["locations"]["remote"],
        json!({"heartbeat_interval_s": 900})
    );
    // Minimal input: defaults fill in (a directory stored before site settings existed
    // keeps its clients admitted without credentials).
    let min: Directory =
        serde_json::from_value(json!({"groups": {"default": {"parent": null}}, "counter": 0}))
            .unwrap();
    let mut want = Directory::default();
    want.site.client_auth = ClientAuth::Open;
    assert_eq!(min, want);
}

#[test]
fn corrupt_mirror_is_survivable_and_detected() {
    // A cycle (a <-> b) and an invalid stored value.
    let d: Directory = serde_json::from_value(json!({
        "groups": {
            "default": {"parent": null, "own": {"heartbeat_interval_s": 42}},
            "a": {"parent": "b", "own": {"heartbeat_interval_s": 0, "mode": "push"}},
            "b": {"parent": "a"}
        },
        "counter": 3
    }))
    .unwrap();
    let s = d.effective("a", None);
    assert_eq!(
        s.heartbeat_interval_s, 42,
        "invalid value skipped, default reached"
    );
    assert_eq!(s.mode, ConnectionMode::Push);
    assert_eq!(d.descendants("a"), ["a", "b"]);
    assert!(d.check().is_err());
    let missing: Directory = serde_json::from_value(json!({"groups": {}, "counter": 0})).unwrap();
    assert_eq!(missing.effective("x", None), Settings::default());
    assert_eq!(missing.check().unwrap_err().code(), "not_found");
    tree().check().unwrap();
}

#[test]
fn a_new_site_requires_credentials_and_one_stored_before_enrolment_stays_open() {
    assert_eq!(Directory::default().site.client_auth, ClientAuth::Required);
    let before: Directory = serde_json::from_value(json!({
        "groups": {"default": {}},
        "site": {"application_learning": false, "notification_damper_s": 3600},
        "counter": 3
    }))
    .unwrap();
    assert_eq!(before.site.client_auth, ClientAuth::Open);
    let older: Directory =
        serde_json::from_value(json!({"groups": {"default": {}}, "counter": 0})).unwrap();
    assert_eq!(older.site.client_auth, ClientAuth::Open);
    let mut d = Directory::default();
    d.put_site(&json!({"client_auth": "open"})).unwrap();
    assert_eq!(d.site.client_auth, ClientAuth::Open);
    let e = d
        .put_site(&json!({"client_auth": "sometimes"}))
        .unwrap_err();
    assert!(e.to_string().contains("client_auth"), "{e}");
    d.put_site(&json!({"client_auth": null})).unwrap();
    assert_eq!(d.site.client_auth, ClientAuth::Required);
}
