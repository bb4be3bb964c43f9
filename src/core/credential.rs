//! Client credentials: what a client presents to prove it is the client it names.
//!
//! Owns the credential's wire form and its checks, as pure functions: the manager issues a
//! credential when a client enrols (`manager::enrol`), binding one client id to the group its
//! enrolment token named, under a serial that only grows; any server checks it with the
//! manager's public key alone, with no call upstream, so a node in an outage still knows who
//! is who. The form is `gupc1.<payload>.<signature>`: the payload is JSON, the signature
//! ed25519 (`core::signing`, its own domain), both unpadded base64url. A revoked credential is
//! one whose serial is at or below the one the directory lists for its client
//! (`Directory::revoked`). It must never read the clock, the network or the disk, and never
//! accept a credential whose signature it did not check.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::signing::{CatalogKey, PublicKey};

/// The request header a client sends its credential in.
pub const HEADER: &str = "x-gup-credential";
/// What every credential begins with (the version of the form).
const PREFIX: &str = "gupc1.";
/// Longest credential accepted, in bytes: a payload of a 128-character client id and a
/// 64-character group fits in well under half of it.
pub const MAX_LEN: usize = 1024;

/// What a credential says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The one client id it speaks for.
    pub client_id: String,
    /// The group it enrolled into: the client's install group, whatever its heartbeats say.
    pub group: String,
    /// Grows with every credential the manager issues; revocation names a serial.
    pub serial: u64,
    /// When it was issued (Unix seconds).
    pub issued_at: i64,
}

/// `POST /v1/node/enroll` body: a node relays a client's enrolment to its upstream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub client_id: String,
    pub token: String,
}

/// An enrolment's answer: the credential and the group it binds the client to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrolled {
    pub credential: String,
    pub group: String,
}

/// The codes an enrolment refusal carries, so a node relaying one passes on the very code
/// its upstream answered (anything else becomes `enroll_refused`).
pub fn enrol_refusal_code(code: &str) -> &'static str {
    const CODES: [&str; 7] = [
        "bad_enroll_token",
        "enroll_token_expired",
        "enroll_token_used_up",
        "enroll_token_revoked",
        "already_enrolled",
        "group_gone",
        "too_many_new_clients",
    ];
    CODES
        .into_iter()
        .find(|c| *c == code)
        .unwrap_or("enroll_refused")
}

/// Why a credential is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("the credential is not in the gupc1 form")]
    Malformed,
    #[error("the credential is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("the credential's signature does not verify")]
    BadSignature,
    #[error("the credential is not this client's")]
    OtherClient,
    #[error("the credential was revoked")]
    Revoked,
}

impl Credential {
    /// The wire form, signed with the manager's key.
    pub fn issue(&self, key: &CatalogKey) -> String {
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let sig = key.sign_credential(&payload);
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// Parses `text` and checks its signature with `key`.
    pub fn verify(text: &str, key: &PublicKey) -> Result<Credential, CredentialError> {
        if text.len() > MAX_LEN {
            return Err(CredentialError::TooLong);
        }
        let rest = text
            .strip_prefix(PREFIX)
            .ok_or(CredentialError::Malformed)?;
        let (payload, sig) = rest.split_once('.').ok_or(CredentialError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| CredentialError::Malformed)?;
        let sig: [u8; 64] = URL_SAFE_NO_PAD
            .decode(sig)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(CredentialError::Malformed)?;
        key.verify_credential(&payload, &sig)
            .map_err(|_| CredentialError::BadSignature)?;
        serde_json::from_slice(&payload).map_err(|_| CredentialError::Malformed)
    }

    /// Whether this credential may speak for `client_id`, given the highest serial revoked
    /// for that client (if any).
    pub fn admits(&self, client_id: &str, revoked: Option<u64>) -> Result<(), CredentialError> {
        if self.client_id != client_id {
            return Err(CredentialError::OtherClient);
        }
        match revoked {
            Some(r) if self.serial <= r => Err(CredentialError::Revoked),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred() -> Credential {
        Credential {
            client_id: "laptop-1".into(),
            group: "branch".into(),
            serial: 7,
            issued_at: 1_800_000_000,
        }
    }

    #[test]
    fn an_issued_credential_verifies_and_admits_only_its_client() {
        let dir = tempfile::tempdir().unwrap();
        let key = CatalogKey::load_or_create(dir.path()).unwrap();
        let text = cred().issue(&key);
        assert!(
            text.starts_with(PREFIX) && text.len() < MAX_LEN / 2,
            "{text}"
        );
        let back = Credential::verify(&text, &key.public()).unwrap();
        assert_eq!(back, cred());
        assert_eq!(back.admits("laptop-1", None), Ok(()));
        assert_eq!(back.admits("laptop-1", Some(6)), Ok(()));
        assert_eq!(
            back.admits("laptop-1", Some(7)),
            Err(CredentialError::Revoked)
        );
        assert_eq!(
            back.admits("laptop-2", None),
            Err(CredentialError::OtherClient)
        );
    }

    #[test]
    fn forged_altered_and_foreign_credentials_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = CatalogKey::load_or_create(dir.path()).unwrap();
        let other = CatalogKey::load_or_create(&dir.path().join("other")).unwrap();
        let text = cred().issue(&key);
        let public = key.public();
        // Signed by another manager.
        assert_eq!(
            Credential::verify(&cred().issue(&other), &public),
            Err(CredentialError::BadSignature)
        );
        // The payload changed to another client, the signature kept.
        let (head, sig) = text.rsplit_once('.').unwrap();
        let mut forged = cred();
        forged.client_id = "victim".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let altered = format!("{PREFIX}{payload}.{sig}");
        assert_ne!(altered, text);
        assert_eq!(
            Credential::verify(&altered, &public),
            Err(CredentialError::BadSignature)
        );
        // Garbage of every shape.
        for bad in [
            "",
            "gupc1.",
            "gupc1.abc",
            "gupc2.a.b",
            &format!("{head}.AAAA"),
            &format!("{head}.{sig}.x"),
        ] {
            assert!(Credential::verify(bad, &public).is_err(), "{bad:?}");
        }
        assert_eq!(
            Credential::verify(&"x".repeat(MAX_LEN + 1), &public),
            Err(CredentialError::TooLong)
        );
        // A catalog signature is no credential signature: the domains differ.
        let catalog = crate::core::catalog::Catalog {
            revision: 1,
            items: vec![],
        };
        let catalog_sig = hex::decode(key.sign(&catalog)).unwrap();
        let payload = crate::core::signing::catalog_bytes(&catalog);
        let mixed = format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(&catalog_sig)
        );
        assert_eq!(
            Credential::verify(&mixed, &public),
            Err(CredentialError::BadSignature)
        );
    }
}
