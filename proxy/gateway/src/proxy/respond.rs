//! The answers Tollgate gives itself instead of the upstream's: refusals,
//! preflights, the usage report and its own routes, with the headers every
//! response of an identified customer carries.

use bytes::Bytes;
use http::header;
use http::Method;
use pingora::prelude::*;
use pingora::proxy::Session;

use tollgate_core::gate::Admitted;
use tollgate_core::problem::{with_request_id, Rejection, PROBLEM_JSON};
use tollgate_core::request_id;
use tollgate_core::usage::UsageReport;

use super::{Ctx, TollgateProxy, CREDITS_REMAINING};

impl TollgateProxy {
    pub(super) fn cors_headers(&self, ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
        let live = self.app.live();
        let Some(cors) = &live.cors else {
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

    pub(super) fn rate_headers(&self, ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
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

    pub(super) fn credit_header(ctx: &Ctx, resp: &mut ResponseHeader) -> Result<()> {
        if let Some(n) = ctx.credits {
            resp.insert_header(CREDITS_REMAINING, n)?;
        }
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
        resp.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
        self.rate_headers(ctx, &mut resp)?;
        Self::credit_header(ctx, &mut resp)?;
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

    pub(super) async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        r: &Rejection,
    ) -> Result<bool> {
        ctx.outcome = r.outcome();
        let mut body = with_request_id(&r.body(), &ctx.request_id);
        // Where to upgrade, when consumers can.
        let on_sale = match (r, &self.app.checkout) {
            (Rejection::NotInPlan(plans), Some(c)) => plans
                .iter()
                .any(|p| c.config.prices.contains_key(&**p))
                .then_some("upgrade"),
            (Rejection::CreditsExhausted { .. }, Some(c)) => {
                c.config.credit_pack.is_some().then_some("buy")
            }
            _ => None,
        };
        if let Some(link) = on_sale {
            if let Some(head) = body.strip_suffix('}') {
                body = format!("{head},\"{link}\":\"/_tollgate/\"}}");
            }
        }
        let body = Bytes::from(body);
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

    pub(super) async fn preflight(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.outcome = "preflight";
        let cors = self.app.live().cors.clone();
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

    pub(super) async fn usage_report(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        a: &Admitted,
    ) -> Result<bool> {
        ctx.outcome = "allowed";
        let app = &self.app;
        let customer = &a.identity.customer;
        let period = app.meter.ledger.usage(customer);
        let mut report = UsageReport::new(
            customer,
            &a.plan,
            &a.decision,
            &period,
            app.meter.totals(customer),
        );
        report.subscription = a.identity.billing.map(|b| b.as_str());
        report.credits = a.credits;
        let body = report.to_json();
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

impl TollgateProxy {
    /// Tollgate's own routes (webhooks, self-service billing, dashboard).
    pub(super) async fn own(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        path: &str,
    ) -> Result<bool> {
        let reply = match crate::own::serve(&self.app, session, path).await {
            Ok(r) => r,
            Err(rejection) => return self.reject(session, ctx, &rejection).await,
        };
        ctx.outcome = reply.outcome;
        let crate::own::Reply {
            status,
            content_type,
            headers,
            mut body,
            ..
        } = reply;
        if content_type == PROBLEM_JSON {
            let text = String::from_utf8_lossy(&body);
            body = Bytes::from(with_request_id(&text, &ctx.request_id));
        }
        self.send(
            session,
            ctx,
            status,
            content_type,
            |resp| {
                for (name, value) in headers {
                    resp.insert_header(name, value)?;
                }
                Ok(())
            },
            body,
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
