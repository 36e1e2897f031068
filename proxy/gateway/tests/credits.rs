//! Prepaid credits: charged per billable unit, 402 at zero, grants through
//! the admin API (idempotent), exact under concurrency, and the plan's
//! grant at the period edge; `reserve` holding credits while a request
//! runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use harness::Harness;
use serde_json::{json, Value};
use tollgate_core::clock::{days_from_civil, Date, ManualClock, DAY};

const TOKEN: &str = "credits-admin-token";

/// `prepaid`: 100 credits a month, a request costs 10. `payg`: no grant,
/// a request costs 1. `rolling`: like prepaid, unspent credits roll over.
const PLANS: &str = r#"
default_plan: prepaid
plans:
  prepaid:
    meter: api_requests
    credits: { grant: 100, per: month }
    meters: { api_requests: { credits_per_unit: 10 } }
  rolling:
    meter: api_requests
    credits: { grant: 100, per: month, rollover: true }
    meters: { api_requests: { credits_per_unit: 10 } }
  payg:
    meter: api_requests
    meters: { api_requests: { credits_per_unit: 1 } }
  free:
    limits: [{ name: daily, requests: 1000, per: day }]
routes:
  - { match: "GET /health", public: true }
  # Tokens are not priced in these plans, but a response that reports none
  # is billed on the plan's meter, which is: it costs credits.
  - { match: "POST /v1/chat/*", usage: openai }
  # Hold 4 (and 10) units at 10 credits while they run.
  - { match: "GET /slow", reserve: 4 }
  - { match: "GET /status/*", reserve: 10 }
"#;

fn harness() -> Harness {
    Harness::builder().plans(PLANS).admin_token(TOKEN).build()
}

