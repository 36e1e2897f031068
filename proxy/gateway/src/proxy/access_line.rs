//! The access log's line for one request.

use http::header;
use pingora::proxy::Session;

use super::Ctx;

/// One access log line: every field on every line, `null` when unknown;
/// the path without its query (where a client may have put its key), the
/// key's id, never the key.
pub(super) fn access_line(session: &Session, ctx: &Ctx, total_ms: f64, now: u64) -> String {
    let req = session.req_header();
    let ms = |v: f64| (v * 1000.0).round() / 1000.0;
    let who = ctx.identity.as_ref();
    let user_agent = req
        .headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    let line = AccessLine {
        bytes_sent: session.body_bytes_sent(),
        customer: who.map(|i| &*i.customer),
        key_id: who.map(|i| &*i.key_id),
        meter: ctx.meter.as_deref(),
        method: req.method.as_str(),
        outcome: ctx.outcome,
        path: clip(req.uri.path()),
        plan: ctx.plan.as_ref().map(|p| &*p.name),
        request_id: &ctx.request_id,
        status: session.response_written().map(|r| r.status.as_u16()),
        time: tollgate_core::clock::rfc3339_millis(now),
        total_ms: ms(total_ms),
        units: ctx.units,
        upstream_ms: ctx.upstream_ms.map(ms),
        user_agent: user_agent.as_deref().map(clip),
    };
    // Serialised straight from borrowed fields into one buffer: no JSON
    // tree per request.
    serde_json::to_string(&line).unwrap_or_default()
}

/// One access log line's fields (in the alphabetical order the lines have
/// always had).
#[derive(serde::Serialize)]
struct AccessLine<'a> {
    bytes_sent: usize,
    customer: Option<&'a str>,
    key_id: Option<&'a str>,
    meter: Option<&'a str>,
    method: &'a str,
    outcome: &'a str,
    path: &'a str,
    plan: Option<&'a str>,
    request_id: &'a str,
    status: Option<u16>,
    time: String,
    total_ms: f64,
    units: Option<u64>,
    upstream_ms: Option<f64>,
    user_agent: Option<&'a str>,
}

/// At most 256 bytes of a client-supplied field, so a log line stays small.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
