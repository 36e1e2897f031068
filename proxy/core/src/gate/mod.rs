//! The per-request decision, free of sockets: which route (on the one
//! canonical path), whose key, which plan, and whether the limiter admits it. [`Gate::admit`] takes a
//! request's method, path and headers and answers with an [`Admission`] or
//! a [`Refused`]; the proxy only moves headers around it. The criterion
//! bench measures exactly this.

use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderMap, HeaderName};
use http::Method;

use crate::clock::Clock;
use crate::credits::{Balance, CreditBook, Hold};
use crate::limiter::{CreditAnswer, CreditAsk, Decision, Limiter, LimiterError};
use crate::meter::JournalState;
use crate::metrics;
use crate::plans::{Plan, Plans, Route, DEFAULT_COST};
use crate::problem::Rejection;
use crate::store::{Identity, KeyStore};

mod identity;
mod request;
#[cfg(test)]
mod tests;

pub use request::{
    bearer_token, canonical_path, extract_key, has_body, is_bearer, is_identity_header,
    is_preflight, never_forwarded, CanonicalPath, KeySource, PathError, X_API_KEY,
};

/// Where each consumer asks about its own usage.
pub const USAGE_PATH: &str = "/_tollgate/usage";

/// Tollgate's own namespace on the public port: never forwarded.
pub const OWN_PREFIX: &str = "/_tollgate";

/// Whether a canonical path is Tollgate's own (other than the usage
/// report, which the gate answers itself).
pub fn is_own_path(path: &str) -> bool {
    path.strip_prefix(OWN_PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        && path != USAGE_PATH
}

/// What the route table says about a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteInfo<'a> {
    pub public: bool,
    pub cost: u64,
    pub route: Option<&'a Route>,
}

/// A request Tollgate lets through (or answers itself without refusing).
#[derive(Debug)]
pub enum Admission {
    /// A public route, or a CORS preflight the upstream answers itself:
    /// forwarded with no key, no limit and no metering.
    Forward,
    /// A CORS preflight Tollgate answers itself.
    Preflight,
    /// `GET /_tollgate/usage`: the caller's own usage report (nothing charged).
    Report(Admitted),
    /// Any other path under `/_tollgate` (webhooks, self-service billing,
    /// the dashboard): the gateway answers it; nothing is charged. Holds
    /// the canonical path.
    Own(String),
    /// Authenticated and within its plan: forward it, then meter the response.
    Pass(Admitted),
}

/// Who was admitted, under which plan, and what the response will cost.
#[derive(Debug)]
pub struct Admitted {
    pub identity: Identity,
    pub plan: Arc<Plan>,
    pub decision: Decision,
    /// Units charged against the limits (and billed, unless the upstream
    /// reports the units in `usage_header`).
    pub cost: u64,
    /// Where billable units are metered; None: the request is not billed.
    pub meter: Option<Arc<str>>,
    /// The response header the upstream reports the billable units in.
    pub usage_header: Option<HeaderName>,
    /// Where the response body reports its billable units (`usage:` on
    /// the route); None when the plan is not billed.
    pub body: Option<Arc<crate::body_usage::BodyFormat>>,
    /// What such a response is billed when its body reports nothing: the
    /// route's `cost`.
    pub fallback: u64,
    /// When the limiter charged `cost` (the calendar windows it went to).
    pub at: crate::clock::Millis,
    /// The customer's credits when admitted (plans with credits only).
    pub credits: Option<Balance>,
    /// Credits this request holds while it runs (`reserve`): settle it
    /// once its usage is charged (dropping it does too).
    pub hold: Hold,
}

/// A request Tollgate answers with a problem instead of the upstream, with
/// what is known of the caller by then (for the rate-limit headers).
#[derive(Debug)]
pub struct Refused {
    pub rejection: Rejection,
    /// Who was refused, once the key was accepted (for the access log).
    pub identity: Option<Identity>,
    pub plan: Option<Arc<Plan>>,
    pub decision: Option<Decision>,
    /// The customer's credits, once known (plans with credits only).
    pub credits: Option<Balance>,
}

