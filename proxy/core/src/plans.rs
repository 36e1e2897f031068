//! `plans.yaml`: plans with their limits, routes and what gets billed,
//! read into serde structs and validated into [`Plans`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::clock::{Millis, DAY, HOUR, MINUTE, SECOND};
use crate::diag::{Diagnostics, Source};

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlans {
    default_plan: Option<String>,
    #[serde(default)]
    plans: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    routes: Vec<serde_yaml::Value>,
    #[serde(default)]
    billable_statuses: Option<Vec<serde_yaml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    limits: Vec<RawLimit>,
    meter: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: String,
    requests: i64,
    per: String,
    #[serde(default)]
    overage: bool,
    overage_meter: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(default)]
    public: bool,
    cost: Option<i64>,
    meter: Option<String>,
    usage_header: Option<String>,
}

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
}

impl Window {
    pub fn parse(per: &str) -> Option<Self> {
        Some(match per {
            "second" => Window::Sliding(SECOND),
            "minute" => Window::Sliding(MINUTE),
            "hour" => Window::Sliding(HOUR),
            "day" => Window::Day,
            "month" => Window::Month,
            _ => return None,
        })
    }

    /// The name it has in plans.yaml and in the usage report.
    pub fn name(self) -> &'static str {
        match self {
            Window::Sliding(ms) if ms <= SECOND => "second",
            Window::Sliding(ms) if ms <= MINUTE => "minute",
            Window::Sliding(_) => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// The nominal window length in seconds, for `RateLimit-Policy: w=`.
    /// A month is advertised as 30 days; `t` on `RateLimit` gives the real reset.
    pub fn nominal_seconds(self) -> u64 {
        match self {
            Window::Sliding(ms) => ms / 1000,
            Window::Day => DAY / 1000,
            Window::Month => 30 * DAY / 1000,
        }
    }
}

/// `"burst";q=5;w=1, "daily";q=100;w=86400`: a plan's `RateLimit-Policy`
/// (draft-ietf-httpapi-ratelimit-headers), rendered once per plan at load.
pub fn policy_header(limits: &[Limit]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, l) in limits.iter().enumerate() {
        if i > 0 {
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

#[derive(Debug)]
pub struct Plan {
    pub name: Arc<str>,
    pub limits: Vec<Limit>,
    pub meter: Option<Arc<str>>,
    /// `RateLimit-Policy` rendered once at load; empty for unlimited plans.
    pub policy_header: String,
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
}

impl Route {
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method) && glob_match(&self.glob, path)
    }
}

/// Matches `pattern` against `text` where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
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
pub struct StatusSet([bool; 600]);

impl StatusSet {
    pub fn contains(&self, status: u16) -> bool {
        self.0.get(usize::from(status)).copied().unwrap_or(false)
    }
    /// Parses `2xx`-style classes and single statuses; on error, the index
    /// of the bad item and why.
    fn parse(items: &[String]) -> Result<Self, (usize, String)> {
        let mut set = [false; 600];
        for (i, item) in items.iter().enumerate() {
            let err = |m: String| (i, m);
            let item = item.trim();
            if let Some(class) = item.strip_suffix("xx") {
                let c: usize = class
                    .parse()
                    .ok()
                    .filter(|c| (1..=5).contains(c))
                    .ok_or_else(|| err(format!("`{item}` is not a status class like 2xx")))?;
                set[c * 100..c * 100 + 100].fill(true);
            } else {
                let s: usize = item
                    .parse()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        err(format!(
                            "`{item}` is not an HTTP status (100-599) or class (2xx)"
                        ))
                    })?;
                set[s] = true;
            }
        }
        Ok(Self(set))
    }
}

/// The validated plans file.
#[derive(Debug)]
pub struct Plans {
    pub plans: BTreeMap<String, Arc<Plan>>,
    pub default_plan: Arc<Plan>,
    pub routes: Vec<Route>,
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
        self.routes.iter().find(|r| r.matches(method, path))
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

