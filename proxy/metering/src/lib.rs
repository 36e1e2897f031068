//! Tollgate's usage metering: the durable [`spool`] every billable
//! response is written to before the client has its answer, and the
//! [`billing`] sinks (Stripe, OpenMeter, Lago, a signed webhook) that
//! drain it, each at its own pace, exactly once per record identifier, and
//! the delivery of threshold [`alerts`] the spool holds.
//!
//! Depends on `tollgate-core` only (clock, key randomness, metrics): never
//! on Pingora, Redis or the gateway. Each sink parses its own config
//! section ([`billing::config`]); the gateway only hands it the YAML.

pub mod alerts;
pub mod billing;
pub mod spool;
