//! Dead letters and their replay (`tollgate billing dead-letters | replay`),
//! and a read-only look at a spool for `tollgate billing status`.
//!
//! A replayed dead letter becomes a `P` record owed to its sink alone,
//! under the identifier it was first sent with: a provider that did take
//! it after all de-duplicates it (Stripe by `identifier`, OpenMeter and the
//! webhook by the event id, Lago by `transaction_id`). Its units were
//! counted as recorded when it was first settled, so it adds to what was
//! reported only.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use tollgate_core::clock::{month_bounds, parse_rfc3339, Millis};
use tollgate_core::sync::lock;

use super::codec::{read_lines, record_line};
use super::compact::replace_file;
use super::open::{check_key, load_state};
use super::{Record, Seal, Spool, SpoolConfig, SpoolError, State};

/// One record a sink refused for good.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub sink: String,
    pub identifier: String,
    pub customer: String,
    pub meter: String,
    pub units: u64,
    /// Start of the usage window (ms).
    pub window_start: Millis,
    pub reason: String,
}

/// What one sink still owes, and what it refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SinkStatus {
    pub sink: String,
    /// Units in events not yet rolled up plus records not yet settled.
    pub pending_units: u64,
    /// Start of the oldest window still owed (ms).
    pub oldest: Option<Millis>,
    pub dead_letters: usize,
}

/// A spool as its files stand.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Inspection {
    /// Bytes of events.log and records.log (what `max_bytes` bounds).
    pub bytes: u64,
    pub sinks: Vec<SinkStatus>,
}

fn dead_path(dir: &Path, sink: &str) -> std::path::PathBuf {
    dir.join(format!("dead-{sink}.jsonl"))
}

/// The lines of `dead-<sink>.jsonl`, parsed (a line that does not parse is
/// kept as it is on a rewrite and left out here).
fn read_dead(dir: &Path, sink: &str, seal: Option<&Seal>) -> Vec<(String, Option<DeadLetter>)> {
    read_lines(&dead_path(dir, sink), seal)
        .into_iter()
        .map(|line| {
            let d = parse_dead(sink, &line);
            (line, d)
        })
        .collect()
}

fn parse_dead(sink: &str, line: &str) -> Option<DeadLetter> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v[k].as_str().map(str::to_owned);
    Some(DeadLetter {
        sink: sink.to_owned(),
        identifier: s("identifier")?,
        customer: s("customer")?,
        meter: s("meter")?,
        units: v["units"].as_u64()?,
        // Lines written before `window_ms` existed carry the RFC 3339 form.
        window_start: v["window_ms"]
            .as_u64()
            .or_else(|| parse_rfc3339(v["window_start"].as_str()?))?,
        reason: s("reason").unwrap_or_default(),
    })
}

/// `sink`'s dead letters in `dir`, oldest first, each identifier once.
pub fn dead_letters(dir: &Path, sink: &str, seal: Option<&Seal>) -> Vec<DeadLetter> {
    let mut seen = HashSet::new();
    read_dead(dir, sink, seal)
        .into_iter()
        .filter_map(|(_, d)| d)
        .filter(|d| seen.insert(d.identifier.clone()))
        .collect()
}

impl State {
    /// Units not yet in a record plus units in records `sink` has not
    /// settled, and the start of the oldest such window.
    pub(super) fn pending_units(&self, sink: &str) -> (u64, Option<Millis>) {
        let settled = self.settled.get(sink);
        let mut units = self
            .pending
            .values()
            .fold(0u64, |a, g| a.saturating_add(g.units));
        let mut oldest: Option<Millis> = self.pending.keys().map(|k| k.2).min();
        for r in self.records.values().filter(|r| r.owed_to(sink)) {
            if !settled.is_some_and(|s| s.contains_key(&r.rseq)) {
                units = units.saturating_add(r.units);
                oldest = Some(oldest.map_or(r.window_start, |o| o.min(r.window_start)));
            }
        }
        (units, oldest)
    }

