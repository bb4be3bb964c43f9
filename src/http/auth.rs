//! Bearer tokens: where they come from and how they are checked.
//!
//! Owns the admin token (guards the manager's admin API) and the node token (what nodes present
//! on the calls that speak for many clients). A token comes from a flag, a file, the environment
//! or the config; without one, a server makes one at first start and keeps it in its data dir
//! with mode 0600. [`require`] puts a whole router behind one token, so that no handler checks
//! a token itself. Tokens are compared in constant time and must never be logged.

use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::core::fault::{Fault, Kind};
use crate::core::secret_file::{self, Made};

/// A secret bearer token. `Debug` does not print it.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    Empty(PathBuf),
    #[error("writing token file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Token {
    pub fn new(secret: impl Into<String>) -> Token {
        Token(secret.into())
    }

    /// A token setting that may be empty (`*_token_previous`): None when it is.
    pub fn optional(setting: &str) -> Option<Token> {
        (!setting.is_empty()).then(|| Token::new(setting))
    }

    /// The secret itself, for an `Authorization` header or `--print-*-token`.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    /// Checks `Authorization: Bearer <token>`.
    pub fn check(&self, headers: &HeaderMap, what: &'static str) -> Result<(), Unauthorized> {
        match bearer(headers) {
            Some(t) if self.matches(t) => Ok(()),
            Some(_) => Err(Unauthorized::Invalid(what)),
            None => Err(Unauthorized::Missing(what)),
        }
    }
}

/// The tokens a server accepts for one purpose: the current one and, while a rotation is
/// under way, the previous one (`*_token_previous`). Shared by every clone, and replaced as a
/// whole when the config is reloaded, so removing the previous token ends it at once.
#[derive(Clone, Debug)]
pub struct Accepted(std::sync::Arc<std::sync::RwLock<Vec<Token>>>);

impl Accepted {
    /// `current`, and `previous` when given (not empty).
    pub fn new(current: Token, previous: Option<Token>) -> Accepted {
        Accepted(std::sync::Arc::new(std::sync::RwLock::new(Self::list(
            current, previous,
        ))))
    }

    fn list(current: Token, previous: Option<Token>) -> Vec<Token> {
        let mut tokens = vec![current];
        tokens.extend(previous.filter(|p| !p.0.is_empty()));
        tokens
    }

    /// Accepts `current` and `previous` from now on, and no other.
    pub fn set(&self, current: Token, previous: Option<Token>) {
        if let Ok(mut t) = self.0.write() {
            *t = Self::list(current, previous);
        }
    }

    /// The current token (what this server would present itself, or print).
    pub fn current(&self) -> Option<Token> {
        self.0.read().ok().and_then(|t| t.first().cloned())
    }

    /// Whether `presented` is one of the accepted tokens (each compared in constant time;
    /// all are compared, so the time says nothing of which matched).
    pub fn matches(&self, presented: &str) -> bool {
        let Ok(tokens) = self.0.read() else {
            return false;
        };
        tokens
            .iter()
            .fold(false, |found, t| t.matches(presented) | found)
    }

    /// Checks `Authorization: Bearer <token>` against every accepted token.
    pub fn check(&self, headers: &HeaderMap, what: &'static str) -> Result<(), Unauthorized> {
        match bearer(headers) {
            Some(t) if self.matches(t) => Ok(()),
            Some(_) => Err(Unauthorized::Invalid(what)),
            None => Err(Unauthorized::Missing(what)),
        }
    }
}

/// The token of `Authorization: Bearer <token>`, when there is one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

/// Why a request was refused for its credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    #[error("this endpoint needs `Authorization: Bearer <{0} token>`")]
    Missing(&'static str),
    #[error("the {0} token is not valid")]
    Invalid(&'static str),
}

impl Fault for Unauthorized {
    fn kind(&self) -> Kind {
        Kind::Unauthorized
    }

    fn code(&self) -> &'static str {
        "unauthorized"
    }
}

