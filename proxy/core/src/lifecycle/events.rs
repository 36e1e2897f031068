//! Each provider's webhook payload, read into one [`Event`]. Only what
//! decides a plan is read; an event type that decides nothing is `None`
//! (acknowledged and ignored). Field names follow each provider's docs:
//!
//! - Stripe: the Event object (`id`, `type`, `created`, `data.object`),
//!   <https://docs.stripe.com/api/events/object>; subscriptions carry
//!   `status` and `items.data[].price.{id,lookup_key}`,
//!   <https://docs.stripe.com/api/subscriptions/object>.
//! - Paystack: `{"event", "data"}` with `data.customer.customer_code` and
//!   `data.plan.plan_code`, <https://paystack.com/docs/payments/webhooks/>
//!   and <https://paystack.com/docs/payments/subscriptions/#listen-for-subscription-events>.
//! - Paddle Billing: `event_id`, `event_type`, `occurred_at`, and
//!   `data.customer_id`, `data.status`, `data.items[].price.id`,
//!   <https://developer.paddle.com/webhooks/overview>.
//! - Standard (Tollgate's own): `{"type", "timestamp"?, "data":
//!   {"customer", "plan"?}}` with the Standard Webhooks envelope.

use serde_json::Value;

use super::{Change, Event, Provider};
use crate::clock::{parse_rfc3339, Millis};

/// Why a verified body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(what: impl Into<String>) -> BodyError {
    BodyError(what.into())
}

/// `header_ts`: the signed timestamp (seconds), for providers whose body
/// has no time of its own.
pub fn parse(
    provider: Provider,
    body: &[u8],
    header_id: Option<&str>,
    header_ts: Option<u64>,
    received: Millis,
) -> Result<Option<Event>, BodyError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("the body is not a JSON object"));
    }
    match provider {
        Provider::Stripe => stripe(&v),
        Provider::Paystack => paystack(&v, body, received),
        Provider::Paddle => paddle(&v),
        Provider::Standard => standard(&v, header_id, header_ts.map_or(received, |t| t * 1000)),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

/// An id that may be expanded into an object (`"customer": {"id": …}`).
fn id_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    match v.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Object(o) => o.get("id")?.as_str(),
        _ => None,
    }
}

fn required<'a>(v: Option<&'a str>, what: &str) -> Result<&'a str, BodyError> {
    v.ok_or_else(|| bad(format!("`{what}` is missing")))
}

/// RFC 3339 with optional fractional seconds and a `Z` or `+00:00` offset,
/// as Paddle and Paystack write it.
pub fn parse_time(s: &str) -> Option<Millis> {
    let (base, rest) = (s.get(..19)?, s.get(19..)?);
    let mut ms = parse_rfc3339(&format!("{base}Z"))?;
    let rest = match rest.strip_prefix('.') {
        Some(frac) => {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            let f = &frac[..digits];
            let mut m: u64 = 0;
            for (i, d) in f.bytes().take(3).enumerate() {
                m += u64::from(d - b'0') * [100, 10, 1][i];
            }
            ms += m;
            &frac[digits..]
        }
        None => rest,
    };
    matches!(rest, "Z" | "+00:00" | "").then_some(ms)
}

/// A paid credit pack's `metadata.tollgate_credits`.
fn credit_pack(obj: &Value) -> Result<Change, BodyError> {
    str_at(obj, &["metadata", "tollgate_credits"])
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n > 0 && *n <= MAX_PACK)
        .map(Change::Credits)
        .ok_or_else(|| bad("`metadata.tollgate_credits` is not a positive number"))
}

/// The most credits one purchase may grant (a typo guard, not a price).
pub const MAX_PACK: u64 = 1_000_000_000_000;

