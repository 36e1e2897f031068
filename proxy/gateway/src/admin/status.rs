//! The status page on the admin port's `/`: one self-contained HTML page,
//! rendered on the server and refreshing itself, from the metrics this
//! process exports and a short history of them (sampled every 5 s, the
//! last 5 minutes kept).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;
use tollgate_core::metrics::registry as prometheus;

use super::html;
use crate::app::App;

/// How often the history is sampled, and how much of it is kept.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const KEEP: usize = 60;

/// One look at the counters.
#[derive(Clone)]
struct Sample {
    at: Instant,
    by_outcome: BTreeMap<String, f64>,
    by_plan: BTreeMap<String, f64>,
    added: Vec<(f64, f64)>,
    upstream: Vec<(f64, f64)>,
}

/// The history the page draws from.
#[derive(Default)]
pub struct History(std::sync::Mutex<VecDeque<Sample>>);

fn families() -> BTreeMap<String, MetricFamily> {
    prometheus::gather()
        .into_iter()
        .map(|f| (f.name().to_owned(), f))
        .collect()
}

fn label<'a>(m: &'a prometheus::proto::Metric, name: &str) -> &'a str {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map_or("", |l| l.value())
}

fn counter_by(f: Option<&MetricFamily>, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for m in f.map(|f| f.get_metric()).unwrap_or_default() {
        *out.entry(label(m, by).to_owned()).or_default() += m.get_counter().value();
    }
    out
}

fn buckets(f: Option<&MetricFamily>) -> Vec<(f64, f64)> {
    f.and_then(|f| f.get_metric().first())
        .map(|m| {
            m.get_histogram()
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count() as f64))
                .collect()
        })
        .unwrap_or_default()
}

impl History {
    /// Records the counters now.
    pub fn sample(&self) {
        let f = families();
        let s = Sample {
            at: Instant::now(),
            by_outcome: counter_by(f.get("tollgate_requests_total"), "outcome"),
            by_plan: counter_by(f.get("tollgate_requests_total"), "plan"),
            added: buckets(f.get("tollgate_added_duration_seconds")),
            upstream: buckets(f.get("tollgate_upstream_duration_seconds")),
        };
        let mut h = tollgate_core::lock(&self.0);
        if h.len() == KEEP {
            h.pop_front();
        }
        h.push_back(s);
    }

    fn samples(&self) -> Vec<Sample> {
        tollgate_core::lock(&self.0).iter().cloned().collect()
    }
}

/// Per-interval rates of one series, oldest first.
fn rates(samples: &[Sample], pick: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples
        .windows(2)
        .map(|w| {
            let dt = w[1].at.duration_since(w[0].at).as_secs_f64().max(0.001);
            ((pick(&w[1]) - pick(&w[0])) / dt).max(0.0)
        })
        .collect()
}

/// An inline SVG sparkline.
fn sparkline(values: &[f64]) -> String {
    if values.len() < 2 {
        return "<span class=muted>collecting…</span>".into();
    }
    let max = values.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
    let step = 200.0 / (values.len() - 1) as f64;
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| format!("{:.1},{:.1}", i as f64 * step, 28.0 - v / max * 26.0))
        .collect();
    format!(
        "<svg width=200 height=30 viewBox=\"0 0 200 30\" role=img aria-label=\"requests per second over the last minutes\"><polyline fill=none stroke=currentColor stroke-width=1.5 points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// A quantile from the bucket counts gained between two samples.
fn quantile(first: &[(f64, f64)], last: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = last
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - first.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c),
            )
        })
        .collect();
    let total = delta
        .last()?
        .1
        .max(delta.iter().map(|d| d.1).fold(0.0, f64::max));
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in &delta {
        if *c >= rank {
            let span = (c - prev.1).max(1e-9);
            return Some(prev.0 + (le - prev.0) * ((rank - prev.1) / span));
        }
        prev = (*le, *c);
    }
    Some(prev.0)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |s| format!("{:.2} ms", s * 1000.0))
}

fn gauge_by(f: Option<&MetricFamily>, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for m in f.map(|f| f.get_metric()).unwrap_or_default() {
        out.insert(label(m, by).to_owned(), m.get_gauge().value());
    }
    out
}

