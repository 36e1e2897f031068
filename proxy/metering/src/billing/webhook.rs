//! A JSON batch signed per the Standard Webhooks specification.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

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

type HmacSha256 = Hmac<Sha256>;

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` per the
/// Standard Webhooks spec.
pub fn standard_webhooks_signature(key: &[u8], id: &str, timestamp: u64, body: &str) -> String {
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// The key of a `whsec_<base64>` secret (a secret without the prefix is
/// decoded as base64 too, falling back to its bytes).
pub fn webhook_key(secret: &str) -> Vec<u8> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

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
        let ts = tollgate_core::clock::SystemClock.now_ms() / 1000;
        let req = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                standard_webhooks_signature(&self.key, &id, ts, &body),
            )
            .body(body);
        post(req, records.len()).await.2
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature_matches_the_published_test_vector() {
        // From the Standard Webhooks specification's reference test vector
        // (standard-webhooks/standard-webhooks, spec/standard-webhooks.md and
        // the libraries' tests).
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let sig = standard_webhooks_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
