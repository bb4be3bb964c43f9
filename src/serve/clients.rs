//! What clients send: heartbeats, events, applications, push streams, and the batches a
//! downstream node relays of them.
//!
//! Owns the handlers of `POST /v1/heartbeat`, `/v1/events`, `/v1/applications`,
//! `/v1/node/heartbeats`, `/v1/node/events`, `/v1/node/enroll`, `/v1/node/reports` and
//! `GET /v1/stream`, the
//! same for both roles: validation, who the caller is (`identity`; an `enroll_token` on a
//! heartbeat enrols through the role), the reply (effective settings, policy serial, catalog
//! revision, download slot, an issued credential), the application-learning gate, and the
//! order of a node batch (its heartbeats are placed before its uploads are filed). Where a
//! client belongs, where uploads go and who issues credentials is the [`super::Role`]'s. It
//! must never decide a client's group itself.

use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::identity::IdentityError;
use super::{Api, ServeError};
use crate::core::credential::{Credential, EnrollRequest, Enrolled};
use crate::core::proto::{
    check_client_id, state_changes, ApplicationUpload, Assignment, BatchReply, Change, EventUpload,
    Heartbeat, HeartbeatBatch, HeartbeatReply, Origin, Placed, Placement, PrefetchSlotReply,
    PrefetchSlotRequest, Upload, UploadBatch,
};
use crate::core::settings::DEFAULT_GROUP;
use crate::http::error::ApiError;
use crate::http::extract::{JsonBody, Query};

impl Api {
    /// A client id this server never placed counts against its address's allowance of new
    /// ids (`limits.new_clients_per_minute`); known clients are never held back.
    pub(super) fn admit(
        &self,
        client_id: &str,
        peer: std::net::IpAddr,
    ) -> Result<Option<Placement>, ApiError> {
        let placement = self.role.placement(client_id);
        if placement.is_none() {
            if let Err(e) = self.served.newcomers.admit(peer) {
                self.served.metrics.refused("new_clients_per_minute").inc();
                return Err(e.into());
            }
        }
        Ok(placement)
    }

