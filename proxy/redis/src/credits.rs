//! Prepaid credits in Redis, for instances sharing their limits there: a
//! customer's balance is an account hash that `credits.lua` charges and
//! grants to atomically, and that the limiter's script reads in the call
//! that checks the limits (one round trip per request).
//!
//! Each instance journals its charges in its own usage spool first; the
//! gateway delivers them here in spool order ([`RedisCredits::charge`]),
//! and the account remembers the last sequence applied from each spool, so
//! a delivery retried after a crash charges nothing twice. Grants are made
//! here directly (Redis, with AOF, is their journal).
//!
//! Keys, under the customer's hash tag: `{P:cus}:k` (the account, see
//! `account.lua`), `:kd` (credits used per UTC day), `:kg` (this period's
//! grants, JSON) and `:kk` (idempotency keys of grants).

use redis::Script;
use tollgate_core::clock::{Millis, DAY};
use tollgate_core::credits::{
    period_index, period_start, Account, Allowance, Balance, Grant, Granted, IDEMPOTENCY_TTL,
};
use tollgate_core::limiter::calendar_window;
use tollgate_core::plans::Window;

use crate::conn::RedisConn;

const SCRIPT: &str = concat!(include_str!("account.lua"), include_str!("credits.lua"));

/// The key of `customer`'s account (the limiter's script reads it too).
pub(crate) fn account_key(prefix: &str, customer: &str) -> String {
    format!("{{{prefix}:{customer}}}:k")
}

/// The period arguments both scripts take: the period of `at` under `a`,
/// its number and kind, the plan's grant and rollover.
pub(crate) fn period_args(inv: &mut redis::ScriptInvocation<'_>, a: Allowance, at: Millis) {
    let start = period_start(a, at);
    inv.arg(start)
        .arg(period_index(a.per, start))
        .arg(if a.per == Window::Day { "d" } else { "m" })
        .arg(a.grant)
        .arg(u8::from(a.rollover));
}

/// One charge from a spool, as delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// Its sequence in the spool: increasing, never reused.
    pub seq: u64,
    pub credits: u64,
    pub at: Millis,
}

/// A write's effect on the balance (for the credit alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Charges applied (the others were applied before), or the grant's
    /// outcome as a number (0 applied, 1 duplicate, 2 conflict).
    pub status: i64,
    pub before: Balance,
    pub after: Balance,
}

pub struct RedisCredits {
    conn: RedisConn,
    script: Script,
}

impl RedisCredits {
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            script: Script::new(SCRIPT),
        }
    }

    /// A call of `op` on `customer`'s keys, with the period of `at`.
    fn invocation<'a>(
        &'a self,
        customer: &str,
        op: &str,
        a: Allowance,
        at: Millis,
    ) -> redis::ScriptInvocation<'a> {
        let key = account_key(&self.conn.config.prefix, customer);
        let mut inv = self.script.prepare_invoke();
        inv.key(&key);
        inv.key(format!("{key}d"));
        inv.key(format!("{key}g"));
        inv.key(format!("{key}k"));
        inv.arg(op);
        period_args(&mut inv, a, at);
        inv
    }

    async fn run(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        a: Allowance,
        at: Millis,
    ) -> Result<Applied, String> {
        let out: Vec<i64> = self.conn.script(inv).await.map_err(|e| e.to_string())?;
        let [status, r0, g0, u0, r1, g1, u1] = out[..] else {
            return Err(format!("unexpected credits reply of {} items", out.len()));
        };
        let end = calendar_window(a.per, at).1;
        let balance = |remaining, granted, used: i64| Balance {
            remaining,
            granted,
            used: used.max(0) as u64,
            period_end: end,
        };
        Ok(Applied {
            status,
            before: balance(r0, g0, u0),
            after: balance(r1, g1, u1),
        })
    }

    /// Applies `charges` of one spool (`instance`) to `customer`'s account,
    /// in order, all made under allowance `a` in the period of `at`; those
    /// applied before are skipped.
    pub async fn charge(
        &self,
        customer: &str,
        instance: &str,
        a: Allowance,
        at: Millis,
        charges: &[Charge],
    ) -> Result<Applied, String> {
        let mut inv = self.invocation(customer, "charge", a, at);
        inv.arg(instance).arg(charges.len());
        for c in charges {
            inv.arg(c.seq).arg(c.credits).arg(c.at - c.at % DAY);
        }
        self.run(&inv, a, at).await
    }

    /// Grants (or, negative, removes) credits, unless the grant's
    /// idempotency key was used within its time to live.
    pub async fn grant(
        &self,
        customer: &str,
        a: Allowance,
        g: &Grant,
    ) -> Result<(Granted, Balance), String> {
        let json = serde_json::to_string(g).map_err(|e| e.to_string())?;
        let mut inv = self.invocation(customer, "grant", a, g.at);
        inv.arg(g.at)
            .arg(g.amount)
            .arg(g.idempotency_key.as_deref().unwrap_or(""))
            .arg(json)
            .arg(IDEMPOTENCY_TTL);
        let applied = self.run(&inv, a, g.at).await?;
        let granted = match applied.status {
            0 => Granted::Applied,
            1 => Granted::Duplicate,
            _ => Granted::Conflict,
        };
        Ok((granted, applied.after))
    }

    /// `customer`'s account as of `now` (core's `Account`, for its balance
    /// and history; without idempotency keys).
    pub async fn account(
        &self,
        customer: &str,
        a: Allowance,
        now: Millis,
    ) -> Result<Account, String> {
        let inv = self.invocation(customer, "read", a, now);
        type Reply = (Vec<i64>, Vec<(i64, i64)>, Vec<String>);
        let (fields, days, grants): Reply =
            self.conn.script(&inv).await.map_err(|e| e.to_string())?;
        let [period, plan_left, other, opening, plan_grant, used] = fields[..] else {
            return Err(format!(
                "unexpected credits reply of {} fields",
                fields.len()
            ));
        };
        let mut days: Vec<(Millis, u64)> = days
            .into_iter()
            .map(|(d, n)| (d.max(0) as Millis, n.max(0) as u64))
            .collect();
        days.sort_unstable();
        Ok(Account {
            period: period.max(0) as Millis,
            plan_left,
            other,
            opening,
            plan_grant: plan_grant.max(0) as u64,
            days,
            used: used.max(0) as u64,
            grants: grants
                .iter()
                .filter_map(|g| serde_json::from_str(g).ok())
                .collect(),
            keys: Default::default(),
        })
    }
}

/// Where the limiter's reply about a group's credits comes from.
pub(crate) fn balance_of(reply: &[i64], a: Allowance, now: Millis) -> Balance {
    Balance {
        remaining: reply[0],
        granted: reply[1],
        used: reply[2].max(0) as u64,
        period_end: calendar_window(a.per, now).1,
    }
}
