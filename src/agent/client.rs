//! The agent's loop: what one client does with every communications setting.
//!
//! Owns [`Agent`]: a heartbeat at start and then every interval (jittered by up to 5%), to the
//! first server that answers (see `servers`); the settings each reply carries and what they
//! change: `communication_enabled` off leaves only a settings check per interval;
//! `download_policies_and_content` off stops policy and content downloads; `mode` push holds
//! the stream (see `stream`) and acts on an event with a heartbeat at once; new content waits
//! for the download slot (see `fetch`); critical events go at once when the rule says so (a
//! look at the spool every second), the rest right after the next heartbeat; applications are
//! reported when learning turns on and when they change. The saved state is written after
//! every change. It must never send a request while communication is off (but the settings
//! check), and never let a loop run unbounded: each waits on the interval, a backoff, or the
//! stop token.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{sleep_until, Instant};

use super::apps::Scanner;
use super::comms::{Comms, ConnectionMode};
use super::ctx::{backoff, net_kind, status_kind, Ctx, REQUEST_TIMEOUT};
use super::fetch::{round, Round};
use super::home::{HomeError, Saved};
use super::servers::Servers;
use super::spool::Spool;
use super::stream::{hold, Pushed};
use super::wire::{
    critical_at_once, slot_delay, window_age, AppOut, AppsBody, EventOut, EventsBody,
    HeartbeatBody, HeartbeatReply,
};

/// Heartbeats never come faster than this, whatever the time scale.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
/// How often the spool is looked at for critical events.
const SPOOL_LOOK: Duration = Duration::from_secs(1);
/// Applications in one upload at most.
const APPS_PER_UPLOAD: usize = 1000;
/// Upload batches one flush sends at most (the rest waits for the next).
const FLUSH_BATCHES: usize = 20;

/// A spawned task that is cancelled when its owner is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_job<T>(job: &mut Option<AbortOnDrop<T>>) -> Result<T, JoinError> {
    match job {
        Some(j) => (&mut j.0).await,
        None => std::future::pending().await,
    }
}

/// How an upload went.
enum Sent {
    /// Everything waiting went (or nothing waited).
    All,
    /// Some is left for later: the server did not take it now.
    Later,
}

/// One agent.
pub struct Agent {
    ctx: Arc<Ctx>,
    servers: Servers,
    saved: Saved,
    comms: Comms,
    spool: Arc<Spool>,
    apps_dirs: Vec<PathBuf>,
    scanner: Arc<Mutex<Scanner>>,
    /// Rounds each digest failed in.
    rounds: HashMap<String, u32>,
    /// Digests given up (load test only: `max_item_rounds`).
    given_up: HashSet<String>,
    interval: Duration,
    events_made: bool,
}

impl Agent {
    /// An agent of `ctx` starting from `servers` (checked base URLs, at least one), with the
    /// state its home kept.
    pub fn new(
        ctx: Ctx,
        servers: Vec<String>,
        apps_dirs: Vec<PathBuf>,
    ) -> Result<Agent, HomeError> {
        let mut saved = ctx.home.load()?;
        saved.install_group = ctx.id.install_group.clone();
        saved.location = ctx.id.location.clone();
        saved.login_mode = ctx.id.login_mode.clone();
        saved.user = ctx.id.user.clone();
        let comms = Comms::from_json(&saved.settings);
        let mut servers = Servers::new(servers);
        servers.set_list(&comms.management_servers);
        let spool = Arc::new(Spool::new(ctx.home.root()));
        Ok(Agent {
            interval: Duration::from_secs(comms.heartbeat_interval_s.max(1)),
            ctx: Arc::new(ctx),
            servers,
            saved,
            comms,
            spool,
            apps_dirs,
            scanner: Arc::new(Mutex::new(Scanner::default())),
            rounds: HashMap::new(),
            given_up: HashSet::new(),
            events_made: false,
        })
    }

    /// The agent's spool (a load test or a caller may add events to it).
    pub fn spool(&self) -> Arc<Spool> {
        self.spool.clone()
    }

