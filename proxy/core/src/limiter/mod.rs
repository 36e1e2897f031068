//! Per-customer limits: the [`Limiter`] trait and the exact in-memory backend.
//!
//! Semantics every backend must share (the [`conformance`] suite runs against each):
//! - a request is admitted only if *every* limit of the plan has room for its
//!   whole cost; then all limits are charged together, atomically;
//! - a rejected request consumes nothing;
//! - second/minute/hour limits are exact sliding windows (a log of admitted
//!   units, not an estimate); day and month are UTC calendar windows.

use std::future::Future;
use std::sync::Arc;

use crate::plans::Plan;

mod fallback;
mod memory;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use fallback::{Fallback, OnError};
pub use memory::{calendar_window, ceil_secs, MemoryLimiter};

/// Where one policy stands after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    pub name: Arc<str>,
    pub quota: u64,
    pub remaining: u64,
    /// Seconds until quota comes back (sliding: the oldest admitted units
    /// leave the window; calendar: the window ends). 0 when nothing is used.
    pub reset_secs: u64,
    /// This policy had no room for the request.
    pub violated: bool,
    /// A cap on requests in flight (`concurrent`), not a window: left out
    /// of the `RateLimit` headers.
    pub concurrent: bool,
}

/// The limiter's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// One entry per limit of the plan, in plan order.
    pub policies: Vec<PolicyStatus>,
    /// When rejected: seconds until the request could be admitted.
    pub retry_after_secs: u64,
    /// Admitted past the quota of a limit with `overage`: bill as overage.
    pub overage: bool,
    /// The overage meter of the first such limit that names one.
    pub overage_meter: Option<Arc<str>>,
    /// A shared store's hold on `concurrent` caps for this request (what
    /// `release` gives back); None when the caps are in this process.
    pub lease: Option<Arc<str>>,
}

impl Decision {
    /// Admitted with no limit to advertise: an unlimited plan, or Redis
    /// down with `on_error: open`.
    pub fn unlimited() -> Self {
        Self {
            allowed: true,
            policies: Vec::new(),
            retry_after_secs: 0,
            overage: false,
            overage_meter: None,
            lease: None,
        }
    }

    /// The policy closest to exhaustion (lowest remaining share; ties: the
    /// one that resets last), which `X-RateLimit-*` describe.
    /// On a refusal only violated policies are candidates, so the headers
    /// agree with `Retry-After`.
    pub fn tightest(&self) -> Option<&PolicyStatus> {
        let windowed = || self.policies.iter().filter(|p| !p.concurrent);
        let only_violated = !self.allowed && windowed().any(|p| p.violated);
        windowed()
            .filter(|p| !only_violated || p.violated)
            .min_by(|a, b| {
                // remaining/quota compared without division.
                let l = u128::from(a.remaining) * u128::from(b.quota);
                let r = u128::from(b.remaining) * u128::from(a.quota);
                l.cmp(&r).then(b.reset_secs.cmp(&a.reset_secs))
            })
    }
}

/// A prepaid customer's credits, checked in the limiter's own call when the
/// balances live in its shared store (Redis): a call refused for credits
/// is refused before any limit is charged, in the same round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreditAsk {
    pub allowance: crate::credits::Allowance,
    /// What this instance's other calls in flight hold, plus what it has
    /// charged that the store does not have yet.
    pub held: u64,
    /// What this call holds while it runs (`reserve`).
    pub want: u64,
    /// The call costs credits: refused unless what is not held is above
    /// zero and covers `want`. False: the balance is only read.
    pub required: bool,
}

/// The store's answer to a [`CreditAsk`]: the balance it read (nothing is
/// charged at admission; usage is charged as it is recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditAnswer {
    Admitted(crate::credits::Balance),
    /// Out of credits: no limit was charged.
    Refused(crate::credits::Balance),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimiterError {
    /// The shared store could not be reached in time.
    Unavailable(String),
}

/// A limiter backend. `check` with `cost == 0` reports without charging.
pub trait Limiter: Send + Sync {
    /// The `backend` label of the limiter metrics.
    fn name(&self) -> &'static str;

    /// Whether other instances count against the same limits (so only the
    /// charge that crossed a threshold may raise its alert).
    fn shared(&self) -> bool {
        false
    }

    fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> impl Future<Output = Result<Decision, LimiterError>> + Send;

    /// `check`, and in the same call the customer's credits when the
    /// backend keeps them (see [`CreditAsk`]). The answer is None from a
    /// backend that does not (the balances are elsewhere) or could not.
    fn check_credits(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: CreditAsk,
    ) -> impl Future<Output = Result<(Decision, Option<CreditAnswer>), LimiterError>> + Send {
        let _ = ask;
        async move { Ok((self.check(customer, plan, cost).await?, None)) }
    }

    /// The end of a request `check` admitted under `plan`: what it held of
    /// the plan's `concurrent` caps is given back. Called once per admitted
    /// request of a plan with such a cap, never waits.
    fn release(&self, customer: &Arc<str>, plan: &Arc<Plan>, decision: &Decision);
}

/// Whether a plan has a `concurrent` cap (so its requests must be released).
pub fn holds(plan: &Plan) -> bool {
    plan.limits
        .iter()
        .any(|l| l.window == crate::plans::Window::Concurrent)
}
