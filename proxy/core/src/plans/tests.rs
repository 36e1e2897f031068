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
    assert!(
        all.contains(
            "plans.yaml:7:33: error: cost 5 exceeds limit `burst` of plan `free` (3 per second)"
        ),
        "{all}"
    );
}

#[test]
fn usage_formats_are_parsed_and_every_mistake_in_one_located() {
    let ok = Plans::parse(&Source::new(
        std::path::Path::new("plans.yaml"),
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: daily, requests: 3, per: day }\nroutes:\n  - { match: \"POST /a\", usage: openai, cost: 500, meter: m }\n  - { match: \"POST /b\", usage: { json: { chars: \"billing.chars\" } } }\n".into(),
    ))
    .unwrap();
    let a = &ok.routes[0];
    assert_eq!(
        a.usage.as_deref(),
        Some(&crate::body_usage::BodyFormat::OpenAi)
    );
    assert_eq!(
        (a.cost, a.limit_cost()),
        (500, 1),
        "cost is the fallback, a call counts 1"
    );
    assert_eq!(
        ok.routes[1].usage.as_deref(),
        Some(&crate::body_usage::BodyFormat::Json(vec![(
            "chars".into(),
            "/billing/chars".into()
        )]))
    );
    let all = errors("default_plan: free\nplans:\n  free: {}\nroutes:\n  - { match: \"/a\", usage: gemini }\n  - { match: \"/b\", usage: openai, usage_header: X-U }\n  - { match: \"/c\", usage: { json: { m: \"a..b\" } } }\n  - { match: \"/d\", public: true, usage: openai }\n  - { match: \"/e\", usage: { json: { \"bad meter\": \"a\" } } }\n").join("\n");
    for want in [
        "plans.yaml:5:27: error: `gemini` is not a usage format",
        "plans.yaml:6:27: error: a route takes either `usage` (from the body) or `usage_header`",
        "plans.yaml:7:20: error: `a..b` is not a dotted path",
        "plans.yaml:8:5: error: a public route is neither limited nor metered",
        "meter name `bad meter` may only hold",
    ] {
        assert!(all.contains(want), "{want}\nin\n{all}");
    }
}

#[test]
fn concurrency_caps_take_no_window_and_a_limit_needs_one_kind() {
    let ok = Plans::parse(&Source::new(
        std::path::Path::new("plans.yaml"),
        "default_plan: a\nplans:\n  a:\n    limits:\n      - { name: parallel, concurrent: 4 }\n      - { name: daily, requests: 9, per: day }\nroutes:\n  - { match: \"/x\", cost: 9 }\n".into(),
    ))
    .unwrap();
    let l = &ok.get("a").unwrap().limits[0];
    assert_eq!((l.quota, l.window), (4, Window::Concurrent));
    assert_eq!(
        crate::plans::policy_header(&ok.get("a").unwrap().limits),
        "\"daily\";q=9;w=86400",
        "a cap is not a RateLimit policy"
    );
    let all = errors("default_plan: a\nplans:\n  a:\n    limits:\n      - { name: p, concurrent: 0 }\n      - { name: q, concurrent: 2, per: second }\n      - { name: r }\n").join("\n");
    for want in [
        "plans.yaml:5:32: error: `concurrent` must be a positive number, got 0",
        "plans.yaml:6:40: error: a `concurrent` limit takes no `per`",
        "plans.yaml:7:9: error: a limit needs `requests` and `per`, or `concurrent`",
    ] {
        assert!(all.contains(want), "{want}\nin\n{all}");
    }
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

#[test]
fn routes_gated_by_plan_name_plans_that_exist() {
    let ok = parse("default_plan: free\nplans:\n  free: {}\n  pro: {}\n  internal: { billed: false }\nroutes:\n  - { match: \"POST /v1/translate\", plans: [pro, internal] }\n").unwrap();
    let r = ok.route(&http::Method::POST, "/v1/translate").unwrap();
    assert_eq!(r.plans.as_deref().unwrap().len(), 2);
    assert!(!ok.get("internal").unwrap().billed && ok.get("pro").unwrap().billed);
    let e = errors("default_plan: free\nplans:\n  free: {}\nroutes:\n  - { match: \"POST /v1/translate\", plans: [gold] }\n  - { match: \"GET /health\", public: true, plans: [free] }\n");
    assert!(
        e.iter()
            .any(|l| l.starts_with("plans.yaml:5:44: error: `gold` is not a plan")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|l| l.contains("a public route is neither limited nor metered")),
        "{e:?}"
    );
}

#[test]
fn a_limit_may_not_be_called_credits() {
    // Alerts name a customer's prepaid credits `credits`.
    let all = errors(
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: credits, requests: 5, per: month }\n",
    )
    .join("\n");
    assert!(
        all.contains("plans.yaml:5:17: error: `credits` names a customer's prepaid credits"),
        "{all}"
    );
}
