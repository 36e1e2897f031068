//! Lago: `POST /api/v1/events/batch`.

use std::time::Duration;

use async_trait::async_trait;

use tollgate_core::diag::Check;

use super::{http_client, post, Outcome, Sink, SinkConfig};
use crate::spool::Record;

// ---- Lago ------------------------------------------------------------------------

pub struct Lago {
    pub name: String,
    pub url: String,
    pub api_key: String,
    client: reqwest::Client,
}

impl Lago {
    pub fn new(name: String, url: String, api_key: String, timeout: Duration) -> Self {
        Self {
            name,
            url,
            api_key,
            client: http_client(timeout),
        }
    }

    pub fn body(records: &[Record]) -> String {
        let events: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "transaction_id": r.identifier,
                    "external_subscription_id": &*r.customer,
                    "code": &*r.meter,
                    "timestamp": r.window_start / 1000,
                    "properties": { "value": r.units },
                })
            })
            .collect();
        serde_json::json!({ "events": events }).to_string()
    }
}

#[async_trait]
impl Sink for Lago {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn send(&self, records: &[Record]) -> Vec<Outcome> {
        let n = records.len();
        let req = self
            .client
            .post(format!("{}/api/v1/events/batch", self.url))
            .bearer_auth(&self.api_key)
            .header("Content-Type", "application/json")
            .body(Self::body(records));
        let (status, body, out) = post(req, n).await;
        if status.is_none_or(|s| s.as_u16() != 422) {
            return out;
        }
        // A batch is all or nothing. Events Lago already has (a retry after
        // a lost answer) count as delivered; events with other errors are
        // dead; the rest are sent again.
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let details = &v["error_details"];
        (0..n)
            .map(|i| match details.get(i.to_string()) {
                None => Outcome::Retry("batch refused for other events".into()),
                Some(e) => {
                    let dup = e["transaction_id"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "value_already_exist"));
                    let other = e
                        .as_object()
                        .is_some_and(|o| o.keys().any(|k| k != "transaction_id"));
                    if dup && !other {
                        Outcome::Delivered
                    } else {
                        Outcome::Dead(format!("HTTP 422: {e}"))
                    }
                }
            })
            .collect()
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLago {
    name: Option<String>,
    url: String,
    api_key_env: String,
}

/// `- lago: { url, api_key_env, name }`.
pub(super) fn parse_config(
    cx: &mut Check<'_>,
    p: &str,
    body: &serde_yaml::Value,
) -> Option<SinkConfig> {
    let r: RawLago = cx.typed(p, body)?;
    cx.http_url(&format!("{p}.url"), &r.url);
    let api_key = cx.secret(&format!("{p}.api_key_env"), &r.api_key_env)?;
    Some(SinkConfig::Lago {
        name: r.name.unwrap_or_else(|| "lago".into()),
        url: r.url.trim_end_matches('/').to_owned(),
        api_key,
    })
}
