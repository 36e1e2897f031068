//! Delivering threshold alerts (`alerts:` in tollgate.yaml): each
//! `usage.threshold_reached` event the spool holds is POSTed to the alert
//! webhook, signed per the Standard Webhooks specification, with the
//! discipline of the usage sinks: network errors, 429 and 5xx are retried
//! with backoff and jitter, any other 4xx goes to `dead-alerts.jsonl` with
//! its reason, and nothing is settled before the receiver said so.
//!
//! The body (Standard Webhooks' recommended shape):
//! `{"type": "usage.threshold_reached", "timestamp", "data": {customer,
//! plan, policy, percent, used, limit, period_start, period_end}}`, under a
//! `webhook-id` fixed by customer, policy, percent and period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tollgate_core::alerts::{Alert, AlertKey, Thresholds};
use tollgate_core::diag::Check;

use crate::billing::{http_client, post, signed, webhook_key, worth_logging, Outcome, Retries};
use crate::spool::Spool;

/// What `tollgate billing status | replay` and `POST /admin/billing/replay`
/// call the alert webhook, beside the sinks.
pub const ALERTS: &str = "alerts";

/// `alerts:` as validated.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    pub at: Thresholds,
    pub url: String,
    /// `whsec_…`, from `webhook.secret_env`.
    pub secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    at: Vec<i64>,
    webhook: RawAlertWebhook,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlertWebhook {
    url: String,
    secret_env: String,
}

/// The largest `at` percent: a quota's `remaining` stops at 0, so how far
/// past it overage went is not known.
pub const MAX_PERCENT: i64 = 100;

impl AlertConfig {
    /// `alerts: { at: [80, 100], webhook: { url, secret_env } }`.
    pub fn parse(cx: &mut Check<'_>, value: &serde_yaml::Value) -> Option<Self> {
        let r: RawAlerts = cx.typed("alerts", value)?;
        if r.at.is_empty() {
            cx.err(
                "alerts.at",
                "`at` needs at least one percent",
                Some("e.g. at: [80, 100]"),
            );
        }
        let mut at = Vec::new();
        for (i, p) in r.at.iter().enumerate() {
            match u16::try_from(*p) {
                Ok(p) if (1..=MAX_PERCENT).contains(&i64::from(p)) => at.push(p),
                _ => cx.err(
                    &format!("alerts.at[{i}]"),
                    format!("`{p}` is not a percent from 1 to {MAX_PERCENT}"),
                    None,
                ),
            }
        }
        cx.http_url("alerts.webhook.url", &r.webhook.url);
        let secret = cx.secret("alerts.webhook.secret_env", &r.webhook.secret_env)?;
        Some(AlertConfig {
            at: Thresholds::new(at),
            url: r.webhook.url,
            secret,
        })
    }
}

/// Posts alerts to the webhook.
pub struct AlertWebhook {
    url: String,
    key: Vec<u8>,
    client: reqwest::Client,
}

impl AlertWebhook {
    pub fn new(cfg: &AlertConfig, timeout: Duration) -> Self {
        Self {
            url: cfg.url.clone(),
            key: webhook_key(&cfg.secret),
            client: http_client(timeout),
        }
    }

    async fn send(&self, alert: &Alert) -> Outcome {
        let body = alert.event().to_string();
        let req = signed(&self.client, &self.url, &self.key, &alert.id(), body);
        post(req, 1)
            .await
            .2
            .pop()
            .unwrap_or(Outcome::Retry("no answer".into()))
    }
}

/// Delivers the spool's alerts until `stop` resolves.
pub async fn deliver_alerts(
    hook: Arc<AlertWebhook>,
    spool: Arc<Spool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let retries: Retries<AlertKey> = Retries::new();
    loop {
        let now = Instant::now();
        let due = spool.alerts_due(16, |a| retries.ready(&a.key(), now));
        let outcomes = futures_util::future::join_all(due.iter().map(|a| hook.send(a))).await;
        let mut settle = Vec::new();
        for (alert, outcome) in due.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => {
                    count("delivered");
                    settle.push((alert.clone(), None));
                }
                Outcome::Dead(why) => {
                    count("dead_letter");
                    log::error!(
                        "alert webhook refused the {}% alert of `{}` for {}: {why}; written to dead-alerts.jsonl",
                        alert.percent, alert.policy, alert.customer
                    );
                    settle.push((alert.clone(), Some(why)));
                }
                Outcome::Retry(why) => {
                    count("retry");
                    let attempts = retries.failed(alert.key());
                    if worth_logging(attempts) {
                        log::warn!(
                            "alert webhook: the {}% alert of `{}` for {} will be retried (attempt {attempts}): {why}",
                            alert.percent, alert.policy, alert.customer
                        );
                    }
                }
            }
        }
        if !settle.is_empty() {
            let keys: Vec<AlertKey> = settle.iter().map(|(a, _)| a.key()).collect();
            retries.settled(&keys);
            let sp = spool.clone();
            // Settled in memory even if the disk fails: never sent again by
            // this process.
            let _ = tokio::task::spawn_blocking(move || sp.settle_alerts(&settle)).await;
        }
        if *stop.borrow() {
            return;
        }
        if due.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

fn count(result: &str) {
    tollgate_core::metrics::ALERTS
        .with_label_values(&[result])
        .inc();
}
