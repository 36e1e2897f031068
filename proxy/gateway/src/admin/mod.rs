//! The admin port: `/metrics`, `/healthz`, `/readyz`, a status page, and the
//! `/admin` JSON API behind a bearer token (disabled when the token's env var
//! is unset): keys (list, create, revoke, rotate), customers (plan, suspend,
//! usage, prepaid credits), billing (sink status, dead-letter replay), reload. Writes use the same operations as the CLI.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use tollgate_core::problem::{Problem, PROBLEM_JSON};
use tollgate_core::store::admin;

use crate::app::App;

pub mod billing;
pub mod credits;
mod read;
pub mod status;
mod write;

use write::{read_body, Write};

pub struct AdminApp {
    pub app: Arc<App>,
}

impl AdminApp {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

/// The admin API's OpenAPI document (`openapi.json` beside this file),
/// with `PlanName` listing the plans of plans.yaml and `SinkName` the
/// configured sinks: a name the document allows is one the API accepts.
pub fn openapi(plans: &tollgate_core::plans::Plans, sinks: &[String]) -> Vec<u8> {
    let mut doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
    let names: Vec<serde_json::Value> = plans.plans.keys().map(|p| p.as_str().into()).collect();
    if let Some(s) = doc.pointer_mut("/components/schemas/PlanName/enum") {
        *s = names.into();
    }
    if let Some(s) = doc.pointer_mut("/components/schemas/SinkName") {
        match s.as_object_mut() {
            // No sinks: any name is one there is not (a 404).
            Some(o) if sinks.is_empty() => drop(o.remove("enum")),
            Some(o) => drop(o.insert("enum".into(), sinks.into())),
            None => {}
        }
    }
    doc.to_string().into_bytes()
}

impl AdminApp {
    /// What `POST /admin/billing/replay` takes: the sinks, and `alerts`
    /// when the alert webhook is configured.
    fn replayable(&self) -> Vec<String> {
        let Some(spool) = &self.app.spool else {
            return Vec::new();
        };
        let mut names = spool.config().sinks.clone();
        if !spool.config().alerts.is_empty() {
            names.push(tollgate_metering::alerts::ALERTS.into());
        }
        names
    }
}

pub(super) fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// An admin API error, rendered by core's one problem renderer; its type
/// is `urn:tollgate:problem:admin-<status>`.
pub(super) fn problem(status: u16, title: &str, detail: &str) -> Response<Vec<u8>> {
    let p = Problem::new(
        status,
        format!("admin-{status}"),
        title.to_owned(),
        detail.to_owned(),
    );
    respond(status, PROBLEM_JSON, p.body().into_bytes())
}

/// A percent-decoded query parameter.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| tollgate_core::pct::decode(v, true))
}

