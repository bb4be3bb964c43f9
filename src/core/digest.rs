//! SHA-256 digests as content names.
//!
//! Owns the one parser of the digest form the wire uses: exactly 64 lower-case hex characters.
//! It must never accept upper case, whitespace, prefixes or short forms: a digest is a name,
//! and two spellings of one name would be two cache keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use super::fault::{Fault, Kind};

/// A SHA-256 digest naming an immutable blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("a sha256 digest is 64 characters, got {0}")]
    Length(usize),
    #[error("a sha256 digest is lower-case hex (0-9, a-f), found {0:?}")]
    Character(char),
}

impl Fault for DigestError {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }

    fn code(&self) -> &'static str {
        "bad_digest"
    }
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Wraps a finished hasher.
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest(hasher.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        // A plain table loop: `hex::encode`'s iterator showed in the serving profile.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 0x0f)] as char);
        }
        out
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(DigestError::Length(s.chars().count()));
        }
        if let Some(c) = s.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(DigestError::Character(c));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::Length(s.len()))?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_lower_hex() {
        let d = Digest::of(b"abc");
        let s = d.to_hex();
        assert_eq!(
            s,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(s.parse::<Digest>(), Ok(d));
    }

    #[test]
    fn rejects_other_spellings() {
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(upper.parse::<Digest>(), Err(DigestError::Character('B')));
        assert_eq!("abc".parse::<Digest>(), Err(DigestError::Length(3)));
        assert!("../../etc/passwd".parse::<Digest>().is_err());
        let sixty_four_non_ascii = "é".repeat(32);
        assert!(sixty_four_non_ascii.parse::<Digest>().is_err());
    }
}
