//! SIGHUP: re-reading the config file of a running manager or node (`systemctl reload`).
//!
//! Owns the signal's loop and what it logs: the file and the flags are read again exactly as at
//! start, and validated; a bad file keeps the running config and logs one line naming the
//! key. Otherwise the role applies what can change live and the log names each key that
//! changed and each that needs a restart; the log filter (`log.level`) is this module's own to
//! change, since logging belongs to the binary. It must never stop the process on a bad file.

use std::sync::OnceLock;

use crate::core::config::ReloadPlan;

/// Sets the log filter in force (None when `RUST_LOG` was set at start, which wins).
type SetFilter = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

static LOG_FILTER: OnceLock<Option<SetFilter>> = OnceLock::new();

/// Keeps what changes the log filter of this process (once; `env_set`: `RUST_LOG` decides).
pub(super) fn keep_log_handle(
    env_set: bool,
    set: impl Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync + 'static,
) {
    let _ = LOG_FILTER.set((!env_set).then(|| Box::new(set) as SetFilter));
}

/// Makes `level` the log filter, unless `RUST_LOG` chose it at start.
fn set_log_level(level: &str) -> Result<(), String> {
    match LOG_FILTER.get() {
        Some(Some(set)) => {
            let filter =
                tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            set(filter)
        }
        Some(None) => {
            tracing::info!("log.level changed, but RUST_LOG was set at start and decides");
            Ok(())
        }
        None => Ok(()),
    }
}

/// Waits for SIGHUP, forever, and on each: `load` builds the config again (an error: one
/// line, nothing changes), `apply` hands it to the role, and the outcome is logged by key.
/// `level` is the new config's `log.level`. Listening starts at once, so that a SIGHUP sent
/// once the role runs never takes the default action (ending the process). The service
/// manager hears RELOADING=1 and READY=1 around each.
pub(super) fn on_hangup<C, E>(
    load: impl Fn() -> Result<C, String> + Send + 'static,
    apply: impl Fn(&C) -> Result<ReloadPlan, E> + Send + 'static,
    level: impl Fn(&C) -> String + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    C: Send + 'static,
    E: std::fmt::Display,
{
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            crate::sys::notify::reloading();
            reload_once(&load, &apply, &level);
            crate::sys::notify::ready("reloaded");
        }
    }))
}

/// One reload: build the config, apply it, set the log filter, log what changed.
fn reload_once<C, E: std::fmt::Display>(
    load: &impl Fn() -> Result<C, String>,
    apply: &impl Fn(&C) -> Result<ReloadPlan, E>,
    level: &impl Fn(&C) -> String,
) {
    let new = match load() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("reload refused, the running config stays: {e}");
            return;
        }
    };
    let plan = match apply(&new) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("reload refused, the running config stays: {e}");
            return;
        }
    };
    if plan.live.iter().any(|k| k == "log.level") {
        if let Err(e) = set_log_level(&level(&new)) {
            tracing::warn!("log.level not applied: {e}");
        }
    }
    for key in &plan.live {
        tracing::info!(key = %key, "config reloaded: the new value is in force");
    }
    for key in &plan.restart {
        tracing::warn!(key = %key, "config reloaded: this key changed but takes effect at the next restart");
    }
    if plan.live.is_empty() && plan.restart.is_empty() {
        tracing::info!("config reloaded: nothing changed");
    }
}
