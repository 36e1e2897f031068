//! Threshold alerts in the spool: the outbox of `usage.threshold_reached`
//! events and the memory of which thresholds were raised this period.
//!
//! Lines of `events.log` (each with its CRC, like every other):
//! - `T <json>`: an alert raised (core's `Alert`, percent-escaped JSON).
//!   A credit threshold's line is written right after the `K` charge (or
//!   `G` grant) that reached it, in the same append; a quota's, as soon as
//!   the gate saw it reached. Either way before it is offered for delivery.
//! - `X customer policy percent period_start ok|dead|owed`: its delivery
//!   settled (dead: also a line of `dead-alerts.jsonl`, with the reason),
//!   or, `owed`, a dead letter put back by `tollgate billing replay --sink
//!   alerts`.
//!
//! Compaction keeps the alerts still owed, and those of periods not yet
//! over (so the same threshold is not raised twice in a period).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tollgate_core::alerts::{Alert, AlertJournal, AlertKey, Thresholds, CREDITS};
use tollgate_core::clock::Millis;
use tollgate_core::credits::{Account, Balance, CreditPolicy};
use tollgate_core::limiter::calendar_window;
use tollgate_core::sync::{lock, read, write};

use super::codec::{esc, line_with_crc, read_lines, unesc};
use super::compact::replace_file;
use super::{credits::Accounts, Append, Msg, Spool, SpoolError, State};

/// One alert and where its delivery stands.
#[derive(Debug, Clone)]
struct Raised {
    alert: Alert,
    /// In the file (only then is it delivered).
    durable: bool,
    /// None: owed; true: delivered; false: dead-lettered.
    settled: Option<bool>,
}

/// Alerts by key: owed ones, and the ones raised in periods still running.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    raised: HashMap<AlertKey, Raised>,
    /// Durable and not settled: what delivery takes.
    owed: HashSet<AlertKey>,
}

impl Outbox {
    /// Whether `alert` is new (not raised this period, or no longer
    /// remembered); if so, it is now raised, not yet durable.
    pub(super) fn claim(&mut self, alert: &Alert) -> bool {
        let key = alert.key();
        if self.raised.contains_key(&key) {
            return false;
        }
        self.raised.insert(
            key,
            Raised {
                alert: alert.clone(),
                durable: false,
                settled: None,
            },
        );
        true
    }

    /// Marks `alerts` durable once their lines are in the file, or forgets
    /// them when the write failed (the next request or charge that finds
    /// the threshold reached raises it again; in Redis mode, where only the
    /// crossing raises, it is lost and logged).
    pub(super) fn written(&mut self, alerts: &[Alert], ok: bool) {
        for a in alerts {
            let key = a.key();
            if !ok {
                self.raised.remove(&key);
                log::error!(
                    "usage spool write failed: the {}% alert of `{}` for {} was not recorded",
                    a.percent,
                    a.policy,
                    a.customer
                );
                continue;
            }
            if let Some(r) = self.raised.get_mut(&key) {
                r.durable = true;
                self.owed.insert(key);
            }
            tollgate_core::metrics::ALERTS
                .with_label_values(&["raised"])
                .inc();
        }
    }

    fn settle(&mut self, key: &AlertKey, ok: bool) {
        if let Some(r) = self.raised.get_mut(key) {
            r.settled = Some(ok);
        }
        self.owed.remove(key);
    }

    /// Owed again (a replayed dead letter), known or not.
    fn owe(&mut self, alert: Alert) {
        let key = alert.key();
        let r = self.raised.entry(key.clone()).or_insert(Raised {
            alert,
            durable: true,
            settled: None,
        });
        r.settled = None;
        r.durable = true;
        self.owed.insert(key);
    }
}

/// `T …` for an alert.
pub(super) fn alert_line(a: &Alert) -> String {
    let json = serde_json::to_string(a).unwrap_or_default();
    line_with_crc(&format!("T {}", esc(&json)))
}

fn settled_line(k: &AlertKey, ok: bool) -> String {
    x_line(k, if ok { "ok" } else { "dead" })
}

fn x_line(k: &AlertKey, state: &str) -> String {
    line_with_crc(&format!(
        "X {} {} {} {} {state}",
        esc(&k.0),
        esc(&k.1),
        k.2,
        k.3
    ))
}