fn remaining(r: &reqwest::Response) -> Option<i64> {
    r.headers()
        .get("tollgate-credits-remaining")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

async fn admin(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = h
        .client
        .request(method, format!("http://{}{path}", h.admin))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn grant(h: &Harness, customer: &str, body: Value) -> (u16, Value) {
    let path = format!("/admin/customers/{customer}/credits");
    admin(h, reqwest::Method::POST, &path, Some(body)).await
}

/// The admin API's balance and history of `customer`; asserts the history
/// adds up to the balance.
async fn balance(h: &Harness, customer: &str) -> Value {
    let path = format!("/admin/customers/{customer}/credits");
    let (status, v) = admin(h, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{v}");
    let sum: i64 = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(
        sum,
        v["credits"]["remaining"].as_i64().unwrap(),
        "history adds up: {v}"
    );
    v["credits"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_run_out_with_a_402_and_a_grant_brings_them_back_once() {
    let h = harness();
    let key = h.key("cus_pre", None);
    for left in (0..10).rev() {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            remaining(&r),
            Some(left * 10),
            "the balance after this response"
        );
    }
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(remaining(&r), Some(0));
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:tollgate:problem:credits-exhausted");
    assert_eq!(p["status"], 402);
    let r = h
        .client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        402,
        "a usage: route whose fallback costs credits"
    );
    assert_eq!(
        h.upstream_hits(),
        10,
        "the refused requests never reached the API"
    );
    // The consumer sees it in its own report.
    let r = h
        .get("/_tollgate/usage")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(remaining(&r), Some(0));
    let report: Value = r.json().await.unwrap();
    assert_eq!(
        report["credits"],
        json!({"remaining": 0, "granted": 100, "used": 100})
    );
    // A public route costs nothing and needs no credits.
    assert_eq!(h.get("/health").send().await.unwrap().status(), 200);

    // Granted once per idempotency key; the same key with another amount
    // is a conflict, not a second grant.
    let body = json!({"amount": 25, "idempotency_key": "support-4711", "reason": "outage credit"});
    // Not to a customer the store does not know (a typo grants nothing).
    let (status, v) = grant(&h, "cus_typo", body.clone()).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = grant(&h, "cus_pre", body.clone()).await;
    assert_eq!((status, v["granted"].clone()), (201, json!(true)), "{v}");
    assert_eq!(v["credits"]["remaining"], 25);
    let (status, v) = grant(&h, "cus_pre", body).await;
    assert_eq!(
        (status, v["granted"].clone()),
        (200, json!(false)),
        "a retry: {v}"
    );
    assert_eq!(v["credits"]["remaining"], 25);
    let (status, _) = grant(
        &h,
        "cus_pre",
        json!({"amount": 30, "idempotency_key": "support-4711"}),
    )
    .await;
    assert_eq!(status, 409);
    for bad in [
        json!({"amount": 0}),
        json!({"amount": 0.0}),
        json!({"amount": 1.5}),
        json!({"amount": 5, "colour": 1}),
        json!([5]),
    ] {
        assert_eq!(grant(&h, "cus_pre", bad.clone()).await.0, 400, "{bad}");
    }
    // 25 credits: three requests of 10 are admitted (the last one with 5
    // left, so the balance ends below zero), then 402 again.
    let statuses = h.get_n("/v1/x", &key, 4).await;
    assert_eq!(statuses, vec![200, 200, 200, 402]);
    let b = balance(&h, "cus_pre").await;
    assert_eq!(b, json!({"remaining": -5, "granted": 125, "used": 130}));
    // A removal.
    let (status, v) = grant(
        &h,
        "cus_pre",
        json!({"amount": -10, "reason": "chargeback"}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(v["credits"]["remaining"], -15);
    balance(&h, "cus_pre").await;
    // A plan without credits has no header and no balance in its report.
    let free = h.key("cus_free", Some("free"));
    let r = h.get("/v1/x").bearer_auth(&free).send().await.unwrap();
    assert_eq!((r.status().as_u16(), remaining(&r)), (200, None));
    let report = h.report(&free).await;
    assert!(report.get("credits").is_none(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_is_exact_under_64_concurrent_clients() {
    let h = Arc::new(harness());
    let key = h.key("cus_swarm", Some("payg"));
    let (status, _) = grant(
        &h,
        "cus_swarm",
        json!({"amount": 3000, "idempotency_key": "topup-1"}),
    )
    .await;
    assert_eq!(status, 201);
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (h, key, ok, refused) = (h.clone(), key.clone(), ok.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..60 {
                let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    402 => refused.fetch_add(1, Ordering::SeqCst),
                    s => panic!("unexpected {s}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, refused) = (ok.load(Ordering::SeqCst), refused.load(Ordering::SeqCst));
    assert_eq!(ok + refused, 64 * 60);
    // Every credit could be used; past zero, at most the requests already
    // admitted (one per client) finish.
    assert!((3000..3000 + 64).contains(&ok), "{ok} answered");
    assert_eq!(h.upstream_hits(), ok);
    let b = balance(&h, "cus_swarm").await;
    assert_eq!(b["used"], ok, "every answer was charged, once");
    assert_eq!(
        b["remaining"],
        3000 - ok as i64,
        "the balance is grants minus charges"
    );
}

fn utc(year: i64, month: u32, day: u32) -> u64 {
    days_from_civil(Date { year, month, day }) as u64 * DAY
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plans_grant_comes_back_at_the_month_edge_and_rolls_over_when_told() {
    let feb = utc(2027, 2, 1);
    let clock = ManualClock::at(feb - 2_000);
    let h = Harness::builder()
        .plans(PLANS)
        .admin_token(TOKEN)
        .clock(Arc::new(clock.clone()))
        .build();
    let pre = h.key("cus_edge", Some("prepaid"));
    let roll = h.key("cus_roll", Some("rolling"));
    assert_eq!(h.get_n("/v1/x", &pre, 4).await, vec![200; 4]);
    assert_eq!(h.get_n("/v1/x", &roll, 4).await, vec![200; 4]);
    clock.set(feb - 1);
    assert_eq!(
        balance(&h, "cus_edge").await["remaining"],
        60,
        "still January"
    );
    clock.set(feb);
    assert_eq!(
        balance(&h, "cus_edge").await,
        json!({"remaining": 100, "granted": 100, "used": 0}),
        "January's unspent 60 expired; February's 100 are new"
    );
    assert_eq!(
        balance(&h, "cus_roll").await,
        json!({"remaining": 160, "granted": 160, "used": 0}),
        "with rollover the 60 stay"
    );
    let r = h.get("/v1/x").bearer_auth(&pre).send().await.unwrap();
    assert_eq!(remaining(&r), Some(90));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_credits_keep_parallel_calls_from_overshooting_the_balance() {
    let h = harness();
    let key = h.key("cus_agents", Some("prepaid"));
    let slow = |ms: u64| {
        let req = h.get(&format!("/slow?ms={ms}")).bearer_auth(&key);
        tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
    };
    // Two calls in flight hold 80 of the 100 credits.
    // Long enough that both are in flight together however loaded the box.
    let (a, b) = (slow(2000), slow(2000));
    harness::wait_for("both calls admitted", 5, || {
        h.app.gate.holds.held("cus_agents") == 80
    })
    .await;
    // A third would need 40: refused before it reaches the upstream.
    let third = h.get("/slow?ms=0").bearer_auth(&key).send().await.unwrap();
    assert_eq!(third.status(), 402);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:credits-exhausted");
    // One without a reserve needs only what is not held.
    assert_eq!(h.status("/v1/x", &key).await, 200);
    assert_eq!((a.await.unwrap(), b.await.unwrap()), (200, 200));
    // Settled: each charged what it cost (10), the holds gone before the
    // answers reached the client.
    assert_eq!(h.app.gate.holds.held("cus_agents"), 0);
    let r = h.get("/slow?ms=0").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(remaining(&r), Some(60), "100 - 4 x 10, this one included");
    assert_eq!(balance(&h, "cus_agents").await["remaining"], 60);
    // A call that fails holds the whole balance while it runs, is not
    // billed (5xx), and gives its hold back: the next one is admitted.
    let other = h.key("cus_failing", Some("prepaid"));
    assert_eq!(h.status("/status/503", &other).await, 503);
    assert_eq!(h.status("/status/200", &other).await, 200);
    assert_eq!(balance(&h, "cus_failing").await["remaining"], 90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_holds_no_credits_while_it_stays_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that switches protocols (a websocket, say) and keeps the
    // tunnel open.
    let upstream = harness::MockProvider::start(|_| (101, String::new()));
    let h = Harness::builder()
        .plans(PLANS)
        .admin_token(TOKEN)
        .upstream(upstream.addr)
        .build();
    let key = h.key("cus_socket", Some("prepaid"));
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(
        format!(
            "GET /slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 512];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel is open (this socket); the route's hold of 40 is not.
    assert_eq!(h.app.gate.holds.held("cus_socket"), 0);
    drop(s);
}

/// With Redis limits, instances share one balance in Redis: a grant made
/// through one is seen (and deduplicated) by the other, 64 clients split
/// across both spend it with charges exact to the credit, and a call out of
/// credits is refused 402 by either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exact_balance_through_redis() {
    let redis = tollgate_testkit::RedisServer::start();
    let r = format!("url: \"{}\", timeout: 2s", redis.url());
    let build = || {
        Arc::new(
            Harness::builder()
                .plans(PLANS)
                .admin_token(TOKEN)
                .redis(&r)
                .build(),
        )
    };
    let (a, b) = (build(), build());
    let key = a.key("cus_shared", Some("payg"));
    b.sync();
    let topup = json!({"amount": 2000, "idempotency_key": "topup-shared"});
    assert_eq!(grant(&a, "cus_shared", topup.clone()).await.0, 201);
    let (status, v) = grant(&b, "cus_shared", topup).await;
    assert_eq!(
        (status, v["credits"]["remaining"].as_i64()),
        (200, Some(2000)),
        "{v}"
    );
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let h = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (key, ok) = (key.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok.fetch_add(1, Ordering::SeqCst),
                    402 => 0,
                    s => panic!("unexpected {s}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = ok.load(Ordering::SeqCst);
    // Every credit could be used. Past zero, the calls admitted before the
    // other instance's last charges reached Redis (a few ms of them) finish.
    assert!((2000..2000 + 256).contains(&ok), "{ok} answered");
    assert_eq!(a.upstream_hits() + b.upstream_hits(), ok);
    // Once each instance has delivered its charges, both agree, exactly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for h in [&a, &b] {
        loop {
            let v = balance(h, "cus_shared").await;
            if v["used"] == ok {
                assert_eq!(
                    v["remaining"],
                    2000 - ok as i64,
                    "grants minus charges: {v}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "charges never all applied: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    for h in [&a, &b] {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 402);
        assert!(remaining(&r).unwrap() <= 0);
    }
}
