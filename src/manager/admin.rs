//! The admin API: site settings, groups, settings, policies, clients, users, enrolment
//! tokens and client revocation, events, notifications and learned applications.
//!
//! Owns the admin routes of the manager, what each change pushes to streams, and the size
//! bounds of what an admin may put in the directory ([`MAX_POLICY_BYTES`], and
//! `core::proto::MAX_SNAPSHOT_BYTES` checked by `Manager::change_directory`). Every route here sits
//! behind the admin token, checked once by the router layer (`http::auth::require`); no
//! handler checks it itself. Listings answer a page at a time (`page`). It must never answer
//! a client endpoint: those are `serve`'s.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;

use super::applications::{AppPage, AppQuery};
use super::enrol::{CreatedToken, NewToken, TokenView};
use super::events::{
    AckError, AckedAll, EventPage, EventQuery, NoticePage, NoticeQuery, Notification,
};
use super::publish;
use super::registry::{ClientPage, ClientQuery, ClientRecord};
use super::Manager;
use crate::core::fault::{Fault, Kind};
use crate::core::proto::{settings_json, Change, BODY_LIMIT};
use crate::core::settings::{
    Directory, PutOutcome, SettingsError, DEFAULT_GROUP, MAX_POLICY_BYTES,
};
use crate::http::error::{ApiError, Refused};
use crate::http::extract::{JsonBody, Path, Query};

/// The policy route's body limit: a little above [`MAX_POLICY_BYTES`], so that a policy
/// just over the bound reaches the handler, which answers 413 naming the group (a larger
/// body is refused by this limit, and the handler names the group for it too).
const POLICY_BODY_LIMIT: usize = MAX_POLICY_BYTES + (64 << 10);

/// What an admin change would make too big.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Oversized {
    #[error(
        "the policy of group {group:?} is {}: a policy may have at most {} bytes",
        policy_size(.size),
        MAX_POLICY_BYTES
    )]
    Policy {
        group: String,
        /// None when the body was refused before it was read whole.
        size: Option<usize>,
    },
    #[error("{what} would make the /v1/sync snapshot {size} bytes, over its limit of {limit} bytes (nodes mirror at most 64 MiB)")]
    Snapshot {
        what: String,
        size: usize,
        limit: usize,
    },
}

fn policy_size(size: &Option<usize>) -> String {
    match size {
        Some(s) => format!("{s} bytes"),
        None => format!("over {POLICY_BODY_LIMIT} bytes"),
    }
}

impl Fault for Oversized {
    fn kind(&self) -> Kind {
        Kind::TooLarge
    }

    fn code(&self) -> &'static str {
        match self {
            Oversized::Policy { .. } => "policy_too_large",
            Oversized::Snapshot { .. } => "snapshot_too_large",
        }
    }
}

/// Every admin route (the caller puts them behind the admin token).
pub fn routes(m: Arc<Manager>) -> Router {
    let publishing = Router::new().route("/v1/admin/content", post(publish::publish));
    // Its own body limit, a little above the policy bound, so its handler names the group.
    let policy = Router::new()
        .route("/v1/admin/groups/{group}/policy", put(put_policy))
        .layer(DefaultBodyLimit::max(POLICY_BODY_LIMIT));
    let rest = Router::new()
        .route("/v1/admin/content/{name}", delete(publish::unpublish))
        .route("/v1/admin/site", put(put_site).get(get_site))
        .route("/v1/admin/groups", get(list_groups))
        .route(
            "/v1/admin/groups/{group}",
            put(put_group).delete(delete_group),
        )
        .route(
            "/v1/admin/groups/{group}/settings",
            put(put_settings).get(get_admin_settings),
        )
        .route("/v1/admin/clients", get(list_clients))
        .route("/v1/admin/clients/{id}", delete(delete_client))
        .route("/v1/admin/clients/{id}/move", post(move_client))
        .route("/v1/admin/clients/{id}/revoke", post(revoke_client))
        .route("/v1/admin/enroll", post(create_token).get(list_tokens))
        .route("/v1/admin/enroll/{id}", delete(revoke_token))
        .route("/v1/admin/users/{user}", put(put_user))
        .route("/v1/admin/events", get(admin_events))
        .route("/v1/admin/notifications", get(admin_notifications))
        .route("/v1/admin/notifications/ack", post(ack_all_notifications))
        .route("/v1/admin/notifications/{id}/ack", post(ack_notification))
        .route("/v1/admin/nodes", get(super::nodes::admin_nodes))
        .route("/v1/admin/backup", get(super::backup::backup))
        .route("/v1/admin/applications", get(admin_applications))
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    // Publishing streams its raw body to disk, which no body limit applies to.
    publishing.merge(policy).merge(rest).with_state(m)
}

/// Settings changes for `groups`, as pushed to streams.
fn settings_changes(dir: &Directory, groups: &[String]) -> Vec<Change> {
    groups
        .iter()
        .map(|g| Change::Settings {
            group: g.clone(),
            serial: dir.settings_serial(g),
        })
        .collect()
}

