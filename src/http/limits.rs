//! The connection limits of a server, from its `[limits]` section, and the cell that holds
//! the ones in force.
//!
//! Owns turning the configured values into the ones in force (a `max_connections` of 0
//! derived from the open-file limit, `threads` 0 as one per core) and [`LiveLimits`], the
//! shared cell a config reload puts new values in: each accepted connection takes one
//! snapshot of it and keeps it for its whole life, so new connections see a reload and open
//! ones never change under their feet. `threads` is fixed at start (the serving threads are
//! built once): a reload keeps it. It must never enforce a limit: the accept loop (`server`)
//! and push connections (`pushconn`) do.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::core::config::LimitsSection;

/// Connection limits of a server (`[limits]` in the config files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers); beyond it, 431.
    pub max_header_bytes: usize,
    /// A client that has not sent a whole request head this long after it connected (or
    /// after its previous response) is disconnected: half-open connections do not pile up.
    pub header_read_timeout: Duration,
    /// Connections beyond this many are closed at once, while the others carry on.
    pub max_connections: usize,
    /// Serving threads, each with its own runtime (at least 1). Fixed at start.
    pub threads: usize,
    /// Connections one client address may hold at once (0: no limit); beyond, new ones from
    /// it are closed at once.
    pub max_connections_per_address: usize,
    /// A request body that sends no byte this long is cut.
    pub body_read_timeout: Duration,
    /// A push stream whose client takes no byte this long is closed.
    pub stream_write_timeout: Duration,
}

impl Limits {
    /// The limits a `[limits]` section gives, with the open-file limit now in force (a
    /// `max_connections` of 0 derives from it, keeping 256 descriptors for files and upstream
    /// connections; `threads` 0 is one per core).
    pub fn from_section(section: &LimitsSection, open_files: u64) -> Limits {
        let derived = (open_files.saturating_sub(256) as usize).max(64);
        Limits {
            max_header_bytes: section.max_header_bytes,
            header_read_timeout: Duration::from_secs(section.header_read_timeout_s),
            max_connections: if section.max_connections == 0 {
                derived
            } else {
                section.max_connections
            },
            threads: if section.threads == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                section.threads
            },
            max_connections_per_address: section.max_connections_per_address,
            body_read_timeout: Duration::from_secs(section.body_read_timeout_s),
            stream_write_timeout: Duration::from_secs(section.stream_write_timeout_s),
        }
    }
}

/// The limits in force, shared: every clone sees a [`LiveLimits::set`]. Readers take a
/// snapshot ([`LiveLimits::get`]: one read lock and an `Arc` clone), once per accepted
/// connection, never per request.
#[derive(Debug, Clone)]
pub struct LiveLimits {
    current: Arc<RwLock<Arc<Limits>>>,
}

impl LiveLimits {
    pub fn new(limits: Limits) -> LiveLimits {
        LiveLimits {
            current: Arc::new(RwLock::new(Arc::new(limits))),
        }
    }

    /// The limits in force now. A snapshot: a later [`LiveLimits::set`] does not change it.
    pub fn get(&self) -> Arc<Limits> {
        match self.current.read() {
            Ok(l) => l.clone(),
            // Only a panic inside `set`'s assignment poisons it; the value is whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// From now on, `limits`, except `threads`, which stays what the server started with
    /// (the serving threads are built once).
    pub fn set(&self, mut limits: Limits) {
        let mut current = match self.current.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        limits.threads = current.threads;
        *current = Arc::new(limits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_seen_by_every_clone_but_not_by_snapshots_taken_before_and_keeps_threads() {
        let section = LimitsSection {
            threads: 3,
            max_connections: 10,
            ..LimitsSection::default()
        };
        let live = LiveLimits::new(Limits::from_section(&section, 1024));
        let other = live.clone();
        let before = live.get();
        let changed = LimitsSection {
            threads: 7,
            max_connections: 2,
            header_read_timeout_s: 3,
            ..section
        };
        other.set(Limits::from_section(&changed, 1024));
        let after = live.get();
        assert_eq!(after.max_connections, 2);
        assert_eq!(after.header_read_timeout, Duration::from_secs(3));
        assert_eq!(
            after.threads, 3,
            "threads stay what the server started with"
        );
        assert_eq!(before.max_connections, 10, "a snapshot never changes");
        assert_eq!(before.header_read_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_max_connections_of_zero_derives_from_the_open_file_limit_given() {
        let section = LimitsSection::default();
        assert_eq!(section.max_connections, 0);
        assert_eq!(
            Limits::from_section(&section, 10_256).max_connections,
            10_000
        );
        assert_eq!(Limits::from_section(&section, 100).max_connections, 64);
    }
}
