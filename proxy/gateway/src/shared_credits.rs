//! Prepaid credits shared through Redis (`limits: { backend: redis }`):
//! the composition of the usage spool, which journals every charge first,
//! and Redis, which keeps every customer's balance for all instances.
//!
//! - The gate asks for a balance in the limiter's script (one round trip);
//!   what this instance charged that Redis does not have yet counts as
//!   held there ([`CreditBook::pending`]).
//! - [`deliver`] applies the spool's owed charges to Redis in sequence
//!   order, as soon as they are written; Redis skips any it applied
//!   before, so nothing is charged twice after a crash.
//! - Grants, balances and histories for the admin API go to Redis directly
//!   (off the async workers: the admin paths call the book synchronously).

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::alerts::{Alert, AlertJournal, CREDITS};
use tollgate_core::clock::Millis;
use tollgate_core::credits::{
    period_start, Balance, CreditBook, CreditError, CreditPolicy, Entry, Grant, Granted,
};
use tollgate_metering::spool::{OwedCharge, Spool};
use tollgate_redis::credits::{Applied, Charge, RedisCredits};
use tollgate_redis::RedisRuntime;

/// Charges per delivery round at most.
const BATCH: usize = 512;

pub struct SharedCredits {
    pub redis: RedisCredits,
    pub spool: Arc<Spool>,
    pub rt: Arc<RedisRuntime>,
    /// Raises the credit thresholds a delivered charge crossed.
    pub alerts: Option<Arc<dyn AlertJournal>>,
}

impl SharedCredits {
    fn block<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> Option<T> {
        self.rt.block_on(f)
    }

    /// Applies `owed` (oldest first) to Redis: per customer, runs of one
    /// allowance and period in one call each. Returns the sequences Redis
    /// has, and the first error (that customer's later charges wait).
    async fn apply(&self, owed: &[OwedCharge]) -> (Vec<u64>, Option<String>) {
        let mut customers: Vec<Vec<&OwedCharge>> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = Default::default();
        for c in owed {
            let i = *index.entry(&c.customer).or_insert_with(|| {
                customers.push(Vec::new());
                customers.len() - 1
            });
            customers[i].push(c);
        }
        let (mut done, mut error) = (Vec::with_capacity(owed.len()), None);
        let same = |x: &&OwedCharge, y: &&OwedCharge| {
            x.allowance == y.allowance
                && period_start(x.allowance, x.at) == period_start(y.allowance, y.at)
        };
        for charges in &customers {
            for run in charges.chunk_by(same) {
                let first = run[0];
                let batch: Vec<Charge> = run
                    .iter()
                    .map(|c| Charge {
                        seq: c.seq,
                        credits: c.credits,
                        at: c.at,
                    })
                    .collect();
                let instance = &self.spool.instance;
                let applied = self
                    .redis
                    .charge(&first.customer, instance, first.allowance, first.at, &batch)
                    .await;
                match applied {
                    Ok(applied) => {
                        done.extend(run.iter().map(|c| c.seq));
                        self.raise(first, &applied);
                    }
                    Err(e) => {
                        // This customer's later charges wait for this one.
                        error.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        (done, error)
    }

    /// The credit thresholds this delivery made the customer reach: Redis
    /// applied it atomically, so exactly one instance sees each crossed.
    fn raise(&self, c: &OwedCharge, applied: &Applied) {
        let Some(journal) = &self.alerts else { return };
        let (b, a) = (applied.before, applied.after);
        let granted = u64::try_from(a.granted).unwrap_or(0);
        let was = u64::try_from(b.granted).unwrap_or(0);
        for percent in journal.thresholds().crossed(0, a.used, granted) {
            let before = journal
                .thresholds()
                .crossed(0, b.used, was)
                .any(|p| p == percent);
            if before && b.granted == a.granted {
                continue;
            }
            journal.raise(Alert {
                customer: c.customer.clone(),
                plan: c.plan.clone(),
                policy: CREDITS.into(),
                percent,
                used: a.used,
                limit: granted,
                period_start: period_start(c.allowance, c.at),
                period_end: a.period_end,
                at: c.at,
            });
        }
    }
}

impl CreditBook for SharedCredits {
    fn balance(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Balance {
        let a = policy.allowance;
        let read = self
            .block(self.redis.account(customer, a, now))
            .and_then(Result::ok);
        let mut b = match read {
            Some(acc) => acc.balance(a, now),
            None => {
                log::warn!("credits: the balance could not be read from redis");
                tollgate_core::credits::Account::new(a, now).balance(a, now)
            }
        };
        // What this instance charged that Redis does not have yet.
        let pending = self.pending(customer);
        b.remaining = b
            .remaining
            .saturating_sub(i64::try_from(pending).unwrap_or(i64::MAX));
        b.used = b.used.saturating_add(pending);
        b
    }

    fn grant(
        &self,
        customer: &Arc<str>,
        policy: &CreditPolicy,
        grant: Grant,
    ) -> Result<(Granted, Balance), CreditError> {
        let a = policy.allowance;
        let at = grant.at;
        let (granted, _) = self
            .block(self.redis.grant(customer, a, &grant))
            .unwrap_or_else(|| Err("the redis runtime is gone".into()))
            .map_err(CreditError::NotRecorded)?;
        Ok((granted, self.balance(customer, policy, at)))
    }

    fn history(&self, customer: &str, policy: &CreditPolicy, now: Millis) -> Vec<Entry> {
        let a = policy.allowance;
        match self.block(self.redis.account(customer, a, now)) {
            Some(Ok(acc)) => acc.history(a, now),
            _ => Vec::new(),
        }
    }

    fn shared(&self) -> bool {
        true
    }

    fn pending(&self, customer: &str) -> u64 {
        self.spool.credits_pending(customer)
    }
}

/// Delivers the spool's owed charges to Redis as they are written, until
/// `stop`; a failure is retried with backoff (the charges stay owed, in
/// the spool, through a restart too).
pub async fn deliver(book: Arc<SharedCredits>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let owed = book.spool.credits_owed(BATCH);
        if owed.is_empty() {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = book.spool.credits_written() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let (done, error) = book.apply(&owed).await;
        book.spool.credits_delivered(&done);
        let Some(e) = error else {
            backoff = Duration::from_millis(100);
            continue;
        };
        log::warn!(
            "credits: {} charges could not be applied in redis ({e}); retrying in {} ms",
            owed.len() - done.len(),
            backoff.as_millis()
        );
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
