//! Telling the service manager how the process is doing (sd_notify(3)), for `Type=notify` units.
//!
//! Owns the few states gup reports: READY=1 once a server listens and its store is open,
//! STOPPING=1 when a graceful stop begins, RELOADING=1 then READY=1 around a reload. Without `NOTIFY_SOCKET` (not started by systemd,
//! or a unit of another type) every call does nothing. It must never fail the caller: a
//! notification that cannot be sent is logged once and serving goes on, since systemd alone
//! cares, and it acts on a missing READY=1 by its own start timeout.

use sd_notify::NotifyState;

/// The server is up: listening, its data dir open. `status` is a line for `systemctl status`.
pub fn ready(status: &str) {
    send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(status)],
    );
}

/// A graceful stop has begun (SIGTERM or SIGINT): draining, then flushing.
pub fn stopping() {
    send(
        "STOPPING=1",
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    );
}

/// A reload (SIGHUP) has begun; READY=1 follows when it is done.
pub fn reloading() {
    send(
        "RELOADING=1",
        &[NotifyState::Reloading, NotifyState::Status("reloading")],
    );
}

/// Whether a service manager listens (`NOTIFY_SOCKET` set and not empty).
pub fn expected() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn send(what: &str, states: &[NotifyState<'_>]) {
    if !expected() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not tell the service manager {what} (NOTIFY_SOCKET)");
    }
}
