//! Reload: the node's part of re-reading its config file (SIGHUP, `systemctl reload`).
//!
//! Owns which keys take effect at once ([`LIVE`]: the node token with its previous value, the
//! upstream list with its tokens, proxy and CA file, the TLS certificate and key, the disk
//! budget and its watermarks, the WAN and LAN bandwidth budgets, the log filter, every
//! `[limits]` key but `limits.threads`, for connections and push streams from then on) and
//! applying them: what can fail (a token file, a certificate, a proxy URL, a CA file) is read
//! first, so a bad file changes nothing. A new upstream list is swapped whole: fetches in
//! flight finish on the server they started with, the push stream reconnects, and a sync
//! follows at once. Every other changed key keeps its running value
//! until a restart, and the caller logs it by name. It must never apply half a reload.

use super::{evict, upstream_list, Node, NodeError};
use crate::core::config::{plan_reload, NodeConfig, ReloadPlan};
use crate::http::auth::{self, Token, TokenError};
use crate::http::tls::TlsError;

/// The keys a reload applies at once.
pub const LIVE: &[&str] = &[
    "node.node_token",
    "node.node_token_file",
    "node.node_token_previous",
    "node.tls_cert",
    "node.tls_key",
    "upstream.servers",
    "upstream.token",
    "upstream.token_file",
    "upstream.proxy",
    "upstream.ca_file",
    "cache.max_bytes",
    "cache.high_watermark_percent",
    "cache.low_watermark_percent",
    "cache.min_free_bytes",
    "upstream.max_bytes_per_sec",
    "serve.max_bytes_per_sec",
    "log.level",
    // [limits], each key but limits.threads (the serving threads are built at start).
    "limits.max_header_bytes",
    "limits.header_read_timeout_s",
    "limits.max_connections",
    "limits.max_connections_per_address",
    "limits.max_streams_per_address",
    "limits.new_clients_per_minute",
    "limits.body_read_timeout_s",
    "limits.stream_write_timeout_s",
    "limits.stream_max_age_s",
];

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("node.node_token: {0}")]
    Token(#[from] TokenError),
    #[error("node.tls_cert / node.tls_key: {0}")]
    Tls(#[from] TlsError),
    /// The list itself: a bad URL (`upstream.servers: ...`) or token file (`token: ...`).
    #[error("{0}")]
    Upstream(Box<NodeError>),
    /// The client for it: the CA file or the proxy (the message names the key).
    #[error("{0}")]
    UpstreamClient(#[from] crate::node::upstream::UpstreamError),
    #[error("the running config is unreadable (a panic held its lock)")]
    Poisoned,
}

impl Node {
    /// Applies what of `new` can change live and returns what changed; on an error nothing
    /// changed.
    pub fn reload(&self, new: &NodeConfig) -> Result<ReloadPlan, ReloadError> {
        let mut running = self.running.lock().map_err(|_| ReloadError::Poisoned)?;
        let mut plan = plan_reload(&*running, new, LIVE);
        let tls_keys = ["node.tls_cert", "node.tls_key"];
        let tls_changed = plan.live.iter().any(|k| tls_keys.contains(&k.as_str()));
        let swap_certs = match &self.certs {
            Some(certs) if tls_changed && !new.node.tls_cert.is_empty() => Some(certs),
            _ => {
                if tls_changed {
                    plan.live.retain(|k| !tls_keys.contains(&k.as_str()));
                    plan.restart.extend(tls_keys.iter().map(|k| k.to_string()));
                }
                None
            }
        };
        let n = &new.node;
        let token = auth::resolve(
            &n.node_token,
            &n.node_token_file,
            &running.node.data_dir,
            "node",
        )?;
        let upstream_keys = [
            "upstream.servers",
            "upstream.token",
            "upstream.token_file",
            "upstream.proxy",
            "upstream.ca_file",
        ];
        // Built at every reload, since a token file may hold a new token under the same path
        // (a rotation); put in force when a key changed or a token did.
        let keys_changed = plan
            .live
            .iter()
            .any(|k| upstream_keys.contains(&k.as_str()));
        let list = upstream_list(new).map_err(|e| ReloadError::Upstream(Box::new(e)))?;
        let prepared = self.upstream.prepare(list)?;
        let tokens_changed = self.upstream.tokens_differ(&prepared);
        if tokens_changed && !keys_changed {
            plan.live.push("upstream token file contents".into());
        }
        let new_list = (keys_changed || tokens_changed).then_some(prepared);
        if let Some(certs) = swap_certs {
            certs.reload(
                std::path::Path::new(&n.tls_cert),
                std::path::Path::new(&n.tls_key),
            )?;
            running.node.tls_cert = n.tls_cert.clone();
            running.node.tls_key = n.tls_key.clone();
        }
        if let Some(list) = new_list {
            self.upstream.install(list);
            let (r, u) = (&mut running.upstream, &new.upstream);
            r.servers = u.servers.clone();
            r.token = u.token.clone();
            r.token_file = u.token_file.clone();
            r.proxy = u.proxy.clone();
            r.ca_file = u.ca_file.clone();
            // Sync from the new list now, not at the next interval or push event.
            self.upstream_event.notify_one();
        }
        self.node_token
            .set(token, Token::optional(&n.node_token_previous));
        running.node.node_token = n.node_token.clone();
        running.node.node_token_file = n.node_token_file.clone();
        running.node.node_token_previous = n.node_token_previous.clone();
        let c = &new.cache;
        let budget = evict::Budget::of(c);
        match self.budget.write() {
            Ok(mut b) => *b = budget,
            Err(poisoned) => *poisoned.into_inner() = budget,
        }
        running.cache.max_bytes = c.max_bytes;
        running.cache.high_watermark_percent = c.high_watermark_percent;
        running.cache.low_watermark_percent = c.low_watermark_percent;
        running.cache.min_free_bytes = c.min_free_bytes;
        self.fetches
            .set_limits(new.upstream.max_bytes_per_sec, c.min_free_bytes);
        running.upstream.max_bytes_per_sec = new.upstream.max_bytes_per_sec;
        self.served.lan.set_rate(new.serve.max_bytes_per_sec);
        running.serve.max_bytes_per_sec = new.serve.max_bytes_per_sec;
        running.log.level = new.log.level.clone();
        // A smaller budget evicts now, not at the next stored blob.
        self.fetches.stored.notify_one();
        // === [limits]: for connections and push streams from now on ===
        crate::serve::set_limits(
            &self.served,
            &self.serving,
            &mut running.limits,
            &new.limits,
        );
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    /// A `[limits]` key added later is live or named restart-only on purpose, not by omission.
    #[test]
    fn every_limits_key_but_threads_is_live() {
        let section = toml::Value::try_from(crate::core::config::LimitsSection::default());
        let keys = section.unwrap().as_table().unwrap().clone();
        for key in keys.keys().map(|k| format!("limits.{k}")) {
            let live = super::LIVE.contains(&key.as_str());
            assert_eq!(live, key != "limits.threads", "{key}");
        }
    }
}