impl State {
    /// One `T` or `X` line of events.log; false if it is neither.
    pub(super) fn replay_alert_line(&mut self, f: &[&str]) -> bool {
        let mut out = write(&self.alerts);
        match (f.first().copied(), f.len()) {
            (Some("T"), 2) => {
                if let Ok(alert) = serde_json::from_str::<Alert>(&unesc(f[1])) {
                    let key = alert.key();
                    if !out.raised.contains_key(&key) {
                        out.owed.insert(key.clone());
                        out.raised.insert(
                            key,
                            Raised {
                                alert,
                                durable: true,
                                settled: None,
                            },
                        );
                    }
                }
                true
            }
            (Some("X"), 6) => {
                if let (Ok(percent), Ok(start)) = (f[3].parse::<u16>(), f[4].parse::<Millis>()) {
                    let key = (unesc(f[1]), unesc(f[2]), percent, start);
                    match f[5] {
                        "owed" => {
                            if let Some(a) = out.raised.get(&key).map(|r| r.alert.clone()) {
                                out.owe(a);
                            }
                        }
                        state => out.settle(&key, state == "ok"),
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// How many alerts are owed, and since when (the oldest raised).
    pub(super) fn alerts_owed_since(&self) -> (u64, Option<Millis>) {
        let out = read(&self.alerts);
        let oldest = out
            .owed
            .iter()
            .filter_map(|k| out.raised.get(k))
            .map(|r| r.alert.at)
            .min();
        (out.owed.len() as u64, oldest)
    }

    /// The alerts compaction keeps, as lines; forgets the others.
    pub(super) fn alert_lines(&self, now: Millis) -> String {
        let mut out = write(&self.alerts);
        out.raised
            .retain(|_, r| r.settled.is_none() || r.alert.period_end > now);
        let mut text = String::new();
        for (k, r) in out.raised.iter().filter(|(_, r)| r.durable) {
            text.push_str(&alert_line(&r.alert));
            if let Some(ok) = r.settled {
                text.push_str(&settled_line(k, ok));
            }
        }
        text
    }
}

/// The credit thresholds reached by the charges of one append, in order:
/// each charged customer's usage is followed through the batch, so the
/// real accounts change only once the lines are in the file.
pub(super) struct CreditCrossings<'a> {
    th: &'a Thresholds,
    /// Per customer: the period (start, end), used and granted after the
    /// batch's charges so far.
    seen: HashMap<Arc<str>, (Millis, Millis, u64, i64)>,
}

impl<'a> CreditCrossings<'a> {
    pub(super) fn new(th: &'a Thresholds) -> Self {
        Self {
            th,
            seen: HashMap::new(),
        }
    }

    /// The alerts of the thresholds `customer` has reached once `credits`
    /// more are charged at `at` (raised before or not: the outbox keeps the
    /// first), none when no thresholds are configured.
    pub(super) fn charge(
        &mut self,
        accounts: &Accounts,
        customer: &Arc<str>,
        policy: &CreditPolicy,
        credits: u64,
        at: Millis,
    ) -> Vec<Alert> {
        if self.th.is_empty() {
            return Vec::new();
        }
        let e = match self.seen.get_mut(customer) {
            Some(e) if e.0 <= at && at < e.1 => e,
            _ => {
                let b = balance(accounts, customer, policy, at);
                let start = calendar_window(policy.allowance.per, at).0;
                self.seen
                    .entry(customer.clone())
                    .insert_entry((start, b.period_end, b.used, b.granted))
                    .into_mut()
            }
        };
        e.2 = e.2.saturating_add(credits);
        reached(self.th, customer, policy, *e, at)
    }
}

/// `customer`'s balance at `at` (a new account's if it has none yet).
fn balance(accounts: &Accounts, customer: &str, policy: &CreditPolicy, at: Millis) -> Balance {
    let a = policy.allowance;
    match accounts.get(customer) {
        Some(acc) => acc.balance(a, at),
        None => Account::new(a, at).balance(a, at),
    }
}

/// The credit alerts of every threshold `used` of `granted` has reached.
fn reached(
    th: &Thresholds,
    customer: &Arc<str>,
    policy: &CreditPolicy,
    (start, end, used, granted): (Millis, Millis, u64, i64),
    at: Millis,
) -> Vec<Alert> {
    let granted = u64::try_from(granted).unwrap_or(0);
    th.crossed(0, used, granted)
        .map(|percent| Alert {
            customer: customer.clone(),
            plan: policy.plan.clone(),
            policy: CREDITS.into(),
            percent,
            used,
            limit: granted,
            period_start: start,
            period_end: end,
            at,
        })
        .collect()
}

impl Spool {
    /// Alerts in the file and not settled, that `ready` accepts, oldest
    /// first.
    pub fn alerts_due(&self, limit: usize, ready: impl Fn(&Alert) -> bool) -> Vec<Alert> {
        let out = read(&self.alerts);
        let mut due: Vec<&Alert> = out
            .owed
            .iter()
            .filter_map(|k| out.raised.get(k))
            .map(|r| &r.alert)
            .filter(|a| ready(a))
            .collect();
        due.sort_by_key(|a| a.at);
        due.into_iter().take(limit).cloned().collect()
    }

    /// Records how each alert's delivery ended: delivered (None), or
    /// refused for good with a reason, then also written to
    /// `dead-alerts.jsonl`. In memory it is settled whatever the disk
    /// says; a settlement that did not reach the file means a redelivery
    /// after a restart, under the same `webhook-id`. Does file I/O (no
    /// fsync: the spool's next sync covers it): call it off the async
    /// workers.
    pub fn settle_alerts(&self, done: &[(Alert, Option<String>)]) {
        if done.is_empty() {
            return;
        }
        let text: String = done
            .iter()
            .map(|(a, dead)| settled_line(&a.key(), dead.is_none()))
            .collect();
        if let Err(e) = lock(&self.writer).append_unsynced(&text) {
            log::error!("alert deliveries not recorded ({e}): they will be sent again after a restart, under the same webhook-id");
        }
        let dead: String = done
            .iter()
            .filter_map(|(a, why)| {
                let line = serde_json::json!({
                    "id": a.id(), "event": a.event(), "reason": why.as_deref()?, "alert": a,
                });
                Some(format!("{line}\n"))
            })
            .collect();
        if !dead.is_empty() {
            self.append_dead(&self.config.dir.join("dead-alerts.jsonl"), dead);
        }
        let mut out = write(&self.alerts);
        for (a, dead) in done {
            out.settle(&a.key(), dead.is_none());
        }
    }

    /// Puts the alert webhook's dead letters (those whose id is in `ids`,
    /// or all) back in its queue under their ids, and takes them out of
    /// `dead-alerts.jsonl`. Returns the ids put back. Blocking file I/O.
    pub fn replay_alerts(&self, ids: Option<&[String]>) -> Result<Vec<String>, SpoolError> {
        let path = self.config.dir.join("dead-alerts.jsonl");
        let seal = self.config.seal.as_deref();
        let mut w = lock(&self.writer);
        let mut keep = String::new();
        let mut back: Vec<Alert> = Vec::new();
        for line in read_lines(&path, seal) {
            let alert = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| serde_json::from_value::<Alert>(v["alert"].clone()).ok());
            match alert {
                Some(a) if ids.is_none_or(|ids| ids.contains(&a.id())) => {
                    if back.iter().all(|b| b.key() != a.key()) {
                        back.push(a);
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
        let text: String = back
            .iter()
            .map(|a| alert_line(a) + &x_line(&a.key(), "owed"))
            .collect();
        // Owed again in the file before the dead letters go.
        w.append_text(&text).map_err(|e| SpoolError::Io {
            path: self.config.dir.join("events.log"),
            source: std::io::Error::other(e),
        })?;
        if let Err(e) = replace_file(&path, keep, seal) {
            log::warn!("replayed, but cannot rewrite dead-alerts.jsonl: {e}");
        }
        drop(w);
        let out: Vec<String> = back.iter().map(Alert::id).collect();
        let mut o = write(&self.alerts);
        for a in back {
            o.owe(a);
        }
        log::info!("replayed dead alerts: {out:?}");
        Ok(out)
    }

    /// Alerts raised and not yet delivered or dead-lettered.
    pub fn alerts_owed(&self) -> usize {
        read(&self.alerts).owed.len()
    }

    /// The `T` lines of the credit thresholds `customer` has reached after
    /// a grant (one that removed credits may have raised their share
    /// used), claimed; called under the writer's lock.
    pub(super) fn credit_alerts_after_grant(
        &self,
        customer: &Arc<str>,
        policy: &CreditPolicy,
        at: Millis,
    ) -> Vec<Alert> {
        let th = &self.config.alerts;
        if th.is_empty() {
            return Vec::new();
        }
        let b = balance(&lock(&self.credits), customer, policy, at);
        let start = calendar_window(policy.allowance.per, at).0;
        let mut out = write(&self.alerts);
        reached(
            th,
            customer,
            policy,
            (start, b.period_end, b.used, b.granted),
            at,
        )
        .into_iter()
        .filter(|a| out.claim(a))
        .collect()
    }
}

/// The alert webhook's dead letters in `dir`: each line of
/// `dead-alerts.jsonl` that parses (`{"id", "event", "reason", "alert"}`).
pub fn dead_alerts(dir: &std::path::Path, seal: Option<&super::Seal>) -> Vec<serde_json::Value> {
    read_lines(&dir.join("dead-alerts.jsonl"), seal)
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl AlertJournal for Spool {
    fn thresholds(&self) -> &Thresholds {
        &self.config.alerts
    }

    fn raise(&self, alert: Alert) {
        let key = alert.key();
        // The common case, a customer past a threshold raised before: a
        // shared read.
        if read(&self.alerts).raised.contains_key(&key) || !write(&self.alerts).claim(&alert) {
            return;
        }
        // The spool's thread writes it: never waits here.
        let (done, _) = tokio::sync::oneshot::channel();
        let item = Append {
            customer: alert.customer.clone(),
            usage: None,
            charge: None,
            credits: None,
            at: alert.at,
            alert: Some(Box::new(alert)),
            done,
        };
        let sent = lock(&self.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Appends(vec![item])).is_ok());
        if !sent {
            write(&self.alerts).raised.remove(&key);
            log::warn!("usage spool is closed: an alert was not raised");
        }
    }
}
