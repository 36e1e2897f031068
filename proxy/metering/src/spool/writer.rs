//! The writer: appends event lines (group commit), rolls windows up into
//! records, syncs at most every `fsync_interval`, and runs on the spool's
//! own thread whenever a caller finds it busy.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::clock::{month_bounds, Clock, Millis};
use tollgate_core::keys::crc32;
use tollgate_core::sync::{lock, write};

use super::alerts::{alert_line, CreditCrossings};
use super::codec::{io_err, plain, record_line};
use super::compact::compact_files;
use super::credits::{charge_line, OwedCharge};
use super::{
    window_code, Append, CounterKey, GroupKey, Msg, Record, Seal, SpoolConfig, SpoolError, State,
    COMPACT_AT,
};
use tollgate_core::alerts::{Alert, Thresholds};
use tollgate_core::credits::Allowance;
use tollgate_core::limiter::calendar_window;

pub(super) struct Writer {
    dir: PathBuf,
    events: LogFile,
    records: LogFile,
    state: Arc<Mutex<State>>,
    bytes: Arc<AtomicU64>,
    /// When an append last failed (ms; 0: the last one succeeded).
    failed_at: Arc<AtomicU64>,
    rollup: Millis,
    sinks: Vec<String>,
    instance: String,
    clock: Arc<dyn Clock>,
    last_sync: Instant,
    dirty: bool,
    seal: Option<Arc<Seal>>,
    /// The percents of credits that raise an alert.
    alerts: Thresholds,
}

impl Writer {
    pub(super) fn open(
        config: &SpoolConfig,
        instance: &str,
        clock: Arc<dyn Clock>,
        state: Arc<Mutex<State>>,
        bytes: Arc<AtomicU64>,
        failed_at: Arc<AtomicU64>,
    ) -> Result<Self, SpoolError> {
        Ok(Self {
            dir: config.dir.clone(),
            events: LogFile::open(&config.dir.join("events.log"), config.seal.clone())?,
            records: LogFile::open(&config.dir.join("records.log"), config.seal.clone())?,
            seal: config.seal.clone(),
            state,
            bytes,
            failed_at,
            rollup: config.rollup,
            sinks: config.sinks.clone(),
            instance: instance.to_owned(),
            clock,
            last_sync: Instant::now(),
            dirty: false,
            alerts: config.alerts.clone(),
        })
    }