    pub fn parse(src: &Source) -> Result<Self, Diagnostics> {
        let mut d = Diagnostics::default();
        let raw: RawPlans = match serde_yaml::from_str(&src.text) {
            Ok(r) => r,
            Err(e) => return Err(Diagnostics(vec![src.syntax_error(&e)])),
        };

        let mut plans = BTreeMap::new();
        for (name, value) in &raw.plans {
            let path = format!("plans.{name}");
            if !valid_token(name) {
                d.0.push(src.error(
                    &path,
                    format!("plan name `{name}` may only hold letters, digits, `_`, `-` and `.`"),
                    None,
                ));
            }
            let Some(rp) = src.typed::<RawPlan>(&path, value, &mut d) else {
                continue;
            };
            let mut limits = Vec::new();
            let mut seen = HashSet::new();
            for (i, l) in rp.limits.iter().enumerate() {
                let lp = format!("{path}.limits[{i}]");
                if !valid_token(&l.name) {
                    d.0.push(src.error(
                        &format!("{lp}.name"),
                        format!(
                            "policy name `{}` may only hold letters, digits, `_`, `-` and `.`",
                            l.name
                        ),
                        Some("it is sent to clients in the RateLimit headers"),
                    ));
                }
                if !seen.insert(l.name.clone()) {
                    d.0.push(src.error(
                        &format!("{lp}.name"),
                        format!("duplicate policy name `{}` in plan `{name}`", l.name),
                        Some("each limit of a plan needs its own name"),
                    ));
                }
                if l.requests <= 0 {
                    d.0.push(src.error(
                        &format!("{lp}.requests"),
                        format!("`requests` must be a positive number, got {}", l.requests),
                        Some("to make a plan unlimited, leave its limit out"),
                    ));
                }
                let window = Window::parse(&l.per);
                if window.is_none() {
                    d.0.push(src.error(
                        &format!("{lp}.per"),
                        format!("unknown window `{}`", l.per),
                        Some("use one of: second, minute, hour, day, month"),
                    ));
                }
                if let Some(m) = &l.overage_meter {
                    check_meter(src, &format!("{lp}.overage_meter"), m, &mut d);
                }
                if let (Some(window), true) = (window, l.requests > 0) {
                    limits.push(Limit {
                        name: l.name.as_str().into(),
                        quota: l.requests as u64,
                        window,
                        overage: l.overage || l.overage_meter.is_some(),
                        overage_meter: l.overage_meter.as_deref().map(Into::into),
                    });
                }
            }
            if let Some(m) = &rp.meter {
                check_meter(src, &format!("{path}.meter"), m, &mut d);
            }
            let policy_header = policy_header(&limits);
            plans.insert(
                name.clone(),
                Arc::new(Plan {
                    name: name.as_str().into(),
                    limits,
                    meter: rp.meter.as_deref().map(Into::into),
                    policy_header,
                }),
            );
        }

        let default_plan = match &raw.default_plan {
            None => {
                d.0.push(src.error(
                    "",
                    "`default_plan` is missing",
                    Some("name the plan new customers get, e.g. `default_plan: free`"),
                ));
                None
            }
            Some(p) => match plans.get(p) {
                Some(plan) => Some(plan.clone()),
                None => {
                    if !raw.plans.contains_key(p) {
                        d.0.push(src.error(
                            "default_plan",
                            format!("`default_plan` names unknown plan `{p}`"),
                            Some(&known(&raw.plans)),
                        ));
                    }
                    None
                }
            },
        };

        let mut routes = Vec::new();
        let mut route_index = Vec::new();
        for (i, value) in raw.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            let Some(r) = src.typed::<RawRoute>(&path, value, &mut d) else {
                continue;
            };
            match parse_route(&r) {
                Ok(route) => {
                    if route.public
                        && (r.cost.is_some() || r.meter.is_some() || r.usage_header.is_some())
                    {
                        d.0.push(src.error(&path, "a public route is neither limited nor metered, so `cost`, `meter` and `usage_header` make no sense on it", None));
                    }
                    if let Some(m) = &r.meter {
                        check_meter(src, &format!("{path}.meter"), m, &mut d);
                    }
                    routes.push(route);
                    route_index.push(i);
                }
                Err((field, msg, hint)) => {
                    d.0.push(src.error(&format!("{path}.{field}"), msg, hint))
                }
            }
        }

