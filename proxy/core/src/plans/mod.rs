//! `plans.yaml`: plans with their limits, routes and what gets billed,
//! read into serde structs and validated into [`Plans`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::clock::{Millis, DAY, HOUR, MINUTE, SECOND};
use crate::diag::{Diagnostics, Source};

pub mod custom;
mod parse;
#[cfg(test)]
mod tests;

// ---- the validated form ----------------------------------------------------

/// How a limit's window is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// An exact sliding window of this many milliseconds (second..hour).
    Sliding(Millis),
    /// The UTC calendar day.
    Day,
    /// The UTC calendar month.
    Month,
    /// Not a window: requests in flight at once (`concurrent: N`).
    Concurrent,
}

impl Window {
    /// `second`, `minute`, `hour`, `day`, `month`, or a sliding window of
    /// whole seconds up to an hour (`10s`, `5m`, `90s`).
    pub fn parse(per: &str) -> Option<Self> {
        Some(match per {
            "second" => Window::Sliding(SECOND),
            "minute" => Window::Sliding(MINUTE),
            "hour" => Window::Sliding(HOUR),
            "day" => Window::Day,
            "month" => Window::Month,
            other => {
                let ms = crate::clock::parse_duration(other)?.as_millis() as Millis;
                if ms == 0 || ms > HOUR || !ms.is_multiple_of(SECOND) {
                    return None;
                }
                Window::Sliding(ms)
            }
        })
    }

    /// The name it has in plans.yaml and in the usage report.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Window::Sliding(SECOND) => "second".into(),
            Window::Sliding(MINUTE) => "minute".into(),
            Window::Sliding(HOUR) => "hour".into(),
            Window::Sliding(ms) => format!("{}s", ms / SECOND).into(),
            Window::Day => "day".into(),
            Window::Month => "month".into(),
            Window::Concurrent => "concurrent".into(),
        }
    }

    /// A calendar window (day, month), reset at its end.
    pub fn is_calendar(self) -> bool {
        matches!(self, Window::Day | Window::Month)
    }

    /// The nominal window length in seconds, for `RateLimit-Policy: w=`.
    /// A month is advertised as 30 days; `t` on `RateLimit` gives the real reset.
    pub fn nominal_seconds(self) -> u64 {
        match self {
            Window::Sliding(ms) => ms / 1000,
            Window::Day => DAY / 1000,
            Window::Month => 30 * DAY / 1000,
            Window::Concurrent => 0,
        }
    }
}

/// `"burst";q=5;w=1, "daily";q=100;w=86400`: a plan's `RateLimit-Policy`
/// (draft-ietf-httpapi-ratelimit-headers), rendered once per plan at load.
/// A `concurrent` cap has no window, so it is not one of these policies.
pub fn policy_header(limits: &[Limit]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for l in limits.iter().filter(|l| l.window != Window::Concurrent) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        // Names are validated to `[A-Za-z0-9_.-]`, safe inside an sf-string.
        let _ = write!(
            out,
            "\"{}\";q={};w={}",
            l.name,
            l.quota,
            l.window.nominal_seconds()
        );
    }
    out
}

/// One quota policy of a plan.
#[derive(Debug, Clone)]
pub struct Limit {
    pub name: Arc<str>,
    pub quota: u64,
    pub window: Window,
    /// Past the quota, requests are admitted and billed as overage instead
    /// of refused.
    pub overage: bool,
    /// Where overage units are metered (None: the request's usual meter).
    pub overage_meter: Option<Arc<str>>,
}

/// How consumer docs present a plan (`display_name`, `price`,
/// `description` in plans.yaml); nothing Tollgate enforces.
#[derive(Debug, Clone, Default)]
pub struct PlanDisplay {
    pub name: Option<String>,
    pub price: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug)]
pub struct Plan {
    pub name: Arc<str>,
    pub limits: Vec<Limit>,
    pub meter: Option<Arc<str>>,
    /// `billed: false`: its usage is never reported to a sink.
    pub billed: bool,
    pub display: PlanDisplay,
    /// `RateLimit-Policy` rendered once at load; empty for unlimited plans.
    pub policy_header: String,
    /// Prepaid credits (`credits:`, `meters.*.credits_per_unit`); None:
    /// the plan's customers have no balance.
    pub credits: Option<Arc<crate::credits::CreditPolicy>>,
}

