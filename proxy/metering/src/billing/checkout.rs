//! Consumer self-service at Stripe: a Checkout Session to subscribe to a
//! plan (`POST /v1/checkout/sessions`) and a customer-portal session
//! (`POST /v1/billing_portal/sessions`), form-encoded with a Bearer key, a
//! pinned `Stripe-Version` and an `Idempotency-Key`, as Stripe's official
//! SDKs send them (<https://docs.stripe.com/api/checkout/sessions/create>,
//! <https://docs.stripe.com/api/customer_portal/sessions/create>).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_core::diag::Check;

use super::{form_encode, http_client, STRIPE_VERSION};

/// `checkout.stripe`, secrets resolved.
#[derive(Clone)]
pub struct CheckoutConfig {
    pub api_key: String,
    pub base_url: String,
    pub version: String,
    /// Plan name → Stripe price id.
    pub prices: BTreeMap<String, String>,
    pub success_url: String,
    pub cancel_url: String,
    /// Where the portal sends the customer back; None: the portal's default.
    pub return_url: Option<String>,
    /// Prepaid credits on sale (`credit_pack`); None: none are.
    pub credit_pack: Option<CreditPack>,
}

/// `credit_pack: { price, credits }`: one unit of the Stripe price buys
/// this many credits; `credits=N` on checkout buys N / credits units.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditPack {
    pub price: String,
    pub credits: u64,
}

/// The most packs one checkout buys.
pub const MAX_PACKS: u64 = 1000;

impl std::fmt::Debug for CheckoutConfig {
    // The API key stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckoutConfig({:?})", self.prices)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckout {
    stripe: RawStripeCheckout,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStripeCheckout {
    api_key_env: String,
    #[serde(default)]
    prices: BTreeMap<String, String>,
    success_url: String,
    cancel_url: String,
    return_url: Option<String>,
    base_url: Option<String>,
    version: Option<String>,
    credit_pack: Option<CreditPack>,
}

impl CheckoutConfig {
    /// The `checkout:` section. `plan_exists` checks each priced plan.
    pub fn parse(
        cx: &mut Check<'_>,
        value: &serde_yaml::Value,
        plan_exists: &dyn Fn(&str) -> bool,
    ) -> Option<Self> {
        let r: RawCheckout = cx.typed("checkout", value)?;
        let r = r.stripe;
        let p = "checkout.stripe";
        for plan in r.prices.keys() {
            if !plan_exists(plan) {
                cx.err(
                    &format!("{p}.prices.{plan}"),
                    format!("`{plan}` is not a plan in plans.yaml"),
                    Some("map each plan name a consumer may buy to its Stripe price id"),
                );
            }
        }
        let base_url = r
            .base_url
            .unwrap_or_else(|| "https://api.stripe.com".into());
        cx.http_url(&format!("{p}.base_url"), &base_url);
        cx.http_url(&format!("{p}.success_url"), &r.success_url);
        cx.http_url(&format!("{p}.cancel_url"), &r.cancel_url);
        if let Some(u) = &r.return_url {
            cx.http_url(&format!("{p}.return_url"), u);
        }
        if let Some(pack) = &r.credit_pack {
            if pack.credits == 0 {
                cx.err(
                    &format!("{p}.credit_pack.credits"),
                    "a credit pack must hold at least one credit",
                    None,
                );
            }
        }
        let api_key = cx.secret(&format!("{p}.api_key_env"), &r.api_key_env)?;
        Some(CheckoutConfig {
            api_key,
            base_url: base_url.trim_end_matches('/').to_owned(),
            version: r.version.unwrap_or_else(|| STRIPE_VERSION.into()),
            prices: r.prices,
            success_url: r.success_url,
            cancel_url: r.cancel_url,
            return_url: r.return_url,
            credit_pack: r.credit_pack,
        })
    }
}

/// Why no session URL came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The plan asked for has no configured price (400).
    UnknownPlan(String),
    /// No credit pack is on sale, or the amount is not a whole number of
    /// packs (400); the text says which.
    Credits(String),
    /// Stripe refused or could not be reached (502); the text is for the
    /// log only, never the consumer.
    Provider(String),
}

