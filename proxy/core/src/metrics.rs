//! Prometheus metrics, registered in the default registry that
//! `pingora-prometheus` serves (we use its re-exported `prometheus` so both
//! agree on the crate version). No per-key or per-customer labels.

use std::sync::LazyLock;

pub use ::prometheus as registry;
use prometheus::{
    self, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts,
};

// Metric names and label sets are constants: building them only fails on a
// programming error, which the unit test below catches. Registration can only
// fail on a duplicate name; the metric still works, unexported.
#[allow(clippy::expect_used)]
fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("constant metric definition");
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

#[allow(clippy::expect_used)]
fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("constant metric definition");
    let _ = prometheus::register(Box::new(g.clone()));
    g
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

#[allow(clippy::expect_used)]
fn histogram(name: &str, help: &str) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        .expect("constant metric definition");
    let _ = prometheus::register(Box::new(h.clone()));
    h
}

#[allow(clippy::expect_used)]
fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("constant metric definition");
    let _ = prometheus::register(Box::new(h.clone()));
    h
}

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_requests_total",
        "Requests by plan and outcome",
        &["plan", "outcome"],
    )
});
pub static REQUEST_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tollgate_request_duration_seconds",
        "Time from request to the end of the response",
    )
});
pub static UPSTREAM_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tollgate_upstream_duration_seconds",
        "Time from request to upstream response header",
    )
});
pub static LIMITER_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram_vec(
        "tollgate_limiter_duration_seconds",
        "Time taken by a limiter decision",
        &["backend"],
    )
});
pub static LIMITER_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_limiter_errors_total",
        "Limiter store errors",
        &["backend"],
    )
});
pub static LIMITER_FALLBACK: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_limiter_fallback_total",
        "Decisions taken by redis.on_error because Redis could not answer",
        &["policy"],
    )
});
pub static NEAR_LIMIT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_near_limit_total",
        "Admitted requests that left a policy at or above 80% used",
        &["plan", "policy"],
    )
});
pub static USAGE_UNITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_usage_units_total",
        "Billable units recorded",
        &["meter"],
    )
});
pub static SPOOL_BYTES: LazyLock<IntGauge> =
    LazyLock::new(|| int_gauge("tollgate_spool_bytes", "Bytes in the usage spool"));
pub static BILLING_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_billing_events_total",
        "Usage records sent to billing sinks, by result",
        &["sink", "result"],
    )
});
pub static BILLING_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "tollgate_billing_pending_units",
        "Units recorded but not yet delivered to the sink",
        &["sink"],
    )
});
pub static BILLING_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "tollgate_billing_lag_seconds",
        "Age of the oldest usage not yet delivered to the sink",
        &["sink"],
    )
});
pub static SPOOL_REJECTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_spool_rejected_total",
        "Billable requests refused because the usage spool is full",
        &["plan"],
    )
});
pub static KEYS: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge("tollgate_keys", "Keys in the store by status", &["status"]));
pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_config_reloads_total",
        "Key store and config reloads",
        &["result"],
    )
});

pub static CLIENT_DISCONNECTS: LazyLock<IntCounter> = LazyLock::new(|| {
    int_counter(
        "tollgate_client_disconnects_total",
        "Connections the client closed before its request head was read",
    )
});

pub static SPOOL_WRITE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    int_counter(
        "tollgate_spool_write_errors_total",
        "Usage spool appends that failed (a full or read-only disk)",
    )
});

pub static CONNECTIONS_REFUSED: LazyLock<IntCounter> = LazyLock::new(|| {
    int_counter(
        "tollgate_connections_refused_total",
        "Connections closed at accept because connections.max were open",
    )
});

pub static WEBHOOK_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_webhook_events_total",
        "Billing webhook deliveries by provider and result (applied, duplicate, stale, ignored, rejected)",
        &["provider", "result"],
    )
});

pub static PLAN_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_plan_changes_total",
        "Customer plan or suspension changes made by a billing provider's webhooks, by provider",
        &["source"],
    )
});

pub static CHECKOUT_SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_billing_sessions_total",
        "Checkout and billing-portal sessions consumers asked for, by kind and result",
        &["kind", "result"],
    )
});

