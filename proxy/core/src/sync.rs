//! The synchronisation helpers every layer shares: poison-tolerant locks
//! (the one way Tollgate takes a lock) and the flush queue.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, also after a thread panicked holding it: every structure
/// behind these mutexes stays consistent between statements, so a poisoned
/// lock's data is still good, and the proxy must not go down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// [`lock`] for readers of an `RwLock`.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// [`lock`] for the writer of an `RwLock`.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A value that a reload replaces as a whole while readers keep the one
/// they loaded (in-flight requests finish on the old plans).
#[derive(Debug)]
pub struct Shared<T>(RwLock<std::sync::Arc<T>>);

impl<T> Shared<T> {
    pub fn new(v: std::sync::Arc<T>) -> Self {
        Self(RwLock::new(v))
    }

    /// The current value.
    pub fn load(&self) -> std::sync::Arc<T> {
        std::sync::Arc::clone(&read(&self.0))
    }

    /// Replaces it for every later `load`.
    pub fn store(&self, v: std::sync::Arc<T>) {
        *write(&self.0) = v;
    }
}

/// Work queued for one flush task (the spool's group commit, the Redis
/// limiter's batches): whoever queues into an empty queue schedules the
/// flush, which takes everything queued until it runs.
#[derive(Debug)]
pub struct Pending<T> {
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
    pub fn push(&mut self, item: T) -> bool {
        self.items.push(item);
        !std::mem::replace(&mut self.scheduled, true)
    }

    /// Everything queued; the next `push` schedules a new flush.
    pub fn take(&mut self) -> Vec<T> {
        self.scheduled = false;
        std::mem::take(&mut self.items)
    }
}
