//! The Pingora `ProxyHttp` implementation. It stays thin: every decision is
//! made by [`crate::gate`], every refusal rendered by [`crate::problem`],
//! every unit recorded by [`crate::usage`]; this file moves headers.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::Method;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::config::Config;
use crate::gate::{self, Gate};
use crate::headers::RateHeaders;
use crate::limiter::{Backend, Decision};
use crate::metrics;
use crate::plans::Plan;
use crate::problem::{Rejection, PROBLEM_JSON};
use crate::store::Identity;
use crate::usage::{units_from_header, UsageLedger};

pub const USAGE_PATH: &str = "/_tollgate/usage";
pub const H_CUSTOMER: &str = "x-tollgate-customer";
pub const H_PLAN: &str = "x-tollgate-plan";
pub const H_KEY_ID: &str = "x-tollgate-key-id";

/// Everything a request needs, shared by all workers.
pub struct App {
    pub config: Arc<Config>,
    pub gate: Gate<Backend>,
    pub usage: Arc<UsageLedger>,
    pub keys: Keys,
    /// The durable usage spool (None with `metering.enabled: false`).
    pub spool: Option<Arc<crate::spool::Spool>>,
    /// Runs the Redis connections' driver tasks while the app lives.
    pub _redis_rt: Option<Arc<crate::redis_store::RedisRuntime>>,
}

/// The configured key store.
pub enum Keys {
    File(Arc<crate::store::FileStore>),
    Redis(Arc<crate::redis_store::RedisKeyStore>),
}

impl Keys {
    pub fn as_key_store(&self) -> Arc<dyn crate::store::KeyStore> {
        match self {
            Keys::File(f) => f.clone(),
            Keys::Redis(r) => r.clone(),
        }
    }

    /// The whole store (the Redis store answers from its replica).
    pub fn data(&self) -> Result<crate::store::StoreData, crate::store::StoreError> {
        match self {
            Keys::File(f) => f.data(),
            Keys::Redis(r) => Ok(r.data()),
        }
    }
}

pub struct TollgateProxy {
    pub app: Arc<App>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    upstream_start: Option<Instant>,
    outcome: &'static str,
    identity: Option<Identity>,
    plan: Option<Arc<Plan>>,
    rate: Option<RateHeaders>,
    cost: u64,
    meter: Option<Arc<str>>,
    usage_header: Option<HeaderName>,
    origin: Option<HeaderValue>,
    /// The normalised path, when it differs from what the client sent; the
    /// upstream then gets the path Tollgate routed on.
    normalized_path: Option<String>,
}

