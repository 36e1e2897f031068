//! Prepaid credits in the spool: every charge and grant is a line of
//! `events.log`, written in the same append as the usage it pays for, so a
//! `kill -9` loses neither; the accounts (core's `credits::Account`) live
//! in the spool's state and are rebuilt from the lines on start.
//!
//! Lines (each with its CRC, like every other):
//! - `K at customer credits grant d|m 0|1`: a charge, with the plan's
//!   allowance in force when it was made (so a replay rolls the period
//!   exactly as the live process did);
//! - `G grant d|m 0|1 <json>`: a grant, with the allowance as a charge
//!   carries it, and `{"customer", "grant": {…}}` percent-escaped;
//! - `B customer <json>`: an account as compaction found it; the `K` and
//!   `G` lines after it apply on top.
//!
//! When the balances live in a shared store (Redis limits; see
//! [`SpoolConfig::shared_credits`](super::SpoolConfig)), the spool keeps no
//! account: a charge is owed to the store until delivered, in sequence
//! order, by the gateway ([`Spool::credits_owed`]); grants go to the store
//! directly.
//! - `K at customer credits grant d|m 0|1 kseq plan`: a charge owed,
//!   numbered (the store skips a number it applied before, so a delivery
//!   retried after a crash charges once), with its plan (for alerts);
//! - `Y kseq`: delivered; `W next`: the next number (compaction keeps it,
//!   so numbers are never reused).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tollgate_core::clock::Millis;
use tollgate_core::credits::{
    Account, Allowance, Balance, CreditBook, CreditError, CreditPolicy, Entry, Grant, Granted,
};
use tollgate_core::plans::Window;
use tollgate_core::sync::lock;

use super::codec::{esc, line_with_crc, unesc};
use super::{Spool, State};

/// `grant d|m 0|1`: an allowance as a charge line carries it.
pub(super) fn allowance_fields(a: Allowance) -> String {
    format!(
        "{} {} {}",
        a.grant,
        if a.per == Window::Day { 'd' } else { 'm' },
        u8::from(a.rollover)
    )
}

fn parse_allowance(grant: &str, per: &str, rollover: &str) -> Option<Allowance> {
    Some(Allowance {
        grant: grant.parse().ok()?,
        per: match per {
            "d" => Window::Day,
            "m" => Window::Month,
            _ => return None,
        },
        rollover: rollover == "1",
    })
}

/// Every customer's account.
pub(super) type Accounts = HashMap<Arc<str>, Account>;

/// A charge journaled for the shared store, not yet applied there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedCharge {
    /// Its number in this spool: increasing, never reused.
    pub seq: u64,
    pub customer: Arc<str>,
    /// The plan, and its allowance, when it was made.
    pub plan: Arc<str>,
    pub allowance: Allowance,
    pub credits: u64,
    pub at: Millis,
}

/// Charges owed to the shared store, and their sum per customer (which the
/// gate counts as held: the store does not have them yet).
#[derive(Debug, Default)]
pub(super) struct Owed {
    charges: BTreeMap<u64, OwedCharge>,
    per_customer: HashMap<Arc<str>, u64>,
}

impl Owed {
    pub(super) fn add(&mut self, c: OwedCharge) {
        let sum = self.per_customer.entry(c.customer.clone()).or_insert(0);
        *sum = sum.saturating_add(c.credits);
        self.charges.insert(c.seq, c);
    }

    fn settle(&mut self, seq: u64) {
        let Some(c) = self.charges.remove(&seq) else {
            return;
        };
        if let Some(sum) = self.per_customer.get_mut(&c.customer) {
            *sum = sum.saturating_sub(c.credits);
            if *sum == 0 {
                self.per_customer.remove(&c.customer);
            }
        }
    }
}

