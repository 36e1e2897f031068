//! The one place where a refusal becomes an HTTP response: status, headers
//! and an RFC 9457 `application/problem+json` body. Bodies never carry key
//! material, internal addresses or stack traces.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

/// Everything Tollgate itself answers instead of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    MissingKey,
    MalformedKey,
    /// Two different keys, or a repeated key header.
    AmbiguousKey,
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    Suspended,
    /// The route is only for these plans (`plans:` on the route).
    NotInPlan(Vec<Arc<str>>),
    /// A JWT that does not verify (why, for the detail).
    InvalidToken(crate::jwt::TokenError),
    Limited {
        retry_after: u64,
        violated: Vec<Arc<str>>,
        /// Says what the request costs and what is left, when it was too
        /// big rather than the limit spent.
        detail: Option<String>,
    },
    /// The customer's prepaid credits are at or below zero (or what their
    /// calls in flight do not hold is less than this call reserves) and the
    /// request would cost credits.
    CreditsExhausted {
        /// Says what this call would hold and what is free, when credits
        /// are left but held or too few for its reservation.
        detail: Option<String>,
    },
    /// The limiter store is down and policy says closed.
    Unavailable {
        retry_after: u64,
    },
    /// The usage spool is at its bound: billable work is refused rather
    /// than served unbilled.
    SpoolFull,
    /// A billable response's usage could not be made durable (a failed
    /// spool write): the client gets this instead of an answer nobody pays for.
    UsageNotRecorded,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// A path an upstream could route differently from Tollgate (an encoded
    /// `/`, `\` or `.`, a NUL, a broken escape): see `gate::PathError`.
    BadPath,
    /// A request Pingora itself could not parse, or similar client errors.
    BadRequest(u16),
    /// Anything unexpected inside Tollgate.
    Internal,
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::MissingKey
            | Rejection::MalformedKey
            | Rejection::AmbiguousKey
            | Rejection::UnknownKey
            | Rejection::RevokedKey
            | Rejection::ExpiredKey
            | Rejection::InvalidToken(_) => 401,
            Rejection::Suspended | Rejection::NotInPlan(_) => 403,
            Rejection::Limited { .. } => 429,
            Rejection::CreditsExhausted { .. } => 402,
            Rejection::Unavailable { .. } | Rejection::SpoolFull | Rejection::UsageNotRecorded => {
                503
            }
            Rejection::UpstreamUnreachable => 502,
            Rejection::UpstreamTimeout => 504,
            Rejection::BadPath => 400,
            Rejection::BadRequest(code) => *code,
            Rejection::Internal => 500,
        }
    }

    /// The `outcome` label of `tollgate_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self.status() {
            401 => "unauthenticated",
            403 => "forbidden",
            // Out of credits is a limit of the account, like a quota.
            429 | 402 => "limited",
            503 => "unavailable",
            502 | 504 => "upstream_error",
            500 => "error",
            _ => "bad_request",
        }
    }

    fn slug_title_detail(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            Rejection::MissingKey => (
                "missing-key",
                "API key required",
                "Send your key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
            ),
            Rejection::MalformedKey => (
                "malformed-key",
                "Malformed API key",
                "The key is not in the expected format; copy it again from where it was issued.",
            ),
            Rejection::AmbiguousKey => (
                "ambiguous-key",
                "More than one API key",
                "Send exactly one key, in one header.",
            ),
            Rejection::UnknownKey => ("invalid-key", "Invalid API key", "This key is not known."),
            Rejection::RevokedKey => (
                "revoked-key",
                "API key revoked",
                "This key has been revoked.",
            ),
            Rejection::ExpiredKey => (
                "expired-key",
                "API key expired",
                "This key has expired; use the key that replaced it.",
            ),
            Rejection::InvalidToken(e) => ("invalid-token", "Invalid token", e.detail()),
            Rejection::NotInPlan(_) => (
                "not-in-plan",
                "Not in your plan",
                "This endpoint is not part of your plan; upgrade to a plan that includes it.",
            ),
            Rejection::Suspended => (
                "suspended",
                "Account suspended",
                "Access for this account is suspended; check its billing status.",
            ),
            Rejection::Limited { .. } => (
                "rate-limited",
                "Rate limit exceeded",
                "A limit of your plan is exhausted; retry after the time in Retry-After.",
            ),
            Rejection::CreditsExhausted { .. } => (
                "credits-exhausted",
                "Credits exhausted",
                "Your prepaid credits are used up; buy more, or wait for your plan's next grant.",
            ),
            Rejection::SpoolFull => (
                "usage-spool-full",
                "Service temporarily unavailable",
                "Usage cannot be recorded right now; retry shortly.",
            ),
            Rejection::UsageNotRecorded => (
                "usage-not-recorded",
                "Service temporarily unavailable",
                "Usage could not be recorded; retry shortly.",
            ),
            Rejection::Unavailable { .. } => (
                "unavailable",
                "Service temporarily unavailable",
                "Limits cannot be checked right now; retry shortly.",
            ),
            Rejection::UpstreamUnreachable => (
                "upstream-unreachable",
                "Bad gateway",
                "The API behind this gateway could not be reached.",
            ),
            Rejection::UpstreamTimeout => (
                "upstream-timeout",
                "Gateway timeout",
                "The API behind this gateway did not answer in time.",
            ),
            Rejection::BadPath => (
                "bad-path",
                "Bad request path",
                "The path holds an encoded `/`, `\\` or `.`, a backslash, a NUL, or a broken or non-UTF-8 escape.",
            ),
            Rejection::BadRequest(_) => (
                "bad-request",
                "Bad request",
                "The request could not be processed.",
            ),
            Rejection::Internal => (
                "internal",
                "Internal error",
                "The gateway failed to handle the request.",
            ),
        }
    }

    /// `Retry-After` in seconds, where the status has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Rejection::Limited { retry_after, .. } | Rejection::Unavailable { retry_after } => {
                Some(*retry_after)
            }
            Rejection::SpoolFull | Rejection::UsageNotRecorded => Some(5),
            _ => None,
        }
    }

    pub fn www_authenticate(&self) -> Option<&'static str> {
        match self {
            Rejection::MissingKey => Some("Bearer realm=\"tollgate\""),
            s if s.status() == 401 => Some("Bearer realm=\"tollgate\", error=\"invalid_token\""),
            _ => None,
        }
    }

    /// The problem this refusal is rendered as.
    pub fn problem(&self) -> Problem<'_> {
        let (slug, title, detail) = self.slug_title_detail();
        let mut p = Problem::new(self.status(), slug, title, detail);
        if let Rejection::Limited {
            violated, detail, ..
        } = self
        {
            p.violated = Some(violated);
            if let Some(d) = detail {
                p.detail = d.as_str().into();
            }
        }
        if let Rejection::CreditsExhausted { detail: Some(d) } = self {
            p.detail = d.as_str().into();
        }
        if let Rejection::NotInPlan(plans) = self {
            let names: Vec<&str> = plans.iter().map(|p| &**p).collect();
            p.detail = format!(
                "This endpoint is part of the plans {}, not of yours; upgrade to one of them to use it.",
                names.join(", ")
            )
            .into();
        }
        p.retry_after = self.retry_after();
        p
    }

    /// The problem+json body.
    pub fn body(&self) -> String {
        self.problem().body()
    }

    /// One of each refusal a consumer can meet, for documentation.
    pub fn catalogue() -> Vec<Rejection> {
        vec![
            Rejection::MissingKey,
            Rejection::MalformedKey,
            Rejection::AmbiguousKey,
            Rejection::UnknownKey,
            Rejection::RevokedKey,
            Rejection::ExpiredKey,
            Rejection::InvalidToken(crate::jwt::TokenError::Expired),
            Rejection::Suspended,
            Rejection::NotInPlan(vec!["pro".into(), "enterprise".into()]),
            Rejection::Limited {
                retry_after: 1,
                violated: vec!["burst".into()],
                detail: None,
            },
            Rejection::CreditsExhausted { detail: None },
            Rejection::BadPath,
            Rejection::Unavailable { retry_after: 1 },
            Rejection::SpoolFull,
            Rejection::UsageNotRecorded,
            Rejection::UpstreamUnreachable,
            Rejection::UpstreamTimeout,
        ]
    }
}

