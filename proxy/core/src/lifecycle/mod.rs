//! Plan lifecycle: billing webhooks turned into plan changes, without a
//! socket. The gateway reads a bounded body, then: [`signature`] verifies
//! it before anything parses it, [`events::parse`] reads it into one
//! [`Event`], and [`apply`] changes the store data inside one atomic store
//! update — deduplicated by event id and ordered by the provider's event
//! time, so a redelivery or a late event changes nothing, on one instance
//! or many sharing Redis (the update holds the store lock).

use std::collections::BTreeMap;

use crate::clock::Millis;
use crate::store::{BillingState, BillingStatus, CustomerRecord, StoreData};

pub mod events;
pub mod signature;
#[cfg(test)]
mod tests;

/// A billing provider whose webhooks Tollgate follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Stripe,
    Paystack,
    Paddle,
    /// Any backend signing per Standard Webhooks.
    Standard,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Stripe,
        Provider::Paystack,
        Provider::Paddle,
        Provider::Standard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::Paystack => "paystack",
            Provider::Paddle => "paddle",
            Provider::Standard => "standard",
        }
    }
}

/// What a provider's event says about a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Paid for and running: the plan its price maps to.
    Active,
    /// A payment failed: `on_past_due` decides.
    PastDue,
    /// Paused by the provider: treated as past due.
    Paused,
    /// Cancelled at the end of the period: nothing changes yet.
    Canceling,
    /// Over: `on_cancel`.
    Canceled,
    /// A payment went through: restores a past-due customer.
    Paid,
    /// Standard Webhooks `customer.plan_changed`: the plan named.
    SetPlan,
    Suspend,
    Resume,
    /// A credit pack was paid for (Stripe `checkout.session.completed`
    /// with `metadata.tollgate_credits`): granted through the credit book,
    /// not the store; the plan is not touched.
    Credits(u64),
}

/// One verified event, as every provider's payload is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique per provider: the dedupe key.
    pub id: String,
    /// The provider's event type, for the log.
    pub kind: String,
    pub customer: String,
    /// The provider's time of the event (Unix ms), for ordering.
    pub at: Millis,
    pub change: Change,
    /// Price ids, lookup keys or plan codes, in order of preference,
    /// mapped to a plan through the provider's `plans:`.
    pub sources: Vec<String>,
    /// A plan named directly (Standard Webhooks, Tollgate's own checkout).
    pub plan: Option<String>,
    /// What a credit pack was bought in (the Checkout Session's id): its
    /// grant's idempotency key, shared by every event about that purchase.
    pub purchase: Option<String>,
}

/// `on_past_due`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnPastDue {
    /// The plan stays until the provider cancels (its dunning decides).
    #[default]
    Keep,
    /// 403 until a payment arrives.
    Suspend,
    /// Moved to this plan until a payment arrives.
    Plan(String),
}

/// One provider's mapping, validated against plans.yaml by the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Price id, lookup key or plan code → plan name.
    pub plans: BTreeMap<String, String>,
    /// The plan after a cancellation; None: the default plan.
    pub on_cancel: Option<String>,
    pub on_past_due: OnPastDue,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// This event id was applied before.
    Duplicate,
    /// Older than the last event applied to this customer.
    Stale,
    /// No price of the event maps to a plan: acknowledged, nothing changed
    /// (a product Tollgate does not sell).
    Unmapped,
    /// Applied; the plan and suspension before and after.
    Done {
        old_plan: Option<String>,
        new_plan: Option<String>,
        was_suspended: bool,
        suspended: bool,
        status: BillingStatus,
    },
}

/// A verified event that cannot be applied: answered with a 400 so the
/// sender sees it (and nothing is recorded, so a fixed retry applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unappliable(pub String);

/// Deliveries are remembered this long (Stripe retries for three days)...
pub const REMEMBER_MS: Millis = 7 * 86_400_000;
/// ...and at most this many (the oldest are forgotten first). Past either
/// bound a redelivery is still harmless: it is no newer than what was
/// applied, and applying the same change twice leaves the same plan.
pub const REMEMBER_MAX: usize = 20_000;

/// How far past now an event's own time is believed.
pub const MAX_SKEW_MS: Millis = 5 * 60_000;

/// Records `key` as applied at `now`, forgetting what is past the bounds.
pub fn remember(events: &mut BTreeMap<String, u64>, key: String, now: Millis) {
    events.retain(|_, at| now.saturating_sub(*at) < REMEMBER_MS);
    while events.len() >= REMEMBER_MAX {
        let Some(oldest) = events
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        events.remove(&oldest);
    }
    events.insert(key, now);
}

