//! Fuzzes the config loader: any text either loads and validates, or fails with a one-line
//! error naming a key; role inference never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = gup::core::config::infer_role(text);
    for result in [
        gup::core::config::parse::<gup::core::config::NodeConfig>(text).and_then(|c| c.validate()),
        gup::core::config::parse::<gup::core::config::ManagerConfig>(text).and_then(|c| c.validate()),
    ] {
        if let Err(e) = result {
            assert!(!e.key.is_empty());
            assert!(!e.to_string().contains('\n'));
        }
    }
});