    /// Who the caller is: the credential `headers` present for `client_id` (None when the
    /// site is open and none was presented); 401 otherwise, counted in
    /// `gup_refused_total{limit="credential"}`.
    pub(super) fn identify(
        &self,
        client_id: &str,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Credential>>, IdentityError> {
        // A node that never synced knows neither the site's rule nor the manager's key: it
        // admits nobody rather than guess (its clients keep their uploads and retry).
        if !self.served.readiness.is_ready() {
            return Err(IdentityError::NotSynced);
        }
        let dir = match self.served.directory() {
            Ok(d) => d,
            Err(_) => return Err(IdentityError::NoKey),
        };
        let checked = self.served.identity.check(&dir, client_id, headers);
        if checked.is_err() {
            self.served.metrics.refused("credential").inc();
        }
        checked
    }

    /// Places a client and answers its heartbeat.
    fn answer(
        &self,
        hb: &Heartbeat,
        address: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<HeartbeatReply, ApiError> {
        let placement = self.role.heartbeat(hb, Origin::direct(address), now)?;
        let s = &self.served;
        s.metrics.heartbeats_received.inc();
        let history = s.catalog()?;
        let dir = s.directory()?;
        let settings = dir.effective(&placement.group, hb.location());
        let slot =
            s.slots
                .for_heartbeat(&hb.client_id, hb.catalog_revision, &settings, &history, now)?;
        Ok(HeartbeatReply::new(
            &dir,
            hb,
            &placement.group,
            history.revision(),
            slot,
        ))
    }

    /// Where the role has `client_id`, or where an unknown client counts.
    fn placed(&self, client_id: &str) -> Placement {
        self.role
            .placement(client_id)
            .unwrap_or_else(Placement::unknown)
    }
}

/// `POST /v1/heartbeat`. A client with a credential is placed under the group it enrolled
/// into, whatever install group its body names; one without a credential that sends an
/// `enroll_token` is enrolled first and gets its credential in the reply.
pub async fn heartbeat(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    JsonBody(mut hb): JsonBody<Heartbeat>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    hb.validate()?;
    // A node that has never synced (nor restored a mirror) has no settings any admin chose:
    // it says so rather than answer with built-in defaults.
    if !api.served.readiness.is_ready() {
        return Err(ServeError::NotReady.into());
    }
    let token = hb.enroll_token.take();
    let presented = match api.identify(&hb.client_id, &headers) {
        Ok(c) => c,
        Err(IdentityError::Required) if token.is_some() => None,
        Err(e) => return Err(e.into()),
    };
    // Before any enrolment: an address introduces new client ids at a bounded rate.
    api.admit(&hb.client_id, peer.ip())?;
    let mut issued = None;
    match (presented, token) {
        (Some(c), _) => hb.install_group = Some(c.group.clone()),
        (None, Some(token)) => {
            let Enrolled { credential, group } = api.role.enroll(&hb.client_id, &token).await?;
            tracing::info!(client = %hb.client_id, %group, "client enrolled");
            hb.install_group = Some(group);
            issued = Some(credential);
        }
        (None, None) => {}
    }
    let mut reply = api.answer(&hb, Some(peer.ip().to_string()), Utc::now())?;
    reply.credential = issued;
    Ok(Json(reply))
}

/// A downstream node relays a client's enrolment (node token); a node passes it on up.
pub async fn node_enroll(
    State(api): State<Api>,
    JsonBody(req): JsonBody<EnrollRequest>,
) -> Result<Json<Enrolled>, ApiError> {
    crate::core::proto::check_client_id(&req.client_id)?;
    if req.token.len() > 256 {
        return Err(
            IdentityError::Refused(crate::core::credential::CredentialError::TooLong).into(),
        );
    }
    api.role.enroll(&req.client_id, &req.token).await.map(Json)
}

/// Places each relayed heartbeat; refuses the invalid ones one by one, and the whole batch
/// only when this server fails.
fn place_relayed(
    api: &Api,
    batch: impl IntoIterator<Item = crate::core::proto::RelayedHeartbeat>,
    now: DateTime<Utc>,
) -> Result<BatchReply, ApiError> {
    let mut reply = BatchReply::default();
    for item in batch {
        let id = item.heartbeat.client_id.clone();
        if let Err(e) = item.heartbeat.validate() {
            reply.rejected.push((id, e.to_string()));
            continue;
        }
        let origin = Origin {
            address: item.address,
            via: item.via,
            received_at: item.received_at,
        };
        if let Some(via) = &origin.via {
            if let Err(e) = check_client_id(via) {
                reply.rejected.push((id, format!("via: {}", e.reason)));
                continue;
            }
        }
        match api.role.heartbeat(&item.heartbeat, origin, now) {
            Ok(p) => {
                api.served.metrics.heartbeats_received.inc();
                reply.assignments.push(Assignment {
                    client_id: id,
                    group: p.group,
                })
            }
            Err(e) if e.status.is_client_error() => reply.rejected.push((id, e.message)),
            Err(e) => return Err(e),
        }
    }
    Ok(reply)
}

/// A downstream node relays its clients' heartbeats (node token).
pub async fn node_heartbeats(
    State(api): State<Api>,
    JsonBody(batch): JsonBody<HeartbeatBatch>,
) -> Result<Json<BatchReply>, ApiError> {
    place_relayed(&api, batch.heartbeats, Utc::now()).map(Json)
}

/// A downstream node asks when it may prefetch a revision (node token): its slot in the
/// window it asks for, from the same balancer as clients' slots but in books of their own
/// (`Served::node_slots`); null to fetch at once.
pub async fn node_slot(
    State(api): State<Api>,
    JsonBody(req): JsonBody<PrefetchSlotRequest>,
) -> Result<Json<PrefetchSlotReply>, ApiError> {
    check_client_id(&req.node_id)?;
    let history = api.served.catalog()?;
    let download_slot = api.served.node_slots.for_prefetch(
        &req.node_id,
        req.catalog_revision,
        req.window_s,
        &history,
        Utc::now(),
    )?;
    Ok(Json(PrefetchSlotReply { download_slot }))
}

/// A downstream node reports itself and the nodes behind it (node token): at most
/// `fleet::MAX_REPORTS_PER_BATCH` reports, each validated, the whole batch refused with 400
/// naming the field when one is not. 202 `{accepted}`.
pub async fn node_reports(
    State(api): State<Api>,
    JsonBody(batch): JsonBody<crate::core::fleet::ReportBatch>,
) -> Result<Response, ApiError> {
    batch.validate()?;
    let count = batch.reports.len();
    api.role.reports(batch.reports, Utc::now())?;
    Ok(accepted(count))
}

fn accepted(count: usize) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": count })),
    )
        .into_response()
}

