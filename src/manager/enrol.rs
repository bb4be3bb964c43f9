//! Enrolment: the tokens an administrator hands out, and the credentials clients get for them.
//!
//! Owns the enrolment tokens (`gupe1.<id>.<secret>`: only the secret's SHA-256 is kept; each
//! names a group, an optional expiry and an optional number of uses), the credential record of
//! every enrolled client (its serial, group and the token it used), the serial counter, and
//! the rule that an enrolled client id cannot be enrolled again until its credential is
//! revoked, so nobody holding a token takes over a client that already has one. Everything
//! lives in one tree, so an enrolment (the credential record, the counter, the token's use)
//! is one atomic batch. At most [`MAX_TOKENS`] tokens exist at once. It must never keep a
//! token's secret, never issue a credential for a group that does not exist, and never
//! touch the network.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::core::credential::{Credential, Enrolled};
use crate::core::fault::{Fault, Kind};
use crate::core::settings::Directory;
use crate::core::signing::CatalogKey;
use crate::store::{Batch, Kv, Store, StoreError};

/// Most enrolment tokens (live, expired or revoked) kept at once: revoke or let the old ones
/// be deleted to make room.
pub const MAX_TOKENS: usize = 10_000;
/// What every enrolment token begins with.
const PREFIX: &str = "gupe1.";
const SERIAL_KEY: &str = "serial";

fn token_key(id: &str) -> String {
    format!("t/{id}")
}

fn credential_key(client_id: &str) -> String {
    format!("c/{client_id}")
}

/// What can go wrong enrolling or managing tokens.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("the enrolment token is not valid")]
    BadToken,
    #[error("the enrolment token {0} expired")]
    Expired(String),
    #[error("the enrolment token {0} has no uses left")]
    UsedUp(String),
    #[error("the enrolment token {0} was revoked")]
    TokenRevoked(String),
    #[error("client {0:?} is already enrolled; revoke its credential first, or enrol under a new client id")]
    AlreadyEnrolled(String),
    #[error("the enrolment token's group {0:?} no longer exists")]
    GroupGone(String),
    #[error("no group {0:?}")]
    UnknownGroup(String),
    #[error("no enrolment token {0:?}")]
    NoToken(String),
    #[error("client {0:?} is not enrolled")]
    NotEnrolled(String),
    #[error("{MAX_TOKENS} enrolment tokens exist; revoke some first")]
    TooMany,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Fault for EnrolError {
    fn kind(&self) -> Kind {
        match self {
            EnrolError::BadToken
            | EnrolError::Expired(_)
            | EnrolError::UsedUp(_)
            | EnrolError::TokenRevoked(_) => Kind::Unauthorized,
            EnrolError::AlreadyEnrolled(_) | EnrolError::GroupGone(_) | EnrolError::TooMany => {
                Kind::Conflict
            }
            EnrolError::UnknownGroup(_) | EnrolError::NoToken(_) | EnrolError::NotEnrolled(_) => {
                Kind::NotFound
            }
            EnrolError::Invalid { .. } => Kind::BadInput,
            EnrolError::Store(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            EnrolError::BadToken => "bad_enroll_token",
            EnrolError::Expired(_) => "enroll_token_expired",
            EnrolError::UsedUp(_) => "enroll_token_used_up",
            EnrolError::TokenRevoked(_) => "enroll_token_revoked",
            EnrolError::AlreadyEnrolled(_) => "already_enrolled",
            EnrolError::GroupGone(_) => "group_gone",
            EnrolError::UnknownGroup(_) | EnrolError::NoToken(_) | EnrolError::NotEnrolled(_) => {
                "not_found"
            }
            EnrolError::TooMany => "too_many_tokens",
            EnrolError::Invalid { .. } => "bad_request",
            EnrolError::Store(e) => e.code(),
        }
    }
}

/// An enrolment token as kept: never its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    /// SHA-256 of the secret, hex.
    secret_sha256: String,
    group: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    /// How many enrolments it allows (None: any number).
    uses: Option<u64>,
    used: u64,
    revoked: bool,
}

/// One line of `GET /v1/admin/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub group: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub uses: Option<u64>,
    pub used: u64,
    pub revoked: bool,
    /// Whether a client could enrol with it now.
    pub usable: bool,
}

