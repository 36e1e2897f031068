//! Threshold alerts in the spool: the outbox of `usage.threshold_reached`
//! events and the memory of which thresholds were raised this period.
//!
//! Lines of `events.log` (each with its CRC, like every other):
//! - `T <json>`: an alert raised (core's `Alert`, percent-escaped JSON).
//!   A credit threshold's line is written in the same append as the `K`
//!   charge that crossed it; a quota's, as soon as the gate saw the
//!   crossing. Either way before it is offered for delivery.
//! - `X customer policy percent period_start ok|dead`: its delivery settled (dead: also a line of
//!   `dead-alerts.jsonl`, with the reason).
//!
//! Compaction keeps the alerts still owed, and those of periods not yet
//! over (so the same threshold is not raised twice in a period).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;

use tollgate_core::alerts::{Alert, AlertJournal, AlertKey, Thresholds, CREDITS};
use tollgate_core::clock::Millis;
use tollgate_core::credits::{Account, Allowance};
use tollgate_core::sync::lock;

use super::codec::{esc, line_with_crc, sealed, unesc};
use super::{credits::Accounts, Append, Msg, Spool, SpoolError, State};

/// One alert and where its delivery stands.
#[derive(Debug, Clone)]
pub(super) struct Raised {
    pub(super) alert: Alert,
    /// In the file (only then is it delivered).
    durable: bool,
    /// None: owed; true: delivered; false: dead-lettered.
    settled: Option<bool>,
}

/// Alerts by key: owed ones, and the ones raised in periods still running.
pub(super) type Outbox = HashMap<AlertKey, Raised>;

/// `T …` for an alert.
pub(super) fn alert_line(a: &Alert) -> String {
    let json = serde_json::to_string(a).unwrap_or_default();
    line_with_crc(&format!("T {}", esc(&json)))
}

fn settled_line(k: &AlertKey, ok: bool) -> String {
    line_with_crc(&format!(
        "X {} {} {} {} {}",
        esc(&k.0),
        esc(&k.1),
        k.2,
        k.3,
        if ok { "ok" } else { "dead" }
    ))
}

