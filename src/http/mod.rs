//! Layer 3: HTTP serving without routes.
//!
//! Owns the accept loop on per-core threads (`server`), lean push connections (`pushconn`),
//! fast exchanges the layer above answers without its router (`fastconn`),
//! connection limits (`limits`), TLS, graceful shutdown, the mapping of failures to answers (`error`), extractors whose
//! rejections are our JSON errors (`extract`), and bearer tokens (`auth`). It must never know
//! a route or a role: the layers above hand it a router and say which connections are long
//! push streams.

pub mod auth;
pub mod error;
pub mod extract;
pub mod fastconn;
pub mod limits;
pub mod pushconn;
pub mod server;
pub mod shutdown;
pub mod slot;
pub mod tls;
