//! Tollgate's Redis backend, for several instances sharing keys and exact
//! counters: the connection with its circuit breaker ([`conn`]), the
//! limiter whose Lua script checks and charges a plan in one round trip
//! ([`limiter`], script in `limiter.lua`), and the shared key store that
//! keeps a local snapshot in step through a change feed ([`store`]).
//!
//! It implements `tollgate-core`'s `Limiter` and `KeyStore` traits and
//! depends on core only: never on Pingora, the metering crate or the
//! gateway. What happens when Redis fails is core's `Fallback` policy.

pub mod conn;
pub mod credits;
pub mod limiter;
pub mod runtime;
pub mod store;

pub use conn::{RedisConfig, RedisConn};
pub use credits::RedisCredits;
pub use limiter::RedisLimiter;
pub use runtime::RedisRuntime;
pub use store::{BlockingRedisAdmin, RedisKeyStore};
