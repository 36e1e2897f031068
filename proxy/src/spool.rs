//! The usage spool: a write-ahead log on local disk that makes usage durable
//! before it counts as recorded, rolls it up per (customer, meter, window)
//! into records with fixed identifiers, and remembers which sink has
//! settled which record.
//!
//! Files in `metering.spool_dir`:
//! - `instance-id`: this spool's id, part of every identifier;
//! - `rollup`: the window (ms) the events on disk were written for;
//! - `events.log`: one line per billable response: `E seq ts customer meter units crc`;
//! - `records.log`: `H next` (the record sequence high-water mark: sequences,
//!   and so identifiers, are never reused), `S month customer meter recorded
//!   reported` (this month's usage already settled everywhere and dropped
//!   from memory), and `R rseq upto window customer meter units identifier`
//!   (records some sink still owes);
//! - `acks-<sink>.log`: `A rseq ok|dead`, what each sink has settled;
//! - `dead-<sink>.jsonl`: records a sink refused for good, with the reason.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use crate::clock::{month_bounds, Clock, Millis};
use crate::keys::crc32;
use crate::{lock, Pending};

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
    /// changes on retry.
    pub identifier: String,
}

type GroupKey = (Arc<str>, Arc<str>, Millis);

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
    next_seq: u64,
    next_rseq: u64,
}

impl State {
    /// Moves records every sink has settled into the summaries.
    fn fold_settled(&mut self, sinks: &[String], month_start: Millis) {
        let done: Vec<u64> = self
            .records
            .keys()
            .copied()
            .filter(|r| {
                sinks
                    .iter()
                    .all(|s| self.settled.get(s).is_some_and(|m| m.contains_key(r)))
            })
            .collect();
        for rseq in done {
            let Some(r) = self.records.remove(&rseq) else {
                continue;
            };
            let delivered = !sinks.is_empty()
                && sinks
                    .iter()
                    .all(|s| self.settled.get(s).and_then(|m| m.get(&rseq)) == Some(&true));
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
            sum.recorded = sum.recorded.saturating_add(r.units);
            if delivered {
                sum.reported = sum.reported.saturating_add(r.units);
            }
        }
    }
}

/// One billable response waiting for its line to be written.
struct Append {
    customer: Arc<str>,
    meter: Arc<str>,
    units: u64,
    at: Millis,
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

/// Usage of one customer and meter as the spool sees it this month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterTotals {
    pub recorded: u64,
    /// Delivered by every sink.
    pub reported: u64,
    /// Not yet settled by every sink.
    pub pending: u64,
}

pub struct Spool {
    aging: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    queue: Mutex<Pending<Append>>,
    /// Set by `close`: nothing is written after it.
    closed: AtomicBool,
    writer: Arc<Mutex<Writer>>,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    full: AtomicBool,
    config: SpoolConfig,
    clock: Arc<dyn Clock>,
    pub instance: String,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held (flock) until the spool is closed or dropped.
    lock: Mutex<Option<File>>,
}

fn line_with_crc(body: &str) -> String {
    format!("{body} {:08x}\n", crc32(body.as_bytes()))
}

/// The body of a line whose CRC matches; None for torn or foreign lines.
fn checked(line: &str) -> Option<&str> {
    let (body, crc) = line.rsplit_once(' ')?;
    (u32::from_str_radix(crc, 16).ok()? == crc32(body.as_bytes())).then_some(body)
}

/// Whether a byte can stand in a space-separated line as it is.
fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'%'
}

/// Escapes what would break a space-separated line.
fn esc(s: &str) -> String {
    crate::pct::encode(s, plain)
}

