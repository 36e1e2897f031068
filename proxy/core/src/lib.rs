//! Tollgate's core: everything a request decision needs, and nothing that
//! talks to a socket, Pingora, Redis or an HTTP client.
//!
//! It owns the key format ([`keys`]), plans and windows ([`plans`]), the
//! key-store and limiter traits with the exact in-memory limiter
//! ([`store`], [`limiter`]), the per-request decision ([`gate`]), the
//! rate-limit header values ([`headers`]), prepaid credits ([`credits`]), threshold alerts ([`alerts`]), the one error model
//! ([`problem`]), the usage ledger ([`usage`]), units read from response
//! bodies ([`body_usage`]), billing webhooks turned into plan
//! changes ([`lifecycle`]), JWT verification ([`jwt`]), time ([`clock`]), config
//! diagnostics ([`diag`]) and the metric definitions ([`metrics`]).
//! Backends (`tollgate-redis`, `tollgate-metering`) implement its traits;
//! the gateway composes them. This crate may not depend on any of them, nor
//! on Pingora, redis, reqwest or tokio's networking: the compiler enforces
//! the layering.

pub mod alerts;
pub mod body_usage;
pub mod clock;
pub mod credits;
pub mod diag;
pub mod gate;
pub mod headers;
pub mod jwt;
pub mod keys;
pub mod lifecycle;
pub mod limiter;
pub mod meter;
pub mod metrics;
pub mod pct;
pub mod plans;
pub mod problem;
pub mod request_id;
pub mod store;
pub mod sync;
pub mod usage;

pub use sync::lock;