pub async fn events(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    JsonBody(upload): JsonBody<EventUpload>,
) -> Result<Response, ApiError> {
    upload.validate()?;
    api.identify(&upload.client_id, &headers)?;
    let count = upload.events.len();
    let placement = api.admit(&upload.client_id, peer.ip())?;
    api.role
        .accept(vec![Placed {
            upload: Upload::Events(upload),
            placement,
        }])
        .await?;
    api.served.metrics.events_received.inc_by(count as u64);
    Ok(accepted(count))
}

pub async fn applications(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    JsonBody(upload): JsonBody<ApplicationUpload>,
) -> Result<Response, ApiError> {
    upload.validate()?;
    api.identify(&upload.client_id, &headers)?;
    let placement = api.admit(&upload.client_id, peer.ip())?;
    let at = placement.clone().unwrap_or_else(Placement::unknown);
    if let Some(why) = api
        .served
        .directory()?
        .learning_refusal(&at.group, at.location.as_deref())
    {
        return Err(ServeError::LearningOff(why).into());
    }
    let count = upload.applications.len();
    api.role
        .accept(vec![Placed {
            upload: Upload::Applications(upload),
            placement,
        }])
        .await?;
    api.served.metrics.events_received.inc_by(count as u64);
    Ok(accepted(count))
}

/// A downstream node forwards what its clients uploaded (node token). The heartbeats that
/// travel with the batch are placed first, so a client first seen in this very batch has its
/// events filed under its real group; a client this server still does not know keeps the
/// placement the node sent.
pub async fn node_events(
    State(api): State<Api>,
    JsonBody(batch): JsonBody<UploadBatch>,
) -> Result<Response, ApiError> {
    for p in &batch.uploads {
        p.upload.validate()?;
    }
    place_relayed(&api, batch.heartbeats, Utc::now())?;
    let count = batch.uploads.iter().map(|p| p.upload.count()).sum();
    let uploads = batch
        .uploads
        .into_iter()
        .map(|p| Placed {
            placement: api.role.placement(p.upload.client_id()).or(p.placement),
            upload: p.upload,
        })
        .collect();
    api.role.accept(uploads).await?;
    api.served.metrics.events_received.inc_by(count as u64);
    Ok(accepted(count))
}

#[derive(Deserialize)]
pub struct StreamQuery {
    client_id: Option<String>,
}

/// `GET /v1/stream[?client_id=ID]`: the current state, then every change of the client's
/// group (or of every group, for a node that mirrors them all). One address holds at most
/// `limits.max_streams_per_address` streams.
pub async fn stream(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Result<Response, ApiError> {
    let client = q.client_id.filter(|c| !c.is_empty());
    if let Some(id) = &client {
        check_client_id(id)?;
        api.identify(id, &headers)?;
        api.admit(id, peer.ip())?;
    }
    let Some(held) = api.served.streams.take(peer.ip()) else {
        api.served.metrics.refused("max_streams_per_address").inc();
        return Err(ServeError::TooManyStreams.into());
    };
    let current = {
        let api = api.clone();
        let client = client.clone();
        move || {
            let s = &api.served;
            let revision = s.catalog().map(|c| c.revision()).unwrap_or(0);
            let groups: Vec<String> = match &client {
                None => match s.directory() {
                    Ok(dir) => dir.groups.keys().cloned().collect(),
                    Err(_) => vec![DEFAULT_GROUP.to_string()],
                },
                Some(id) => vec![api.placed(id).group],
            };
            match s.directory() {
                Ok(dir) => state_changes(&dir, groups, revision),
                Err(_) => Vec::new(),
            }
        }
    };
    let filter = {
        let api = api.clone();
        move |c: &Change| match (&client, c.group()) {
            (None, _) | (_, None) => true,
            (Some(id), Some(g)) => api.placed(id).group == g,
        }
    };
    let s = &api.served;
    Ok(s.changes.respond(current, filter, s.shutdown.clone(), held))
}
