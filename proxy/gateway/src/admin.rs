//! The admin port: `/metrics`, `/healthz`, `/readyz`, a status page, and the
//! `/admin` JSON API behind a bearer token (disabled when the token's env var
//! is unset): keys (list, create, revoke, rotate), customers (plan, suspend,
//! usage), reload. Writes use the same operations as the CLI.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use tollgate_core::clock::{parse_duration, Millis};
use tollgate_core::limiter::Limiter;
use tollgate_core::plans::custom::parse_limit_specs;
use tollgate_core::problem::{Problem, PROBLEM_JSON};
use tollgate_core::store::admin::{self, CreateKey};
use tollgate_core::store::{KeyInfo, StoreError, UpdateStore};
use tollgate_core::usage::UsageReport;

use crate::app::{App, Keys};
use crate::config::Config;

pub struct AdminApp {
    pub app: Arc<App>,
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
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
fn problem(status: u16, title: &str, detail: &str) -> Response<Vec<u8>> {
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

    async fn usage(&self, customer: Option<&str>) -> Response<Vec<u8>> {
        let app = &self.app;
        let snap = app.gate.keys.snapshot();
        let ids: Vec<Arc<str>> = match customer {
            Some(c) => vec![c.into()],
            None => {
                // Every customer in the store, and any with usage but no keys left.
                let mut ids: std::collections::BTreeSet<Arc<str>> = snap.customer_ids().collect();
                ids.extend(app.meter.ledger.customers());
                ids.extend(app.spool.iter().flat_map(|s| s.customers()));
                ids.into_iter().collect()
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let view = snap.customer(&id).unwrap_or_default();
            let identity = Arc::new(KeyInfo::new("".into(), id, view));
            let plan = app.gate.plan_of(&identity);
            let decision = match app.gate.limiter.check(&identity.customer, &plan, 0).await {
                Ok(d) => d,
                Err(_) => {
                    return problem(
                        503,
                        "Limits unavailable",
                        "the limiter store cannot be reached",
                    )
                }
            };
            let period = app.meter.ledger.usage(&identity.customer);
            let billing = app.meter.totals(&identity.customer);
            let mut report =
                UsageReport::new(&identity.customer, &plan, &decision, &period, billing);
            report.subscription = identity.billing.map(|b| b.as_str());
            if let Ok(v) = serde_json::to_value(&report) {
                out.push(v);
            }
        }
        respond(
            200,
            "application/json",
            serde_json::Value::from(out).to_string().into_bytes(),
        )
    }

    /// A customer's own limits (null: its plan's) and the limits in force.
    fn limits(&self, id: &str) -> Response<Vec<u8>> {
        let data = match self.app.keys.data() {
            Ok(d) => d,
            Err(e) => return problem(e.status(), "Cannot read the key store", &e.to_string()),
        };
        let Some(c) = data.customers.get(id) else {
            return problem(404, "Not found", &format!("customer {id} not found"));
        };
        let view = self
            .app
            .gate
            .keys
            .snapshot()
            .customer(id)
            .unwrap_or_default();
        let plan = self
            .app
            .gate
            .plan_of(&Arc::new(KeyInfo::new("".into(), id.into(), view)));
        let effective: Vec<serde_json::Value> = plan
            .limits
            .iter()
            .map(|l| serde_json::json!({"name": &*l.name, "requests": l.quota, "per": l.window.name()}))
            .collect();
        let body = serde_json::json!({
            "customer": id,
            "plan": &*plan.name,
            "limits": c.limits,
            "effective": effective,
        });
        respond(200, "application/json", body.to_string().into_bytes())
    }

    fn keys(&self, customer: Option<&str>) -> Response<Vec<u8>> {
        let now = self.app.gate.clock.now_ms();
        match self.app.keys.data() {
            Ok(data) => {
                let list: Vec<serde_json::Value> = data
                    .keys
                    .iter()
                    .filter(|k| customer.is_none_or(|c| c == k.customer))
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id,
                            "start": k.start,
                            "customer": k.customer,
                            "name": k.name,
                            "created": k.created,
                            "expires": k.expires,
                            "status": admin::status(k, now),
                        })
                    })
                    .collect();
                respond(
                    200,
                    "application/json",
                    serde_json::Value::from(list).to_string().into_bytes(),
                )
            }
            Err(e) => {
                log::error!("admin: cannot read the key store: {e}");
                problem(e.status(), "Key store unreadable", "see the Tollgate log")
            }
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
        if method == http::Method::GET {
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
                    return respond(200, "application/json", OPENAPI.as_bytes().to_vec())
                }
                _ => {}
            }
        }
        if !path.starts_with("/admin/") {
            return problem(
                404,
                "Not found",
                "try /metrics, /healthz, /readyz or /admin/openapi.json",
            );
        }
        if let Err(r) = self.authorized(session) {
            return *r;
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
        let customer = query_param(query.as_deref(), "customer");
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["usage"]) => self.usage(customer.as_deref()).await,
            ("GET", ["customers", id, "usage"]) => self.usage(Some(id)).await,
            ("GET", ["keys"]) => self.keys(customer.as_deref()),
            ("POST", ["keys"]) => self.write(Write::Create(body)).await,
            ("POST", ["keys", id, "revoke"]) => self.write(Write::Revoke((*id).to_owned())).await,
            ("POST", ["keys", id, "rotate"]) => {
                self.write(Write::Rotate((*id).to_owned(), body)).await
            }
            ("PUT", ["customers", id, "plan"]) => {
                self.write(Write::SetPlan((*id).to_owned(), body)).await
            }
            ("PUT", ["customers", id, "limits"]) => {
                self.write(Write::SetLimits((*id).to_owned(), Some(body)))
                    .await
            }
            ("DELETE", ["customers", id, "limits"]) => {
                self.write(Write::SetLimits((*id).to_owned(), None)).await
            }
            ("GET", ["customers", id, "limits"]) => self.limits(id),
            ("POST", ["customers", id, "suspend"]) => {
                self.write(Write::Suspend((*id).to_owned(), true)).await
            }
            ("POST", ["customers", id, "resume"]) => {
                self.write(Write::Suspend((*id).to_owned(), false)).await
            }
            ("POST", ["reload"]) => self.reload().await,
            _ => problem(404, "Not found", "see /admin/openapi.json"),
        }
    }
}

