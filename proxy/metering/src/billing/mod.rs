//! Delivering spooled usage records to billing providers. Each sink has its
//! own loop and its own settled-set in the spool, so a slow or dead provider
//! never holds up another. Retries use exponential backoff with jitter on
//! network errors, 429 and 5xx; any other 4xx sends the record to the sink's
//! dead-letter file with a log line and a metric, never retried forever and
//! never dropped silently.
//!
//! Wire formats (each test's mock server cites its source):
//! - Stripe Billing Meters v1: `POST /v1/billing/meter_events`, form-encoded
//!   as the official SDKs send it;
//! - Stripe v2 meter event stream: session from
//!   `POST /v2/billing/meter_event_session`, then up to 100 events per
//!   `POST /v2/billing/meter_event_stream` on the meter-events host;
//! - OpenMeter: CloudEvents batch (`application/cloudevents-batch+json`);
//! - Lago: `POST /api/v1/events/batch`;
//! - webhook: JSON batches signed per the Standard Webhooks spec.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::spool::Record;

pub mod checkout;
pub mod config;
mod deliver;
mod lago;
mod openmeter;
mod stripe;
mod webhook;

pub use config::SinkConfig;
pub use deliver::{backoff, deliver};
pub(crate) use deliver::{worth_logging, Retries};
pub use lago::Lago;
pub use openmeter::OpenMeter;
pub use stripe::{StripeV1, StripeV2, STRIPE_VERSION};
pub(crate) use webhook::signed;
pub use webhook::{standard_webhooks_signature, webhook_key, Webhook};

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (network, 429, 5xx).
    Retry(String),
    /// Never going to work (4xx): dead-letter it.
    Dead(String),
}

#[async_trait]
pub trait Sink: Send + Sync {
    fn name(&self) -> &str;
    /// Records per request.
    fn max_batch(&self) -> usize;
    /// At most one request in flight per (customer, meter) (Stripe v1's rule).
    fn one_in_flight_per_meter(&self) -> bool {
        false
    }
    /// One outcome per record, in order.
    async fn send(&self, records: &[Record]) -> Vec<Outcome>;
}

/// A client whose requests give up after `timeout` (connecting: at most 5 s).
pub(crate) fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .build()
        .unwrap_or_default()
}

/// Maps an HTTP status to the outcome of every record in the request.
pub(crate) fn by_status(status: reqwest::StatusCode, body: &str) -> Outcome {
    if status.is_success() {
        Outcome::Delivered
    } else if status.is_server_error()
        || matches!(status.as_u16(), 401 | 403 | 404 | 408 | 409 | 429)
    {
        // 401/403/404: a wrong key or URL is fixed by the operator, and the
        // usage must still be there when it is; 409: Stripe's idempotency
        // or lock conflicts, which it says to retry.
        Outcome::Retry(format!("HTTP {status}"))
    } else {
        let body: String = body.chars().take(300).collect();
        Outcome::Dead(format!("HTTP {status}: {body}"))
    }
}

pub(crate) async fn post(
    req: reqwest::RequestBuilder,
    n: usize,
) -> (Option<reqwest::StatusCode>, String, Vec<Outcome>) {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let o = by_status(status, &body);
            (Some(status), body, vec![o; n])
        }
        Err(e) => (
            None,
            String::new(),
            vec![Outcome::Retry(format!("network: {e}")); n],
        ),
    }
}

pub(crate) fn form_encode(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&pct(k));
        out.push('=');
        out.push_str(&pct(v));
    }
    out
}

/// application/x-www-form-urlencoded escaping (brackets included, as the SDKs do).
fn pct(s: &str) -> String {
    tollgate_core::pct::encode(s, tollgate_core::pct::unreserved)
}

/// The sink a config entry describes.
/// `timeout`: how long one request to the provider may take before it is
/// retried (`metering.sink_timeout`).
pub fn build(cfg: &SinkConfig, timeout: Duration) -> Arc<dyn Sink> {
    use SinkConfig as C;
    match cfg.clone() {
        C::Stripe {
            name,
            v2: false,
            base_url,
            api_key,
            version,
            ..
        } => Arc::new(StripeV1::new(name, base_url, api_key, version, timeout)),
        C::Stripe {
            name,
            v2: true,
            base_url,
            stream_url,
            api_key,
            version,
        } => Arc::new(StripeV2::new(
            name, base_url, stream_url, api_key, version, timeout,
        )),
        C::OpenMeter {
            name,
            url,
            token,
            source,
        } => Arc::new(OpenMeter::new(name, url, token, source, timeout)),
        C::Lago { name, url, api_key } => Arc::new(Lago::new(name, url, api_key, timeout)),
        C::Webhook { name, url, secret } => Arc::new(Webhook::new(name, url, &secret, timeout)),
    }
}