/// Puts every route of `router` behind the `accepted` tokens (named `what` in the error
/// message): a request without one never reaches a handler.
pub fn require<S>(
    router: axum::Router<S>,
    accepted: Accepted,
    what: &'static str,
) -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.route_layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let checked = accepted.check(req.headers(), what);
            async move {
                match checked {
                    Ok(()) => next.run(req).await,
                    Err(e) => ApiError::from(e).into_response(),
                }
            }
        },
    ))
}

/// Reads a token from a file (surrounding whitespace trimmed).
pub fn read_token_file(path: &Path) -> Result<Token, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(TokenError::Empty(path.to_path_buf()));
    }
    Ok(Token::new(t))
}

/// The token a server uses, from its configured `token` and `token_file` (empty: not set):
/// the token when given, else the file's, else the one kept in `data_dir/<name>.token`, made
/// (random, 0600) at first start.
pub fn resolve(
    token: &str,
    token_file: &str,
    data_dir: &Path,
    name: &str,
) -> Result<Token, TokenError> {
    if !token.is_empty() {
        return Ok(Token::new(token));
    }
    if !token_file.is_empty() {
        return read_token_file(Path::new(token_file));
    }
    let path = token_path(data_dir, name);
    let secret = generate();
    let made =
        secret_file::create_once(&path, format!("{secret}\n").as_bytes()).map_err(|source| {
            TokenError::Write {
                path: path.clone(),
                source,
            }
        })?;
    match made {
        Made::Created => {
            tracing::info!(path = %path.display(), "made a new {name} token at first start");
            Ok(Token::new(secret))
        }
        // Made earlier, or a moment ago by another process (a server starting while
        // `--print-*-token` runs): the file's token is the one.
        Made::Existed => read_token_file(&path),
    }
}

/// Where a server keeps a token it made itself.
pub fn token_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.token"))
}

/// 32 random bytes as hex.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = resolve("", "", dir.path(), "admin").unwrap();
        let b = resolve("", "", dir.path(), "admin").unwrap();
        assert!(a.matches(b.secret()));
        assert_eq!(a.secret().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(dir.path(), "admin"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let explicit = resolve("s3cret", "", dir.path(), "admin").unwrap();
        assert!(explicit.matches("s3cret"));
        assert!(!explicit.matches("s3cre"));
        assert_eq!(format!("{explicit:?}"), "Token(***)");
    }

    #[test]
    fn a_previous_token_is_accepted_until_removed() {
        let a = Accepted::new(Token::new("new"), Some(Token::new("old")));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer old".parse().unwrap());
        assert!(a.check(&h, "node").is_ok());
        h.insert("authorization", "Bearer new".parse().unwrap());
        assert!(a.check(&h, "node").is_ok());
        a.set(Token::new("new"), None);
        assert!(a.check(&h, "node").is_ok());
        h.insert("authorization", "Bearer old".parse().unwrap());
        assert_eq!(a.check(&h, "node"), Err(Unauthorized::Invalid("node")));
        // An empty previous token accepts nothing more.
        a.set(Token::new("new"), Some(Token::new("")));
        assert!(!a.matches(""));
        assert_eq!(a.current().unwrap().secret(), "new");
    }

    #[test]
    fn bearer_check() {
        let t = Token::new("abc");
        let mut h = HeaderMap::new();
        assert_eq!(t.check(&h, "admin"), Err(Unauthorized::Missing("admin")));
        h.insert("authorization", "Bearer abd".parse().unwrap());
        assert_eq!(t.check(&h, "admin"), Err(Unauthorized::Invalid("admin")));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert!(t.check(&h, "admin").is_ok());
        h.insert("authorization", "bearer abc".parse().unwrap());
        assert!(
            t.check(&h, "admin").is_ok(),
            "the scheme is case-insensitive"
        );
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(t.check(&h, "admin"), Err(Unauthorized::Missing("admin")));
    }
}
