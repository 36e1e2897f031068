//! The access log: one JSON line per request with every field, request ids
//! both ways and in problem bodies, and never a key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_port, Harness};
use serde_json::Value;
use tollgate_core::clock::ManualClock;

const FIELDS: &[&str] = &[
    "time",
    "request_id",
    "method",
    "path",
    "status",
    "outcome",
    "customer",
    "plan",
    "key_id",
    "units",
    "meter",
    "upstream_ms",
    "total_ms",
    "bytes_sent",
    "user_agent",
];

/// The log's lines, once it holds `n`.
async fn lines(h: &Harness, n: usize) -> Vec<Value> {
    let path = h.dir.path().join("access.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        if lines.len() >= n {
            // The raw text, too: no key in it anywhere.
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} lines: {text}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_line_with_every_field_and_its_request_id() {
    let clock = Arc::new(ManualClock::at(1_796_000_000_000));
    let h = Harness::builder()
        .clock(clock)
        .config("access_log: { to: access.log }")
        .build();
    let (key, key_id) = h.key_with_id("cus_logged", None);
    // A client's own id travels upstream and back.
    let r = h
        .get("/v1/sms/x?secret=1")
        .bearer_auth(&key)
        .header("x-request-id", "client-req-1")
        .header("user-agent", "tests/1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "client-req-1");
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["x-request-id"], serde_json::json!(["client-req-1"]));
    // An unusable one is replaced by a generated UUIDv7.
    let r = h
        .get("/v1/x")
        .bearer_auth(&key)
        .header("x-request-id", "has spaces in it")
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "{generated}");
    // A refusal carries the id in its body, to quote to support.
    let r = h.get("/v1/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let id401 = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["request_id"], id401.as_str());
    // The free plan's burst is 5 a second; two were used: three more pass, then 429.
    for _ in 0..3 {
        assert_eq!(h.status("/v1/x", &key).await, 200);
    }
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let id429 = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["request_id"], id429.as_str());

    // A suspended customer's refusal names the customer too.
    let (suspended_key, _) = h.key_with_id("cus_paused", None);
    tollgate_core::store::admin::set_suspended(&h.store, "cus_paused", true).unwrap();
    h.sync();
    let r = h
        .get("/v1/x")
        .bearer_auth(&suspended_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let all = lines(&h, 8).await;
    for l in &all {
        for f in FIELDS {
            assert!(l.get(f).is_some(), "`{f}` missing from {l}");
        }
    }
    let first = &all[0];
    assert_eq!(first["request_id"], "client-req-1");
    assert_eq!(
        (first["method"].as_str(), first["path"].as_str()),
        (Some("GET"), Some("/v1/sms/x")),
        "no query string"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(
        (first["customer"].as_str(), first["plan"].as_str()),
        (Some("cus_logged"), Some("free"))
    );
    assert_eq!(first["key_id"], key_id.as_str());
    assert_eq!(first["user_agent"], "tests/1");
    assert!(first["upstream_ms"].as_f64().is_some() && first["total_ms"].as_f64().is_some());
    assert!(first["bytes_sent"].as_u64().unwrap() > 0);
    assert_eq!(all[1]["request_id"], generated.as_str());
    let unauth = &all[2];
    assert_eq!(
        (unauth["status"].as_u64(), unauth["outcome"].as_str()),
        (Some(401), Some("unauthenticated"))
    );
    assert!(
        unauth["customer"].is_null()
            && unauth["key_id"].is_null()
            && unauth["upstream_ms"].is_null()
    );
    let limited = &all[6];
    assert_eq!(
        (limited["status"].as_u64(), limited["outcome"].as_str()),
        (Some(429), Some("limited"))
    );
    assert_eq!(
        limited["customer"], "cus_logged",
        "a 429 names who was limited"
    );
    let paused = &all[7];
    assert_eq!(
        (paused["status"].as_u64(), paused["outcome"].as_str()),
        (Some(403), Some("forbidden"))
    );
    assert_eq!(
        (paused["customer"].as_str(), paused["plan"].as_str()),
        (Some("cus_paused"), Some("free")),
        "a suspended customer's 403 names who"
    );
    let text = std::fs::read_to_string(h.dir.path().join("access.log")).unwrap();
    assert!(
        !text.contains(&key) && !text.contains(&key[8..20]),
        "the key is in the access log"
    );
    assert!(
        !text.contains("secret=1"),
        "the query string is in the access log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_line_with_its_id() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let h = Harness::builder()
        .upstream(dead)
        .config("access_log: { to: access.log }")
        .build();
    let key = h.key("cus_502", None);
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["request_id"], id.as_str());
    let l = &lines(&h, 1).await[0];
    assert_eq!(
        (l["status"].as_u64(), l["outcome"].as_str()),
        (Some(502), Some("upstream_error"))
    );
    assert_eq!(l["request_id"], id.as_str());
    assert_eq!(l["units"], Value::Null, "never billed");
}
