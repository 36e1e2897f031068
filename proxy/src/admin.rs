//! The admin port: `/metrics`, `/healthz`, `/readyz`, a status page, and a
//! read-only `/admin` JSON API behind a bearer token (disabled when the
//! token's env var is unset). Key changes go through the CLI, which writes
//! the store directly; running proxies pick them up within a second.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::limiter::Limiter;
use crate::proxy::{usage_json, App};
use crate::store::KeyInfo;

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

fn problem(status: u16, title: &str, detail: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({
        "type": format!("urn:tollgate:problem:admin-{status}"),
        "title": title,
        "status": status,
        "detail": detail,
    });
    respond(
        status,
        crate::problem::PROBLEM_JSON,
        body.to_string().into_bytes(),
    )
}

/// A percent-decoded query parameter.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let raw = query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)?;
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
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
        if crate::keys::hashes_equal(&crate::keys::hash(presented), &crate::keys::hash(token)) {
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
                ids.extend(app.usage.customers());
                ids.extend(app.spool.iter().flat_map(|s| s.customers()));
                ids.into_iter().collect()
            }
        };
        let mut out = Vec::new();
        for id in ids {
            let (plan, suspended) = snap.customer(&id).unwrap_or((None, false));
            let identity = Arc::new(KeyInfo {
                key_id: "".into(),
                customer: id,
                plan,
                suspended,
            });
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
            let text = usage_json(
                &app.usage,
                app.spool.as_deref(),
                &identity,
                &plan,
                &decision,
            );
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                out.push(v);
            }
        }
        respond(
            200,
            "application/json",
            serde_json::Value::from(out).to_string().into_bytes(),
        )
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
                            "status": crate::store::admin::status(k, now),
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
                problem(500, "Key store unreadable", "see the Tollgate log")
            }
        }
    }
}

const OPENAPI: &str = include_str!("openapi.json");

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::GET {
            return problem(
                405,
                "Method not allowed",
                "the admin API is read-only; use the tollgate CLI to change keys",
            );
        }
        let path = req.uri.path().to_owned();
        let query = req.uri.query().map(str::to_owned);
        match path.as_str() {
            "/metrics" => respond(200, "text/plain; version=0.0.4", crate::metrics::render()),
            "/healthz" => respond(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => respond(200, "text/plain", b"ready\n".to_vec()),
            "/" => respond(
                200,
                "text/html; charset=utf-8",
                self.status_page().into_bytes(),
            ),
            "/admin/openapi.json" => respond(200, "application/json", OPENAPI.as_bytes().to_vec()),
            p if p.starts_with("/admin/") => {
                if let Err(r) = self.authorized(session) {
                    return *r;
                }
                let customer = query_param(query.as_deref(), "customer");
                match p {
                    "/admin/usage" => self.usage(customer.as_deref()).await,
                    "/admin/keys" => self.keys(customer.as_deref()),
                    _ => problem(404, "Not found", "see /admin/openapi.json"),
                }
            }
            _ => problem(
                404,
                "Not found",
                "try /metrics, /healthz, /readyz or /admin/openapi.json",
            ),
        }
    }
}

impl AdminApp {
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

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