        // A cost no limit can ever hold would answer 429 forever.
        for (route, i) in routes.iter().zip(&route_index) {
            for plan in plans.values() {
                if let Some(l) = plan
                    .limits
                    .iter()
                    .find(|l| !l.overage && l.quota < route.cost)
                {
                    d.0.push(src.error(
                        &format!("routes[{i}].cost"),
                        format!(
                            "cost {} exceeds limit `{}` of plan `{}` ({} per {}): such requests could never be admitted",
                            route.cost, l.name, plan.name, l.quota, l.window.name()
                        ),
                        Some("raise the limit, lower the cost, or refuse the route for that plan upstream"),
                    ));
                }
            }
        }

        let statuses: Vec<String> = match &raw.billable_statuses {
            None => vec!["2xx".into()],
            Some(v) => v
                .iter()
                .map(|s| match s {
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    other => format!("{other:?}"),
                })
                .collect(),
        };
        let billable = match StatusSet::parse(&statuses) {
            Ok(s) => Some(s),
            Err((i, msg)) => {
                d.0.push(src.error(
                    &format!("billable_statuses[{i}]"),
                    msg,
                    Some("e.g. billable_statuses: [2xx, 304]"),
                ));
                None
            }
        };

        match (default_plan, billable) {
            (Some(default_plan), Some(billable)) if d.is_empty() => Ok(Plans {
                plans,
                default_plan,
                routes,
                billable,
            }),
            _ => Err(d),
        }
    }
}

fn known(plans: &BTreeMap<String, serde_yaml::Value>) -> String {
    if plans.is_empty() {
        return "define it under `plans:`".into();
    }
    let names: Vec<&str> = plans.keys().map(String::as_str).collect();
    format!("known plans: {}", names.join(", "))
}

/// Names that go into headers and metric labels: `[A-Za-z0-9_.-]{1,64}`.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn check_meter(src: &Source, path: &str, meter: &str, d: &mut Diagnostics) {
    if !valid_token(meter) {
        d.0.push(src.error(
            path,
            format!("meter name `{meter}` may only hold letters, digits, `_`, `-` and `.`"),
            Some("it must equal the event name of the billing meter, e.g. api_requests"),
        ));
    }
}

type RouteError = (&'static str, String, Option<&'static str>);

