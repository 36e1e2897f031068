//! `tollgate docs`: the documentation an operator publishes for its API's
//! consumers, generated from plans.yaml and tollgate.yaml so it is never
//! out of date: `index.html` (self-contained, with a "Try it" form),
//! `postman_collection.json` and, given the upstream's OpenAPI document,
//! an `openapi.json` that adds what Tollgate puts in front of it.

use std::fmt::Write as _;

use tollgate_core::plans::{Plan, Plans};
use tollgate_core::problem::Rejection;

use crate::config::Config;

mod openapi;
mod page;
mod postman;

pub use openapi::augment;
pub use page::{SCRIPT, STYLE};

/// The generated files.
pub struct Site {
    pub index: String,
    pub postman: String,
    pub openapi: Option<String>,
}

/// Renders the site for consumers calling `base_url` (empty: the page's
/// own origin, when Tollgate serves it at `/_tollgate/docs`).
pub fn render(
    config: &Config,
    base_url: &str,
    upstream: Option<&serde_json::Value>,
) -> Result<Site, String> {
    let base_url = base_url.trim_end_matches('/');
    let openapi = upstream
        .map(|doc| augment(doc, &config.plans).map(|d| d.to_string()))
        .transpose()?;
    Ok(Site {
        index: page::index(config, base_url),
        postman: postman::collection(config, base_url, upstream).to_string(),
        openapi,
    })
}

/// The path the examples call: `docs.example_path`, else the first keyed
/// route of plans.yaml with `*` filled in, else `/`.
pub fn example_path(config: &Config) -> String {
    if let Some(p) = config.docs.as_ref().and_then(|d| d.example_path.clone()) {
        return p;
    }
    config
        .plans
        .routes
        .iter()
        .find(|r| !r.public)
        .map(|r| r.glob.replace('*', "example"))
        .unwrap_or_else(|| "/".into())
}

/// A plan's limits in plain words: "5 requests per second and 100 per day".
pub fn limits_in_words(plan: &Plan) -> String {
    if plan.limits.is_empty() {
        return "No limits.".into();
    }
    let mut out = String::new();
    for (i, l) in plan.limits.iter().enumerate() {
        let per = match l.window.name().as_ref() {
            "second" => "a second".to_owned(),
            "minute" => "a minute".to_owned(),
            "hour" => "an hour".to_owned(),
            "day" => "a day (UTC)".to_owned(),
            "month" => "a calendar month (UTC)".to_owned(),
            other => format!("per {other}"),
        };
        let sep = match i {
            0 => "",
            n if n + 1 == plan.limits.len() => " and ",
            _ => ", ",
        };
        let unit = if i == 0 { " requests" } else { "" };
        let _ = write!(out, "{sep}{}{unit} {per}", group(l.quota));
        if l.overage {
            out.push_str(" (then billed as overage, not refused)");
        }
    }
    out.push('.');
    out
}

/// `1000000` → `1,000,000`.
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Every plan, the default first.
pub fn plans_in_order(plans: &Plans) -> Vec<&Plan> {
    let mut v: Vec<&Plan> = vec![&plans.default_plan];
    v.extend(
        plans
            .plans
            .values()
            .map(|p| &**p)
            .filter(|p| p.name != plans.default_plan.name),
    );
    v
}

/// Every refusal a consumer can meet, as core renders it.
pub fn errors(config: &Config) -> Vec<Rejection> {
    let mut all = Rejection::catalogue();
    if config.auth.is_none() {
        all.retain(|r| !matches!(r, Rejection::InvalidToken(_)));
    }
    all
}
