//! The manager's status page: `GET /admin` behind the admin token, its login and logout.
//!
//! Owns who may see the page (`Authorization: Bearer <admin token>`, or a session cookie
//! from `POST /admin/login`, whose token is compared in constant time; `POST /admin/logout`
//! ends it), gathering a [`ManagerView`] (the group tree with the client counts of the last
//! [`Tally`], the node table, recent notifications, the retained catalog revisions, heartbeats and events per
//! second from the per-minute history) and the background work behind it: the sampler of
//! the history and [`Manager::tally_loop`], which counts clients per group so that no page
//! load walks the registry. It must never put a token on a page, never answer the page
//! without a valid credential, and never change anything but its own sessions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};

use super::events::NoticeQuery;
use super::Manager;
use crate::core::fault::{Fault, Internal, Kind};
use crate::http::error::ApiError;
use crate::page::history::{self, History};
use crate::page::manager_page::{
    self, CatalogRow, GroupRow, ManagerView, NodeRow, NoticeRow, RevisionRow,
};

/// The manager's page history: heartbeats received, events received.
pub type PageHistory = Arc<Mutex<History<2>>>;

/// Notifications the page shows: the newest this many.
pub const RECENT_NOTICES: usize = 10;

/// The shortest wait between two client counts: the page's own refresh, so a wall screen
/// never shows a count older than two refreshes on a small registry.
pub const TALLY_INTERVAL: Duration = Duration::from_secs(10);

/// The wait after a count is at least this many times the count took, so counting a large
/// registry costs at most one part in 20 of a core.
pub const TALLY_DUTY: u32 = 20;

/// Client records one count visits at most (a count then says it stopped short): well past
/// the fleets a manager serves (tens of thousands of clients), and a bound on the time one
/// count holds a blocking thread, whatever the registry holds.
pub const TALLY_MAX_RECORDS: usize = 2_000_000;

/// A login form's body at most: a token and some room.
const LOGIN_BODY_LIMIT: usize = 4096;

/// Clients per group as last counted.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub at: Option<DateTime<Utc>>,
    /// Group -> (clients, overdue).
    pub groups: BTreeMap<String, (u64, u64)>,
    /// The count stopped at [`TALLY_MAX_RECORDS`].
    pub partial: bool,
}

/// What the page's own routes refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("the login form's body must be `token=<admin token>` (form-encoded, UTF-8)")]
    BadForm,
}

impl Fault for PageError {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }

    fn code(&self) -> &'static str {
        "bad_form"
    }
}

/// The page, login and logout routes (outside the admin API's token layer: they check the
/// token or a session themselves).
pub fn routes(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/admin", get(page))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .layer(DefaultBodyLimit::max(LOGIN_BODY_LIMIT))
        .with_state(m)
}

/// How a request is let in.
enum Credential {
    Bearer,
    Session,
}

