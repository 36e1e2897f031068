//! The Pingora `ProxyHttp` implementation. It stays thin: every decision is
//! made by core's `Gate::admit`, every refusal rendered by core's `problem`,
//! every unit recorded by core's `Meter`; this file moves headers
//! (`respond.rs` writes the answers Tollgate gives itself, `access_line.rs`
//! the access log's line).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::Method;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use tollgate_core::body_usage::Scanner;
use tollgate_core::gate::{self, Admission, Admitted};
use tollgate_core::headers::RateHeaders;
use tollgate_core::metrics;
use tollgate_core::plans::Plan;
use tollgate_core::problem::Rejection;
use tollgate_core::request_id;
use tollgate_core::usage::units_from_header;

use crate::app::App;

mod access_line;
mod respond;

use access_line::access_line;

pub const H_CUSTOMER: &str = "x-tollgate-customer";
pub const H_PLAN: &str = "x-tollgate-plan";
pub const H_KEY_ID: &str = "x-tollgate-key-id";
/// The balance of a customer with prepaid credits, on every response.
pub const CREDITS_REMAINING: &str = "tollgate-credits-remaining";

pub struct TollgateProxy {
    pub app: Arc<App>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    upstream_start: Option<Instant>,
    outcome: &'static str,
    plan: Option<Arc<Plan>>,
    rate: Option<RateHeaders>,
    /// An admitted request, metered when its response comes back.
    admitted: Option<Admitted>,
    origin: Option<HeaderValue>,
    /// The normalised path, when it differs from what the client sent; the
    /// upstream then gets the path Tollgate routed on.
    normalized_path: Option<String>,
    /// Why the response must be refused after the upstream answered (its
    /// usage could not be recorded); `fail_to_proxy` renders it.
    failure: Option<Rejection>,
    /// `X-Request-Id`: the client's, or generated.
    request_id: String,
    /// Who called, once known (for the access log).
    identity: Option<tollgate_core::store::Identity>,
    /// What the response was metered as.
    units: Option<u64>,
    meter: Option<Arc<str>>,
    upstream_ms: Option<f64>,
    /// Reads the body of a `usage:` route's billable response as it passes;
    /// taken when the body ends and its units are recorded.
    scanner: Option<Scanner>,
    /// `Tollgate-Credits-Remaining`, for a customer whose plan has credits.
    credits: Option<i64>,
}

