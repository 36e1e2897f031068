//! Consumer self-service: checkout and portal sessions at a local server
//! speaking Stripe's form-encoded API (paths, fields and headers as
//! <https://docs.stripe.com/api/checkout/sessions/create> and
//! <https://docs.stripe.com/api/customer_portal/sessions/create> define them
//! and as stripe-python sends them: brackets percent-encoded, Bearer key,
//! `Stripe-Version`, `Idempotency-Key`), and the dashboard in a real
//! headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::{Arc, OnceLock};

use harness::{Captured, Harness, MockProvider, STRIPE_KEY};
use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;
use tollgate_core::store::UpdateStore;

/// A Stripe stand-in: sessions for known customers, Stripe's error body
/// (`invalid_request_error`, `resource_missing`) for `cus_missing`.
fn stripe() -> (MockProvider, Arc<OnceLock<String>>) {
    let base = Arc::new(OnceLock::<String>::new());
    let b = base.clone();
    let server = MockProvider::start(move |c: &Captured| {
        let base = b.get().cloned().unwrap_or_default();
        if c.form().get("customer").map(String::as_str) == Some("cus_missing") {
            return (
                400,
                json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "param": "customer",
                    "message": "No such customer: 'cus_missing'", "request_log_url": "https://dashboard.stripe.com/logs/req_1"}})
                .to_string(),
            );
        }
        match c.path.as_str() {
            "/v1/checkout/sessions" => (
                200,
                json!({"id": "cs_test_a1", "object": "checkout.session", "mode": "subscription",
                    "url": format!("{base}/c/pay/cs_test_a1")})
                .to_string(),
            ),
            "/v1/billing_portal/sessions" => (
                200,
                json!({"id": "bps_1", "object": "billing_portal.session",
                    "url": format!("{base}/p/session/test_1")})
                .to_string(),
            ),
            // The browser lands here after "Upgrade".
            _ => (200, "{\"checkout\":\"page\"}".into()),
        }
    });
    base.set(server.url()).unwrap();
    (server, base)
}

fn harness(stripe: &MockProvider) -> Harness {
    builder(stripe).build()
}

fn builder(stripe: &MockProvider) -> harness::HarnessBuilder {
    Harness::builder()
        .env("T_STRIPE_KEY", STRIPE_KEY)
        .config(&format!(
            r#"checkout:
  stripe: {{ api_key_env: T_STRIPE_KEY, base_url: "{}", prices: {{ pro: price_1Pro, enterprise: price_ent }}, credit_pack: {{ price: price_1kCredits, credits: 1000 }}, success_url: "https://example.com/ok", cancel_url: "https://example.com/pricing", return_url: "https://example.com/account" }}
"#,
            stripe.url()
        ))
}

/// A portal session asked for with `key`, answered as JSON.
async fn portal(h: &Harness, key: &str) -> reqwest::Response {
    h.client
        .post(h.url("/_tollgate/billing/portal"))
        .bearer_auth(key)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
}