pub fn page(app: &App) -> String {
    let samples = app.history.samples();
    let f = families();
    let mut b = String::with_capacity(16 * 1024);
    let up = app.started.elapsed().as_secs();
    let _ = write!(
        b,
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\"><title>Tollgate status</title><style>\
         body{{font:15px/1.5 system-ui,sans-serif;margin:0;color:#1b1f24;background:#fff}}main{{max-width:60rem;margin:0 auto;padding:1rem}}\
         table{{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}}th,td{{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #d0d7de}}\
         .muted{{color:#57606a}}.bad{{color:#c21d1d;font-weight:600}}svg{{color:#0b5fff;vertical-align:middle}}\
         </style></head><body><main><h1>Tollgate {v}</h1><p class=muted>Up {h}h {m}m {s}s · config <code>{cfg}</code> · upstream {host}:{port} · this page refreshes every 5 s</p>",
        v = env!("CARGO_PKG_VERSION"),
        h = up / 3600,
        m = up % 3600 / 60,
        s = up % 60,
        cfg = html(&app.live().version),
        host = html(&app.config.upstream.host),
        port = app.config.upstream.port,
    );
    match app.last_reload() {
        Some((at, Ok(()))) => {
            let _ = write!(b, "<p>Last reload: {} ago, ok.</p>", at.elapsed().as_secs());
        }
        Some((at, Err(e))) => {
            let _ = write!(
                b,
                "<p class=bad>Last reload, {} s ago, failed: {}</p>",
                at.elapsed().as_secs(),
                html(&e)
            );
        }
        None => b.push_str("<p class=muted>No reload since start.</p>"),
    }
    for (title, pick) in [("Requests by outcome", 0), ("Requests by plan", 1)] {
        let _ = write!(b, "<h2>{title}</h2><table><thead><tr><th>{}</th><th>per second (last interval)</th><th>last 5 minutes</th><th>total</th></tr></thead><tbody>", if pick == 0 { "outcome" } else { "plan" });
        let keys: Vec<String> = samples
            .last()
            .map(|s| {
                if pick == 0 {
                    s.by_outcome.keys().cloned().collect()
                } else {
                    s.by_plan.keys().cloned().collect()
                }
            })
            .unwrap_or_default();
        for k in keys {
            let get = |s: &Sample| {
                let m = if pick == 0 { &s.by_outcome } else { &s.by_plan };
                m.get(&k).copied().unwrap_or(0.0)
            };
            let r = rates(&samples, get);
            let total = samples.last().map_or(0.0, get);
            if total == 0.0 {
                continue;
            }
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
                html(&k),
                r.last().copied().unwrap_or(0.0),
                sparkline(&r),
                total
            );
        }
        b.push_str("</tbody></table>");
    }
    let (first, last) = (samples.first(), samples.last());
    let q = |pick: fn(&Sample) -> &Vec<(f64, f64)>, p: f64| match (first, last) {
        (Some(a), Some(z)) => quantile(pick(a), pick(z), p),
        _ => None,
    };
    b.push_str("<h2>Latency, last 5 minutes</h2><table><thead><tr><th></th><th>p50</th><th>p95</th><th>p99</th></tr></thead><tbody>");
    for (name, pick) in [
        (
            "added by Tollgate",
            (|s: &Sample| &s.added) as fn(&Sample) -> &Vec<(f64, f64)>,
        ),
        ("upstream", |s: &Sample| &s.upstream),
    ] {
        let _ = write!(
            b,
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ms(q(pick, 0.5)),
            ms(q(pick, 0.95)),
            ms(q(pick, 0.99))
        );
    }
    b.push_str("</tbody></table>");
    let limiter = tollgate_core::limiter::Limiter::name(&*app.gate.limiter);
    let fallback = counter_by(f.get("tollgate_limiter_fallback_total"), "policy");
    let errors: u64 = counter_by(f.get("tollgate_limiter_errors_total"), "backend")
        .values()
        .map(|v| *v as u64)
        .sum();
    let _ = write!(
        b,
        "<h2>Limiter</h2><p>Backend <b>{}</b>{} · errors {errors} · decisions by fallback: {}</p>",
        html(limiter),
        app.config
            .redis
            .as_ref()
            .filter(|_| app.config.redis_limits)
            .map(|r| format!(" (on_error: {})", r.on_error.as_str()))
            .unwrap_or_default(),
        if fallback.values().sum::<f64>() == 0.0 {
            "none".to_owned()
        } else {
            fallback
                .iter()
                .map(|(k, v)| format!("{k} {}", *v as u64))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let pending = gauge_by(f.get("tollgate_billing_pending_units"), "sink");
    let lag = gauge_by(f.get("tollgate_billing_lag_seconds"), "sink");
    b.push_str("<h2>Billing sinks</h2>");
    if app.config.metering.sinks.is_empty() {
        b.push_str("<p class=muted>No sinks configured: usage stays in the spool.</p>");
    } else {
        b.push_str(
            "<table><thead><tr><th>sink</th><th>pending units</th><th>lag</th></tr></thead><tbody>",
        );
        for s in &app.config.metering.sinks {
            let name = s.name();
            let l = lag.get(name).copied().unwrap_or(0.0);
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td{}>{} s</td></tr>",
                html(name),
                pending.get(name).copied().unwrap_or(0.0),
                if l > 3600.0 { " class=bad" } else { "" },
                l
            );
        }
        b.push_str("</tbody></table>");
    }
    if let (Some(_), Some(spool)) = (&app.config.alerts, &app.spool) {
        let owed = spool.alerts_owed();
        let _ = write!(
            b,
            "<p{}>Usage alerts: {owed} owed to the alert webhook</p>",
            if owed > 0 { " class=bad" } else { "" }
        );
    }
    let snap = app.gate.keys.snapshot();
    let _ = write!(
        b,
        "<h2>Keys and customers</h2><p>{} keys · {} customers in the store · {} with limiter state</p>\
         <p><a href=/metrics>metrics</a> · <a href=/admin/openapi.json>admin API</a></p></main></body></html>",
        snap.key_count,
        snap.customer_ids().count(),
        app.gate.limiter.memory().tracked_customers()
    );
    b
}
