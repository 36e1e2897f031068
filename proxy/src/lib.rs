//! Tollgate: a metering reverse proxy on Pingora.
//!
//! The [`proxy`] module is a thin Pingora `ProxyHttp` that calls plain parts
//! which know nothing of sockets: [`keys`] (format, hashing), [`store`]
//! (key and customer lookup), [`plans`], [`limiter`], [`headers`],
//! [`usage`] (the ledger) and [`problem`] (the one place errors become
//! HTTP responses).

pub mod clock;
pub mod diag;
pub mod headers;
pub mod keys;
pub mod limiter;
pub mod plans;
pub mod store;
