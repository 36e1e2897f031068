//! Prepaid credits: a customer's balance, the plan's grant per period, and
//! grants from the admin API or a bought credit pack. Plain bookkeeping,
//! no I/O: the metering spool journals every charge and grant (its `K` and
//! `G` lines) and keeps the [`Account`]s; the gate asks a [`CreditBook`]
//! for a balance before it admits a request that costs credits.
//!
//! An account has two buckets. The plan's grant for the current period
//! (`plan_left`) is spent first; at the period's end what is left of it
//! expires, or with `rollover` joins the other bucket (`other`: grants,
//! purchases, and what rolled over), which never expires and may go below
//! zero (a response that cost more than was left). Within a period the
//! order of charges and grants does not change where the buckets end up,
//! so charges may be summed per day without losing exactness.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{Millis, DAY};
use crate::limiter::calendar_window;
use crate::plans::Window;

mod holds;
pub use holds::{Hold, Holds};

/// How long an idempotency key of a grant is remembered.
pub const IDEMPOTENCY_TTL: Millis = 30 * DAY;

/// A plan's grant: `credits: { grant, per, rollover }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub grant: u64,
    /// `Window::Day` or `Window::Month`.
    pub per: Window,
    pub rollover: bool,
}

impl Default for Allowance {
    /// No grant: the customer only has what was granted or bought.
    fn default() -> Self {
        Self {
            grant: 0,
            per: Window::Month,
            rollover: false,
        }
    }
}

/// A plan's credits: its grant and what one unit of each meter costs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreditPolicy {
    /// The plan these are the credits of (named in alerts).
    pub plan: Arc<str>,
    pub allowance: Allowance,
    /// `meters.<name>.credits_per_unit`.
    pub prices: BTreeMap<Arc<str>, u64>,
}

impl CreditPolicy {
    /// What `units` of `meter` cost in credits; 0 for a meter with no price.
    pub fn cost(&self, meter: &str, units: u64) -> u64 {
        self.prices
            .get(meter)
            .map_or(0, |p| p.saturating_mul(units))
    }

    /// Whether units of `meter` cost credits at all.
    pub fn prices(&self, meter: &str) -> bool {
        self.prices.get(meter).is_some_and(|p| *p > 0)
    }
}

/// Where a customer's credits stand this period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub remaining: i64,
    /// This period's credits: what was carried in, the plan's grant, and
    /// every grant and purchase since. `remaining = granted - used`.
    pub granted: i64,
    pub used: u64,
    /// When the current period ends (ms).
    #[serde(skip)]
    pub period_end: Millis,
}

/// Who granted credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /admin/customers/{id}/credits`.
    Admin,
    /// A credit pack bought through Stripe Checkout.
    Stripe,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Stripe => "stripe",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Source::Admin),
            "stripe" => Some(Source::Stripe),
            _ => None,
        }
    }
}

/// One grant (or, negative, removal) of credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub at: Millis,
    pub amount: i64,
    pub idempotency_key: Option<String>,
    pub reason: String,
    pub source: Source,
}

/// What a grant did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granted {
    /// Applied now.
    Applied,
    /// Its idempotency key was used before for the same amount: nothing
    /// changed (a retry).
    Duplicate,
    /// Its idempotency key was used before for another amount.
    Conflict,
}

/// One line of a customer's credit history for the current period; the
/// amounts add up to the balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `carried` (the balance the period opened with), `plan_grant`,
    /// `grant` (admin or stripe, see `source`), `usage` (a day's charges).
    pub kind: &'static str,
    pub at: Millis,
    pub amount: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A customer's credits, as the spool keeps and journals them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Start of the current period.
    pub period: Millis,
    /// What is left of the plan's grant for this period.
    pub plan_left: i64,
    /// Everything else: grants, purchases, rollover; may be negative.
    pub other: i64,
    /// The balance the period opened with (`other` after the roll).
    pub opening: i64,
    /// The plan's grant for this period.
    pub plan_grant: u64,
    /// Credits charged this period, per UTC day (day start, credits).
    pub days: Vec<(Millis, u64)>,
    /// Their sum (kept, so a balance reads no list).
    #[serde(default)]
    pub used: u64,
    /// Grants of this period.
    pub grants: Vec<Grant>,
    /// Idempotency keys seen within [`IDEMPOTENCY_TTL`]: when, and the amount.
    pub keys: BTreeMap<String, (Millis, i64)>,
}

