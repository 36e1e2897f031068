//! plans.yaml as written, and its validation into [`Plans`]: one function
//! per part (plans and their limits, the default plan, routes, the cost
//! check across both, billable statuses), every problem located.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;

use super::{
    policy_header, valid_token, Limit, Plan, Plans, Route, StatusSet, Window, DEFAULT_COST,
};
use crate::body_usage::BodyFormat;
use crate::diag::{Diagnostics, Source};

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
    #[serde(default)]
    routes_case_insensitive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    limits: Vec<RawLimit>,
    meter: Option<String>,
    display_name: Option<String>,
    price: Option<String>,
    description: Option<String>,
    /// `false`: never reported to a sink (a free or internal plan).
    billed: Option<bool>,
    /// Prepaid credits granted per period.
    credits: Option<RawCredits>,
    /// Per meter: what one unit costs in credits.
    #[serde(default)]
    meters: BTreeMap<String, RawMeter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredits {
    #[serde(default)]
    grant: i64,
    per: Option<String>,
    #[serde(default)]
    rollover: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeter {
    credits_per_unit: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: String,
    requests: Option<i64>,
    per: Option<String>,
    /// Requests in flight at once, instead of `requests` per `per`.
    concurrent: Option<i64>,
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
    /// Units from the response body: `openai`, `anthropic` or
    /// `{ json: { meter: "dotted.path", ... } }`.
    usage: Option<serde_yaml::Value>,
    /// Only these plans may call the route (403 `not-in-plan` for others).
    plans: Option<Vec<String>>,
    /// Units held against the customer's credits while a request runs.
    reserve: Option<i64>,
}

impl Plans {
    pub fn parse(src: &Source) -> Result<Self, Diagnostics> {
        let mut d = Diagnostics::default();
        let raw: RawPlans = match serde_yaml::from_str(&src.text) {
            Ok(r) => r,
            Err(e) => return Err(Diagnostics(vec![src.syntax_error(&e)])),
        };
        let mut plans = BTreeMap::new();
        for (name, value) in &raw.plans {
            if let Some(plan) = parse_plan(src, name, value, &mut d) {
                plans.insert(name.clone(), Arc::new(plan));
            }
        }
        let default_plan = default_plan(src, &raw, &plans, &mut d);
        let routes = parse_routes(src, &raw.routes, &mut d);
        for (i, r) in &routes {
            for (j, p) in r.plans.iter().flatten().enumerate() {
                if !plans.contains_key(&**p) {
                    d.0.push(src.error(
                        &format!("routes[{i}].plans[{j}]"),
                        format!("`{p}` is not a plan in this file"),
                        Some(&known_plans(&plans)),
                    ));
                }
            }
        }
        check_costs(src, &routes, &plans, &mut d);
        let billable = billable(src, raw.billable_statuses.as_deref(), &mut d);
        match (default_plan, billable) {
            (Some(default_plan), Some(billable)) if d.is_empty() => Ok(Plans {
                plans,
                default_plan,
                routes: routes.into_iter().map(|(_, r)| r).collect(),
                routes_case_insensitive: raw.routes_case_insensitive,
                billable,
            }),
            _ => Err(d),
        }
    }
}

/// `plans.<name>`: its limits (each checked) and its meter.
fn parse_plan(
    src: &Source,
    name: &str,
    value: &serde_yaml::Value,
    d: &mut Diagnostics,
) -> Option<Plan> {
    let path = format!("plans.{name}");
    if !valid_token(name) {
        d.0.push(src.error(
            &path,
            format!("plan name `{name}` may only hold letters, digits, `_`, `-` and `.`"),
            None,
        ));
    }
    let rp = src.typed::<RawPlan>(&path, value, d)?;
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
        if l.name == crate::alerts::CREDITS {
            d.0.push(src.error(
                &format!("{lp}.name"),
                "`credits` names a customer's prepaid credits in alerts",
                Some("call the limit something else"),
            ));
        }
        if !seen.insert(l.name.clone()) {
            d.0.push(src.error(
                &format!("{lp}.name"),
                format!("duplicate policy name `{}` in plan `{name}`", l.name),
                Some("each limit of a plan needs its own name"),
            ));
        }
        limits.extend(parse_limit(src, &lp, l, d));
    }
    if let Some(m) = &rp.meter {
        check_meter(src, &format!("{path}.meter"), m, d);
    }
    let credits = parse_credits(src, name, &path, &rp, d);
    Some(Plan {
        name: name.into(),
        policy_header: policy_header(&limits),
        limits,
        meter: rp.meter.as_deref().map(Into::into),
        billed: rp.billed.unwrap_or(true),
        display: super::PlanDisplay {
            name: rp.display_name.clone(),
            price: rp.price.clone(),
            description: rp.description.clone(),
        },
        credits,
    })
}