pub static JWKS_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_jwks_fetches_total",
        "JWK set fetches of jwks_url issuers by result (a failure keeps the last good set)",
        &["issuer", "result"],
    )
});

/// Why a `usage:` route's response was billed its fallback `cost`.
pub const BODY_FALLBACK_REASONS: [&str; 4] = ["missing", "too_large", "unreadable", "abandoned"];

pub static BODY_FALLBACK: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "tollgate_usage_body_fallback_total",
        "Responses of usage: routes billed the route's cost because the body reported no usage (missing, too_large, unreadable, or abandoned before it did)",
        &["reason"],
    )
});

pub static JWKS_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "tollgate_jwks_keys",
        "Usable keys in each JWT issuer's current key set",
        &["issuer"],
    )
});

pub static ACCESS_LOG_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    int_counter(
        "tollgate_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind (a slow disk); requests are never held for it",
    )
});

pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "tollgate_build_info",
        "Always 1; the running version",
        &["version"],
    )
});

pub static CONFIG_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge(
        "tollgate_config_info",
        "Always 1; the version (a hash) of the config and plans in force",
        &["version"],
    )
});

pub static SPOOL_MAX_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    int_gauge(
        "tollgate_spool_max_bytes",
        "The usage spool's bound (metering.max_spool_mb): alert on spool_bytes near it",
    )
});

pub static ADDED_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    histogram(
        "tollgate_added_duration_seconds",
        "Time Tollgate added to a proxied request: its whole time minus the upstream's",
    )
});

/// The `result` label values of `tollgate_alerts_total`.
pub const ALERT_RESULTS: &[&str] = &["raised", "delivered", "retry", "dead_letter"];

pub static ALERTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = counter(
        "tollgate_alerts_total",
        "Usage threshold alerts (alerts.at) raised, and their webhook deliveries by result",
        &["result"],
    );
    for r in ALERT_RESULTS {
        c.with_label_values(&[r]);
    }
    c
});

/// The `result` label values of `tollgate_webhook_events_total`.
pub const WEBHOOK_RESULTS: &[&str] = &["applied", "duplicate", "stale", "ignored", "rejected"];

/// Registers every metric so `/metrics` lists them from the start.
pub fn init() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_DURATION);
    LazyLock::force(&LIMITER_DURATION);
    LazyLock::force(&LIMITER_ERRORS);
    LazyLock::force(&LIMITER_FALLBACK);
    LazyLock::force(&NEAR_LIMIT);
    LazyLock::force(&USAGE_UNITS);
    LazyLock::force(&KEYS);
    LazyLock::force(&CONFIG_RELOADS);
    LazyLock::force(&SPOOL_BYTES);
    LazyLock::force(&BILLING_EVENTS);
    LazyLock::force(&BILLING_PENDING);
    LazyLock::force(&BILLING_LAG);
    LazyLock::force(&SPOOL_REJECTED);
    LazyLock::force(&CLIENT_DISCONNECTS);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&SPOOL_WRITE_ERRORS);
    LazyLock::force(&WEBHOOK_EVENTS);
    LazyLock::force(&PLAN_CHANGES);
    LazyLock::force(&CHECKOUT_SESSIONS);
    LazyLock::force(&JWKS_FETCHES);
    LazyLock::force(&JWKS_KEYS);
    LazyLock::force(&ACCESS_LOG_DROPPED);
    LazyLock::force(&SPOOL_MAX_BYTES);
    LazyLock::force(&ADDED_DURATION);
    LazyLock::force(&ALERTS);
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
}

/// The `outcome` label values of `tollgate_requests_total`.
pub const OUTCOMES: &[&str] = &[
    "allowed",
    "unauthenticated",
    "forbidden",
    "limited",
    "unavailable",
    "upstream_error",
    "bad_request",
    "preflight",
    "client_closed",
    "error",
];