impl Account {
    /// A customer seen for the first time at `at`: the plan's grant for
    /// the period under way.
    pub fn new(a: Allowance, at: Millis) -> Self {
        Self {
            period: period_start(a, at),
            plan_left: a.grant as i64,
            other: 0,
            opening: 0,
            plan_grant: a.grant,
            days: Vec::new(),
            used: 0,
            grants: Vec::new(),
            keys: BTreeMap::new(),
        }
    }

    /// Moves the account into the period of `at`, granting the plan's
    /// credits for each period begun (expiring, or with `rollover` keeping,
    /// what was left of the last). An `at` in an earlier period changes
    /// nothing.
    pub fn roll(&mut self, a: Allowance, at: Millis) {
        let target = period_start(a, at);
        if self.period >= target {
            // The plan (or its grant) changed within the period: the new
            // grant applies now, less what of the old one was spent.
            if self.period == target && a.grant != self.plan_grant {
                let spent = (self.plan_grant as i64).saturating_sub(self.plan_left);
                self.plan_left = (a.grant as i64).saturating_sub(spent).max(0);
                self.plan_grant = a.grant;
            }
            return;
        }
        if a.rollover {
            // Every period begun keeps what was left of the one before
            // (bounded: at most this many periods are walked; an account
            // idle for centuries on a daily grant keeps that many).
            let mut steps = 0;
            while self.period < target && steps < 100_000 {
                steps += 1;
                self.other = self.other.saturating_add(self.plan_left.max(0));
                self.plan_left = a.grant as i64;
                self.period = period_start(a, calendar_window(a.per, self.period).1);
            }
        }
        self.period = target;
        self.opening = self.other;
        self.plan_left = a.grant as i64;
        self.plan_grant = a.grant;
        self.days.clear();
        self.used = 0;
        self.grants.clear();
    }

    /// Charges `credits` at `at`: the plan's grant first, then the rest.
    pub fn charge(&mut self, a: Allowance, credits: u64, at: Millis) {
        if credits == 0 {
            return;
        }
        self.roll(a, at);
        let c = i64::try_from(credits).unwrap_or(i64::MAX);
        let from_plan = c.min(self.plan_left.max(0));
        self.plan_left -= from_plan;
        self.other = self.other.saturating_sub(c - from_plan);
        self.used = self.used.saturating_add(credits);
        let day = at - at % DAY;
        match self.days.last_mut() {
            Some((d, n)) if *d == day => *n = n.saturating_add(credits),
            _ => self.days.push((day, credits)),
        }
    }

    /// Applies a grant, unless its idempotency key was seen before.
    pub fn grant(&mut self, a: Allowance, g: Grant) -> Granted {
        self.roll(a, g.at);
        self.keys
            .retain(|_, (t, _)| t.saturating_add(IDEMPOTENCY_TTL) > g.at);
        let seen = self.would_grant(&g);
        if seen != Granted::Applied {
            return seen;
        }
        if let Some(k) = &g.idempotency_key {
            self.keys.insert(k.clone(), (g.at, g.amount));
        }
        self.other = self.other.saturating_add(g.amount);
        self.grants.push(g);
        Granted::Applied
    }

    /// What a grant would do, without applying it.
    pub fn would_grant(&self, g: &Grant) -> Granted {
        match g.idempotency_key.as_ref().and_then(|k| self.keys.get(k)) {
            Some((t, amount)) if t.saturating_add(IDEMPOTENCY_TTL) > g.at => {
                if *amount == g.amount {
                    Granted::Duplicate
                } else {
                    Granted::Conflict
                }
            }
            _ => Granted::Applied,
        }
    }

    /// The balance at `now`, as if rolled (the account is not changed).
    pub fn balance(&self, a: Allowance, now: Millis) -> Balance {
        let mut view;
        let acc = if period_start(a, now) > self.period || a.grant != self.plan_grant {
            view = self.clone();
            view.roll(a, now);
            &view
        } else {
            self
        };
        let used = acc.used;
        let granted = acc
            .opening
            .saturating_add(acc.plan_grant as i64)
            .saturating_add(acc.grants.iter().map(|g| g.amount).sum::<i64>());
        Balance {
            remaining: acc.plan_left.saturating_add(acc.other),
            granted,
            used,
            period_end: calendar_window(a.per, acc.period).1,
        }
    }

