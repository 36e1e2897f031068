//! Billing webhooks drive plans. Every delivery is signed by the provider's
//! own library or exactly as its docs define it (`tests/py/sign.py` says
//! which), and every payload is shaped as the provider's docs show it:
//! - Stripe: Event object, <https://docs.stripe.com/api/events/object>,
//!   Subscription object, <https://docs.stripe.com/api/subscriptions/object>;
//! - Paystack: <https://paystack.com/docs/payments/subscriptions/#listen-for-subscription-events>;
//! - Paddle Billing: <https://developer.paddle.com/webhooks/overview> and the
//!   `subscription.*` payloads of its webhook reference;
//! - Standard Webhooks: <https://www.standardwebhooks.com/>, Tollgate's own
//!   `customer.*` types (docs/billing-lifecycle.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::{metric, Harness, RedisServer};
use serde_json::{json, Value};

const STRIPE_SECRET: &str = "whsec_test_current";
const STRIPE_OLD_SECRET: &str = "whsec_test_previous";
const PAYSTACK_SECRET: &str = "sk_test_paystack_secret";
const PADDLE_SECRET: &str = "pdl_ntfset_01test_secret";
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn webhooks_config(on_past_due: &str) -> String {
    format!(
        r#"billing_webhooks:
  stripe: {{ secret_env: T_STRIPE, previous_secret_env: T_STRIPE_OLD, plans: {{ price_1Pro: pro, pro_monthly: pro, price_ent: enterprise }}, on_cancel: free, on_past_due: {on_past_due} }}
  paystack: {{ secret_env: T_PAYSTACK, plans: {{ PLN_pro123: pro }}, on_cancel: free, on_past_due: {on_past_due} }}
  paddle: {{ secret_env: T_PADDLE, plans: {{ pri_01pro: pro }}, on_cancel: free, on_past_due: {on_past_due} }}
  standard: {{ secret_env: T_STANDARD }}
"#
    )
}

fn harness(on_past_due: &str) -> Harness {
    builder(on_past_due).build()
}

fn builder(on_past_due: &str) -> harness::HarnessBuilder {
    Harness::builder()
        .env("T_STRIPE", STRIPE_SECRET)
        .env("T_STRIPE_OLD", STRIPE_OLD_SECRET)
        .env("T_PAYSTACK", PAYSTACK_SECRET)
        .env("T_PADDLE", PADDLE_SECRET)
        .env("T_STANDARD", STANDARD_SECRET)
        .config(&webhooks_config(on_past_due))
}

/// Metrics are per process and tests run in parallel: the tests that
/// deliver Stripe events take turns, so each can count its own.
static STRIPE_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How much a series grew between two scrapes.
fn grew(before: &str, after: &str, series: &str) -> f64 {
    metric(after, series).unwrap_or(0.0) - metric(before, series).unwrap_or(0.0)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Headers for each delivery, made by `tests/py/sign.py`.
fn sign(items: &[Value]) -> Vec<HashMap<String, String>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/sign.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it and the signing libraries)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::from(items.to_vec()).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sign.py failed (run scripts/setup.sh)"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stripe_sig(body: &str, secret: &str, ts: u64) -> String {
    sign(&[json!({"provider": "stripe", "secret": secret, "body": body, "timestamp": ts})])
        .remove(0)
        .remove("Stripe-Signature")
        .unwrap()
}

/// A Stripe event about a subscription of `customer` to `price`.
fn stripe_sub(
    id: &str,
    kind: &str,
    created: u64,
    customer: &str,
    status: &str,
    price: (&str, Option<&str>),
) -> String {
    json!({
        "id": id, "object": "event", "api_version": "2024-09-30.acacia", "created": created,
        "type": kind, "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "data": {"object": {
            "id": "sub_1Q0", "object": "subscription", "customer": customer, "status": status,
            "cancel_at_period_end": false,
            "items": {"object": "list", "data": [{
                "id": "si_1", "object": "subscription_item", "quantity": 1,
                "price": {"id": price.0, "object": "price", "lookup_key": price.1, "currency": "usd"}
            }]}
        }}
    })
    .to_string()
}

fn stripe_invoice(id: &str, kind: &str, created: u64, customer: &str) -> String {
    json!({
        "id": id, "object": "event", "created": created, "type": kind,
        "data": {"object": {"id": "in_1", "object": "invoice", "customer": customer, "subscription": "sub_1Q0", "status": if kind == "invoice.paid" { "paid" } else { "open" }}}
    })
    .to_string()
}