    fn inspection(&self, config: &SpoolConfig, bytes: u64) -> Inspection {
        let seal = config.seal.as_deref();
        let mut sinks: Vec<SinkStatus> = config
            .sinks
            .iter()
            .map(|sink| {
                let (pending_units, oldest) = self.pending_units(sink);
                SinkStatus {
                    sink: sink.clone(),
                    pending_units,
                    oldest,
                    dead_letters: dead_letters(&config.dir, sink, seal).len(),
                }
            })
            .collect();
        // The alert webhook, beside them: alerts owed instead of units.
        if !config.alerts.is_empty() {
            let (owed, oldest) = self.alerts_owed_since();
            sinks.push(SinkStatus {
                sink: crate::alerts::ALERTS.into(),
                pending_units: owed,
                oldest,
                dead_letters: read_lines(&dead_path(&config.dir, "alerts"), seal).len(),
            });
        }
        Inspection { bytes, sinks }
    }
}

impl Spool {
    /// Reads the spool in `config.dir` without opening it (no lock, nothing
    /// written), so it works beside the running proxy that holds it.
    pub fn inspect(config: &SpoolConfig, now: Millis) -> Result<Inspection, SpoolError> {
        let dir = &config.dir;
        let seal = config.seal.as_deref();
        let st = if dir.exists() {
            check_key(dir, seal)?;
            load_state(config, month_bounds(now).0)
        } else {
            State::default()
        };
        let size = |f: &str| fs::metadata(dir.join(f)).map_or(0, |m| m.len());
        Ok(st.inspection(config, size("events.log") + size("records.log")))
    }

    /// What each sink owes and refused, as this process knows it.
    pub fn status(&self) -> Inspection {
        let bytes = self.bytes.load(std::sync::atomic::Ordering::Relaxed);
        lock(&self.state).inspection(&self.config, bytes)
    }

    /// `sink`'s dead letters, oldest first.
    pub fn dead_letters(&self, sink: &str) -> Vec<DeadLetter> {
        let _st = lock(&self.state);
        dead_letters(&self.config.dir, sink, self.config.seal.as_deref())
    }

    /// Puts `sink`'s dead letters (those whose identifier is in `ids`, or
    /// all; for the alert webhook, [`crate::alerts::ALERTS`], their ids) back in its queue under their original identifiers, and takes
    /// them out of `dead-<sink>.jsonl`. Returns the identifiers put back;
    /// an id that is not a dead letter of `sink` is left out. Blocking file
    /// I/O: call it off the async workers.
    pub fn replay(&self, sink: &str, ids: Option<&[String]>) -> Result<Vec<String>, SpoolError> {
        if sink == crate::alerts::ALERTS {
            return self.replay_alerts(ids);
        }
        let seal = self.config.seal.as_deref();
        let dir = &self.config.dir;
        // Writer before state, as a rollup takes them.
        let mut w = lock(&self.writer);
        let mut st = lock(&self.state);
        let already: HashSet<&str> = st
            .records
            .values()
            .filter(|r| r.only.as_deref() == Some(sink))
            .map(|r| r.identifier.as_str())
            .collect();
        let wanted = |d: &DeadLetter| ids.is_none_or(|ids| ids.contains(&d.identifier));
        let mut keep = String::new();
        let mut back: Vec<Record> = Vec::new();
        let mut seen = HashSet::new();
        for (line, d) in read_dead(dir, sink, seal) {
            match d {
                Some(d) if wanted(&d) => {
                    if !already.contains(d.identifier.as_str()) && seen.insert(d.identifier.clone())
                    {
                        back.push(Record {
                            rseq: 0,
                            upto: 0,
                            window_start: d.window_start,
                            customer: d.customer.into(),
                            meter: d.meter.into(),
                            units: d.units,
                            identifier: d.identifier,
                            only: Some(Arc::from(sink)),
                        });
                    }
                }
                _ => {
                    keep.push_str(&line);
                    keep.push('\n');
                }
            }
        }
        if back.is_empty() {
            return Ok(Vec::new());
        }
        let mut text = String::new();
        for r in &mut back {
            r.rseq = st.next_rseq;
            st.next_rseq += 1;
            text.push_str(&record_line(r));
        }
        // Durable as records before the dead letters go.
        w.append_records(&text)?;
        if let Err(e) = replace_file(&dead_path(dir, sink), keep, seal) {
            // They are replayed all the same; a second replay skips them
            // while they are owed (see `already`).
            log::warn!("replayed, but cannot rewrite dead-{sink}.jsonl: {e}");
        }
        let out = back.iter().map(|r| r.identifier.clone()).collect();
        for r in back {
            st.records.insert(r.rseq, r);
        }
        drop(st);
        drop(w);
        self.update_gauges();
        log::info!("replayed dead letters for sink {sink}: {out:?}");
        Ok(out)
    }
}
