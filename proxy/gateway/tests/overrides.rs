//! Per-customer limits through the admin API: applied at once, in the
//! headers and the usage report, on every instance sharing Redis within a
//! second, and gone again with DELETE.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Harness, RedisServer};
use serde_json::{json, Value};
use tollgate_core::clock::ManualClock;

const TOKEN: &str = "admin-secret";

fn admin(h: &Harness, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    h.client
        .request(method, format!("http://{}{path}", h.admin))
        .bearer_auth(TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_gets_its_own_limits_and_loses_them_again() {
    // A frozen clock: every request below falls in one second.
    let clock = Arc::new(ManualClock::at(1_796_000_000_000));
    let h = Harness::builder()
        .admin_token(TOKEN)
        .clock(clock.clone())
        .build();
    let key = h.key("cus_deal", None);
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.headers()["x-ratelimit-limit"], "5");

    let limits = json!({"limits": [
        {"name": "burst", "requests": 2, "per": "second"},
        {"name": "monthly", "requests": 1_000_000, "per": "month", "overage_meter": "api_overage"}
    ]});
    let r = admin(&h, reqwest::Method::PUT, "/admin/customers/cus_deal/limits")
        .json(&limits)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["limits"][1]["overage_meter"], "api_overage");
    // At once: the next request is limited by the customer's own burst of
    // 2 (one used before the change counts against it, by name).
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_owned();
    assert_eq!(policy, "\"burst\";q=2;w=1, \"monthly\";q=1000000;w=2592000");
    assert_eq!(h.status("/v1/x", &key).await, 429);
    let usage = h.report(&key).await;
    assert_eq!(usage["policies"][1]["limit"], 1_000_000);
    assert_eq!(usage["plan"], "free", "the plan's name stays");

    let got: Value = admin(&h, reqwest::Method::GET, "/admin/customers/cus_deal/limits")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["limits"], limits["limits"]);
    assert_eq!(
        got["effective"][0],
        json!({"name": "burst", "requests": 2, "per": "second"})
    );

    // Back to the plan's limits.
    let r = admin(
        &h,
        reqwest::Method::DELETE,
        "/admin/customers/cus_deal/limits",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    clock.advance(1000);
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.headers()["x-ratelimit-limit"], "5");
    // The customer's own limits are gone: that resource is a 404 now.
    let r = admin(&h, reqwest::Method::GET, "/admin/customers/cus_deal/limits")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_limits_are_a_400_naming_the_field() {
    let h = Harness::builder().admin_token(TOKEN).build();
    h.key("cus_x", None);
    for (body, needles) in [
        (
            json!({"limits": [{"name": "burst", "requests": 0, "per": "fortnight"}]}),
            vec!["limits[0].requests", "limits[0].per"],
        ),
        (
            json!({"limits": [{"name": "a b", "requests": 1, "per": "day", "colour": "red"}]}),
            vec!["limits[0].colour", "limits[0].name"],
        ),
        (
            json!({"limits": "ten a day"}),
            vec!["limits: must be a list"],
        ),
        (json!({"limitz": []}), vec!["unknown field `limitz`"]),
        (json!({}), vec!["`limits` is required"]),
    ] {
        let r = admin(&h, reqwest::Method::PUT, "/admin/customers/cus_x/limits")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let p: Value = r.json().await.unwrap();
        for n in needles {
            assert!(p["detail"].as_str().unwrap().contains(n), "{n} not in {p}");
        }
    }
    let r = admin(
        &h,
        reqwest::Method::DELETE,
        "/admin/customers/cus_nobody/limits",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_set_on_one_instance_apply_on_another_within_a_second() {
    let redis = RedisServer::start();
    let url = format!("url: \"{}\", on_error: closed", redis.url());
    let a = Harness::builder().admin_token(TOKEN).redis(&url).build();
    let b = Harness::builder().admin_token(TOKEN).redis(&url).build();
    let key = a.key("cus_shared_deal", None);
    b.sync();
    let r = admin(
        &a,
        reqwest::Method::PUT,
        "/admin/customers/cus_shared_deal/limits",
    )
    .json(&json!({"limits": [{"name": "hourly", "requests": 7000, "per": "hour"}]}))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let start = Instant::now();
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.headers()
            .get("x-ratelimit-limit")
            .and_then(|v| v.to_str().ok())
            == Some("7000")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "instance b still has the plan's limits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_an_unknown_customer_exits_1_and_of_a_known_one_0() {
    let h = Harness::builder().admin_token(TOKEN).build();
    let key = h.key("cus_known", None);
    assert_eq!(h.get_n("/v1/x", &key, 2).await, vec![200; 2]);
    let config = h.dir.path().join("tollgate.yaml");
    let run = move |customer: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args([
                    "-c",
                    config.to_str().unwrap(),
                    "usage",
                    "--customer",
                    customer,
                    "--json",
                ])
                .env("TEST_ADMIN_TOKEN", TOKEN)
                .env("RUST_LOG", "off")
                .output()
                .unwrap()
        })
    };
    let known = run("cus_known").await.unwrap();
    assert!(
        known.status.success(),
        "{}",
        String::from_utf8_lossy(&known.stderr)
    );
    let v: Value = serde_json::from_slice(&known.stdout).unwrap();
    assert_eq!(v[0]["customer"], "cus_known");
    let unknown = run("cus_typo").await.unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no customer `cus_typo`"));
}