/// An RFC 9457 problem: what every refusal of the proxy and every error of
/// the admin API is rendered from, in one place ([`Problem::body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem<'a> {
    pub status: u16,
    /// `type` is `urn:tollgate:problem:<slug>`.
    pub slug: Cow<'a, str>,
    pub title: Cow<'a, str>,
    pub detail: Cow<'a, str>,
    /// The policies a 429 violated (`violated-policies`).
    pub violated: Option<&'a [Arc<str>]>,
    pub retry_after: Option<u64>,
}

impl<'a> Problem<'a> {
    pub fn new(
        status: u16,
        slug: impl Into<Cow<'a, str>>,
        title: impl Into<Cow<'a, str>>,
        detail: impl Into<Cow<'a, str>>,
    ) -> Self {
        Self {
            status,
            slug: slug.into(),
            title: title.into(),
            detail: detail.into(),
            violated: None,
            retry_after: None,
        }
    }

    /// The `application/problem+json` body.
    pub fn body(&self) -> String {
        let mut b = String::with_capacity(256);
        let _ = write!(
            b,
            "{{\"type\":\"urn:tollgate:problem:{}\",\"title\":{},\"status\":{},\"detail\":{}",
            self.slug,
            json_string(&self.title),
            self.status,
            json_string(&self.detail)
        );
        if let Some(violated) = self.violated {
            b.push_str(",\"violated-policies\":[");
            for (i, p) in violated.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                b.push_str(&json_string(p));
            }
            b.push(']');
        }
        if let Some(r) = self.retry_after {
            let _ = write!(b, ",\"retry-after\":{r}");
        }
        b.push('}');
        b
    }
}