    /// The spool's thread: rollups, appends that found the writer busy,
    /// and the periodic fsync. Ends when the spool is closed.
    pub(super) fn run(writer: &Mutex<Writer>, rx: &mpsc::Receiver<Msg>, fsync_interval: Duration) {
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
    pub(super) fn append(&mut self, items: Vec<Append>) {
        if items.is_empty() {
            return;
        }
        let mut text = String::with_capacity(items.len() * 64);
        let mut added: Vec<(GroupKey, u64, u64)> = Vec::with_capacity(items.len());
        let mut counted: Vec<(CounterKey, Millis, u64)> = Vec::new();
        let mut charged: Vec<(Arc<str>, Allowance, u64, Millis)> = Vec::new();
        let mut raised: Vec<Alert> = Vec::new();
        let mut acks = Vec::with_capacity(items.len());
        let mut st = lock(&self.state);
        // Credit thresholds the charges reach: their lines follow the
        // charge's, in the same write.
        let shared = st.shared_credits;
        let mut owed = Vec::new();
        let watch = !shared && !self.alerts.is_empty() && items.iter().any(|a| a.credits.is_some());
        let books = watch.then(|| (st.credits.clone(), st.alerts.clone()));
        let mut held = books.as_ref().map(|(c, o)| (lock(c), write(o)));
        let mut crossings = CreditCrossings::new(&self.alerts);
        for a in items {
            if let Some(alert) = a.alert {
                text.push_str(&alert_line(&alert));
                raised.push(*alert);
            }
            if let Some((meter, units)) = a.usage {
                // What the units cost in credits, on the line after them.
                let credits = a
                    .credits
                    .as_ref()
                    .map(|p| (p, p.cost(&meter, units)))
                    .filter(|(_, c)| *c > 0);
                let seq = st.next_seq;
                st.next_seq += 1;
                // `E seq ts customer meter units crc`, written in place: this
                // runs for every billable response.
                let start = text.len();
                let _ = write!(text, "E {seq} {} ", a.at);
                tollgate_core::pct::encode_into(&mut text, &a.customer, plain);
                text.push(' ');
                tollgate_core::pct::encode_into(&mut text, &meter, plain);
                let _ = write!(text, " {units}");
                let crc = crc32(&text.as_bytes()[start..]);
                let _ = writeln!(text, " {crc:08x}");
                added.push((
                    (a.customer.clone(), meter, a.at - a.at % self.rollup),
                    units,
                    seq,
                ));
                if let Some((policy, credits)) = credits.filter(|_| shared) {
                    // Owed to the shared store, which keeps the balance.
                    let seq = st.next_kseq;
                    st.next_kseq += 1;
                    let allowance = policy.allowance;
                    let owes = Some((seq, &*policy.plan));
                    charge_line(&mut text, &a.customer, allowance, credits, a.at, owes);
                    owed.push(OwedCharge {
                        seq,
                        customer: a.customer.clone(),
                        plan: policy.plan.clone(),
                        allowance,
                        credits,
                        at: a.at,
                    });
                } else if let Some((policy, credits)) = credits {
                    charge_line(
                        &mut text,
                        &a.customer,
                        policy.allowance,
                        credits,
                        a.at,
                        None,
                    );
                    if let Some((accounts, outbox)) = held.as_mut() {
                        for alert in crossings.charge(accounts, &a.customer, policy, credits, a.at)
                        {
                            if outbox.claim(&alert) {
                                text.push_str(&alert_line(&alert));
                                raised.push(alert);
                            }
                        }
                    }
                    charged.push((a.customer.clone(), policy.allowance, credits, a.at));
                }
            }
            if let Some(charge) = a.charge {
                for limit in &charge.plan.limits {
                    let Some(code) = window_code(limit.window) else {
                        continue;
                    };
                    // `C start d|m customer limit units crc`.
                    let begin = calendar_window(limit.window, charge.at).0;
                    let start = text.len();
                    let _ = write!(text, "C {begin} {} ", code as char);
                    tollgate_core::pct::encode_into(&mut text, &a.customer, plain);
                    text.push(' ');
                    tollgate_core::pct::encode_into(&mut text, &limit.name, plain);
                    let _ = write!(text, " {}", charge.cost);
                    let crc = crc32(&text.as_bytes()[start..]);
                    let _ = writeln!(text, " {crc:08x}");
                    counted.push((
                        (a.customer.clone(), limit.name.clone(), code),
                        begin,
                        charge.cost,
                    ));
                }
            }
            acks.push(a.done);
        }
        drop(held);
        // Sequences are handed out and written under the state lock, so the
        // file holds them in order and a rollup never sees a later event of
        // a group before an earlier one is in the file.
        let written = self.events.append(&text);
        let ok = written.is_some();
        if let Some(n) = written {
            // Only what is in the file counts.
            for (key, units, seq) in added {
                let g = st.pending.entry(key).or_default();
                g.units = g.units.saturating_add(units);
                g.max_seq = g.max_seq.max(seq);
            }
            for (key, begin, units) in counted {
                st.count(key, begin, units);
            }
            for (customer, allowance, credits, at) in charged {
                st.charge_credits(&customer, allowance, credits, at);
            }
            if !owed.is_empty() {
                let mut o = lock(&st.owed);
                owed.into_iter().for_each(|c| o.add(c));
                drop(o);
                st.owed_ready.notify_one();
            }
            self.bytes.fetch_add(n, Ordering::Relaxed);
            self.dirty = true;
            if self.failed_at.load(Ordering::Relaxed) != 0 {
                self.failed_at.store(0, Ordering::Relaxed);
                log::warn!("usage spool writes succeed again");
            }
        } else {
            tollgate_core::metrics::SPOOL_WRITE_ERRORS.inc();
            self.failed_at
                .store(self.clock.now_ms().max(1), Ordering::Relaxed);
            log::error!(
                "usage spool write failed: {} responses are refused",
                acks.len()
            );
        }
        if !raised.is_empty() {
            write(&st.alerts).written(&raised, ok);
        }
        drop(st);
        for a in acks {
            let _ = a.send(ok);
        }
    }

    /// Appends lines that answer no response (a grant of credits), synced
    /// before it returns: a grant is answered as done (and a provider then
    /// stops retrying it). Grants are rare; the sync is affordable.
    pub(super) fn append_text(&mut self, text: &str) -> Result<(), String> {
        self.append_lines(text, true)
    }

    /// Appends lines that answer no one and need no sync of their own (the
    /// spool's next periodic sync covers them).
    pub(super) fn append_unsynced(&mut self, text: &str) -> Result<(), String> {
        self.append_lines(text, false)
    }

    fn append_lines(&mut self, text: &str, sync: bool) -> Result<(), String> {
        let written = self
            .events
            .append(text)
            .filter(|_| !sync || self.events.file.sync_data().is_ok());
        match written {
            Some(n) => {
                self.bytes.fetch_add(n, Ordering::Relaxed);
                self.dirty = true;
                Ok(())
            }
            None => Err(format!(
                "cannot append to {}",
                self.dir.join("events.log").display()
            )),
        }
    }

    /// Turns closed windows' groups into records (written and synced first).
    pub(super) fn roll(&mut self, all: bool) -> usize {
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
                only: None,
            };
            text.push_str(&record_line(&r));
            new.push(r);
        }
        // Records must be durable before they are offered to sinks.
        let written = if text.is_empty() {
            Some(0)
        } else {
            self.records
                .append(&text)
                .filter(|_| self.records.file.sync_data().is_ok())
        };
        let Some(written) = written else {
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
        };
        self.bytes.fetch_add(written, Ordering::Relaxed);
        let n = new.len();
        for r in new {
            st.records.insert(r.rseq, r);
        }
        if self.sinks.is_empty() {
            // Nothing will ever settle them: fold straight into the summaries.
            let (month_start, _) = month_bounds(now);
            st.fold_settled(&self.sinks, month_start);
        }
        let compacted = (self.events.len > COMPACT_AT || self.records.len > COMPACT_AT)
            .then(|| compact_files(&self.dir, &self.sinks, &mut st, now, self.seal.as_deref()));
        drop(st);
        if let Some(result) = compacted {
            self.after_compaction(result);
        }
        n
    }
}