impl TollgateProxy {
    fn cors_headers(&self, ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
        let Some(cors) = &self.app.config.cors else {
            return Ok(());
        };
        let origin = ctx.origin.as_ref().and_then(|o| o.to_str().ok());
        if let Some(allowed) = cors.allow_origin(origin) {
            resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed)?;
            resp.insert_header(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                cors.expose_headers.as_str(),
            )?;
            if allowed != "*" {
                resp.append_header(header::VARY, "Origin")?;
            }
        }
        Ok(())
    }

    fn rate_headers(&self, ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
        let (Some(rate), Some(plan)) = (&ctx.rate, &ctx.plan) else {
            return Ok(());
        };
        resp.insert_header("x-ratelimit-limit", rate.limit)?;
        resp.insert_header("x-ratelimit-remaining", rate.remaining)?;
        resp.insert_header("x-ratelimit-reset", rate.reset)?;
        resp.insert_header("ratelimit-policy", plan.policy_header.as_str())?;
        resp.insert_header("ratelimit", rate.ratelimit.as_str())?;
        Ok(())
    }

    /// Writes a response Tollgate produced itself.
    async fn send(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        content_type: &str,
        extra: impl FnOnce(&mut ResponseHeader) -> Result<()>,
        body: Bytes,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(8))?;
        if status != 204 {
            resp.insert_header(header::CONTENT_TYPE, content_type)?;
            resp.insert_header(header::CONTENT_LENGTH, body.len())?;
        }
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        self.rate_headers(ctx, &mut resp)?;
        self.cors_headers(ctx, &mut resp)?;
        extra(&mut resp)?;
        // A body we did not read would corrupt the next request on this connection.
        if has_request_body(session) {
            session.set_keepalive(None);
        }
        let head_only = session.req_header().method == Method::HEAD;
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    async fn reject(&self, session: &mut Session, ctx: &mut Ctx, r: &Rejection) -> Result<bool> {
        ctx.outcome = r.outcome();
        let body = Bytes::from(r.body());
        self.send(
            session,
            ctx,
            r.status(),
            PROBLEM_JSON,
            |resp| {
                if let Some(v) = r.www_authenticate() {
                    resp.insert_header(header::WWW_AUTHENTICATE, v)?;
                }
                if let Some(s) = r.retry_after() {
                    resp.insert_header(header::RETRY_AFTER, s)?;
                }
                Ok(())
            },
            body,
        )
        .await?;
        Ok(true)
    }

    async fn preflight(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.outcome = "preflight";
        let cors = self.app.config.cors.clone();
        self.send(
            session,
            ctx,
            204,
            "text/plain",
            |resp| {
                if let Some(c) = &cors {
                    resp.insert_header(
                        header::ACCESS_CONTROL_ALLOW_METHODS,
                        "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
                    )?;
                    resp.insert_header(
                        header::ACCESS_CONTROL_ALLOW_HEADERS,
                        c.allow_headers.as_str(),
                    )?;
                    resp.insert_header(header::ACCESS_CONTROL_MAX_AGE, c.max_age_secs)?;
                }
                Ok(())
            },
            Bytes::new(),
        )
        .await?;
        Ok(true)
    }

    async fn usage_report(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        identity: &Identity,
        plan: &Plan,
        decision: &Decision,
    ) -> Result<bool> {
        ctx.outcome = "allowed";
        let body = usage_json(
            &self.app.usage,
            self.app.spool.as_deref(),
            identity,
            plan,
            decision,
        );
        self.send(
            session,
            ctx,
            200,
            "application/json",
            |_| Ok(()),
            Bytes::from(body),
        )
        .await?;
        Ok(true)
    }
}

/// Whether the request announced a body (which may be left unread).
fn has_request_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key(header::CONTENT_LENGTH) || h.contains_key(header::TRANSFER_ENCODING)
}

/// The body of `GET /_tollgate/usage` (and of the admin usage API).
pub fn usage_json(
    usage: &UsageLedger,
    spool: Option<&crate::spool::Spool>,
    identity: &Identity,
    plan: &Plan,
    d: &Decision,
) -> String {
    let u = usage.usage(&identity.customer);
    let policies: Vec<serde_json::Value> = plan
        .limits
        .iter()
        .zip(&d.policies)
        .map(|(l, p)| {
            serde_json::json!({
                "name": &*p.name,
                "limit": p.quota,
                "remaining": p.remaining,
                "reset": p.reset_secs,
                "window": window_name(l.window),
            })
        })
        .collect();
    let meters: serde_json::Map<String, serde_json::Value> = u
        .meters
        .iter()
        .map(|(m, n)| (m.to_string(), serde_json::Value::from(*n)))
        .collect();
    let billing: serde_json::Map<String, serde_json::Value> = spool
        .map(|s| s.totals(&identity.customer))
        .unwrap_or_default()
        .into_iter()
        .map(|(m, t)| {
            (m, serde_json::json!({ "recorded": t.recorded, "reported": t.reported, "pending": t.pending }))
        })
        .collect();
    serde_json::json!({
        "customer": &*identity.customer,
        "plan": &*plan.name,
        "billing": billing,
        "period": {
            "start": crate::clock::rfc3339(u.period_start),
            "end": crate::clock::rfc3339(u.period_end),
        },
        "policies": policies,
        "usage": meters,
    })
    .to_string()
}

pub fn window_name(w: crate::plans::Window) -> &'static str {
    use crate::plans::Window;
    match w {
        Window::Sliding(ms) if ms <= 1000 => "second",
        Window::Sliding(ms) if ms <= 60_000 => "minute",
        Window::Sliding(_) => "hour",
        Window::Day => "day",
        Window::Month => "month",
    }
}

