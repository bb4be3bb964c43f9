//! The admin API's client side, used by `gup admin` and `gup demo`.
//!
//! Owns the HTTP calls an operator makes to a manager with the admin token, streaming uploads
//! from disk (a 1 GiB package is never read into memory), downloading a backup to a file
//! (streamed to a private temp file, verified against its manifest, then renamed into place)
//! and turning the manager's JSON errors into typed errors. It must never touch a data dir
//! or hold state.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::core::backup::{BackupError, Manifest};
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
    /// The backup stream ended before its end (the manager's log says why).
    #[error("the manager's backup was cut short ({cause}); nothing was written to {path}")]
    BackupCut { path: String, cause: String },
    #[error(
        "the backup the manager sent does not verify ({source}); nothing was written to {path}"
    )]
    BackupBad {
        path: String,
        #[source]
        source: BackupError,
    },
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
        Err(Self::refusal(resp).await)
    }

    /// The manager's JSON error of an answer that is not a success.
    async fn refusal(resp: reqwest::Response) -> AdminError {
        let status = resp.status().as_u16();
        let manager = resp.url().origin().ascii_serialization();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        AdminError::Api {
            manager,
            status,
            code: body["error"].as_str().unwrap_or("unknown").to_string(),
            message: body["message"].as_str().unwrap_or("").to_string(),
        }
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

/// A backup written by [`AdminClient::backup`].
#[derive(Debug)]
pub struct BackupWritten {
    pub manifest: Manifest,
    /// Bytes of the file.
    pub bytes: u64,
}

/// A temp file removed on drop unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl AdminClient {
    /// Downloads a backup of the manager (`GET /v1/admin/backup`, with the blobs when
    /// `with_content`) into `out`: streamed to a temp file beside it (mode 0600: the backup
    /// holds the signing key and the tokens), synced, verified against its manifest, then
    /// renamed over `out` and the directory synced. On any failure `out` is left as it was.
    pub async fn backup(
        &self,
        out: &Path,
        with_content: bool,
    ) -> Result<BackupWritten, AdminError> {
        let shown = out.display().to_string();
        let file_err = |source: std::io::Error| AdminError::File {
            path: shown.clone(),
            source,
        };
        let dir = match out.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = out
            .file_name()
            .ok_or_else(|| {
                file_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "names no file",
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let tmp_path = dir.join(format!(
            ".{name}.{}.{:08x}.part",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut req = self
            .http
            .get(format!("{}/v1/admin/backup", self.base))
            .bearer_auth(self.token.secret());
        if with_content {
            req = req.query(&[("content", "true")]);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let std_file = opts.open(&tmp_path).map_err(&file_err)?;
        let mut tmp = TempFile(Some(tmp_path.clone()));
        let mut file = tokio::fs::File::from_std(std_file);
        let mut body = resp.bytes_stream();
        let mut bytes = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| AdminError::BackupCut {
                path: shown.clone(),
                cause: crate::core::fault::chain(&e),
            })?;
            bytes += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(&file_err)?;
        }
        file.sync_all().await.map_err(&file_err)?;
        drop(file);
        let check = tmp_path.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&check)?;
            Ok::<_, std::io::Error>(crate::core::backup::verify(
                std::io::BufReader::with_capacity(1 << 20, f),
            ))
        })
        .await
        .map_err(|e| AdminError::Http(e.to_string()))?
        .map_err(&file_err)?;
        let manifest = verified.map_err(|source| AdminError::BackupBad {
            path: shown.clone(),
            source,
        })?;
        std::fs::rename(&tmp_path, out).map_err(&file_err)?;
        // In place: nothing to remove any more.
        tmp.0 = None;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(BackupWritten { manifest, bytes })
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