fn sessions(stripe: &MockProvider, path: &str) -> Vec<Captured> {
    stripe
        .captured()
        .into_iter()
        .filter(|c| c.path == path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_creates_a_stripe_session_exactly_as_the_sdk_does() {
    let (stripe, base) = stripe();
    let h = harness(&stripe);
    let key = h.key("cus_shop", None);
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .post(h.url("/_tollgate/billing/checkout"))
        .bearer_auth(&key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("plan=pro")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("{}/c/pay/cs_test_a1", base.get().unwrap()).as_str()
    );
    let sent = sessions(&stripe, "/v1/checkout/sessions");
    assert_eq!(sent.len(), 1);
    let c = &sent[0];
    assert_eq!(c.method, "POST");
    assert_eq!(
        c.header("authorization"),
        Some(format!("Bearer {STRIPE_KEY}").as_str())
    );
    assert_eq!(c.header("stripe-version"), Some("2024-09-30.acacia"));
    assert_eq!(
        c.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let idem = c.header("idempotency-key").unwrap();
    assert!(
        idem.len() >= 32 && idem.bytes().all(|b| b.is_ascii_hexdigit()),
        "{idem}"
    );
    let form: Vec<(String, String)> = c.form().into_iter().collect();
    let expect: Vec<(String, String)> = [
        ("cancel_url", "https://example.com/pricing"),
        ("client_reference_id", "cus_shop"),
        ("customer", "cus_shop"),
        ("line_items[0][price]", "price_1Pro"),
        ("line_items[0][quantity]", "1"),
        ("metadata[tollgate_plan]", "pro"),
        ("mode", "subscription"),
        ("success_url", "https://example.com/ok"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(form, expect);
    // Brackets percent-encoded, as stripe-python's urlencode sends them.
    assert!(
        c.body.contains("line_items%5B0%5D%5Bprice%5D=price_1Pro"),
        "{}",
        c.body
    );

    // JSON in, JSON out.
    let r = h
        .client
        .post(h.url("/_tollgate/billing/checkout"))
        .bearer_auth(&key)
        .header("accept", "application/json")
        .json(&json!({"plan": "enterprise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["url"],
        format!("{}/c/pay/cs_test_a1", base.get().unwrap())
    );
    let sent = sessions(&stripe, "/v1/checkout/sessions");
    assert_eq!(sent[1].form()["line_items[0][price]"], "price_ent");
    // Each session its own idempotency key.
    assert_ne!(
        sent[0].header("idempotency-key"),
        sent[1].header("idempotency-key")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_plan_is_400_and_a_stripe_error_is_502_without_its_internals() {
    let (stripe, _) = stripe();
    let h = harness(&stripe);
    let key = h.key("cus_shop2", None);
    let post = |key: String, body: &'static str| {
        h.client
            .post(h.url("/_tollgate/billing/checkout"))
            .bearer_auth(key)
            .header("accept", "application/json")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let r = post(key.clone(), "plan=gold").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:tollgate:problem:unknown-plan");
    assert!(
        p["detail"].as_str().unwrap().contains("enterprise, pro"),
        "{p}"
    );
    let r = post(key.clone(), "").await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(stripe.captured().is_empty(), "nothing reached Stripe");

    let missing = h.key("cus_missing", None);
    let r = post(missing, "plan=pro").await.unwrap();
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("billing-provider-error"), "{text}");
    for internal in [
        "No such customer",
        "resource_missing",
        "req_1",
        "invalid_request_error",
    ] {
        assert!(!text.contains(internal), "{internal} leaked: {text}");
    }
    // A subscriber changes plans in the portal: a second Checkout Session
    // would start a second subscription beside the first.
    h.store
        .update(|d| {
            d.customers.entry("cus_shop2".into()).or_default().billing =
                Some(tollgate_core::store::BillingState {
                    provider: "stripe".into(),
                    status: tollgate_core::store::BillingStatus::Active,
                    paid_plan: Some("pro".into()),
                    suspended: false,
                    last_event_at: 1,
                    last_event_id: "evt_1".into(),
                });
            Ok(())
        })
        .unwrap();
    h.sync();
    let before = stripe.captured().len();
    let r = post(key.clone(), "plan=enterprise").await.unwrap();
    assert_eq!(r.status(), 409);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:tollgate:problem:already-subscribed");
    assert_eq!(stripe.captured().len(), before);

    // No key: 401, as anywhere.
    let r = h
        .client
        .post(h.url("/_tollgate/billing/checkout"))
        .body("plan=pro")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_works_for_a_suspended_customer_and_sessions_are_never_charged() {
    let (stripe, base) = stripe();
    // A frozen clock: the sessions below all fall in one minute.
    let clock = Arc::new(ManualClock::at(1_796_000_000_000));
    let h = builder(&stripe).clock(clock.clone()).build();
    let key = h.key("cus_portal", None);
    // The free plan allows 5 a second: ten sessions in a row all pass,
    // and leave its limits untouched.
    for _ in 0..10 {
        let r = portal(&h, &key).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["url"],
            format!("{}/p/session/test_1", base.get().unwrap())
        );
    }
    let usage = h.report(&key).await;
    assert_eq!(usage["policies"][0]["remaining"], 5, "{usage}");
    assert_eq!(h.upstream_hits(), 0);
    let sent = sessions(&stripe, "/v1/billing_portal/sessions");
    assert_eq!(sent.len(), 10);
    assert_eq!(
        sent[0].form().into_iter().collect::<Vec<_>>(),
        vec![
            ("customer".to_owned(), "cus_portal".to_owned()),
            (
                "return_url".to_owned(),
                "https://example.com/account".to_owned()
            )
        ]
    );
    // Each session is a call on the operator's Stripe account: a customer
    // gets at most 20 a minute.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = portal(&h, &key).await;
        statuses.push(r.status().as_u16());
    }
    let mut expect = vec![200; 10];
    expect.extend([429, 429]);
    assert_eq!(statuses, expect);
    assert_eq!(sessions(&stripe, "/v1/billing_portal/sessions").len(), 20);
    clock.advance(60_000);
    // Suspended (by an operator, or by billing): the API refuses the key,
    // but the portal, where the customer pays, still opens.
    tollgate_core::store::admin::set_suspended(&h.store, "cus_portal", true).unwrap();
    h.sync();
    assert_eq!(h.status("/v1/x", &key).await, 403);
    assert_eq!(portal(&h, &key).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_checkout_configured_the_endpoints_say_so() {
    let h = Harness::start();
    let key = h.key("cus_none", None);
    let r = h
        .client
        .post(h.url("/_tollgate/billing/checkout"))
        .bearer_auth(&key)
        .body("plan=pro")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:tollgate:problem:billing-not-configured");
    // The dashboard still serves, with no upgrade or billing buttons.
    let page = h
        .get("/_tollgate/")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("data-plan="));
    assert!(!page.contains("Manage billing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_one_self_contained_page_locked_down_by_its_csp() {
    let (stripe, _) = stripe();
    let h = harness(&stripe);
    let r = h.get("/_tollgate/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(
        csp.contains("connect-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.text().await.unwrap();
    // No external asset of any kind.
    for external in ["src=\"http", "href=\"http", "@import", "url(http", "//cdn"] {
        assert!(!page.contains(external), "{external}");
    }
    assert!(page.contains("data-plan=\"pro\""));
    // Other methods: 405.
    let r = h.client.post(h.url("/_tollgate/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

/// Screenshots go here, kept after the run for a human to look at.
fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_pastes_a_key_in_chromium_and_sees_plan_limits_and_an_upgrade() {
    let (stripe, base) = stripe();
    // The default plans, and one with prepaid credits.
    let plans = harness::DEFAULT_PLANS.replace(
        "\nroutes:",
        "\n  prepaid:\n    meter: api_requests\n    limits: [{ name: burst, requests: 50, per: second }]\n    \
         credits: { grant: 1000, per: month }\n    meters: { api_requests: { credits_per_unit: 7 } }\nroutes:",
    );
    let h = builder(&stripe).plans(&plans).build();
    let key = h.key("cus_browser", None);
    assert_eq!(h.get_n("/v1/x", &key, 3).await, vec![200; 3]);
    let seen = dashboard(&h, &key, "dashboard", "upgrade").await;
    assert_eq!(seen["label"], "API key");
    assert_eq!(seen["plan"], "free");
    // free: burst 5/s and daily 100; three requests used of the daily.
    let bars = seen["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 2, "{seen}");
    assert_eq!(
        bars[1],
        json!({"label": "daily used", "now": 3, "max": 100})
    );
    assert!(
        seen["limit_text"][1]
            .as_str()
            .unwrap()
            .contains("3 / 100 used"),
        "{seen}"
    );
    // The free plan names no meter: nothing billable to list.
    assert_eq!(seen["usage_rows"], json!([]));
    assert_eq!(
        seen["upgrade_buttons"],
        json!(["Upgrade to enterprise", "Upgrade to pro"])
    );
    assert_eq!(seen["key_in_url"], false);
    assert_eq!(seen["cookies"], json!([]));
    assert_eq!(seen["storage"], 0);
    assert_eq!(seen["key_in_dom"], false);
    assert_eq!(
        seen["csp_violations"],
        json!([]),
        "the page broke its own CSP"
    );
    assert_eq!(
        seen["after_upgrade"],
        format!("{}/c/pay/cs_test_a1", base.get().unwrap())
    );
    assert_eq!(seen["key_in_url_after_upgrade"], false);
    let sent = sessions(&stripe, "/v1/checkout/sessions");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].form()["customer"], "cus_browser");
    assert!(artifacts().join("dashboard-phone.png").exists());
    assert_eq!(
        seen["credits"],
        Value::Null,
        "a plan without credits shows none"
    );
    assert_eq!(seen["buy_buttons"], json!([]), "nor sells any");

    // A customer with prepaid credits sees its balance.
    let prepaid = h.key("cus_browser_credits", Some("prepaid"));
    assert_eq!(h.get_n("/v1/x", &prepaid, 2).await, vec![200; 2]);
    let seen = dashboard(&h, &prepaid, "dashboard-credits", "buy").await;
    assert_eq!(seen["plan"], "prepaid");
    assert_eq!(
        seen["credits"], "Credits\n986 credits left 14 of 1,000 used this period",
        "{seen}"
    );
    assert_eq!(seen["csp_violations"], json!([]));
    assert!(artifacts().join("dashboard-credits-phone.png").exists());
    // Where a 402's `buy` link leads: a pack, bought in Stripe Checkout.
    assert_eq!(seen["buy_buttons"], json!(["Buy 1000 credits"]));
    assert_eq!(
        seen["after_upgrade"],
        format!("{}/c/pay/cs_test_a1", base.get().unwrap())
    );
    let sent = sessions(&stripe, "/v1/checkout/sessions");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].form()["mode"], "payment");
    assert_eq!(sent[1].form()["customer"], "cus_browser_credits");
    assert_eq!(sent[1].form()["metadata[tollgate_credits]"], "1000");
}

/// What `tests/py/dashboard.py` saw of the dashboard with `key`, its
/// screenshots named `name`; at the end it clicks `upgrade` (to pro) or
/// `buy` (a credit pack).
async fn dashboard(h: &Harness, key: &str, name: &str, click: &str) -> Value {
    let (url, key, out, name, click) = (
        h.url(""),
        key.to_owned(),
        artifacts(),
        name.to_owned(),
        click.to_owned(),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/dashboard.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &url, &key, out.to_str().unwrap(), &name, &click])
            .output()
            .expect("python3 with selenium (scripts/setup.sh installs it)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "dashboard.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_packs_are_bought_in_a_payment_mode_checkout() {
    let (stripe, _) = stripe();
    let h = Harness::builder()
        .plans(
            "default_plan: free\nplans:\n  free: {}\n  pro: {}\n  prepaid:\n    meter: api_requests\n    \
             meters: { api_requests: { credits_per_unit: 1 } }\n",
        )
        .env("T_STRIPE_KEY", STRIPE_KEY)
        .config(&format!(
            r#"checkout:
  stripe: {{ api_key_env: T_STRIPE_KEY, base_url: "{}", prices: {{ pro: price_1Pro }}, credit_pack: {{ price: price_1kCredits, credits: 1000 }}, success_url: "https://example.com/ok", cancel_url: "https://example.com/pricing" }}
"#,
            stripe.url()
        ))
        .build();
    let key = h.key("cus_buyer", Some("prepaid"));
    let buy = |body: Value| buy_as(&h, &key, body);
    async fn buy_as(h: &Harness, key: &str, body: Value) -> reqwest::Response {
        h.client
            .post(h.url("/_tollgate/billing/checkout"))
            .bearer_auth(key)
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .unwrap()
    }
    assert_eq!(buy(json!({"credits": 5000})).await.status(), 200);
    let sent = sessions(&stripe, "/v1/checkout/sessions");
    let form: Vec<(String, String)> = sent[0].form().into_iter().collect();
    let expect: Vec<(String, String)> = [
        ("cancel_url", "https://example.com/pricing"),
        ("client_reference_id", "cus_buyer"),
        ("customer", "cus_buyer"),
        ("line_items[0][price]", "price_1kCredits"),
        ("line_items[0][quantity]", "5"),
        ("metadata[tollgate_credits]", "5000"),
        ("mode", "payment"),
        ("success_url", "https://example.com/ok"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(form, expect);
    // Not a whole number of packs, none, or too many: refused before Stripe.
    for bad in [
        json!({"credits": 1500}),
        json!({"credits": 0}),
        json!({"credits": "lots"}),
        json!({"credits": 2_000_000}),
    ] {
        let r = buy(bad.clone()).await;
        assert_eq!(r.status(), 400, "{bad}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["type"], "urn:tollgate:problem:bad-credits", "{bad}");
    }
    // Credits would be worthless on a plan without them: not sold.
    let free = h.key("cus_free_buyer", Some("free"));
    let r = buy_as(&h, &free, json!({"credits": 1000})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(sessions(&stripe, "/v1/checkout/sessions").len(), 1);
}
