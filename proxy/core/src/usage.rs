//! In-process usage counting: units per (customer, meter) in the current
//! billing period (the UTC calendar month). Every recorded event is also
//! handed to the configured [`UsageSink`]s; that is where durable reporting
//! to billing providers plugs in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::clock::{month_bounds, rfc3339, Clock, Millis};
use crate::limiter::Decision;
use crate::plans::Plan;

/// One billable response, as recorded before the response reaches the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub customer: Arc<str>,
    pub meter: Arc<str>,
    pub units: u64,
    pub at: Millis,
}

/// Receives every recorded usage event. Implementations must not block.
pub trait UsageSink: Send + Sync {
    fn record(&self, event: &UsageEvent);
}

#[derive(Debug, Default)]
struct CustomerUsage {
    period_start: Millis,
    meters: Vec<(Arc<str>, u64)>,
}

/// Usage of one customer this period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodUsage {
    pub period_start: Millis,
    pub period_end: Millis,
    pub meters: Vec<(Arc<str>, u64)>,
}

/// The in-process ledger.
pub struct UsageLedger {
    customers: Mutex<HashMap<Arc<str>, CustomerUsage>>,
    clock: Arc<dyn Clock>,
    sinks: Vec<Arc<dyn UsageSink>>,
}

impl UsageLedger {
    pub fn new(clock: Arc<dyn Clock>, sinks: Vec<Arc<dyn UsageSink>>) -> Self {
        Self {
            customers: Mutex::new(HashMap::new()),
            clock,
            sinks,
        }
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    /// Adds `units` of `meter` for `customer` now.
    pub fn record(&self, customer: &Arc<str>, meter: &Arc<str>, units: u64) {
        let at = self.clock.now_ms();
        crate::metrics::usage_units(meter, units);
        let (start, _) = month_bounds(at);
        {
            let mut map = crate::lock(&self.customers);
            let c = match map.get_mut(&**customer) {
                Some(c) => c,
                None => map.entry(Arc::clone(customer)).or_default(),
            };
            if c.period_start != start {
                c.period_start = start;
                c.meters.clear();
            }
            match c.meters.iter_mut().find(|(m, _)| m == meter) {
                Some((_, n)) => *n = n.saturating_add(units),
                None => c.meters.push((Arc::clone(meter), units)),
            }
        }
        if !self.sinks.is_empty() {
            let event = UsageEvent {
                customer: Arc::clone(customer),
                meter: Arc::clone(meter),
                units,
                at,
            };
            for s in &self.sinks {
                s.record(&event);
            }
        }
    }

    /// Adds usage recorded before this process started (replayed from the spool).
    pub fn seed(&self, customer: &str, meter: &str, units: u64) {
        let (start, _) = month_bounds(self.clock.now_ms());
        let mut map = crate::lock(&self.customers);
        let c = map.entry(Arc::from(customer)).or_default();
        if c.period_start != start {
            c.period_start = start;
            c.meters.clear();
        }
        match c.meters.iter_mut().find(|(m, _)| &**m == meter) {
            Some((_, n)) => *n = n.saturating_add(units),
            None => c.meters.push((Arc::from(meter), units)),
        }
    }

    /// Usage of `customer` in the current period (empty if none).
    pub fn usage(&self, customer: &str) -> PeriodUsage {
        let (start, end) = month_bounds(self.clock.now_ms());
        let map = crate::lock(&self.customers);
        let meters = map
            .get(customer)
            .filter(|c| c.period_start == start)
            .map(|c| c.meters.clone())
            .unwrap_or_default();
        PeriodUsage {
            period_start: start,
            period_end: end,
            meters,
        }
    }

    /// Every customer with usage this period, sorted by id.
    pub fn customers(&self) -> Vec<Arc<str>> {
        let (start, _) = month_bounds(self.clock.now_ms());
        let map = crate::lock(&self.customers);
        let mut ids: Vec<Arc<str>> = map
            .iter()
            .filter(|(_, c)| c.period_start == start)
            .map(|(k, _)| Arc::clone(k))
            .collect();
        ids.sort();
        ids
    }
}

/// Usage of one customer and meter as the durable spool sees it this month
/// (fields in alphabetical order, as the JSON always had them).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MeterTotals {
    /// Not yet settled by every sink.
    pub pending: u64,
    pub recorded: u64,
    /// Delivered by every sink.
    pub reported: u64,
}

