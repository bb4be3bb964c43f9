//! An agent's download round: the catalog, then each item it lacks, at its slot, checked.
//!
//! Owns [`round`]: `GET /v1/catalog`, then for every item whose digest the agent does not hold
//! under that name, a wait for the download slot (urgent items never wait), then the new
//! version: rebuilt from a delta when the agent holds an older version of that name (see
//! `rebuild`, which says which delta and rebuilds), else, or when the delta fails in any way,
//! the full blob in the same round; each body comes through `download`. It must never
//! install bytes it has not checked against the catalog's digest of the item (a delta is never
//! trusted, only what it rebuilds once its SHA-256 matches), and never touch the agent's saved
//! state: it returns what it installed and how, and the loop records it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::time::Instant;

use super::ctx::{backoff, net_kind, status_kind, Ctx, REQUEST_TIMEOUT};
use super::download::{download, is_digest, Body, Got, Kind, Want};
use super::home::{safe_name, DeltaCounts, Held};
use super::rebuild::{by_delta, choose, Fail, Plan, Via};
use super::wire::Catalog;

/// What a round did.
#[derive(Debug, Default)]
pub struct Round {
    /// The catalog revision it worked from (none: no catalog).
    pub revision: Option<u64>,
    /// Items installed: name and what it now holds.
    pub installed: Vec<(String, Held)>,
    /// Digests that failed this round.
    pub failed: Vec<String>,
    /// Whether the agent was stopped before the round ended.
    pub stopped: bool,
    /// How this round's versions came: full blobs, deltas, fallbacks.
    pub deltas: DeltaCounts,
}

/// One round against `bases` (the server in use first).
pub async fn round(
    ctx: Arc<Ctx>,
    bases: Vec<String>,
    slot_at: Option<Instant>,
    have: BTreeMap<String, Held>,
    given_up: HashSet<String>,
) -> Round {
    let mut out = Round::default();
    let Some(catalog) = fetch_catalog(&ctx, &bases).await else {
        out.stopped = ctx.stop.is_cancelled();
        return out;
    };
    out.revision = Some(catalog.revision);
    let mut names = HashSet::new();
    for item in catalog.items {
        let sha = item.sha256.to_ascii_lowercase();
        if !names.insert(item.name.clone()) || given_up.contains(&sha) {
            continue;
        }
        if have.get(&item.name).is_some_and(|h| h.sha256 == sha) {
            continue;
        }
        if !safe_name(&item.name) || !is_digest(&sha) {
            tracing::warn!(name = %item.name, "skipping a catalog item whose name or digest cannot be a file");
            ctx.obs.error("bad_item");
            out.failed.push(sha);
            continue;
        }
        if !item.urgent {
            if let Some(at) = slot_at {
                let wait = at.saturating_duration_since(Instant::now());
                if !wait.is_zero() && !ctx.nap(wait).await {
                    out.stopped = true;
                    return out;
                }
            }
        }
        let held = have.get(&item.name);
        let plan = choose(&ctx, &item, &sha, held);
        let mut via = Via::Full;
        let mut rebuild_ms = None;
        let mut got = None;
        if let (Some(held), Plan::Listed(_) | Plan::Edge) = (held, &plan) {
            match by_delta(&ctx, &bases, &item, &sha, catalog.revision, held, &plan).await {
                Ok(d) => {
                    via = d.via;
                    rebuild_ms = Some(d.took.as_millis() as u64);
                    match via {
                        Via::EdgeDelta => {
                            out.deltas.via_edge_delta += 1;
                            out.deltas.edge_delta_bytes += d.delta_len;
                        }
                        _ => {
                            out.deltas.via_delta += 1;
                            out.deltas.delta_bytes += d.delta_len;
                        }
                    }
                    got = Some(Got::Ok(Body {
                        len: d.size,
                        kept: None,
                    }));
                }
                Err(Fail::Stopped) => {
                    out.stopped = true;
                    return out;
                }
                Err(Fail::NoDelta) => {
                    tracing::info!(name = %item.name, from = %held.sha256, to = %sha, "the server has no delta from the version held; taking the full blob");
                    ctx.obs.no_delta();
                    out.deltas.no_delta += 1;
                }
                Err(Fail::Failed { kind, why, wasted }) => {
                    tracing::warn!(name = %item.name, from = %held.sha256, to = %sha, tried = plan.via().as_str(), reason = %why, "the delta did not give the new version; taking the full blob");
                    ctx.obs.delta_fallback(kind, wasted);
                    out.deltas.fallbacks += 1;
                    out.deltas.wasted_delta_bytes += wasted;
                    out.deltas.last_fallback = Some(format!(
                        "{} {}: {why}",
                        item.name,
                        item.version.as_deref().unwrap_or(&sha)
                    ));
                }
            }
        }
        let got = match got {
            Some(g) => g,
            None => {
                let want = Want {
                    path: format!("/v1/content/{sha}"),
                    digest: Some(&sha),
                    limit: item.size,
                    keep: false,
                    kind: Kind::Full,
                    received: AtomicU64::new(0),
                };
                let g = download(&ctx, &bases, &want, &item.name, catalog.revision).await;
                if let Got::Ok(b) = &g {
                    ctx.obs.downloaded(b.len);
                    out.deltas.via_full += 1;
                    out.deltas.full_bytes += b.len;
                }
                g
            }
        };
        match got {
            Got::Ok(body) => {
                let old = held.map(|h| h.sha256.clone());
                match ctx.home.install(&item.name, &sha, old.as_deref()) {
                    Ok(()) => {
                        tracing::info!(name = %item.name, sha256 = %sha, size = body.len, via = via.as_str(), rebuild_ms, "installed");
                        out.installed.push((
                            item.name.clone(),
                            Held {
                                sha256: sha,
                                version: item.version.clone(),
                                size: body.len,
                            },
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(name = %item.name, error = %e, "cannot install a checked download");
                        ctx.obs.error("install");
                        out.failed.push(sha);
                    }
                }
            }
            Got::Failed | Got::Mismatch | Got::NoDelta | Got::TooLarge => {
                ctx.obs.download_failed();
                out.failed.push(sha);
            }
            Got::Stopped => {
                out.stopped = true;
                return out;
            }
        }
    }
    out
}

async fn fetch_catalog(ctx: &Ctx, bases: &[String]) -> Option<Catalog> {
    for (attempt, base) in bases
        .iter()
        .cycle()
        .take(bases.len().max(1) * 2)
        .enumerate()
    {
        if ctx.stop.is_cancelled() {
            return None;
        }
        let t0 = Instant::now();
        let sent = ctx
            .http
            .get(format!("{base}/v1/catalog"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                ctx.obs.latency(t0.elapsed());
                match r.json::<Catalog>().await {
                    Ok(c) => return Some(c),
                    Err(e) => ctx.obs.error(if e.is_decode() {
                        "catalog_json"
                    } else {
                        net_kind(&e)
                    }),
                }
            }
            Ok(r) => ctx.obs.error(&status_kind("catalog", r.status())),
            Err(e) => ctx.obs.error(net_kind(&e)),
        }
        if !ctx.nap(backoff(attempt as u32 + 1)).await {
            return None;
        }
    }
    None
}
