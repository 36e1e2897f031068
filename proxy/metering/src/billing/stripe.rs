//! Stripe Billing Meters: v1 meter events, and the v2 meter event stream.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use tollgate_core::clock::{rfc3339, Clock};
use tollgate_core::diag::Check;

use super::{by_status, form_encode, http_client, post, Outcome, Sink, SinkConfig};
use crate::spool::Record;

// ---- Stripe v1 -----------------------------------------------------------------

/// The Stripe API version Tollgate pins (overridable with `stripe_version`).
pub const STRIPE_VERSION: &str = "2024-09-30.acacia";

pub struct StripeV1 {
    pub name: String,
    pub base_url: String,
    pub api_key: String,
    pub version: String,
    client: reqwest::Client,
    /// ~1000 requests/second overall: the earliest time of the next request.
    pace: tokio::sync::Mutex<Instant>,
}

impl StripeV1 {
    pub fn new(
        name: String,
        base_url: String,
        api_key: String,
        version: String,
        timeout: Duration,
    ) -> Self {
        Self {
            name,
            base_url,
            api_key,
            version,
            client: http_client(timeout),
            pace: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// The form body Stripe's SDKs send for `billing.meter_events.create`.
    pub fn form(r: &Record) -> String {
        let units = r.units.to_string();
        let ts = (r.window_start / 1000).to_string();
        form_encode(&[
            ("event_name", &r.meter),
            ("payload[stripe_customer_id]", &r.customer),
            ("payload[value]", &units),
            ("identifier", &r.identifier),
            ("timestamp", &ts),
        ])
    }
}

#[async_trait]
impl Sink for StripeV1 {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        1
    }
    fn one_in_flight_per_meter(&self) -> bool {
        true
    }
    async fn send(&self, records: &[Record]) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            {
                let mut next = self.pace.lock().await;
                let now = Instant::now();
                if *next > now {
                    tokio::time::sleep(*next - now).await;
                }
                *next = Instant::now().max(*next) + Duration::from_millis(1);
            }
            let req = self
                .client
                .post(format!("{}/v1/billing/meter_events", self.base_url))
                .bearer_auth(&self.api_key)
                .header("Stripe-Version", &self.version)
                .header("Idempotency-Key", &r.identifier)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(Self::form(r));
            let (status, body, mut o) = post(req, 1).await;
            // A retry after Stripe's 24 h idempotency window finds the event
            // already recorded under its identifier: that is a delivery.
            if status.is_some_and(|s| s.as_u16() == 400) && body.contains("already exists") {
                o = vec![Outcome::Delivered];
            }
            out.extend(o);
        }
        out
    }
}

// ---- Stripe v2 meter event stream ----------------------------------------------

pub struct StripeV2 {
    pub name: String,
    pub base_url: String,
    pub stream_url: String,
    pub api_key: String,
    pub version: String,
    client: reqwest::Client,
    /// (token, refresh after)
    session: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl StripeV2 {
    pub fn new(
        name: String,
        base_url: String,
        stream_url: String,
        api_key: String,
        version: String,
        timeout: Duration,
    ) -> Self {
        Self {
            name,
            base_url,
            stream_url,
            api_key,
            version,
            client: http_client(timeout),
            session: tokio::sync::Mutex::new(None),
        }
    }

    async fn token(&self, force: bool) -> Result<String, Outcome> {
        let mut s = self.session.lock().await;
        if let (Some((t, until)), false) = (s.as_ref(), force) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let resp = self
            .client
            .post(format!("{}/v2/billing/meter_event_session", self.base_url))
            .bearer_auth(&self.api_key)
            .header("Stripe-Version", &self.version)
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await
            .map_err(|e| Outcome::Retry(format!("session: {e}")))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(by_status(status, &body));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| Outcome::Retry(format!("session: {e}")))?;
        let token = v["authentication_token"]
            .as_str()
            .ok_or_else(|| Outcome::Retry("session: no token".into()))?
            .to_owned();
        // Refresh a minute before expiry (tokens live 15 minutes).
        let ttl = v["expires_at"]
            .as_str()
            .and_then(parse_rfc3339_any)
            .map(|exp| exp.saturating_sub(tollgate_core::clock::SystemClock.now_ms()))
            .unwrap_or(15 * 60_000);
        let refresh = Duration::from_millis(ttl.saturating_sub(60_000).max(1_000));
        *s = Some((token.clone(), Instant::now() + refresh));
        Ok(token)
    }