impl AdminApp {
    fn authorized(&self, session: &ServerSession) -> Result<(), Box<Response<Vec<u8>>>> {
        let Some(token) = &self.app.config.admin.token else {
            return Err(Box::new(problem(
                403,
                "Admin API disabled",
                &format!(
                    "set {} to enable the admin API",
                    self.app.config.admin.token_env
                ),
            )));
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if tollgate_core::keys::hashes_equal(
            &tollgate_core::keys::hash(presented),
            &tollgate_core::keys::hash(token),
        ) {
            Ok(())
        } else {
            Err(Box::new(problem(
                401,
                "Admin token required",
                "send Authorization: Bearer <admin token>",
            )))
        }
    }
}

const OPENAPI: &str = include_str!("openapi.json");

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_owned();
        let query = req.uri.query().map(str::to_owned);
        let host = req
            .headers
            .get(http::header::HOST)
            .map(|h| h.to_str().unwrap_or(""));
        if !self.app.config.admin.host_allowed(host) {
            return problem(
                403,
                "Host not allowed",
                "this admin port answers only the hosts in admin.allowed_hosts (by default, loopback names)",
            );
        }
        let segments: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|s| tollgate_core::pct::decode(s, false))
            .collect();
        let Some(allow) = route(&path) else {
            return problem(
                404,
                "Not found",
                "try /metrics, /healthz, /readyz or /admin/openapi.json",
            );
        };
        if !allow.split(", ").any(|m| m == method.as_str()) {
            let mut r = problem(
                405,
                "Method not allowed",
                &format!("{path} answers {allow}"),
            );
            if let Ok(v) = http::HeaderValue::from_str(allow) {
                r.headers_mut().insert(http::header::ALLOW, v);
            }
            return r;
        }
        match path.as_str() {
            "/metrics" => {
                return respond(
                    200,
                    "text/plain; version=0.0.4",
                    tollgate_core::metrics::render(),
                )
            }
            "/healthz" => return respond(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => return self.readiness(),
            "/" => {
                return respond(
                    200,
                    "text/html; charset=utf-8",
                    self.status_page().into_bytes(),
                )
            }
            "/admin/openapi.json" => {
                // The plans in force, also after a reload.
                return respond(
                    200,
                    "application/json",
                    openapi(&self.app.gate.plans.load(), &self.replayable()),
                );
            }
            _ => {}
        }
        if let Err(r) = self.authorized(session) {
            return *r;
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let seg: Vec<&str> = segments.iter().skip(1).map(String::as_str).collect();
        let customer = query_param(query.as_deref(), "customer");
        if let Some(c) = &customer {
            if let Err(e) = admin::customer_id_ok(c) {
                return problem(400, "Bad request", &e.to_string());
            }
        }
        // Ids in paths are checked before any lookup: a malformed one is a
        // 400 (customers) or a 404 (keys), never a new record.
        if let ["customers", id, ..] = seg.as_slice() {
            if let Err(e) = admin::customer_id_ok(id) {
                return problem(400, "Bad request", &e.to_string());
            }
        }
        if let ["keys", id, ..] = seg.as_slice() {
            if !tollgate_core::keys::valid_key_id(id) {
                return problem(404, "Not found", &format!("key {id} not found"));
            }
        }
        let owned = |id: &str| id.to_owned();
        match (method.as_str(), seg.as_slice()) {
            ("GET", ["usage"]) => self.usage(customer.as_deref()).await,
            ("GET", ["customers"]) => self.customers(None).await,
            ("GET", ["customers", id]) => self.customers(Some(id)).await,
            ("GET", ["customers", id, "usage"]) => self.usage(Some(id)).await,
            ("GET", ["keys"]) => self.keys(customer.as_deref(), None),
            ("GET", ["keys", id]) => self.keys(None, Some(id)),
            ("POST", ["keys"]) => self.write(Write::Create(body)).await,
            ("POST", ["keys", id, "revoke"]) => self.write(Write::Revoke(owned(id))).await,
            ("POST", ["keys", id, "rotate"]) => self.write(Write::Rotate(owned(id), body)).await,
            ("PUT", ["customers", id, "plan"]) => self.write(Write::SetPlan(owned(id), body)).await,
            ("PUT", ["customers", id, "limits"]) => {
                self.write(Write::SetLimits(owned(id), Some(body))).await
            }
            ("DELETE", ["customers", id, "limits"]) => {
                self.write(Write::SetLimits(owned(id), None)).await
            }
            ("GET", ["customers", id, "limits"]) => self.limits(id),
            ("GET", ["customers", id, "credits"]) => self.credits(id),
            ("POST", ["customers", id, "credits"]) => self.grant_credits(id, &body).await,
            ("POST", ["customers", id, "suspend"]) => {
                self.write(Write::Suspend(owned(id), true)).await
            }
            ("POST", ["customers", id, "resume"]) => {
                self.write(Write::Suspend(owned(id), false)).await
            }
            ("POST", ["reload"]) => self.reload().await,
            ("GET", ["billing"]) => self.billing_status(),
            ("POST", ["billing", "replay"]) => self.replay(body).await,
            _ => problem(404, "Not found", "see /admin/openapi.json"),
        }
    }
}

/// Every path the admin port answers (`*` one path segment) and the
/// methods it takes there; anything else is a 404, another method a 405.
const ROUTES: &[(&str, &str)] = &[
    ("/metrics", "GET"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/", "GET"),
    ("/admin/openapi.json", "GET"),
    ("/admin/usage", "GET"),
    ("/admin/customers", "GET"),
    ("/admin/customers/*", "GET"),
    ("/admin/customers/*/usage", "GET"),
    ("/admin/customers/*/plan", "PUT"),
    ("/admin/customers/*/limits", "GET, PUT, DELETE"),
    ("/admin/customers/*/credits", "GET, POST"),
    ("/admin/customers/*/suspend", "POST"),
    ("/admin/customers/*/resume", "POST"),
    ("/admin/keys", "GET, POST"),
    ("/admin/keys/*", "GET"),
    ("/admin/keys/*/revoke", "POST"),
    ("/admin/keys/*/rotate", "POST"),
    ("/admin/reload", "POST"),
    ("/admin/billing", "GET"),
    ("/admin/billing/replay", "POST"),
];

/// The methods `path` takes, when it is a route.
fn route(path: &str) -> Option<&'static str> {
    let parts: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find_map(|(pattern, methods)| {
        let want: Vec<&str> = pattern.split('/').collect();
        let same = want.len() == parts.len()
            && want
                .iter()
                .zip(&parts)
                .all(|(w, p)| *w == *p || (*w == "*" && !p.is_empty()));
        same.then_some(*methods)
    })
}

impl AdminApp {
    /// Ready unless the usage spool's disk refused a write in the last 10 s
    /// (billable work is then refused here; a load balancer should send it
    /// to another instance).
    fn readiness(&self) -> Response<Vec<u8>> {
        let failing = self
            .app
            .spool
            .as_ref()
            .is_some_and(|s| s.is_failing(std::time::Duration::from_secs(10)));
        if failing {
            respond(
                503,
                "text/plain",
                b"not ready: the usage spool cannot be written\n".to_vec(),
            )
        } else {
            respond(200, "text/plain", b"ready\n".to_vec())
        }
    }

    fn status_page(&self) -> String {
        status::page(&self.app)
    }
}

/// Text escaped for HTML content and quoted attributes.
pub(crate) fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
