//! End-to-end behaviour of the proxy on the embedded default (file keys,
//! memory limits), through real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_port, Harness};
use reqwest::StatusCode;
use serde_json::Value;
use tollgate_core::clock::{Clock, ManualClock, SystemClock};

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn problem(r: reqwest::Response) -> Value {
    assert_eq!(header(&r, "content-type"), Some("application/problem+json"));
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_get_401_and_never_reach_the_upstream() {
    let h = Harness::start();
    let (key, id) = h.key_with_id("cus_a", None);
    let valid_looking_unknown = tollgate_core::keys::from_secret("tg_test_", &[9u8; 32]);
    let mut bad_checksum = key.clone();
    bad_checksum.pop();
    bad_checksum.push(if key.ends_with('A') { 'B' } else { 'A' });
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "missing-key"),
        (
            "wrong prefix",
            Some(key.replace("tg_test_", "tg_live_")),
            "malformed-key",
        ),
        ("bad checksum", Some(bad_checksum), "malformed-key"),
        ("garbage", Some("hunter2".into()), "malformed-key"),
        ("unknown", Some(valid_looking_unknown), "invalid-key"),
    ];
    for (what, k, slug) in cases {
        let mut req = h.get("/v1/vat/DE1");
        if let Some(k) = &k {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let www = header(&r, "www-authenticate").unwrap().to_owned();
        assert!(
            www.starts_with("Bearer realm=\"tollgate\""),
            "{what}: {www}"
        );
        let body = problem(r).await;
        assert_eq!(
            body["type"],
            format!("urn:tollgate:problem:{slug}"),
            "{what}"
        );
        assert_eq!(body["status"], 401);
        if let Some(k) = k {
            assert!(
                !body.to_string().contains(&k),
                "{what}: key material in body"
            );
        }
    }
    assert_eq!(
        h.upstream_hits(),
        0,
        "refused requests must not reach the upstream"
    );

    // Revoked and expired keys.
    tollgate_core::store::admin::revoke(&h.store, &id, SystemClock.now_ms()).unwrap();
    h.sync();
    let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(problem(r).await["type"], "urn:tollgate:problem:revoked-key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_and_suspended_customers_are_refused() {
    let h = Harness::start();
    let now = SystemClock.now_ms();
    let expired = tollgate_core::store::admin::create_key(
        &h.store,
        "tg_test_",
        tollgate_core::store::admin::CreateKey {
            customer: "cus_e",
            plan: None,
            name: None,
            expires: Some(now - 1000),
            set_plan: false,
            meta: None,
        },
        now,
    )
    .unwrap()
    .raw;
    h.sync();
    let r = h
        .get("/x")
        .header("x-api-key", &expired)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(problem(r).await["type"], "urn:tollgate:problem:expired-key");

    let key = h.key("cus_s", None);
    tollgate_core::store::admin::set_suspended(&h.store, "cus_s", true).unwrap();
    h.sync();
    let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(problem(r).await["type"], "urn:tollgate:problem:suspended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_headers_are_stripped_and_identity_headers_cannot_be_spoofed() {
    let h = Harness::start();
    let key = h.key("cus_hdr", Some("pro"));
    let r = h
        .get("/echo")
        .bearer_auth(&key)
        .header("x-tollgate-customer", "cus_admin")
        .header("x-tollgate-plan", "enterprise")
        .header("x-tollgate-key-id", "key_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert!(
        seen.get("authorization").is_none(),
        "key leaked upstream: {seen}"
    );
    assert_eq!(seen["x-tollgate-customer"], serde_json::json!(["cus_hdr"]));
    assert_eq!(seen["x-tollgate-plan"], serde_json::json!(["pro"]));
    let key_id = seen["x-tollgate-key-id"][0].as_str().unwrap();
    assert!(tollgate_core::keys::valid_key_id(key_id), "{key_id}");

    // X-API-Key is stripped too; an unrelated Authorization (Basic) is kept.
    let r = h
        .get("/echo")
        .header("x-api-key", &key)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    let seen: Value = r.json().await.unwrap();
    assert!(seen.get("x-api-key").is_none(), "{seen}");
    assert_eq!(
        seen["authorization"],
        serde_json::json!(["Basic dXNlcjpwYXNz"])
    );

    // The underscore spelling CGI-style servers fold into the same name.
    let r = h
        .get("/echo")
        .bearer_auth(&key)
        .header("x-tollgate_customer", "cus_admin")
        .send()
        .await
        .unwrap();
    let seen: Value = r.json().await.unwrap();
    assert!(seen.get("x-tollgate_customer").is_none(), "{seen}");
    assert_eq!(seen["x-tollgate-customer"], serde_json::json!(["cus_hdr"]));

    // Public routes pass without a key; spoofed identity and any key sent
    // anyway are dropped there too.
    let r = h
        .get("/health")
        .header("x-tollgate-customer", "cus_admin")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        header(&r, "x-ratelimit-limit").is_none(),
        "public routes are not limited"
    );
    let seen: Value = r.json().await.unwrap();
    assert!(seen.get("x-tollgate-customer").is_none(), "{seen}");
    assert!(
        seen.get("x-api-key").is_none(),
        "key leaked on a public route: {seen}"
    );
    let r = h.get("/health").bearer_auth(&key).send().await.unwrap();
    let seen: Value = r.json().await.unwrap();
    assert!(
        seen.get("authorization").is_none(),
        "key leaked on a public route: {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_normalised_path_the_upstream_will_see() {
    let h = Harness::start();
    let key = h.key("cus_path", Some("pro"));
    // An escaped "s" must not dodge the SMS route's cost and meter.
    let r = h
        .client
        .post(h.url("/v1/%73ms//send?x=1"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(
        seen["_target"],
        serde_json::json!(["/v1/sms/send?x=1"]),
        "upstream gets the routed path"
    );
    // Dot segments cannot climb out of a public route.
    let r = h.get("/health/../v1/private").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let u = h.report(&key).await;
    assert_eq!(u["usage"], serde_json::json!({"sms_sent": 5}), "{u}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_on_success_429_and_upstream_errors_then_recovery() {
    // A frozen clock: the burst fits one window, and crossing it is a step.
    let clock = ManualClock::at(SystemClock.now_ms());
    let h = Harness::builder().clock(Arc::new(clock.clone())).build();
    let key = h.key("cus_burst", None); // free: 5/second, 100/day
    let mut seen_remaining = Vec::new();
    for _ in 0..5 {
        let r = h.get("/echo").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "ratelimit-policy"),
            Some("\"burst\";q=5;w=1, \"daily\";q=100;w=86400")
        );
        assert!(header(&r, "ratelimit").unwrap().starts_with("\"burst\";r="));
        seen_remaining.push(
            header(&r, "x-ratelimit-remaining")
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(seen_remaining, vec![4, 3, 2, 1, 0], "headers count down");
    let r = h.get("/echo").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("5"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert!(header(&r, "ratelimit")
        .unwrap()
        .contains("\"burst\";r=0;t=1"));
    let body = problem(r).await;
    assert_eq!(body["violated-policies"], serde_json::json!(["burst"]));
    assert_eq!(h.upstream_hits(), 5, "the 429 never reached the upstream");

    // After the window, requests are admitted again.
    clock.advance(1_100);
    let r = h.get("/status/503").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 503, "upstream errors pass through");
    assert_eq!(
        header(&r, "x-ratelimit-remaining"),
        Some("4"),
        "with headers"
    );
    assert_eq!(
        header(&r, "ratelimit").map(|v| v.contains("\"daily\";r=94")),
        Some(true),
        "the 429 consumed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let h = Harness::builder().upstream(dead).build();
    let key = h.key("cus_502", None);
    let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        header(&r, "x-ratelimit-remaining"),
        Some("4"),
        "rate headers on 502"
    );
    let body = problem(r).await;
    assert_eq!(body["type"], "urn:tollgate:problem:upstream-unreachable");
    assert!(
        !body.to_string().contains(&dead.to_string()),
        "no internal address in the body"
    );
    // A metered customer is not billed for a 502.
    let pro = h.key("cus_502_pro", Some("pro"));
    assert_eq!(h.status("/x", &pro).await, 502);
    let usage = h.report(&pro).await;
    assert_eq!(usage["usage"], serde_json::json!({}), "{usage}");
    // The connection is closed after a 502, and the answer says so: a
    // client must not send its next request into the closing socket.
    {
        use std::io::{BufRead, BufReader, Write};
        let mut conn = std::net::TcpStream::connect(h.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            conn,
            "GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        for line in BufReader::new(conn).lines() {
            let line = line.unwrap();
            if line.is_empty() {
                break;
            }
            head.push(line.to_ascii_lowercase());
        }
        assert!(head[0].starts_with("http/1.1 502"), "{head:?}");
        assert!(head.iter().any(|l| l == "connection: close"), "{head:?}");
    }

    let h = Harness::builder()
        .config("timeouts: { read: 300ms }")
        .build();
    let key = h.key("cus_504", Some("pro"));
    let started = Instant::now();
    let r = h
        .get("/slow?ms=2000")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "the timeout applies"
    );
    assert_eq!(
        problem(r).await["type"],
        "urn:tollgate:problem:upstream-timeout"
    );
    // Neither is billed.
    let usage = h.report(&key).await;
    assert_eq!(usage["usage"], serde_json::json!({}), "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_per_meter_and_the_usage_header_is_stripped() {
    let h = Harness::start();
    let key = h.key("cus_ai", Some("pro"));
    for tokens in [120, 30] {
        let r = h
            .client
            .post(h.url(&format!("/v1/ai/chat?tokens={tokens}")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("x-usage-tokens").is_none(),
            "usage header must be stripped"
        );
    }
    for _ in 0..3 {
        assert_eq!(h.status("/v1/plain", &key).await, 200);
    }
    // Not billable: 5xx.
    assert_eq!(h.status("/status/500", &key).await, 500);
    // Route cost: POST /v1/sms/* costs 5 on its own meter.
    assert_eq!(
        h.client
            .post(h.url("/v1/sms/send"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let u = h.report(&key).await;
    assert_eq!(u["customer"], "cus_ai");
    assert_eq!(u["plan"], "pro");
    assert_eq!(
        u["usage"],
        serde_json::json!({"ai_tokens": 150, "api_requests": 3, "sms_sent": 5})
    );
    assert_eq!(u["policies"][0]["name"], "burst");
    assert_eq!(u["policies"][0]["limit"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_plan_changes_apply_within_a_second_without_restart() {
    let h = Harness::start();
    let (key, id) = h.key_with_id("cus_rev", Some("pro"));
    let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1000"));

    // A separate handle, like the CLI in another process.
    let cli_store = tollgate_core::store::FileStore::open(&h.keys_path()).unwrap();
    tollgate_core::store::admin::set_plan(&cli_store, "cus_rev", "enterprise").unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if header(&r, "x-ratelimit-limit").is_none() {
            break; // enterprise: unlimited, no limit headers
        }
        assert!(Instant::now() < deadline, "plan change not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let now = SystemClock.now_ms();
    tollgate_core::store::admin::revoke(&cli_store, &id, now).unwrap();
    let revoked_at = Instant::now();
    loop {
        let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "revocation not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_passes_without_a_key_and_errors_carry_cors_headers() {
    let h = Harness::builder()
        .config("cors: { allow_origins: [\"https://app.example.com\"] }")
        .build();
    let r = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/v1/vat/x"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(header(&r, "access-control-allow-headers")
        .unwrap()
        .contains("authorization"));

    // A browser can read a 401/429 from Tollgate.
    let r = h
        .get("/v1/vat/x")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(header(&r, "access-control-expose-headers")
        .unwrap()
        .contains("retry-after"));
    // Other origins get no CORS grant.
    let r = h
        .get("/v1/vat/x")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(header(&r, "access-control-allow-origin").is_none());

    // Without CORS config, preflights go to the upstream, still without a key.
    let h = Harness::start();
    let r = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/v1/vat/x"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.upstream_hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_quota_is_admitted_under_64_concurrent_clients() {
    let plans = "default_plan: metered\nplans:\n  metered:\n    limits:\n      - { name: monthly, requests: 300, per: month }\n    meter: api_requests\n";
    let h = Harness::builder().plans(plans).build();
    let key = h.key("cus_exact", None);
    let h = std::sync::Arc::new(h);
    let mut tasks = Vec::new();
    for c in 0..64 {
        let h = h.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut limited) = (0u32, 0u32);
            // 900 requests over 64 clients: 4 clients send 15, 60 send 14.
            let n = if c < 4 { 15 } else { 14 };
            for _ in 0..n {
                let r = client
                    .get(h.url("/v1/x"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!("unexpected status {s}"),
                }
            }
            (ok, limited)
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        ok += o;
        limited += l;
    }
    assert_eq!(ok + limited, 900);
    assert_eq!(ok, 300, "exactly the quota is admitted");
    assert_eq!(h.upstream_hits(), 300);
    let u = h.report(&key).await;
    assert_eq!(u["usage"]["api_requests"], 300);
    assert_eq!(u["policies"][0]["remaining"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_never_a_5xx_or_a_crash() {
    let h = Harness::start();
    let key = h.key("cus_hostile", Some("pro"));
    let huge = "A".repeat(60_000);
    let mut statuses = Vec::new();
    // Oversized key headers.
    for (name, value) in [
        ("authorization", format!("Bearer {huge}")),
        ("x-api-key", huge.clone()),
    ] {
        match h.get("/x").header(name, value).send().await {
            Ok(r) => statuses.push(r.status().as_u16()),
            // Refusing to read a 60 kB header by closing is acceptable too.
            Err(e) => assert!(!e.is_timeout(), "{e}"),
        }
    }
    // Non-UTF-8 and control-ish bytes.
    let raw = reqwest::header::HeaderValue::from_bytes(b"tg_test_\xff\xfe\xfd").unwrap();
    statuses.push(
        h.get("/x")
            .header("x-api-key", raw.clone())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
    );
    let raw_bearer = reqwest::header::HeaderValue::from_bytes(b"Bearer \xc3\x28").unwrap();
    statuses.push(
        h.get("/x")
            .header("authorization", raw_bearer)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
    );
    // Duplicate key headers, even with the same valid key.
    let mut dup = reqwest::header::HeaderMap::new();
    dup.append("x-api-key", key.parse().unwrap());
    dup.append("x-api-key", key.parse().unwrap());
    statuses.push(
        h.get("/x")
            .headers(dup)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
    );
    let r = h
        .get("/x")
        .bearer_auth(&key)
        .header("x-api-key", h.key("cus_other", None))
        .send()
        .await
        .unwrap();
    statuses.push(r.status().as_u16());
    let r = problem(
        h.get("/x")
            .header("x-api-key", &key)
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r["type"], "urn:tollgate:problem:ambiguous-key");
    // Keys with the right shape but wrong alphabet or length.
    for bad in [
        format!("{}!", &key[..key.len() - 1]),
        format!("{key}x"),
        "tg_test_".into(),
        "Bearer".into(),
    ] {
        statuses.push(
            h.get("/x")
                .header("x-api-key", bad)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert!(statuses.len() >= 9, "{statuses:?}");
    for s in &statuses {
        assert!((400..500).contains(s), "got {s} in {statuses:?}");
    }
    // Still serving.
    let r = h.get("/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        h.upstream_hits(),
        1,
        "no hostile request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_metrics_health_and_the_token_protected_api() {
    let h = Harness::builder().admin_token("t0ken").build();
    let key = h.key("cus_adm", Some("pro"));
    assert_eq!(h.status("/v1/x", &key).await, 200);
    let admin = |p: &str| format!("http://{}{}", h.admin, p);
    // The logging phase (where requests are counted) runs after the client
    // has its answer, so give it a moment.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = h
            .client
            .get(admin("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if harness::metric(
            &metrics,
            "tollgate_requests_total{outcome=\"allowed\",plan=\"pro\"}",
        ) >= Some(1.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        harness::metric(
            &metrics,
            "tollgate_requests_total{outcome=\"allowed\",plan=\"pro\"}"
        ) >= Some(1.0),
        "{metrics}"
    );
    assert!(!metrics.contains("cus_adm"), "no per-customer labels");
    assert_eq!(
        h.client
            .get(admin("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        h.client
            .get(admin("/admin/usage"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let u: Value = h
        .client
        .get(admin("/admin/usage?customer=cus_adm"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(u[0]["usage"]["api_requests"], 1);
    let all: Value = h
        .client
        .get(admin("/admin/usage"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        all.as_array().unwrap().len(),
        1,
        "customers come from the store: {all}"
    );
    assert_eq!(all[0]["customer"], "cus_adm");
    assert_eq!(all[0]["policies"][0]["limit"], 1000);
    let keys = h
        .client
        .get(admin("/admin/keys"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        keys.contains("cus_adm") && !keys.contains(&key),
        "keys list never shows the key"
    );
    let hash = hex::encode(tollgate_core::keys::hash(&key));
    assert!(!keys.contains(&hash), "nor its hash");

    // `tollgate usage` reads the same API and prints a table.
    let config = h.dir.path().join("tollgate.yaml");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["usage", "--customer", "cus_adm", "-c"])
            .arg(config)
            .env("TEST_ADMIN_TOKEN", "t0ken")
            .env("RUST_LOG", "off")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.contains("api_requests"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.starts_with("cus_adm") && row.contains(" pro ") && row.contains(" 1 "),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_manages_keys_and_plans() {
    let h = Harness::builder().admin_token("t0ken").build();
    let admin = |p: &str| format!("http://{}{}", h.admin, p);
    let post = |p: &str, body: &str| {
        h.client
            .post(admin(p))
            .bearer_auth("t0ken")
            .body(body.to_owned())
    };

    let r = h
        .client
        .post(admin("/admin/keys"))
        .body(r#"{"customer":"cus_api"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "writes need the token too");
    let r = post(
        "/admin/keys",
        r#"{"customer":"cus_api","plan":"pro","name":"ci"}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    // Usable at once on this instance.
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("1000"));

    let r = h
        .client
        .put(admin("/admin/customers/cus_api/plan"))
        .bearer_auth("t0ken")
        .body(r#"{"plan":"enterprise"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert!(
        header(&r, "x-ratelimit-limit").is_none(),
        "enterprise is unlimited"
    );

    let r = post(&format!("/admin/keys/{id}/rotate"), r#"{"grace":"1h"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let rotated: Value = r.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(h.status("/v1/x", &new_key).await, 200);
    assert_eq!(
        h.status("/v1/x", &key).await,
        200,
        "old key within its grace"
    );

    let new_id = rotated["id"].as_str().unwrap();
    assert_eq!(
        post(&format!("/admin/keys/{new_id}/revoke"), "")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(h.status("/v1/x", &new_key).await, 401);

    assert_eq!(
        post("/admin/customers/cus_api/suspend", "")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(h.status("/v1/x", &key).await, 403);
    assert_eq!(
        post("/admin/customers/cus_api/resume", "")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(h.status("/v1/x", &key).await, 200);

    // Bad input: clear 4xx problems, nothing changed.
    let r = post("/admin/keys", "{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "content-type"), Some("application/problem+json"));
    assert_eq!(
        post("/admin/keys", r#"{"customer":"cus_x","plan":"gold"}"#)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post("/admin/keys", r#"{"plan":"pro"}"#)
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post("/admin/keys/key_0000000000000000/revoke", "")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        post("/admin/reload", "").send().await.unwrap().status(),
        200
    );
    let keys = h
        .client
        .get(admin("/admin/keys?customer=cus_api"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !keys.contains(&key) && !keys.contains(&new_key),
        "the raw keys are shown once only"
    );
    let usage: Value = h
        .client
        .get(admin("/admin/customers/cus_api/usage"))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage[0]["plan"], "enterprise");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_unknown_fields_and_silent_plan_moves() {
    let h = Harness::builder().admin_token("t0ken").build();
    let send = |method: reqwest::Method, p: &str, body: &str| {
        h.client
            .request(method, format!("http://{}{}", h.admin, p))
            .bearer_auth("t0ken")
            .body(body.to_owned())
            .send()
    };
    let r = send(
        reqwest::Method::POST,
        "/admin/keys",
        r#"{"customer":"cus_f","plna":"pro"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let body = problem(r).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `plna`"),
        "{body}"
    );
    let r = send(
        reqwest::Method::PUT,
        "/admin/customers/cus_f/plan",
        r#"{"plna":"pro"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    // A second key with another plan would move the customer's first key.
    let r = send(
        reqwest::Method::POST,
        "/admin/keys",
        r#"{"customer":"cus_f","plan":"pro"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = send(
        reqwest::Method::POST,
        "/admin/keys",
        r#"{"customer":"cus_f","plan":"enterprise"}"#,
    )
    .await
    .unwrap();
    // A valid request that conflicts with the customer's current plan.
    assert_eq!(r.status(), 409);
    assert!(problem(r).await["detail"]
        .as_str()
        .unwrap()
        .contains("set_plan"));
    let r = send(
        reqwest::Method::POST,
        "/admin/keys",
        r#"{"customer":"cus_f","plan":"enterprise","set_plan":true}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_gated_by_plan_is_403_for_other_plans_and_unbilled_plans_are_never_metered() {
    let stripe = harness::MockStripe::start(|_| false);
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", harness::STRIPE_KEY)
        .config(&format!(
            "metering: {{ flush_interval: 100ms, rollup: 1s, sinks: [{}] }}",
            stripe.sink()
        ))
        .plans(
            "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 100, per: second }\n  pro:\n    meter: api_requests\n  internal:\n    billed: false\n    meter: api_requests\nroutes:\n  - { match: \"POST /v1/translate\", plans: [pro, internal], meter: translations }\n",
        )
        .build();
    let free = h.key("cus_free_t", None);
    let pro = h.key("cus_pro_t", Some("pro"));
    let internal = h.key("cus_internal_t", Some("internal"));
    let post = |key: &str| {
        h.client
            .post(h.url("/v1/translate"))
            .bearer_auth(key)
            .body("{}")
            .send()
    };
    let r = post(&free).await.unwrap();
    assert_eq!(r.status(), 403);
    let p: serde_json::Value = r.json().await.unwrap();
    assert_eq!(p["type"], "urn:tollgate:problem:not-in-plan");
    let detail = p["detail"].as_str().unwrap();
    // It names the plans a consumer could move to: not the unbilled one.
    assert!(
        detail.contains("plans pro,") && !detail.contains("internal"),
        "{p}"
    );
    assert_eq!(h.upstream_hits(), 0, "refused before the upstream");
    // Nothing was charged for the refusal.
    let u = h.report(&free).await;
    assert_eq!(u["policies"][0]["remaining"], 100);
    // Other routes stay open to the free plan.
    assert_eq!(h.status("/v1/x", &free).await, 200);
    assert_eq!(post(&pro).await.unwrap().status(), 200);
    assert_eq!(post(&internal).await.unwrap().status(), 200);
    let usage = |key: String| {
        let h = &h;
        async move {
            let v = h.report(&key).await;
            v["usage"].clone()
        }
    };
    assert_eq!(
        usage(pro.clone()).await,
        serde_json::json!({"translations": 1})
    );
    assert_eq!(
        usage(internal.clone()).await,
        serde_json::json!({}),
        "billed: false is never metered"
    );
    // At the local Stripe: the pro customer's translation arrives, the
    // internal plan's never does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stripe.total("translations") < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "pro's usage never reached Stripe"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let billed = stripe.billed();
    assert_eq!(
        billed.get(&("translations".into(), "cus_pro_t".into())),
        Some(&1)
    );
    assert!(
        billed.keys().all(|(_, c)| c != "cus_internal_t"),
        "a billed: false plan reached Stripe: {billed:?}"
    );
}
