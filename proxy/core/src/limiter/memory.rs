//! The exact in-memory limiter of the embedded default.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use super::{Decision, Limiter, LimiterError, PolicyStatus};
use crate::clock::{day_start, month_bounds, Clock, Millis, DAY};
use crate::plans::{Limit, Plan, Window};

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

/// Where each limit of a plan sits in a customer's state, in plan order;
/// no allocation for plans of up to 16 limits.
struct Positions {
    first: [usize; 16],
    spill: Vec<usize>,
}

impl Positions {
    fn get(&self, i: usize) -> usize {
        match self.first.get(i) {
            Some(&p) => p,
            None => self.spill[i - self.first.len()],
        }
    }
}

impl CustomerState {
    /// Finds (or creates) the state of each of `plan`'s limits. State is
    /// keyed by name and window, so it survives a plan change for limits
    /// that keep both.
    fn positions(&mut self, plan: &Plan) -> Positions {
        let mut at = Positions {
            first: [0; 16],
            spill: Vec::new(),
        };
        for (i, limit) in plan.limits.iter().enumerate() {
            let pos = match self
                .policies
                .iter()
                .position(|p| p.name == limit.name && p.window == limit.window)
            {
                Some(p) => p,
                None => {
                    self.policies.push(PolicyState::new(limit));
                    self.policies.len() - 1
                }
            };
            match at.first.get_mut(i) {
                Some(slot) => *slot = pos,
                None => at.spill.push(pos),
            }
        }
        at
    }
}

/// Every limit of `plan` untouched: a report for a customer with no state.
fn untouched(plan: &Plan) -> Decision {
    Decision {
        allowed: true,
        policies: plan
            .limits
            .iter()
            .map(|limit| PolicyStatus {
                name: limit.name.clone(),
                quota: limit.quota,
                remaining: limit.quota,
                reset_secs: 0,
                violated: false,
                concurrent: limit.window == Window::Concurrent,
            })
            .collect(),
        retry_after_secs: 0,
        overage: false,
        overage_meter: None,
        lease: None,
    }
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
    /// Requests in flight (a `concurrent` cap).
    InFlight(u64),
}

/// A calendar window's start and end around `now`.
/// (A sliding window or a concurrency cap has none: `(now, now)`.)
pub fn calendar_window(window: Window, now: Millis) -> (Millis, Millis) {
    match window {
        Window::Day => {
            let s = day_start(now);
            (s, s + DAY)
        }
        Window::Month => month_bounds(now),
        Window::Sliding(_) | Window::Concurrent => (now, now),
    }
}

/// Milliseconds as whole seconds, rounded up (as the headers count them).
pub fn ceil_secs(ms: Millis) -> u64 {
    ms.div_ceil(1000)
}