impl Ctx {
    /// Who was admitted, for the headers and the access log; the balance
    /// stands until the response says otherwise (a refusal of Tollgate's
    /// own after admission carries it too).
    fn note(&mut self, a: &Admitted) {
        self.rate = RateHeaders::render(&a.decision);
        self.plan = Some(a.plan.clone());
        self.identity = Some(a.identity.clone());
        self.credits = a.credits.map(|b| b.remaining);
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
            plan: None,
            rate: None,
            admitted: None,
            origin: None,
            normalized_path: None,
            failure: None,
            request_id: String::new(),
            identity: None,
            units: None,
            meter: None,
            upstream_ms: None,
            scanner: None,
            credits: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let app = &self.app;
        // Between requests a kept-alive connection may idle this long
        // (Pingora's default for HTTP/1.1 is forever).
        session.set_keepalive(Some(app.config.connections.idle_timeout.as_secs().max(1)));
        let req = session.req_header();
        ctx.request_id = match request_id::accept(
            req.headers
                .get(request_id::HEADER)
                .map(HeaderValue::as_bytes),
        ) {
            Some(id) => id.to_owned(),
            None => request_id::generate(app.gate.clock.now_ms()),
        };
        ctx.origin = req.headers.get(header::ORIGIN).cloned();
        // RFC 9112 3.2: an HTTP/1.1 request without Host is refused.
        if req.version == http::Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
            return self.reject(session, ctx, &Rejection::BadRequest(400)).await;
        }
        let verdict = app
            .gate
            .admit(&req.method, req.uri.path(), &req.headers)
            .await;
        ctx.normalized_path = verdict.rewrite;
        let admitted = match verdict.admission {
            Ok(Admission::Forward) => return Ok(false),
            Ok(Admission::Own(path)) => return self.own(session, ctx, &path).await,
            Ok(Admission::Preflight) => return self.preflight(session, ctx).await,
            Ok(Admission::Report(a)) => {
                ctx.note(&a);
                return self.usage_report(session, ctx, &a).await;
            }
            Ok(Admission::Pass(a)) => a,
            Err(refused) => {
                ctx.credits = refused.credits.map(|b| b.remaining);
                ctx.identity = refused.identity;
                ctx.rate = refused.decision.as_ref().and_then(RateHeaders::render);
                ctx.plan = refused.plan;
                return self.reject(session, ctx, &refused.rejection).await;
            }
        };
        ctx.note(&admitted);
        ctx.admitted = Some(admitted);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        let live = self.app.live();
        let c = &*live;
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
        // What only Tollgate may assert (identity), the key, and method
        // overrides are dropped first, in any spelling a CGI-style upstream
        // would fold into the same name.
        let dropped: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| gate::never_forwarded(n.as_str()))
            .cloned()
            .collect();
        for h in dropped {
            req.remove_header(&h);
        }
        // Authorization goes too when any of its values carries a Bearer
        // token (another scheme is the upstream's own authentication).
        let bearer = req
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .any(|v| gate::is_bearer(v.as_bytes()));
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
        req.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
        if let Some(a) = &ctx.admitted {
            req.insert_header(H_CUSTOMER, &*a.identity.customer)?;
            req.insert_header(H_PLAN, &*a.plan.name)?;
            req.insert_header(H_KEY_ID, &*a.identity.key_id)?;
            if a.body.is_some() {
                // A body Tollgate reads for its usage must come uncompressed.
                req.remove_header(&header::ACCEPT_ENCODING);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.is_informational() {
            // An upgraded connection (101) is a tunnel, never metered: it
            // holds no credits for as long as it stays open.
            if let (101, Some(a)) = (resp.status.as_u16(), &ctx.admitted) {
                a.hold.settle();
            }
            return Ok(());
        }
        if let Some(t) = ctx.upstream_start {
            let secs = t.elapsed().as_secs_f64();
            metrics::UPSTREAM_DURATION.observe(secs);
            ctx.upstream_ms = Some(secs * 1000.0);
        }
        resp.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
        if let Some(a) = &ctx.admitted {
            let reported = a.usage_header.as_ref().map(|h| {
                let units = units_from_header(resp.headers.get(h).map(HeaderValue::as_bytes));
                resp.remove_header(h);
                units
            });
            let status = resp.status.as_u16();
            // HEAD, 204 and 304 have no body to report usage in (Pingora
            // never runs the body filter for them): nothing is billed.
            let bodiless =
                session.req_header().method == Method::HEAD || matches!(status, 204 | 304);
            let units = match &a.body {
                Some(_) if bodiless => 0,
                // Read from the body as it passes, recorded at its end.
                Some(format) if self.app.meter.billable(status) => {
                    let h = |n: HeaderName| resp.headers.get(n).map(HeaderValue::as_bytes);
                    ctx.scanner = Some(Scanner::new(
                        format.clone(),
                        h(header::CONTENT_TYPE),
                        h(header::CONTENT_ENCODING),
                        self.app.config.metering.max_usage_body,
                    ));
                    0
                }
                _ => self.app.meter.units(a, status, reported),
            };
            // Metered now (the calendar charge too), durable before the
            // response reaches the client.
            if let Err(r) = self.app.meter.record(a, units).await {
                ctx.failure = Some(r);
                return Error::e_explain(ErrorType::InternalError, "usage could not be recorded");
            }
            // What was recorded, for the access log.
            ctx.units = Some(units);
            ctx.meter = a.meter.clone();
            // Charged (unless its body is still to report): its hold on
            // the customer's credits ends before the client has the answer.
            if ctx.scanner.is_none() {
                a.hold.settle();
            }
            // The balance after this response's charge, when it is known
            // now (a body-metered one is charged as its body ends).
            if a.credits.is_some() {
                ctx.credits = self.app.gate.balance_after(a, units).map(|b| b.remaining);
            }
        }
        self.rate_headers(ctx, resp)?;
        // Only Tollgate says what a customer's balance is.
        resp.remove_header(CREDITS_REMAINING);
        Self::credit_header(ctx, resp)?;
        if !resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            self.cors_headers(ctx, resp)?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // A failure of our own after the upstream answered says what it was;
        // anything else is classified by where and how Pingora failed.
        let rejection = match ctx.failure.take() {
            Some(r) => r,
            None => match classify(e) {
                Some(r) => r,
                None => {
                    ctx.outcome = "client_closed";
                    return FailToProxy {
                        error_code: 0,
                        can_reuse_downstream: false,
                    };
                }
            },
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

    /// What Pingora's own error lines say about a request: method, path and
    /// host, never the query string, where a client may have put its key.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        let host = req
            .headers
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()))
            .unwrap_or_default();
        let query = if req.uri.query().is_some() {
            "?…"
        } else {
            ""
        };
        format!("{} {}{query}, Host: {host}", req.method, req.uri.path())
    }

    /// A client hanging up is not Tollgate's error; keep it out of the log.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            )
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(scanner) = ctx.scanner.as_mut() else {
            return Ok(None);
        };
        if let Some(b) = body.as_ref() {
            scanner.feed(b);
        }
        if !end_of_stream {
            return Ok(None);
        }
        let scan = scanner.finish();
        ctx.scanner = None;
        let Some(a) = &ctx.admitted else {
            return Ok(None);
        };
        let units = self.app.meter.body_units(a, scan, false);
        // Durable before this, the last chunk, goes out: if it cannot be
        // written the client never gets a complete response.
        if let Err(r) = self.app.meter.record_now(a, &units) {
            ctx.failure = Some(r);
            return Error::e_explain(ErrorType::InternalError, "usage could not be recorded");
        }
        a.hold.settle();
        note_units(ctx, &units);
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // A body that never ended (the client went away, the upstream
        // broke off): billed what it reported by then, or the route's cost.
        if let (Some(scanner), Some(a)) = (ctx.scanner.take(), &ctx.admitted) {
            let units = self.app.meter.body_units(a, scanner.so_far(), true);
            self.app.meter.record_late(a, &units).await;
            note_units(ctx, &units);
        }
        // However it ended, a request's hold on its concurrency caps and
        // credits ends, once what it cost is charged.
        if let Some(a) = &ctx.admitted {
            self.app.gate.release(a);
        }
        let plan = ctx.plan.as_ref().map_or("none", |p| &*p.name);
        metrics::REQUESTS
            .with_label_values(&[plan, ctx.outcome])
            .inc();
        let total = ctx.start.elapsed().as_secs_f64();
        metrics::REQUEST_DURATION.observe(total);
        if let Some(up) = ctx.upstream_ms {
            metrics::ADDED_DURATION.observe((total - up / 1000.0).max(0.0));
        }
        if let Some(log) = &self.app.access_log {
            log.write(access_line(
                session,
                ctx,
                total * 1000.0,
                self.app.gate.clock.now_ms(),
            ));
        }
    }
}

/// What a body-metered response was billed, for the access log: the total
/// units, and the meters joined with `+`.
fn note_units(ctx: &mut Ctx, units: &[(Arc<str>, u64)]) {
    ctx.units = Some(units.iter().map(|(_, n)| n).sum());
    ctx.meter = (!units.is_empty()).then(|| {
        let names: Vec<&str> = units.iter().map(|(m, _)| &**m).collect();
        Arc::from(names.join("+"))
    });
}

/// The refusal for a proxying error; None when the client went away.
fn classify(e: &Error) -> Option<Rejection> {
    Some(match (e.esource(), e.etype()) {
        (_, ErrorType::HTTPStatus(code)) if (400..500).contains(code) => {
            Rejection::BadRequest(*code)
        }
        (
            ErrorSource::Downstream,
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
        ) => return None,
        (ErrorSource::Downstream, _) => Rejection::BadRequest(400),
        (
            ErrorSource::Upstream,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
        ) => Rejection::UpstreamTimeout,
        (ErrorSource::Upstream, _) => Rejection::UpstreamUnreachable,
        _ => Rejection::Internal,
    })
}
