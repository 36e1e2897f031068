//! `POST /_tollgate/billing/checkout` (`plan=pro`, or `credits=N` for a
//! credit pack, form or JSON) and
//! `POST /_tollgate/billing/portal`, with the consumer's own key: a Stripe
//! Checkout or customer-portal session, answered `303` to its URL, or
//! `{"url": …}` when the client asks for JSON. A suspended customer may use
//! both (that is how it pays); never charged, never billed.

use tollgate_core::gate::extract_key;
use tollgate_core::metrics::CHECKOUT_SESSIONS;
use tollgate_core::problem::Rejection;
use tollgate_core::store::BillingStatus;
use tollgate_metering::billing::checkout::SessionError;

use super::{header_str, read_body, BodyError, Reply};
use crate::app::App;

const MAX_BODY: usize = 16 * 1024;

/// Sessions one customer may ask for per minute: each is a call to Stripe
/// on the operator's account, whose API rate limit all customers share.
pub const SESSIONS_PER_MINUTE: u32 = 20;

/// Counts sessions per customer and minute (in this process; bounded).
#[derive(Default)]
pub struct Throttle(std::sync::Mutex<std::collections::HashMap<std::sync::Arc<str>, (u64, u32)>>);

impl Throttle {
    /// Whether `customer` may open another session in minute `minute`.
    pub fn admit(&self, customer: &std::sync::Arc<str>, minute: u64) -> bool {
        let mut m = tollgate_core::lock(&self.0);
        if m.len() > 100_000 {
            m.retain(|_, (at, _)| *at == minute);
        }
        let e = m.entry(customer.clone()).or_insert((minute, 0));
        if e.0 != minute {
            *e = (minute, 0);
        }
        e.1 += 1;
        e.1 <= SESSIONS_PER_MINUTE
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Checkout,
    Portal,
}

impl Kind {
    /// Counts a session asked for: `created`, `refused` or `error`.
    fn count(self, result: &str) {
        CHECKOUT_SESSIONS
            .with_label_values(&[self.name(), result])
            .inc();
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Checkout => "checkout",
            Kind::Portal => "portal",
        }
    }
}

pub async fn session(
    app: &App,
    session: &mut pingora::proxy::Session,
    kind: Kind,
) -> Result<Reply, Rejection> {
    let Some(stripe) = app.checkout.as_ref() else {
        return Ok(Reply::problem(
            404,
            "billing-not-configured",
            "Self-service billing is not available",
            "This API does not offer checkout or a billing portal here.".into(),
        ));
    };
    let key = extract_key(&session.req_header().headers)?
        .map(|(k, _)| k.to_owned())
        .ok_or(Rejection::MissingKey)?;
    let identity = app.gate.identify(&key).await?;
    // A second Checkout Session would start a second subscription beside
    // the running one: plan changes of a subscriber go through the portal.
    let subscribed = identity
        .billing
        .is_some_and(|b| !matches!(b, BillingStatus::Canceled));
    let wants_json = header_str(session, "accept").is_some_and(|a| a.contains("application/json"));
    let is_json = header_str(session, "content-type")
        .is_some_and(|c| c.trim_start().starts_with("application/json"));
    let body = match read_body(session, MAX_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Ok(Reply::problem(
                413,
                "body-too-large",
                "Body too large",
                format!("this request takes at most {MAX_BODY} bytes"),
            ))
        }
        Err(BodyError::Unreadable) => return Err(Rejection::BadRequest(400)),
    };
    // `credits=N`: a one-off payment for a credit pack, which a subscriber
    // may make too.
    let credits = match kind {
        Kind::Checkout => field(&body, is_json, "credits"),
        Kind::Portal => None,
    };
    if matches!(kind, Kind::Checkout) && subscribed && credits.is_none() {
        kind.count("refused");
        return Ok(Reply::problem(
            409,
            "already-subscribed",
            "Already subscribed",
            "This account has a subscription; change its plan in the billing portal (POST /_tollgate/billing/portal).".into(),
        ));
    }
    let minute = app.gate.clock.now_ms() / 60_000;
    if !app.sessions.admit(&identity.customer, minute) {
        kind.count("refused");
        let mut r = Reply::problem(
            429,
            "too-many-sessions",
            "Too many billing sessions",
            format!(
                "at most {SESSIONS_PER_MINUTE} checkout or portal sessions a minute; retry shortly"
            ),
        );
        r.headers.push((http::header::RETRY_AFTER, "60".into()));
        return Ok(r);
    }
    let result = match kind {
        // Credits only count on a plan that spends them.
        Kind::Checkout if credits.is_some() && app.gate.plan_of(&identity).credits.is_none() => {
            Err(SessionError::Credits(
                "your plan has no prepaid credits; choose a plan that does first".into(),
            ))
        }
        Kind::Checkout if credits.is_some() => {
            let n = credits.as_deref().and_then(|c| c.parse::<u64>().ok());
            stripe.buy_credits(&identity.customer, n.unwrap_or(0)).await
        }
        Kind::Checkout => {
            let Some(plan) = field(&body, is_json, "plan") else {
                return Ok(Reply::problem(
                    400,
                    "plan-required",
                    "Plan required",
                    format!("send plan=<name>; plans on sale: {}", on_sale(app)),
                ));
            };
            stripe.checkout(&identity.customer, &plan).await
        }
        Kind::Portal => stripe.portal(&identity.customer).await,
    };
    let url = match result {
        Ok(url) => url,
        Err(SessionError::UnknownPlan(plan)) => {
            kind.count("refused");
            return Ok(Reply::problem(
                400,
                "unknown-plan",
                "Unknown plan",
                format!(
                    "`{}` is not on sale; plans on sale: {}",
                    plan.chars().take(64).collect::<String>(),
                    on_sale(app)
                ),
            ));
        }
        Err(SessionError::Credits(why)) => {
            kind.count("refused");
            return Ok(Reply::problem(
                400,
                "bad-credits",
                "Credits cannot be bought so",
                why,
            ));
        }
        Err(SessionError::Provider(why)) => {
            kind.count("error");
            log::warn!(
                "stripe {} session for customer {} failed: {why}",
                kind.name(),
                identity.customer
            );
            return Ok(Reply::problem(
                502,
                "billing-provider-error",
                "Billing provider error",
                "The billing provider could not start a session; try again shortly.".into(),
            ));
        }
    };
    kind.count("created");
    Ok(if wants_json {
        Reply::json(200, serde_json::json!({ "url": url }).to_string())
    } else {
        let mut r = Reply::json(303, serde_json::json!({ "url": url }).to_string());
        r.headers.push((http::header::LOCATION, url));
        r
    })
}

fn on_sale(app: &App) -> String {
    app.checkout
        .as_ref()
        .map(|c| {
            c.config
                .prices
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into())
}

/// `name` from a form (`plan=pro`) or a JSON object (`{"plan": "pro"}`,
/// `{"credits": 5000}`).
fn field(body: &[u8], is_json: bool, name: &str) -> Option<String> {
    if is_json {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        return match v.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| tollgate_core::pct::decode(v, true))
        .filter(|p| !p.is_empty())
}
