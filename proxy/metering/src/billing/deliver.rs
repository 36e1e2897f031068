//! The delivery loop: one per sink, retrying with backoff, settling
//! records in the spool, dead-lettering what a provider refuses for good.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::clock::rfc3339;

use super::{Outcome, Sink};
use crate::spool::{Record, Spool};

struct Retry {
    attempts: u32,
    not_before: Instant,
}

/// When each failed item may be tried again (a record, an alert).
pub(crate) struct Retries<K>(Mutex<HashMap<K, Retry>>);

impl<K: std::hash::Hash + Eq> Retries<K> {
    pub(crate) fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    /// Whether `k` is not backing off at `now`.
    pub(crate) fn ready(&self, k: &K, now: Instant) -> bool {
        tollgate_core::lock(&self.0)
            .get(k)
            .is_none_or(|x| x.not_before <= now)
    }

    /// Schedules the next attempt at `k` after a backoff; returns how many
    /// attempts failed (log the first and every tenth).
    pub(crate) fn failed(&self, k: K) -> u32 {
        let mut r = tollgate_core::lock(&self.0);
        let e = r.entry(k).or_insert(Retry {
            attempts: 0,
            not_before: Instant::now(),
        });
        e.attempts += 1;
        e.not_before = Instant::now() + backoff(e.attempts);
        e.attempts
    }

    /// Forgets items settled for good.
    pub(crate) fn settled<'a>(&self, done: impl IntoIterator<Item = &'a K>)
    where
        K: 'a,
    {
        let mut r = tollgate_core::lock(&self.0);
        for k in done {
            r.remove(k);
        }
    }
}

/// Whether a failure's attempt number is one to log.
pub(crate) fn worth_logging(attempts: u32) -> bool {
    attempts == 1 || attempts.is_multiple_of(10)
}

/// Backoff before attempt `n` (1-based): 0.5 s doubling to 60 s, ±25 % jitter.
pub fn backoff(attempts: u32) -> Duration {
    let base = 500u64.saturating_mul(1 << attempts.min(7)).min(60_000);
    let mut r = [0u8; 2];
    let _ = tollgate_core::keys::random_bytes(&mut r);
    let jitter = u64::from(u16::from_le_bytes(r)) % (base / 2 + 1);
    Duration::from_millis(base * 3 / 4 + jitter)
}

/// Delivers `sink`'s unsettled records until `stop` resolves.
pub async fn deliver(
    sink: Arc<dyn Sink>,
    spool: Arc<Spool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let retries = Retries::new();
    loop {
        let sent = deliver_once(&*sink, &spool, &retries).await;
        if *stop.borrow() {
            return;
        }
        if sent == 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// One pass: sends what is due, settles outcomes. Returns records attempted.
async fn deliver_once(sink: &dyn Sink, spool: &Arc<Spool>, retries: &Retries<u64>) -> usize {
    let now = Instant::now();
    // Backing-off records are skipped before the limit, so they never
    // crowd out newer ones.
    let due: Vec<Record> = spool.unsettled(sink.name(), 5_000, |rec| retries.ready(&rec.rseq, now));
    if due.is_empty() {
        return 0;
    }
    let batches = batches(sink, due);
    let attempted: usize = batches.iter().map(Vec::len).sum();
    let results = futures_util::future::join_all(batches.iter().map(|b| sink.send(b))).await;
    let (mut ok, mut dead) = (Vec::new(), Vec::new());
    for (batch, outcomes) in batches.iter().zip(results) {
        for (rec, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => {
                    count(sink, "delivered");
                    ok.push(rec.rseq);
                }
                Outcome::Dead(why) => {
                    count(sink, "dead_letter");
                    log::error!(
                        "billing sink {name} refused {} ({} {} of {} for {}): {why}; written to dead-{name}.jsonl",
                        rec.identifier, rec.units, rec.meter, rec.customer, rfc3339(rec.window_start),
                        name = sink.name()
                    );
                    dead.push((rec.clone(), why));
                }
                Outcome::Retry(why) => {
                    count(sink, "retry");
                    schedule_retry(sink, retries, rec, &why);
                }
            }
        }
    }
    retries.settled(ok.iter().chain(dead.iter().map(|(rec, _)| &rec.rseq)));
    settle(sink, spool, ok, dead).await;
    attempted
}

/// What goes out in one pass: one record per (customer, meter), up to 32,
/// for sinks that need one in flight per meter; else up to 8 full batches.
fn batches(sink: &dyn Sink, due: Vec<Record>) -> Vec<Vec<Record>> {
    if sink.one_in_flight_per_meter() {
        let mut seen = HashSet::new();
        due.into_iter()
            .filter(|r| seen.insert((r.customer.clone(), r.meter.clone())))
            .take(32)
            .map(|r| vec![r])
            .collect()
    } else {
        due.chunks(sink.max_batch())
            .take(8)
            .map(<[Record]>::to_vec)
            .collect()
    }
}

fn count(sink: &dyn Sink, result: &str) {
    tollgate_core::metrics::BILLING_EVENTS
        .with_label_values(&[sink.name(), result])
        .inc();
}

fn schedule_retry(sink: &dyn Sink, retries: &Retries<u64>, rec: &Record, why: &str) {
    let attempts = retries.failed(rec.rseq);
    if worth_logging(attempts) {
        log::warn!(
            "billing sink {}: {} will be retried (attempt {attempts}): {why}",
            sink.name(),
            rec.identifier,
        );
    }
}

/// Records the pass's outcomes in the spool, file I/O off the async workers.
async fn settle(sink: &dyn Sink, spool: &Arc<Spool>, ok: Vec<u64>, dead: Vec<(Record, String)>) {
    let name = sink.name().to_owned();
    let sp = Arc::clone(spool);
    let written = tokio::task::spawn_blocking(move || {
        for (rec, why) in &dead {
            sp.dead_letter(&name, rec, why);
        }
        let dead: Vec<u64> = dead.iter().map(|(r, _)| r.rseq).collect();
        sp.settle(&name, &ok, true)
            .and_then(|_| sp.settle(&name, &dead, false))
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::error!(
            "billing sink {}: cannot record deliveries: {e} (they will be re-sent under the same identifiers)",
            sink.name()
        ),
        Err(e) => log::error!("billing sink {}: settle task failed: {e}", sink.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b1 = backoff(1).as_millis();
        assert!((750..=1500).contains(&b1), "{b1}");
        let b20 = backoff(20).as_millis();
        assert!((45_000..=90_000).contains(&b20), "{b20}");
    }
}
