//! Threshold alerts (`alerts: { at: [80, 100], webhook }` in tollgate.yaml):
//! a customer whose usage crosses one of the `at` percents of a quota (a
//! limit with a `day` or `month` window) or of their credits this period
//! gets one `usage.threshold_reached` event, once per threshold and period.
//!
//! Plain logic, no I/O: the gate finds the thresholds a quota reached in
//! the limiter's decision (in Redis mode only those the request's own
//! charge crossed, so only that instance raises them); the spool finds
//! those of credits where it charges them, and is the [`AlertJournal`] that
//! makes each alert durable, remembers it for the period (so neither a
//! restart nor usage that falls and rises again repeats it) and hands it
//! to the delivery loop. Sliding windows (`second` … `1h`) have no period to be
//! warned about and give no alerts.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::limiter::{calendar_window, Decision};
use crate::plans::{Plan, Window};

/// The `policy` of an alert about a customer's prepaid credits.
pub const CREDITS: &str = "credits";

/// The percents alerts fire at, ascending and distinct.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Thresholds(Vec<u16>);

impl Thresholds {
    pub fn new(mut at: Vec<u16>) -> Self {
        at.sort_unstable();
        at.dedup();
        Self(at)
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The percents of `limit` that usage passed on its way from `before`
    /// to `after` (reaching one counts: 100 % is crossed by the charge
    /// that uses the last unit).
    pub fn crossed(&self, before: u64, after: u64, limit: u64) -> impl Iterator<Item = u16> + '_ {
        let limit = u128::from(limit);
        let (b, a) = (u128::from(before) * 100, u128::from(after) * 100);
        self.0.iter().copied().filter(move |t| {
            let mark = u128::from(*t) * limit;
            limit > 0 && b < mark && mark <= a
        })
    }
}

/// Customer, policy, percent and period start.
pub type AlertKey = (Arc<str>, Arc<str>, u16, Millis);

/// One threshold a customer crossed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub customer: Arc<str>,
    pub plan: Arc<str>,
    /// The limit's name, or [`CREDITS`].
    pub policy: Arc<str>,
    pub percent: u16,
    /// Used when it was crossed, and what the percent is of (the limit's
    /// quota, or the credits granted this period).
    pub used: u64,
    pub limit: u64,
    pub period_start: Millis,
    pub period_end: Millis,
    /// When it was crossed.
    pub at: Millis,
}

impl Alert {
    /// The event's id: the same for the same customer, policy, percent and
    /// period on every instance and after every restart, so a receiver can
    /// deduplicate by `webhook-id` as Standard Webhooks asks it to.
    pub fn id(&self) -> String {
        let key = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}",
            self.customer, self.policy, self.percent, self.period_start
        );
        format!("msg_{}", &hex::encode(crate::keys::hash(&key))[..24])
    }

    /// What makes an alert the same alert.
    pub fn key(&self) -> AlertKey {
        (
            self.customer.clone(),
            self.policy.clone(),
            self.percent,
            self.period_start,
        )
    }

    /// The event body as it is delivered.
    pub fn event(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "usage.threshold_reached",
            "timestamp": crate::clock::rfc3339(self.at),
            "data": {
                "customer": &*self.customer,
                "plan": &*self.plan,
                "policy": &*self.policy,
                "percent": self.percent,
                "used": self.used,
                "limit": self.limit,
                "period_start": crate::clock::rfc3339(self.period_start),
                "period_end": crate::clock::rfc3339(self.period_end),
            }
        })
    }
}

/// Where alerts become durable and from where they are delivered: the
/// metering crate's spool.
pub trait AlertJournal: Send + Sync {
    fn thresholds(&self) -> &Thresholds;
    /// Journals `alert` unless the same (customer, policy, percent,
    /// period) was raised before. Never waits; cheap for one raised before
    /// (a customer past a threshold raises it with every request).
    fn raise(&self, alert: Alert);
}

