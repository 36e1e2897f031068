//! A JSON batch signed per the Standard Webhooks specification.

use std::time::Duration;

use async_trait::async_trait;

use tollgate_core::clock::{rfc3339, Clock};
use tollgate_core::diag::Check;

use super::{http_client, post, Outcome, Sink, SinkConfig};
use crate::spool::Record;

// ---- Standard Webhooks ---------------------------------------------------------------

pub struct Webhook {
    pub name: String,
    pub url: String,
    /// The raw HMAC key (the base64 part of `whsec_…`, decoded).
    key: Vec<u8>,
    client: reqwest::Client,
}

pub use tollgate_core::lifecycle::signature::{standard_webhooks_signature, webhook_key};

impl Webhook {
    pub fn new(name: String, url: String, secret: &str, timeout: Duration) -> Self {
        Self {
            name,
            url,
            key: webhook_key(secret),
            client: http_client(timeout),
        }
    }
}

#[async_trait]
impl Sink for Webhook {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn send(&self, records: &[Record]) -> Vec<Outcome> {
        let items: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "identifier": r.identifier,
                    "customer": &*r.customer,
                    "meter": &*r.meter,
                    "units": r.units,
                    "window_start": rfc3339(r.window_start),
                })
            })
            .collect();
        let body = serde_json::json!({ "type": "usage.recorded", "records": items }).to_string();
        // The same batch always has the same message id, so a receiver can
        // deduplicate redeliveries; each record also carries its identifier.
        let joined: Vec<&str> = records.iter().map(|r| r.identifier.as_str()).collect();
        let id = format!(
            "msg_{}",
            &hex::encode(tollgate_core::keys::hash(&joined.join(",")))[..24]
        );
        let req = signed(&self.client, &self.url, &self.key, &id, body);
        post(req, records.len()).await.2
    }
}

/// A POST of `body` (JSON) under message id `id`, signed per Standard
/// Webhooks with `key` and the current time.
pub(crate) fn signed(
    client: &reqwest::Client,
    url: &str,
    key: &[u8],
    id: &str,
    body: String,
) -> reqwest::RequestBuilder {
    let ts = tollgate_core::clock::SystemClock.now_ms() / 1000;
    client
        .post(url)
        .header("Content-Type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            standard_webhooks_signature(key, id, ts, &body),
        )
        .body(body)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Option<String>,
    url: String,
    secret_env: String,
}

/// `- webhook: { url, secret_env, name }`.
pub(super) fn parse_config(
    cx: &mut Check<'_>,
    p: &str,
    body: &serde_yaml::Value,
) -> Option<SinkConfig> {
    let r: RawWebhook = cx.typed(p, body)?;
    cx.http_url(&format!("{p}.url"), &r.url);
    let secret = cx.secret(&format!("{p}.secret_env"), &r.secret_env)?;
    Some(SinkConfig::Webhook {
        name: r.name.unwrap_or_else(|| "webhook".into()),
        url: r.url,
        secret,
    })
}
