//! Who is speaking: the credential check at the door of every call a client makes for
//! itself.
//!
//! Owns the check of `X-Gup-Credential` on heartbeats, events, applications and a client's
//! push stream, the same on the manager and on a node: the credential's signature (with the
//! manager's public key: the manager's own, a node's configured `upstream.catalog_public_key`,
//! or the key its mirror carries), the client id it names, and the directory's revocations;
//! with the site's `client_auth = "required"`, no credential is a 401 too. Verified
//! credentials are remembered by their SHA-256 ([`CACHE_ENTRIES`] at most), so a client's
//! repeated heartbeats cost a hash and a lookup, not a signature check; revocation is
//! checked on every call. It never calls upstream, so a node in an outage still checks; it
//! must never admit a credential whose signature it did not verify.

use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use sha2::{Digest as _, Sha256};

use crate::core::credential::{Credential, CredentialError, HEADER};
use crate::core::fault::{Fault, Kind};
use crate::core::settings::{ClientAuth, Directory};
use crate::core::signing::PublicKey;

/// Verified credentials remembered at most (about 200 bytes each).
pub const CACHE_ENTRIES: usize = 65_536;

/// Why a client is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("this site requires a client credential (header X-Gup-Credential); enrol with an enrolment token first")]
    Required,
    #[error("{0}")]
    Refused(CredentialError),
    #[error("this server does not know the manager's key yet, so it cannot check credentials")]
    NoKey,
    #[error(
        "this server has not synced with an upstream yet, so it cannot check who its clients are"
    )]
    NotSynced,
}

impl Fault for IdentityError {
    fn kind(&self) -> Kind {
        match self {
            IdentityError::Required | IdentityError::Refused(_) => Kind::Unauthorized,
            IdentityError::NoKey | IdentityError::NotSynced => {
                Kind::Unavailable { retry_after_s: 5 }
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            IdentityError::Required => "credential_required",
            IdentityError::Refused(CredentialError::Revoked) => "credential_revoked",
            IdentityError::Refused(_) => "bad_credential",
            IdentityError::NoKey | IdentityError::NotSynced => "not_ready",
        }
    }
}

/// The door: the key credentials verify with and the verified ones remembered.
pub struct Gate {
    /// A key this server was given (the manager's own; a node's configured one).
    fixed: Option<PublicKey>,
    /// The key the mirrored directory names, parsed once per change.
    learned: RwLock<Option<(String, PublicKey)>>,
    verified: quick_cache::sync::Cache<[u8; 32], Arc<Credential>>,
}

impl Gate {
    pub fn new(fixed: Option<PublicKey>) -> Gate {
        Gate {
            fixed,
            learned: RwLock::new(None),
            verified: quick_cache::sync::Cache::new(CACHE_ENTRIES),
        }
    }

    fn key(&self, dir: &Directory) -> Option<PublicKey> {
        if let Some(k) = &self.fixed {
            return Some(k.clone());
        }
        let hex = dir.credential_key.as_deref()?;
        if let Ok(guard) = self.learned.read() {
            if let Some((h, k)) = guard.as_ref() {
                if h == hex {
                    return Some(k.clone());
                }
            }
        }
        let key = PublicKey::parse(hex).ok()?;
        if let Ok(mut guard) = self.learned.write() {
            // A new key (a manager that started over): what the old one verified is void.
            if guard.is_some() {
                self.verified.clear();
            }
            *guard = Some((hex.to_string(), key.clone()));
        }
        Some(key)
    }

    /// Checks what `headers` present for `client_id`. `Ok(None)`: no credential, and the
    /// site is open. A credential presented is checked whatever the site says.
    pub fn check(
        &self,
        dir: &Directory,
        client_id: &str,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Credential>>, IdentityError> {
        let Some(value) = headers.get(HEADER) else {
            return match dir.site.client_auth {
                ClientAuth::Required => Err(IdentityError::Required),
                ClientAuth::Open => Ok(None),
            };
        };
        let text = value
            .to_str()
            .map_err(|_| IdentityError::Refused(CredentialError::Malformed))?
            .trim();
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        let credential = match self.verified.get(&digest) {
            Some(c) => c,
            None => {
                let key = self.key(dir).ok_or(IdentityError::NoKey)?;
                let c = Arc::new(Credential::verify(text, &key).map_err(IdentityError::Refused)?);
                self.verified.insert(digest, c.clone());
                c
            }
        };
        credential
            .admits(client_id, dir.revoked.get(client_id).copied())
            .map_err(IdentityError::Refused)?;
        Ok(Some(credential))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::signing::CatalogKey;

    fn headers(credential: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, credential.parse().unwrap());
        h
    }

    #[test]
    fn required_open_forged_revoked_and_a_learned_key() {
        let tmp = tempfile::tempdir().unwrap();
        let key = CatalogKey::load_or_create(tmp.path()).unwrap();
        let cred = Credential {
            client_id: "c1".into(),
            group: "default".into(),
            serial: 3,
            issued_at: 0,
        };
        let text = cred.issue(&key);
        let mut dir = Directory::default();
        let gate = Gate::new(Some(key.public()));
        let none = HeaderMap::new();
        assert_eq!(gate.check(&dir, "c1", &none), Err(IdentityError::Required));
        assert_eq!(
            gate.check(&dir, "c1", &headers(&text))
                .unwrap()
                .unwrap()
                .group,
            "default"
        );
        // Twice: the second from the cache, the same answer.
        assert!(gate.check(&dir, "c1", &headers(&text)).is_ok());
        let other = gate.check(&dir, "c2", &headers(&text)).unwrap_err();
        assert_eq!(other.code(), "bad_credential");
        dir.site.client_auth = ClientAuth::Open;
        assert_eq!(gate.check(&dir, "c1", &none), Ok(None));
        assert!(
            gate.check(&dir, "c1", &headers("gupc1.x.y")).is_err(),
            "checked when open"
        );
        dir.revoked.insert("c1".into(), 3);
        let revoked = gate.check(&dir, "c1", &headers(&text)).unwrap_err();
        assert_eq!(revoked.code(), "credential_revoked", "also once cached");
        // A node that was given no key uses the one its mirror names, and none is a 503.
        let node = Gate::new(None);
        let mut mirror = Directory::default();
        assert_eq!(
            node.check(&mirror, "c1", &headers(&text)),
            Err(IdentityError::NoKey)
        );
        mirror.credential_key = Some(key.public_hex());
        assert!(node.check(&mirror, "c1", &headers(&text)).is_ok());
    }
}