impl From<Rejection> for Refused {
    fn from(rejection: Rejection) -> Self {
        Self {
            rejection,
            identity: None,
            plan: None,
            decision: None,
            credits: None,
        }
    }
}

/// [`Gate::admit`]'s answer.
#[derive(Debug)]
pub struct Verdict {
    pub admission: Result<Admission, Refused>,
    /// The path to send upstream, when it differs from the one the client
    /// sent: the normalised path Tollgate routed on.
    pub rewrite: Option<String>,
}

/// The parts a decision needs.
pub struct Gate<L> {
    /// Replaced whole by a reload; each request uses the plans it loaded.
    pub plans: crate::sync::Shared<Plans>,
    pub keys: Arc<dyn KeyStore>,
    pub limiter: Arc<L>,
    pub clock: Arc<dyn Clock>,
    pub prefix: String,
    /// `cors` is configured: Tollgate answers CORS preflights itself
    /// (otherwise they go to the upstream, which answers its own).
    pub answer_preflights: bool,
    /// Whether the usage journal can take billable work (refused before it
    /// is charged when it cannot); None: metering is off.
    pub journal: Option<Arc<dyn Fn() -> JournalState + Send + Sync>>,
    /// `auth.jwt`: bearer tokens shaped like a JWT are verified here.
    pub jwt: Option<Arc<crate::jwt::Verifier>>,
    /// Balances of plans with credits; None: no plan has them.
    pub credits: Option<Arc<dyn CreditBook>>,
    /// `alerts:`: where the quota thresholds a request crosses are raised.
    pub alerts: Option<Arc<dyn crate::alerts::AlertJournal>>,
    /// Credits held by `reserve` requests in flight.
    pub holds: Arc<crate::credits::Holds>,
}

impl<L: Limiter> Gate<L> {
    fn journal_state(&self) -> JournalState {
        self.journal
            .as_ref()
            .map_or(JournalState::Open, |state| state())
    }

    /// Decides one request: preflight, public route, usage report, or a
    /// keyed request checked against its plan's limits (charging `cost`).
    pub async fn admit(&self, method: &Method, path: &str, headers: &HeaderMap) -> Verdict {
        let Ok(path) = canonical_path(path) else {
            return Verdict {
                admission: Err(Rejection::BadPath.into()),
                rewrite: None,
            };
        };
        let admission = if is_own_path(&path.routed)
            && !(self.answer_preflights && is_preflight(method, headers))
        {
            Ok(Admission::Own(path.routed.into_owned()))
        } else if is_preflight(method, headers) {
            Ok(if self.answer_preflights {
                Admission::Preflight
            } else {
                Admission::Forward
            })
        } else {
            self.admit_canonical(method, &path.routed, headers).await
        };
        Verdict {
            admission,
            rewrite: path.forward,
        }
    }