/// One policy in a [`UsageReport`].
#[derive(Debug, serde::Serialize)]
pub struct PolicyReport<'a> {
    pub limit: u64,
    pub name: &'a str,
    pub remaining: u64,
    pub reset: u64,
    pub window: std::borrow::Cow<'static, str>,
}

/// The period of a [`UsageReport`], as RFC 3339 timestamps.
#[derive(Debug, serde::Serialize)]
pub struct PeriodReport {
    pub end: String,
    pub start: String,
}

/// The body of `GET /_tollgate/usage` and of each item of the admin usage
/// API: plan, where each policy stands, this period's usage and how much
/// of it has reached billing. (Fields in alphabetical order, as the JSON
/// always had them.)
#[derive(Debug, serde::Serialize)]
pub struct UsageReport<'a> {
    pub billing: BTreeMap<String, MeterTotals>,
    /// Prepaid credits, for a plan that has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<crate::credits::Balance>,
    pub customer: &'a str,
    pub period: PeriodReport,
    pub plan: &'a str,
    pub policies: Vec<PolicyReport<'a>>,
    /// The subscription's state when billing webhooks drive the plan
    /// (`active`, `past_due`, `paused`, `canceling`, `canceled`), else null.
    pub subscription: Option<&'static str>,
    pub usage: BTreeMap<&'a str, u64>,
}

impl<'a> UsageReport<'a> {
    /// `customer` on `plan`, after the (report-only) `decision`, with
    /// `period` from the ledger and `billing` from the spool.
    pub fn new(
        customer: &'a str,
        plan: &'a Plan,
        decision: &'a Decision,
        period: &'a PeriodUsage,
        billing: BTreeMap<String, MeterTotals>,
    ) -> Self {
        let policies = plan
            .limits
            .iter()
            .zip(&decision.policies)
            .map(|(l, p)| PolicyReport {
                limit: p.quota,
                name: &p.name,
                remaining: p.remaining,
                reset: p.reset_secs,
                window: l.window.name(),
            })
            .collect();
        let mut usage = BTreeMap::new();
        for (m, n) in &period.meters {
            *usage.entry(&**m).or_default() += n;
        }
        Self {
            billing,
            credits: None,
            customer,
            period: PeriodReport {
                end: rfc3339(period.period_end),
                start: rfc3339(period.period_start),
            },
            plan: &plan.name,
            policies,
            subscription: None,
            usage,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Units to bill for a response: the route's cost, or the number the
/// upstream put in the route's usage header (absent or unparsable: 0, logged).
pub fn units_from_header(value: Option<&[u8]>) -> Option<u64> {
    let v = std::str::from_utf8(value?).ok()?.trim();
    v.parse::<u64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{days_from_civil, Date, ManualClock, DAY};

    struct Collect(Mutex<Vec<UsageEvent>>);
    impl UsageSink for Collect {
        fn record(&self, e: &UsageEvent) {
            self.0.lock().unwrap().push(e.clone());
        }
    }

    #[test]
    fn usage_accumulates_per_meter_and_resets_with_the_month() {
        let jan31 = days_from_civil(Date {
            year: 2027,
            month: 1,
            day: 31,
        }) as Millis
            * DAY;
        let clock = ManualClock::at(jan31);
        let sink = Arc::new(Collect(Mutex::new(vec![])));
        let l = UsageLedger::new(Arc::new(clock.clone()), vec![sink.clone()]);
        let (c, req, ai): (Arc<str>, Arc<str>, Arc<str>) =
            ("cus_1".into(), "api_requests".into(), "ai_tokens".into());
        l.record(&c, &req, 1);
        l.record(&c, &req, 1);
        l.record(&c, &ai, 1234);
        assert_eq!(
            l.usage("cus_1").meters,
            vec![(req.clone(), 2), (ai.clone(), 1234)]
        );
        assert_eq!(l.customers(), vec![c.clone()]);
        assert_eq!(
            sink.0.lock().unwrap().len(),
            3,
            "every event reaches the sinks"
        );
        clock.advance(DAY); // February 1st
        assert!(l.usage("cus_1").meters.is_empty());
        l.record(&c, &req, 5);
        assert_eq!(l.usage("cus_1").meters, vec![(req, 5)]);
    }

    #[test]
    fn header_units_parse_strictly() {
        assert_eq!(units_from_header(Some(b"42")), Some(42));
        assert_eq!(units_from_header(Some(b" 7 ")), Some(7));
        assert_eq!(units_from_header(Some(b"-1")), None);
        assert_eq!(units_from_header(Some(b"\xff")), None);
        assert_eq!(units_from_header(None), None);
    }
}
