//! `on_error` as a limiter: wraps a shared-store limiter (Redis) and
//! decides what happens when it cannot answer.

use std::sync::Arc;

use super::{Decision, Limiter, LimiterError, MemoryLimiter};
use crate::plans::Plan;

/// What to do when the shared store cannot answer (`redis.on_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Keep serving known keys and enforce plans in this instance's memory.
    Local,
    /// Admit.
    Open,
    /// Answer 503 with Retry-After.
    Closed,
}

impl OnError {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => OnError::Local,
            "open" => OnError::Open,
            "closed" => OnError::Closed,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Local => "local",
            OnError::Open => "open",
            OnError::Closed => "closed",
        }
    }
}

/// `primary`, and when it fails, `on_error`: the same plans enforced in
/// this instance's memory (`local`), admit (`open`) or refuse (`closed`).
pub struct Fallback<L> {
    pub primary: L,
    /// Enforces the same plans in this instance's memory for `on_error: local`.
    pub local: MemoryLimiter,
    pub on_error: OnError,
}

impl<L: Limiter> Fallback<L> {
    async fn decide(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: Option<super::CreditAsk>,
    ) -> Result<(Decision, Option<super::CreditAnswer>), LimiterError> {
        let primary = match ask {
            Some(ask) => self.primary.check_credits(customer, plan, cost, ask).await,
            None => self
                .primary
                .check(customer, plan, cost)
                .await
                .map(|d| (d, None)),
        };
        if let Ok(d) = primary {
            return Ok(d);
        }
        crate::metrics::LIMITER_ERRORS
            .with_label_values(&[self.primary.name()])
            .inc();
        crate::metrics::LIMITER_FALLBACK
            .with_label_values(&[self.on_error.as_str()])
            .inc();
        // The credits go unchecked too: what the calls use is still
        // journaled and charged once the store is back.
        match self.on_error {
            OnError::Local => Ok((self.local.decide(customer, plan, cost), None)),
            OnError::Open => Ok((Decision::unlimited(), None)),
            OnError::Closed => Err(LimiterError::Unavailable(
                "redis unavailable and on_error is closed".into(),
            )),
        }
    }
}

impl<L: Limiter> Limiter for Fallback<L> {
    fn name(&self) -> &'static str {
        self.primary.name()
    }

    fn shared(&self) -> bool {
        self.primary.shared()
    }

    async fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> Result<Decision, LimiterError> {
        self.decide(customer, plan, cost, None)
            .await
            .map(|(d, _)| d)
    }

    fn check_credits(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: super::CreditAsk,
    ) -> impl std::future::Future<
        Output = Result<(Decision, Option<super::CreditAnswer>), LimiterError>,
    > + Send {
        self.decide(customer, plan, cost, Some(ask))
    }

    /// To whichever held the request: the shared store's lease, else this
    /// process's caps (a fallback decision).
    fn release(&self, customer: &Arc<str>, plan: &Arc<Plan>, decision: &Decision) {
        if decision.lease.is_some() {
            self.primary.release(customer, plan, decision);
        } else if decision.policies.iter().any(|p| p.concurrent) {
            // Decided here while the shared store was down (an `open`
            // admission has no policies and held nothing).
            self.local.release(customer, plan);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::limiter::conformance;
    use crate::plans::Window;

    /// A shared store that is down.
    struct Down;
    impl Limiter for Down {
        fn name(&self) -> &'static str {
            "down"
        }
        fn release(&self, _: &Arc<str>, _: &Arc<Plan>, _: &Decision) {}
        async fn check(
            &self,
            _: &Arc<str>,
            _: &Arc<Plan>,
            _: u64,
        ) -> Result<Decision, LimiterError> {
            Err(LimiterError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn each_policy_decides_what_a_failure_means() {
        let p = conformance::plan(&[("burst", 1, Window::Day)]);
        let c: Arc<str> = "c".into();
        let with = |on_error| Fallback {
            primary: Down,
            local: MemoryLimiter::new(Arc::new(ManualClock::at(0))),
            on_error,
        };
        let local = with(OnError::Local);
        assert!(local.check(&c, &p, 1).await.unwrap().allowed);
        assert!(
            !local.check(&c, &p, 1).await.unwrap().allowed,
            "memory enforces the plan"
        );
        let open = with(OnError::Open);
        for _ in 0..3 {
            assert!(open.check(&c, &p, 1).await.unwrap().allowed);
        }
        assert!(with(OnError::Closed).check(&c, &p, 1).await.is_err());
        assert_eq!(local.name(), "down");
    }
}
