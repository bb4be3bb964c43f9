//! Fuzzes what a node believes of an upstream: the `/v1/sync` snapshot and the catalog in
//! it are parsed and validated, and mirroring an accepted catalog never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(catalog) = serde_json::from_slice::<gup::core::catalog::Catalog>(data) {
        if gup::core::catalog::validate_catalog(&catalog).is_ok() {
            let mut history = gup::core::catalog::CatalogHistory::new(3);
            let _ = history.mirror(catalog, None, chrono_now());
            let _ = history.digests();
        }
    }
    if let Ok(snapshot) = serde_json::from_slice::<gup::core::proto::Snapshot>(data) {
        let _ = snapshot.directory.check();
        let _ = snapshot.directory.effective("default", Some("office"));
    }
});

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}