    fn body(records: &[Record]) -> String {
        let events: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "event_name": &*r.meter,
                    "identifier": r.identifier,
                    "payload": { "stripe_customer_id": &*r.customer, "value": r.units.to_string() },
                    "timestamp": rfc3339(r.window_start),
                })
            })
            .collect();
        serde_json::json!({ "events": events }).to_string()
    }
}

/// RFC 3339 with optional fractional seconds (`2024-10-01T12:00:00.000Z`).
fn parse_rfc3339_any(s: &str) -> Option<u64> {
    let trimmed = match s.find('.') {
        Some(i) => format!("{}Z", &s[..i]),
        None => s.to_owned(),
    };
    tollgate_core::clock::parse_rfc3339(&trimmed)
}

#[async_trait]
impl Sink for StripeV2 {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn send(&self, records: &[Record]) -> Vec<Outcome> {
        let n = records.len();
        let body = Self::body(records);
        for attempt in 0..2 {
            let token = match self.token(attempt > 0).await {
                Ok(t) => t,
                Err(o) => return vec![o; n],
            };
            let req = self
                .client
                .post(format!("{}/v2/billing/meter_event_stream", self.stream_url))
                .bearer_auth(&token)
                .header("Stripe-Version", &self.version)
                .header("Content-Type", "application/json")
                .body(body.clone());
            let (status, _, out) = post(req, n).await;
            // An expired or revoked session: get a new one and try once more.
            if status.is_some_and(|s| s.as_u16() == 401) && attempt == 0 {
                continue;
            }
            return out;
        }
        vec![Outcome::Retry("session refused twice".into()); n]
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStripe {
    name: Option<String>,
    api_key_env: String,
    api: Option<String>,
    base_url: Option<String>,
    stream_url: Option<String>,
    version: Option<String>,
}

/// `- stripe: { api_key_env, api: v1|v2, base_url, stream_url, version, name }`.
pub(super) fn parse_config(
    cx: &mut Check<'_>,
    p: &str,
    body: &serde_yaml::Value,
) -> Option<SinkConfig> {
    let r: RawStripe = cx.typed(p, body)?;
    let v2 = match r.api.as_deref() {
        None | Some("v1") => false,
        Some("v2") => true,
        Some(other) => {
            cx.err(
                &format!("{p}.api"),
                format!("unknown Stripe API `{other}`"),
                Some("v1 (meter events) or v2 (meter event stream, for high volume)"),
            );
            false
        }
    };
    let base_url = r
        .base_url
        .unwrap_or_else(|| "https://api.stripe.com".into());
    let stream_url = r
        .stream_url
        .unwrap_or_else(|| "https://meter-events.stripe.com".into());
    cx.http_url(&format!("{p}.base_url"), &base_url);
    cx.http_url(&format!("{p}.stream_url"), &stream_url);
    let api_key = cx.secret(&format!("{p}.api_key_env"), &r.api_key_env)?;
    Some(SinkConfig::Stripe {
        name: r.name.unwrap_or_else(|| "stripe".into()),
        v2,
        base_url: base_url.trim_end_matches('/').to_owned(),
        stream_url: stream_url.trim_end_matches('/').to_owned(),
        api_key,
        version: r.version.unwrap_or_else(|| STRIPE_VERSION.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_form_matches_the_sdk_encoding() {
        let r = Record {
            rseq: 7,
            upto: 9,
            window_start: 1_727_740_800_000,
            customer: "cus_NciAYcXfLnqBoz".into(),
            meter: "api_requests".into(),
            units: 42,
            identifier: "tg-abc-7".into(),
            only: None,
        };
        assert_eq!(
            StripeV1::form(&r),
            "event_name=api_requests&payload%5Bstripe_customer_id%5D=cus_NciAYcXfLnqBoz&payload%5Bvalue%5D=42&identifier=tg-abc-7&timestamp=1727740800"
        );
    }
}
