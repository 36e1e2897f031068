//! Tollgate: a metering reverse proxy on Pingora.
//!
//! The [`proxy`] module is a thin Pingora `ProxyHttp` that calls plain parts
//! which know nothing of sockets: [`keys`] (format, hashing), [`store`]
//! (key and customer lookup), [`plans`], [`limiter`], [`headers`],
//! [`usage`] (the ledger) and [`problem`] (the one place errors become
//! HTTP responses).

pub mod admin;
pub mod billing;
pub mod clock;
pub mod config;
pub mod diag;
pub mod gate;
pub mod headers;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod pct;
pub mod plans;
pub mod problem;
pub mod proxy;
pub mod redis_conn;
pub mod redis_limiter;
pub mod redis_store;
pub mod server;
pub mod spool;
pub mod store;
pub mod usage;

/// Locks `m`, also after a thread panicked holding it: every structure
/// behind these mutexes stays consistent between statements, so a poisoned
/// lock's data is still good, and the proxy must not go down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Work queued for one flush task (the spool's group commit, the Redis
/// limiter's batches): whoever queues into an empty queue schedules the
/// flush, which takes everything queued until it runs.
pub(crate) struct Pending<T> {
    items: Vec<T>,
    /// A flush is on its way for what is queued.
    scheduled: bool,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            scheduled: false,
        }
    }
}

impl<T> Pending<T> {
    /// Queues `item`; true when the caller must schedule the flush.
    pub(crate) fn push(&mut self, item: T) -> bool {
        self.items.push(item);
        !std::mem::replace(&mut self.scheduled, true)
    }

    /// Everything queued; the next `push` schedules a new flush.
    pub(crate) fn take(&mut self) -> Vec<T> {
        self.scheduled = false;
        std::mem::take(&mut self.items)
    }
}
