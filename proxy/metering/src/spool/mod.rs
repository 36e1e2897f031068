//! The usage spool: a write-ahead log on local disk that makes usage durable
//! before it counts as recorded, rolls it up per (customer, meter, window)
//! into records with fixed identifiers, and remembers which sink has
//! settled which record.
//!
//! Files in `metering.spool_dir`:
//! - `instance-id`: this spool's id, part of every identifier;
//! - `rollup`: the window (ms) the events on disk were written for;
//! - `events.log`: one line per billable response: `E seq ts customer meter units crc`,
//!   and, when the limits live in this process (the memory backend), one
//!   per calendar window a request was charged to: `C start d|m customer
//!   limit units crc` (replayed into the limiter on start, so a restart
//!   gives no customer a day's or a month's quota back);
//!   Charges and grants of prepaid credits are lines here too (`K`, `G`,
//!   and `B` for an account after compaction; see `credits.rs`), and so
//!   are threshold alerts (`T` raised, `X` settled; see `alerts.rs`);
//! - `records.log`: `H next` (the record sequence high-water mark: sequences,
//!   and so identifiers, are never reused), `S month customer meter recorded
//!   reported` (this month's usage already settled everywhere and dropped
//!   from memory), and `R rseq upto window customer meter units identifier`
//!   (records some sink still owes);
//! - `acks-<sink>.log`: `A rseq ok|dead`, what each sink has settled;
//! - `dead-<sink>.jsonl`: records a sink refused for good, with the reason
//!   (`dead-alerts.jsonl`: alerts the alert webhook refused).
//!
//! Every line ends with a CRC-32 of the rest, so a line torn by a crash is
//! recognised and ignored on replay. Customer and meter are percent-escaped.
//!
//! Group commit happens on the caller's runtime: an append joins a queue,
//! the first one into an empty queue spawns a flush task, and that task
//! writes everything that queued up meanwhile in one `write` and answers
//! each caller once its line is in the file: a `kill -9` after that loses
//! nothing. No thread hop and no blocking on the request path: if the
//! writer is busy (a rollup or compaction), the batch goes to the spool's
//! own thread instead. That thread also runs `fsync` at most every
//! `fsync_interval`, which bounds what a power loss can take, and compacts
//! the files at start and whenever they pass [`COMPACT_AT`], so a spool
//! whose sinks keep up stays small.
//!
//! A `lock` file held with `flock` keeps a second process from opening the
//! same spool (two writers would interleave sequences).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use tollgate_core::clock::{month_bounds, Clock, Millis};
use tollgate_core::credits::CreditPolicy;
use tollgate_core::meter::CalendarCharge;
use tollgate_core::plans::Window;
use tollgate_core::sync::{lock, Pending};

#[cfg(test)]
mod alert_tests;
mod alerts;
mod codec;
mod compact;
mod credits;
mod open;
mod replay;
mod report;
pub mod seal;
#[cfg(test)]
mod tests;
mod writer;

pub use alerts::dead_alerts;
use codec::{io_err, line_with_crc};
pub use credits::OwedCharge;
pub use replay::{dead_letters, DeadLetter, Inspection, SinkStatus};
pub use report::CalendarCount;
pub use seal::Seal;
use writer::Writer;

/// Files are compacted when events.log or records.log grows past this.
pub const COMPACT_AT: u64 = 8 << 20;
/// Undelivered usage older than this is logged as about to age out.
pub const AGE_WARNING_SECS: u64 = 30 * 86_400;

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub fsync_interval: Duration,
    /// Above this many bytes of spool, billable requests are refused (503).
    pub max_bytes: u64,
    /// Records aggregate usage per this window (default one minute).
    pub rollup: Millis,
    /// Sinks whose deliveries are tracked.
    pub sinks: Vec<String>,
    /// Seal the files at rest (`metering.encryption`); None: plain text.
    pub seal: Option<Arc<Seal>>,
    /// `alerts.at`: the percents of a quota or of credits that raise an
    /// alert (empty: none).
    pub alerts: tollgate_core::alerts::Thresholds,
    /// Credit balances live in a shared store (Redis limits): charges are
    /// owed to it until delivered (see `credits.rs`), and kept in no
    /// account here.
    pub shared_credits: bool,
}