/// The thresholds of `plan`'s quotas that usage has reached after a
/// charge of `cost` at `at`, read from the limiter's `decision` (in plan
/// order, as every limiter answers). With `shared` limits (Redis) only
/// those this charge crossed: the instance whose charge it was raises
/// them, and no other. Otherwise every threshold reached, so one a lost
/// write or a smaller quota (a plan change) skipped is raised by the next
/// request; the journal keeps the first of each.
pub fn limit_crossings(
    th: &Thresholds,
    customer: &Arc<str>,
    plan: &Plan,
    decision: &Decision,
    cost: u64,
    at: Millis,
    shared: bool,
) -> Vec<Alert> {
    let mut out = Vec::new();
    if cost == 0 || !decision.allowed {
        return out;
    }
    for (p, l) in decision.policies.iter().zip(&plan.limits) {
        if !matches!(l.window, Window::Day | Window::Month) || p.concurrent {
            continue;
        }
        // Past a quota with `overage`, `remaining` stays 0: every such
        // request seems to reach 100 % again, and the journal keeps the
        // first.
        let after = p.quota.saturating_sub(p.remaining);
        let before = if shared {
            after.saturating_sub(cost)
        } else {
            0
        };
        for percent in th.crossed(before, after, p.quota) {
            let (period_start, period_end) = calendar_window(l.window, at);
            out.push(Alert {
                customer: customer.clone(),
                plan: plan.name.clone(),
                policy: p.name.clone(),
                percent,
                used: after,
                limit: p.quota,
                period_start,
                period_end,
                at,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_crossed_once_by_the_charge_that_reaches_it() {
        let th = Thresholds::new(vec![100, 80, 80]);
        assert_eq!(th.as_slice(), &[80, 100]);
        let crossed = |b, a| th.crossed(b, a, 10).collect::<Vec<_>>();
        assert_eq!(crossed(7, 8), vec![80]);
        assert_eq!(crossed(8, 9), Vec::<u16>::new());
        assert_eq!(crossed(9, 10), vec![100]);
        // One big charge passes both.
        assert_eq!(crossed(0, 12), vec![80, 100]);
        // Uneven quotas: 80 % of 7 is 5.6, reached at 6.
        assert_eq!(th.crossed(5, 6, 7).collect::<Vec<_>>(), vec![80]);
        assert_eq!(th.crossed(0, 5, 0).count(), 0, "nothing to be a percent of");
    }

    #[test]
    fn shared_limits_raise_what_the_charge_crossed_local_ones_all_reached() {
        use crate::diag::Source;
        use crate::limiter::{Limiter, MemoryLimiter};
        let plans = crate::plans::Plans::parse(&Source::new(
            std::path::Path::new("plans.yaml"),
            "default_plan: p\nplans:\n  p:\n    limits: [{ name: monthly, requests: 10, per: month }, { name: burst, requests: 100, per: second }]\n".into(),
        ))
        .unwrap();
        let plan = plans.get("p").unwrap().clone();
        let clock = std::sync::Arc::new(crate::clock::ManualClock::at(1_780_000_000_000));
        let limiter = MemoryLimiter::new(clock);
        let c: Arc<str> = "cus_1".into();
        let th = Thresholds::new(vec![50, 80]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let d = rt.block_on(limiter.check(&c, &plan, 9)).unwrap();
        let percents = |shared, cost| {
            limit_crossings(&th, &c, &plan, &d, cost, 0, shared)
                .iter()
                .map(|a| (a.policy.to_string(), a.percent))
                .collect::<Vec<_>>()
        };
        let both = vec![("monthly".to_owned(), 50), ("monthly".to_owned(), 80)];
        assert_eq!(percents(false, 9), both);
        assert_eq!(percents(true, 9), both, "0 to 9 crosses both");
        // Had this charge been 1 of the 9, it crossed neither (8 to 9).
        assert_eq!(percents(true, 1), vec![]);
        assert_eq!(percents(false, 1), both, "reached all the same");
    }

    #[test]
    fn ids_name_the_customer_policy_percent_and_period() {
        let a = Alert {
            customer: "cus_1".into(),
            plan: "pro".into(),
            policy: "monthly".into(),
            percent: 80,
            used: 8,
            limit: 10,
            period_start: 1000,
            period_end: 2000,
            at: 1500,
        };
        let later = Alert {
            used: 9,
            at: 1600,
            ..a.clone()
        };
        assert_eq!(a.id(), later.id(), "when and how far past does not matter");
        assert_ne!(
            a.id(),
            Alert {
                period_start: 2000,
                ..a.clone()
            }
            .id()
        );
        assert_ne!(
            a.id(),
            Alert {
                percent: 100,
                ..a.clone()
            }
            .id()
        );
        assert!(a.id().starts_with("msg_") && a.id().len() == 28);
        let e = a.event();
        assert_eq!(e["type"], "usage.threshold_reached");
        assert_eq!(e["data"]["percent"], 80);
        assert_eq!(e["data"]["policy"], "monthly");
    }
}
