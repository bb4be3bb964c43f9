//! Layer 1: the rules of the product and its wire, as plain data and pure functions.
//!
//! Owns what both roles (and clients) must agree on: settings and their inheritance, the
//! catalog and its revisions, digests, catalog signatures, download slots, configuration
//! files, the wire types of the client API, the kinds of failure, secret files made once,
//! and the format of the manager's backup file. Nothing here does
//! network I/O, reads the clock (times arrive as arguments) or touches sled; persistence is
//! the caller's.

pub mod backup;
pub mod catalog;
pub mod config;
pub mod credential;
pub mod delta;
pub mod digest;
pub mod fault;
pub mod fleet;
pub mod proto;
pub mod push;
pub mod secret_file;
pub mod settings;
pub mod signing;
pub mod slots;
pub mod starts;