/// A problem+json body with the request's id added (`request_id`), so a
/// consumer can quote it to support.
pub fn with_request_id(body: &str, id: &str) -> String {
    match body.strip_suffix('}') {
        Some(head) => format!("{head},\"request_id\":{}}}", json_string(id)),
        None => body.to_owned(),
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

pub const PROBLEM_JSON: &str = "application/problem+json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_problem_json() {
        let all = [
            Rejection::MissingKey,
            Rejection::MalformedKey,
            Rejection::AmbiguousKey,
            Rejection::UnknownKey,
            Rejection::RevokedKey,
            Rejection::ExpiredKey,
            Rejection::Suspended,
            Rejection::Limited {
                retry_after: 3,
                violated: vec!["burst".into(), "daily".into()],
                detail: None,
            },
            Rejection::Unavailable { retry_after: 1 },
            Rejection::CreditsExhausted { detail: None },
            Rejection::SpoolFull,
            Rejection::UsageNotRecorded,
            Rejection::UpstreamUnreachable,
            Rejection::UpstreamTimeout,
            Rejection::BadPath,
            Rejection::BadRequest(400),
            Rejection::Internal,
        ];
        for r in all {
            let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
            assert_eq!(v["status"], r.status(), "{r:?}");
            assert!(v["type"]
                .as_str()
                .unwrap()
                .starts_with("urn:tollgate:problem:"));
            assert!(v["title"].is_string() && v["detail"].is_string());
        }
        let limited = Rejection::Limited {
            retry_after: 3,
            violated: vec!["daily".into()],
            detail: Some("This request costs 5 units and `daily` has 2 left".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&limited.body()).unwrap();
        assert_eq!(v["violated-policies"], serde_json::json!(["daily"]));
        assert_eq!(
            v["detail"],
            "This request costs 5 units and `daily` has 2 left"
        );
        assert_eq!(limited.retry_after(), Some(3));
        assert_eq!(
            Rejection::MissingKey.www_authenticate(),
            Some("Bearer realm=\"tollgate\"")
        );
        assert_eq!(Rejection::Suspended.www_authenticate(), None);
    }
}
