//! The metering step of a request: when the response comes back, turn its
//! status and reported units into billed units and make them durable
//! before the client has its answer. (Refusing billable work while the
//! journal is full happens earlier, in the gate, before anything is charged.)

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::body_usage::Scan;
use crate::clock::Millis;
use crate::credits::CreditPolicy;
use crate::gate::Admitted;
use crate::plans::{Plan, StatusSet, Window};
use crate::problem::Rejection;
use crate::usage::{MeterTotals, UsageLedger};

/// Whether the journal can take billable work now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalState {
    Open,
    /// At its size bound: refused with `usage-spool-full`.
    Full,
    /// Its last write failed moments ago (a full or read-only disk):
    /// refused with `usage-not-recorded` before the upstream runs.
    Failing,
}

/// What an admitted request charged against its plan's calendar windows
/// (day, month): journaled with its usage when the limits live in this
/// process's memory, so a restart gives no customer its quota back.
#[derive(Debug, Clone)]
pub struct CalendarCharge {
    pub plan: Arc<Plan>,
    pub cost: u64,
    /// When it was charged.
    pub at: Millis,
}

impl CalendarCharge {
    /// The charge of `a`, if it charged a calendar window at all.
    pub fn of(a: &Admitted) -> Option<Self> {
        let calendar = a
            .plan
            .limits
            .iter()
            .any(|l| matches!(l.window, Window::Day | Window::Month));
        (calendar && a.cost > 0).then(|| Self {
            plan: a.plan.clone(),
            cost: a.cost,
            at: a.at,
        })
    }
}

/// Where billable usage becomes durable: the metering crate's spool.
pub trait UsageJournal: Send + Sync + 'static {
    /// Resolves to true once the response's billable usage (`meter`,
    /// `units`) and its calendar charge, whichever are given, are durable,
    /// with what the usage costs in credits under `credits`.
    fn append(
        self: &Arc<Self>,
        customer: &Arc<str>,
        usage: Option<(&Arc<str>, u64)>,
        charge: Option<CalendarCharge>,
        credits: Option<&Arc<CreditPolicy>>,
    ) -> impl Future<Output = bool> + Send;

    /// Writes `usage` (units per meter) on the caller's thread, for the
    /// synchronous body filter; true once it is in the file.
    fn append_now(
        &self,
        customer: &Arc<str>,
        usage: &[(Arc<str>, u64)],
        credits: Option<&Arc<CreditPolicy>>,
    ) -> bool;

    /// This month's usage of `customer` per meter, recorded and reported.
    fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals>;
}

/// The in-process ledger, the durable journal (None with metering off),
/// and which upstream statuses are billed.
pub struct Meter<J> {
    pub ledger: Arc<UsageLedger>,
    pub journal: Option<Arc<J>>,
    /// Replaced by a reload of the plans file.
    pub billable: crate::sync::Shared<StatusSet>,
    /// Journal calendar charges too (the limits live in this process).
    pub calendar: bool,
}

impl<J: UsageJournal> Meter<J> {
    /// The units a response is billed: none for a status that is not
    /// billable; else what the upstream reported in the route's usage
    /// header (`reported`: None when the route has none, `Some(None)` when
    /// the header was missing or not a number: 0, logged), or the cost.
    pub fn units(&self, a: &Admitted, status: u16, reported: Option<Option<u64>>) -> u64 {
        if !self.billable.load().contains(status) {
            return 0;
        }
        match reported {
            Some(Some(n)) => n,
            Some(None) => {
                log::warn!(
                    "upstream sent no valid usage header for a metered route; billed 0 units"
                );
                0
            }
            None => a.cost,
        }
    }

    /// Records a response's usage: in the ledger, and durably in the
    /// journal before the response reaches the client, with what the
    /// request charged against calendar windows when those are journaled.
    pub async fn record(&self, a: &Admitted, units: u64) -> Result<(), Rejection> {
        let usage = a.meter.as_ref().filter(|_| units > 0).map(|m| (m, units));
        let charge = self.calendar.then(|| CalendarCharge::of(a)).flatten();
        let customer = &a.identity.customer;
        if let Some(journal) = self.journal.as_ref() {
            if (usage.is_some() || charge.is_some())
                && !journal
                    .append(customer, usage, charge, a.plan.credits.as_ref())
                    .await
            {
                match usage {
                    Some((meter, units)) => {
                        log::error!("usage of {units} {meter} could not be written to the spool");
                        return Err(Rejection::UsageNotRecorded);
                    }
                    // Nothing billed: the response is served; the quota
                    // charge is in memory only until the disk is back.
                    None => {
                        log::error!("a quota charge could not be written to the spool");
                        return Ok(());
                    }
                }
            }
        }
        let Some((meter, units)) = usage else {
            return Ok(());
        };
        // Counted once it is durable: what /_tollgate/usage shows is billed.
        self.ledger.record(customer, meter, units);
        Ok(())
    }

    /// Whether a response of `status` is billed at all.
    pub fn billable(&self, status: u16) -> bool {
        self.billable.load().contains(status)
    }

