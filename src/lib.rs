//! gup, the Group Update Provider.
//!
//! One crate, several roles: the `manager` (the management server and source of truth), the
//! `node` (a caching branch-office server that mirrors an upstream and serves clients), the
//! admin client and the binary's commands (`cli`), the `demo` that runs a branch office in one
//! process, the endpoint `agent`, and `loadtest`. Data flows one way: a node's `upstream` fetches into `store`, and
//! `serve` answers clients from `store`.
//!
//! The source tree is laid out by layer; a module imports only from layers below it:
//! 1. `core`: the rules and the wire as plain data (settings, catalog, digest, signing,
//!    slots, config, proto, fault). No tokio, axum, sled or reqwest.
//! 2. `store` (blobs, their writer, the key-value index: the only sled user) and `sys` (the
//!    only `unsafe` code, and zero-copy sending built on it).
//! 3. `http`: the accept loop, push connections, TLS, shutdown, errors as answers, extractors,
//!    bearer tokens. It never knows a route.
//! 4. `serve`: the one client API, over a [`serve::Role`] that says where placements and
//!    uploads come from and go to.
//! 5. `manager` and `node`, the two server roles, `agent`, the endpoint client (it speaks
//!    only the wire, never importing the servers' code), and `admin`, the admin API's
//!    client; none imports another.
//! 6. `cli`, `demo`, `loadtest` (a crowd of agents).
#![deny(unsafe_code)]

pub mod core;
pub mod store;
pub mod sys;

pub mod http;

pub mod serve;

pub mod page;

pub mod admin;
pub mod agent;
pub mod manager;
pub mod node;

pub mod cli;
pub mod demo;
pub mod loadtest;
