//! The JSON documents of the client API: the catalog, a group's settings and policy, and the
//! `/v1/sync` snapshot a downstream node mirrors, each with a strong ETag.
//!
//! Owns how each document is built from the served state and its tag. It must never change
//! that state; the catalog body is serialized once per revision and kept.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::conditional::{json_bytes_with_etag, json_with_etag};
use super::{Api, ServeError, Served};
use crate::core::fault::Internal;
use crate::core::proto::{settings_json, Snapshot};
use crate::http::error::ApiError;
use crate::http::extract::{Path, Query};

impl Served {
    /// The current catalog as served: ETag, wire bytes (serialized once per revision) and
    /// the manager's signature of exactly those bytes.
    fn catalog_body(&self) -> Result<(String, bytes::Bytes, Option<String>), Internal> {
        let history = self.catalog()?;
        let etag = history.etag();
        let signature = history.signature().map(str::to_string);
        if let Ok(cached) = self.catalog_body.read() {
            if let Some((tag, body)) = cached.as_ref() {
                if *tag == etag {
                    return Ok((etag, body.clone(), signature));
                }
            }
        }
        let body = bytes::Bytes::from(crate::core::signing::catalog_bytes(&history.current()));
        if let Ok(mut cached) = self.catalog_body.write() {
            *cached = Some((etag.clone(), body.clone()));
        }
        Ok((etag, body, signature))
    }
}

pub async fn catalog(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (etag, body, signature) = api.served.catalog_body()?;
    let mut resp = json_bytes_with_etag(&headers, &etag, body);
    // The signature covers exactly these bytes; clients can check a node did not invent them.
    if let Some(v) = signature.and_then(|sig| HeaderValue::from_str(&sig).ok()) {
        resp.headers_mut().insert("x-gup-catalog-signature", v);
    }
    Ok(resp)
}

/// A group name that no group can have is bad input (400), not a group that is missing (404).
fn check_group(group: &str) -> Result<(), ServeError> {
    crate::core::settings::validate_name("group", group)
        .map_err(|e| ServeError::BadName(e.to_string()))
}

#[derive(serde::Deserialize)]
pub struct LocationQuery {
    location: Option<String>,
}

pub async fn settings(
    State(api): State<Api>,
    Path(group): Path<String>,
    Query(q): Query<LocationQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let location = q.location.as_deref().filter(|l| !l.is_empty());
    check_group(&group)?;
    if let Some(l) = location {
        crate::core::settings::validate_name("location", l)
            .map_err(|e| ServeError::BadName(e.to_string()))?;
    }
    let dir = api.served.directory()?;
    if !dir.groups.contains_key(&group) {
        return Err(ServeError::NoGroup(group).into());
    }
    let etag = dir.settings_etag(&group, location);
    let body = settings_json(&dir, &group, location);
    Ok(json_with_etag(&headers, &etag, &body))
}

pub async fn policy(
    State(api): State<Api>,
    Path(group): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_group(&group)?;
    let dir = api.served.directory()?;
    if !dir.groups.contains_key(&group) {
        return Err(ServeError::NoGroup(group).into());
    }
    /// `{group, serial, policy}`, the policy passed on as the text it was stored as.
    #[derive(serde::Serialize)]
    struct PolicyBody<'a> {
        group: &'a str,
        serial: u64,
        policy: &'a serde_json::value::RawValue,
    }
    let none = serde_json::value::RawValue::from_string("null".into())
        .map_err(|e| Internal(e.to_string()))?;
    let (serial, policy) = match dir.policy(&group) {
        Some((_, p)) => (p.serial, &*p.document),
        None => (0, &*none),
    };
    let etag = format!("\"policy-{serial}-{group}\"");
    let body = PolicyBody {
        group: &group,
        serial,
        policy,
    };
    Ok(json_with_etag(&headers, &etag, &body))
}

/// `GET /v1/sync` (node token, checked by the router): everything this server holds that a
/// node mirrors, with its ETag; 503 while this server has nothing to pass on.
pub async fn sync(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    let s = &api.served;
    if !s.readiness.is_ready() {
        return Err(ServeError::NotReady.into());
    }
    let (catalog, catalog_signature) = {
        let history = s.catalog()?;
        (history.current(), history.signature().map(str::to_string))
    };
    let directory = s.directory()?.clone();
    let (etag, bytes) = Snapshot {
        directory,
        catalog,
        catalog_signature,
        stale_since: s.readiness.stale_since(),
    }
    .encode()
    .map_err(|e| Internal(format!("encoding the snapshot: {e}")))?;
    Ok(json_bytes_with_etag(&headers, &etag, bytes).into_response())
}
