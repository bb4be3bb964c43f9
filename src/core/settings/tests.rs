//! Unit tests of the module's own items: the effective settings' JSON shape and the built-in
//! defaults, the small enums' wire spellings, and the errors' kinds, codes and messages.

use serde_json::json;

use super::{ConnectionMode, Directory, LoginMode, Os, Settings, SettingsError, SiteSettings};
use crate::core::fault::{Fault, Kind};

// --- defaults and JSON shape ---

#[test]
fn settings_json_matches_contract_exactly() {
    let s = serde_json::to_string(&Settings::default()).unwrap();
    assert_eq!(
        s,
        r#"{"communication_enabled":true,"management_servers":[],"download_policies_and_content":true,"mode":"pull","heartbeat_interval_s":300,"learn_applications":false,"upload_critical_events_immediately":true,"randomization":{"enabled":true,"window_s":3600},"reconnection":{"use_last_group":false,"use_last_mode":false}}"#
    );
    let back: Settings = serde_json::from_str(&s).unwrap();
    assert_eq!(back, Settings::default());
}

#[test]
fn every_default_in_the_contract_table() {
    let d = Directory::default();
    let s = d.effective("default", None);
    assert!(s.communication_enabled);
    assert!(s.management_servers.is_empty());
    assert!(s.download_policies_and_content);
    assert_eq!(s.mode, ConnectionMode::Pull);
    assert_eq!(s.heartbeat_interval_s, 300);
    assert!(!s.learn_applications);
    assert!(s.upload_critical_events_immediately);
    assert!(s.randomization.enabled);
    assert_eq!(s.randomization.window_s, 3600);
    assert!(!s.reconnection.use_last_group);
    assert!(!s.reconnection.use_last_mode);
    let site = SiteSettings::default();
    assert!(!site.application_learning);
    assert_eq!(site.notification_damper_s, 3600);
    assert_eq!(Os::default(), Os::Windows);
    assert_eq!(d.groups.len(), 1);
    assert_eq!(d.groups["default"].parent, None);
    assert_eq!(d.groups["default"].serial, 0);
    assert_eq!(d.counter, 0);
}

#[test]
fn enums_serde_and_parse() {
    assert_eq!(
        serde_json::to_value(ConnectionMode::Push).unwrap(),
        json!("push")
    );
    assert_eq!(
        serde_json::to_value(LoginMode::User).unwrap(),
        json!("user")
    );
    assert_eq!(serde_json::to_value(Os::Mac).unwrap(), json!("mac"));
    assert_eq!("linux".parse::<Os>().unwrap(), Os::Linux);
    assert_eq!(
        "computer".parse::<LoginMode>().unwrap(),
        LoginMode::Computer
    );
    assert!("bsd".parse::<Os>().unwrap_err().contains("os"));
    assert!("Push".parse::<ConnectionMode>().is_err());
}

// --- errors ---

#[test]
fn error_codes_and_display() {
    let e = SettingsError::bad("mode", "mode must be \"push\" or \"pull\"");
    assert_eq!(e.kind(), Kind::BadInput);
    assert_eq!(e.to_string(), "mode must be \"push\" or \"pull\"");
    assert_eq!(SettingsError::Conflict("x".into()).code(), "conflict");
    assert_eq!(SettingsError::NotFound("x".into()).code(), "not_found");
    // Long values are shortened in messages.
    let mut d = Directory::default();
    let e = d
        .put_settings("default", None, &json!({"mode": "p".repeat(10_000)}))
        .unwrap_err();
    assert!(e.to_string().len() < 200);
    assert!(!e.to_string().contains('\n'));
}