/// Applies `ev` from `provider` to the store data. `plan_exists` checks a
/// plan a payload names directly (`Policy` targets were checked at load).
pub fn apply(
    d: &mut StoreData,
    provider: Provider,
    ev: &Event,
    policy: &Policy,
    plan_exists: &dyn Fn(&str) -> bool,
    now: Millis,
) -> Result<Applied, Unappliable> {
    crate::store::admin::customer_id_ok(&ev.customer).map_err(|e| Unappliable(e.to_string()))?;
    let key = format!("{}:{}", provider.name(), ev.id);
    if d.webhook_events.contains_key(&key) {
        return Ok(Applied::Duplicate);
    }
    if let Some(p) = &ev.plan {
        if !plan_exists(p) {
            return Err(Unappliable(format!("unknown plan `{p}`")));
        }
    }
    let mapped = ev
        .plan
        .clone()
        .or_else(|| ev.sources.iter().find_map(|s| policy.plans.get(s).cloned()));
    // A signed time far in the future would freeze the customer: no event
    // is taken to be later than now plus the signature tolerance.
    let at = ev.at.min(now.saturating_add(MAX_SKEW_MS));
    let last = d
        .customers
        .get(&ev.customer)
        .and_then(|c| c.billing.as_ref())
        .map(|b| b.last_event_at);
    if last.is_some_and(|last| last > at) {
        remember(&mut d.webhook_events, key, now);
        return Ok(Applied::Stale);
    }
    // An event about prices Tollgate does not sell (another product of the
    // same account) changes nothing, whatever it says.
    if mapped.is_none() && !ev.sources.is_empty() {
        remember(&mut d.webhook_events, key, now);
        return Ok(Applied::Unmapped);
    }
    let c = d.customers.entry(ev.customer.clone()).or_default();
    let was_suspended = c.is_suspended();
    let CustomerRecord { plan, billing, .. } = c;
    let old_plan = plan.clone();
    let b = billing.get_or_insert_with(|| BillingState {
        provider: provider.name().to_owned(),
        status: BillingStatus::Active,
        // What the customer had before billing spoke is what it pays for
        // until an event names a price.
        paid_plan: old_plan.clone(),
        suspended: false,
        last_event_at: 0,
        last_event_id: String::new(),
    });
    transition(b, plan, ev.change, mapped, policy);
    b.provider = provider.name().to_owned();
    b.last_event_at = at;
    b.last_event_id.clone_from(&ev.id);
    let status = b.status;
    let applied = Applied::Done {
        old_plan,
        new_plan: c.plan.clone(),
        was_suspended,
        suspended: c.is_suspended(),
        status,
    };
    remember(&mut d.webhook_events, key, now);
    Ok(applied)
}

/// The state machine: what each change does to a customer's plan,
/// status and billing suspension.
fn transition(
    b: &mut BillingState,
    plan: &mut Option<String>,
    change: Change,
    mapped: Option<String>,
    policy: &Policy,
) {
    match change {
        Change::Active => {
            if let Some(p) = mapped {
                b.paid_plan = Some(p);
            }
            b.status = BillingStatus::Active;
            b.suspended = false;
            plan.clone_from(&b.paid_plan);
        }
        Change::Paid => {
            if b.status == BillingStatus::PastDue {
                b.status = BillingStatus::Active;
                b.suspended = false;
                plan.clone_from(&b.paid_plan);
            }
        }
        Change::PastDue | Change::Paused => {
            if let Some(p) = mapped {
                b.paid_plan = Some(p);
            }
            b.status = if change == Change::Paused {
                BillingStatus::Paused
            } else {
                BillingStatus::PastDue
            };
            match &policy.on_past_due {
                OnPastDue::Keep => {}
                OnPastDue::Suspend => b.suspended = true,
                OnPastDue::Plan(p) => *plan = Some(p.clone()),
            }
        }
        Change::Canceling => b.status = BillingStatus::Canceling,
        Change::Canceled => {
            b.status = BillingStatus::Canceled;
            b.suspended = false;
            b.paid_plan = None;
            plan.clone_from(&policy.on_cancel);
        }
        Change::SetPlan => {
            b.paid_plan.clone_from(&mapped);
            *plan = mapped;
        }
        Change::Suspend => b.suspended = true,
        Change::Resume => b.suspended = false,
        Change::Credits(_) => {}
    }
}