/// An admin API change to the key store.
enum Write {
    Create(serde_json::Value),
    Revoke(String),
    Rotate(String, serde_json::Value),
    SetPlan(String, serde_json::Value),
    /// `None`: back to the plan's limits.
    SetLimits(String, Option<serde_json::Value>),
    Suspend(String, bool),
}

/// At most this much request body is read.
const MAX_BODY: usize = 64 * 1024;

async fn read_body(
    session: &mut ServerSession,
) -> Result<serde_json::Value, Box<Response<Vec<u8>>>> {
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                buf.extend_from_slice(&chunk);
                if buf.len() > MAX_BODY {
                    return Err(Box::new(problem(
                        413,
                        "Body too large",
                        "admin requests are small JSON objects",
                    )));
                }
            }
            Ok(None) => break,
            Err(_) => {
                return Err(Box::new(problem(
                    400,
                    "Bad request",
                    "the request body could not be read",
                )))
            }
        }
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_slice::<serde_json::Value>(&buf) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ => Err(Box::new(problem(
            400,
            "Bad request",
            "the body must be a JSON object",
        ))),
    }
}

/// A body with a field the operation does not take is refused, naming it:
/// a typo (`plna`) must not be ignored.
fn only_fields(body: &serde_json::Value, allowed: &[&str]) -> Result<(), (u16, String)> {
    let unknown = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())));
    match unknown {
        Some(k) => Err((
            400,
            format!(
                "unknown field `{k}`; this request takes {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn field(body: &serde_json::Value, name: &str) -> Option<String> {
    body.get(name).and_then(|v| v.as_str()).map(str::to_owned)
}

impl AdminApp {
    async fn write(&self, op: Write) -> Response<Vec<u8>> {
        let store = self.app.keys.clone();
        let config = self.app.config.clone();
        let now = self.app.gate.clock.now_ms();
        // Store I/O (a file, or Redis through a blocking adapter) off the workers.
        let result = tokio::task::spawn_blocking(move || apply(op, &store, &config, now)).await;
        match result {
            Ok(Ok((status, body))) => {
                // This instance applies its own change now; others follow
                // within a second.
                if let Err(e) = self.reload_keys().await {
                    log::warn!("admin: changed the key store but could not re-read it yet: {e}");
                }
                respond(status, "application/json", body.to_string().into_bytes())
            }
            Ok(Err((status, msg))) => problem(
                status,
                if status == 404 {
                    "Not found"
                } else {
                    "Cannot change the key store"
                },
                &msg,
            ),
            Err(_) => problem(500, "Internal error", "see the Tollgate log"),
        }
    }

    async fn reload_keys(&self) -> Result<(), StoreError> {
        self.app.keys.reload().await
    }

    async fn reload(&self) -> Response<Vec<u8>> {
        match self.reload_keys().await {
            Ok(()) => {
                tollgate_core::metrics::CONFIG_RELOADS
                    .with_label_values(&["success"])
                    .inc();
                respond(200, "application/json", br#"{"reloaded":"keys"}"#.to_vec())
            }
            Err(e) => {
                tollgate_core::metrics::CONFIG_RELOADS
                    .with_label_values(&["error"])
                    .inc();
                log::error!("admin reload failed: {e}");
                problem(
                    500,
                    "Reload failed",
                    "the previous keys stay in force; see the Tollgate log",
                )
            }
        }
    }
}

/// An admin API change, applied to the store as the CLI applies it: the
/// status and body to answer with, or the status and reason of a refusal.
fn apply(
    op: Write,
    store: &Keys,
    config: &Config,
    now: Millis,
) -> Result<(u16, serde_json::Value), (u16, String)> {
    let bad = |m: String| (400u16, m);
    let known = |plan: &str| -> Result<(), (u16, String)> {
        config
            .plans
            .get(plan)
            .map(|_| ())
            .ok_or_else(|| bad(format!("unknown plan `{plan}`")))
    };
    let store_err = |e: StoreError| (e.status(), e.to_string());
    let duration = |v: Option<String>, what: &str| -> Result<Option<u64>, (u16, String)> {
        match v {
            None => Ok(None),
            Some(s) => parse_duration(&s)
                .map(|d| Some(d.as_millis() as u64))
                .ok_or_else(|| bad(format!("`{what}` must be a duration like 90d or 24h"))),
        }
    };
    match op {
        Write::Create(body) => {
            only_fields(&body, &["customer", "plan", "name", "expires", "set_plan"])?;
            let customer =
                field(&body, "customer").ok_or_else(|| bad("`customer` is required".into()))?;
            let plan = field(&body, "plan");
            if let Some(p) = &plan {
                known(p)?;
            }
            let expires =
                duration(field(&body, "expires"), "expires")?.map(|ms| now.saturating_add(ms));
            let name = field(&body, "name");
            let new = admin::create_key(
                store,
                &config.key_prefix,
                CreateKey {
                    customer: &customer,
                    plan: plan.as_deref(),
                    name: name.as_deref(),
                    expires,
                    set_plan: body.get("set_plan").and_then(serde_json::Value::as_bool)
                        == Some(true),
                },
                now,
            )
            .map_err(store_err)?;
            Ok((
                201,
                serde_json::json!({ "key": new.raw, "id": new.record.id, "customer": customer, "expires": new.record.expires }),
            ))
        }
        Write::Revoke(id) => {
            let k = admin::revoke(store, &id, now).map_err(store_err)?;
            Ok((200, serde_json::json!({ "id": k.id, "status": "revoked" })))
        }
        Write::Rotate(id, body) => {
            only_fields(&body, &["grace"])?;
            let grace = duration(field(&body, "grace"), "grace")?.unwrap_or(86_400_000);
            let new =
                admin::rotate(store, &config.key_prefix, &id, grace, now).map_err(store_err)?;
            Ok((
                201,
                serde_json::json!({ "key": new.raw, "id": new.record.id, "replaces": id }),
            ))
        }
        Write::SetPlan(id, body) => {
            only_fields(&body, &["plan"])?;
            let plan = field(&body, "plan").ok_or_else(|| bad("`plan` is required".into()))?;
            known(&plan)?;
            admin::set_plan(store, &id, &plan).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "plan": plan })))
        }
        Write::SetLimits(id, Some(body)) => {
            only_fields(&body, &["limits"])?;
            let list = body.get("limits").ok_or_else(|| {
                bad("`limits` is required: a list of limits like a plan's".into())
            })?;
            let specs = parse_limit_specs(list, "limits").map_err(|errs| {
                let all: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
                bad(all.join("; "))
            })?;
            admin::set_limits(store, &id, Some(specs.clone())).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "limits": specs })))
        }
        Write::SetLimits(id, None) => {
            admin::set_limits(store, &id, None).map_err(store_err)?;
            Ok((200, serde_json::json!({ "customer": id, "limits": null })))
        }
        Write::Suspend(id, suspended) => {
            admin::set_suspended(store, &id, suspended).map_err(store_err)?;
            Ok((
                200,
                serde_json::json!({ "customer": id, "suspended": suspended }),
            ))
        }
    }
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
        let app = &self.app;
        let snap = app.gate.keys.snapshot();
        let plans: Vec<String> = app
            .gate
            .plans
            .plans
            .values()
            .map(|p| {
                format!(
                    "<li><b>{}</b>: {}</li>",
                    html(&p.name),
                    html(if p.policy_header.is_empty() {
                        "unlimited"
                    } else {
                        &p.policy_header
                    })
                )
            })
            .collect();
        format!(
            "<!doctype html><html><head><meta charset=utf-8><title>Tollgate</title></head><body>\
             <h1>Tollgate {}</h1><p>Upstream: {}:{} &middot; keys loaded: {} &middot; customers with limiter state: {}</p>\
             <h2>Plans</h2><ul>{}</ul><p><a href=/metrics>metrics</a> &middot; <a href=/admin/openapi.json>admin API</a></p></body></html>",
            env!("CARGO_PKG_VERSION"),
            html(&app.config.upstream.host),
            app.config.upstream.port,
            snap.key_count,
            app.gate.limiter.memory().tracked_customers(),
            plans.join("")
        )
    }
}

/// Text escaped for HTML content and quoted attributes.
pub(crate) fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