fn stripe(v: &Value) -> Result<Option<Event>, BodyError> {
    let id = required(str_at(v, &["id"]), "id")?;
    let kind = required(str_at(v, &["type"]), "type")?;
    let created = v
        .get("created")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("`created` is missing"))?;
    let obj = v
        .get("data")
        .and_then(|d| d.get("object"))
        .ok_or_else(|| bad("`data.object` is missing"))?;
    let mut plan = None;
    let change = match kind {
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.resumed" => match str_at(obj, &["status"]) {
            Some("active" | "trialing") => Change::Active,
            Some("past_due" | "unpaid") => Change::PastDue,
            Some("paused") => Change::Paused,
            Some("canceled" | "incomplete_expired") => Change::Canceled,
            // `incomplete`: the first payment is pending; nothing is paid yet.
            _ => return Ok(None),
        },
        "customer.subscription.deleted" => Change::Canceled,
        "customer.subscription.paused" => Change::Paused,
        "invoice.payment_failed" => Change::PastDue,
        "invoice.paid" => Change::Paid,
        // A delayed payment method (SEPA, ACH) completes the session
        // unpaid and pays later: the pack is granted on the payment.
        "checkout.session.async_payment_succeeded"
            if str_at(obj, &["metadata", "tollgate_credits"]).is_some() =>
        {
            credit_pack(obj)?
        }
        "checkout.session.completed" => {
            // Sessions Tollgate creates name their plan; others are left to
            // the subscription events that follow them.
            let paid = matches!(
                str_at(obj, &["payment_status"]),
                Some("paid" | "no_payment_required")
            );
            // A credit pack (`mode=payment`) names how many credits it bought.
            let credits = str_at(obj, &["metadata", "tollgate_credits"]);
            if let (true, Some("payment"), Some(_)) = (paid, str_at(obj, &["mode"]), credits) {
                credit_pack(obj)?
            } else {
                plan = str_at(obj, &["metadata", "tollgate_plan"]).map(str::to_owned);
                if !paid || plan.is_none() || str_at(obj, &["mode"]) != Some("subscription") {
                    return Ok(None);
                }
                Change::Active
            }
        }
        _ => return Ok(None),
    };
    let customer = id_at(obj, "customer")
        .or_else(|| str_at(obj, &["client_reference_id"]))
        .ok_or_else(|| bad("`data.object.customer` is missing"))?;
    // A subscription's items, or an invoice's lines: their prices (older
    // API versions put them under `price`, newer invoice lines under
    // `pricing.price_details.price`).
    let mut sources = Vec::new();
    for list in ["items", "lines"] {
        let Some(items) = obj
            .get(list)
            .and_then(|i| i.get("data"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for item in items {
            let candidates = [
                str_at(item, &["price", "id"]),
                str_at(item, &["price", "lookup_key"]),
                str_at(item, &["pricing", "price_details", "price"]),
            ];
            sources.extend(candidates.into_iter().flatten().map(str::to_owned));
        }
    }
    Ok(Some(Event {
        id: id.to_owned(),
        kind: kind.to_owned(),
        customer: customer.to_owned(),
        at: created.saturating_mul(1000),
        change,
        sources,
        plan,
        purchase: matches!(change, Change::Credits(_))
            .then(|| str_at(obj, &["id"]).map(str::to_owned))
            .flatten(),
    }))
}

fn paystack(v: &Value, body: &[u8], received: Millis) -> Result<Option<Event>, BodyError> {
    use sha2::Digest;
    let kind = required(str_at(v, &["event"]), "event")?;
    let data = v.get("data").ok_or_else(|| bad("`data` is missing"))?;
    let plan_code = str_at(data, &["plan", "plan_code"]);
    let change = match kind {
        "subscription.create" => Change::Active,
        "subscription.disable" => Change::Canceled,
        "subscription.not_renew" => Change::Canceling,
        "invoice.payment_failed" => Change::PastDue,
        // A charge for a plan: a subscription's payment. Other charges
        // (one-off payments) decide nothing.
        "charge.success" if plan_code.is_some() => Change::Active,
        _ => return Ok(None),
    };
    let customer = required(
        str_at(data, &["customer", "customer_code"]),
        "data.customer.customer_code",
    )?;
    // Paystack events carry no id: a redelivery is the same bytes.
    let digest = sha2::Sha256::digest(body);
    // The time of the event itself: a charge's payment time, else when the
    // object last changed, else when it arrived (`createdAt` is when the
    // subscription began, not when it was disabled).
    let at = ["paid_at", "paidAt", "updatedAt", "updated_at"]
        .iter()
        .find_map(|k| str_at(data, &[k]).and_then(parse_time))
        .unwrap_or(received);
    Ok(Some(Event {
        id: format!("sha256:{}", hex::encode(&digest[..16])),
        kind: kind.to_owned(),
        customer: customer.to_owned(),
        at,
        change,
        sources: plan_code.map(str::to_owned).into_iter().collect(),
        plan: None,
        purchase: None,
    }))
}

fn paddle(v: &Value) -> Result<Option<Event>, BodyError> {
    let id = required(str_at(v, &["event_id"]), "event_id")?;
    let kind = required(str_at(v, &["event_type"]), "event_type")?;
    let at = str_at(v, &["occurred_at"])
        .and_then(parse_time)
        .ok_or_else(|| bad("`occurred_at` is missing or not an RFC 3339 time"))?;
    let data = v.get("data").ok_or_else(|| bad("`data` is missing"))?;
    let change = match kind {
        "subscription.created"
        | "subscription.updated"
        | "subscription.activated"
        | "subscription.resumed" => match str_at(data, &["status"]) {
            Some("active" | "trialing") => Change::Active,
            Some("past_due") => Change::PastDue,
            Some("paused") => Change::Paused,
            Some("canceled") => Change::Canceled,
            _ => return Ok(None),
        },
        "subscription.canceled" => Change::Canceled,
        "subscription.paused" => Change::Paused,
        "subscription.past_due" => Change::PastDue,
        "transaction.completed" => Change::Active,
        _ => return Ok(None),
    };
    // A transaction without a customer (a guest checkout) names nobody.
    let Some(customer) = str_at(data, &["customer_id"]) else {
        return if kind == "transaction.completed" {
            Ok(None)
        } else {
            Err(bad("`data.customer_id` is missing"))
        };
    };
    let sources = data
        .get("items")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|i| str_at(i, &["price", "id"]).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Event {
        id: id.to_owned(),
        kind: kind.to_owned(),
        customer: customer.to_owned(),
        at,
        change,
        sources,
        plan: None,
        purchase: None,
    }))
}

