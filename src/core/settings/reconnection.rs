//! Which group a heartbeating client belongs to: what the registry remembers about it
//! ([`ClientHistory`]), the facts of one heartbeat ([`HeartbeatFacts`]), and the contract's
//! rules in [`resolve_client_group`].
//!
//! Pure functions only: this file must never do I/O, read the clock (whether a client is
//! reconnecting arrives as a flag), speak HTTP or touch storage, and it never changes the
//! [`Directory`]; the caller records the result.

use serde::{Deserialize, Serialize};

use super::{Directory, LoginMode, Os};

/// What the registry remembers about a client, as far as group resolution needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHistory {
    /// The group the client was installed into (from its first heartbeat).
    pub install_group: String,
    /// The group the client is in now: where it was last moved to or placed.
    pub group: String,
    /// The group an admin last moved it to, if any. Informational: resolution reads `group`.
    #[serde(default)]
    pub last_moved_group: Option<String>,
    /// Login mode at its last heartbeat. Informational: resolution reads the heartbeat's.
    #[serde(default)]
    pub login_mode: LoginMode,
    /// The user at its last user-mode heartbeat; a different user now is a "new user".
    #[serde(default)]
    pub last_user: Option<String>,
    /// An admin moved it (and has not deleted it since): user mode does not move it.
    #[serde(default)]
    pub admin_hold: bool,
}

/// The facts of one heartbeat that group resolution needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatFacts<'a> {
    /// `install_group` from the heartbeat; unknown means `default`.
    pub install_group: &'a str,
    /// The client's platform; decides whether the reconnection keys apply.
    pub os: Os,
    /// Heartbeat `mode` (login mode).
    pub login_mode: LoginMode,
    /// Heartbeat `user`; an empty string counts as no user.
    pub user: Option<&'a str>,
    /// True when there was no record, the record was deleted, or it went overdue (no
    /// heartbeat for 3 intervals). The caller decides; this function never reads the clock.
    pub reconnect: bool,
}

/// Decides which group a heartbeating client belongs to. Pure: `user_group` maps a user name
/// to the group configured with `PUT /v1/admin/users/{user}`. Always returns an existing group.
pub fn resolve_client_group(
    dir: &Directory,
    prior: Option<&ClientHistory>,
    hb: &HeartbeatFacts,
    user_group: impl Fn(&str) -> Option<String>,
) -> String {
    let exists = |g: &str| dir.groups.contains_key(g);

    // Steps 1 and 2: the computer's group.
    let current: String = match prior {
        // 1. No record at all (new, or deleted): the heartbeat's install group; unknown ->
        //    default.
        None => dir.resolve_group(hb.install_group).to_string(),
        // 1. A record and no reconnect: the client stays in its current group, so a moved
        //    client that keeps its heartbeats stays where it was moved.
        Some(p) if !hb.reconnect => dir.resolve_group(&p.group).to_string(),
        // 2. A reconnect with a record (it went overdue): back to the install group, unless
        //    the last group (still existing) has `reconnection.use_last_group` on and the
        //    client is Windows or Mac (no effect on Linux).
        Some(p) => {
            let stay = exists(&p.group)
                && hb.os.honours_use_last_group()
                && dir.effective(&p.group, None).reconnection.use_last_group;
            if stay {
                p.group.clone()
            } else if !p.install_group.is_empty() && exists(&p.install_group) {
                p.install_group.clone()
            } else {
                // The recorded install group is gone: fall back to the heartbeat's.
                dir.resolve_group(hb.install_group).to_string()
            }
        }
    };

    // Step 3: user mode, unless an admin's move holds the client where the admin put it.
    let user = hb.user.filter(|u| !u.is_empty());
    // (A reconnect that took it back to its install group ended the hold.)
    let held =
        prior.is_some_and(|p| p.admin_hold && p.last_moved_group.as_deref() == Some(&current));
    let result = match (hb.login_mode, user) {
        (LoginMode::User, Some(_)) if held => current,
        (LoginMode::User, Some(u)) => {
            // A mapping to a group that no longer exists counts as no mapping.
            let mapped = user_group(u).filter(|g| exists(g));
            let previous = prior.and_then(|p| p.last_user.as_deref());
            if previous == Some(u) {
                // Same user as before: a client that keeps its heartbeats stays where it is
                // (an admin's move sticks); after a reconnect it follows its user's mapping.
                if hb.reconnect {
                    mapped.unwrap_or(current)
                } else {
                    current
                }
            } else {
                // A new user (or the first one): moves the client to the user's group, unless
                // `use_last_mode` is on for the current group (read on the group from steps
                // 1-2) and the client is Windows (no effect elsewhere); a user with no
                // mapping keeps the current group.
                let keep = hb.os.honours_use_last_mode()
                    && dir.effective(&current, None).reconnection.use_last_mode;
                if keep {
                    current
                } else {
                    mapped.unwrap_or(current)
                }
            }
        }
        // Computer mode, or user mode without a user: the computer's group.
        _ => current,
    };

    // Step 4: always an existing group.
    dir.resolve_group(&result).to_string()
}

#[cfg(test)]
#[path = "reconnection_tests.rs"]
mod tests;
