//! Getting a new version of an item from the version an agent holds: which delta, then the
//! delta's download and the rebuild.
//!
//! Owns [`choose`] (the catalog's delta from the version held, else an edge delta asked of the
//! server, `GET /v1/delta/{held}/{new}`, else the full blob; always the full blob with deltas
//! off, for items over `patch::MAX_DELTA_ITEM`, or when the version held cannot be read) and
//! [`by_delta`]: the delta's download (through `download::download`, like any blob: a listed
//! delta is checked against its own SHA-256 and resumed with `Range`; an edge delta is cut off
//! past half the item's size), then the rebuild on a blocking thread under the process's
//! [`Rebuilds`](super::ctx::Rebuilds) bounds (so many at once, so many delta bytes in memory),
//! the rebuilt version's SHA-256 checked against the catalog, and the checked bytes written as
//! the item's partial, ready to install. Every way it can fail is a [`Fail`] that says why;
//! the caller then takes the full blob in the same round. It must never hand on a version
//! whose SHA-256 it did not check, never keep more than its bounds in memory, and never
//! install or record anything itself (`fetch` installs, the loop records).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::ctx::Ctx;
use super::download::{download, is_digest, Got, Kind, Want};
use super::home::Held;
use super::patch::{self, PatchError, MAX_DELTA_ITEM};
use super::wire::{CatalogItem, DeltaRef};

/// How an item is to be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The full blob.
    Full,
    /// The delta the catalog lists from the version held (its digests in lower case).
    Listed(DeltaRef),
    /// A delta asked of the server from the version held.
    Edge,
}

impl Plan {
    /// How the version arrives if this plan works.
    pub fn via(&self) -> Via {
        match self {
            Plan::Full => Via::Full,
            Plan::Listed(_) => Via::Delta,
            Plan::Edge => Via::EdgeDelta,
        }
    }
}

/// How an installed version arrived (the `via` of the install's log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Full,
    Delta,
    EdgeDelta,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Full => "full",
            Via::Delta => "delta",
            Via::EdgeDelta => "edge delta",
        }
    }
}

/// A version rebuilt from a delta, checked and written as its partial.
#[derive(Debug)]
pub struct Rebuilt {
    pub via: Via,
    /// The new version's size.
    pub size: u64,
    /// The delta's size.
    pub delta_len: u64,
    /// Decoding and hashing.
    pub took: Duration,
}

/// Why a delta did not give the new version.
#[derive(Debug)]
pub enum Fail {
    /// The agent is stopping.
    Stopped,
    /// The server has no edge delta (404): not a failure, the full blob is the way.
    NoDelta,
    /// The delta failed: `kind` for counting (`delta_download`, `delta_digest`,
    /// `delta_too_large`, `delta_decode`, `delta_size`, `delta_rebuilt_digest`,
    /// `delta_reference`, `delta_io`), `why` for the log, `wasted` delta bytes that arrived.
    Failed {
        kind: &'static str,
        why: String,
        wasted: u64,
    },
}

fn failed(kind: &'static str, why: impl Into<String>, wasted: u64) -> Fail {
    Fail::Failed {
        kind,
        why: why.into(),
        wasted,
    }
}

/// The plan for `item` (digest `sha`) given the version `held` of its name, if any.
pub fn choose(ctx: &Ctx, item: &CatalogItem, sha: &str, held: Option<&Held>) -> Plan {
    let readable = |h: &Held| ctx.home.can_give(&item.name, h, MAX_DELTA_ITEM);
    plan(item, sha, held, ctx.knobs.use_deltas, readable)
}

/// [`choose`] without the agent: `readable` says whether the bytes of the version held can be
/// had to rebuild from.
pub fn plan(
    item: &CatalogItem,
    sha: &str,
    held: Option<&Held>,
    use_deltas: bool,
    readable: impl FnOnce(&Held) -> bool,
) -> Plan {
    let Some(held) = held.filter(|h| h.sha256 != sha) else {
        return Plan::Full;
    };
    let Some(size) = item.size.filter(|s| *s > 0 && *s <= MAX_DELTA_ITEM) else {
        return Plan::Full;
    };
    if !use_deltas || !readable(held) {
        return Plan::Full;
    }
    let listed = item
        .deltas
        .iter()
        .find(|d| d.from_sha256.eq_ignore_ascii_case(&held.sha256));
    match listed {
        Some(d) => {
            let d = DeltaRef {
                from_sha256: d.from_sha256.to_ascii_lowercase(),
                sha256: d.sha256.to_ascii_lowercase(),
                size: d.size,
            };
            // A listed delta that is no blob name, empty, or over half the item is not worth
            // the trouble (the servers list none such).
            if is_digest(&d.sha256) && d.size > 0 && d.size <= size / 2 {
                Plan::Listed(d)
            } else {
                Plan::Full
            }
        }
        None => Plan::Edge,
    }
}