    /// This period's history, oldest first; its amounts add up to the balance.
    pub fn history(&self, a: Allowance, now: Millis) -> Vec<Entry> {
        let mut acc = self.clone();
        acc.roll(a, now);
        let entry = |kind, at, amount| Entry {
            kind,
            at,
            amount,
            source: None,
            reason: None,
            idempotency_key: None,
        };
        let mut out = Vec::new();
        if acc.opening != 0 {
            out.push(entry("carried", acc.period, acc.opening));
        }
        if acc.plan_grant > 0 {
            out.push(entry("plan_grant", acc.period, acc.plan_grant as i64));
        }
        for g in &acc.grants {
            out.push(Entry {
                source: Some(g.source),
                reason: Some(g.reason.clone()),
                idempotency_key: g.idempotency_key.clone(),
                ..entry("grant", g.at, g.amount)
            });
        }
        for (day, n) in &acc.days {
            out.push(entry("usage", *day, -i64::try_from(*n).unwrap_or(i64::MAX)));
        }
        out.sort_by_key(|e| e.at);
        out
    }
}

/// The start of the grant period holding `at`.
pub fn period_start(a: Allowance, at: Millis) -> Millis {
    calendar_window(a.per, at).0
}

/// A grant period's number (UTC days or months since 1970), so a shared
/// store can count the periods between two without a calendar.
pub fn period_index(per: Window, start: Millis) -> i64 {
    let days = (start / DAY) as i64;
    if per == Window::Day {
        return days;
    }
    let d = crate::clock::civil_from_days(days);
    d.year * 12 + i64::from(d.month) - 1
}

/// Why a grant could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditError {
    /// The journal could not write it: nothing was granted.
    NotRecorded(String),
}

impl std::fmt::Display for CreditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreditError::NotRecorded(why) => write!(f, "the grant could not be recorded: {why}"),
        }
    }
}