    async fn admit_canonical(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Admission, Refused> {
        let is_usage = path == USAGE_PATH;
        // One set of plans for the whole decision, whatever a reload does.
        let plans = self.plans.load();
        let route = route_of(&plans, method, path);
        if route.public && !is_usage {
            return Ok(Admission::Forward);
        }
        let identity = match extract_key(headers)? {
            Some((key, _source)) => self.identify(key).await?,
            None => return Err(Rejection::MissingKey.into()),
        };
        let plan = self.plan_of(&identity);
        // Balances in the limiter's store are read in its call, below.
        let shared = self.shared_credits(&plan);
        let mut credits = if shared.is_some() {
            None
        } else {
            self.balance(&identity, &plan)
        };
        if identity.suspended {
            // Refused knowing who: the access log names the customer.
            return Err(Refused {
                rejection: Rejection::Suspended,
                identity: Some(identity),
                plan: Some(plan),
                decision: None,
                credits,
            });
        }
        // A route some plans may not call: refused before anything is charged.
        if let Some(allowed) = route.route.and_then(|r| r.plans.as_ref()) {
            if !is_usage && !allowed.iter().any(|p| *p == plan.name) {
                return Err(Refused {
                    // Plans a consumer could move to: not the unbilled
                    // (internal) ones.
                    rejection: Rejection::NotInPlan(
                        allowed
                            .iter()
                            .filter(|p| plans.get(p).is_some_and(|p| p.billed))
                            .cloned()
                            .collect(),
                    ),
                    identity: Some(identity),
                    plan: Some(plan),
                    decision: None,
                    credits,
                });
            }
        }
        let cost = if is_usage { 0 } else { route.cost };
        // Out of credits (those no other request in flight holds): refused
        // before anything is charged, when the request would cost credits.
        // A `reserve` route's hold is taken here; it is given back when the
        // request's usage is charged, or when `Admitted` (or a refusal
        // below) drops it.
        let mut hold = Hold::none();
        if let (Some(b), Some(policy), Some(book)) =
            (credits, plan.credits.as_deref(), self.credits.as_ref())
        {
            let want = self.wanted(route.route, &plan, policy, is_usage);
            let read = || {
                book.balance(&identity.customer, policy, self.clock.now_ms())
                    .remaining
            };
            match self.holds.take(&identity.customer, want, b.remaining, read) {
                Some(h) => hold = h,
                None if !is_usage && (want > 0 || credit_price(route.route, &plan, policy) > 0) => {
                    let held = self.holds.held(&identity.customer);
                    let detail = held_detail(b.remaining, held, want);
                    return Err(Refused {
                        rejection: Rejection::CreditsExhausted { detail },
                        identity: Some(identity),
                        plan: Some(plan),
                        decision: None,
                        credits,
                    });
                }
                None => {}
            }
        }
        // Refused before anything is charged: a refusal consumes nothing.
        if !is_usage && may_bill(route.route, &plan) {
            let rejection = match self.journal_state() {
                JournalState::Open => None,
                JournalState::Full => Some(Rejection::SpoolFull),
                JournalState::Failing => Some(Rejection::UsageNotRecorded),
            };
            if let Some(rejection) = rejection {
                metrics::SPOOL_REJECTED
                    .with_label_values(&[&plan.name])
                    .inc();
                return Err(Refused {
                    rejection,
                    identity: Some(identity),
                    plan: Some(plan),
                    decision: None,
                    credits,
                });
            }
        }
        // Balances in the limiter's store: this call's hold is taken here
        // first (so calls racing it see it), then checked with the limits.
        let ask = shared.map(|(book, policy)| {
            let want = self.wanted(route.route, &plan, policy, is_usage);
            hold = self.holds.claim(&identity.customer, want);
            let held = self.holds.held(&identity.customer).saturating_sub(want);
            CreditAsk {
                allowance: policy.allowance,
                held: held.saturating_add(book.pending(&identity.customer)),
                want,
                required: !is_usage && (want > 0 || credit_price(route.route, &plan, policy) > 0),
            }
        });
        let started = Instant::now();
        // Read just before the limiter reads its own clock: a charge within
        // microseconds of midnight UTC may be journaled to the day before.
        let at = self.clock.now_ms();
        let decision = match ask {
            Some(ask) => {
                self.limiter
                    .check_credits(&identity.customer, &plan, cost, ask)
                    .await
            }
            None => self.limit(&identity, &plan, cost).await.map(|d| (d, None)),
        };
        metrics::LIMITER_DURATION
            .with_label_values(&[self.limiter.name()])
            .observe(started.elapsed().as_secs_f64());
        let decision = match decision {
            Ok((_, Some(CreditAnswer::Refused(b)))) => {
                let ask = ask.unwrap_or_default();
                return Err(Refused {
                    rejection: Rejection::CreditsExhausted {
                        detail: held_detail(b.remaining, ask.held, ask.want),
                    },
                    identity: Some(identity),
                    plan: Some(plan),
                    decision: None,
                    credits: Some(b),
                });
            }
            Ok((d, answer)) => {
                if let Some(CreditAnswer::Admitted(b)) = answer {
                    credits = Some(b);
                }
                Ok(d)
            }
            Err(e) => Err(e),
        };
        let Ok(decision) = decision else {
            return Err(Refused {
                rejection: Rejection::Unavailable { retry_after: 1 },
                identity: Some(identity),
                plan: Some(plan),
                decision: None,
                credits,
            });
        };
        if !is_usage && !decision.allowed {
            return Err(Refused {
                rejection: limited(&decision, cost),
                identity: Some(identity),
                plan: Some(plan),
                decision: Some(decision),
                credits,
            });
        }
        let admitted = Admitted {
            meter: meter_of(route.route, &plan, &decision),
            usage_header: route.route.and_then(|r| r.usage_header.clone()),
            body: route
                .route
                .and_then(|r| r.usage.clone())
                .filter(|_| plan.billed),
            fallback: route.route.map_or(DEFAULT_COST, |r| r.cost),
            identity,
            plan,
            decision,
            cost,
            at,
            credits,
            hold,
        };
        if is_usage {
            return Ok(Admission::Report(admitted));
        }
        count_near_limit(&admitted);
        self.raise_alerts(&admitted);
        Ok(Admission::Pass(admitted))
    }

    /// Raises the alerts of the quota thresholds `a`'s charge reached (with
    /// shared limits, crossed; see `alerts::limit_crossings`).
    fn raise_alerts(&self, a: &Admitted) {
        let Some(journal) = &self.alerts else { return };
        let crossed = crate::alerts::limit_crossings(
            journal.thresholds(),
            &a.identity.customer,
            &a.plan,
            &a.decision,
            a.cost,
            a.at,
            self.limiter.shared(),
        );
        for alert in crossed {
            journal.raise(alert);
        }
    }

    /// The end of an admitted request: what it held of its plan's
    /// `concurrent` caps, and of its customer's credits, is given back.
    /// Call once per admitted request, after its usage is recorded.
    pub fn release(&self, a: &Admitted) {
        a.hold.settle();
        // A request of cost 0 took no slot, so it gives none back.
        if a.cost > 0 && crate::limiter::holds(&a.plan) {
            self.limiter
                .release(&a.identity.customer, &a.plan, &a.decision);
        }
    }

    /// What a call on `route` holds of its customer's credits while it
    /// runs (`reserve` units at the dearest price it may be billed at).
    fn wanted(
        &self,
        route: Option<&Route>,
        plan: &Plan,
        policy: &crate::credits::CreditPolicy,
        is_usage: bool,
    ) -> u64 {
        let reserve = route.map_or(0, |r| r.reserve);
        if reserve > 0 && !is_usage {
            reserve.saturating_mul(credit_price(route, plan, policy))
        } else {
            0
        }
    }

    /// The book and policy of a plan with credits kept in the limiter's
    /// shared store (None: no credits, or kept here).
    fn shared_credits<'p>(
        &self,
        plan: &'p Plan,
    ) -> Option<(&Arc<dyn CreditBook>, &'p crate::credits::CreditPolicy)> {
        let book = self.credits.as_ref().filter(|b| b.shared())?;
        Some((book, plan.credits.as_deref()?))
    }

