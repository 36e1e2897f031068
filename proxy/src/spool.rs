//! The usage spool: a write-ahead log on local disk that makes usage durable
//! before it counts as recorded, rolls it up per (customer, meter, window)
//! into records with fixed identifiers, and remembers which sink has
//! delivered which record.
//!
//! Files in `metering.spool_dir`:
//! - `instance-id`: this spool's id, part of every identifier;
//! - `events.log`: one line per billable response: `E seq ts customer meter units crc`;
//! - `records.log`: one line per rolled-up record:
//!   `R rseq upto window customer meter units identifier crc`;
//! - `acks-<sink>.log`: `A rseq ok|dead crc`, what each sink has settled;
//! - `dead-<sink>.jsonl`: records a sink refused for good, with the reason.
//!
//! Every line ends with a CRC-32 of the rest, so a line torn by a crash is
//! recognised and ignored on replay. Appends go through one writer thread
//! that writes whatever has queued up in one `write` (group commit) and
//! answers each caller once its line is in the file: a `kill -9` after that
//! loses nothing. `fsync` runs at most every `fsync_interval`, which bounds
//! what a power loss can take.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{month_bounds, Clock, Millis};
use crate::keys::crc32;

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

#[derive(Default)]
struct State {
    pending: HashMap<GroupKey, Group>,
    records: BTreeMap<u64, Record>,
    /// Per sink, the records it has settled (delivered or dead-lettered).
    settled: HashMap<String, BTreeSet<u64>>,
    next_seq: u64,
    next_rseq: u64,
}

enum Msg {
    Append {
        customer: Arc<str>,
        meter: Arc<str>,
        units: u64,
        at: Millis,
        done: tokio::sync::oneshot::Sender<bool>,
    },
    Rollup {
        all: bool,
        done: Option<tokio::sync::oneshot::Sender<usize>>,
    },
}

/// Usage of one customer and meter as the spool sees it this month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterTotals {
    pub recorded: u64,
    /// In records every sink has delivered.
    pub reported: u64,
    pub pending: u64,
}

/// Undelivered usage older than this is logged as about to age out.
pub const AGE_WARNING_SECS: u64 = 30 * 86_400;