impl State {
    /// One `T` or `X` line of events.log; false if it is neither.
    pub(super) fn replay_alert_line(&mut self, f: &[&str]) -> bool {
        let mut out = lock(&self.alerts);
        match (f.first().copied(), f.len()) {
            (Some("T"), 2) => {
                if let Ok(alert) = serde_json::from_str::<Alert>(&unesc(f[1])) {
                    out.entry(alert.key()).or_insert(Raised {
                        alert,
                        durable: true,
                        settled: None,
                    });
                }
                true
            }
            (Some("X"), 6) => {
                if let (Ok(percent), Ok(start)) = (f[3].parse::<u16>(), f[4].parse::<Millis>()) {
                    if let Some(r) = out.get_mut(&(unesc(f[1]), unesc(f[2]), percent, start)) {
                        r.settled = Some(f[5] == "ok");
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// The alerts compaction keeps, as lines; forgets the others.
    pub(super) fn alert_lines(&self, now: Millis) -> String {
        let mut out = lock(&self.alerts);
        out.retain(|_, r| r.settled.is_none() || r.alert.period_end > now);
        let mut text = String::new();
        for (k, r) in out.iter().filter(|(_, r)| r.durable) {
            text.push_str(&alert_line(&r.alert));
            if let Some(ok) = r.settled {
                text.push_str(&settled_line(k, ok));
            }
        }
        text
    }
}

/// The credit thresholds that charges of one append cross, in order: each
/// charged customer's account is followed on a copy, so the real accounts
/// change only once the lines are in the file.
pub(super) struct CreditCrossings<'a> {
    th: &'a Thresholds,
    scratch: HashMap<Arc<str>, Account>,
}

impl<'a> CreditCrossings<'a> {
    pub(super) fn new(th: &'a Thresholds) -> Self {
        Self {
            th,
            scratch: HashMap::new(),
        }
    }

    /// The alerts of a charge of `credits` to `customer` on `plan` at `at`
    /// (none when no thresholds are configured).
    pub(super) fn charge(
        &mut self,
        accounts: &Accounts,
        customer: &Arc<str>,
        plan: &Arc<str>,
        a: Allowance,
        credits: u64,
        at: Millis,
    ) -> Vec<Alert> {
        if self.th.is_empty() {
            return Vec::new();
        }
        let acc = self.scratch.entry(customer.clone()).or_insert_with(|| {
            accounts
                .get(customer)
                .cloned()
                .unwrap_or_else(|| Account::new(a, at))
        });
        let before = acc.balance(a, at);
        acc.charge(a, credits, at);
        let after = acc.balance(a, at);
        let granted = u64::try_from(after.granted).unwrap_or(0);
        // Both read at `at`: a period that began with this charge starts
        // from nothing used.
        let period_start = acc.period;
        self.th
            .crossed(before.used, after.used, granted)
            .map(|percent| Alert {
                customer: customer.clone(),
                plan: plan.clone(),
                policy: CREDITS.into(),
                percent,
                used: after.used,
                limit: granted,
                period_start,
                period_end: after.period_end,
                at,
            })
            .collect()
    }
}

/// Whether an alert with this id is new (not raised before, or no longer
/// remembered); if so, it is now raised, not yet durable.
pub(super) fn claim(out: &mut Outbox, alert: &Alert) -> bool {
    let key = alert.key();
    if out.contains_key(&key) {
        return false;
    }
    out.insert(
        key,
        Raised {
            alert: alert.clone(),
            durable: false,
            settled: None,
        },
    );
    true
}

impl Spool {
    /// Alerts in the file and not settled, that `ready` accepts.
    pub fn alerts_due(&self, limit: usize, ready: impl Fn(&Alert) -> bool) -> Vec<Alert> {
        let out = lock(&self.alerts);
        let mut due: Vec<&Raised> = out
            .values()
            .filter(|r| r.durable && r.settled.is_none() && ready(&r.alert))
            .collect();
        due.sort_by_key(|r| r.alert.at);
        due.into_iter()
            .take(limit)
            .map(|r| r.alert.clone())
            .collect()
    }

    /// Records that `alert` was delivered, or (with a reason) refused for
    /// good and written to `dead-alerts.jsonl`. Does file I/O: call it off
    /// the async workers.
    pub fn settle_alert(&self, alert: &Alert, dead: Option<&str>) -> Result<(), SpoolError> {
        let key = alert.key();
        if let Some(reason) = dead {
            let path = self.config.dir.join("dead-alerts.jsonl");
            let line = serde_json::json!({
                "id": alert.id(),
                "event": alert.event(),
                "reason": reason,
            });
            let text = sealed(self.config.seal.as_deref(), format!("{line}\n"))?;
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| super::codec::io_err(&path, e))?;
        }
        let mut w = lock(&self.writer);
        w.append_text(&settled_line(&key, dead.is_none()))
            .map_err(|e| SpoolError::Io {
                path: self.config.dir.join("events.log"),
                source: std::io::Error::other(e),
            })?;
        if let Some(r) = lock(&self.alerts).get_mut(&key) {
            r.settled = Some(dead.is_none());
        }
        drop(w);
        Ok(())
    }

    /// Alerts raised and not yet delivered or dead-lettered.
    pub fn alerts_owed(&self) -> usize {
        lock(&self.alerts)
            .values()
            .filter(|r| r.settled.is_none())
            .count()
    }
}

/// Marks `alerts` durable once their lines are in the file, or forgets
/// them when the write failed (the next crossing may raise them again).
pub(super) fn written(out: &mut Outbox, alerts: &[Alert], ok: bool) {
    for a in alerts {
        let key = a.key();
        if ok {
            if let Some(r) = out.get_mut(&key) {
                r.durable = true;
            }
            tollgate_core::metrics::ALERTS
                .with_label_values(&["raised"])
                .inc();
        } else {
            out.remove(&key);
            log::error!(
                "usage spool write failed: the {}% alert of `{}` for {} is lost",
                a.percent,
                a.policy,
                a.customer
            );
        }
    }
}

impl AlertJournal for Spool {
    fn thresholds(&self) -> &Thresholds {
        &self.config.alerts
    }

    fn raise(&self, alert: Alert) {
        if !claim(&mut lock(&self.alerts), &alert) {
            return;
        }
        // The spool's thread writes it: never waits here.
        let key = alert.key();
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
            lock(&self.alerts).remove(&key);
            log::warn!("usage spool is closed: an alert was not raised");
        }
    }
}
