//! Per-customer limits: the [`Limiter`] trait and the exact in-memory backend.
//!
//! Semantics every backend must share (see `tests/conformance` helpers below):
//! - a request is admitted only if *every* limit of the plan has room for its
//!   whole cost; then all limits are charged together, atomically;
//! - a rejected request consumes nothing;
//! - second/minute/hour limits are exact sliding windows (a log of admitted
//!   units, not an estimate); day and month are UTC calendar windows.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::clock::{day_start, month_bounds, Clock, Millis, DAY};
use crate::plans::{Limit, Plan, Window};

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
        }
    }

    /// The policy closest to exhaustion (lowest remaining share; ties: the
    /// one that resets last), which `X-RateLimit-*` describe.
    /// On a refusal only violated policies are candidates, so the headers
    /// agree with `Retry-After`.
    pub fn tightest(&self) -> Option<&PolicyStatus> {
        let only_violated = !self.allowed && self.policies.iter().any(|p| p.violated);
        self.policies
            .iter()
            .filter(|p| !only_violated || p.violated)
            .min_by(|a, b| {
                // remaining/quota compared without division.
                let l = u128::from(a.remaining) * u128::from(b.quota);
                let r = u128::from(b.remaining) * u128::from(a.quota);
                l.cmp(&r).then(b.reset_secs.cmp(&a.reset_secs))
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimiterError {
    /// The shared store could not be reached in time.
    Unavailable(String),
}

/// A limiter backend. `check` with `cost == 0` reports without charging.
pub trait Limiter: Send + Sync {
    fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> impl Future<Output = Result<Decision, LimiterError>> + Send;
}

/// The configured limiter: memory, or Redis with a memory fallback.
pub enum Backend {
    Memory(MemoryLimiter),
    Redis {
        redis: crate::redis_limiter::RedisLimiter,
        /// Enforces the same plans in this instance's memory when Redis
        /// fails and `on_error: local`.
        local: MemoryLimiter,
        on_error: crate::redis_conn::OnError,
    },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Memory(_) => "memory",
            Backend::Redis { .. } => "redis",
        }
    }

    /// The in-process limiter (the whole limiter, or Redis's fallback).
    pub fn memory(&self) -> &MemoryLimiter {
        match self {
            Backend::Memory(m) | Backend::Redis { local: m, .. } => m,
        }
    }

    async fn decide(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> Result<Decision, LimiterError> {
        let (redis, local, on_error) = match self {
            Backend::Memory(m) => return Ok(m.decide(customer, plan, cost)),
            Backend::Redis {
                redis,
                local,
                on_error,
            } => (redis, local, *on_error),
        };
        match redis.check(customer, plan, cost).await {
            Ok(d) => return Ok(d),
            Err(e) => {
                if !redis.conn().breaker.is_open() {
                    log::debug!("limiter: {e:?}");
                }
                crate::metrics::LIMITER_ERRORS
                    .with_label_values(&["redis"])
                    .inc();
            }
        }
        crate::metrics::LIMITER_FALLBACK
            .with_label_values(&[on_error.as_str()])
            .inc();
        match on_error {
            crate::redis_conn::OnError::Local => Ok(local.decide(customer, plan, cost)),
            crate::redis_conn::OnError::Open => Ok(Decision::unlimited()),
            crate::redis_conn::OnError::Closed => Err(LimiterError::Unavailable(
                "redis unavailable and on_error is closed".into(),
            )),
        }
    }
}

impl Limiter for Backend {
    fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> impl Future<Output = Result<Decision, LimiterError>> + Send {
        self.decide(customer, plan, cost)
    }
}

/// Number of independently locked shards of customer state.
const SHARDS: usize = 64;

/// The exact in-memory limiter of the embedded default.
pub struct MemoryLimiter {
    shards: Vec<Mutex<HashMap<Arc<str>, CustomerState>>>,
    clock: Arc<dyn Clock>,
}

#[derive(Debug, Default)]
struct CustomerState {
    policies: Vec<PolicyState>,
}

#[derive(Debug)]
struct PolicyState {
    name: Arc<str>,
    window: Window,
    counter: Counter,
}

#[derive(Debug)]
enum Counter {
    /// Admitted units with their time, oldest first; `total` is their sum.
    Sliding {
        log: VecDeque<(Millis, u64)>,
        total: u64,
    },
    /// Units used in the calendar window starting at `start`.
    Calendar { start: Millis, used: u64 },
}

/// A calendar window's start and end around `now`.
pub(crate) fn calendar_window(window: Window, now: Millis) -> (Millis, Millis) {
    match window {
        Window::Day => {
            let s = day_start(now);
            (s, s + DAY)
        }
        _ => month_bounds(now),
    }
}

/// Milliseconds as whole seconds, rounded up (as the headers count them).
pub(crate) fn ceil_secs(ms: Millis) -> u64 {
    ms.div_ceil(1000)
}

impl PolicyState {
    fn new(limit: &Limit) -> Self {
        let counter = match limit.window {
            Window::Sliding(_) => Counter::Sliding {
                log: VecDeque::new(),
                total: 0,
            },
            _ => Counter::Calendar { start: 0, used: 0 },
        };
        Self {
            name: limit.name.clone(),
            window: limit.window,
            counter,
        }
    }

    /// Drops what has left the window; returns units in use now.
    fn refresh(&mut self, now: Millis) -> u64 {
        match (&mut self.counter, self.window) {
            (Counter::Sliding { log, total }, Window::Sliding(w)) => {
                while let Some(&(t, n)) = log.front() {
                    if t + w > now {
                        break;
                    }
                    *total -= n;
                    log.pop_front();
                }
                *total
            }
            (Counter::Calendar { start, used }, w) => {
                let (s, _) = calendar_window(w, now);
                if *start != s {
                    *start = s;
                    *used = 0;
                }
                *used
            }
            // A sliding counter always has a sliding window (built in `new`).
            _ => 0,
        }
    }

    fn charge(&mut self, now: Millis, cost: u64) {
        match &mut self.counter {
            Counter::Sliding { log, total } => {
                match log.back_mut() {
                    Some((t, n)) if *t == now => *n += cost,
                    _ => log.push_back((now, cost)),
                }
                *total += cost;
            }
            Counter::Calendar { used, .. } => *used += cost,
        }
    }

    /// Seconds until any used quota comes back.
    fn reset_secs(&self, now: Millis) -> u64 {
        match (&self.counter, self.window) {
            (Counter::Sliding { log, .. }, Window::Sliding(w)) => log
                .front()
                .map_or(0, |&(t, _)| ceil_secs((t + w).saturating_sub(now))),
            (Counter::Calendar { used, .. }, w) if *used > 0 => {
                ceil_secs(calendar_window(w, now).1.saturating_sub(now))
            }
            _ => 0,
        }
    }

    /// Seconds until `cost` more units fit under `quota`.
    fn wait_for_room(&self, now: Millis, quota: u64, cost: u64) -> u64 {
        match (&self.counter, self.window) {
            (Counter::Sliding { log, total }, Window::Sliding(w)) => {
                if cost > quota {
                    return ceil_secs(w);
                }
                let mut in_use = *total;
                for &(t, n) in log {
                    in_use -= n;
                    if in_use + cost <= quota {
                        return ceil_secs((t + w).saturating_sub(now)).max(1);
                    }
                }
                ceil_secs(w)
            }
            (_, w) => ceil_secs(calendar_window(w, now).1.saturating_sub(now)).max(1),
        }
    }

    fn is_idle(&self, now: Millis) -> bool {
        match (&self.counter, self.window) {
            (Counter::Sliding { log, .. }, Window::Sliding(w)) => {
                log.back().is_none_or(|&(t, _)| t + w <= now)
            }
            (Counter::Calendar { start, used }, w) => {
                *used == 0 || calendar_window(w, now).0 != *start
            }
            _ => true,
        }
    }
}

impl MemoryLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            clock,
        }
    }

    fn shard(&self, customer: &str) -> &Mutex<HashMap<Arc<str>, CustomerState>> {
        let mut h = DefaultHasher::new();
        customer.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The decision, taken under the customer's shard lock so concurrent
    /// requests of one customer are serialised and exact.
    pub fn decide(&self, customer: &str, plan: &Plan, cost: u64) -> Decision {
        let now = self.clock.now_ms();
        if plan.limits.is_empty() {
            return Decision::unlimited();
        }
        let mut policies = Vec::with_capacity(plan.limits.len());
        // A panic while holding the lock cannot leave counters half charged
        // (charging happens after all checks), so a poisoned lock is fine.
        let mut shard = crate::lock(self.shard(customer));
        let state = match shard.get_mut(customer) {
            Some(s) => s,
            // A report (cost 0) for an unknown customer must not create state.
            None if cost == 0 => {
                for limit in &plan.limits {
                    policies.push(PolicyStatus {
                        name: limit.name.clone(),
                        quota: limit.quota,
                        remaining: limit.quota,
                        reset_secs: 0,
                        violated: false,
                    });
                }
                return Decision {
                    allowed: true,
                    policies,
                    retry_after_secs: 0,
                    overage: false,
                    overage_meter: None,
                };
            }
            None => shard.entry(Arc::from(customer)).or_default(),
        };
        // Find (or create) each limit's state; index list in plan order.
        let mut idx = [0usize; 16];
        let mut spill = Vec::new();
        for (i, limit) in plan.limits.iter().enumerate() {
            let pos = match state
                .policies
                .iter()
                .position(|p| p.name == limit.name && p.window == limit.window)
            {
                Some(p) => p,
                None => {
                    state.policies.push(PolicyState::new(limit));
                    state.policies.len() - 1
                }
            };
            if i < idx.len() {
                idx[i] = pos;
            } else {
                spill.push(pos);
            }
        }
        let at = |i: usize| if i < 16 { idx[i] } else { spill[i - 16] };

        let mut allowed = true;
        let (mut overage, mut overage_meter) = (false, None);
        for (i, limit) in plan.limits.iter().enumerate() {
            let used = state.policies[at(i)].refresh(now);
            let exceeds = used.saturating_add(cost) > limit.quota;
            // An overage limit never refuses; it marks the request as overage.
            let violated = exceeds && !limit.overage;
            if exceeds && limit.overage {
                overage = true;
                if overage_meter.is_none() {
                    overage_meter = limit.overage_meter.clone();
                }
            }
            allowed &= !violated;
            policies.push(PolicyStatus {
                name: limit.name.clone(),
                quota: limit.quota,
                remaining: limit.quota.saturating_sub(used),
                reset_secs: 0,
                violated,
            });
        }
        let mut retry_after_secs = 0;
        for (i, (limit, status)) in plan.limits.iter().zip(policies.iter_mut()).enumerate() {
            let p = &mut state.policies[at(i)];
            if allowed && cost > 0 {
                p.charge(now, cost);
                status.remaining = status.remaining.saturating_sub(cost);
            }
            status.reset_secs = p.reset_secs(now);
            if status.violated {
                retry_after_secs = retry_after_secs.max(p.wait_for_room(now, limit.quota, cost));
            }
        }
        Decision {
            allowed,
            policies,
            retry_after_secs,
            overage: allowed && overage,
            overage_meter: if allowed && overage {
                overage_meter
            } else {
                None
            },
        }
    }

    /// Forgets customers with nothing in any current window, so memory is
    /// bounded by the customers active in the longest window.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_ms();
        let mut removed = 0;
        for shard in &self.shards {
            let mut map = crate::lock(shard);
            let before = map.len();
            map.retain(|_, c| {
                c.policies.retain(|p| !p.is_idle(now));
                !c.policies.is_empty()
            });
            removed += before - map.len();
        }
        removed
    }

    /// Customers currently holding state.
    pub fn tracked_customers(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

impl Limiter for MemoryLimiter {
    fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> impl Future<Output = Result<Decision, LimiterError>> + Send {
        std::future::ready(Ok(self.decide(customer, plan, cost)))
    }
}

/// A conformance suite of window semantics, run against every backend so
/// they cannot drift apart. `make` builds a limiter on the given clock.
#[cfg(any(test, feature = "conformance"))]
#[allow(clippy::panic)] // test support: a failed case must fail the test
pub mod conformance {
    use super::*;
    use crate::clock::{days_from_civil, Date, ManualClock, HOUR, MINUTE, SECOND};

    pub fn plan(limits: &[(&str, u64, Window)]) -> Arc<Plan> {
        Arc::new(build(limits))
    }

    fn build(limits: &[(&str, u64, Window)]) -> Plan {
        let limits: Vec<Limit> = limits
            .iter()
            .map(|&(n, q, w)| Limit {
                name: n.into(),
                quota: q,
                window: w,
                overage: false,
                overage_meter: None,
            })
            .collect();
        Plan {
            name: "test".into(),
            policy_header: crate::headers::policy_header(&limits),
            limits,
            meter: None,
        }
    }

    fn date(y: i64, m: u32, d: u32) -> Millis {
        days_from_civil(Date {
            year: y,
            month: m,
            day: d,
        }) as Millis
            * DAY
    }

    async fn admit<L: Limiter>(l: &L, c: &str, p: &Arc<Plan>, cost: u64) -> Decision {
        match l.check(&c.into(), p, cost).await {
            Ok(d) => d,
            Err(e) => panic!("limiter failed: {e:?}"),
        }
    }

    /// Runs every case; panics with the case name on the first mismatch.
    pub async fn run<L: Limiter, F: Fn(ManualClock) -> L>(make: F) {
        sliding_window_is_exact(&make).await;
        rejected_requests_consume_nothing(&make).await;
        all_limits_must_have_room(&make).await;
        calendar_day_resets_at_utc_midnight(&make).await;
        calendar_month_is_a_real_month(&make).await;
        customers_are_independent(&make).await;
        zero_cost_reports_without_charging(&make).await;
        refusal_headers_describe_a_violated_policy(&make).await;
        overage_admits_past_the_quota_and_says_so(&make).await;
        many_charges_leave_the_window_at_once(&make).await;
    }

    async fn many_charges_leave_the_window_at_once<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let t0 = date(2026, 5, 1) + 10 * HOUR;
        let clock = ManualClock::at(t0);
        let l = make(clock.clone());
        let p = plan(&[("burst", 100, Window::Sliding(SECOND))]);
        // 30 charges of 1, 2 or 3 units, 10 ms apart: 60 units.
        let cost = |i: u64| 1 + i % 3;
        for i in 0..30 {
            clock.set(t0 + i * 10);
            assert!(admit(&l, "c", &p, cost(i)).await.allowed);
        }
        // 155 ms past the window: the 16 charges made at 0..=150 ms have left.
        clock.set(t0 + SECOND + 155);
        let d = admit(&l, "c", &p, 0).await;
        let left: u64 = (16..30).map(cost).sum();
        assert_eq!(d.policies[0].remaining, 100 - left, "{d:?}");
        // The oldest charge still inside was made at 160 ms: it leaves in 5 ms.
        assert_eq!(d.policies[0].reset_secs, 1, "{d:?}");
        // And the total stays right as the rest leave.
        clock.set(t0 + SECOND + 285);
        let d = admit(&l, "c", &p, 0).await;
        let left: u64 = (29..30).map(cost).sum();
        assert_eq!(d.policies[0].remaining, 100 - left, "{d:?}");
        clock.set(t0 + 2 * SECOND + 290);
        let d = admit(&l, "c", &p, 5).await;
        assert!(d.allowed);
        assert_eq!(d.policies[0].remaining, 95, "{d:?}");
        assert_eq!(d.policies[0].reset_secs, 1, "{d:?}");
    }

    async fn overage_admits_past_the_quota_and_says_so<L: Limiter>(
        make: &impl Fn(ManualClock) -> L,
    ) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let mut p = build(&[
            ("burst", 4, Window::Sliding(SECOND)),
            ("monthly", 2, Window::Month),
        ]);
        p.limits[1].overage = true;
        p.limits[1].overage_meter = Some("api_overage".into());
        let p = Arc::new(p);
        for i in 0..4 {
            let d = admit(&l, "c", &p, 1).await;
            assert!(d.allowed, "overage never refuses (request {i})");
            assert_eq!(d.overage, i >= 2, "request {i} is overage: {d:?}");
            assert_eq!(
                d.overage_meter.as_deref(),
                (i >= 2).then_some("api_overage")
            );
            assert_eq!(d.policies[1].remaining, 2u64.saturating_sub(i + 1));
            assert!(!d.policies[1].violated);
        }
        // A limit without overage still refuses.
        let d = admit(&l, "c", &p, 1).await;
        assert!(!d.allowed && d.policies[0].violated && !d.overage, "{d:?}");
    }

    async fn sliding_window_is_exact<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let t0 = date(2026, 5, 1) + 10 * HOUR;
        let clock = ManualClock::at(t0);
        let l = make(clock.clone());
        let p = plan(&[("burst", 3, Window::Sliding(SECOND))]);
        for i in 0..3 {
            clock.set(t0 + i * 300); // at 0, 300, 600 ms
            assert!(admit(&l, "c", &p, 1).await.allowed, "sliding: request {i}");
        }
        clock.set(t0 + 999);
        let d = admit(&l, "c", &p, 1).await;
        assert!(!d.allowed, "sliding: 4th within the second must be refused");
        assert_eq!(
            d.retry_after_secs, 1,
            "sliding: retry when the first leaves"
        );
        assert_eq!(d.policies[0].remaining, 0);
        clock.set(t0 + 1000); // the request at t0 has left the window, exactly
        assert!(
            admit(&l, "c", &p, 1).await.allowed,
            "sliding: room after exactly one window"
        );
        assert!(
            !admit(&l, "c", &p, 1).await.allowed,
            "sliding: only one unit came back"
        );
        // A minute window, checked at its edge.
        let p = plan(&[("per_min", 2, Window::Sliding(MINUTE))]);
        clock.set(t0 + HOUR);
        assert!(admit(&l, "m", &p, 2).await.allowed);
        clock.set(t0 + HOUR + MINUTE - 1);
        let d = admit(&l, "m", &p, 1).await;
        assert!(
            !d.allowed && d.policies[0].reset_secs == 1,
            "minute edge: {d:?}"
        );
        clock.set(t0 + HOUR + MINUTE);
        assert!(
            admit(&l, "m", &p, 2).await.allowed,
            "minute edge: full quota back"
        );
    }

    async fn rejected_requests_consume_nothing<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let p = plan(&[("daily", 10, Window::Day)]);
        assert!(admit(&l, "c", &p, 8).await.allowed);
        for _ in 0..5 {
            let d = admit(&l, "c", &p, 3).await;
            assert!(!d.allowed, "cost 3 with 2 left must be refused");
            assert_eq!(d.policies[0].remaining, 2, "a refusal must not consume");
        }
        assert!(
            admit(&l, "c", &p, 2).await.allowed,
            "the 2 left are still there"
        );
        assert_eq!(admit(&l, "c", &p, 0).await.policies[0].remaining, 0);
    }

    async fn all_limits_must_have_room<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let p = plan(&[
            ("burst", 5, Window::Sliding(SECOND)),
            ("daily", 3, Window::Day),
        ]);
        for _ in 0..3 {
            assert!(admit(&l, "c", &p, 1).await.allowed);
        }
        let d = admit(&l, "c", &p, 1).await;
        assert!(!d.allowed);
        assert!(!d.policies[0].violated && d.policies[1].violated, "{d:?}");
        assert_eq!(
            d.policies[0].remaining, 2,
            "burst must not be charged for a refused request"
        );
        assert_eq!(d.tightest().map(|p| &*p.name), Some("daily"));
        assert_eq!(d.retry_after_secs, DAY / 1000, "retry at next UTC midnight");
    }

    async fn calendar_day_resets_at_utc_midnight<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let midnight = date(2026, 3, 1);
        let clock = ManualClock::at(midnight - 1);
        let l = make(clock.clone());
        let p = plan(&[("daily", 1, Window::Day)]);
        let d = admit(&l, "c", &p, 1).await;
        assert!(d.allowed);
        assert_eq!(
            d.policies[0].reset_secs, 1,
            "1 ms before midnight rounds up to 1 s"
        );
        assert!(!admit(&l, "c", &p, 1).await.allowed);
        clock.set(midnight);
        assert!(admit(&l, "c", &p, 1).await.allowed, "new day, new quota");
    }

    async fn calendar_month_is_a_real_month<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        // February of a leap year: 29 days, then March starts a new window.
        let clock = ManualClock::at(date(2028, 2, 1));
        let l = make(clock.clone());
        let p = plan(&[("monthly", 2, Window::Month)]);
        assert!(admit(&l, "c", &p, 2).await.allowed);
        clock.set(date(2028, 2, 29) + 23 * HOUR);
        let d = admit(&l, "c", &p, 1).await;
        assert!(!d.allowed, "Feb 29 is still February");
        assert_eq!(d.retry_after_secs, HOUR / 1000);
        clock.set(date(2028, 3, 1));
        assert!(admit(&l, "c", &p, 2).await.allowed, "March is a new month");
        // December rolls over into the next year.
        clock.set(date(2028, 12, 31) + 12 * HOUR);
        assert!(admit(&l, "c", &p, 2).await.allowed);
        clock.set(date(2029, 1, 1));
        assert!(admit(&l, "c", &p, 2).await.allowed);
    }

    async fn customers_are_independent<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let p = plan(&[("daily", 1, Window::Day)]);
        assert!(admit(&l, "a", &p, 1).await.allowed);
        assert!(admit(&l, "b", &p, 1).await.allowed);
        assert!(!admit(&l, "a", &p, 1).await.allowed);
    }

    async fn zero_cost_reports_without_charging<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let p = plan(&[("burst", 2, Window::Sliding(SECOND))]);
        for _ in 0..3 {
            let d = admit(&l, "c", &p, 0).await;
            assert!(d.allowed && d.policies[0].remaining == 2 && d.policies[0].reset_secs == 0);
        }
        assert!(admit(&l, "c", &p, 1).await.allowed);
        let d = admit(&l, "c", &p, 0).await;
        assert_eq!((d.policies[0].remaining, d.policies[0].reset_secs), (1, 1));
    }

    async fn refusal_headers_describe_a_violated_policy<L: Limiter>(
        make: &impl Fn(ManualClock) -> L,
    ) {
        let clock = ManualClock::at(date(2026, 6, 1));
        let l = make(clock.clone());
        let p = plan(&[
            ("burst", 5, Window::Sliding(SECOND)),
            ("daily", 100, Window::Day),
        ]);
        assert!(admit(&l, "c", &p, 3).await.allowed);
        // Cost 5 does not fit burst (2 left) although daily has 97 left.
        let d = admit(&l, "c", &p, 5).await;
        assert!(!d.allowed);
        let t = d.tightest().map(|t| (t.name.to_string(), t.remaining));
        assert_eq!(t, Some(("burst".to_string(), 2)), "{d:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SECOND};

    #[tokio::test]
    async fn memory_limiter_passes_the_conformance_suite() {
        conformance::run(|clock| MemoryLimiter::new(Arc::new(clock))).await;
    }

    #[test]
    fn idle_customers_are_evicted() {
        let clock = ManualClock::at(1_000_000);
        let l = MemoryLimiter::new(Arc::new(clock.clone()));
        let p = conformance::plan(&[("burst", 5, Window::Sliding(SECOND))]);
        for i in 0..1000 {
            l.decide(&format!("cus_{i}"), &p, 1);
        }
        assert_eq!(l.tracked_customers(), 1000);
        assert_eq!(l.sweep(), 0, "still inside the window");
        clock.advance(SECOND);
        assert_eq!(l.sweep(), 1000);
        assert_eq!(l.tracked_customers(), 0);
    }

    #[test]
    fn concurrent_requests_are_exact() {
        let l = Arc::new(MemoryLimiter::new(Arc::new(crate::clock::SystemClock)));
        let p = conformance::plan(&[("monthly", 300, Window::Month)]);
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if l.decide("c", &p, 1).allowed {
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.into_inner(), 300);
    }
}