pub struct Spool {
    aging: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    full: AtomicBool,
    config: SpoolConfig,
    clock: Arc<dyn Clock>,
    pub instance: String,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn line_with_crc(body: &str) -> String {
    format!("{body} {:08x}\n", crc32(body.as_bytes()))
}

/// The body of a line whose CRC matches; None for torn or foreign lines.
fn checked(line: &str) -> Option<&str> {
    let (body, crc) = line.rsplit_once(' ')?;
    (u32::from_str_radix(crc, 16).ok()? == crc32(body.as_bytes())).then_some(body)
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Spool {
    /// Opens (creating) the spool, replays it, compacts it and starts the writer.
    pub fn open(config: SpoolConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, String> {
        let dir = &config.dir;
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
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
        let mut st = State::default();
        // Records, and which groups they cover up to which event.
        let mut covered: HashMap<GroupKey, u64> = HashMap::new();
        for line in read_lines(&dir.join("records.log")) {
            let Some(body) = checked(&line) else { continue };
            let f: Vec<&str> = body.split(' ').collect();
            if f.len() != 8 || f[0] != "R" {
                continue;
            }
            let (Ok(rseq), Ok(upto), Ok(window), Ok(units)) = (
                f[1].parse::<u64>(),
                f[2].parse::<u64>(),
                f[3].parse::<u64>(),
                f[6].parse::<u64>(),
            ) else {
                continue;
            };
            let r = Record {
                rseq,
                upto,
                window_start: window,
                customer: f[4].into(),
                meter: f[5].into(),
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
                    set.insert(rseq);
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
            let key: GroupKey = (f[3].into(), f[4].into(), ts - ts % config.rollup);
            if covered.get(&key).is_some_and(|&upto| upto >= seq) {
                continue; // already in a record
            }
            let g = st.pending.entry(key).or_default();
            g.units += units;
            g.max_seq = g.max_seq.max(seq);
        }
        let spool = Self::compact(config, clock, instance, st)?;
        Ok(spool)
    }

    /// Rewrites the files with only what is still needed, then starts the writer.
    fn compact(
        config: SpoolConfig,
        clock: Arc<dyn Clock>,
        instance: String,
        mut st: State,
    ) -> Result<Arc<Self>, String> {
        let dir = config.dir.clone();
        let (month_start, _) = month_bounds(clock.now_ms());
        // Records every sink settled and older than this month are done.
        let done: Vec<u64> = st
            .records
            .values()
            .filter(|r| r.window_start < month_start)
            .filter(|r| {
                config
                    .sinks
                    .iter()
                    .all(|s| st.settled.get(s).is_some_and(|set| set.contains(&r.rseq)))
            })
            .map(|r| r.rseq)
            .collect();
        for rseq in done {
            st.records.remove(&rseq);
        }
        let mut events = String::new();
        for ((c, m, w), g) in &st.pending {
            // One line per group carries its sum under its highest sequence.
            events.push_str(&line_with_crc(&format!(
                "E {} {} {c} {m} {}",
                g.max_seq, w, g.units
            )));
        }
        let mut records = String::new();
        for r in st.records.values() {
            records.push_str(&record_line(r));
        }
        replace_file(&dir.join("events.log"), &events)?;
        replace_file(&dir.join("records.log"), &records)?;
        for sink in &config.sinks {
            let set = st.settled.entry(sink.clone()).or_default();
            set.retain(|r| st.records.contains_key(r));
            let mut acks = String::new();
            for r in set.iter() {
                acks.push_str(&line_with_crc(&format!("A {r} ok")));
            }
            replace_file(&dir.join(format!("acks-{sink}.log")), &acks)?;
        }
        let bytes = Arc::new(AtomicU64::new((events.len() + records.len()) as u64));
        let state = Arc::new(Mutex::new(st));
        let (tx, rx) = mpsc::channel();
        let writer = Writer::open(
            &config,
            &instance,
            clock.clone(),
            state.clone(),
            bytes.clone(),
            rx,
        )?;
        let handle = std::thread::Builder::new()
            .name("tollgate-spool".into())
            .spawn(move || writer.run())
            .map_err(|e| e.to_string())?;
        let spool = Arc::new(Spool {
            aging: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            state,
            bytes,
            full: AtomicBool::new(false),
            config,
            clock,
            instance,
            writer: Mutex::new(Some(handle)),
        });
        spool.update_gauges();
        Ok(spool)
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// Queues one billable response; resolves to true once it is in the file.
    pub fn append(
        &self,
        customer: &Arc<str>,
        meter: &Arc<str>,
        units: u64,
    ) -> tokio::sync::oneshot::Receiver<bool> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let msg = Msg::Append {
            customer: customer.clone(),
            meter: meter.clone(),
            units,
            at: self.clock.now_ms(),
            done,
        };
        if let Some(tx) = lock(&self.tx).as_ref() {
            let _ = tx.send(msg);
        }
        rx
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

    /// Records `sink` has not settled yet, oldest first.
    pub fn unsettled(&self, sink: &str, limit: usize) -> Vec<Record> {
        let st = lock(&self.state);
        let settled = st.settled.get(sink);
        st.records
            .values()
            .filter(|r| !settled.is_some_and(|s| s.contains(&r.rseq)))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Marks records settled by `sink` (delivered, or dead-lettered).
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
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        f.write_all(text.as_bytes()).map_err(|e| io_err(&path, e))?;
        let mut st = lock(&self.state);
        let set = st.settled.entry(sink.to_owned()).or_default();
        set.extend(rseqs.iter().copied());
        drop(st);
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

    /// Units not yet in a record plus units in records `sink` has not settled.
    pub fn pending_units(&self, sink: &str) -> (u64, Option<Millis>) {
        let st = lock(&self.state);
        let settled = st.settled.get(sink);
        let mut units: u64 = st.pending.values().map(|g| g.units).sum();
        let mut oldest: Option<Millis> = st.pending.keys().map(|k| k.2).min();
        for r in st.records.values() {
            if !settled.is_some_and(|s| s.contains(&r.rseq)) {
                units += r.units;
                oldest = Some(oldest.map_or(r.window_start, |o| o.min(r.window_start)));
            }
        }
        (units, oldest)
    }

    /// This month's usage of one customer per meter, as the spool knows it.
    pub fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals> {
        let (month_start, _) = month_bounds(self.clock.now_ms());
        let st = lock(&self.state);
        let mut out: BTreeMap<String, MeterTotals> = BTreeMap::new();
        for ((c, m, w), g) in &st.pending {
            if &**c == customer && *w >= month_start {
                let t = out.entry(m.to_string()).or_default();
                t.recorded += g.units;
                if !self.config.sinks.is_empty() {
                    t.pending += g.units;
                }
            }
        }
        for r in st.records.values() {
            if &*r.customer != customer || r.window_start < month_start {
                continue;
            }
            let t = out.entry(r.meter.to_string()).or_default();
            t.recorded += r.units;
            // With no sinks nothing is reported, and nothing is pending.
            if self.config.sinks.is_empty() {
                continue;
            }
            let everywhere = self
                .config
                .sinks
                .iter()
                .all(|s| st.settled.get(s).is_some_and(|set| set.contains(&r.rseq)));
            if everywhere {
                t.reported += r.units;
            } else {
                t.pending += r.units;
            }
        }
        out
    }

    /// Customers with usage this month in the spool.
    pub fn customers(&self) -> Vec<Arc<str>> {
        let st = lock(&self.state);
        let mut set: BTreeSet<Arc<str>> = st.pending.keys().map(|k| k.0.clone()).collect();
        set.extend(st.records.values().map(|r| r.customer.clone()));
        set.into_iter().collect()
    }

    pub fn update_gauges(&self) {
        crate::metrics::SPOOL_BYTES.set(self.bytes.load(Ordering::Relaxed) as i64);
        let now = self.clock.now_ms();
        for sink in &self.config.sinks {
            let (units, oldest) = self.pending_units(sink);
            crate::metrics::BILLING_PENDING
                .with_label_values(&[sink])
                .set(units as i64);
            let lag = oldest.map_or(0, |o| now.saturating_sub(o) / 1000);
            crate::metrics::BILLING_LAG
                .with_label_values(&[sink])
                .set(lag as i64);
            // Stripe refuses events older than 35 days: warn at 30.
            let aging = lag > AGE_WARNING_SECS;
            if aging != self.aging.swap(aging, Ordering::Relaxed) && aging {
                log::error!(
                    "billing sink {sink}: undelivered usage is {} days old; Stripe refuses events older than 35 days",
                    lag / 86_400
                );
            }
        }
    }

    /// Stops the writer after it has written and synced everything queued.
    pub fn close(&self) {
        lock(&self.tx).take();
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}

fn record_line(r: &Record) -> String {
    line_with_crc(&format!(
        "R {} {} {} {} {} {} {}",
        r.rseq, r.upto, r.window_start, r.customer, r.meter, r.units, r.identifier
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

struct Writer {
    events: File,
    records: File,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    rx: mpsc::Receiver<Msg>,
    fsync_interval: Duration,
    rollup: Millis,
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
        rx: mpsc::Receiver<Msg>,
    ) -> Result<Self, String> {
        let open = |name: &str| {
            let p = config.dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| io_err(&p, e))
        };
        Ok(Self {
            events: open("events.log")?,
            records: open("records.log")?,
            state,
            bytes,
            rx,
            fsync_interval: config.fsync_interval,
            rollup: config.rollup,
            instance: instance.to_owned(),
            clock,
            last_sync: Instant::now(),
            dirty: false,
        })
    }

    fn run(mut self) {
        loop {
            // Wait for work, but wake for a due fsync.
            let first = if self.dirty {
                match self.rx.recv_timeout(self.fsync_interval) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            };
            let mut batch: Vec<Msg> = first.into_iter().collect();
            while batch.len() < 4096 {
                match self.rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.handle(batch);
            if self.dirty && self.last_sync.elapsed() >= self.fsync_interval {
                self.sync();
            }
        }
        self.sync();
    }

    fn sync(&mut self) {
        if let Err(e) = self
            .events
            .sync_data()
            .and_then(|_| self.records.sync_data())
        {
            log::error!("usage spool fsync failed: {e}");
        }
        self.last_sync = Instant::now();
        self.dirty = false;
    }

    fn handle(&mut self, batch: Vec<Msg>) {
        let mut text = String::new();
        let mut acks = Vec::new();
        let mut rollups = Vec::new();
        {
            let mut st = lock(&self.state);
            for msg in batch {
                match msg {
                    Msg::Append {
                        customer,
                        meter,
                        units,
                        at,
                        done,
                    } => {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        text.push_str(&line_with_crc(&format!(
                            "E {seq} {at} {customer} {meter} {units}"
                        )));
                        let g = st
                            .pending
                            .entry((customer, meter, at - at % self.rollup))
                            .or_default();
                        g.units += units;
                        g.max_seq = g.max_seq.max(seq);
                        acks.push(done);
                    }
                    Msg::Rollup { all, done } => rollups.push((all, done)),
                }
            }
        }
        let ok = text.is_empty() || self.events.write_all(text.as_bytes()).is_ok();
        if !ok {
            log::error!(
                "usage spool write failed: usage of {} responses is not durable",
                acks.len()
            );
        }
        self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        self.dirty |= !text.is_empty();
        for a in acks {
            let _ = a.send(ok);
        }
        for (all, done) in rollups {
            let n = self.roll(all);
            if let Some(d) = done {
                let _ = d.send(n);
            }
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
        if keys.is_empty() {
            return 0;
        }
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
        drop(st);
        // Records must be durable before they are offered to sinks.
        if let Err(e) = self
            .records
            .write_all(text.as_bytes())
            .and_then(|_| self.records.sync_data())
        {
            log::error!("usage spool: cannot write records: {e}");
            let mut st = lock(&self.state);
            for r in new {
                let g = st
                    .pending
                    .entry((r.customer, r.meter, r.window_start))
                    .or_default();
                g.units += r.units;
                g.max_seq = g.max_seq.max(r.upto);
            }
            return 0;
        }
        self.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
        let n = new.len();
        let mut st = lock(&self.state);
        for r in new {
            st.records.insert(r.rseq, r);
        }
        n
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
        let recs = s.unsettled("stripe", 10);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].units, 10);
        let id = recs[0].identifier.clone();
        assert!(id.starts_with(&format!("tg-{}-", s.instance)) && id.len() <= 100);
        s.close();
        // The record and its identifier come back unchanged; the events do not
        // come back as pending (no double count).
        let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
        let recs = s.unsettled("stripe", 10);
        assert_eq!(
            (recs.len(), recs[0].identifier.as_str(), recs[0].units),
            (1, id.as_str(), 10)
        );
        assert_eq!(s.totals("cus_1")["api"].recorded, 10);
        s.settle("stripe", &[recs[0].rseq], true).unwrap();
        assert!(s.unsettled("stripe", 10).is_empty());
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
            s.unsettled("stripe", 10).is_empty(),
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
        let r = s.unsettled("a", 1)[0].rseq;
        s.settle("a", &[r], true).unwrap();
        assert!(s.unsettled("a", 9).is_empty());
        assert_eq!(s.unsettled("b", 9).len(), 1);
        assert_eq!(s.pending_units("b").0, 1);
        assert_eq!(
            s.totals("cus_1")["api"].reported,
            0,
            "reported once every sink has it"
        );
    }
}