/// Creates every series whose labels are known from the config at 0, so
/// `increase()` and `rate()` alerts see the first event too.
pub fn expose(
    plans: &crate::plans::Plans,
    sinks: &[&str],
    limiter: &str,
    on_error: Option<&str>,
    webhooks: &[&str],
) {
    let mut meters = std::collections::BTreeSet::new();
    for plan in plans.plans.values() {
        let name: &str = &plan.name;
        for outcome in OUTCOMES {
            REQUESTS.with_label_values(&[name, outcome]);
        }
        SPOOL_REJECTED.with_label_values(&[name]);
        for l in &plan.limits {
            NEAR_LIMIT.with_label_values(&[name, &l.name]);
            meters.extend(l.overage_meter.clone());
        }
        meters.extend(plan.meter.clone());
    }
    for outcome in OUTCOMES {
        REQUESTS.with_label_values(&["none", outcome]);
    }
    meters.extend(plans.routes.iter().filter_map(|r| r.meter.clone()));
    meters.extend(
        plans
            .routes
            .iter()
            .filter_map(|r| r.usage.as_ref())
            .flat_map(|f| f.meters()),
    );
    if plans.routes.iter().any(|r| r.usage.is_some()) {
        for reason in BODY_FALLBACK_REASONS {
            BODY_FALLBACK.with_label_values(&[reason]);
        }
    }
    for m in &meters {
        USAGE_UNITS.with_label_values(&[m]);
    }
    for sink in sinks {
        for result in ["delivered", "retry", "dead_letter"] {
            BILLING_EVENTS.with_label_values(&[sink, result]);
        }
    }
    LIMITER_DURATION.with_label_values(&[limiter]);
    if let Some(policy) = on_error {
        LIMITER_ERRORS.with_label_values(&[limiter]);
        LIMITER_FALLBACK.with_label_values(&[policy]);
    }
    for result in ["success", "error"] {
        CONFIG_RELOADS.with_label_values(&[result]);
    }
    for provider in webhooks {
        for result in WEBHOOK_RESULTS {
            WEBHOOK_EVENTS.with_label_values(&[provider, result]);
        }
        PLAN_CHANGES.with_label_values(&[provider]);
    }
}

#[allow(clippy::expect_used)]
fn int_counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("constant metric definition");
    let _ = prometheus::register(Box::new(c.clone()));
    c
}

#[allow(clippy::expect_used)]
fn int_gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("constant metric definition");
    let _ = prometheus::register(Box::new(g.clone()));
    g
}

pub fn usage_units(meter: &str, units: u64) {
    USAGE_UNITS.with_label_values(&[meter]).inc_by(units);
}

/// The Prometheus text exposition of the default registry.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_series_are_exported_at_zero_from_the_start() {
        let plans = crate::plans::Plans::parse(&crate::diag::Source::new(
            std::path::Path::new("plans.yaml"),
            "default_plan: gold\nplans:\n  gold:\n    meter: calls\n    limits:\n      - { name: daily, requests: 5, per: day }\n".into(),
        ))
        .unwrap();
        super::expose(&plans, &["stripe"], "redis", Some("local"), &["paddle"]);
        let text = String::from_utf8(super::render()).unwrap();
        // Other tests of this process may have counted some already: each
        // series must be there, whatever its value.
        for series in [
            "tollgate_requests_total{outcome=\"limited\",plan=\"gold\"} ",
            "tollgate_near_limit_total{plan=\"gold\",policy=\"daily\"} ",
            "tollgate_usage_units_total{meter=\"calls\"} ",
            "tollgate_billing_events_total{result=\"dead_letter\",sink=\"stripe\"} ",
            "tollgate_limiter_fallback_total{policy=\"local\"} ",
            "tollgate_config_reloads_total{result=\"error\"} ",
            "tollgate_webhook_events_total{provider=\"paddle\",result=\"rejected\"} ",
            "tollgate_plan_changes_total{source=\"paddle\"} ",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn every_metric_is_exported_with_the_spec_name() {
        super::init();
        super::REQUESTS
            .with_label_values(&["free", "allowed"])
            .inc();
        super::KEYS.with_label_values(&["active"]).set(1);
        let text = String::from_utf8(super::render()).unwrap();
        for name in [
            "tollgate_requests_total",
            "tollgate_request_duration_seconds",
            "tollgate_upstream_duration_seconds",
            "tollgate_keys",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
