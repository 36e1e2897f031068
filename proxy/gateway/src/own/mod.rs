//! Tollgate's own routes on the public port, everything under `/_tollgate`
//! but the usage report: billing webhooks ([`webhooks`]), self-service
//! checkout and portal ([`billing`]) and the consumer dashboard
//! ([`dashboard`]). Each handler returns a [`Reply`] (or a core
//! [`Rejection`] for an unusable key); the proxy writes it. Nothing here is
//! charged against a limit or billed.

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::Method;
use pingora::proxy::Session;

use tollgate_core::lifecycle::Provider;
use tollgate_core::problem::{Problem, Rejection, PROBLEM_JSON};

use crate::app::App;

pub mod billing;
pub mod dashboard;
pub mod webhooks;

/// A response Tollgate writes itself.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Bytes,
    /// The `outcome` label of `tollgate_requests_total`.
    pub outcome: &'static str,
}

impl Reply {
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: Bytes::from(body),
            outcome: if status < 400 {
                "allowed"
            } else {
                "bad_request"
            },
        }
    }

    /// A problem+json answer of type `urn:tollgate:problem:<slug>`.
    pub fn problem(status: u16, slug: &'static str, title: &'static str, detail: String) -> Self {
        let body = Problem::new(status, slug, title, detail).body();
        Self {
            status,
            content_type: PROBLEM_JSON,
            headers: Vec::new(),
            body: Bytes::from(body),
            outcome: match status {
                502 | 504 => "upstream_error",
                503 => "unavailable",
                500 => "error",
                _ => "bad_request",
            },
        }
    }

    fn not_found() -> Self {
        Self::problem(
            404,
            "not-found",
            "Not found",
            "There is no such Tollgate endpoint.".into(),
        )
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        let mut r = Self::problem(
            405,
            "method-not-allowed",
            "Method not allowed",
            format!("This endpoint answers {allow}."),
        );
        r.headers.push((header::ALLOW, allow.into()));
        r
    }
}

/// Answers a request for `path` (canonical, under `/_tollgate`).
pub async fn serve(app: &App, session: &mut Session, path: &str) -> Result<Reply, Rejection> {
    let method = session.req_header().method.clone();
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match path {
        "/_tollgate" | "/_tollgate/" => Ok(if get {
            dashboard::page(app)
        } else {
            Reply::method_not_allowed("GET, HEAD")
        }),
        "/_tollgate/docs" => Ok(match (&*app.docs_page.load(), get) {
            (Some(d), true) => dashboard::serve(d),
            (Some(_), false) => Reply::method_not_allowed("GET, HEAD"),
            (None, _) => Reply::not_found(),
        }),
        "/_tollgate/billing/checkout" | "/_tollgate/billing/portal" => {
            if !post {
                return Ok(Reply::method_not_allowed("POST"));
            }
            let kind = if path.ends_with("checkout") {
                billing::Kind::Checkout
            } else {
                billing::Kind::Portal
            };
            billing::session(app, session, kind).await
        }
        _ => {
            let provider = path
                .strip_prefix("/_tollgate/webhooks/")
                .and_then(|name| Provider::ALL.into_iter().find(|p| p.name() == name));
            match (provider, post) {
                (Some(p), true) => Ok(webhooks::receive(app, session, p).await),
                (Some(_), false) => Ok(Reply::method_not_allowed("POST")),
                (None, _) => Ok(Reply::not_found()),
            }
        }
    }
}

/// Why a request body was not read.
pub enum BodyError {
    TooLarge,
    Unreadable,
}

/// The whole request body, refused past `max` bytes (before reading, when
/// Content-Length already says so).
pub async fn read_body(session: &mut Session, max: usize) -> Result<Bytes, BodyError> {
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Err(_) => return Err(BodyError::Unreadable),
        }
    }
}

/// A request header as text (absent, or not visible ASCII: None).
pub fn header_str<'a>(session: &'a Session, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}