async fn get_site(State(m): State<Arc<Manager>>) -> Result<Json<serde_json::Value>, ApiError> {
    let site = m.served.directory()?.site.clone();
    Ok(Json(serde_json::to_value(site).unwrap_or_default()))
}

async fn put_site(
    State(m): State<Arc<Manager>>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let site = m
        .change_directory("the site settings", |d| {
            let before = d.site.clone();
            d.put_site(&body)?;
            // learn_applications depends on the site switch: every group's settings change.
            let changes = if d.site != before {
                let all: Vec<String> = d.groups.keys().cloned().collect();
                settings_changes(d, &all)
            } else {
                Vec::new()
            };
            Ok((d.site.clone(), changes))
        })
        .await?;
    Ok(Json(serde_json::to_value(site).unwrap_or_default()))
}

async fn list_groups(State(m): State<Arc<Manager>>) -> Result<Json<serde_json::Value>, ApiError> {
    let groups = m.served.directory()?.groups_list();
    Ok(Json(serde_json::json!({ "groups": groups })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParentBody {
    parent: Option<String>,
}

async fn put_group(
    State(m): State<Arc<Manager>>,
    Path(group): Path<String>,
    JsonBody(body): JsonBody<ParentBody>,
) -> Result<Response, ApiError> {
    let parent = body.parent.unwrap_or_else(|| DEFAULT_GROUP.to_string());
    let outcome = m
        .change_directory(&format!("group {group:?}"), |d| {
            let o = d.put_group(&group, &parent)?;
            let changes = if o == PutOutcome::Unchanged {
                Vec::new()
            } else {
                let mut c = settings_changes(d, &d.descendants(&group));
                c.extend(d.descendants(&group).into_iter().map(|g| Change::Policy {
                    serial: d.policy_serial(&g),
                    group: g,
                }));
                c
            };
            Ok((o, changes))
        })
        .await?;
    let status = if outcome == PutOutcome::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({"group": group, "parent": parent})),
    )
        .into_response())
}

async fn delete_group(
    State(m): State<Arc<Manager>>,
    Path(group): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let has_clients = m.registry.has_clients(&group)?;
    m.change_directory(&format!("deleting group {group:?}"), |d| {
        d.delete_group(&group, has_clients)?;
        Ok(((), Vec::new()))
    })
    .await?;
    Ok(Json(serde_json::json!({"deleted": group})))
}

#[derive(Deserialize)]
struct LocationQuery {
    location: Option<String>,
}

async fn put_settings(
    State(m): State<Arc<Manager>>,
    Path(group): Path<String>,
    Query(q): Query<LocationQuery>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let location = q.location.filter(|l| !l.is_empty());
    let what = match &location {
        Some(l) => format!("the settings of group {group:?} at location {l:?}"),
        None => format!("the settings of group {group:?}"),
    };
    let effective = m
        .change_directory(&what, |d| {
            let changed = d.put_settings(&group, location.as_deref(), &body)?;
            let changes = settings_changes(d, &changed);
            Ok((settings_json(d, &group, location.as_deref()), changes))
        })
        .await?;
    Ok(Json(effective))
}

async fn get_admin_settings(
    State(m): State<Arc<Manager>>,
    Path(group): Path<String>,
    Query(q): Query<LocationQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let location = q.location.filter(|l| !l.is_empty());
    let dir = m.served.directory()?;
    let Some(g) = dir.groups.get(&group) else {
        return Err(SettingsError::NotFound(format!("no group {group:?}")).into());
    };
    let own = g.own.to_nested();
    let location_override = location
        .as_deref()
        .and_then(|l| g.locations.get(l))
        .map(|o| o.to_nested());
    Ok(Json(serde_json::json!({
        "group": group,
        "location": location,
        "own": own,
        "location_override": location_override,
        "effective": settings_json(&dir, &group, location.as_deref()),
    })))
}

/// `PUT /v1/admin/groups/{group}/policy`: any JSON of at most [`MAX_POLICY_BYTES`], else
/// 413 naming the group.
async fn put_policy(
    State(m): State<Arc<Manager>>,
    Path(group): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let bytes = match body {
        Ok(b) if b.len() > MAX_POLICY_BYTES => {
            return Err(Oversized::Policy {
                group,
                size: Some(b.len()),
            }
            .into())
        }
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(Oversized::Policy { group, size: None }.into())
        }
        Err(e) => return Err(Refused::Body(e.body_text()).into()),
    };
    let body: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Refused::Json(e.to_string()))?;
    let serial = m
        .change_directory(&format!("the policy of group {group:?}"), |d| {
            let serial = d.put_policy(&group, body)?;
            // Every descendant whose effective policy is now this one hears of it.
            let changes = d
                .descendants(&group)
                .into_iter()
                .filter(|g| d.policy_serial(g) == serial)
                .map(|g| Change::Policy { group: g, serial })
                .collect();
            Ok((serial, changes))
        })
        .await?;
    Ok(Json(serde_json::json!({"group": group, "serial": serial})))
}