/// A charge's line; `owed` numbers one owed to the shared store (and
/// names its plan).
pub(super) fn charge_line(
    text: &mut String,
    customer: &str,
    a: Allowance,
    credits: u64,
    at: Millis,
    owed: Option<(u64, &str)>,
) {
    use std::fmt::Write;
    let start = text.len();
    let _ = write!(text, "K {at} ");
    tollgate_core::pct::encode_into(text, customer, super::codec::plain);
    let _ = write!(text, " {credits} {}", allowance_fields(a));
    if let Some((k, plan)) = owed {
        let _ = write!(text, " {k} ");
        tollgate_core::pct::encode_into(text, plan, super::codec::plain);
    }
    let crc = tollgate_core::keys::crc32(&text.as_bytes()[start..]);
    let _ = writeln!(text, " {crc:08x}");
}

/// A grant line's body.
#[derive(Serialize, Deserialize)]
struct GrantLine {
    customer: String,
    grant: Grant,
}

impl State {
    /// Applies a charge to `customer`'s account (made on first use).
    pub(super) fn charge_credits(
        &mut self,
        customer: &Arc<str>,
        a: Allowance,
        credits: u64,
        at: Millis,
    ) {
        lock(&self.credits)
            .entry(customer.clone())
            .or_insert_with(|| Account::new(a, at))
            .charge(a, credits, at);
    }

    fn grant_credits(&mut self, customer: &Arc<str>, a: Allowance, g: Grant) -> Granted {
        grant_into(&mut lock(&self.credits), customer, a, g)
    }

    /// One `K`, `G` or `B` line of events.log; false if it is none of them.
    pub(super) fn replay_credit_line(&mut self, f: &[&str]) -> bool {
        match (f.first().copied(), f.len()) {
            (Some("K"), 7) => {
                if let (Ok(at), Ok(credits), Some(a)) = (
                    f[1].parse::<u64>(),
                    f[3].parse::<u64>(),
                    parse_allowance(f[4], f[5], f[6]),
                ) {
                    self.charge_credits(&unesc(f[2]), a, credits, at);
                }
                true
            }
            (Some("K"), 9) => {
                if let (Ok(at), Ok(credits), Some(allowance), Ok(seq)) = (
                    f[1].parse::<u64>(),
                    f[3].parse::<u64>(),
                    parse_allowance(f[4], f[5], f[6]),
                    f[7].parse::<u64>(),
                ) {
                    self.next_kseq = self.next_kseq.max(seq + 1);
                    lock(&self.owed).add(OwedCharge {
                        seq,
                        customer: unesc(f[2]),
                        plan: unesc(f[8]),
                        allowance,
                        credits,
                        at,
                    });
                }
                true
            }
            (Some("Y"), 2) => {
                if let Ok(seq) = f[1].parse::<u64>() {
                    self.next_kseq = self.next_kseq.max(seq + 1);
                    lock(&self.owed).settle(seq);
                }
                true
            }
            (Some("W"), 2) => {
                if let Ok(next) = f[1].parse::<u64>() {
                    self.next_kseq = self.next_kseq.max(next);
                }
                true
            }
            (Some("G"), 5) => {
                let line = serde_json::from_str::<GrantLine>(&unesc(f[4]));
                if let (Ok(g), Some(a)) = (line, parse_allowance(f[1], f[2], f[3])) {
                    self.grant_credits(&g.customer.as_str().into(), a, g.grant);
                }
                true
            }
            (Some("B"), 3) => {
                if let Ok(acc) = serde_json::from_str::<Account>(&unesc(f[2])) {
                    lock(&self.credits).insert(unesc(f[1]), acc);
                }
                true
            }
            _ => false,
        }
    }

    /// The accounts (and charges owed to the shared store) as compaction
    /// writes them.
    pub(super) fn credit_lines(&self) -> String {
        let mut out = String::new();
        if self.next_kseq > 0 {
            out.push_str(&line_with_crc(&format!("W {}", self.next_kseq)));
        }
        for c in lock(&self.owed).charges.values() {
            let owed = Some((c.seq, &*c.plan));
            charge_line(&mut out, &c.customer, c.allowance, c.credits, c.at, owed);
        }
        for (c, acc) in lock(&self.credits).iter() {
            if let Ok(json) = serde_json::to_string(acc) {
                out.push_str(&line_with_crc(&format!("B {} {}", esc(c), esc(&json))));
            }
        }
        out
    }
}