fn standard(v: &Value, id: Option<&str>, header_at: Millis) -> Result<Option<Event>, BodyError> {
    let kind = required(str_at(v, &["type"]), "type")?;
    let data = v.get("data").ok_or_else(|| bad("`data` is missing"))?;
    let mut plan = None;
    let change = match kind {
        "customer.plan_changed" => {
            plan = Some(required(str_at(data, &["plan"]), "data.plan")?.to_owned());
            Change::SetPlan
        }
        "customer.suspended" => Change::Suspend,
        "customer.resumed" => Change::Resume,
        _ => return Ok(None),
    };
    let customer = required(str_at(data, &["customer"]), "data.customer")?;
    let at = str_at(v, &["timestamp"])
        .and_then(parse_time)
        .unwrap_or(header_at);
    Ok(Some(Event {
        id: required(id, "webhook-id")?.to_owned(),
        kind: kind.to_owned(),
        customer: customer.to_owned(),
        at,
        change,
        sources: Vec::new(),
        plan,
        purchase: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_as_providers_write_them() {
        assert_eq!(parse_time("2024-04-12T10:18:49Z"), Some(1_712_917_129_000));
        assert_eq!(
            parse_time("2024-04-12T10:18:49.621022Z"),
            Some(1_712_917_129_621)
        );
        assert_eq!(
            parse_time("2020-11-25T14:39:38.000+00:00"),
            Some(1_606_315_178_000)
        );
        assert_eq!(parse_time("2024-04-12T10:18:49+02:00"), None);
        assert_eq!(parse_time("yesterday"), None);
    }
}