/// Rebuilds `item` (digest `sha`) from `held` by the delta `plan` names.
pub async fn by_delta(
    ctx: &Ctx,
    bases: &[String],
    item: &CatalogItem,
    sha: &str,
    rev: u64,
    held: &Held,
    plan: &Plan,
) -> Result<Rebuilt, Fail> {
    let Some(size) = item.size else {
        return Err(failed("delta_size", "the catalog gives no size", 0));
    };
    let (want, via) = match plan {
        Plan::Full => return Err(failed("delta_internal", "no delta planned", 0)),
        Plan::Listed(d) => (
            Want {
                path: format!("/v1/content/{}", d.sha256),
                digest: Some(&d.sha256),
                limit: Some(d.size),
                keep: true,
                kind: Kind::Delta,
                received: AtomicU64::new(0),
            },
            Via::Delta,
        ),
        Plan::Edge => (
            Want {
                path: format!("/v1/delta/{}/{sha}", held.sha256),
                digest: None,
                limit: Some(size / 2),
                keep: true,
                kind: Kind::Edge,
                received: AtomicU64::new(0),
            },
            Via::EdgeDelta,
        ),
    };
    let limits = ctx.rebuilds.clone();
    let kib = limits.kib_of(want.limit.unwrap_or(size / 2));
    // Room in memory for the delta, held until its rebuild is over.
    let room = tokio::select! {
        _ = ctx.stop.cancelled() => return Err(Fail::Stopped),
        r = limits.memory.acquire_many(kib) => r,
    };
    let Ok(room) = room else {
        return Err(failed("delta_internal", "the rebuild bounds are closed", 0));
    };
    let got = download(ctx, bases, &want, &item.name, rev).await;
    let wasted = want.received();
    let delta = match got {
        Got::Ok(body) => match body.kept {
            Some(bytes) => bytes,
            None => return Err(failed("delta_internal", "the delta was not kept", wasted)),
        },
        Got::Stopped => return Err(Fail::Stopped),
        Got::NoDelta => return Err(Fail::NoDelta),
        Got::TooLarge => {
            return Err(failed(
                "delta_too_large",
                format!("the delta runs past half the item ({} bytes)", size / 2),
                wasted,
            ))
        }
        Got::Mismatch => {
            return Err(failed(
                "delta_digest",
                "the delta's bytes do not match its SHA-256 on any server",
                wasted,
            ))
        }
        Got::Failed => {
            if let Some(d) = want.digest {
                ctx.home.discard_partial(d);
            }
            return Err(failed(
                "delta_download",
                "the delta could not be downloaded",
                wasted,
            ));
        }
    };
    let delta_len = delta.len() as u64;
    let cpu = tokio::select! {
        _ = ctx.stop.cancelled() => return Err(Fail::Stopped),
        p = limits.cpu.acquire() => p,
    };
    let Ok(cpu) = cpu else {
        return Err(failed(
            "delta_internal",
            "the rebuild bounds are closed",
            wasted,
        ));
    };
    let (home, name, held2, want_sha) = (
        ctx.home.clone(),
        item.name.clone(),
        held.clone(),
        sha.to_string(),
    );
    let done = tokio::task::spawn_blocking(move || {
        let old = home
            .held_bytes(&name, &held2, MAX_DELTA_ITEM)
            .map_err(|e| failed("delta_reference", format!("the version held: {e}"), wasted))?;
        let t0 = std::time::Instant::now();
        let new = patch::apply(&old, &delta, size).map_err(|e| {
            let kind = match e {
                PatchError::WrongSize { .. } | PatchError::TooLarge(_) => "delta_size",
                PatchError::NotAFrame | PatchError::Zstd(_) => "delta_decode",
            };
            failed(kind, e.to_string(), wasted)
        })?;
        drop((old, delta));
        let digest = hex::encode(Sha256::digest(&new));
        let took = t0.elapsed();
        if digest != want_sha {
            return Err(failed(
                "delta_rebuilt_digest",
                format!("the rebuilt version's SHA-256 is {digest}, the catalog's {want_sha}"),
                wasted,
            ));
        }
        home.write_partial(&want_sha, &new)
            .map_err(|e| failed("delta_io", e.to_string(), wasted))?;
        Ok(took)
    })
    .await;
    drop(cpu);
    drop(room);
    if let Some(d) = want.digest {
        ctx.home.discard_partial(d);
    }
    let took = match done {
        Ok(r) => r?,
        Err(e) => return Err(failed("delta_internal", e.to_string(), wasted)),
    };
    ctx.obs.delta_used(delta_len, via == Via::EdgeDelta, took);
    Ok(Rebuilt {
        via,
        size,
        delta_len,
        took,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex64(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn item(deltas: Vec<DeltaRef>) -> CatalogItem {
        CatalogItem {
            name: "defs.bin".into(),
            version: Some("2".into()),
            sha256: hex64('b'),
            size: Some(1000),
            urgent: false,
            deltas,
        }
    }

    fn held(c: char) -> Held {
        Held {
            sha256: hex64(c),
            version: Some("1".into()),
            size: 990,
        }
    }

    fn listed(from: char, size: u64) -> DeltaRef {
        DeltaRef {
            from_sha256: hex64(from),
            sha256: hex64('d'),
            size,
        }
    }

    #[test]
    fn a_listed_delta_from_the_version_held_is_taken() {
        let it = item(vec![listed('9', 10), listed('a', 40)]);
        let p = plan(&it, &hex64('b'), Some(&held('a')), true, |_| true);
        assert_eq!(p, Plan::Listed(listed('a', 40)));
        // Upper-case digests in the catalog match and are lowered.
        let mut up = listed('a', 40);
        up.from_sha256 = up.from_sha256.to_ascii_uppercase();
        up.sha256 = up.sha256.to_ascii_uppercase();
        let p = plan(&item(vec![up]), &hex64('b'), Some(&held('a')), true, |_| {
            true
        });
        assert_eq!(p, Plan::Listed(listed('a', 40)));
    }

    #[test]
    fn a_version_the_catalog_lists_no_delta_from_asks_for_an_edge_delta() {
        let it = item(vec![listed('9', 10)]);
        assert_eq!(
            plan(&it, &hex64('b'), Some(&held('a')), true, |_| true),
            Plan::Edge
        );
        assert_eq!(
            plan(&item(vec![]), &hex64('b'), Some(&held('a')), true, |_| true),
            Plan::Edge
        );
    }

    #[test]
    fn the_full_blob_when_nothing_is_held_deltas_are_off_or_the_version_cannot_be_read() {
        let it = item(vec![listed('a', 40)]);
        let sha = hex64('b');
        assert_eq!(plan(&it, &sha, None, true, |_| true), Plan::Full);
        assert_eq!(
            plan(&it, &sha, Some(&held('a')), false, |_| true),
            Plan::Full
        );
        assert_eq!(
            plan(&it, &sha, Some(&held('a')), true, |_| false),
            Plan::Full
        );
        // Already held.
        assert_eq!(
            plan(&it, &sha, Some(&held('b')), true, |_| true),
            Plan::Full
        );
    }

    #[test]
    fn the_full_blob_for_items_without_a_size_or_beyond_the_bound_or_a_bad_listed_delta() {
        let sha = hex64('b');
        let h = held('a');
        let mut it = item(vec![listed('a', 40)]);
        it.size = None;
        assert_eq!(plan(&it, &sha, Some(&h), true, |_| true), Plan::Full);
        it.size = Some(MAX_DELTA_ITEM + 1);
        assert_eq!(plan(&it, &sha, Some(&h), true, |_| true), Plan::Full);
        it.size = Some(0);
        assert_eq!(plan(&it, &sha, Some(&h), true, |_| true), Plan::Full);
        // Over half the item, empty, or not a digest.
        for d in [
            listed('a', 501),
            listed('a', 0),
            DeltaRef {
                sha256: "../../etc/passwd".into(),
                ..listed('a', 40)
            },
        ] {
            assert_eq!(
                plan(&item(vec![d]), &sha, Some(&h), true, |_| true),
                Plan::Full
            );
        }
        // Exactly half is listed.
        assert_eq!(
            plan(&item(vec![listed('a', 500)]), &sha, Some(&h), true, |_| {
                true
            }),
            Plan::Listed(listed('a', 500))
        );
    }
}
