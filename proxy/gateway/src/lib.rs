//! Tollgate's gateway: everything that knows Pingora, and the one place
//! that picks concrete backends.
//!
//! - [`config`] reads `tollgate.yaml` into the validated [`config::Config`];
//! - [`app`] is the composition root: it builds the key store, the limiter
//!   (memory, or Redis behind core's `on_error` fallback) and the spool the
//!   config names, into the [`app::App`] every request shares;
//! - [`proxy`] is the thin Pingora `ProxyHttp`: it asks core's `Gate` for an
//!   admission, moves headers, and runs the metering step;
//! - [`own`] answers Tollgate's own public routes under `/_tollgate`:
//!   billing webhooks, self-service checkout and portal, the dashboard;
//! - [`access_log`] writes one JSON line per request from a thread of its own;
//! - [`docs`] renders the consumer documentation (`tollgate docs`);
//! - [`admin`] serves metrics, health, the status page and the `/admin` API;
//! - [`server`] assembles the Pingora server and its background services;
//! - the `tollgate` binary (`main.rs`, `cli/`) is the command line.
//!
//! Plain parts live in `tollgate-core`; Redis and metering in their own
//! crates. This crate may depend on all of them; none of them on it.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod config;
pub mod connections;
pub mod docs;
pub mod logging;
pub mod own;
pub mod proxy;
pub mod server;
pub mod shared_credits;