/// `credits:` and `meters:` of a plan: None when it has neither.
fn parse_credits(
    src: &Source,
    name: &str,
    path: &str,
    rp: &RawPlan,
    d: &mut Diagnostics,
) -> Option<Arc<crate::credits::CreditPolicy>> {
    use crate::credits::{Allowance, CreditPolicy};
    if rp.credits.is_none() && rp.meters.is_empty() {
        return None;
    }
    let mut policy = CreditPolicy {
        plan: name.into(),
        ..CreditPolicy::default()
    };
    if let Some(c) = &rp.credits {
        if c.grant < 0 {
            d.0.push(src.error(
                &format!("{path}.credits.grant"),
                format!("`grant` must not be negative, got {}", c.grant),
                None,
            ));
        }
        let per = match c.per.as_deref().unwrap_or("month") {
            "month" => Window::Month,
            "day" => Window::Day,
            other => {
                d.0.push(src.error(
                    &format!("{path}.credits.per"),
                    format!("credits are granted per `day` or `month`, not `{other}`"),
                    None,
                ));
                Window::Month
            }
        };
        policy.allowance = Allowance {
            grant: c.grant.max(0) as u64,
            per,
            rollover: c.rollover,
        };
    }
    for (m, raw) in &rp.meters {
        let mp = format!("{path}.meters.{m}");
        check_meter(src, &mp, m, d);
        if raw.credits_per_unit < 0 {
            d.0.push(src.error(
                &format!("{mp}.credits_per_unit"),
                format!(
                    "`credits_per_unit` must not be negative, got {}",
                    raw.credits_per_unit
                ),
                None,
            ));
        }
        policy
            .prices
            .insert(m.as_str().into(), raw.credits_per_unit.max(0) as u64);
    }
    if !policy.prices.values().any(|p| *p > 0) {
        d.0.push(src.error(
            path,
            "a plan with `credits` needs a meter that costs them",
            Some("e.g. meters: { ai_output_tokens: { credits_per_unit: 4 } }"),
        ));
    }
    if !rp.billed.unwrap_or(true) {
        d.0.push(src.error(
            &format!("{path}.billed"),
            "a plan with credits is charged for its usage, so it cannot be `billed: false`",
            None,
        ));
    }
    Some(Arc::new(policy))
}

/// One limit at `lp`; None (with the errors recorded) when it cannot be used.
fn parse_limit(src: &Source, lp: &str, l: &RawLimit, d: &mut Diagnostics) -> Option<Limit> {
    if let Some(n) = l.concurrent {
        return parse_concurrent(src, lp, l, n, d);
    }
    let Some(requests) = l.requests else {
        d.0.push(src.error(
            lp,
            "a limit needs `requests` and `per`, or `concurrent`",
            Some("e.g. { name: burst, requests: 5, per: second } or { name: parallel, concurrent: 4 }"),
        ));
        return None;
    };
    if requests <= 0 {
        d.0.push(src.error(
            &format!("{lp}.requests"),
            format!("`requests` must be a positive number, got {requests}"),
            Some("to make a plan unlimited, leave its limit out"),
        ));
    }
    let per = l.per.as_deref().unwrap_or("");
    let window = Window::parse(per);
    if window.is_none() {
        d.0.push(src.error(
            &format!("{lp}.per"),
            if l.per.is_none() {
                "`per` is missing".to_owned()
            } else {
                format!("unknown window `{per}`")
            },
            Some("use one of: second, minute, hour, day, month, or whole seconds up to 1h like 10s or 5m"),
        ));
    }
    if let Some(m) = &l.overage_meter {
        check_meter(src, &format!("{lp}.overage_meter"), m, d);
    }
    let window = window.filter(|_| requests > 0)?;
    Some(Limit {
        name: l.name.as_str().into(),
        quota: requests as u64,
        window,
        overage: l.overage || l.overage_meter.is_some(),
        overage_meter: l.overage_meter.as_deref().map(Into::into),
    })
}