pub struct StripeCheckout {
    pub config: CheckoutConfig,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Session {
    url: String,
}

impl StripeCheckout {
    pub fn new(config: CheckoutConfig, timeout: Duration) -> Self {
        Self {
            config,
            client: http_client(timeout),
        }
    }

    /// The Checkout Session URL for `customer` to subscribe to `plan`.
    pub async fn checkout(&self, customer: &str, plan: &str) -> Result<String, SessionError> {
        let price = self
            .config
            .prices
            .get(plan)
            .ok_or_else(|| SessionError::UnknownPlan(plan.to_owned()))?;
        let c = &self.config;
        // `metadata[tollgate_plan]` lets `checkout.session.completed` set
        // the plan before the subscription events arrive.
        let form = form_encode(&[
            ("mode", "subscription"),
            ("customer", customer),
            ("client_reference_id", customer),
            ("line_items[0][price]", price),
            ("line_items[0][quantity]", "1"),
            ("success_url", &c.success_url),
            ("cancel_url", &c.cancel_url),
            ("metadata[tollgate_plan]", plan),
        ]);
        self.create("/v1/checkout/sessions", form).await
    }

    /// A Checkout Session (`mode=payment`) for `customer` to buy `credits`
    /// prepaid credits; its `checkout.session.completed` grants them.
    pub async fn buy_credits(&self, customer: &str, credits: u64) -> Result<String, SessionError> {
        let c = &self.config;
        let pack = c
            .credit_pack
            .as_ref()
            .ok_or_else(|| SessionError::Credits("no credit packs are on sale here".into()))?;
        let packs = credits / pack.credits.max(1);
        if credits == 0 || !credits.is_multiple_of(pack.credits.max(1)) || packs > MAX_PACKS {
            return Err(SessionError::Credits(format!(
                "credits are sold in packs of {}, up to {MAX_PACKS} packs at once",
                pack.credits
            )));
        }
        let (quantity, amount) = (packs.to_string(), credits.to_string());
        let form = form_encode(&[
            ("mode", "payment"),
            ("customer", customer),
            ("client_reference_id", customer),
            ("line_items[0][price]", &pack.price),
            ("line_items[0][quantity]", &quantity),
            ("success_url", &c.success_url),
            ("cancel_url", &c.cancel_url),
            ("metadata[tollgate_credits]", &amount),
        ]);
        self.create("/v1/checkout/sessions", form).await
    }

    /// A customer-portal session URL for `customer`.
    pub async fn portal(&self, customer: &str) -> Result<String, SessionError> {
        let mut pairs = vec![("customer", customer)];
        if let Some(u) = &self.config.return_url {
            pairs.push(("return_url", u));
        }
        self.create("/v1/billing_portal/sessions", form_encode(&pairs))
            .await
    }

    /// POSTs the form; one retry with the same idempotency key on a
    /// network error, a 409, a 429 or a 5xx, as the SDKs retry.
    async fn create(&self, path: &str, form: String) -> Result<String, SessionError> {
        let mut key = [0u8; 16];
        tollgate_core::keys::random_bytes(&mut key)
            .map_err(|e| SessionError::Provider(format!("no randomness: {e}")))?;
        let idempotency_key = hex::encode(key);
        let url = format!("{}{path}", self.config.base_url);
        let mut last = String::new();
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let resp = self
                .client
                .post(&url)
                .bearer_auth(&self.config.api_key)
                .header("Stripe-Version", &self.config.version)
                .header("Idempotency-Key", &idempotency_key)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form.clone())
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    last = format!("network: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            if status.is_success() {
                return serde_json::from_str::<Session>(&body)
                    .map(|s| s.url)
                    .map_err(|_| SessionError::Provider("Stripe's answer has no `url`".into()));
            }
            last = format!("HTTP {status}: {}", stripe_error(&body));
            if !(status.is_server_error() || matches!(status.as_u16(), 409 | 429)) {
                break;
            }
        }
        Err(SessionError::Provider(last))
    }
}

/// Stripe's `error.type`, `error.code` and `error.message`, for the log.
fn stripe_error(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let e = &v["error"];
    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
    let msg: String = s("message").chars().take(200).collect();
    format!("{} {} {msg}", s("type"), s("code"))
}
