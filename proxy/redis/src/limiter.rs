//! The Redis limiter: a Lua script checks and charges every limit of the
//! customer's plan atomically, with the memory limiter's semantics (the
//! shared conformance suite runs against both). Requests that arrive in the
//! same wake-up share one script call (see [`RedisLimiter`]).
//!
//! Keys, all under the customer's hash tag so one script touches one slot:
//! - sliding window: `{P:cus}:s:<policy>:<window ms>` is a sorted set of
//!   admitted charges, one per script call that admitted any (member
//!   `<time ms>:<instance>:<call>:<cost>`, score = the time, which the
//!   script reads from the member: scores in a reply cost more than the rest
//!   of a call), and `…:t` the sum of their costs;
//! - calendar window: `{P:cus}:c:<policy>:<window start ms>` (a day's with
//!   `:d` after it) a counter that expires a minute after the window ends;
//! - a cap on requests in flight (`concurrent`): `{P:cus}:p:<policy>`, a
//!   sorted set of leases, one per running request (member
//!   `<instance>:<call>:<group>:<request>`, score its expiry). This instance
//!   renews its leases every [`RENEW_EVERY`] while their requests run and
//!   removes each when it ends; the leases of an instance that dies expire
//!   after [`LEASE`], and the script drops expired ones before counting.
//!
//! Time comes from the instance (`now` argument, one per call), so all
//! instances must run NTP; a skew of d ms shifts window edges by d ms.
//!
//! The script answers tersely (per group of one customer's requests under
//! one plan, what each limit started from; per request, admitted or the
//! wait); [`Replay`] turns that into each request's
//! decision, so Lua does a few comparisons per request and nothing more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis::Script;

use crate::conn::RedisConn;
use tollgate_core::clock::Clock;
use tollgate_core::limiter::{
    calendar_window, ceil_secs, CreditAnswer, CreditAsk, Decision, Limiter, LimiterError,
    PolicyStatus,
};
use tollgate_core::plans::{Plan, Window};
use tollgate_core::sync::{lock, Pending};

/// The script; see the comments at its top for its arguments and keys.
const SCRIPT: &str = concat!(include_str!("account.lua"), include_str!("limiter.lua"));

/// How long a lease on a `concurrent` cap lives without being renewed:
/// how long the requests of an instance that died keep holding the cap.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(10);
/// How often this instance renews the leases of its running requests.
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

type Answer = Result<(Decision, Option<CreditAnswer>), LimiterError>;
type Reply = tokio::sync::oneshot::Sender<Answer>;

/// One request waiting for the next script call.
struct Queued {
    customer: Arc<str>,
    plan: Arc<Plan>,
    cost: u64,
    /// The customer's credits to check too (a prepaid plan).
    ask: Option<CreditAsk>,
    done: Reply,
}

/// The requests of one customer and plan in a call: their limits' keys and
/// arguments are sent once, followed by each request's cost.
struct Group {
    customer: Arc<str>,
    plan: Arc<Plan>,
    costs: Vec<u64>,
    /// Per request, its credit check (all or none of a group have one).
    asks: Vec<CreditAsk>,
    replies: Vec<Reply>,
}

