//! What the spool knows, for the rest of the proxy: what each sink still
//! owes, a customer's usage this month, the calendar counters to restore
//! on start, and the spool's gauges.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tollgate_core::clock::{month_bounds, Millis};
use tollgate_core::plans::Window;
use tollgate_core::sync::lock;

use super::{code_window, counter_current, MeterTotals, Spool, AGE_WARNING_SECS};

/// What a customer has used of one calendar limit in its current window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalendarCount {
    pub customer: Arc<str>,
    pub limit: Arc<str>,
    pub window: Window,
    pub start: Millis,
    pub used: u64,
}

impl Spool {
    /// Units not yet in a record plus units in records `sink` has not
    /// settled, and the start of the oldest such window.
    pub fn pending_units(&self, sink: &str) -> (u64, Option<Millis>) {
        lock(&self.state).pending_units(sink)
    }

    /// This month's usage of one customer per meter, as the spool knows it.
    pub fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals> {
        let (month_start, _) = month_bounds(self.clock.now_ms());
        let no_sinks = self.config.sinks.is_empty();
        let st = lock(&self.state);
        let mut out: BTreeMap<String, MeterTotals> = BTreeMap::new();
        for (m, s) in st.summaries.get(customer).into_iter().flatten() {
            if s.month >= month_start {
                let t = out.entry(m.to_string()).or_default();
                t.recorded = t.recorded.saturating_add(s.recorded);
                t.reported = t.reported.saturating_add(s.reported);
            }
        }
        let in_flight = st
            .pending
            .iter()
            .filter(|(k, _)| &*k.0 == customer && k.2 >= month_start)
            .map(|(k, g)| (&k.1, g.units, true))
            .chain(
                st.records
                    .values()
                    .filter(|r| &*r.customer == customer && r.window_start >= month_start)
                    .map(|r| (&r.meter, r.units, r.only.is_none())),
            );
        for (m, units, first) in in_flight {
            let t = out.entry(m.to_string()).or_default();
            if first {
                t.recorded = t.recorded.saturating_add(units);
            }
            // With no sinks nothing is reported, and nothing is pending.
            if !no_sinks {
                t.pending = t.pending.saturating_add(units);
            }
        }
        out
    }

    /// Units recorded this month per (customer, meter), in one pass (for
    /// seeding the in-process ledger at start).
    pub fn recorded_this_month(&self) -> HashMap<(Arc<str>, Arc<str>), u64> {
        let (month_start, _) = month_bounds(self.clock.now_ms());
        let st = lock(&self.state);
        let mut out: HashMap<(Arc<str>, Arc<str>), u64> = HashMap::new();
        let mut add = |c: &Arc<str>, m: &Arc<str>, units: u64| {
            let n = out.entry((c.clone(), m.clone())).or_default();
            *n = n.saturating_add(units);
        };
        for (c, ms) in &st.summaries {
            for (m, s) in ms {
                if s.month >= month_start {
                    add(c, m, s.recorded);
                }
            }
        }
        for ((c, m, w), g) in &st.pending {
            if *w >= month_start {
                add(c, m, g.units);
            }
        }
        for r in st.records.values().filter(|r| r.only.is_none()) {
            if r.window_start >= month_start {
                add(&r.customer, &r.meter, r.units);
            }
        }
        out
    }

    /// The calendar-window charges journaled per (customer, limit,
    /// window) for the windows current now: what the memory limiter is
    /// given back on start.
    pub fn calendar_counters(&self) -> Vec<CalendarCount> {
        let now = self.clock.now_ms();
        let st = lock(&self.state);
        st.counters
            .iter()
            .filter(|((_, _, w), &(start, _))| counter_current(*w, start, now))
            .map(|((c, l, w), &(start, used))| CalendarCount {
                customer: c.clone(),
                limit: l.clone(),
                window: code_window(*w),
                start,
                used,
            })
            .collect()
    }

    /// Customers with usage this month in the spool.
    pub fn customers(&self) -> Vec<Arc<str>> {
        let st = lock(&self.state);
        let mut set: BTreeSet<Arc<str>> = st.pending.keys().map(|k| k.0.clone()).collect();
        set.extend(st.records.values().map(|r| r.customer.clone()));
        set.extend(st.summaries.keys().cloned());
        set.into_iter().collect()
    }

    pub fn update_gauges(&self) {
        tollgate_core::metrics::SPOOL_BYTES.set(self.bytes.load(Ordering::Relaxed) as i64);
        let now = self.clock.now_ms();
        let mut max_lag = 0;
        for sink in &self.config.sinks {
            let (units, oldest) = self.pending_units(sink);
            tollgate_core::metrics::BILLING_PENDING
                .with_label_values(&[sink])
                .set(units as i64);
            let lag = oldest.map_or(0, |o| now.saturating_sub(o) / 1000);
            tollgate_core::metrics::BILLING_LAG
                .with_label_values(&[sink])
                .set(lag as i64);
            max_lag = max_lag.max(lag);
        }
        // Stripe refuses events older than 35 days: warn at 30.
        let aging = max_lag > AGE_WARNING_SECS;
        if aging != self.aging.swap(aging, Ordering::Relaxed) && aging {
            log::error!(
                "undelivered usage is {} days old; Stripe refuses events older than 35 days",
                max_lag / 86_400
            );
        }
    }
}