/// `{ name: parallel, concurrent: N }`: at most N requests in flight.
fn parse_concurrent(
    src: &Source,
    lp: &str,
    l: &RawLimit,
    n: i64,
    d: &mut Diagnostics,
) -> Option<Limit> {
    let before = d.0.len();
    for (field, set) in [
        ("requests", l.requests.is_some()),
        ("per", l.per.is_some()),
        ("overage", l.overage || l.overage_meter.is_some()),
    ] {
        if set {
            d.0.push(src.error(
                &format!("{lp}.{field}"),
                format!("a `concurrent` limit takes no `{field}`"),
                Some("it caps requests in flight; add a separate limit for a rate"),
            ));
        }
    }
    if n <= 0 {
        d.0.push(src.error(
            &format!("{lp}.concurrent"),
            format!("`concurrent` must be a positive number, got {n}"),
            None,
        ));
    }
    (d.0.len() == before).then(|| Limit {
        name: l.name.as_str().into(),
        quota: n as u64,
        window: Window::Concurrent,
        overage: false,
        overage_meter: None,
    })
}

fn default_plan(
    src: &Source,
    raw: &RawPlans,
    plans: &BTreeMap<String, Arc<Plan>>,
    d: &mut Diagnostics,
) -> Option<Arc<Plan>> {
    let Some(p) = &raw.default_plan else {
        d.0.push(src.error(
            "",
            "`default_plan` is missing",
            Some("name the plan new customers get, e.g. `default_plan: free`"),
        ));
        return None;
    };
    if let Some(plan) = plans.get(p) {
        return Some(plan.clone());
    }
    // A plan that is there but broken has its own errors already.
    if !raw.plans.contains_key(p) {
        d.0.push(src.error(
            "default_plan",
            format!("`default_plan` names unknown plan `{p}`"),
            Some(&known(&raw.plans)),
        ));
    }
    None
}

/// `routes`, each with the index it has in the file.
fn parse_routes(
    src: &Source,
    raw: &[serde_yaml::Value],
    d: &mut Diagnostics,
) -> Vec<(usize, Route)> {
    let mut routes = Vec::new();
    for (i, value) in raw.iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(r) = src.typed::<RawRoute>(&path, value, d) else {
            continue;
        };
        match parse_route(&r) {
            Ok(route) => {
                if route.public
                    && (r.cost.is_some()
                        || r.meter.is_some()
                        || r.usage_header.is_some()
                        || r.usage.is_some()
                        || r.plans.is_some()
                        || r.reserve.is_some())
                {
                    d.0.push(src.error(&path, "a public route is neither limited nor metered, so `cost`, `meter`, `usage_header`, `usage`, `plans` and `reserve` make no sense on it", None));
                }
                if let Some(m) = &r.meter {
                    check_meter(src, &format!("{path}.meter"), m, d);
                }
                if let Some(BodyFormat::Json(meters)) = route.usage.as_deref() {
                    for (m, _) in meters {
                        check_meter(src, &format!("{path}.usage.json"), m, d);
                    }
                }
                routes.push((i, route));
            }
            Err((field, msg, hint)) => d.0.push(src.error(&format!("{path}.{field}"), msg, hint)),
        }
    }
    routes
}

