//! Reload: the manager's part of re-reading its config file (SIGHUP, `systemctl reload`).
//!
//! Owns which keys take effect at once ([`LIVE`]: the admin and node tokens with their
//! previous values, so a rotation needs no restart, the TLS certificate and key, the log
//! filter, every `[limits]` key but `limits.threads`, for connections and push streams from
//! then on) and applying them: everything that can fail (a token file, a certificate) is read
//! first, so a bad file changes nothing. Every other changed key keeps its running value until
//! a restart, and the caller logs it by name. It must never apply half a reload.

use super::{tokens, Manager};
use crate::core::config::{plan_reload, ManagerConfig, ReloadPlan};
use crate::http::auth::{Token, TokenError};
use crate::http::tls::TlsError;

/// The keys a reload applies at once.
pub const LIVE: &[&str] = &[
    "manager.admin_token",
    "manager.admin_token_file",
    "manager.admin_token_previous",
    "manager.node_token",
    "manager.node_token_file",
    "manager.node_token_previous",
    "manager.tls_cert",
    "manager.tls_key",
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
    #[error("manager tokens: {0}")]
    Token(#[from] TokenError),
    #[error("manager.tls_cert / manager.tls_key: {0}")]
    Tls(#[from] TlsError),
    #[error("the running config is unreadable (a panic held its lock)")]
    Poisoned,
}

impl Manager {
    /// Applies what of `new` can change live and returns what changed; on an error nothing
    /// changed.
    pub fn reload(&self, new: &ManagerConfig) -> Result<ReloadPlan, ReloadError> {
        let mut running = self.running.lock().map_err(|_| ReloadError::Poisoned)?;
        let mut plan = plan_reload(&*running, new, LIVE);
        // TLS turned on or off needs a restart (the listener's kind changes); a new pair of
        // files for a TLS port does not.
        let tls_keys = ["manager.tls_cert", "manager.tls_key"];
        let tls_changed = plan.live.iter().any(|k| tls_keys.contains(&k.as_str()));
        let swap_certs = match &self.certs {
            Some(certs) if tls_changed && !new.manager.tls_cert.is_empty() => Some(certs),
            _ => {
                if tls_changed {
                    plan.live.retain(|k| !tls_keys.contains(&k.as_str()));
                    plan.restart.extend(tls_keys.iter().map(|k| k.to_string()));
                }
                None
            }
        };
        // Everything that can fail first. Tokens made at first start live in the data dir
        // in use (a new data_dir takes a restart).
        let mut same_dir = new.clone();
        same_dir.manager.data_dir = running.manager.data_dir.clone();
        let (admin, node) = tokens(&same_dir)?;
        if let Some(certs) = swap_certs {
            certs.reload(
                std::path::Path::new(&new.manager.tls_cert),
                std::path::Path::new(&new.manager.tls_key),
            )?;
            running.manager.tls_cert = new.manager.tls_cert.clone();
            running.manager.tls_key = new.manager.tls_key.clone();
        }
        let m = &new.manager;
        self.admin_token
            .set(admin, Token::optional(&m.admin_token_previous));
        self.node_token
            .set(node, Token::optional(&m.node_token_previous));
        let r = &mut running.manager;
        r.admin_token = m.admin_token.clone();
        r.admin_token_file = m.admin_token_file.clone();
        r.admin_token_previous = m.admin_token_previous.clone();
        r.node_token = m.node_token.clone();
        r.node_token_file = m.node_token_file.clone();
        r.node_token_previous = m.node_token_previous.clone();
        running.log.level = new.log.level.clone();
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