impl Manager {
    /// Whether the request carries the admin token or a live session; Err with why not.
    fn credential(&self, headers: &HeaderMap) -> Result<Credential, &'static str> {
        if headers.contains_key(header::AUTHORIZATION) {
            return match self.admin_token.check(headers, "admin") {
                Ok(()) => Ok(Credential::Bearer),
                Err(_) => Err("the admin token is not valid"),
            };
        }
        match super::session::presented(headers) {
            Some(id) if self.sessions.valid(&id, Instant::now()) => Ok(Credential::Session),
            Some(_) => Err("your session ended; log in again"),
            None => Err(""),
        }
    }

    fn secure(&self) -> bool {
        self.serving.tls.is_some()
    }

    fn page_counters(&self) -> [u64; 2] {
        let m = &self.served.metrics;
        [m.heartbeats_received.get(), m.events_received.get()]
    }

    /// Samples the page's counters until shutdown.
    pub(super) async fn sample_loop(self: Arc<Self>) {
        let me = self.clone();
        history::sample_every(
            self.history.clone(),
            move || me.page_counters(),
            self.shutdown.clone(),
        )
        .await
    }

    /// Counts clients per group now and then (see [`TALLY_INTERVAL`], [`TALLY_DUTY`]) until
    /// shutdown.
    pub(super) async fn tally_loop(self: Arc<Self>) {
        loop {
            let started = Instant::now();
            let registry = self.registry.clone();
            let now = Utc::now();
            let counted =
                tokio::task::spawn_blocking(move || registry.tally(now, TALLY_MAX_RECORDS)).await;
            match counted {
                Ok(Ok((groups, partial))) => {
                    if let Ok(mut t) = self.tally.write() {
                        *t = Tally {
                            at: Some(now),
                            groups,
                            partial,
                        };
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not count clients for the status page")
                }
                Err(e) => tracing::warn!(error = %e, "the client count stopped"),
            }
            let wait = TALLY_INTERVAL.max(started.elapsed() * TALLY_DUTY);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// What the status page shows now.
    pub fn status_view(&self, session: bool) -> Result<ManagerView, ApiError> {
        let now = Utc::now();
        let tally = self
            .tally
            .read()
            .map_err(|_| Internal::poisoned("client tally"))?
            .clone();
        let groups = group_tree(&*self.served.directory()?, &tally.groups);
        let notices = self
            .events
            .notifications(&NoticeQuery {
                limit: Some(RECENT_NOTICES),
                after: None,
                unacked: false,
            })?
            .notifications
            .into_iter()
            .map(|n| NoticeRow {
                group: n.group,
                kind: n.kind,
                first_at: n.first_at,
                last_at: n.last_at,
                count: n.count,
                client_id: n.client_id,
                acked_at: n.acked_at,
            })
            .collect();
        let (revisions, catalog, revision) = {
            let history = self.served.catalog()?;
            let revisions = history
                .revisions()
                .map(|r| RevisionRow {
                    revision: r.catalog.revision,
                    available_at: r.available_at,
                    items: r.catalog.items.len(),
                    bytes: r.catalog.items.iter().map(|i| i.size).sum(),
                })
                .collect();
            let catalog = history
                .revisions()
                .last()
                .map(|r| {
                    r.catalog
                        .items
                        .iter()
                        .map(|i| CatalogRow {
                            name: i.name.clone(),
                            version: i.version.clone(),
                            size: i.size,
                            urgent: i.urgent,
                            published_at: i.published_at,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (revisions, catalog, history.revision())
        };
        let nodes = self
            .nodes
            .list(revision, now)?
            .nodes
            .into_iter()
            .map(|n| NodeRow {
                id: n.report.node_id,
                name: n.report.name,
                url: n.report.advertised_url.unwrap_or_default(),
                revision: n.report.catalog_revision,
                revisions_behind: n.revisions_behind,
                via: n.report.via,
                overdue: n.overdue,
                stale_since: n.report.stale_since,
                clients: n.report.clients_last_interval,
                events_queued: n.report.events_queued,
                last_report: n.received_at,
            })
            .collect();
        let [heartbeats, events] = self
            .history
            .lock()
            .map_err(|_| Internal::poisoned("page history"))?
            .rates(now.timestamp(), self.page_counters());
        Ok(ManagerView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            now,
            nodes,
            groups,
            counted_at: tally.at,
            counts_partial: tally.partial,
            notices,
            revisions,
            catalog,
            heartbeats,
            events,
            session,
        })
    }
}

/// The groups in tree order from `default` (children by name), each with its counts.
pub fn group_tree(
    dir: &crate::core::settings::Directory,
    counts: &BTreeMap<String, (u64, u64)>,
) -> Vec<GroupRow> {
    let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, g) in &dir.groups {
        if let Some(parent) = g.parent.as_deref() {
            children.entry(parent).or_default().push(name);
        }
    }
    let mut out = Vec::with_capacity(dir.groups.len());
    // Depth first without recursion; a group is visited once even if the tree were broken.
    let mut stack = vec![("default", 0usize)];
    let mut seen = std::collections::HashSet::new();
    while let Some((name, depth)) = stack.pop() {
        if !seen.insert(name) {
            continue;
        }
        let (clients, overdue) = counts.get(name).copied().unwrap_or_default();
        out.push(GroupRow {
            name: name.to_string(),
            depth,
            clients,
            overdue,
        });
        if let Some(kids) = children.get(name) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    out
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}

fn see_admin(cookie: String) -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/admin".to_string()),
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

async fn page(State(m): State<Arc<Manager>>, headers: HeaderMap) -> Result<Response, ApiError> {
    match m.credential(&headers) {
        Ok(how) => {
            let view = m.status_view(matches!(how, Credential::Session))?;
            Ok(html(StatusCode::OK, manager_page::render(&view)))
        }
        Err(why) => Ok(html(
            StatusCode::UNAUTHORIZED,
            manager_page::login((!why.is_empty()).then_some(why)),
        )),
    }
}

async fn login(State(m): State<Arc<Manager>>, body: Bytes) -> Result<Response, ApiError> {
    let text = std::str::from_utf8(&body).map_err(|_| PageError::BadForm)?;
    let token = url::form_urlencoded::parse(text.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .ok_or(PageError::BadForm)?;
    if !m.admin_token.matches(token.trim()) {
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            manager_page::login(Some("the admin token is not valid")),
        ));
    }
    let id = m.sessions.open(Instant::now());
    Ok(see_admin(super::session::set_cookie(&id, m.secure())))
}

async fn logout(State(m): State<Arc<Manager>>, headers: HeaderMap) -> Response {
    if let Some(id) = super::session::presented(&headers) {
        m.sessions.close(&id);
    }
    see_admin(super::session::clear_cookie(m.secure()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_lists_children_under_their_parents_with_their_counts() {
        let mut dir = crate::core::settings::Directory::default();
        dir.put_group("lab", "default").unwrap();
        dir.put_group("b-office", "default").unwrap();
        dir.put_group("lab-2", "lab").unwrap();
        let counts = BTreeMap::from([("lab-2".to_string(), (5, 2)), ("default".into(), (1, 0))]);
        let rows = group_tree(&dir, &counts);
        let names: Vec<(&str, usize)> = rows.iter().map(|r| (r.name.as_str(), r.depth)).collect();
        assert_eq!(
            names,
            vec![("default", 0), ("b-office", 1), ("lab", 1), ("lab-2", 2)]
        );
        assert_eq!((rows[3].clients, rows[3].overdue), (5, 2));
        assert_eq!(rows[2].clients, 0);
    }
}