/// A cost no limit can ever hold would answer 429 forever.
fn check_costs(
    src: &Source,
    routes: &[(usize, Route)],
    plans: &BTreeMap<String, Arc<Plan>>,
    d: &mut Diagnostics,
) {
    for (i, route) in routes {
        for plan in plans.values() {
            if let Some(l) = plan.limits.iter().find(|l| {
                !l.overage && l.window != Window::Concurrent && l.quota < route.limit_cost()
            }) {
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
}

/// `billable_statuses` (default: 2xx).
fn billable(
    src: &Source,
    raw: Option<&[serde_yaml::Value]>,
    d: &mut Diagnostics,
) -> Option<StatusSet> {
    let statuses: Vec<String> = match raw {
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
    match StatusSet::parse(&statuses) {
        Ok(s) => Some(s),
        Err((i, msg)) => {
            d.0.push(src.error(
                &format!("billable_statuses[{i}]"),
                msg,
                Some("e.g. billable_statuses: [2xx, 304]"),
            ));
            None
        }
    }
}

impl StatusSet {
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

fn known_plans(plans: &BTreeMap<String, Arc<Plan>>) -> String {
    let names: Vec<&str> = plans.keys().map(String::as_str).collect();
    format!("known plans: {}", names.join(", "))
}

fn known(plans: &BTreeMap<String, serde_yaml::Value>) -> String {
    if plans.is_empty() {
        return "define it under `plans:`".into();
    }
    let names: Vec<&str> = plans.keys().map(String::as_str).collect();
    format!("known plans: {}", names.join(", "))
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

/// `usage:` of a route.
fn body_format(v: &serde_yaml::Value) -> Result<BodyFormat, RouteError> {
    const HINT: Option<&str> =
        Some("usage: openai, usage: anthropic, or usage: { json: { my_meter: \"usage.units\" } }");
    match v {
        serde_yaml::Value::String(s) if s == "openai" => Ok(BodyFormat::OpenAi),
        serde_yaml::Value::String(s) if s == "anthropic" => Ok(BodyFormat::Anthropic),
        serde_yaml::Value::Mapping(m) if m.len() == 1 => {
            let Some(serde_yaml::Value::Mapping(json)) = m.get("json") else {
                return Err(("usage", "`usage` takes one key, `json`".into(), HINT));
            };
            let mut meters = Vec::new();
            for (k, p) in json {
                let (Some(meter), Some(path)) = (k.as_str(), p.as_str()) else {
                    return Err((
                        "usage",
                        "`usage.json` maps meter names to dotted paths, both strings".into(),
                        HINT,
                    ));
                };
                let pointer = BodyFormat::pointer(path).ok_or_else(|| {
                    (
                        "usage",
                        format!("`{path}` is not a dotted path (e.g. usage.input_tokens)"),
                        None,
                    )
                })?;
                meters.push((Arc::<str>::from(meter), pointer));
            }
            if meters.is_empty() {
                return Err(("usage", "`usage.json` names no meter".into(), HINT));
            }
            Ok(BodyFormat::Json(meters))
        }
        other => Err((
            "usage",
            format!(
                "`{}` is not a usage format",
                serde_yaml::to_string(other).unwrap_or_default().trim()
            ),
            HINT,
        )),
    }
}

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
    if let Some(why) = never_matches(glob) {
        return Err((
            "match",
            format!("path `{glob}` can never match: {why}"),
            Some("routes match the decoded path with `.` and `..` resolved, without the query"),
        ));
    }
    let cost = non_negative("cost", r.cost, DEFAULT_COST)?;
    let reserve = non_negative("reserve", r.reserve, 0)?;
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
    let usage = r.usage.as_ref().map(body_format).transpose()?.map(Arc::new);
    if usage.is_some() && usage_header.is_some() {
        return Err((
            "usage",
            "a route takes either `usage` (from the body) or `usage_header`, not both".into(),
            None,
        ));
    }
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
        usage,
        reserve,
        plans: r
            .plans
            .as_ref()
            .map(|p| p.iter().map(|n| n.as_str().into()).collect()),
    })
}

/// A route's whole-number field, `default` when not given.
fn non_negative(field: &'static str, v: Option<i64>, default: u64) -> Result<u64, RouteError> {
    match v {
        None => Ok(default),
        Some(n) => u64::try_from(n).map_err(|_| {
            (
                field,
                format!("`{field}` must not be negative, got {n}"),
                None,
            )
        }),
    }
}

/// Why a route's path can never match a request's canonical path (escapes
/// decoded, dot segments resolved, slashes merged, no query), if it cannot.
fn never_matches(glob: &str) -> Option<&'static str> {
    if glob.contains('%') {
        Some("it holds a percent-escape; write the character itself")
    } else if glob.contains('?') {
        Some("it holds a query; routes match the path alone")
    } else if glob.contains('\\') {
        Some("it holds a backslash, which requests may not")
    } else if glob.contains("//") {
        Some("it holds an empty segment (`//`)")
    } else if glob.split('/').any(|seg| seg == "." || seg == "..") {
        Some("it holds a `.` or `..` segment")
    } else {
        None
    }
}
