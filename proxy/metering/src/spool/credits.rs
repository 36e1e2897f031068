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

use std::collections::HashMap;
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

    /// The accounts as compaction writes them.
    pub(super) fn credit_lines(&self) -> String {
        let mut out = String::new();
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