/// One rolled-up record: what a sink reports, under a fixed identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub rseq: u64,
    /// Highest event sequence folded into this record.
    pub upto: u64,
    pub window_start: Millis,
    pub customer: Arc<str>,
    pub meter: Arc<str>,
    pub units: u64,
    /// `tg-<instance>-<rseq>`: unique across instances and restarts, never
    /// changes on retry (nor on a replay).
    pub identifier: String,
    /// A dead letter put back for this sink alone (`tollgate billing
    /// replay`): the others have settled it, and its units were already
    /// counted as recorded when it was first settled.
    pub only: Option<Arc<str>>,
}

impl Record {
    /// Whether `sink` still has to settle this record at all.
    fn owed_to(&self, sink: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == sink)
    }
}

type GroupKey = (Arc<str>, Arc<str>, Millis);
type CounterKey = (Arc<str>, Arc<str>, u8);

/// `d` or `m`: how a calendar window is written.
fn window_code(w: Window) -> Option<u8> {
    match w {
        Window::Day => Some(b'd'),
        Window::Month => Some(b'm'),
        Window::Sliding(_) | Window::Concurrent => None,
    }
}

/// The calendar window a counter's code stands for (`d`: day, else month).
fn code_window(code: u8) -> Window {
    if code == b'd' {
        Window::Day
    } else {
        Window::Month
    }
}

/// Whether a counter of window `code` starting at `start` is current `now`.
fn counter_current(code: u8, start: Millis, now: Millis) -> bool {
    tollgate_core::limiter::calendar_window(code_window(code), now).0 == start
}