    /// Runs until the stop token is cancelled.
    pub async fn run(mut self) {
        let ctx = self.ctx.clone();
        let (push_tx, mut push_rx) = mpsc::channel::<Pushed>(16);
        let mut stream: Option<(String, AbortOnDrop<()>)> = None;
        let mut job: Option<AbortOnDrop<Round>> = None;
        let mut next_beat = Instant::now() + ctx.knobs.first_delay;
        let mut failures = 0u32;
        let mut look = tokio::time::interval(SPOOL_LOOK);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = sleep_until(next_beat) => {
                    next_beat = match self.beat(&mut job).await {
                        Some(next) => {
                            failures = 0;
                            next
                        }
                        None => {
                            failures = failures.saturating_add(1);
                            Instant::now() + backoff(failures)
                        }
                    };
                    self.keep_stream(&mut stream, &push_tx);
                }
                Some(ev) = push_rx.recv() => {
                    if self.is_news(&ev) {
                        next_beat = Instant::now();
                    }
                }
                out = wait_job(&mut job) => {
                    job = None;
                    match out {
                        Ok(round) => {
                            if self.finish_round(round) {
                                next_beat = Instant::now();
                            }
                            self.make_events().await;
                        }
                        Err(e) if e.is_cancelled() => {}
                        Err(_) => ctx.obs.error("internal"),
                    }
                }
                _ = look.tick() => {
                    if self.comms.communication_enabled && self.critical_at_once() && self.spool.has_critical() {
                        let _ = self.upload_events(true).await;
                    }
                }
            }
            ctx.obs.settled(self.settled(job.is_none()));
            ctx.obs.current(job.is_none() && self.is_current());
        }
        self.save();
    }

    fn critical_at_once(&self) -> bool {
        critical_at_once(
            self.comms.upload_critical_events_immediately,
            &self.ctx.id.os,
            &self.ctx.id.client_version,
        )
    }

    fn mode(&self) -> ConnectionMode {
        self.ctx.knobs.mode.unwrap_or(self.comms.mode)
    }

    /// The group the agent asks about: the one the server placed it in, else its install
    /// group, else `default`.
    fn group(&self) -> String {
        self.saved
            .group
            .clone()
            .or_else(|| self.ctx.id.install_group.clone())
            .unwrap_or_else(|| "default".into())
    }

    fn save(&mut self) {
        self.saved.server = self.servers.in_use().map(str::to_string);
        self.saved.server_why = self.servers.why().to_string();
        if let Err(e) = self.ctx.home.save(&self.saved) {
            tracing::warn!(error = %e, "cannot write the agent's state; it is kept in memory");
            self.ctx.obs.error("state_io");
        }
    }

    /// Done, for a load test: has every item of the newest revision it knows, has made its
    /// events, and has nothing left to upload.
    fn settled(&self, idle: bool) -> bool {
        idle && self.is_current()
            && (self.ctx.knobs.make_events == 0 || self.events_made)
            && self.spool.is_empty()
    }

    /// Has every item of the newest revision it knows (of a revision above 0).
    fn is_current(&self) -> bool {
        self.saved.known_revision > 0 && self.saved.catalog_revision >= self.saved.known_revision
    }

    /// Whether a pushed event says something the agent does not know yet.
    fn is_news(&mut self, ev: &Pushed) -> bool {
        let group = self.group();
        match ev {
            Pushed::Settings { group: g, serial } => *g == group && *serial != self.comms.serial,
            Pushed::Policy { group: g, serial } => {
                *g == group
                    && *serial != self.saved.policy_serial
                    && self.comms.download_policies_and_content
            }
            Pushed::Catalog { revision } => {
                let newer = *revision > self.saved.known_revision.max(self.saved.catalog_revision);
                if newer {
                    self.saved.known_revision = *revision;
                }
                newer && self.comms.download_policies_and_content
            }
        }
    }

    /// Holds the stream when the mode says push (on the server in use), drops it otherwise.
    fn keep_stream(
        &self,
        stream: &mut Option<(String, AbortOnDrop<()>)>,
        tx: &mpsc::Sender<Pushed>,
    ) {
        let want = match (
            self.comms.communication_enabled,
            self.mode(),
            self.servers.in_use(),
        ) {
            (true, ConnectionMode::Push, Some(base)) => Some(base.to_string()),
            _ => None,
        };
        match (want, stream.as_ref().map(|(b, _)| b.clone())) {
            (Some(base), Some(current)) if base == current => {}
            (Some(base), _) => {
                let task = hold(self.ctx.clone(), base.clone(), tx.clone());
                *stream = Some((base, AbortOnDrop(tokio::spawn(task))));
            }
            (None, _) => *stream = None,
        }
    }

    /// The next heartbeat's moment: the interval, jittered by up to 5%.
    fn after_interval(&self) -> Instant {
        let jitter: f64 = rand::rng().random_range(0.95..1.05);
        Instant::now() + self.interval.mul_f64(jitter).max(MIN_HEARTBEAT)
    }

    fn set_interval(&mut self, secs: f64) {
        let secs = (secs.max(0.0) / self.ctx.knobs.time_scale.max(1.0)).min(86_400.0);
        self.interval = Duration::from_secs_f64(secs).max(MIN_HEARTBEAT);
    }

    /// One heartbeat and what follows it; the next heartbeat's moment, or `None` when no
    /// server answered.
    async fn beat(&mut self, job: &mut Option<AbortOnDrop<Round>>) -> Option<Instant> {
        if !self.comms.communication_enabled {
            *job = None;
            let answered = self.check_settings().await;
            self.save();
            if !answered {
                return None;
            }
            return Some(if self.comms.communication_enabled {
                Instant::now()
            } else {
                self.after_interval()
            });
        }
        let reply = self.heartbeat().await?;
        self.saved.group = reply.group.clone().or(self.saved.group.take());
        self.take_settings(reply.settings.clone());
        self.set_interval(
            reply
                .next_heartbeat_s
                .unwrap_or(self.comms.heartbeat_interval_s as f64),
        );
        let window = if self.comms.randomization_enabled {
            self.comms.window_s
        } else {
            0
        };
        self.ctx.obs.heartbeat(self.interval, window, self.mode());
        self.saved.known_revision = self.saved.known_revision.max(reply.catalog_revision);
        if !self.comms.communication_enabled {
            *job = None;
            self.save();
            return Some(self.after_interval());
        }
        let _ = self.upload_events(false).await;
        self.report_apps().await;
        if self.comms.download_policies_and_content {
            if reply.policy_serial != self.saved.policy_serial {
                self.fetch_policy().await;
            }
            if job.is_none() && reply.catalog_revision > self.saved.catalog_revision {
                self.saved.slot = reply.download_slot.clone().filter(|s| {
                    s.catalog_revision == 0 || s.catalog_revision == reply.catalog_revision
                });
                let slot_at = self
                    .saved
                    .slot
                    .as_ref()
                    .map(|s| Instant::now() + slot_delay(s, chrono::Utc::now()));
                let now = chrono::Utc::now();
                self.ctx.obs.learned(
                    reply.catalog_revision,
                    self.saved.slot.as_ref().and_then(|s| s.window_s),
                    self.saved.slot.as_ref().and_then(|s| window_age(s, now)),
                );
                let task = round(
                    self.ctx.clone(),
                    self.servers.in_use_first(),
                    slot_at,
                    self.saved.items.clone(),
                    self.given_up.clone(),
                );
                *job = Some(AbortOnDrop(tokio::spawn(task)));
            }
        } else {
            *job = None;
        }
        if job.is_none() {
            self.make_events().await;
        }
        self.save();
        Some(self.after_interval())
    }

    fn take_settings(&mut self, settings: serde_json::Value) {
        if settings.is_object() {
            let before = self.comms.clone();
            self.comms = Comms::from_json(&settings);
            self.saved.settings = settings;
            self.servers.set_list(&self.comms.management_servers);
            if before.learn_applications && !self.comms.learn_applications {
                // Reported again in full when learning comes back on.
                self.saved.apps_reported = None;
            }
            if before != self.comms {
                tracing::info!(serial = self.comms.serial, mode = %self.comms.mode, communication_enabled = self.comms.communication_enabled, downloads = self.comms.download_policies_and_content, "settings");
            }
        }
    }

    /// `POST /v1/heartbeat` to the first server that answers.
    async fn heartbeat(&mut self) -> Option<HeartbeatReply> {
        let ctx = self.ctx.clone();
        let credential = ctx.credential();
        let body = HeartbeatBody {
            enroll_token: ctx.enroll_token.as_deref().filter(|_| credential.is_none()),
            client_id: &ctx.client_id,
            install_group: ctx.id.install_group.as_deref(),
            location: ctx.id.location.as_deref(),
            os: &ctx.id.os,
            client_version: &ctx.id.client_version,
            mode: &ctx.id.login_mode,
            user: ctx.id.user.as_deref(),
            policy_serial: self.saved.policy_serial,
            catalog_revision: self.saved.catalog_revision,
            sent_at: chrono::Utc::now(),
        };
        for base in self.servers.candidates() {
            let t0 = Instant::now();
            let sent = ctx
                .signed(ctx.http.post(format!("{base}/v1/heartbeat")))
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    ctx.obs.error(net_kind(&e));
                    self.servers.failed(&base);
                    continue;
                }
            };
            ctx.obs.latency(t0.elapsed());
            let status = resp.status();
            if !status.is_success() {
                ctx.obs.error(&status_kind("heartbeat", status));
                if status.is_server_error() || status.as_u16() == 429 {
                    self.servers.failed(&base);
                    continue;
                }
                refused(&base, status, resp).await;
                return None;
            }
            match resp.json::<HeartbeatReply>().await {
                Ok(mut reply) => {
                    self.servers.answered(&base);
                    if let Some(c) = reply.credential.take() {
                        tracing::info!(server = %base, "enrolled; the credential is kept in the data dir");
                        ctx.set_credential(c);
                    }
                    return Some(reply);
                }
                Err(e) => {
                    ctx.obs.error(if e.is_decode() {
                        "heartbeat_json"
                    } else {
                        net_kind(&e)
                    });
                    self.servers.failed(&base);
                }
            }
        }
        None
    }

    /// With communication off: `GET /v1/groups/{g}/settings?location=L`, to learn when it
    /// comes back on. True when a server answered.
    async fn check_settings(&mut self) -> bool {
        let ctx = self.ctx.clone();
        let group = self.group();
        for base in self.servers.candidates() {
            let mut req = ctx
                .http
                .get(format!("{base}/v1/groups/{group}/settings"))
                .timeout(REQUEST_TIMEOUT);
            if let Some(l) = &ctx.id.location {
                req = req.query(&[("location", l.as_str())]);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                    Ok(v) => {
                        self.servers.answered(&base);
                        self.take_settings(v);
                        let secs = self.comms.heartbeat_interval_s as f64;
                        self.set_interval(secs);
                        return true;
                    }
                    Err(e) => ctx.obs.error(net_kind(&e)),
                },
                Ok(r) => ctx.obs.error(&status_kind("settings", r.status())),
                Err(e) => ctx.obs.error(net_kind(&e)),
            }
            self.servers.failed(&base);
        }
        false
    }

    /// `GET /v1/groups/{g}/policy` from the server in use, written to `policy.json`.
    async fn fetch_policy(&mut self) {
        let ctx = self.ctx.clone();
        let group = self.group();
        let Some(base) = self.servers.in_use().map(str::to_string) else {
            return;
        };
        let resp = ctx
            .http
            .get(format!("{base}/v1/groups/{group}/policy"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let bytes = match resp {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    ctx.obs.error(net_kind(&e));
                    return;
                }
            },
            Ok(r) => {
                ctx.obs.error(&status_kind("policy", r.status()));
                return;
            }
            Err(e) => {
                ctx.obs.error(net_kind(&e));
                return;
            }
        };
        let serial = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("serial").and_then(serde_json::Value::as_u64));
        let Some(serial) = serial else {
            ctx.obs.error("policy_json");
            return;
        };
        match ctx.home.write_policy(&bytes) {
            Ok(()) => {
                tracing::info!(group = %group, serial, "policy");
                self.saved.policy_serial = serial;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the policy");
                ctx.obs.error("policy_io");
            }
        }
    }

    /// Records a finished round; true when a newer revision waits (heartbeat at once).
    fn finish_round(&mut self, out: Round) -> bool {
        self.saved.deltas.add(&out.deltas);
        for (name, held) in out.installed {
            self.saved.items.insert(name, held);
        }
        let mut retry = false;
        for sha in out.failed {
            let r = self.rounds.entry(sha.clone()).or_insert(0);
            *r += 1;
            match self.ctx.knobs.max_item_rounds {
                Some(max) if *r >= max => {
                    self.given_up.insert(sha);
                }
                _ => retry = true,
            }
        }
        let mut newer = false;
        if let Some(rev) = out.revision {
            self.saved.known_revision = self.saved.known_revision.max(rev);
            if !retry && !out.stopped {
                // The slot stays in the state (and `agent status`) until the next revision's.
                self.saved.catalog_revision = self.saved.catalog_revision.max(rev);
                newer = self.saved.known_revision > self.saved.catalog_revision;
            }
        }
        self.save();
        newer
    }

    /// Load test only: once, when the agent first has nothing left to download, it makes
    /// its events (the first critical) and spools them; a critical one goes at once when the
    /// rule says so.
    async fn make_events(&mut self) {
        let n = self.ctx.knobs.make_events;
        if n == 0
            || self.events_made
            || self.saved.known_revision == 0
            || self.saved.catalog_revision < self.saved.known_revision
        {
            return;
        }
        self.events_made = true;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for i in 0..n {
            let (kind, subkind) = if i == 0 {
                ("risk", "virus")
            } else {
                ("system_change", "loadtest")
            };
            let ev = EventOut {
                id: format!("{}-{i}", self.ctx.client_id),
                kind: kind.into(),
                subkind: subkind.into(),
                time: now.clone(),
                data: serde_json::json!({"loadtest": true, "seq": i}),
            };
            if self.spool.add(ev).is_err() {
                self.ctx.obs.error("events_dropped");
            }
        }
        if self.critical_at_once() {
            let _ = self.upload_events(true).await;
        }
    }

    /// Uploads spooled events (only the critical ones when `critical_only`) to the server in
    /// use; each batch's events leave the spool only after its 202.
    async fn upload_events(&mut self, critical_only: bool) -> Sent {
        let ctx = self.ctx.clone();
        let Some(base) = self.servers.in_use().map(str::to_string) else {
            return Sent::Later;
        };
        for _ in 0..FLUSH_BATCHES {
            let batch = self.spool.batch(critical_only);
            if batch.is_empty() {
                return Sent::All;
            }
            let (keys, events): (Vec<_>, Vec<EventOut>) = batch.into_iter().unzip();
            let body = EventsBody {
                client_id: &ctx.client_id,
                events: &events,
            };
            let t0 = Instant::now();
            let sent = ctx
                .signed(ctx.http.post(format!("{base}/v1/events")))
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    ctx.obs.latency(t0.elapsed());
                    self.spool.remove(&keys);
                    ctx.obs.events_sent(events.len() as u64);
                }
                // Not this client's fault, nor its events': kept for a later try.
                Ok(r) if r.status().as_u16() == 401 => {
                    ctx.obs.error(&status_kind("events", r.status()));
                    refused(&base, r.status(), r).await;
                    return Sent::Later;
                }
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    ctx.obs.error(&status_kind("events", r.status()));
                    tracing::warn!(server = %base, status = %r.status(), events = keys.len(), "events refused; set aside in spool/bad");
                    self.spool.reject(&keys);
                }
                Ok(r) => {
                    ctx.obs.error(&status_kind("events", r.status()));
                    return Sent::Later;
                }
                Err(e) => {
                    ctx.obs.error(net_kind(&e));
                    return Sent::Later;
                }
            }
        }
        Sent::Later
    }

    /// With learning on: the executables under `--apps-dir`, when learning turned on or they
    /// changed since the last report.
    async fn report_apps(&mut self) {
        if !self.comms.learn_applications || self.apps_dirs.is_empty() {
            return;
        }
        let Some(base) = self.servers.in_use().map(str::to_string) else {
            return;
        };
        let scanner = self.scanner.clone();
        let dirs = self.apps_dirs.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let mut s = scanner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            s.scan(&dirs)
        })
        .await;
        let Ok((apps, fingerprint)) = scanned else {
            self.ctx.obs.error("internal");
            return;
        };
        if self.saved.apps_reported.as_deref() == Some(fingerprint.as_str()) {
            return;
        }
        let ctx = self.ctx.clone();
        for chunk in apps
            .chunks(APPS_PER_UPLOAD)
            .chain(apps.is_empty().then_some(&[] as &[AppOut]))
        {
            let body = AppsBody {
                client_id: &ctx.client_id,
                applications: chunk,
            };
            let sent = ctx
                .signed(ctx.http.post(format!("{base}/v1/applications")))
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    ctx.obs.error(&status_kind("applications", r.status()));
                    tracing::info!(status = %r.status(), "applications not taken; reported again later");
                    return;
                }
                Err(e) => {
                    ctx.obs.error(net_kind(&e));
                    return;
                }
            }
        }
        tracing::info!(applications = apps.len(), "applications reported");
        self.saved.apps_reported = Some(fingerprint);
    }
}

/// Logs a refusal with the server's own words (its JSON `message`), once per answer.
async fn refused(base: &str, status: reqwest::StatusCode, resp: reqwest::Response) {
    let message = resp
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| {
            let code = v.get("error")?.as_str()?.to_string();
            let why = v.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!("{code}: {why}"))
        })
        .unwrap_or_default();
    tracing::warn!(server = %base, %status, %message, "refused");
}