fn unesc(s: &str) -> Arc<str> {
    if s.contains('%') {
        crate::pct::decode(s, false).into()
    } else {
        s.into()
    }
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

fn record_line(r: &Record) -> String {
    line_with_crc(&format!(
        "R {} {} {} {} {} {} {}",
        r.rseq,
        r.upto,
        r.window_start,
        esc(&r.customer),
        esc(&r.meter),
        r.units,
        r.identifier
    ))
}

fn read_lines(path: &Path) -> Vec<String> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

fn replace_file(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Rewrites the three kinds of file with what is still needed, in the order
/// that keeps a crash at any point safe: events first (so no event loses
/// the record that covers it), then records (with the high-water mark, so no
/// sequence is reused), then acks. Returns the new size of events + records.
fn compact_files(
    dir: &Path,
    sinks: &[String],
    st: &mut State,
    month_start: Millis,
) -> Result<u64, String> {
    st.fold_settled(sinks, month_start);
    let mut events = String::new();
    for ((c, m, w), g) in &st.pending {
        // One line per group carries its sum under its highest sequence.
        events.push_str(&line_with_crc(&format!(
            "E {} {} {} {} {}",
            g.max_seq,
            w,
            esc(c),
            esc(m),
            g.units
        )));
    }
    let mut records = line_with_crc(&format!("H {}", st.next_rseq));
    for ((c, m), sum) in st
        .summaries
        .iter()
        .flat_map(|(c, ms)| ms.iter().map(move |(m, s)| ((c, m), s)))
    {
        if sum.month >= month_start {
            records.push_str(&line_with_crc(&format!(
                "S {} {} {} {} {}",
                sum.month,
                esc(c),
                esc(m),
                sum.recorded,
                sum.reported
            )));
        }
    }
    for r in st.records.values() {
        records.push_str(&record_line(r));
    }
    replace_file(&dir.join("events.log"), &events)?;
    replace_file(&dir.join("records.log"), &records)?;
    for sink in sinks {
        let mut acks = String::new();
        for (r, ok) in st.settled.get(sink).into_iter().flatten() {
            acks.push_str(&line_with_crc(&format!(
                "A {r} {}",
                if *ok { "ok" } else { "dead" }
            )));
        }
        replace_file(&dir.join(format!("acks-{sink}.log")), &acks)?;
    }
    Ok((events.len() + records.len()) as u64)
}

impl Spool {
    /// Opens (creating) the spool, replays it, compacts it and starts the writer.
    pub fn open(config: SpoolConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, String> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock_path = dir.join("lock");
        let lock_file = File::create(&lock_path).map_err(|e| io_err(&lock_path, e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "usage spool {} is in use by another Tollgate process; each instance needs its own metering.spool_dir",
                    dir.display()
                ))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        let id_path = dir.join("instance-id");
        let instance = match fs::read_to_string(&id_path) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => {
                let mut b = [0u8; 5];
                crate::keys::random_bytes(&mut b).map_err(|e| io_err(&id_path, e))?;
                let id = hex::encode(b);
                fs::write(&id_path, &id).map_err(|e| io_err(&id_path, e))?;
                id
            }
        };
        // Events on disk were grouped with the rollup they were written
        // under; a changed setting applies to new events only.
        let rollup_path = dir.join("rollup");
        let disk_rollup = fs::read_to_string(&rollup_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&r| r > 0)
            .unwrap_or(config.rollup);
        let (month_start, _) = month_bounds(clock.now_ms());
        let mut st = State::default();
        let mut covered: HashMap<GroupKey, u64> = HashMap::new();
        for line in read_lines(&dir.join("records.log")) {
            let Some(body) = checked(&line) else { continue };
            let f: Vec<&str> = body.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match f.first().copied() {
                Some("H") => st.next_rseq = st.next_rseq.max(num(1).unwrap_or(0)),
                Some("S") if f.len() == 6 => {
                    let (Some(month), Some(rec), Some(rep)) = (num(1), num(4), num(5)) else {
                        continue;
                    };
                    if month >= month_start {
                        st.summaries.entry(unesc(f[2])).or_default().insert(
                            unesc(f[3]),
                            Summary {
                                month,
                                recorded: rec,
                                reported: rep,
                            },
                        );
                    }
                }
                Some("R") if f.len() == 8 => {
                    let (Some(rseq), Some(upto), Some(window), Some(units)) =
                        (num(1), num(2), num(3), num(6))
                    else {
                        continue;
                    };
                    let r = Record {
                        rseq,
                        upto,
                        window_start: window,
                        customer: unesc(f[4]),
                        meter: unesc(f[5]),
                        units,
                        identifier: f[7].to_owned(),
                    };
                    let g = covered
                        .entry((r.customer.clone(), r.meter.clone(), window))
                        .or_insert(0);
                    *g = (*g).max(upto);
                    st.next_rseq = st.next_rseq.max(rseq + 1);
                    st.next_seq = st.next_seq.max(upto + 1);
                    st.records.insert(rseq, r);
                }
                _ => {}
            }
        }
        for sink in &config.sinks {
            let set = st.settled.entry(sink.clone()).or_default();
            for line in read_lines(&dir.join(format!("acks-{sink}.log"))) {
                let Some(body) = checked(&line) else { continue };
                let f: Vec<&str> = body.split(' ').collect();
                if let (3, Some("A"), Some(Ok(rseq))) = (
                    f.len(),
                    f.first().copied(),
                    f.get(1).map(|s| s.parse::<u64>()),
                ) {
                    // Acks of records no longer on disk are stale.
                    if st.records.contains_key(&rseq) {
                        set.insert(rseq, f[2] == "ok");
                    }
                }
            }
        }
        for line in read_lines(&dir.join("events.log")) {
            let Some(body) = checked(&line) else { continue };
            let f: Vec<&str> = body.split(' ').collect();
            if f.len() != 6 || f[0] != "E" {
                continue;
            }
            let (Ok(seq), Ok(ts), Ok(units)) = (
                f[1].parse::<u64>(),
                f[2].parse::<u64>(),
                f[5].parse::<u64>(),
            ) else {
                continue;
            };
            st.next_seq = st.next_seq.max(seq + 1);
            let key: GroupKey = (unesc(f[3]), unesc(f[4]), ts - ts % disk_rollup);
            if covered.get(&key).is_some_and(|&upto| upto >= seq) {
                continue; // already in a record
            }
            let g = st.pending.entry(key).or_default();
            g.units = g.units.saturating_add(units);
            g.max_seq = g.max_seq.max(seq);
        }
        let size = compact_files(&dir, &config.sinks, &mut st, month_start)?;
        fs::write(&rollup_path, config.rollup.to_string()).map_err(|e| io_err(&rollup_path, e))?;

        let bytes = Arc::new(AtomicU64::new(size));
        let state = Arc::new(Mutex::new(st));
        let (tx, rx) = mpsc::channel();
        let writer = Arc::new(Mutex::new(Writer::open(
            &config,
            &instance,
            clock.clone(),
            state.clone(),
            bytes.clone(),
        )?));
        let handle = {
            let writer = writer.clone();
            let interval = config.fsync_interval;
            std::thread::Builder::new()
                .name("tollgate-spool".into())
                .spawn(move || Writer::run(&writer, &rx, interval))
                .map_err(|e| e.to_string())?
        };
        let spool = Arc::new(Spool {
            aging: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            queue: Mutex::new(Pending::default()),
            closed: AtomicBool::new(false),
            writer,
            state,
            bytes,
            full: AtomicBool::new(false),
            config,
            clock,
            instance,
            thread: Mutex::new(Some(handle)),
            lock: Mutex::new(Some(lock_file)),
        });
        spool.update_gauges();
        Ok(spool)
    }

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
        let (done, rx) = tokio::sync::oneshot::channel();
        let item = Append {
            customer: customer.clone(),
            meter: meter.clone(),
            units,
            at: self.clock.now_ms(),
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
        if full != self.full.swap(full, Ordering::Relaxed) {
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
            .filter(|r| !settled.is_some_and(|s| s.contains_key(&r.rseq)) && ready(r))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Marks records settled by `sink` (delivered, or dead-lettered). Does
    /// file I/O: call it off the async workers.
    pub fn settle(&self, sink: &str, rseqs: &[u64], ok: bool) -> Result<(), String> {
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
            "window_start": crate::clock::rfc3339(r.window_start),
            "reason": reason,
        });
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            log::error!("cannot write dead letter {}: {e}", path.display());
        }
    }

    /// Units not yet in a record plus units in records `sink` has not
    /// settled, and the start of the oldest such window.
    pub fn pending_units(&self, sink: &str) -> (u64, Option<Millis>) {
        let st = lock(&self.state);
        let settled = st.settled.get(sink);
        let mut units = st
            .pending
            .values()
            .fold(0u64, |a, g| a.saturating_add(g.units));
        let mut oldest: Option<Millis> = st.pending.keys().map(|k| k.2).min();
        for r in st.records.values() {
            if !settled.is_some_and(|s| s.contains_key(&r.rseq)) {
                units = units.saturating_add(r.units);
                oldest = Some(oldest.map_or(r.window_start, |o| o.min(r.window_start)));
            }
        }
        (units, oldest)
    }

    /// This month's usage of one customer per meter, as the spool knows it.
    pub fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals> {
        let (month_start, _) = month_bounds(self.clock.now_ms());
        let no_sinks = self.config.sinks.is_empty();
        let st = lock(&self.state);
        let mut out: BTreeMap<String, MeterTotals> = BTreeMap::new();
        for (m, s) in st.summaries.get(customer).into_iter().flatten() {
            if s.month >= month_start {
                let t = out.entry(m.to_string()).or_default();
                t.recorded = t.recorded.saturating_add(s.recorded);
                t.reported = t.reported.saturating_add(s.reported);
            }
        }
        let in_flight = st
            .pending
            .iter()
            .filter(|(k, _)| &*k.0 == customer && k.2 >= month_start)
            .map(|(k, g)| (&k.1, g.units))
            .chain(
                st.records
                    .values()
                    .filter(|r| &*r.customer == customer && r.window_start >= month_start)
                    .map(|r| (&r.meter, r.units)),
            );
        for (m, units) in in_flight {
            let t = out.entry(m.to_string()).or_default();
            t.recorded = t.recorded.saturating_add(units);
            // With no sinks nothing is reported, and nothing is pending.
            if !no_sinks {
                t.pending = t.pending.saturating_add(units);
            }
        }
        out
    }

    /// Units recorded this month per (customer, meter), in one pass (for
    /// seeding the in-process ledger at start).
    pub fn recorded_this_month(&self) -> HashMap<(Arc<str>, Arc<str>), u64> {
        let (month_start, _) = month_bounds(self.clock.now_ms());
        let st = lock(&self.state);
        let mut out: HashMap<(Arc<str>, Arc<str>), u64> = HashMap::new();
        let mut add = |c: &Arc<str>, m: &Arc<str>, units: u64| {
            let n = out.entry((c.clone(), m.clone())).or_default();
            *n = n.saturating_add(units);
        };
        for (c, ms) in &st.summaries {
            for (m, s) in ms {
                if s.month >= month_start {
                    add(c, m, s.recorded);
                }
            }
        }
        for ((c, m, w), g) in &st.pending {
            if *w >= month_start {
                add(c, m, g.units);
            }
        }
        for r in st.records.values() {
            if r.window_start >= month_start {
                add(&r.customer, &r.meter, r.units);
            }
        }
        out
    }

    /// Customers with usage this month in the spool.
    pub fn customers(&self) -> Vec<Arc<str>> {
        let st = lock(&self.state);
        let mut set: BTreeSet<Arc<str>> = st.pending.keys().map(|k| k.0.clone()).collect();
        set.extend(st.records.values().map(|r| r.customer.clone()));
        set.extend(st.summaries.keys().cloned());
        set.into_iter().collect()
    }

    pub fn update_gauges(&self) {
        crate::metrics::SPOOL_BYTES.set(self.bytes.load(Ordering::Relaxed) as i64);
        let now = self.clock.now_ms();
        let mut max_lag = 0;
        for sink in &self.config.sinks {
            let (units, oldest) = self.pending_units(sink);
            crate::metrics::BILLING_PENDING
                .with_label_values(&[sink])
                .set(units as i64);
            let lag = oldest.map_or(0, |o| now.saturating_sub(o) / 1000);
            crate::metrics::BILLING_LAG
                .with_label_values(&[sink])
                .set(lag as i64);
            max_lag = max_lag.max(lag);
        }
        // Stripe refuses events older than 35 days: warn at 30.
        let aging = max_lag > AGE_WARNING_SECS;
        if aging != self.aging.swap(aging, Ordering::Relaxed) && aging {
            log::error!(
                "undelivered usage is {} days old; Stripe refuses events older than 35 days",
                max_lag / 86_400
            );
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

struct Writer {
    dir: PathBuf,
    events: LogFile,
    records: LogFile,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    rollup: Millis,
    sinks: Vec<String>,
    instance: String,
    clock: Arc<dyn Clock>,
    last_sync: Instant,
    dirty: bool,
}

impl Writer {
    fn open(
        config: &SpoolConfig,
        instance: &str,
        clock: Arc<dyn Clock>,
        state: Arc<Mutex<State>>,
        bytes: Arc<AtomicU64>,
    ) -> Result<Self, String> {
        Ok(Self {
            dir: config.dir.clone(),
            events: LogFile::open(&config.dir.join("events.log"))?,
            records: LogFile::open(&config.dir.join("records.log"))?,
            state,
            bytes,
            rollup: config.rollup,
            sinks: config.sinks.clone(),
            instance: instance.to_owned(),
            clock,
            last_sync: Instant::now(),
            dirty: false,
        })
    }

    /// The spool's thread: rollups, appends that found the writer busy,
    /// and the periodic fsync. Ends when the spool is closed.
    fn run(writer: &Mutex<Writer>, rx: &mpsc::Receiver<Msg>, fsync_interval: Duration) {
        loop {
            let mut batch = Vec::new();
            match rx.recv_timeout(fsync_interval.max(Duration::from_millis(1))) {
                Ok(m) => batch.push(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::new();
            let mut rollups = Vec::new();
            for m in batch {
                match m {
                    Msg::Appends(a) => appends.extend(a),
                    Msg::Rollup { all, done } => rollups.push((all, done)),
                }
            }
            {
                let mut w = lock(writer);
                w.append(appends);
                for (all, done) in rollups {
                    let n = w.roll(all);
                    if let Some(d) = done {
                        let _ = d.send(n);
                    }
                }
            }
            Self::sync(writer, fsync_interval);
        }
        Self::sync(writer, Duration::ZERO);
    }

    /// Syncs the files if they were written and the last sync is at least
    /// `every` ago. The writer stays free meanwhile: appends go on while
    /// the disk catches up.
    fn sync(writer: &Mutex<Writer>, every: Duration) {
        let files = {
            let mut w = lock(writer);
            if !w.dirty || w.last_sync.elapsed() < every {
                return;
            }
            w.dirty = false;
            w.last_sync = Instant::now();
            (w.events.file.try_clone(), w.records.file.try_clone())
        };
        let synced = match files {
            (Ok(e), Ok(r)) => e.sync_data().and_then(|_| r.sync_data()),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        if let Err(e) = synced {
            log::error!("usage spool fsync failed: {e}");
            lock(writer).dirty = true;
        }
    }

    /// Writes the lines of `items` in one append and answers each caller.
    fn append(&mut self, items: Vec<Append>) {
        if items.is_empty() {
            return;
        }
        let mut text = String::with_capacity(items.len() * 64);
        let mut added: Vec<(GroupKey, u64, u64)> = Vec::with_capacity(items.len());
        let mut acks = Vec::with_capacity(items.len());
        let mut st = lock(&self.state);
        for a in items {
            let seq = st.next_seq;
            st.next_seq += 1;
            // `E seq ts customer meter units crc`, written in place: this
            // runs for every billable response.
            let start = text.len();
            let _ = write!(text, "E {seq} {} ", a.at);
            crate::pct::encode_into(&mut text, &a.customer, plain);
            text.push(' ');
            crate::pct::encode_into(&mut text, &a.meter, plain);
            let _ = write!(text, " {}", a.units);
            let crc = crc32(&text.as_bytes()[start..]);
            let _ = writeln!(text, " {crc:08x}");
            added.push((
                (a.customer, a.meter, a.at - a.at % self.rollup),
                a.units,
                seq,
            ));
            acks.push(a.done);
        }
        // Sequences are handed out and written under the state lock, so the
        // file holds them in order and a rollup never sees a later event of
        // a group before an earlier one is in the file.
        let ok = self.events.append(text.as_bytes());
        if ok {
            // Only what is in the file counts.
            for (key, units, seq) in added {
                let g = st.pending.entry(key).or_default();
                g.units = g.units.saturating_add(units);
                g.max_seq = g.max_seq.max(seq);
            }
            self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
            self.dirty = true;
        } else {
            log::error!(
                "usage spool write failed: {} responses are refused",
                acks.len()
            );
        }
        drop(st);
        for a in acks {
            let _ = a.send(ok);
        }
    }

    /// Turns closed windows' groups into records (written and synced first).
    fn roll(&mut self, all: bool) -> usize {
        let now = self.clock.now_ms();
        let mut st = lock(&self.state);
        // A window is closed once it has ended (plus a second for requests
        // still in flight across its end).
        let keys: Vec<GroupKey> = st
            .pending
            .keys()
            .filter(|k| all || k.2 + self.rollup + 1000 <= now)
            .cloned()
            .collect();
        let mut text = String::new();
        let mut new = Vec::new();
        for k in keys {
            let Some(g) = st.pending.remove(&k) else {
                continue;
            };
            let rseq = st.next_rseq;
            st.next_rseq += 1;
            let r = Record {
                rseq,
                upto: g.max_seq,
                window_start: k.2,
                customer: k.0,
                meter: k.1,
                units: g.units,
                identifier: format!("tg-{}-{rseq}", self.instance),
            };
            text.push_str(&record_line(&r));
            new.push(r);
        }
        // Records must be durable before they are offered to sinks.
        let written = text.is_empty()
            || (self.records.append(text.as_bytes()) && self.records.file.sync_data().is_ok());
        if !written {
            log::error!("usage spool: cannot write records; will try again");
            for r in new {
                let g = st
                    .pending
                    .entry((r.customer, r.meter, r.window_start))
                    .or_default();
                g.units = g.units.saturating_add(r.units);
                g.max_seq = g.max_seq.max(r.upto);
            }
            return 0;
        }
        self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        let n = new.len();
        for r in new {
            st.records.insert(r.rseq, r);
        }
        if self.sinks.is_empty() {
            // Nothing will ever settle them: fold straight into the summaries.
            let (month_start, _) = month_bounds(now);
            st.fold_settled(&self.sinks, month_start);
        }
        if self.events.len > COMPACT_AT || self.records.len > COMPACT_AT {
            let (month_start, _) = month_bounds(now);
            match compact_files(&self.dir, &self.sinks, &mut st, month_start) {
                Ok(bytes) => {
                    self.bytes.store(bytes, Ordering::Relaxed);
                    match (
                        LogFile::open(&self.dir.join("events.log")),
                        LogFile::open(&self.dir.join("records.log")),
                    ) {
                        (Ok(e), Ok(r)) => {
                            self.events = e;
                            self.records = r;
                        }
                        _ => log::error!("usage spool: cannot reopen files after compaction"),
                    }
                }
                Err(e) => log::error!("usage spool: compaction failed: {e}"),
            }
        }
        n
    }
}

/// A file opened for appending that knows its length.
struct LogFile {
    file: File,
    len: u64,
}

impl LogFile {
    fn open(p: &Path) -> Result<Self, String> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| io_err(p, e))?;
        let len = file.metadata().map_err(|e| io_err(p, e))?.len();
        Ok(Self { file, len })
    }

    /// Appends `data`; on failure cuts the file back so no half line is
    /// left for the next append to be glued to.
    fn append(&mut self, data: &[u8]) -> bool {
        if self.file.write_all(data).is_ok() {
            self.len += data.len() as u64;
            return true;
        }
        let _ = self.file.set_len(self.len);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, sinks: &[&str]) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            fsync_interval: Duration::from_millis(10),
            max_bytes: 1 << 30,
            rollup: 1000,
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn clock() -> Arc<dyn Clock> {
        Arc::new(crate::clock::SystemClock)
    }

    #[tokio::test]
    async fn events_survive_a_restart_and_roll_up_once() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        for _ in 0..5 {
            assert!(s.append(&c, &m, 2).await.unwrap());
        }
        // Dropped without close: like a crash after the writes.
        drop(s);
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        assert_eq!(
            s.totals("cus_1")["api"],
            MeterTotals {
                recorded: 10,
                reported: 0,
                pending: 10
            }
        );
        assert_eq!(s.rollup(true).await, 1);
        let recs = s.unsettled("stripe", 10, |_| true);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].units, 10);
        let id = recs[0].identifier.clone();
        assert!(id.starts_with(&format!("tg-{}-", s.instance)) && id.len() <= 100);
        s.close();
        // The record and its identifier come back unchanged; the events do not
        // come back as pending (no double count).
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        let recs = s.unsettled("stripe", 10, |_| true);
        assert_eq!(
            (recs.len(), recs[0].identifier.as_str(), recs[0].units),
            (1, id.as_str(), 10)
        );
        assert_eq!(s.totals("cus_1")["api"].recorded, 10);
        assert_eq!(
            s.recorded_this_month()[&(c.clone(), m.clone())],
            10,
            "seeds the ledger after a restart"
        );
        s.settle("stripe", &[recs[0].rseq], true).unwrap();
        assert!(s.unsettled("stripe", 10, |_| true).is_empty());
        assert_eq!(
            s.totals("cus_1")["api"],
            MeterTotals {
                recorded: 10,
                reported: 10,
                pending: 0
            }
        );
        s.close();
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        assert!(
            s.unsettled("stripe", 10, |_| true).is_empty(),
            "settled stays settled"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
        assert!(s.append(&c, &m, 3).await.unwrap());
        s.close();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("events.log"))
            .unwrap();
        f.write_all(b"E 99 1 cus_1 api 1000 dead").unwrap(); // no CRC match, no newline
        let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
        assert_eq!(s.totals("cus_1")["api"].recorded, 3);
    }

    #[tokio::test]
    async fn each_sink_settles_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let s = Spool::open(config(dir.path(), &["a", "b"]), clock()).unwrap();
        assert!(s.append(&c, &m, 1).await.unwrap());
        s.rollup(true).await;
        let r = s.unsettled("a", 1, |_| true)[0].rseq;
        s.settle("a", &[r], true).unwrap();
        assert!(s.unsettled("a", 9, |_| true).is_empty());
        assert_eq!(s.unsettled("b", 9, |_| true).len(), 1);
        assert_eq!(s.pending_units("b").0, 1);
        assert_eq!(
            s.totals("cus_1")["api"].reported,
            0,
            "reported once every sink has it"
        );
    }

    #[tokio::test]
    async fn identifiers_are_never_reused_after_settled_records_are_dropped() {
        use crate::clock::{days_from_civil, Date, ManualClock, DAY};
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let jan = days_from_civil(Date {
            year: 2027,
            month: 1,
            day: 20,
        }) as Millis
            * DAY;
        let clock = ManualClock::at(jan);
        let s = Spool::open(config(dir.path(), &["stripe"]), Arc::new(clock.clone())).unwrap();
        assert!(s.append(&c, &m, 1).await.unwrap());
        s.rollup(true).await;
        let first = s.unsettled("stripe", 9, |_| true)[0].clone();
        s.settle("stripe", &[first.rseq], true).unwrap();
        s.close();
        // A month later every January record is gone from the files...
        clock.set(jan + 31 * DAY);
        let s = Spool::open(config(dir.path(), &["stripe"]), Arc::new(clock.clone())).unwrap();
        assert!(s.totals("cus_1").is_empty());
        let records = fs::read_to_string(dir.path().join("records.log")).unwrap();
        assert!(!records.contains(&first.identifier), "{records}");
        // ...but the next identifier is still new.
        assert!(s.append(&c, &m, 1).await.unwrap());
        s.rollup(true).await;
        let second = s.unsettled("stripe", 9, |_| true)[0].clone();
        assert!(second.rseq > first.rseq, "{second:?} reuses {first:?}");
        assert_ne!(second.identifier, first.identifier);
    }

    #[tokio::test]
    async fn a_changed_rollup_does_not_count_rolled_events_again() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus 1%".into(), "api".into());
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        for _ in 0..3 {
            assert!(s.append(&c, &m, 1).await.unwrap());
        }
        s.rollup(true).await;
        s.close();
        let mut cfg = config(dir.path(), &["stripe"]);
        cfg.rollup = 60_000;
        let s = Spool::open(cfg, clock()).unwrap();
        let recs = s.unsettled("stripe", 9, |_| true);
        assert_eq!(recs.len(), 1);
        assert_eq!(
            &*recs[0].customer, "cus 1%",
            "odd ids survive the line format"
        );
        assert_eq!(s.totals("cus 1%")["api"].recorded, 3, "not 6");
    }

    #[tokio::test]
    async fn settled_usage_leaves_memory_and_files_but_stays_in_the_totals() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
        for _ in 0..100 {
            assert!(s.append(&c, &m, 1).await.unwrap());
        }
        s.rollup(true).await;
        let r = s.unsettled("a", 9, |_| true)[0].rseq;
        s.settle("a", &[r], true).unwrap();
        assert_eq!(lock(&s.state).records.len(), 0, "folded into the summary");
        s.close();
        let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
        assert_eq!(
            s.totals("cus_1")["api"],
            MeterTotals {
                recorded: 100,
                reported: 100,
                pending: 0
            }
        );
        let size = |f: &str| fs::metadata(dir.path().join(f)).unwrap().len();
        assert!(
            size("events.log") == 0 && size("records.log") < 200,
            "compacted at start"
        );
        assert!(!s.is_full());
    }

    #[tokio::test]
    async fn a_dead_letter_is_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
        let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
        assert!(s.append(&c, &m, 4).await.unwrap());
        s.rollup(true).await;
        let r = s.unsettled("a", 9, |_| true)[0].rseq;
        s.settle("a", &[r], false).unwrap();
        assert_eq!(
            s.totals("cus_1")["api"],
            MeterTotals {
                recorded: 4,
                reported: 0,
                pending: 0
            }
        );
    }

    #[test]
    fn a_second_process_cannot_open_a_spool_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
        let err = Spool::open(config(dir.path(), &[]), clock())
            .err()
            .expect("the spool is locked");
        assert!(err.contains("in use by another Tollgate process"), "{err}");
        s.close();
        Spool::open(config(dir.path(), &[]), clock()).expect("free again after close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_each_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
        let m: Arc<str> = "api".into();
        let mut tasks = Vec::new();
        for i in 0..400u64 {
            let (s, m) = (s.clone(), m.clone());
            tasks.push(tokio::spawn(async move {
                let c: Arc<str> = format!("cus_{}", i % 4).into();
                s.append(&c, &m, 1 + i % 3).await.unwrap()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        // A rollup may hold the writer while appends arrive; whether they
        // are written here or on the spool's thread, each lands once.
        let more: Vec<_> = (0..100u64)
            .map(|_| {
                let (s, m) = (s.clone(), m.clone());
                tokio::spawn(async move { s.append(&"cus_0".into(), &m, 1).await.unwrap() })
            })
            .collect();
        s.rollup(false).await;
        for t in more {
            assert!(t.await.unwrap());
        }
        s.close();
        drop(s);
        let events = fs::read_to_string(dir.path().join("events.log")).unwrap();
        let seqs: BTreeSet<u64> = events
            .lines()
            .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(seqs.len(), 500, "one line and one sequence per response");
        let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
        let expect = |c: u64| {
            (0..400u64)
                .filter(|i| i % 4 == c)
                .map(|i| 1 + i % 3)
                .sum::<u64>()
        };
        for c in 0..4u64 {
            let extra = if c == 0 { 100 } else { 0 };
            assert_eq!(
                s.totals(&format!("cus_{c}"))["api"].recorded,
                expect(c) + extra
            );
        }
    }
}