impl PolicyState {
    fn new(limit: &Limit) -> Self {
        let counter = match limit.window {
            Window::Sliding(_) => Counter::Sliding {
                log: VecDeque::new(),
                total: 0,
            },
            Window::Concurrent => Counter::InFlight(0),
            Window::Day | Window::Month => Counter::Calendar { start: 0, used: 0 },
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
            (Counter::InFlight(n), _) => *n,
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
            // One request, whatever it costs.
            Counter::InFlight(n) => *n += 1,
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

    /// A held request given back (saturating: a release never goes below 0).
    fn release(&mut self) {
        if let Counter::InFlight(n) = &mut self.counter {
            *n = n.saturating_sub(1);
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
            // Room comes back when a request ends: try again in a second.
            (Counter::InFlight(_), _) => 1,
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
            (Counter::InFlight(n), _) => *n == 0,
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
        // A panic while holding the lock cannot leave counters half charged
        // (charging happens after all checks), so a poisoned lock is fine.
        let mut shard = crate::lock(self.shard(customer));
        let state = match shard.get_mut(customer) {
            Some(s) => s,
            // A report (cost 0) for an unknown customer must not create state.
            None if cost == 0 => return untouched(plan),
            None => shard.entry(Arc::from(customer)).or_default(),
        };
        let at = state.positions(plan);
        let mut policies = Vec::with_capacity(plan.limits.len());
        let mut allowed = true;
        let (mut overage, mut overage_meter) = (false, None);
        for (i, limit) in plan.limits.iter().enumerate() {
            let used = state.policies[at.get(i)].refresh(now);
            let concurrent = limit.window == Window::Concurrent;
            // A cap on requests in flight takes one per request.
            let need = if concurrent {
                u64::from(cost > 0)
            } else {
                cost
            };
            let exceeds = used.saturating_add(need) > limit.quota;
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
                concurrent,
            });
        }
        let mut retry_after_secs = 0;
        for (i, (limit, status)) in plan.limits.iter().zip(policies.iter_mut()).enumerate() {
            let p = &mut state.policies[at.get(i)];
            if allowed && cost > 0 {
                p.charge(now, cost);
                let took = if status.concurrent { 1 } else { cost };
                status.remaining = status.remaining.saturating_sub(took);
            }
            status.reset_secs = p.reset_secs(now);
            if status.violated {
                retry_after_secs = retry_after_secs.max(p.wait_for_room(now, limit.quota, cost));
            }
        }
        let overage = allowed && overage;
        Decision {
            allowed,
            policies,
            retry_after_secs,
            overage,
            overage_meter: if overage { overage_meter } else { None },
            lease: None,
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

    /// Gives back what an admitted request of `customer` held of `plan`'s
    /// `concurrent` caps.
    pub fn release(&self, customer: &str, plan: &Plan) {
        let mut shard = crate::lock(self.shard(customer));
        let Some(state) = shard.get_mut(customer) else {
            return;
        };
        for limit in plan
            .limits
            .iter()
            .filter(|l| l.window == Window::Concurrent)
        {
            if let Some(p) = state
                .policies
                .iter_mut()
                .find(|p| p.name == limit.name && p.window == Window::Concurrent)
            {
                p.release();
            }
        }
    }

    /// Puts back what `customer` had used of the calendar limit `name`
    /// (`Window::Day` or `Window::Month`) in the window starting at
    /// `start`, as journaled before a restart. A window that is over by
    /// now is left out.
    pub fn restore(
        &self,
        customer: &str,
        name: &Arc<str>,
        window: Window,
        start: Millis,
        used: u64,
    ) {
        let now = self.clock.now_ms();
        if !window.is_calendar() || calendar_window(window, now).0 != start {
            return;
        }
        let mut shard = crate::lock(self.shard(customer));
        let state = shard.entry(Arc::from(customer)).or_default();
        let counter = Counter::Calendar { start, used };
        match state
            .policies
            .iter_mut()
            .find(|p| p.name == *name && p.window == window)
        {
            Some(p) => p.counter = counter,
            None => state.policies.push(PolicyState {
                name: name.clone(),
                window,
                counter,
            }),
        }
    }

    /// Customers currently holding state.
    pub fn tracked_customers(&self) -> usize {
        self.shards.iter().map(|s| crate::lock(s).len()).sum()
    }
}

impl Limiter for MemoryLimiter {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> impl Future<Output = Result<Decision, LimiterError>> + Send {
        std::future::ready(Ok(self.decide(customer, plan, cost)))
    }

    fn release(&self, customer: &Arc<str>, plan: &Arc<Plan>, _: &Decision) {
        MemoryLimiter::release(self, customer, plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SECOND};
    use crate::limiter::conformance;

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
    fn restored_calendar_counts_carry_on_and_a_past_window_is_left_out() {
        let clock = ManualClock::at(40 * DAY + 5_000);
        let l = MemoryLimiter::new(Arc::new(clock.clone()));
        let p = conformance::plan(&[("daily", 20, Window::Day), ("monthly", 100, Window::Month)]);
        let (day, month) = (
            calendar_window(Window::Day, clock.now_ms()).0,
            calendar_window(Window::Month, clock.now_ms()).0,
        );
        l.restore("c", &"daily".into(), Window::Day, day, 19);
        l.restore("c", &"monthly".into(), Window::Month, month, 50);
        l.restore("c", &"other".into(), Window::Day, day - DAY, 7);
        let d = l.decide("c", &p, 1);
        assert!(d.allowed);
        assert_eq!(d.policies[0].remaining, 0);
        assert_eq!(d.policies[1].remaining, 49);
        assert!(
            !l.decide("c", &p, 1).allowed,
            "the restored daily quota is spent"
        );
        clock.advance(DAY);
        assert!(l.decide("c", &p, 1).allowed, "a new day");
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