fn grant_into(accounts: &mut Accounts, customer: &Arc<str>, a: Allowance, g: Grant) -> Granted {
    accounts
        .entry(customer.clone())
        .or_insert_with(|| Account::new(a, g.at))
        .grant(a, g)
}

/// A grant's line.
pub(super) fn grant_line(customer: &str, a: Allowance, g: &Grant) -> String {
    let body = GrantLine {
        customer: customer.to_owned(),
        grant: g.clone(),
    };
    let json = serde_json::to_string(&body).unwrap_or_default();
    line_with_crc(&format!("G {} {}", allowance_fields(a), esc(&json)))
}

impl CreditBook for Spool {
    fn balance(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Balance {
        let a = policy.allowance;
        match lock(&self.credits).get(customer) {
            Some(acc) => acc.balance(a, now),
            None => Account::new(a, now).balance(a, now),
        }
    }

    fn grant(
        &self,
        customer: &Arc<str>,
        policy: &CreditPolicy,
        grant: Grant,
    ) -> Result<(Granted, Balance), CreditError> {
        let a = policy.allowance;
        let at = grant.at;
        // Under the writer's lock: no other grant can pass the key check
        // between this one's check and its line.
        let mut w = lock(&self.writer);
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(CreditError::NotRecorded("the usage spool is closed".into()));
        }
        let seen = lock(&self.credits)
            .get(customer)
            .map_or(Granted::Applied, |acc| acc.would_grant(&grant));
        if seen == Granted::Applied {
            w.append_text(&grant_line(customer, a, &grant))
                .map_err(CreditError::NotRecorded)?;
            grant_into(&mut lock(&self.credits), customer, a, grant);
            // Credits removed raise the share used: thresholds it reaches.
            let reached = self.credit_alerts_after_grant(customer, policy, at);
            if !reached.is_empty() {
                let text: String = reached.iter().map(super::alerts::alert_line).collect();
                let ok = w.append_text(&text).is_ok();
                tollgate_core::sync::write(&self.alerts).written(&reached, ok);
            }
        }
        drop(w);
        Ok((seen, CreditBook::balance(self, customer, policy, at)))
    }

    fn history(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Vec<Entry> {
        let a = policy.allowance;
        match lock(&self.credits).get(customer) {
            Some(acc) => acc.history(a, now),
            None => Account::new(a, now).history(a, now),
        }
    }
}

impl Spool {
    /// Up to `max` charges owed to the shared store, oldest first.
    pub fn credits_owed(&self, max: usize) -> Vec<OwedCharge> {
        lock(&self.owed)
            .charges
            .values()
            .take(max)
            .cloned()
            .collect()
    }

    /// The store has these charges: they are owed no more (`Y` lines,
    /// unsynced: a delivery lost with them is retried, and skipped there).
    pub fn credits_delivered(&self, seqs: &[u64]) {
        if seqs.is_empty() {
            return;
        }
        {
            let mut owed = lock(&self.owed);
            for s in seqs {
                owed.settle(*s);
            }
        }
        let text: String = seqs
            .iter()
            .map(|s| line_with_crc(&format!("Y {s}")))
            .collect();
        if let Err(e) = lock(&self.writer).append_unsynced(&text) {
            log::warn!("credit deliveries not recorded ({e}): they are sent again after a restart, and skipped by the store");
        }
    }

    /// What `customer` was charged here that the shared store does not
    /// have yet.
    pub fn credits_pending(&self, customer: &str) -> u64 {
        lock(&self.owed)
            .per_customer
            .get(customer)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until a charge may be owed (returns at once if one was
    /// written since the last wait).
    pub async fn credits_written(&self) {
        self.owed_ready.notified().await;
    }
}