/// `POST /v1/admin/enroll` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub group: String,
    /// An RFC 3339 time, or a duration from now: `30m`, `12h`, `7d`, `3600s`.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub uses: Option<u64>,
}

/// The answer to creating a token: the token itself, shown this once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

/// What the manager keeps of an enrolled client's credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CredentialRecord {
    serial: u64,
    group: String,
    issued_at: DateTime<Utc>,
    token_id: String,
}

impl TokenRecord {
    fn view(&self, now: DateTime<Utc>) -> TokenView {
        TokenView {
            id: self.id.clone(),
            group: self.group.clone(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            uses: self.uses,
            used: self.used,
            revoked: self.revoked,
            usable: self.refusal(now).is_none(),
        }
    }

    fn refusal(&self, now: DateTime<Utc>) -> Option<EnrolError> {
        if self.revoked {
            return Some(EnrolError::TokenRevoked(self.id.clone()));
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            return Some(EnrolError::Expired(self.id.clone()));
        }
        if self.uses.is_some_and(|n| self.used >= n) {
            return Some(EnrolError::UsedUp(self.id.clone()));
        }
        None
    }
}

/// Parses `expires`: an RFC 3339 time, or `<n>s|m|h|d` from `now`. Must lie in the future.
pub fn parse_expiry(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, EnrolError> {
    let bad = |reason: &str| EnrolError::Invalid {
        field: "expires",
        reason: format!("{text:?}: {reason}"),
    };
    let t = text.trim();
    let at = if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        at.with_timezone(&Utc)
    } else {
        let split = t.len().saturating_sub(1);
        let (n, unit) = t.split_at(split);
        let n: i64 = n
            .parse()
            .map_err(|_| bad("an RFC 3339 time or a duration such as 30m, 12h, 7d"))?;
        let secs = match unit {
            "s" => Some(n),
            "m" => n.checked_mul(60),
            "h" => n.checked_mul(3600),
            "d" => n.checked_mul(86_400),
            _ => None,
        }
        .filter(|s| *s > 0 && *s <= 10 * 365 * 86_400)
        .ok_or_else(|| bad("a duration from 1s to 3650d, such as 30m, 12h, 7d"))?;
        now + chrono::Duration::seconds(secs)
    };
    if at <= now {
        return Err(bad("lies in the past"));
    }
    Ok(at)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The manager's enrolment tokens and credential records.
pub struct Enrolment {
    kv: Kv,
    /// One enrolment or token change at a time: the counter and uses stay exact.
    lock: Mutex<()>,
}

impl Enrolment {
    pub fn open(store: &Store) -> Result<Enrolment, EnrolError> {
        Ok(Enrolment {
            kv: store.kv("enrolment")?,
            lock: Mutex::new(()),
        })
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is on disk; a panic elsewhere leaves nothing half-written here.
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, EnrolError> {
        Ok(self
            .kv
            .scan::<TokenRecord>("t/")?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// Makes a token for `req.group`; the answer carries the token, shown only this once.
    pub fn create(
        &self,
        dir: &Directory,
        req: &NewToken,
        now: DateTime<Utc>,
    ) -> Result<CreatedToken, EnrolError> {
        if !dir.groups.contains_key(&req.group) {
            return Err(EnrolError::UnknownGroup(req.group.clone()));
        }
        let expires_at = req
            .expires
            .as_deref()
            .map(|e| parse_expiry(e, now))
            .transpose()?;
        if req.uses == Some(0) {
            return Err(EnrolError::Invalid {
                field: "uses",
                reason: "must be at least 1 (omit it for any number)".into(),
            });
        }
        let _g = self.guard();
        if self.tokens()?.len() >= MAX_TOKENS {
            return Err(EnrolError::TooMany);
        }
        let id = hex::encode(rand::random::<[u8; 8]>());
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let record = TokenRecord {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            group: req.group.clone(),
            created_at: now,
            expires_at,
            uses: req.uses,
            used: 0,
            revoked: false,
        };
        self.kv.put(&token_key(&id), &record)?;
        Ok(CreatedToken {
            token: format!("{PREFIX}{id}.{secret}"),
            view: record.view(now),
        })
    }

    /// Every token, newest first.
    pub fn list(&self, now: DateTime<Utc>) -> Result<Vec<TokenView>, EnrolError> {
        let mut all: Vec<TokenView> = self.tokens()?.iter().map(|t| t.view(now)).collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Revokes a token: no client enrols with it any more (enrolled ones keep their
    /// credentials).
    pub fn revoke_token(&self, id: &str, now: DateTime<Utc>) -> Result<TokenView, EnrolError> {
        let _g = self.guard();
        let key = token_key(id);
        let mut t: TokenRecord = self
            .kv
            .get(&key)?
            .ok_or_else(|| EnrolError::NoToken(id.to_string()))?;
        t.revoked = true;
        self.kv.put(&key, &t)?;
        Ok(t.view(now))
    }

    /// Enrols `client_id` with `token`: checks the token, binds the client to its group
    /// under a new serial, and returns the signed credential. The caller makes the store
    /// durable ([`Enrolment::flush`]) before it answers.
    pub fn enrol(
        &self,
        dir: &Directory,
        key: &CatalogKey,
        client_id: &str,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Enrolled, EnrolError> {
        let (id, secret) = token
            .trim()
            .strip_prefix(PREFIX)
            .and_then(|r| r.split_once('.'))
            .ok_or(EnrolError::BadToken)?;
        let _g = self.guard();
        let tkey = token_key(id);
        let mut t: TokenRecord = self.kv.get(&tkey)?.ok_or(EnrolError::BadToken)?;
        let given = sha256_hex(secret);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            t.secret_sha256.as_bytes(),
        )) {
            return Err(EnrolError::BadToken);
        }
        if let Some(why) = t.refusal(now) {
            return Err(why);
        }
        if !dir.groups.contains_key(&t.group) {
            return Err(EnrolError::GroupGone(t.group.clone()));
        }
        let ckey = credential_key(client_id);
        if let Some(prior) = self.kv.get::<CredentialRecord>(&ckey)? {
            let revoked = dir.revoked.get(client_id).copied().unwrap_or(0);
            if prior.serial > revoked {
                return Err(EnrolError::AlreadyEnrolled(client_id.to_string()));
            }
        }
        let serial = self.kv.get::<u64>(SERIAL_KEY)?.unwrap_or(0) + 1;
        t.used += 1;
        let record = CredentialRecord {
            serial,
            group: t.group.clone(),
            issued_at: now,
            token_id: t.id.clone(),
        };
        let mut batch = Batch::default();
        batch.put(SERIAL_KEY, &serial)?;
        batch.put(&tkey, &t)?;
        batch.put(&ckey, &record)?;
        self.kv.apply(batch)?;
        let credential = Credential {
            client_id: client_id.to_string(),
            group: t.group.clone(),
            serial,
            issued_at: now.timestamp(),
        };
        Ok(Enrolled {
            credential: credential.issue(key),
            group: t.group,
        })
    }

    /// The serial of `client_id`'s current credential, to revoke it.
    pub fn current_serial(&self, client_id: &str) -> Result<u64, EnrolError> {
        self.kv
            .get::<CredentialRecord>(&credential_key(client_id))?
            .map(|r| r.serial)
            .ok_or_else(|| EnrolError::NotEnrolled(client_id.to_string()))
    }

    pub async fn flush(&self) -> Result<(), EnrolError> {
        self.kv.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Enrolment, Directory, CatalogKey) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let e = Enrolment::open(&store).unwrap();
        let key = CatalogKey::load_or_create(dir.path()).unwrap();
        let mut d = Directory::default();
        d.put_group("branch", "default").unwrap();
        (dir, e, d, key)
    }

    fn new_token(group: &str, expires: Option<&str>, uses: Option<u64>) -> NewToken {
        NewToken {
            group: group.into(),
            expires: expires.map(str::to_string),
            uses,
        }
    }

    #[test]
    fn a_token_enrols_into_its_group_and_the_credential_verifies() {
        let (_t, e, d, key) = setup();
        let now = Utc::now();
        let created = e.create(&d, &new_token("branch", None, None), now).unwrap();
        assert!(created.token.starts_with(PREFIX));
        let got = e.enrol(&d, &key, "laptop-1", &created.token, now).unwrap();
        assert_eq!(got.group, "branch");
        let cred = Credential::verify(&got.credential, &key.public()).unwrap();
        assert_eq!(cred.client_id, "laptop-1");
        assert_eq!(cred.group, "branch");
        let second = e.enrol(&d, &key, "laptop-2", &created.token, now).unwrap();
        let cred2 = Credential::verify(&second.credential, &key.public()).unwrap();
        assert!(cred2.serial > cred.serial, "serials grow");
        let listed = e.list(now).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].used, 2);
        assert!(listed[0].usable);
        // The secret is not kept anywhere the listing reaches.
        let json = serde_json::to_string(&listed).unwrap();
        let secret = created.token.rsplit('.').next().unwrap();
        assert!(!json.contains(secret));
    }

    #[test]
    fn bad_expired_used_up_and_revoked_tokens_are_refused() {
        let (_t, e, d, key) = setup();
        let now = Utc::now();
        let code = |r: Result<Enrolled, EnrolError>| r.unwrap_err().code();
        assert_eq!(
            code(e.enrol(&d, &key, "c", "nonsense", now)),
            "bad_enroll_token"
        );
        let t = e
            .create(&d, &new_token("branch", None, Some(1)), now)
            .unwrap();
        let (head, _) = t.token.rsplit_once('.').unwrap();
        let wrong = format!("{head}.{}", "0".repeat(48));
        assert_eq!(
            code(e.enrol(&d, &key, "c", &wrong, now)),
            "bad_enroll_token"
        );
        e.enrol(&d, &key, "c1", &t.token, now).unwrap();
        assert_eq!(
            code(e.enrol(&d, &key, "c2", &t.token, now)),
            "enroll_token_used_up"
        );
        let soon = e
            .create(&d, &new_token("branch", Some("1h"), None), now)
            .unwrap();
        let later = now + chrono::Duration::hours(2);
        assert_eq!(
            code(e.enrol(&d, &key, "c3", &soon.token, later)),
            "enroll_token_expired"
        );
        let r = e.create(&d, &new_token("branch", None, None), now).unwrap();
        e.revoke_token(&r.view.id, now).unwrap();
        assert_eq!(
            code(e.enrol(&d, &key, "c4", &r.token, now)),
            "enroll_token_revoked"
        );
        assert!(e
            .create(&d, &new_token("nowhere", None, None), now)
            .is_err());
        assert!(e
            .create(&d, &new_token("branch", None, Some(0)), now)
            .is_err());
        assert!(e
            .create(&d, &new_token("branch", Some("-5m"), None), now)
            .is_err());
        assert!(e
            .create(&d, &new_token("branch", Some("soon"), None), now)
            .is_err());
    }

    #[test]
    fn an_enrolled_client_enrols_again_only_after_a_revocation() {
        let (_t, e, mut d, key) = setup();
        let now = Utc::now();
        let t = e.create(&d, &new_token("branch", None, None), now).unwrap();
        e.enrol(&d, &key, "victim", &t.token, now).unwrap();
        let again = e.enrol(&d, &key, "victim", &t.token, now).unwrap_err();
        assert_eq!(again.code(), "already_enrolled");
        let serial = e.current_serial("victim").unwrap();
        d.revoked.insert("victim".into(), serial);
        let fresh = e.enrol(&d, &key, "victim", &t.token, now).unwrap();
        let cred = Credential::verify(&fresh.credential, &key.public()).unwrap();
        assert!(cred
            .admits("victim", d.revoked.get("victim").copied())
            .is_ok());
        assert_eq!(e.current_serial("nobody").unwrap_err().code(), "not_found");
    }

    #[test]
    fn expiry_takes_a_time_or_a_duration() {
        let now = Utc::now();
        assert_eq!(
            parse_expiry("7d", now).unwrap(),
            now + chrono::Duration::days(7)
        );
        assert_eq!(
            parse_expiry("90s", now).unwrap(),
            now + chrono::Duration::seconds(90)
        );
        let at = (now + chrono::Duration::days(1)).to_rfc3339();
        assert!(parse_expiry(&at, now).is_ok());
        for bad in ["", "d", "0h", "7w", "2000-01-01T00:00:00Z", "99999d"] {
            assert!(parse_expiry(bad, now).is_err(), "{bad:?}");
        }
    }
}
