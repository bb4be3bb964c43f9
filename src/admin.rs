//! The admin API's client side, used by `gup admin` and `gup demo`.
//!
//! Owns the HTTP calls an operator makes to a manager with the admin token, streaming uploads
//! from disk (a 1 GiB package is never read into memory) and turning the manager's JSON
//! errors into typed errors. It must never touch a data dir or hold state.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::core::proto::PublishResult;
use crate::http::auth::Token;

/// What went wrong calling the manager.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No answer at all: the cause first (connection refused, timed out, ...).
    #[error("cannot reach the manager at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    /// Any other failure of the exchange, with its causes.
    #[error("{0}")]
    Http(String),
    #[error("the manager at {manager} answered {status}: {code}: {message}")]
    Api {
        manager: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--manager {0:?} is not an http(s) URL")]
    BadUrl(String),
    #[error("the manager's {path} answered a next page cursor {cursor} that does not move on")]
    CursorStuck { path: String, cursor: String },
}

impl From<reqwest::Error> for AdminError {
    fn from(e: reqwest::Error) -> AdminError {
        use crate::core::fault::{chain, io_cause};
        if e.is_connect() || e.is_timeout() {
            let url = e
                .url()
                .map(|u| u.origin().ascii_serialization())
                .unwrap_or_default();
            let cause = io_cause(&e).unwrap_or_else(|| {
                if e.is_timeout() {
                    "timed out".into()
                } else {
                    chain(&e)
                }
            });
            return AdminError::Unreachable { url, cause };
        }
        AdminError::Http(chain(&e))
    }
}

/// An admin session with one manager.
pub struct AdminClient {
    base: String,
    token: Token,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(manager: &str, token: Token) -> Result<AdminClient, AdminError> {
        crate::core::config::validate_url(manager)
            .map_err(|_| AdminError::BadUrl(manager.into()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("gup-admin/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(AdminClient {
            base: manager.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<(u16, T), AdminError> {
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return Ok((status, resp.json().await?));
        }
        let manager = resp.url().origin().ascii_serialization();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        Err(AdminError::Api {
            manager,
            status,
            code: body["error"].as_str().unwrap_or("unknown").to_string(),
            message: body["message"].as_str().unwrap_or("").to_string(),
        })
    }

    /// Calls `method path` with an optional JSON body; returns the JSON answer.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AdminError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query)
            .bearer_auth(self.token.secret());
        if let Some(b) = body {
            req = req.json(b);
        }
        Self::decode(req.send().await?).await.map(|(_, v)| v)
    }

    /// `GET path` page after page: each answer's `next` is passed back as `after` until it
    /// is null, and `each` gets every page's answer in order. A `next` equal to the cursor
    /// just sent is refused (it would never end).
    pub async fn pages(
        &self,
        path: &str,
        query: &[(&str, &str)],
        mut each: impl FnMut(serde_json::Value),
    ) -> Result<(), AdminError> {
        let mut after: Option<String> = None;
        loop {
            let mut q: Vec<(&str, &str)> = query.to_vec();
            if let Some(a) = &after {
                q.push(("after", a));
            }
            let page = self.call(reqwest::Method::GET, path, &q, None).await?;
            let next = match &page["next"] {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            each(page);
            match next {
                None => return Ok(()),
                Some(n) if after.as_ref() == Some(&n) => {
                    return Err(AdminError::CursorStuck {
                        path: path.to_string(),
                        cursor: n,
                    })
                }
                Some(n) => after = Some(n),
            }
        }
    }

    /// Publishes the file at `path`, streamed from disk. Returns the HTTP status (201 new,
    /// 200 already published) and the manager's answer.
    pub async fn publish(
        &self,
        path: &Path,
        name: &str,
        version: Option<&str>,
        urgent: bool,
    ) -> Result<(u16, PublishResult), AdminError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| AdminError::File {
                path: path.display().to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .await
            .map_err(|source| AdminError::File {
                path: path.display().to_string(),
                source,
            })?
            .len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ));
        let mut query: Vec<(&str, &str)> = vec![("name", name)];
        if let Some(v) = version {
            query.push(("version", v));
        }
        if urgent {
            query.push(("urgent", "true"));
        }
        let resp = self
            .http
            .post(format!("{}/v1/admin/content", self.base))
            .query(&query)
            .bearer_auth(self.token.secret())
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await?;
        Self::decode(resp).await
    }
}

/// Parses `KEY=VALUE` arguments into a settings body with dotted keys. A value is read as
/// JSON when it parses (numbers, booleans, null, lists), else as a string.
pub fn parse_assignments(pairs: &[String]) -> Result<serde_json::Value, String> {
    let mut map = serde_json::Map::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("{p:?} is not KEY=VALUE"));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{p:?} has an empty key"));
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
        map.insert(k.to_string(), value);
    }
    Ok(serde_json::Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments() {
        let v = parse_assignments(&[
            "mode=push".into(),
            "randomization.window_s=60".into(),
            "learn_applications=true".into(),
            "heartbeat_interval_s=null".into(),
        ])
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mode": "push", "randomization.window_s": 60,
                "learn_applications": true, "heartbeat_interval_s": null})
        );
        assert!(parse_assignments(&["novalue".into()]).is_err());
        assert!(parse_assignments(&["=1".into()]).is_err());
    }
}