    /// `a`'s customer's balance once `units` of its meter are charged: read
    /// here, or with shared balances the one the limiter read at admission
    /// less this charge (no second round trip).
    pub fn balance_after(&self, a: &Admitted, units: u64) -> Option<Balance> {
        let Some((_, policy)) = self.shared_credits(&a.plan) else {
            return self.balance(&a.identity, &a.plan);
        };
        let cost = a.meter.as_deref().map_or(0, |m| policy.cost(m, units));
        a.credits.map(|b| Balance {
            remaining: b
                .remaining
                .saturating_sub(i64::try_from(cost).unwrap_or(i64::MAX)),
            used: b.used.saturating_add(cost),
            ..b
        })
    }

    /// The balance of a customer whose plan has credits.
    pub fn balance(&self, identity: &Identity, plan: &Plan) -> Option<Balance> {
        let (book, policy) = (self.credits.as_ref()?, plan.credits.as_deref()?);
        Some(book.balance(&identity.customer, policy, self.clock.now_ms()))
    }

    /// Asks the limiter; `cost` 0 only reports.
    pub async fn limit(
        &self,
        identity: &Identity,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> Result<Decision, LimiterError> {
        self.limiter.check(&identity.customer, plan, cost).await
    }
}

/// What the route table says about a request.
pub fn route_of<'a>(plans: &'a Plans, method: &http::Method, path: &str) -> RouteInfo<'a> {
    match plans.route(method, path) {
        Some(r) => RouteInfo {
            public: r.public,
            cost: r.limit_cost(),
            route: Some(r),
        },
        None => RouteInfo {
            public: false,
            cost: DEFAULT_COST,
            route: None,
        },
    }
}