/// How the method part of a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Option<http::Method>,
    /// Path glob: `*` matches any run of characters, `/` included.
    pub glob: String,
    pub public: bool,
    pub cost: u64,
    pub meter: Option<Arc<str>>,
    pub usage_header: Option<http::HeaderName>,
    /// Units read from the response body instead (`usage:`).
    pub usage: Option<Arc<crate::body_usage::BodyFormat>>,
    /// Only these plans may call it; None: every plan.
    pub plans: Option<Vec<Arc<str>>>,
    /// `reserve`: units held against a customer's credits (at the dearest
    /// `credits_per_unit` the request may be billed at) while it runs.
    pub reserve: u64,
}

impl Route {
    /// What one request counts against request limits: its `cost`, except
    /// on a `usage:` route, where a request counts 1 and `cost` is what a
    /// response whose body reports no usage is billed.
    pub fn limit_cost(&self) -> u64 {
        if self.usage.is_some() {
            DEFAULT_COST
        } else {
            self.cost
        }
    }

    /// Whether the route takes a request; `ci`: paths compare ignoring
    /// ASCII case (`routes_case_insensitive`).
    /// A trailing `/` on the path is ignored when the glob has none (as
    /// Express and most routers do), so `/v1/sms/send/` pays like `/v1/sms/send`.
    /// A `GET` route takes `HEAD` too, as every router does.
    pub fn matches(&self, method: &http::Method, path: &str, ci: bool) -> bool {
        let method_ok = self.method.as_ref().is_none_or(|m| {
            m == method || (m == http::Method::GET && method == http::Method::HEAD)
        });
        if !method_ok {
            return false;
        }
        glob_match_with(&self.glob, path, ci)
            || (path.len() > 1
                && !self.glob.ends_with('/')
                && path
                    .strip_suffix('/')
                    .is_some_and(|p| glob_match_with(&self.glob, p, ci)))
    }
}

/// Matches `pattern` against `text` where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob_match_with(pattern, text, false)
}

/// [`glob_match`], ignoring ASCII case when `ci` is set.
pub fn glob_match_with(pattern: &str, text: &str, ci: bool) -> bool {
    let eq = |a: u8, b: u8| a == b || (ci && a.eq_ignore_ascii_case(&b));
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && eq(p[pi], t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// Which upstream statuses are billed: a set over 100..=599.
#[derive(Debug, Clone)]
pub struct StatusSet(pub(crate) [bool; 600]);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.get(usize::from(status)).copied().unwrap_or(false)
    }
}

/// The validated plans file.
#[derive(Debug)]
pub struct Plans {
    pub plans: BTreeMap<String, Arc<Plan>>,
    pub default_plan: Arc<Plan>,
    pub routes: Vec<Route>,
    /// Routes match paths ignoring ASCII case, for upstreams that route
    /// `/V1/SMS` like `/v1/sms` (default: case-sensitive, as most do).
    pub routes_case_insensitive: bool,
    pub billable: StatusSet,
}

/// Cost and meter of a request that matched no route.
pub const DEFAULT_COST: u64 = 1;

impl Plans {
    pub fn get(&self, name: &str) -> Option<&Arc<Plan>> {
        self.plans.get(name)
    }

    /// The first route matching, if any.
    pub fn route(&self, method: &http::Method, path: &str) -> Option<&Route> {
        let ci = self.routes_case_insensitive;
        self.routes.iter().find(|r| r.matches(method, path, ci))
    }

    pub fn load(path: &Path) -> Result<Self, Diagnostics> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics(vec![crate::diag::Diagnostic {
                file: path.to_path_buf(),
                line: 1,
                column: 1,
                message: format!("cannot read plans file: {e}"),
                hint: Some("`plans:` in tollgate.yaml is relative to the config file".into()),
            }])
        })?;
        Self::parse(&Source::new(path, text))
    }
}

/// Names that go into headers and metric labels: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}
