//! Fuzzes event and application intake: parsing and validation never panic, and an
//! accepted upload obeys the rules (ids of 1 to 128 characters, a kind, an RFC 3339 time).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(upload) = serde_json::from_slice::<gup::core::proto::EventUpload>(data) {
        if upload.validate().is_ok() {
            for e in &upload.events {
                assert!(!e.id.is_empty() && e.id.chars().count() <= 128);
                assert!(!e.kind.is_empty());
                assert!(e.parsed_time().is_some());
                let _ = e.is_critical();
            }
        }
    }
    if let Ok(apps) = serde_json::from_slice::<gup::core::proto::ApplicationUpload>(data) {
        let _ = apps.validate();
    }
    if let Ok(batch) = serde_json::from_slice::<gup::core::proto::UploadBatch>(data) {
        let _ = batch.uploads.iter().map(|u| u.upload.is_critical()).count();
    }
});
