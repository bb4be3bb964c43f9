//! Sessions of the manager's status page: what a login with the admin token buys a browser.
//!
//! Owns the session cookie (`gup_session`: HttpOnly, SameSite=Strict, `Path=/admin`, Secure
//! when the manager serves TLS), the sessions themselves (random 32-byte ids, kept in memory
//! only as their SHA-256, so a lookup's timing or a memory dump gives no usable id), their
//! bound ([`MAX_SESSIONS`]) and their lifetime ([`SESSION_LIFETIME`], from login, not
//! extended by use). A restart logs everyone out. It must never check the admin token itself
//! (the page does, in constant time, through `http::auth::Token`), never write a session to
//! disk, and never log an id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use sha2::{Digest as _, Sha256};

/// The cookie's name.
pub const COOKIE: &str = "gup_session";

/// Sessions held at most. A site has a handful of admins and wall screens; a login past the
/// bound drops the session closest to its end, so repeated logins (or a script that logs in
/// on every call) cost memory once, never more.
pub const MAX_SESSIONS: usize = 64;

/// How long a session lasts from its login: a working day, so a wall screen logged in once
/// in the morning shows the page until evening and a forgotten browser does not stay in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The sessions of one manager.
#[derive(Debug, Default)]
pub struct Sessions {
    /// SHA-256 of the id -> when the session ends.
    held: Mutex<HashMap<[u8; 32], Instant>>,
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Opens a session at `now` and returns its id (64 hex digits), dropping ended sessions
    /// and, at the bound, the one closest to its end.
    pub fn open(&self, now: Instant) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let Ok(mut held) = self.held.lock() else {
            // A poisoned lock: the id works nowhere, and the login form shows again.
            return id;
        };
        held.retain(|_, ends| *ends > now);
        if held.len() >= MAX_SESSIONS {
            if let Some(first) = held.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                held.remove(&first);
            }
        }
        held.insert(key(&id), now + SESSION_LIFETIME);
        id
    }

    /// Whether `id` is a session that has not ended at `now`.
    pub fn valid(&self, id: &str, now: Instant) -> bool {
        let Ok(held) = self.held.lock() else {
            return false;
        };
        held.get(&key(id)).is_some_and(|ends| *ends > now)
    }

    /// Ends the session `id` (logout); an unknown id is no error.
    pub fn close(&self, id: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&key(id));
        }
    }

    /// Sessions held now (ended ones included until the next login drops them).
    pub fn len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id a request's `Cookie` headers carry, if any.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
}

/// The `Set-Cookie` value that hands a browser session `id`.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/admin; Max-Age={}; HttpOnly; SameSite=Strict{}",
        SESSION_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that makes a browser forget its session.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/admin; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lasts_its_lifetime_and_ends_at_logout() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let id = s.open(t0);
        assert_eq!(id.len(), 64);
        assert!(s.valid(&id, t0 + SESSION_LIFETIME - Duration::from_secs(1)));
        assert!(!s.valid(&id, t0 + SESSION_LIFETIME));
        assert!(!s.valid("someone-else", t0));
        let other = s.open(t0);
        assert_ne!(id, other);
        s.close(&other);
        assert!(!s.valid(&other, t0));
        s.close("never-was");
    }

    #[test]
    fn logins_past_the_bound_drop_the_oldest_and_never_grow_the_map() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.open(t0);
        let mut last = String::new();
        for i in 1..=(MAX_SESSIONS * 3) as u64 {
            last = s.open(t0 + Duration::from_millis(i));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(!s.valid(&first, t0), "the oldest went first");
        assert!(s.valid(&last, t0));
        // Ended sessions are dropped at the next login.
        s.open(t0 + SESSION_LIFETIME * 2);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_cookie_is_found_among_others_and_is_strict_and_http_only() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            "a=1; gup_session=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(presented(&h).as_deref(), Some("abc"));
        h.clear();
        h.append(header::COOKIE, "gup_sessionx=1".parse().unwrap());
        assert_eq!(presented(&h), None);
        let c = set_cookie("abc", false);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }
}