    /// What a `usage:` route's response is billed from what its body said:
    /// the reported units, or the route's `cost` on its meter (counted and
    /// logged with `reason`) when it reported none.
    pub fn body_units(&self, a: &Admitted, scan: Scan, abandoned: bool) -> Vec<(Arc<str>, u64)> {
        let reason = match (&scan, abandoned) {
            (Scan::Units(_), _) => None,
            (_, true) => Some("abandoned"),
            (s, false) => s.fallback_reason(),
        };
        if let Scan::Units(u) = scan {
            return u.into_iter().filter(|(_, n)| *n > 0).collect();
        }
        let reason = reason.unwrap_or("missing");
        crate::metrics::BODY_FALLBACK
            .with_label_values(&[reason])
            .inc();
        match a.meter.clone().filter(|_| a.fallback > 0) {
            Some(m) => {
                log::warn!(
                    "response of {} reported no usage ({reason}): billed the route's cost, {} {m}",
                    a.identity.customer,
                    a.fallback
                );
                vec![(m, a.fallback)]
            }
            None => {
                log::warn!(
                    "response of {} reported no usage ({reason}), and the route names no meter for its cost: billed nothing",
                    a.identity.customer
                );
                Vec::new()
            }
        }
    }

    /// Records units read from a response body, on this thread, before the
    /// body's last chunk goes to the client (the body filter cannot wait).
    pub fn record_now(&self, a: &Admitted, usage: &[(Arc<str>, u64)]) -> Result<(), Rejection> {
        if usage.is_empty() {
            return Ok(());
        }
        let customer = &a.identity.customer;
        if let Some(journal) = &self.journal {
            if !journal.append_now(customer, usage, a.plan.credits.as_ref()) {
                log::error!("usage read from a response body could not be written to the spool");
                return Err(Rejection::UsageNotRecorded);
            }
        }
        for (m, n) in usage {
            self.ledger.record(customer, m, *n);
        }
        Ok(())
    }

    /// The same for a body that ended early (the client went away): the
    /// response is over, so this may wait.
    pub async fn record_late(&self, a: &Admitted, usage: &[(Arc<str>, u64)]) {
        let customer = &a.identity.customer;
        for (m, n) in usage {
            if let Some(journal) = &self.journal {
                if !journal
                    .append(customer, Some((m, *n)), None, a.plan.credits.as_ref())
                    .await
                {
                    log::error!("usage of {n} {m} could not be written to the spool");
                    continue;
                }
            }
            self.ledger.record(customer, m, *n);
        }
    }

    /// `customer`'s totals as the journal knows them (empty with metering off).
    pub fn totals(&self, customer: &str) -> BTreeMap<String, MeterTotals> {
        self.journal
            .as_ref()
            .map(|j| j.totals(customer))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::clock::ManualClock;
    use crate::limiter::Decision;
    use crate::store::KeyInfo;

    /// A journal whose writes fail while `broken` is set.
    #[derive(Default)]
    struct Flaky {
        broken: AtomicBool,
    }

    impl UsageJournal for Flaky {
        async fn append(
            self: &Arc<Self>,
            _: &Arc<str>,
            _: Option<(&Arc<str>, u64)>,
            _: Option<CalendarCharge>,
            _: Option<&Arc<CreditPolicy>>,
        ) -> bool {
            !self.broken.load(Ordering::Relaxed)
        }
        fn append_now(
            &self,
            _: &Arc<str>,
            _: &[(Arc<str>, u64)],
            _: Option<&Arc<CreditPolicy>>,
        ) -> bool {
            !self.broken.load(Ordering::Relaxed)
        }
        fn totals(&self, _: &str) -> BTreeMap<String, MeterTotals> {
            BTreeMap::new()
        }
    }

    fn admitted(meter: Option<&str>) -> Admitted {
        Admitted {
            identity: Arc::new(KeyInfo::new(
                "key_x".into(),
                "cus_1".into(),
                Default::default(),
            )),
            plan: crate::limiter::conformance::plan(&[]),
            decision: Decision::unlimited(),
            cost: 3,
            meter: meter.map(Into::into),
            usage_header: None,
            body: None,
            fallback: 3,
            at: 0,
            credits: None,
            hold: crate::credits::Hold::none(),
        }
    }

    fn meter(journal: Arc<Flaky>) -> Meter<Flaky> {
        let plans = crate::plans::Plans::parse(&crate::diag::Source::new(
            std::path::Path::new("plans.yaml"),
            "default_plan: free\nplans:\n  free: {}\n".into(),
        ))
        .unwrap();
        Meter {
            ledger: Arc::new(UsageLedger::new(Arc::new(ManualClock::at(0)), Vec::new())),
            journal: Some(journal),
            billable: crate::sync::Shared::new(Arc::new(plans.billable)),
            calendar: false,
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_its_own_refusal_not_a_full_spool() {
        let j = Arc::new(Flaky::default());
        let m = meter(j.clone());
        let a = admitted(Some("api"));
        assert_eq!(m.record(&a, 3).await, Ok(()));
        j.broken.store(true, Ordering::Relaxed);
        assert_eq!(m.record(&a, 3).await, Err(Rejection::UsageNotRecorded));
        assert_eq!(
            m.ledger.usage("cus_1").meters,
            vec![("api".into(), 3)],
            "what was not recorded is not counted either"
        );
        assert_eq!(
            m.record(&admitted(None), 3).await,
            Ok(()),
            "unbilled work records nothing"
        );
    }

    #[test]
    fn units_follow_status_header_and_cost() {
        let m = meter(Arc::default());
        let a = admitted(Some("api"));
        assert_eq!(m.units(&a, 200, None), 3);
        assert_eq!(m.units(&a, 200, Some(Some(1000))), 1000);
        assert_eq!(m.units(&a, 200, Some(None)), 0);
        assert_eq!(m.units(&a, 500, None), 0, "only 2xx is billed by default");
    }
}