impl Group {
    fn of(q: &Queued) -> Self {
        Self {
            customer: q.customer.clone(),
            plan: q.plan.clone(),
            costs: Vec::new(),
            asks: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// Whether `q` may join this group.
    fn takes(&self, q: &Queued) -> bool {
        self.customer == q.customer
            && Arc::ptr_eq(&self.plan, &q.plan)
            && self.asks.is_empty() == q.ask.is_none()
    }

    /// The allowance of the group's credits, when it checks them.
    fn credits(&self) -> Option<tollgate_core::credits::Allowance> {
        self.asks.first().map(|a| a.allowance)
    }

    fn push(&mut self, q: Queued) {
        self.costs.push(q.cost);
        self.asks.extend(q.ask);
        self.replies.push(q.done);
    }

    /// Items of the script's reply for this group: per limit two, the
    /// balance's three when it checks credits, per request one.
    fn reply_len(&self) -> usize {
        2 * self.plan.limits.len() + if self.asks.is_empty() { 0 } else { 3 } + self.costs.len()
    }

    fn fail(self, e: &str) {
        for r in self.replies {
            let _ = r.send(Err(LimiterError::Unavailable(e.to_owned())));
        }
    }
}

struct Shared {
    /// Made at start-up on Tollgate's Redis runtime; used until `here`
    /// exists and whenever it cannot be made.
    conn: RedisConn,
    /// The limiter's own connection, made by the first request on the
    /// runtime that serves requests, so a round trip costs no hop to
    /// another thread's driver task and back.
    here: tokio::sync::OnceCell<RedisConn>,
    script: Script,
    instance: String,
    clock: Arc<dyn Clock>,
    /// Numbers this instance's script calls (a sliding charge's member).
    seq: AtomicU64,
    queue: std::sync::Mutex<Pending<Queued>>,
    /// When to try making `here` again after a failure.
    retry_here_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Leases of this instance's running requests, with the cap keys they
    /// are in (renewed until released).
    held: Arc<std::sync::Mutex<std::collections::HashMap<Arc<str>, Vec<String>>>>,
    /// The renewal task runs (started with the first lease).
    renewing: std::sync::atomic::AtomicBool,
}

/// The Redis key of `limit`'s cap for `customer` (a `concurrent` limit).
fn cap_key(prefix: &str, customer: &str, limit: &str) -> String {
    format!("{{{prefix}:{customer}}}:p:{limit}")
}

/// Requests that arrive in the same wake-up of the proxy's runtime are
/// decided by one script call (in cluster mode, one per customer, whose keys
/// share a slot), taken at one instant: at most one round trip per request,
/// fewer under load. Within a call the script takes each customer's
/// requests in arrival order, each seeing the charges of those before it,
/// exactly as separate calls at that instant would.
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

impl RedisLimiter {
    pub fn new(conn: RedisConn, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        let mut id = [0u8; 6];
        tollgate_core::keys::random_bytes(&mut id)?;
        Ok(Self {
            shared: Arc::new(Shared {
                conn,
                here: tokio::sync::OnceCell::new(),
                script: Script::new(SCRIPT),
                instance: hex::encode(id),
                clock,
                seq: AtomicU64::new(0),
                queue: std::sync::Mutex::new(Pending::default()),
                retry_here_at: std::sync::Mutex::new(None),
                held: Arc::default(),
                renewing: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    pub fn conn(&self) -> &RedisConn {
        &self.shared.conn
    }

    async fn run(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: Option<CreditAsk>,
    ) -> Answer {
        if plan.limits.is_empty() && ask.is_none() {
            return Ok((Decision::unlimited(), None));
        }
        let (done, rx) = tokio::sync::oneshot::channel();
        let item = Queued {
            customer: customer.clone(),
            plan: plan.clone(),
            cost,
            ask,
            done,
        };
        if lock(&self.shared.queue).push(item) {
            // Yields once first, so the requests this runtime already has
            // ready join the batch. (Outside a Tokio runtime, which the
            // proxy never is, the request sends its batch itself.)
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    // Should the task be dropped before it sends (the
                    // runtime shutting down, even before it first runs), the
                    // queue must not stay "scheduled" with nobody to send
                    // it: the guard answers its requests with an error
                    // (on_error applies) instead.
                    let mut guard = Unscheduled(Some(self.shared.clone()));
                    rt.spawn(async move {
                        tokio::task::yield_now().await;
                        if let Some(shared) = guard.0.take() {
                            shared.flush().await;
                        }
                    });
                }
                Err(_) => self.shared.flush().await,
            }
        }
        rx.await
            .map_err(|_| LimiterError::Unavailable("redis batch dropped".into()))?
    }
}

/// Clears a batch whose flush will never run (see `RedisLimiter::run`);
/// taken out (disarmed) when the flush starts.
struct Unscheduled(Option<Arc<Shared>>);

impl Drop for Unscheduled {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            // Their requests see the batch dropped: on_error applies.
            let dropped = lock(&shared.queue).take();
            drop(dropped);
        }
    }
}

/// Requests per script call at most: a call blocks Redis while it runs.
const MAX_BATCH: usize = 128;

/// After a failed attempt to make `here`, how long to use `conn` before
/// trying again.
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

impl Shared {
    /// The connection for this runtime (see `here`). A failed attempt to
    /// make it is not a Redis failure (the start-up connection works on):
    /// it is retried after [`RECONNECT_AFTER`].
    async fn conn_here(&self) -> &RedisConn {
        if let Some(c) = self.here.get() {
            return c;
        }
        let due = lock(&self.retry_here_at).is_none_or(|at| at <= std::time::Instant::now());
        if !due {
            return &self.conn;
        }
        match self.here.get_or_try_init(|| self.conn.connect_here()).await {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "redis limiter: cannot open its own connection ({e}); using the shared one"
                );
                *lock(&self.retry_here_at) = Some(std::time::Instant::now() + RECONNECT_AFTER);
                &self.conn
            }
        }
    }

    /// Sends what has queued up, decided at one instant: one script call of
    /// at most [`MAX_BATCH`] requests, or in cluster mode one per customer
    /// (a call's keys must share a slot).
    async fn flush(&self) {
        let items = lock(&self.queue).take();
        let now = self.clock.now_ms();
        let conn = self.conn_here().await;
        let mut calls: Vec<(usize, Vec<Group>)> = Vec::new();
        for item in items {
            let fits = |(n, groups): &&mut (usize, Vec<Group>)| {
                *n < MAX_BATCH && (!conn.config.cluster || groups[0].customer == item.customer)
            };
            let (n, groups) = match calls.iter_mut().find(fits) {
                Some(c) => c,
                None => {
                    calls.push((0, Vec::new()));
                    let last = calls.len() - 1;
                    &mut calls[last]
                }
            };
            *n += 1;
            // The customer's latest group, if it is on the same plan: a
            // customer whose requests come under two plans (a plan change
            // while they are in flight) gets a group per run of one plan,
            // so the script still takes them in arrival order.
            let latest = groups
                .iter_mut()
                .rev()
                .find(|g| g.customer == item.customer)
                .filter(|g| g.takes(&item));
            match latest {
                Some(g) => g.push(item),
                None => {
                    let mut g = Group::of(&item);
                    g.push(item);
                    groups.push(g);
                }
            }
        }
        futures_util::future::join_all(calls.into_iter().map(|(_, g)| self.call(conn, now, g)))
            .await;
    }

    async fn call(&self, conn: &RedisConn, now: u64, groups: Vec<Group>) {
        let prefix = &conn.config.prefix;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut inv = self.script.prepare_invoke();
        inv.arg(&self.instance).arg(now).arg(seq).arg(groups.len());
        for g in &groups {
            let customer = &g.customer;
            inv.arg(g.plan.limits.len());
            for l in &g.plan.limits {
                match l.window {
                    Window::Sliding(w) => {
                        let set = format!("{{{prefix}:{customer}}}:s:{}:{w}", l.name);
                        let total = format!("{set}:t");
                        inv.key(set).key(total).arg("s").arg(w);
                    }
                    Window::Concurrent => {
                        inv.key(cap_key(prefix, customer, &l.name))
                            .arg("p")
                            .arg(now + LEASE.as_millis() as u64);
                    }
                    cal => {
                        let (start, end) = calendar_window(cal, now);
                        // A day and a month can start at the same instant: a
                        // day's key says so (a month's keeps its old name).
                        let day = if cal == Window::Day { ":d" } else { "" };
                        inv.key(format!("{{{prefix}:{customer}}}:c:{}:{start}{day}", l.name))
                            .arg("c")
                            .arg(end);
                    }
                }
                inv.arg(l.quota).arg(u8::from(l.overage));
            }
            match g.credits() {
                Some(a) => {
                    inv.key(crate::credits::account_key(prefix, customer))
                        .arg(1);
                    crate::credits::period_args(&mut inv, a, now);
                }
                None => {
                    inv.arg(0);
                }
            }
            inv.arg(g.costs.len());
            for (i, c) in g.costs.iter().enumerate() {
                inv.arg(c);
                if let Some(ask) = g.asks.get(i) {
                    inv.arg(ask.held).arg(ask.want).arg(u8::from(ask.required));
                }
            }
        }
        let expected: usize = groups.iter().map(Group::reply_len).sum();
        let out = match conn.script::<Vec<i64>>(&inv).await {
            Ok(out) if out.len() == expected => out,
            Ok(out) => {
                let e = format!("unexpected script reply of {} items", out.len());
                groups.into_iter().for_each(|g| g.fail(&e));
                return;
            }
            Err(e) => {
                let e = e.to_string();
                groups.into_iter().for_each(|g| g.fail(&e));
                return;
            }
        };
        let mut at = 0;
        for (gi, g) in groups.into_iter().enumerate() {
            let n = 2 * g.plan.limits.len();
            let len = g.reply_len();
            let (start, rest) = out[at..at + len].split_at(n);
            at += len;
            // The group's balance as read (nothing is charged at admission).
            let (balance, flags) = match g.credits() {
                Some(a) => {
                    let (b, flags) = rest.split_at(3);
                    (Some(crate::credits::balance_of(b, a, now)), flags)
                }
                None => (None, rest),
            };
            let mut replay = Replay::new(&g.plan, now, start);
            let caps: Vec<String> = g
                .plan
                .limits
                .iter()
                .filter(|l| l.window == Window::Concurrent)
                .map(|l| cap_key(prefix, &g.customer, &l.name))
                .collect();
            for (ri, ((cost, flag), reply)) in g.costs.iter().zip(flags).zip(g.replies).enumerate()
            {
                let mut d = replay.next(*cost, (*flag).max(0));
                let answer = balance.map(|b| {
                    if *flag < 0 {
                        CreditAnswer::Refused(b)
                    } else {
                        CreditAnswer::Admitted(b)
                    }
                });
                if d.allowed && *cost > 0 && !caps.is_empty() {
                    // The member the script added (its indices count from 1).
                    let lease: Arc<str> =
                        format!("{}:{seq}:{}:{}", self.instance, gi + 1, ri + 1).into();
                    lock(&self.held).insert(lease.clone(), caps.clone());
                    d.lease = Some(lease);
                }
                // Nobody waits any more (the request was dropped): its
                // lease goes now rather than being renewed forever.
                if let Err(Ok((d, _))) = reply.send(Ok((d, answer))) {
                    self.drop_lease(&d);
                }
            }
        }
        if !lock(&self.held).is_empty() {
            self.start_renewing();
        }
    }

    /// Removes `decision`'s lease from the held set and from Redis (in the
    /// background).
    fn drop_lease(&self, decision: &Decision) {
        let Some(lease) = &decision.lease else { return };
        let Some(keys) = lock(&self.held).remove(lease) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (conn, lease) = (self.conn.clone(), lease.clone());
        rt.spawn(async move {
            for key in keys {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&key).arg(&*lease);
                if let Err(e) = conn.query::<i64>(cmd).await {
                    // It expires after LEASE instead.
                    log::debug!("limiter: releasing a lease failed: {e:?}");
                }
            }
        });
    }