/// The meter a request's units go to: its route's, else its plan's; past an
/// included quota with `overage`, the overage meter when the limit names one.
fn meter_of(route: Option<&Route>, plan: &Plan, decision: &Decision) -> Option<Arc<str>> {
    if !plan.billed {
        return None;
    }
    if decision.overage {
        if let Some(m) = &decision.overage_meter {
            return Some(m.clone());
        }
    }
    route
        .and_then(|r| r.meter.clone())
        .or_else(|| plan.meter.clone())
}

/// Whether a request could be billed: its route or plan names a meter, its
/// route reads usage from the body, or one of its plan's limits names an
/// overage meter.
fn may_bill(route: Option<&Route>, plan: &Plan) -> bool {
    plan.billed
        && (route.is_some_and(|r| r.meter.is_some() || r.usage.is_some())
            || plan.meter.is_some()
            || plan.limits.iter().any(|l| l.overage_meter.is_some()))
}

/// What one unit a request of `plan` on `route` may be billed costs at
/// most, in credits (0: the request costs none): the dearest price of
/// the meters it may be billed on.
fn credit_price(route: Option<&Route>, plan: &Plan, policy: &crate::credits::CreditPolicy) -> u64 {
    let price = |m: &str| policy.prices.get(m).copied().unwrap_or(0);
    // A `usage:` route bills its body's meters, or its cost on the
    // route's or plan's meter when the body reports none.
    let body = route
        .and_then(|r| r.usage.as_deref())
        .map_or(0, |f| f.max_over_meters(price));
    let own = route
        .and_then(|r| r.meter.as_deref())
        .or(plan.meter.as_deref())
        .map_or(0, price);
    let overage = plan
        .limits
        .iter()
        .filter_map(|l| l.overage_meter.as_deref())
        .map(price)
        .max()
        .unwrap_or(0);
    body.max(own).max(overage)
}

/// Why a call is refused while credits are left (None when none are):
/// the customer's calls in flight hold them, or too many for this call's
/// hold of `want`.
fn held_detail(remaining: i64, held: u64, want: u64) -> Option<String> {
    if remaining <= 0 {
        return None;
    }
    let free = remaining.saturating_sub(i64::try_from(held).unwrap_or(i64::MAX));
    Some(if want == 0 {
        format!("Your calls in flight hold all {remaining} of your credits; retry when one has finished, or buy more.")
    } else {
        format!(
            "This call holds {want} credits while it runs and {} of your {remaining} are not held by your calls in flight; retry when one has finished, or buy more.",
            free.max(0)
        )
    })
}

/// Counts each policy an admitted request left at or past 80 % used.
fn count_near_limit(a: &Admitted) {
    for p in &a.decision.policies {
        if p.remaining.saturating_mul(5) <= p.quota {
            metrics::NEAR_LIMIT
                .with_label_values(&[&a.plan.name, &p.name])
                .inc();
        }
    }
}

/// The 429 for a refused decision.
pub fn limited(decision: &Decision, cost: u64) -> Rejection {
    let violated = decision.policies.iter().filter(|p| p.violated);
    // A request that costs more than is left (but something is) says so:
    // a smaller one may pass now.
    let short = violated
        .clone()
        .filter(|p| p.remaining > 0 && !p.concurrent)
        .min_by_key(|p| p.remaining)
        .map(|p| {
            format!(
                "This request costs {cost} units and `{}` has {} left; retry after the time in Retry-After, or send a request that costs less.",
                p.name, p.remaining
            )
        })
        .or_else(|| {
            // A cap on requests in flight: room comes back as they finish.
            violated.clone().find(|p| p.concurrent).map(|p| {
                format!(
                    "{} requests are already in flight, the most `{}` allows; retry when one has finished.",
                    p.quota, p.name
                )
            })
        });
    Rejection::Limited {
        retry_after: decision.retry_after_secs,
        violated: violated.map(|p| p.name.clone()).collect(),
        detail: short,
    }
}
