//! Fixtures shared by the settings unit tests: a small group tree, and a check that an error
//! is a BadRequest whose message names its key. Test-only: never compiled into the product.

use super::{Directory, SettingsError};

pub(super) fn bad_key(e: SettingsError) -> String {
    match e {
        SettingsError::BadRequest { key, message } => {
            assert!(
                message.contains(&key),
                "message {message:?} should name key {key:?}"
            );
            key
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

pub(super) fn tree() -> Directory {
    // default -> a -> b, default -> c
    let mut d = Directory::default();
    d.put_group("a", "default").unwrap();
    d.put_group("b", "a").unwrap();
    d.put_group("c", "default").unwrap();
    d
}
