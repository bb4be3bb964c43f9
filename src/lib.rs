//! gup, the Group Update Provider.
//!
//! One crate, several roles: the `manager` (the management server and source of truth), the
//! `node` (a caching branch-office server that mirrors the manager and serves clients), the
//! `admin` client, and the `demo` that runs a branch office in one process. Data flows one way:
//! `upstream` fetches into `store`, and `serve` answers clients from `store`. The binary in
//! `src/main.rs` is a thin clap wrapper around these modules.

pub mod admin;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod clients;
pub mod config;
pub mod demo;
pub mod digest;
pub mod events;
pub mod evict;
pub mod hot;
pub mod limit;
pub mod loadtest;
pub mod manager;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod pushconn;
pub mod serve;
pub mod server;
pub mod settings;
pub mod signing;
pub mod slots;
pub mod store;
pub mod stream;
pub mod upstream;
pub mod zerocopy;