    /// Renews this instance's leases every [`RENEW_EVERY`], one command per
    /// cap key, while the limiter lives.
    fn start_renewing(&self) {
        if self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.renewing.store(false, Ordering::Release);
            return;
        };
        let (conn, clock) = (self.conn.clone(), self.clock.clone());
        let held = Arc::downgrade(&self.held);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(held) = held.upgrade() else { return };
                let expiry = clock.now_ms() + LEASE.as_millis() as u64;
                let mut per_key: std::collections::HashMap<String, Vec<Arc<str>>> =
                    std::collections::HashMap::new();
                for (lease, keys) in lock(&held).iter() {
                    for k in keys {
                        per_key.entry(k.clone()).or_default().push(lease.clone());
                    }
                }
                drop(held);
                for (key, leases) in per_key {
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(&key).arg("XX");
                    for l in &leases {
                        cmd.arg(expiry).arg(&**l);
                    }
                    // The set outlives its leases, however long they run.
                    let mut keep = redis::cmd("PEXPIRE");
                    keep.arg(&key).arg(LEASE.as_millis() as u64 + 60_000);
                    if let Err(e) = conn.query::<i64>(cmd).await {
                        log::debug!("limiter: renewing leases failed: {e:?}");
                    } else if let Err(e) = conn.query::<i64>(keep).await {
                        log::debug!("limiter: keeping a cap's set failed: {e:?}");
                    }
                }
            }
        });
    }
}