fn parse_route(r: &RawRoute) -> Result<Route, RouteError> {
    let pattern = r.pattern.trim();
    let (method, glob) = match pattern.split_once(' ') {
        Some((m, p)) => {
            let method = http::Method::from_bytes(m.as_bytes())
                .ok()
                .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    (
                        "match",
                        format!("`{m}` is not an HTTP method"),
                        Some("write it in capitals, e.g. \"POST /v1/sms/*\""),
                    )
                })?;
            (Some(method), p.trim())
        }
        None => (None, pattern),
    };
    if !glob.starts_with('/') {
        return Err((
            "match",
            format!("path `{glob}` must start with `/`"),
            Some("e.g. \"GET /v1/items/*\""),
        ));
    }
    let cost = match r.cost {
        None => DEFAULT_COST,
        Some(c) if c >= 0 => c as u64,
        Some(c) => {
            return Err((
                "cost",
                format!("`cost` must not be negative, got {c}"),
                None,
            ))
        }
    };
    let usage_header = match &r.usage_header {
        None => None,
        Some(h) => Some(http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
            (
                "usage_header",
                format!("`{h}` is not a valid header name"),
                None,
            )
        })?),
    };
    if usage_header.is_some() && r.cost.is_some() {
        return Err((
            "cost",
            "a route takes either `cost` or `usage_header`, not both".into(),
            Some("with usage_header the upstream reports the units"),
        ));
    }
    Ok(Route {
        method,
        glob: glob.to_owned(),
        public: r.public,
        cost,
        meter: r.meter.as_deref().map(Into::into),
        usage_header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Plans, Diagnostics> {
        Plans::parse(&Source::new(Path::new("plans.yaml"), text.into()))
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .expect_err("should fail")
            .0
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    #[test]
    fn the_shipped_plans_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plans.yaml");
        let plans = Plans::load(&path).unwrap();
        assert_eq!(&*plans.default_plan.name, "free");
        assert!(plans.get("enterprise").unwrap().limits.is_empty());
    }

    #[test]
    fn spec_example_parses() {
        let p = parse(
            r#"default_plan: free
plans:
  free:
    limits:
      - { name: burst, requests: 5, per: second }
      - { name: daily, requests: 100, per: day }
  pro:
    limits:
      - { name: monthly, requests: 50000, per: month }
    meter: api_requests
routes:
  - { match: "GET /health", public: true }
  - { match: "POST /v1/sms/*", cost: 5, meter: sms_sent }
  - { match: "/v1/ai/*", usage_header: X-Usage-Tokens, meter: ai_tokens }
billable_statuses: [2xx, 304]
"#,
        )
        .unwrap();
        assert_eq!(
            p.get("free").unwrap().policy_header,
            r#""burst";q=5;w=1, "daily";q=100;w=86400"#
        );
        let get = http::Method::GET;
        let post = http::Method::POST;
        assert!(p.route(&get, "/health").unwrap().public);
        assert!(p.route(&post, "/health").is_none());
        assert_eq!(p.route(&post, "/v1/sms/send").unwrap().cost, 5);
        assert!(p.route(&get, "/v1/sms/send").is_none());
        let ai = p.route(&get, "/v1/ai/chat/completions").unwrap();
        assert_eq!(ai.usage_header.as_ref().unwrap(), "x-usage-tokens");
        assert!(p.billable.contains(204) && p.billable.contains(304));
        assert!(!p.billable.contains(500) && !p.billable.contains(301));
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let errs = errors(
            "default_plan: gold\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 0, per: second }\n      - { name: burst, requests: 5, per: fortnight }\n  pro:\n    limits:\n      - { name: x, requests: 5, per: second, burst: 3 }\nroutes:\n  - { match: \"get /x\" }\nbillable_statuses: [2xx, 7xx]\n",
        );
        let all = errs.join("\n");
        assert!(
            all.contains("plans.yaml:5:34: error: `requests` must be a positive number, got 0"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:6:17: error: duplicate policy name `burst`"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:6:42: error: unknown window `fortnight`"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:9:46: error: unknown field `burst`"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:1:15: error: `default_plan` names unknown plan `gold`"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:11:14: error: `get` is not an HTTP method"),
            "{all}"
        );
        assert!(
            all.contains("plans.yaml:12:26: error: `7xx` is not a status class"),
            "{all}"
        );
        assert_eq!(errs.len(), 7, "{all}");
    }

    #[test]
    fn a_route_cost_above_a_quota_is_refused() {
        let all = errors("default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 3, per: second }\nroutes:\n  - { match: \"POST /sms\", cost: 5, meter: sms }\n").join("\n");
        assert!(all.contains("plans.yaml:7:33: error: cost 5 exceeds limit `burst` of plan `free` (3 per second)"), "{all}");
    }

    #[test]
    fn wrong_types_and_syntax_are_located() {
        let all = errors("default_plan: free\nplans:\n  free:\n    limits:\n      - { name: a, requests: lots, per: day }\n").join("\n");
        assert!(all.starts_with("plans.yaml:5:"), "{all}");
        assert!(all.contains("invalid type"), "{all}");
        let all = errors("default_plan: free\nplans: [\n").join("\n");
        assert!(all.starts_with("plans.yaml:"), "{all}");
    }

    #[test]
    fn policy_header_follows_the_draft() {
        let limits = [
            Limit {
                name: "burst".into(),
                quota: 5,
                window: Window::Sliding(1000),
                overage: false,
                overage_meter: None,
            },
            Limit {
                name: "monthly".into(),
                quota: 50_000,
                window: Window::Month,
                overage: false,
                overage_meter: None,
            },
        ];
        assert_eq!(
            policy_header(&limits),
            "\"burst\";q=5;w=1, \"monthly\";q=50000;w=2592000"
        );
        assert_eq!(policy_header(&[]), "");
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("/v1/*", "/v1/a/b"));
        assert!(glob_match("/v1/*/items", "/v1/x/items"));
        assert!(!glob_match("/v1/*/items", "/v1/x/other"));
        assert!(glob_match("/health", "/health"));
        assert!(!glob_match("/health", "/healthz"));
        assert!(glob_match("*", "/anything"));
    }
}