/// A POST of `body` to the provider's webhook endpoint.
fn deliver(
    h: &Harness,
    provider: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> reqwest::RequestBuilder {
    let mut req = h
        .client
        .post(h.url(&format!("/_tollgate/webhooks/{provider}")))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// Delivers a Stripe event signed with the current secret; status and body.
async fn stripe(h: &Harness, body: &str) -> (u16, Value) {
    let sig = stripe_sig(body, STRIPE_SECRET, now());
    send(deliver(h, "stripe", body, &[("stripe-signature", &sig)])).await
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The customer's plan and subscription as `/_tollgate/usage` reports them,
/// or the status when it refuses.
async fn plan_of(h: &Harness, key: &str) -> Result<(String, Value), u16> {
    let r = h
        .get("/_tollgate/usage")
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    if r.status() != 200 {
        return Err(r.status().as_u16());
    }
    let v: Value = r.json().await.unwrap();
    Ok((
        v["plan"].as_str().unwrap().to_owned(),
        v["subscription"].clone(),
    ))
}

async fn plan_name(h: &Harness, key: &str) -> String {
    plan_of(h, key)
        .await
        .map(|(p, _)| p)
        .unwrap_or_else(|s| format!("HTTP {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_signatures_from_the_official_sdk_pass_and_every_bad_one_is_a_400() {
    let _turn = STRIPE_TURN.lock().await;
    let h = harness("keep");
    let before = h.metrics().await;
    let key = h.key("cus_sig", None);
    let t = now();
    let body = stripe_sub(
        "evt_sig1",
        "customer.subscription.created",
        t,
        "cus_sig",
        "active",
        ("price_1Pro", None),
    );
    let good = stripe_sig(&body, STRIPE_SECRET, t);
    let good_v1 = good.split_once(",v1=").unwrap().1.to_owned();

    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String);
    let cases: Vec<Case> = vec![
        (
            "wrong secret",
            vec![("stripe-signature", stripe_sig(&body, "whsec_wrong", t))],
            body.clone(),
        ),
        (
            "stale timestamp",
            vec![(
                "stripe-signature",
                stripe_sig(&body, STRIPE_SECRET, t - 301),
            )],
            body.clone(),
        ),
        ("missing header", vec![], body.clone()),
        (
            "tampered body",
            vec![("stripe-signature", good.clone())],
            body.replace("price_1Pro", "price_ent"),
        ),
        (
            "malformed header",
            vec![("stripe-signature", format!("v1={good_v1}"))],
            body.clone(),
        ),
        (
            "not hex",
            vec![("stripe-signature", format!("t={t},v1=zz"))],
            body.clone(),
        ),
    ];
    for (what, headers, b) in &cases {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = deliver(&h, "stripe", b, &hs).send().await.unwrap();
        assert_eq!(r.status(), 400, "{what}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        let p: Value = r.json().await.unwrap();
        assert_eq!(
            p["type"], "urn:tollgate:problem:webhook-signature",
            "{what}"
        );
        assert!(!p.to_string().contains(STRIPE_SECRET), "{what}");
    }
    // A body over 1 MiB is refused before it is read in full.
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(1 << 20));
    let sig = stripe_sig(&huge, STRIPE_SECRET, t);
    let (status, p) = send(deliver(&h, "stripe", &huge, &[("stripe-signature", &sig)])).await;
    assert_eq!(status, 400);
    assert_eq!(p["type"], "urn:tollgate:problem:webhook-body-too-large");
    // None of that changed the plan.
    assert_eq!(plan_name(&h, &key).await, "free");

    // Stripe sends one v1 per active secret while a secret is rolled: one
    // valid among several passes.
    let several = format!(
        "t={t},v1={},v1={good_v1},v0={}",
        "0".repeat(64),
        "1".repeat(64)
    );
    let (status, v) = send(deliver(
        &h,
        "stripe",
        &body,
        &[("stripe-signature", &several)],
    ))
    .await;
    assert_eq!((status, v["result"].as_str()), (200, Some("applied")));
    assert_eq!(plan_name(&h, &key).await, "pro");

    // The previous secret still verifies during rotation.
    let body2 = stripe_sub(
        "evt_sig2",
        "customer.subscription.updated",
        t + 1,
        "cus_sig",
        "active",
        ("price_ent", None),
    );
    let old = stripe_sig(&body2, STRIPE_OLD_SECRET, t);
    let (status, _) = send(deliver(&h, "stripe", &body2, &[("stripe-signature", &old)])).await;
    assert_eq!(status, 200);
    assert_eq!(plan_name(&h, &key).await, "enterprise");

    let m = h.metrics().await;
    assert_eq!(
        grew(
            &before,
            &m,
            r#"tollgate_webhook_events_total{provider="stripe",result="rejected"}"#
        ),
        7.0
    );
    assert_eq!(
        grew(
            &before,
            &m,
            r#"tollgate_plan_changes_total{source="stripe"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_events_set_the_plan_once_and_in_order() {
    let _turn = STRIPE_TURN.lock().await;
    let h = harness("keep");
    let before = h.metrics().await;
    let key = h.key("cus_life", None);
    let t = now();
    // Subscribed: the price maps to pro, visible on the very next request.
    let created = stripe_sub(
        "evt_1",
        "customer.subscription.created",
        t - 100,
        "cus_life",
        "active",
        ("price_1Pro", Some("pro_monthly")),
    );
    assert_eq!(stripe(&h, &created).await.0, 200);
    let (plan, sub) = plan_of(&h, &key).await.unwrap();
    assert_eq!((plan.as_str(), sub.as_str()), ("pro", Some("active")));
    // lookup_key when the price id is not mapped.
    let by_lookup = stripe_sub(
        "evt_2",
        "customer.subscription.updated",
        t - 90,
        "cus_life",
        "active",
        ("price_unmapped", Some("pro_monthly")),
    );
    assert_eq!(stripe(&h, &by_lookup).await.1["result"], "applied");
    assert_eq!(plan_name(&h, &key).await, "pro");
    // A price of some other product: acknowledged, nothing changes.
    let other = stripe_sub(
        "evt_3",
        "customer.subscription.updated",
        t - 80,
        "cus_life",
        "active",
        ("price_tshirt", None),
    );
    assert_eq!(stripe(&h, &other).await.1["result"], "ignored");
    assert_eq!(plan_name(&h, &key).await, "pro");
    // A failed invoice for another product (its line's price is not
    // mapped) leaves the API plan alone.
    let tshirt = json!({"id": "evt_3b", "object": "event", "created": t - 70, "type": "invoice.payment_failed",
        "data": {"object": {"id": "in_9", "object": "invoice", "customer": "cus_life",
            "lines": {"object": "list", "data": [{"id": "il_1", "price": {"id": "price_tshirt"}}]}}}}).to_string();
    assert_eq!(stripe(&h, &tshirt).await.1["result"], "ignored");
    assert_eq!(plan_of(&h, &key).await.unwrap().1, "active");
    // Cancelled: on_cancel.
    let deleted = stripe_sub(
        "evt_4",
        "customer.subscription.deleted",
        t - 50,
        "cus_life",
        "canceled",
        ("price_1Pro", None),
    );
    assert_eq!(stripe(&h, &deleted).await.1["result"], "applied");
    let (plan, sub) = plan_of(&h, &key).await.unwrap();
    assert_eq!((plan.as_str(), sub.as_str()), ("free", Some("canceled")));
    // Stripe redelivers evt_1, and an update older than the cancellation
    // arrives late: neither brings pro back.
    assert_eq!(stripe(&h, &created).await.1["result"], "duplicate");
    let late = stripe_sub(
        "evt_5",
        "customer.subscription.updated",
        t - 60,
        "cus_life",
        "active",
        ("price_ent", None),
    );
    assert_eq!(stripe(&h, &late).await.1["result"], "stale");
    assert_eq!(plan_name(&h, &key).await, "free");
    // An event type that decides no plan is acknowledged.
    let unknown = json!({"id": "evt_6", "object": "event", "created": t, "type": "customer.updated", "data": {"object": {"id": "cus_life"}}}).to_string();
    assert_eq!(
        stripe(&h, &unknown).await,
        (200, json!({"received": true, "result": "ignored"}))
    );
    // Checkout Sessions Tollgate created name their plan in metadata.
    let checkout = json!({"id": "evt_7", "object": "event", "created": t, "type": "checkout.session.completed",
        "data": {"object": {"id": "cs_1", "object": "checkout.session", "mode": "subscription", "payment_status": "paid",
            "customer": "cus_life", "client_reference_id": "cus_life", "subscription": "sub_2", "metadata": {"tollgate_plan": "pro"}}}}).to_string();
    assert_eq!(stripe(&h, &checkout).await.1["result"], "applied");
    assert_eq!(plan_name(&h, &key).await, "pro");

    let m = h.metrics().await;
    for (result, n) in [
        ("applied", 4.0),
        ("duplicate", 1.0),
        ("stale", 1.0),
        ("ignored", 3.0),
    ] {
        let series =
            format!(r#"tollgate_webhook_events_total{{provider="stripe",result="{result}"}}"#);
        assert_eq!(grew(&before, &m, &series), n, "{result}");
    }
    // The store remembers both the plan and what was applied: a restart
    // (a fresh read of the file) keeps them.
    let data: Value = serde_json::to_value(
        tollgate_core::store::FileStore::unsnapshotted(&h.keys_path())
            .data()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(data["customers"]["cus_life"]["plan"], "pro");
    assert_eq!(
        data["customers"]["cus_life"]["billing"]["last_event_id"],
        "evt_7"
    );
    assert!(data["webhook_events"]["stripe:evt_1"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_on_past_due_policy_and_the_payment_that_restores() {
    let _turn = STRIPE_TURN.lock().await;
    for (policy, expected) in [
        ("keep", Ok("pro")),
        ("suspend", Err(403)),
        ("free", Ok("free")),
    ] {
        let h = harness(policy);
        let key = h.key("cus_due", None);
        let t = now();
        let sub = stripe_sub(
            "evt_a",
            "customer.subscription.created",
            t - 30,
            "cus_due",
            "active",
            ("price_1Pro", None),
        );
        assert_eq!(stripe(&h, &sub).await.0, 200);
        let failed = stripe_invoice("evt_b", "invoice.payment_failed", t - 20, "cus_due");
        assert_eq!(stripe(&h, &failed).await.0, 200);
        let got = plan_of(&h, &key).await.map(|(p, _)| p);
        assert_eq!(
            got.as_deref().map_err(|s| *s),
            expected,
            "on_past_due: {policy}"
        );
        if policy == "suspend" {
            // Suspended keys are refused on the API too, with the problem.
            let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
            assert_eq!(r.status(), 403, "{policy}");
        }
        let paid = stripe_invoice("evt_c", "invoice.paid", t - 10, "cus_due");
        assert_eq!(stripe(&h, &paid).await.0, 200);
        let (plan, sub) = plan_of(&h, &key).await.unwrap();
        assert_eq!(
            (plan.as_str(), sub.as_str()),
            ("pro", Some("active")),
            "restored after {policy}"
        );
        // Paused behaves like past due.
        let paused = stripe_sub(
            "evt_d",
            "customer.subscription.paused",
            t - 5,
            "cus_due",
            "paused",
            ("price_1Pro", None),
        );
        assert_eq!(stripe(&h, &paused).await.0, 200);
        assert_eq!(
            plan_of(&h, &key)
                .await
                .map(|(p, _)| p)
                .as_deref()
                .map_err(|s| *s),
            expected,
            "paused, {policy}"
        );
        let resumed = stripe_sub(
            "evt_e",
            "customer.subscription.resumed",
            t,
            "cus_due",
            "active",
            ("price_1Pro", None),
        );
        assert_eq!(stripe(&h, &resumed).await.0, 200);
        assert_eq!(plan_name(&h, &key).await, "pro", "resumed after {policy}");
    }
}

fn paystack_body(event: &str, customer: &str, plan: Option<&str>, at: &str) -> String {
    let plan = plan.map_or(json!({}), |p| json!({"id": 28, "name": "Pro", "plan_code": p, "interval": "monthly", "amount": 500000}));
    json!({"event": event, "data": {
        "id": 1_234_567, "domain": "test", "status": "success", "amount": 500_000, "currency": "NGN",
        "subscription_code": "SUB_vsyqdmlzble3uii", "paid_at": at, "createdAt": at,
        "customer": {"id": 84312, "first_name": "Ada", "email": "ada@example.com", "customer_code": customer},
        "plan": plan
    }})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paystack_events_signed_as_its_docs_define() {
    let h = harness("suspend");
    let key = h.key("CUS_xnxdt6s1zg1f4nx", None);
    let post = |body: String| {
        let sig = sign(&[json!({"provider": "paystack", "secret": PAYSTACK_SECRET, "body": body})])
            .remove(0);
        let sig = sig["x-paystack-signature"].clone();
        let req = deliver(&h, "paystack", &body, &[("x-paystack-signature", &sig)]);
        send(req)
    };
    let c = "CUS_xnxdt6s1zg1f4nx";
    let created = paystack_body(
        "subscription.create",
        c,
        Some("PLN_pro123"),
        "2026-12-01T10:00:00.000Z",
    );
    assert_eq!(post(created.clone()).await.1["result"], "applied");
    assert_eq!(plan_name(&h, &key).await, "pro");
    // The same bytes again are a redelivery.
    assert_eq!(post(created.clone()).await.1["result"], "duplicate");
    let failed = paystack_body(
        "invoice.payment_failed",
        c,
        None,
        "2026-12-01T11:00:00.000Z",
    );
    assert_eq!(post(failed).await.0, 200);
    assert_eq!(plan_of(&h, &key).await.err(), Some(403));
    let charged = paystack_body(
        "charge.success",
        c,
        Some("PLN_pro123"),
        "2026-12-01T12:00:00.000Z",
    );
    assert_eq!(post(charged).await.0, 200);
    assert_eq!(plan_name(&h, &key).await, "pro");
    // A charge without a plan (a one-off payment) decides nothing.
    let one_off = paystack_body("charge.success", c, None, "2026-12-01T12:30:00.000Z");
    assert_eq!(post(one_off).await.1["result"], "ignored");
    let not_renew = paystack_body(
        "subscription.not_renew",
        c,
        Some("PLN_pro123"),
        "2026-12-01T13:00:00.000Z",
    );
    assert_eq!(post(not_renew).await.0, 200);
    let (plan, sub) = plan_of(&h, &key).await.unwrap();
    assert_eq!((plan.as_str(), sub.as_str()), ("pro", Some("canceling")));
    let disabled = paystack_body(
        "subscription.disable",
        c,
        Some("PLN_pro123"),
        "2026-12-01T14:00:00.000Z",
    );
    assert_eq!(post(disabled).await.0, 200);
    assert_eq!(plan_name(&h, &key).await, "free");
    // Signed with another key: refused, nothing changes.
    let body = paystack_body(
        "subscription.create",
        c,
        Some("PLN_pro123"),
        "2026-12-01T15:00:00.000Z",
    );
    let forged =
        sign(&[json!({"provider": "paystack", "secret": "sk_test_other", "body": body})]).remove(0);
    let (status, p) = send(deliver(
        &h,
        "paystack",
        &body,
        &[("x-paystack-signature", &forged["x-paystack-signature"])],
    ))
    .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (400, Some("urn:tollgate:problem:webhook-signature"))
    );
    assert_eq!(plan_name(&h, &key).await, "free");
}

fn paddle_body(id: &str, kind: &str, at: &str, status: &str, price: &str) -> String {
    json!({
        "event_id": id, "event_type": kind, "occurred_at": at, "notification_id": format!("ntf_{id}"),
        "data": {"id": "sub_01hv8x29kz0t586xy6zn1a62ny", "status": status, "customer_id": "ctm_01hv6y1jedq4p1n0yqn5ba3ky4",
                 "currency_code": "USD", "items": [{"status": "active", "quantity": 1, "price": {"id": price, "product_id": "pro_01"}}]}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paddle_events_deduplicated_by_event_id_and_ordered_by_occurred_at() {
    let h = harness("free");
    let key = h.key("ctm_01hv6y1jedq4p1n0yqn5ba3ky4", None);
    let post = |body: String, secret: &'static str, extra: Option<&'static str>| {
        let ts = now();
        let mut sig =
            sign(&[json!({"provider": "paddle", "secret": secret, "body": body, "timestamp": ts})])
                .remove(0)["Paddle-Signature"]
                .clone();
        if let Some(h1) = extra {
            sig = format!("{sig};h1={h1}");
        }
        send(deliver(&h, "paddle", &body, &[("paddle-signature", &sig)]))
    };
    let created = paddle_body(
        "evt_01a",
        "subscription.created",
        "2026-12-01T10:00:00.000000Z",
        "active",
        "pri_01pro",
    );
    // Several h1 (Paddle sends one per secret while one is rotated).
    assert_eq!(
        post(created.clone(), PADDLE_SECRET, Some("00ff")).await.1["result"],
        "applied"
    );
    assert_eq!(plan_name(&h, &key).await, "pro");
    assert_eq!(
        post(created, PADDLE_SECRET, None).await.1["result"],
        "duplicate"
    );
    let past_due = paddle_body(
        "evt_01b",
        "subscription.past_due",
        "2026-12-01T11:00:00.5Z",
        "past_due",
        "pri_01pro",
    );
    assert_eq!(post(past_due, PADDLE_SECRET, None).await.0, 200);
    assert_eq!(plan_name(&h, &key).await, "free");
    let paid = paddle_body(
        "evt_01c",
        "transaction.completed",
        "2026-12-01T11:30:00Z",
        "completed",
        "pri_01pro",
    );
    assert_eq!(post(paid, PADDLE_SECRET, None).await.0, 200);
    assert_eq!(plan_name(&h, &key).await, "pro");
    let canceled = paddle_body(
        "evt_01d",
        "subscription.canceled",
        "2026-12-01T13:00:00Z",
        "canceled",
        "pri_01pro",
    );
    assert_eq!(post(canceled, PADDLE_SECRET, None).await.0, 200);
    // An update from before the cancellation, delivered after it.
    let late = paddle_body(
        "evt_01e",
        "subscription.updated",
        "2026-12-01T12:00:00Z",
        "active",
        "pri_01pro",
    );
    assert_eq!(post(late, PADDLE_SECRET, None).await.1["result"], "stale");
    assert_eq!(plan_name(&h, &key).await, "free");
    let forged = paddle_body(
        "evt_01f",
        "subscription.created",
        "2026-12-01T14:00:00Z",
        "active",
        "pri_01pro",
    );
    assert_eq!(post(forged, "pdl_other", None).await.0, 400);
    assert_eq!(plan_name(&h, &key).await, "free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_from_the_official_library_set_plans_and_suspend() {
    let h = harness("keep");
    let key = h.key("cus_std", None);
    let post = |id: &str, body: Value, ts: u64| {
        let body = body.to_string();
        let headers = sign(&[json!({"provider": "standard", "secret": STANDARD_SECRET, "id": id, "timestamp": ts, "body": body})]).remove(0);
        let hs: Vec<(String, String)> = headers.into_iter().collect();
        let req = {
            let pairs: Vec<(&str, &str)> =
                hs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            deliver(&h, "standard", &body, &pairs)
        };
        send(req)
    };
    let t = now();
    let change = json!({"type": "customer.plan_changed", "timestamp": "2026-12-01T10:00:00Z", "data": {"customer": "cus_std", "plan": "enterprise"}});
    assert_eq!(
        post("msg_1", change.clone(), t).await.1["result"],
        "applied"
    );
    assert_eq!(plan_name(&h, &key).await, "enterprise");
    assert_eq!(post("msg_1", change, t).await.1["result"], "duplicate");
    let suspend = json!({"type": "customer.suspended", "timestamp": "2026-12-01T11:00:00Z", "data": {"customer": "cus_std"}});
    assert_eq!(post("msg_2", suspend, t).await.0, 200);
    assert_eq!(plan_of(&h, &key).await.err(), Some(403));
    let resume = json!({"type": "customer.resumed", "timestamp": "2026-12-01T12:00:00Z", "data": {"customer": "cus_std"}});
    assert_eq!(post("msg_3", resume, t).await.0, 200);
    assert_eq!(plan_name(&h, &key).await, "enterprise");
    // A plan plans.yaml does not have is the sender's error: 400, nothing changes.
    let bogus = json!({"type": "customer.plan_changed", "data": {"customer": "cus_std", "plan": "platinum"}});
    let (status, p) = post("msg_4", bogus, t).await;
    assert_eq!(
        (status, p["type"].as_str()),
        (400, Some("urn:tollgate:problem:webhook-body"))
    );
    assert!(p["detail"].as_str().unwrap().contains("platinum"));
    // Five minutes and one second old: refused.
    let old =
        json!({"type": "customer.plan_changed", "data": {"customer": "cus_std", "plan": "free"}});
    assert_eq!(post("msg_5", old, t - 301).await.0, 400);
    assert_eq!(plan_name(&h, &key).await, "enterprise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_provider_is_404_and_other_methods_405() {
    let h = Harness::start();
    let r = h
        .client
        .post(h.url("/_tollgate/webhooks/stripe"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let h = harness("keep");
    let r = h.get("/_tollgate/webhooks/stripe").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = h
        .client
        .post(h.url("/_tollgate/webhooks/nope"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Tollgate's namespace never reaches the upstream, however it is spelled.
    let r = h.get("/%5Ftollgate/webhooks/stripe").send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(h.upstream_hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_reaches_a_second_instance_sharing_redis_within_a_second() {
    let _turn = STRIPE_TURN.lock().await;
    let redis = RedisServer::start();
    let url = format!("url: \"{}\", on_error: closed", redis.url());
    let a = builder("keep").redis(&url).build();
    let b = builder("keep").redis(&url).build();
    let key = a.key("cus_shared", None);
    b.sync();
    assert_eq!(plan_name(&b, &key).await, "free");
    let t = now();
    let body = stripe_sub(
        "evt_r1",
        "customer.subscription.created",
        t,
        "cus_shared",
        "active",
        ("price_1Pro", None),
    );
    assert_eq!(stripe(&a, &body).await.1["result"], "applied");
    let start = Instant::now();
    while plan_name(&b, &key).await != "pro" {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "instance b did not see the change within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stripe retries the delivery at the other instance: deduplicated there.
    assert_eq!(stripe(&b, &body).await.1["result"], "duplicate");
    // And ordering is shared too.
    let older = stripe_sub(
        "evt_r0",
        "customer.subscription.deleted",
        t - 10,
        "cus_shared",
        "canceled",
        ("price_1Pro", None),
    );
    assert_eq!(stripe(&b, &older).await.1["result"], "stale");
    assert_eq!(plan_name(&a, &key).await, "pro");
}

/// A paid credit pack (`checkout.session.completed`, `mode: payment`, the
/// session Tollgate's checkout made with `metadata.tollgate_credits`)
/// grants its credits once, however often Stripe delivers the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_credit_pack_grants_its_credits_once() {
    let _turn = STRIPE_TURN.lock().await;
    let h = builder("keep")
        .plans(
            "default_plan: payg\nplans:\n  payg:\n    meter: api_requests\n    \
             meters: { api_requests: { credits_per_unit: 1 } }\n  free: {}\n  pro: {}\n  enterprise: {}\n",
        )
        .build();
    let key = h.key("cus_pack", None);
    assert_eq!(h.status("/v1/x", &key).await, 402);
    let event = |id: &str, kind: &str, status: &str| {
        json!({"id": id, "object": "event", "api_version": "2024-09-30.acacia", "created": now(),
            "type": kind, "livemode": false, "pending_webhooks": 1,
            "data": {"object": {"id": "cs_test_pack", "object": "checkout.session", "mode": "payment",
                "payment_status": status, "amount_total": 500, "currency": "usd",
                "customer": "cus_pack", "client_reference_id": "cus_pack",
                "metadata": {"tollgate_credits": "5000"}}}})
        .to_string()
    };
    // Not paid yet (an asynchronous payment method): nothing granted.
    assert_eq!(
        stripe(&h, &event("evt_p0", "checkout.session.completed", "unpaid"))
            .await
            .1["result"],
        "ignored"
    );
    // ...and paid later (SEPA, ACH): granted on the payment.
    let paid = event("evt_p1", "checkout.session.async_payment_succeeded", "paid");
    assert_eq!(stripe(&h, &paid).await.1["result"], "applied");
    assert_eq!(h.report(&key).await["credits"]["remaining"], 5000);
    // Stripe retries the same event: a duplicate.
    assert_eq!(stripe(&h, &paid).await.1["result"], "duplicate");
    // Another event about the same purchase (the session): nothing more.
    let again = event("evt_p9", "checkout.session.completed", "paid");
    assert_eq!(stripe(&h, &again).await.1["result"], "duplicate");
    assert_eq!(
        h.report(&key).await["credits"],
        json!({"remaining": 5000, "granted": 5000, "used": 0})
    );
    assert_eq!(h.status("/v1/x", &key).await, 200);
    assert_eq!(h.report(&key).await["credits"]["remaining"], 4999);
    // A pack with a nonsensical amount is refused (the provider retries it
    // and an operator sees it), not granted as 0.
    let bad = event("evt_p2", "checkout.session.completed", "paid").replace("\"5000\"", "\"-3\"");
    assert_eq!(stripe(&h, &bad).await.0, 400);
}