impl Writer {
    /// Appends record lines and syncs them (a replay's records).
    pub(super) fn append_records(&mut self, text: &str) -> Result<(), SpoolError> {
        let path = self.dir.join("records.log");
        let n = self
            .records
            .append(text)
            .ok_or_else(|| io_err(&path, std::io::Error::other("append failed")))?;
        self.records
            .file
            .sync_data()
            .map_err(|e| io_err(&path, e))?;
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Takes the compacted files' size and reopens them for appending.
    fn after_compaction(&mut self, result: Result<u64, SpoolError>) {
        match result {
            Ok(bytes) => {
                self.bytes.store(bytes, Ordering::Relaxed);
                match (
                    LogFile::open(&self.dir.join("events.log"), self.seal.clone()),
                    LogFile::open(&self.dir.join("records.log"), self.seal.clone()),
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
}

/// A file opened for appending that knows its length (and seals what it
/// appends when the spool is sealed).
pub(super) struct LogFile {
    file: File,
    len: u64,
    seal: Option<Arc<Seal>>,
}

impl LogFile {
    pub(super) fn open(p: &Path, seal: Option<Arc<Seal>>) -> Result<Self, SpoolError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| io_err(p, e))?;
        let len = file.metadata().map_err(|e| io_err(p, e))?.len();
        Ok(Self { file, len, seal })
    }

    /// Appends `text`; the bytes written, or None after cutting the file
    /// back so no half line is left for the next append to be glued to.
    pub(super) fn append(&mut self, text: &str) -> Option<u64> {
        let sealed;
        let data = match &self.seal {
            None => text.as_bytes(),
            Some(seal) => {
                sealed = seal.seal(text).ok()?;
                sealed.as_bytes()
            }
        };
        if self.file.write_all(data).is_ok() {
            self.len += data.len() as u64;
            return Some(data.len() as u64);
        }
        let _ = self.file.set_len(self.len);
        None
    }
}
