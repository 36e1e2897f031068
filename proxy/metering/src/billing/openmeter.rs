//! OpenMeter: a CloudEvents batch.

use std::time::Duration;

use async_trait::async_trait;

use tollgate_core::clock::rfc3339;
use tollgate_core::diag::Check;

use super::{http_client, post, Outcome, Sink, SinkConfig};
use crate::spool::Record;

// ---- OpenMeter ---------------------------------------------------------------------

pub struct OpenMeter {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
    pub source: String,
    client: reqwest::Client,
}

impl OpenMeter {
    pub fn new(
        name: String,
        url: String,
        token: Option<String>,
        source: String,
        timeout: Duration,
    ) -> Self {
        Self {
            name,
            url,
            token,
            source,
            client: http_client(timeout),
        }
    }

    /// CloudEvents 1.0, one per record.
    pub fn body(&self, records: &[Record]) -> String {
        let events: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "specversion": "1.0",
                    "id": r.identifier,
                    "source": self.source,
                    "type": &*r.meter,
                    "subject": &*r.customer,
                    "time": rfc3339(r.window_start),
                    "datacontenttype": "application/json",
                    "data": { "value": r.units },
                })
            })
            .collect();
        serde_json::Value::from(events).to_string()
    }
}

#[async_trait]
impl Sink for OpenMeter {
    fn name(&self) -> &str {
        &self.name
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn send(&self, records: &[Record]) -> Vec<Outcome> {
        let mut req = self
            .client
            .post(format!("{}/api/v1/events", self.url))
            .header("Content-Type", "application/cloudevents-batch+json")
            .body(self.body(records));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        post(req, records.len()).await.2
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenMeter {
    name: Option<String>,
    url: String,
    token_env: Option<String>,
    source: Option<String>,
}

/// `- openmeter: { url, token_env, source, name }`.
pub(super) fn parse_config(
    cx: &mut Check<'_>,
    p: &str,
    body: &serde_yaml::Value,
) -> Option<SinkConfig> {
    let r: RawOpenMeter = cx.typed(p, body)?;
    cx.http_url(&format!("{p}.url"), &r.url);
    let token = match &r.token_env {
        Some(var) => Some(cx.secret(&format!("{p}.token_env"), var)?),
        None => None,
    };
    Some(SinkConfig::OpenMeter {
        name: r.name.unwrap_or_else(|| "openmeter".into()),
        url: r.url.trim_end_matches('/').to_owned(),
        token,
        source: r.source.unwrap_or_else(|| "tollgate".into()),
    })
}
