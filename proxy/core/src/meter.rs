//! The metering step of a request: when the response comes back, turn its
//! status and reported units into billed units and make them durable
//! before the client has its answer. (Refusing billable work while the
//! journal is full happens earlier, in the gate, before anything is charged.)

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::gate::Admitted;
use crate::plans::StatusSet;
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

/// Where billable usage becomes durable: the metering crate's spool.
pub trait UsageJournal: Send + Sync + 'static {
    /// Resolves to true once `units` of `meter` for `customer` are durable.
    fn append(
        self: &Arc<Self>,
        customer: &Arc<str>,
        meter: &Arc<str>,
        units: u64,
    ) -> impl Future<Output = bool> + Send;

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
    /// journal before the response reaches the client.
    pub async fn record(&self, a: &Admitted, units: u64) -> Result<(), Rejection> {
        let Some(meter) = a.meter.as_ref().filter(|_| units > 0) else {
            return Ok(());
        };
        let customer = &a.identity.customer;
        if let Some(journal) = &self.journal {
            if !journal.append(customer, meter, units).await {
                log::error!("usage of {units} {meter} could not be written to the spool");
                return Err(Rejection::UsageNotRecorded);
            }
        }
        // Counted once it is durable: what /_tollgate/usage shows is billed.
        self.ledger.record(customer, meter, units);
        Ok(())
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
        async fn append(self: &Arc<Self>, _: &Arc<str>, _: &Arc<str>, _: u64) -> bool {
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