#[async_trait]
impl ProxyHttp for TollgateProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            upstream_start: None,
            outcome: "allowed",
            identity: None,
            plan: None,
            rate: None,
            cost: 0,
            meter: None,
            usage_header: None,
            origin: None,
            normalized_path: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let app = &self.app;
        let req = session.req_header();
        ctx.origin = req.headers.get(header::ORIGIN).cloned();

        if req.method == Method::OPTIONS
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            if app.config.cors.is_some() {
                return self.preflight(session, ctx).await;
            }
            // No CORS config: the upstream answers its own preflights.
            return Ok(false);
        }

        let method = req.method.clone();
        let path = gate::normalize_path(req.uri.path());
        let is_usage = path == USAGE_PATH;
        let route = app.gate.route(&method, &path);
        if let std::borrow::Cow::Owned(p) = &path {
            ctx.normalized_path = Some(p.clone());
        }
        if route.public && !is_usage {
            return Ok(false);
        }

        let authed = match gate::extract_key(&req.headers) {
            Ok(Some((key, _source))) => app.gate.authenticate(key).await,
            Ok(None) => Err(Rejection::MissingKey),
            Err(r) => Err(r),
        };
        let (identity, plan) = match authed {
            Ok(a) => a,
            Err(r) => return self.reject(session, ctx, &r).await,
        };
        ctx.plan = Some(plan.clone());

        let cost = if is_usage { 0 } else { route.cost };
        let started = Instant::now();
        let decision = app.gate.limit(&identity, &plan, cost).await;
        metrics::LIMITER_DURATION
            .with_label_values(&[app.gate.limiter.name()])
            .observe(started.elapsed().as_secs_f64());
        let decision = match decision {
            Ok(d) => d,
            Err(_) => {
                return self
                    .reject(session, ctx, &Rejection::Unavailable { retry_after: 1 })
                    .await;
            }
        };
        ctx.rate = RateHeaders::render(&decision);
        if is_usage {
            return self
                .usage_report(session, ctx, &identity, &plan, &decision)
                .await;
        }
        if !decision.allowed {
            return self.reject(session, ctx, &gate::limited(&decision)).await;
        }
        for p in &decision.policies {
            // At or past 80 % used.
            if p.remaining.saturating_mul(5) <= p.quota {
                metrics::NEAR_LIMIT
                    .with_label_values(&[&plan.name, &p.name])
                    .inc();
            }
        }
        let r = route.route;
        ctx.cost = cost;
        ctx.meter = r
            .and_then(|r| r.meter.clone())
            .or_else(|| plan.meter.clone());
        // Past an included quota with `overage`, units go to the overage
        // meter when the limit names one.
        if decision.overage {
            if let Some(m) = &decision.overage_meter {
                ctx.meter = Some(m.clone());
            }
        }
        // Billable work is refused rather than served unbilled.
        if ctx.meter.is_some() && app.spool.as_ref().is_some_and(|s| s.is_full()) {
            metrics::SPOOL_REJECTED
                .with_label_values(&[&plan.name])
                .inc();
            return self.reject(session, ctx, &Rejection::SpoolFull).await;
        }
        ctx.usage_header = r.and_then(|r| r.usage_header.clone());
        ctx.identity = Some(identity);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        let c = &self.app.config;
        // A SocketAddr resolved at load: no DNS here.
        let mut peer = HttpPeer::new(c.upstream.addr, c.upstream.tls, c.upstream.host.clone());
        peer.options.connection_timeout = Some(c.timeouts.connect);
        peer.options.total_connection_timeout = Some(c.timeouts.connect);
        peer.options.read_timeout = Some(c.timeouts.read);
        peer.options.write_timeout = Some(c.timeouts.write);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Whatever the client claims about itself is dropped first, in any
        // spelling a CGI-style upstream would fold into the same name.
        let spoofed: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| gate::is_identity_header(n.as_str()))
            .cloned()
            .collect();
        for h in spoofed {
            req.remove_header(&h);
        }
        // Keys never travel upstream, on any route: X-API-Key always,
        // Authorization when it carries a Bearer token (another scheme is
        // the upstream's own authentication).
        req.remove_header(gate::X_API_KEY);
        let bearer = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().get(..7))
            .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "));
        if bearer {
            req.remove_header(&header::AUTHORIZATION);
        }
        if let Some(p) = ctx.normalized_path.take() {
            let pq = match req.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            if let Ok(uri) = pq.parse::<http::Uri>() {
                req.set_uri(uri);
            }
        }
        if let (Some(id), Some(plan)) = (&ctx.identity, &ctx.plan) {
            req.insert_header(H_CUSTOMER, &*id.customer)?;
            req.insert_header(H_PLAN, &*plan.name)?;
            req.insert_header(H_KEY_ID, &*id.key_id)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            return Ok(());
        }
        if let Some(t) = ctx.upstream_start {
            metrics::UPSTREAM_DURATION.observe(t.elapsed().as_secs_f64());
        }
        if let Some(identity) = &ctx.identity {
            let reported = ctx.usage_header.as_ref().map(|h| {
                let units = units_from_header(resp.headers.get(h).map(HeaderValue::as_bytes));
                resp.remove_header(h);
                units
            });
            // Metered now, before the response reaches the client.
            if self.app.gate.plans.billable.contains(resp.status.as_u16()) {
                let units = match reported {
                    Some(Some(n)) => n,
                    Some(None) => {
                        log::warn!("upstream sent no valid usage header for a metered route; billed 0 units");
                        0
                    }
                    None => ctx.cost,
                };
                if let (Some(meter), true) = (&ctx.meter, units > 0) {
                    self.app.usage.record(&identity.customer, meter, units);
                    // Durable before the client has its answer.
                    if let Some(spool) = &self.app.spool {
                        if !matches!(
                            spool.append(&identity.customer, meter, units).await,
                            Ok(true)
                        ) {
                            // Unrecorded means unbilled: the client gets a 503
                            // instead of an answer nobody pays for.
                            log::error!(
                                "usage of {units} {meter} could not be written to the spool"
                            );
                            return Error::e_explain(
                                ErrorType::HTTPStatus(503),
                                "usage could not be recorded",
                            );
                        }
                    }
                }
            }
        }
        self.rate_headers(ctx, resp)?;
        if !resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            self.cors_headers(ctx, resp)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let rejection = match (e.esource(), e.etype()) {
            (_, ErrorType::HTTPStatus(503)) => Rejection::SpoolFull,
            (_, ErrorType::HTTPStatus(code)) if (400..500).contains(code) => {
                Rejection::BadRequest(*code)
            }
            (
                ErrorSource::Downstream,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
            ) => {
                ctx.outcome = "client_closed";
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            (ErrorSource::Downstream, _) => Rejection::BadRequest(400),
            (
                ErrorSource::Upstream,
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            ) => Rejection::UpstreamTimeout,
            (ErrorSource::Upstream, _) => Rejection::UpstreamUnreachable,
            _ => Rejection::Internal,
        };
        if let Some(written) = session.response_written() {
            // Too late for a clean answer: the header is out.
            let code = written.status.as_u16();
            ctx.outcome = "upstream_error";
            return FailToProxy {
                error_code: code,
                can_reuse_downstream: false,
            };
        }
        if rejection == Rejection::Internal {
            log::error!("internal error while proxying: {e}");
        }
        let code = rejection.status();
        // Pingora closes the client's connection after a failed proxy
        // attempt, whatever we return; the answer must say so, or a client
        // reusing the connection (as HTTP/1.1 lets it) sends its next request
        // into a closing socket.
        session.set_keepalive(None);
        if let Err(err) = self.reject(session, ctx, &rejection).await {
            log::debug!("could not send the error response: {err}");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A client hanging up is not Tollgate's error; keep it out of the log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let plan = ctx.plan.as_ref().map_or("none", |p| &*p.name);
        metrics::REQUESTS
            .with_label_values(&[plan, ctx.outcome])
            .inc();
        metrics::REQUEST_DURATION.observe(ctx.start.elapsed().as_secs_f64());
    }
}
