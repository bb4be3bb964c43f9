//! The manager's signatures: each catalog revision, and each client credential it issues.
//!
//! Owns the manager's ed25519 key (made at first start, kept in the data dir with mode 0600,
//! its public half printed by `gup manager --print-public-key`), the signing of a catalog's
//! exact wire bytes and of a credential's payload, and verification against a public key. A
//! node configured with the key refuses unsigned or wrongly signed catalogs, so neither a
//! hostile upstream nor a node in the chain can invent content; nodes check client
//! credentials with it offline. The two uses never share a message: a credential signature
//! covers [`CREDENTIAL_DOMAIN`] and then the payload, and no catalog's bytes begin that way
//! (a catalog is a JSON object). It must never sign anything else, and never log the
//! private key.

use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use super::catalog::Catalog;

/// What can go wrong with keys and signatures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("catalog key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("public key: {0}")]
    PublicKey(String),
    #[error("the catalog carries no signature")]
    Missing,
    #[error("the catalog signature does not verify")]
    Bad,
}

/// The bytes a catalog signature covers: the catalog exactly as `GET /v1/catalog` sends it.
pub fn catalog_bytes(catalog: &Catalog) -> Vec<u8> {
    serde_json::to_vec(catalog).unwrap_or_default()
}

/// The manager's signing key.
pub struct CatalogKey {
    key: SigningKey,
}

impl CatalogKey {
    /// Loads `data_dir/catalog.key`, or makes it (mode 0600) at first start.
    pub fn load_or_create(data_dir: &Path) -> Result<CatalogKey, SignError> {
        let path = data_dir.join("catalog.key");
        let err = |reason: String| SignError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let secret: [u8; 32] = rand::random();
        let made = super::secret_file::create_once(&path, hex::encode(secret).as_bytes())
            .map_err(|e| err(e.to_string()))?;
        if made == super::secret_file::Made::Created {
            tracing::info!(path = %path.display(), "made a new catalog signing key at first start");
            return Ok(CatalogKey {
                key: SigningKey::from_bytes(&secret),
            });
        }
        // Made earlier, or by another process a moment ago: the file's key is the one.
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| err("not 64 hex characters".into()))?;
        Ok(CatalogKey {
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// The public key, hex (what nodes are configured with).
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The signature of `catalog`, hex.
    pub fn sign(&self, catalog: &Catalog) -> String {
        hex::encode(self.key.sign(&catalog_bytes(catalog)).to_bytes())
    }

    /// The signature of a credential's payload bytes.
    pub fn sign_credential(&self, payload: &[u8]) -> [u8; 64] {
        self.key.sign(&credential_message(payload)).to_bytes()
    }

    /// The public key, for checking what this key signed.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }
}

/// What every credential signature covers before the payload.
pub const CREDENTIAL_DOMAIN: &[u8] = b"gup client credential v1\n";

fn credential_message(payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CREDENTIAL_DOMAIN.len() + payload.len());
    m.extend_from_slice(CREDENTIAL_DOMAIN);
    m.extend_from_slice(payload);
    m
}

/// A public key nodes verify catalogs with.
#[derive(Clone)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// From 64 hex characters.
    pub fn parse(hex_key: &str) -> Result<PublicKey, SignError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_key.trim(), &mut bytes)
            .map_err(|_| SignError::PublicKey("must be 64 hex characters".into()))?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| SignError::PublicKey(e.to_string()))
    }

    /// Checks `signature` (hex) over `catalog`.
    pub fn verify(&self, catalog: &Catalog, signature: Option<&str>) -> Result<(), SignError> {
        let sig = signature.ok_or(SignError::Missing)?;
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(sig.trim(), &mut bytes).map_err(|_| SignError::Bad)?;
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        self.0
            .verify(&catalog_bytes(catalog), &sig)
            .map_err(|_| SignError::Bad)
    }

    /// Checks a credential's `signature` over its `payload`.
    pub fn verify_credential(&self, payload: &[u8], signature: &[u8; 64]) -> Result<(), SignError> {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.0
            .verify_strict(&credential_message(payload), &sig)
            .map_err(|_| SignError::Bad)
    }

    /// The key, hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_reject() {
        let dir = tempfile::tempdir().unwrap();
        let key = CatalogKey::load_or_create(dir.path()).unwrap();
        let again = CatalogKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.public_hex(), again.public_hex(), "the key is kept");
        let public = PublicKey::parse(&key.public_hex()).unwrap();
        let mut catalog = Catalog {
            revision: 3,
            items: vec![],
        };
        let sig = key.sign(&catalog);
        assert_eq!(public.verify(&catalog, Some(&sig)), Ok(()));
        assert_eq!(public.verify(&catalog, None), Err(SignError::Missing));
        assert_eq!(public.verify(&catalog, Some("zz")), Err(SignError::Bad));
        catalog.revision = 4;
        assert_eq!(public.verify(&catalog, Some(&sig)), Err(SignError::Bad));
        let other = CatalogKey::load_or_create(&dir.path().join("other")).unwrap();
        catalog.revision = 3;
        let foreign = PublicKey::parse(&other.public_hex()).unwrap();
        assert_eq!(foreign.verify(&catalog, Some(&sig)), Err(SignError::Bad));
        assert!(PublicKey::parse("abc").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("catalog.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