/// Where balances live (the metering spool).
pub trait CreditBook: Send + Sync {
    /// `customer`'s balance now, under `policy`.
    fn balance(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Balance;

    /// Grants (or, negative, removes) credits, durably; blocks on the file.
    fn grant(
        &self,
        customer: &Arc<str>,
        policy: &CreditPolicy,
        grant: Grant,
    ) -> Result<(Granted, Balance), CreditError>;

    /// This period's history of `customer`.
    fn history(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Vec<Entry>;

    /// Whether the balances live in the limiter's shared store (Redis), so
    /// the gate asks for them in the limiter's call ([`crate::limiter::CreditAsk`])
    /// rather than here.
    fn shared(&self) -> bool {
        false
    }

    /// Credits this instance has charged `customer` that the shared store
    /// does not have yet (0 when the balances are here).
    fn pending(&self, _customer: &str) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{days_from_civil, Date};

    fn at(year: i64, month: u32, day: u32) -> Millis {
        days_from_civil(Date { year, month, day }) as Millis * DAY
    }

    fn monthly(grant: u64, rollover: bool) -> Allowance {
        Allowance {
            grant,
            per: Window::Month,
            rollover,
        }
    }

    fn grant(at: Millis, amount: i64, key: Option<&str>) -> Grant {
        Grant {
            at,
            amount,
            idempotency_key: key.map(Into::into),
            reason: "test".into(),
            source: Source::Admin,
        }
    }

    fn sums_to_balance(acc: &Account, a: Allowance, now: Millis) {
        let b = acc.balance(a, now);
        let h: i64 = acc.history(a, now).iter().map(|e| e.amount).sum();
        assert_eq!(h, b.remaining, "history adds up to the balance");
        assert_eq!(b.granted - b.used as i64, b.remaining);
    }

    #[test]
    fn the_plan_grant_is_spent_first_and_expires_at_the_period_edge() {
        let a = monthly(100, false);
        let jan = at(2027, 1, 10);
        let mut acc = Account::new(a, jan);
        acc.grant(a, grant(jan, 50, Some("k1")));
        acc.charge(a, 120, jan + 1);
        let b = acc.balance(a, jan + 2);
        assert_eq!((b.remaining, b.granted, b.used), (30, 150, 120));
        sums_to_balance(&acc, a, jan + 2);
        // The last millisecond of January, then the first of February.
        let feb = at(2027, 2, 1);
        assert_eq!(acc.balance(a, feb - 1).remaining, 30);
        let b = acc.balance(a, feb);
        assert_eq!(
            (b.remaining, b.granted, b.used),
            (130, 130, 0),
            "the plan's 100 are new; the bought 30 stay"
        );
        sums_to_balance(&acc, a, feb);
    }

    #[test]
    fn unspent_plan_credits_expire_without_rollover_and_stay_with_it() {
        let jan = at(2027, 1, 31);
        let feb = at(2027, 2, 1);
        for (rollover, want) in [(false, 100), (true, 160)] {
            let a = monthly(100, rollover);
            let mut acc = Account::new(a, jan);
            acc.charge(a, 40, jan);
            assert_eq!(acc.balance(a, feb).remaining, want, "rollover {rollover}");
            sums_to_balance(&acc, a, feb);
        }
        // Idle for two whole months with rollover: every grant is kept.
        let a = monthly(100, true);
        let acc = Account::new(a, jan);
        assert_eq!(acc.balance(a, at(2027, 4, 2)).remaining, 400);
    }

    #[test]
    fn a_plan_change_mid_period_grants_the_new_plans_credits_now() {
        let t = at(2027, 6, 10);
        let none = Allowance::default();
        let mut acc = Account::new(none, t);
        acc.grant(none, grant(t, 50, None));
        // Moved to a plan granting 100 a month: its grant applies at once.
        let pro = monthly(100, false);
        assert_eq!(acc.balance(pro, t + 1).remaining, 150);
        acc.charge(pro, 30, t + 2);
        // Up to 300: the 30 spent of the old grant stay spent.
        let big = monthly(300, false);
        assert_eq!(acc.balance(big, t + 3).remaining, 270 + 50);
        sums_to_balance(&acc, big, t + 3);
    }

    #[test]
    fn a_daily_grant_rolls_at_midnight_utc() {
        let a = Allowance {
            grant: 10,
            per: Window::Day,
            rollover: false,
        };
        let d1 = at(2027, 3, 5);
        let mut acc = Account::new(a, d1);
        acc.charge(a, 10, d1 + 5);
        assert_eq!(acc.balance(a, d1 + DAY - 1).remaining, 0);
        assert_eq!(acc.balance(a, d1 + DAY).remaining, 10);
    }

    #[test]
    fn grants_are_idempotent_by_key_and_may_remove() {
        let a = monthly(0, false);
        let t = at(2027, 1, 1);
        let mut acc = Account::new(a, t);
        assert_eq!(
            acc.grant(a, grant(t, 500, Some("pack-1"))),
            Granted::Applied
        );
        assert_eq!(
            acc.grant(a, grant(t + 1, 500, Some("pack-1"))),
            Granted::Duplicate
        );
        assert_eq!(
            acc.grant(a, grant(t + 2, 700, Some("pack-1"))),
            Granted::Conflict
        );
        assert_eq!(acc.grant(a, grant(t + 3, -200, None)), Granted::Applied);
        assert_eq!(acc.balance(a, t + 4).remaining, 300);
        // The key is forgotten after its time to live.
        assert_eq!(
            acc.would_grant(&grant(t + IDEMPOTENCY_TTL, 500, Some("pack-1"))),
            Granted::Applied
        );
    }

    #[test]
    fn the_order_of_charges_and_grants_within_a_period_does_not_matter() {
        let a = monthly(100, false);
        let t = at(2027, 5, 3);
        let mut x = Account::new(a, t);
        x.charge(a, 70, t);
        x.grant(a, grant(t + 1, 20, None));
        x.charge(a, 70, t + 2);
        let mut y = Account::new(a, t);
        y.grant(a, grant(t, 20, None));
        y.charge(a, 140, t + 2);
        assert_eq!(
            (x.plan_left, x.other),
            (y.plan_left, y.other),
            "so charges can be summed per day"
        );
        assert_eq!(
            x.balance(a, t + 3).remaining,
            -20,
            "a balance may go below zero"
        );
    }
}