/// `GET /v1/admin/clients?limit=&after=`: a page of clients in id order.
async fn list_clients(
    State(m): State<Arc<Manager>>,
    Query(q): Query<ClientQuery>,
) -> Result<Json<ClientPage>, ApiError> {
    Ok(Json(m.registry.list(&q, Utc::now())?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: String,
}

async fn move_client(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Json<ClientRecord>, ApiError> {
    let dir = m.served.directory()?.clone();
    let record = m.registry.move_client(&dir, &id, &body.group)?;
    m.registry.flush().await?;
    // A pushed client hears of its new group's settings at once.
    m.served.changes.send(Change::Settings {
        group: record.group.clone(),
        serial: dir.settings_serial(&record.group),
    });
    Ok(Json(record))
}

async fn delete_client(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.registry.delete(&id)?;
    m.registry.flush().await?;
    Ok(Json(serde_json::json!({"deleted": id})))
}

/// `POST /v1/admin/enroll` `{group, expires?, uses?}` -> 201 with the token (shown once).
async fn create_token(
    State(m): State<Arc<Manager>>,
    JsonBody(body): JsonBody<NewToken>,
) -> Result<Response, ApiError> {
    let dir = m.served.directory()?.clone();
    let created: CreatedToken = m.enrolment.create(&dir, &body, Utc::now())?;
    m.enrolment.flush().await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list_tokens(State(m): State<Arc<Manager>>) -> Result<Json<serde_json::Value>, ApiError> {
    let tokens: Vec<TokenView> = m.enrolment.list(Utc::now())?;
    Ok(Json(serde_json::json!({ "tokens": tokens })))
}

/// `DELETE /v1/admin/enroll/{id}`: no client enrols with the token any more.
async fn revoke_token(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let view = m.enrolment.revoke_token(&id, Utc::now())?;
    m.enrolment.flush().await?;
    Ok(Json(view))
}

/// `POST /v1/admin/clients/{id}/revoke`: the client's credential is refused from now on, by
/// the manager at once and by each node after its next sync (the revocation is mirrored
/// with the directory). The client may enrol again with a token.
async fn revoke_client(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let serial = m.enrolment.current_serial(&id)?;
    let what = format!("revoking client {id:?}");
    m.change_directory(&what, |d| {
        let slot = d.revoked.entry(id.clone()).or_insert(0);
        *slot = (*slot).max(serial);
        Ok(((), Vec::new()))
    })
    .await?;
    Ok(Json(
        serde_json::json!({"client_id": id, "revoked_serial": serial}),
    ))
}

async fn put_user(
    State(m): State<Arc<Manager>>,
    Path(user): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dir = m.served.directory()?.clone();
    m.registry.set_user(&dir, &user, &body.group)?;
    m.registry.flush().await?;
    Ok(Json(serde_json::json!({"user": user, "group": body.group})))
}

/// `GET /v1/admin/events`: a page of events by the most selective index given.
async fn admin_events(
    State(m): State<Arc<Manager>>,
    Query(q): Query<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    Ok(Json(m.events.query(&q)?))
}

/// `GET /v1/admin/notifications?limit=&after=&unacked=`: newest first.
async fn admin_notifications(
    State(m): State<Arc<Manager>>,
    Query(q): Query<NoticeQuery>,
) -> Result<Json<NoticePage>, ApiError> {
    Ok(Json(m.events.notifications(&q)?))
}

/// `POST /v1/admin/notifications/{id}/ack`: the notification, acknowledged (durably); one
/// acknowledged before is answered as it is. 404 `no_such_notification` naming the id.
async fn ack_notification(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
) -> Result<Json<Notification>, ApiError> {
    let n = m.events.ack(&id, Utc::now())?;
    m.events.flush().await?;
    Ok(Json(n))
}

/// The body of `POST /v1/admin/notifications/ack`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckAllBody {
    /// Must be true: a body that does not say "all" acknowledges nothing.
    all: bool,
    /// Only the notifications with an id up to this one (the newest the admin saw), so that
    /// one raised since is not cleared unseen.
    #[serde(default)]
    up_to: Option<u64>,
}

/// `POST /v1/admin/notifications/ack` `{"all": true, "up_to"?: ID}`: acknowledges every
/// notification (up to `up_to`) → `{acked, through, acked_at}`.
async fn ack_all_notifications(
    State(m): State<Arc<Manager>>,
    JsonBody(body): JsonBody<AckAllBody>,
) -> Result<Json<AckedAll>, ApiError> {
    if !body.all {
        return Err(AckError::NotAll.into());
    }
    // Possibly many batches of sled work: off the serving threads.
    let events = m.events.clone();
    let up_to = body.up_to;
    let done = tokio::task::spawn_blocking(move || events.ack_all(up_to, Utc::now()))
        .await
        .map_err(|e| crate::core::fault::Internal(format!("acknowledging: {e}")))??;
    m.events.flush().await?;
    Ok(Json(done))
}

/// `GET /v1/admin/applications?q=&limit=&after=`: applications with their client counts.
async fn admin_applications(
    State(m): State<Arc<Manager>>,
    Query(q): Query<AppQuery>,
) -> Result<Json<AppPage>, ApiError> {
    Ok(Json(m.apps.search(&q)?))
}