impl State {
    /// Adds a charge of `units` to the window starting at `start`; a
    /// charge to an older window than the one held is stale.
    fn count(&mut self, key: CounterKey, start: Millis, units: u64) {
        let c = self.counters.entry(key).or_insert((start, 0));
        if start > c.0 {
            *c = (start, 0);
        }
        if start == c.0 {
            c.1 = c.1.saturating_add(units);
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Group {
    units: u64,
    max_seq: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    month: Millis,
    recorded: u64,
    reported: u64,
}

#[derive(Default)]
struct State {
    pending: HashMap<GroupKey, Group>,
    /// Records some sink still owes.
    records: BTreeMap<u64, Record>,
    /// Per sink: records settled, true if delivered, false if dead-lettered.
    settled: HashMap<String, BTreeMap<u64, bool>>,
    /// This month's usage of records settled everywhere.
    /// Indexed by customer, then meter, so one customer's report does not
    /// scan everyone's.
    summaries: HashMap<Arc<str>, HashMap<Arc<str>, Summary>>,
    /// Calendar-window charges per (customer, limit, `d`|`m`): the
    /// window's start and the units used in it.
    counters: HashMap<CounterKey, (Millis, u64)>,
    /// Prepaid credits per customer (see `credits.rs`): behind their own
    /// lock, which the gate takes per request and which is never held
    /// across I/O (this one is, by rollups and compaction). Taken after
    /// this state's lock when both are.
    credits: Arc<Mutex<credits::Accounts>>,
    /// Threshold alerts (see `alerts.rs`), behind their own lock like the
    /// credits (taken after them when both are): the gate reads it with
    /// every request whose customer has reached a threshold.
    alerts: Arc<std::sync::RwLock<alerts::Outbox>>,
    next_seq: u64,
    next_rseq: u64,
    /// See [`SpoolConfig::shared_credits`].
    shared_credits: bool,
    /// Charges owed to the shared store, behind their own lock (the gate
    /// reads a customer's sum per request); taken after this state's.
    owed: Arc<Mutex<credits::Owed>>,
    /// The number of the next charge owed (`kseq`).
    next_kseq: u64,
    /// Woken when a charge is owed.
    owed_ready: Arc<tokio::sync::Notify>,
}

impl State {
    /// Moves records every sink has settled into the summaries.
    fn fold_settled(&mut self, sinks: &[String], month_start: Millis) {
        let done: Vec<u64> = self
            .records
            .iter()
            .filter(|(rseq, r)| {
                sinks
                    .iter()
                    .filter(|s| r.owed_to(s))
                    .all(|s| self.settled.get(s).is_some_and(|m| m.contains_key(rseq)))
            })
            .map(|(rseq, _)| *rseq)
            .collect();
        for rseq in done {
            let Some(r) = self.records.remove(&rseq) else {
                continue;
            };
            let delivered = match &r.only {
                // A replay: delivered once its sink (still configured) took it.
                Some(only) => {
                    sinks.iter().any(|s| **s == **only)
                        && self.settled.get(&**only).and_then(|m| m.get(&rseq)) == Some(&true)
                }
                None => {
                    !sinks.is_empty()
                        && sinks
                            .iter()
                            .all(|s| self.settled.get(s).and_then(|m| m.get(&rseq)) == Some(&true))
                }
            };
            for m in self.settled.values_mut() {
                m.remove(&rseq);
            }
            let (month, _) = month_bounds(r.window_start);
            if month < month_start {
                continue;
            }
            let sum = self
                .summaries
                .entry(r.customer)
                .or_default()
                .entry(r.meter)
                .or_default();
            if sum.month != month {
                *sum = Summary {
                    month,
                    ..Summary::default()
                };
            }
            if r.only.is_none() {
                sum.recorded = sum.recorded.saturating_add(r.units);
            }
            if delivered {
                sum.reported = sum.reported.saturating_add(r.units);
            }
        }
    }
}

/// One response waiting for its lines to be written: its billable usage,
/// its calendar charge, or both.
struct Append {
    customer: Arc<str>,
    usage: Option<(Arc<str>, u64)>,
    charge: Option<CalendarCharge>,
    /// What the usage costs in credits.
    credits: Option<Arc<CreditPolicy>>,
    at: Millis,
    /// A quota's threshold the gate saw crossed (already claimed).
    alert: Option<Box<tollgate_core::alerts::Alert>>,
    done: tokio::sync::oneshot::Sender<bool>,
}

/// Work for the spool's thread.
enum Msg {
    /// Appends a flush found the writer busy with.
    Appends(Vec<Append>),
    Rollup {
        all: bool,
        done: Option<tokio::sync::oneshot::Sender<usize>>,
    },
}

pub use tollgate_core::usage::MeterTotals;

/// Why the spool could not open, write or settle.
#[derive(Debug)]
pub enum SpoolError {
    /// A file or directory of the spool could not be read or written.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the spool directory's lock.
    InUse(PathBuf),
    /// The spool's thread could not be started.
    Thread(std::io::Error),
    /// Sealing a line failed.
    Seal(&'static str),
    /// The spool was sealed with a key that is neither the configured one
    /// nor the previous one.
    WrongKey(PathBuf),
    /// The spool is sealed but no key is configured.
    Sealed(PathBuf),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            SpoolError::InUse(dir) => write!(
                f,
                "usage spool {} is in use by another Tollgate process; each instance needs its own metering.spool_dir",
                dir.display()
            ),
            SpoolError::Thread(e) => write!(f, "cannot start the spool thread: {e}"),
            SpoolError::Seal(why) => write!(f, "{why}"),
            SpoolError::WrongKey(dir) => write!(
                f,
                "usage spool {} was sealed with another key than metering.encryption's key_env (or previous_key_env); nothing is read or dropped until the right key is set",
                dir.display()
            ),
            SpoolError::Sealed(dir) => write!(
                f,
                "usage spool {} is sealed; set metering.encryption with its key to open it",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for SpoolError {}

pub struct Spool {
    aging: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    queue: Mutex<Pending<Append>>,
    /// Set by `close`: nothing is written after it.
    closed: AtomicBool,
    writer: Arc<Mutex<Writer>>,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    /// When an append last failed (ms; 0: the last one succeeded).
    failed_at: Arc<AtomicU64>,
    full: AtomicBool,
    config: SpoolConfig,
    clock: Arc<dyn Clock>,
    pub instance: String,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held (flock) until the spool is closed or dropped.
    lock: Mutex<Option<File>>,
    /// The same accounts as the state's, for the gate.
    credits: Arc<Mutex<credits::Accounts>>,
    /// The same alerts as the state's.
    alerts: Arc<std::sync::RwLock<alerts::Outbox>>,
    /// The same charges owed as the state's, and their wake-up.
    owed: Arc<Mutex<credits::Owed>>,
    owed_ready: Arc<tokio::sync::Notify>,
}

impl Spool {
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// Queues one billable response; resolves to true once it is in the file.
    pub fn append(
        self: &Arc<Self>,
        customer: &Arc<str>,
        meter: &Arc<str>,
        units: u64,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        self.journal(customer, Some((meter, units)), None, None)
    }

    /// Queues a response's billable usage and calendar charge (either may
    /// be None); resolves to true once both are in the file.
    pub fn journal(
        self: &Arc<Self>,
        customer: &Arc<str>,
        usage: Option<(&Arc<str>, u64)>,
        charge: Option<CalendarCharge>,
        credits: Option<&Arc<CreditPolicy>>,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let item = Append {
            customer: customer.clone(),
            usage: usage.map(|(m, u)| (m.clone(), u)),
            charge,
            credits: credits.cloned(),
            at: self.clock.now_ms(),
            alert: None,
            done,
        };
        if lock(&self.queue).push(item) {
            // The flush yields once before writing, so the tasks this
            // runtime already has ready (other responses arriving in the
            // same wake-up) queue their appends first and share the write.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let flush = FlushOnDrop(self.clone());
                    rt.spawn(async move {
                        tokio::task::yield_now().await;
                        // Dropped here: flushes. Also if the task is dropped
                        // unrun (its runtime shutting down), so the queue is
                        // never left waiting for a flush that will not come.
                        drop(flush);
                    });
                }
                Err(_) => self.flush(),
            }
        }
        rx
    }

    /// Writes `usage` (one event line per meter) on the caller's thread,
    /// waiting for the writer if the spool's thread has it (a rollup, or
    /// a compaction). For the synchronous body filter.
    pub fn journal_now(
        &self,
        customer: &Arc<str>,
        usage: &[(Arc<str>, u64)],
        credits: Option<&Arc<CreditPolicy>>,
    ) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let at = self.clock.now_ms();
        let mut answers = Vec::with_capacity(usage.len());
        let items: Vec<Append> = usage
            .iter()
            .map(|(meter, units)| {
                let (done, rx) = tokio::sync::oneshot::channel();
                answers.push(rx);
                Append {
                    customer: customer.clone(),
                    usage: Some((meter.clone(), *units)),
                    charge: None,
                    credits: credits.cloned(),
                    at,
                    alert: None,
                    done,
                }
            })
            .collect();
        lock(&self.writer).append(items);
        answers.into_iter().all(|mut rx| rx.try_recv() == Ok(true))
    }

    /// Writes what has queued up: here if the writer is free, else on the
    /// spool's thread once it is.
    fn flush(&self) {
        let items = lock(&self.queue).take();
        if items.is_empty() || self.closed.load(Ordering::Acquire) {
            // After close, callers see their answer dropped: not recorded.
            return;
        }
        match self.writer.try_lock() {
            Ok(mut w) => w.append(items),
            Err(TryLockError::Poisoned(p)) => p.into_inner().append(items),
            Err(TryLockError::WouldBlock) => {
                if let Some(tx) = lock(&self.tx).as_ref() {
                    // If the thread is gone, the callers see their answer
                    // dropped: not recorded.
                    let _ = tx.send(Msg::Appends(items));
                }
            }
        }
    }

    /// Whether the spool has reached `max_bytes` (billable requests then get
    /// 503). Logged once per transition.
    pub fn is_full(&self) -> bool {
        let full = self.bytes.load(Ordering::Relaxed) >= self.config.max_bytes;
        // A plain load on the hot path; the shared line is written only
        // when the state changes (and then by one caller only).
        if full != self.full.load(Ordering::Relaxed)
            && full != self.full.swap(full, Ordering::Relaxed)
        {
            if full {
                log::error!(
                    "usage spool {} reached its bound of {} bytes: billable requests get 503 until sinks catch up",
                    self.config.dir.display(),
                    self.config.max_bytes
                );
            } else {
                log::warn!("usage spool is below its bound again: billable requests are served");
            }
        }
        full
    }

    /// Whether an append failed within `window` (a full or read-only disk):
    /// while it is, billable work is refused before it reaches the upstream
    /// (for 1 s after each failure), and `/readyz` says not ready (10 s).
    pub fn is_failing(&self, window: Duration) -> bool {
        let t = self.failed_at.load(Ordering::Relaxed);
        t != 0 && self.clock.now_ms() < t.saturating_add(window.as_millis() as u64)
    }

    /// What billable work meets now.
    pub fn state(&self) -> tollgate_core::meter::JournalState {
        use tollgate_core::meter::JournalState;
        if self.is_full() {
            JournalState::Full
        } else if self.is_failing(Duration::from_secs(1)) {
            JournalState::Failing
        } else {
            JournalState::Open
        }
    }

    /// Rolls closed windows (or, with `all`, everything) into records.
    pub async fn rollup(&self, all: bool) -> usize {
        let (done, rx) = tokio::sync::oneshot::channel();
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(Msg::Rollup {
                all,
                done: Some(done),
            });
        }
        rx.await.unwrap_or(0)
    }

    /// Records `sink` has not settled and `ready` accepts, oldest first.
    pub fn unsettled(
        &self,
        sink: &str,
        limit: usize,
        ready: impl Fn(&Record) -> bool,
    ) -> Vec<Record> {
        let st = lock(&self.state);
        let settled = st.settled.get(sink);
        st.records
            .values()
            .filter(|r| {
                r.owed_to(sink) && !settled.is_some_and(|s| s.contains_key(&r.rseq)) && ready(r)
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// Marks records settled by `sink` (delivered, or dead-lettered). Does
    /// file I/O: call it off the async workers.
    pub fn settle(&self, sink: &str, rseqs: &[u64], ok: bool) -> Result<(), SpoolError> {
        if rseqs.is_empty() {
            return Ok(());
        }
        let path = self.config.dir.join(format!("acks-{sink}.log"));
        let mut text = String::new();
        for r in rseqs {
            text.push_str(&line_with_crc(&format!(
                "A {r} {}",
                if ok { "ok" } else { "dead" }
            )));
        }
        {
            // Under the state lock, so a compaction cannot rewrite the file
            // between this append and the state update.
            let mut st = lock(&self.state);
            let text = codec::sealed(self.config.seal.as_deref(), text)?;
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            f.write_all(text.as_bytes()).map_err(|e| io_err(&path, e))?;
            let set = st.settled.entry(sink.to_owned()).or_default();
            for r in rseqs {
                set.insert(*r, ok);
            }
            let (month_start, _) = month_bounds(self.clock.now_ms());
            st.fold_settled(&self.config.sinks, month_start);
        }
        self.update_gauges();
        Ok(())
    }

    /// Appends a refused record with its reason to `dead-<sink>.jsonl`.
    pub fn dead_letter(&self, sink: &str, r: &Record, reason: &str) {
        let path = self.config.dir.join(format!("dead-{sink}.jsonl"));
        let line = serde_json::json!({
            "identifier": r.identifier,
            "customer": &*r.customer,
            "meter": &*r.meter,
            "units": r.units,
            "window_start": tollgate_core::clock::rfc3339(r.window_start),
            "window_ms": r.window_start,
            "reason": reason,
        });
        // Under the state lock: a replay rewrites this file.
        let _st = lock(&self.state);
        self.append_dead(&path, format!("{line}\n"));
    }

    /// Appends lines to a dead-letter file (sealed if the spool is); a
    /// failure is logged.
    fn append_dead(&self, path: &std::path::Path, text: String) {
        let written = codec::sealed(self.config.seal.as_deref(), text)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|text| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?
                    .write_all(text.as_bytes())
            });
        if let Err(e) = written {
            log::error!("cannot write dead letter {}: {e}", path.display());
        }
    }

    /// Stops the writer after it has written and synced everything queued.
    pub fn close(&self) {
        self.flush();
        self.closed.store(true, Ordering::Release);
        lock(&self.tx).take();
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
        lock(&self.lock).take();
    }
}

impl Drop for Spool {
    /// Like `close`: the thread is stopped before the lock is released, so
    /// a spool opened next on the same directory has it to itself.
    fn drop(&mut self) {
        self.close();
    }
}

/// Flushes the spool when dropped (see `Spool::append`).
struct FlushOnDrop(Arc<Spool>);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}

impl tollgate_core::meter::UsageJournal for Spool {
    fn append(
        self: &Arc<Self>,
        customer: &Arc<str>,
        usage: Option<(&Arc<str>, u64)>,
        charge: Option<CalendarCharge>,
        credits: Option<&Arc<CreditPolicy>>,
    ) -> impl std::future::Future<Output = bool> + Send {
        let written = Spool::journal(self, customer, usage, charge, credits);
        async move { matches!(written.await, Ok(true)) }
    }

    fn append_now(
        &self,
        customer: &Arc<str>,
        usage: &[(Arc<str>, u64)],
        credits: Option<&Arc<CreditPolicy>>,
    ) -> bool {
        self.journal_now(customer, usage, credits)
    }

    fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals> {
        Spool::totals(self, customer)
    }
}