/// Turns the script's terse reply for one group into each request's
/// decision: from what each limit started at, it charges the requests the
/// script admitted, in the same order, exactly as the script did.
struct Replay<'a> {
    plan: &'a Plan,
    now: u64,
    /// Per limit: units in use, and for a sliding window its oldest charge.
    state: Vec<(u64, Option<u64>)>,
}

impl<'a> Replay<'a> {
    fn new(plan: &'a Plan, now: u64, start: &[i64]) -> Self {
        let state = start
            .chunks_exact(2)
            .map(|s| (s[0].max(0) as u64, u64::try_from(s[1]).ok()))
            .collect();
        Self { plan, now, state }
    }

    /// `flag`: 0 admitted; else refused, and 1 + the seconds until the
    /// sliding limits have room.
    fn next(&mut self, cost: u64, flag: i64) -> Decision {
        let now = self.now;
        let allowed = flag == 0;
        let mut retry_after_secs = if allowed { 0 } else { (flag - 1).max(0) as u64 };
        let (mut overage, mut overage_meter) = (false, None);
        let mut policies = Vec::with_capacity(self.plan.limits.len());
        for (l, (used, first)) in self.plan.limits.iter().zip(self.state.iter_mut()) {
            let concurrent = l.window == Window::Concurrent;
            // A cap takes one per request, whatever it costs.
            let need = if concurrent {
                u64::from(cost > 0)
            } else {
                cost
            };
            let exceeds = used.saturating_add(need) > l.quota;
            let violated = exceeds && !l.overage;
            if exceeds && l.overage {
                overage = true;
                if overage_meter.is_none() {
                    overage_meter = l.overage_meter.clone();
                }
            }
            if allowed && cost > 0 {
                *used += need;
                if matches!(l.window, Window::Sliding(_)) {
                    *first = Some(first.map_or(now, |t| t.min(now)));
                }
            }
            let reset_secs = match l.window {
                Window::Sliding(w) => first.map_or(0, |t| ceil_secs((t + w).saturating_sub(now))),
                Window::Concurrent => 0,
                cal if *used > 0 => ceil_secs(calendar_window(cal, now).1.saturating_sub(now)),
                _ => 0,
            };
            if violated && concurrent {
                // Room comes back when a request ends: try again in a second.
                retry_after_secs = retry_after_secs.max(1);
            } else if violated && !matches!(l.window, Window::Sliding(_)) {
                let wait = ceil_secs(calendar_window(l.window, now).1.saturating_sub(now));
                retry_after_secs = retry_after_secs.max(wait.max(1));
            }
            policies.push(PolicyStatus {
                name: l.name.clone(),
                quota: l.quota,
                remaining: l.quota.saturating_sub(*used),
                reset_secs,
                violated,
                concurrent,
            });
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
}

impl Limiter for RedisLimiter {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn shared(&self) -> bool {
        true
    }

    /// Removes the request's lease from its caps (in the background: the
    /// response is already on its way).
    fn release(&self, _customer: &Arc<str>, _plan: &Arc<Plan>, decision: &Decision) {
        self.shared.drop_lease(decision);
    }

    async fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> Result<Decision, LimiterError> {
        self.check_credits_inner(customer, plan, cost, None)
            .await
            .map(|(d, _)| d)
    }

    async fn check_credits(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: CreditAsk,
    ) -> Answer {
        self.check_credits_inner(customer, plan, cost, Some(ask))
            .await
    }
}

impl RedisLimiter {
    async fn check_credits_inner(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: Option<CreditAsk>,
    ) -> Answer {
        let result = self.run(customer, plan, cost, ask).await;
        // While the breaker is open every call fails the same way: say it once.
        if let (Err(e), false) = (&result, self.shared.conn.breaker.is_open()) {
            log::debug!("limiter: {e:?}");
        }
        result
    }
}
