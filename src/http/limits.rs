//! The connection limits of a server, from its `[limits]` section.
//!
//! Owns turning the configured values into the ones in force (a `max_connections` of 0
//! derived from the open-file limit, `threads` 0 as one per core). It must never enforce a
//! limit: the accept loop (`server`) and push connections (`pushconn`) do.

use std::time::Duration;

use crate::core::config::LimitsSection;

/// Connection limits of a server (`[limits]` in the config files).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request head (request line and headers); beyond it, 431.
    pub max_header_bytes: usize,
    /// A client that has not sent a whole request head this long after it connected (or
    /// after its previous response) is disconnected: half-open connections do not pile up.
    pub header_read_timeout: Duration,
    /// Connections beyond this many are closed at once, while the others carry on.
    pub max_connections: usize,
    /// Serving threads, each with its own runtime (at least 1).
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
