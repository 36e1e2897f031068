//! Hot reload: a good plans change applies under load without a failed
//! request; a bad one is refused, counted and changes nothing; what takes
//! a restart is named, not half-applied.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{metric, Harness};
use serde_json::Value;

const TOKEN: &str = "reload-token";

fn plans(free_burst: u32) -> String {
    format!(
        "default_plan: free\nplans:\n  free:\n    limits:\n      - {{ name: burst, requests: {free_burst}, per: second }}\n      - {{ name: daily, requests: 100000, per: day }}\n  pro:\n    limits:\n      - {{ name: burst, requests: 100000, per: second }}\n    meter: api_requests\n"
    )
}

async fn reload(h: &Harness) -> (u16, Value) {
    let r = h
        .client
        .post(format!("http://{}/admin/reload", h.admin))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn free_limit(h: &Harness, key: &str) -> String {
    let r = h.get("/v1/x").bearer_auth(key).send().await.unwrap();
    r.headers()["x-ratelimit-limit"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_change_applies_under_load_and_a_bad_one_changes_nothing() {
    let h = Harness::builder()
        .plans(&plans(50))
        .admin_token(TOKEN)
        .build();
    let pro = h.key("cus_busy", Some("pro"));
    let free = h.key("cus_free", None);
    assert_eq!(free_limit(&h, &free).await, "50");

    // Load from 8 clients while the plans change under them.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, key) = (h.client.clone(), h.url("/v1/x"), pro.clone());
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&key).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(h.dir.path().join("plans.yaml"), plans(7)).unwrap();
    let (status, v) = reload(&h).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reloaded"], serde_json::json!(["keys", "config"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "a request failed during the reload"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    // The new limit is in force; what was used of `burst` and `daily`
    // (same names and windows) is kept.
    assert_eq!(free_limit(&h, &free).await, "7");
    let usage = h.report(&free).await;
    assert_eq!(
        usage["policies"][1]["remaining"],
        100_000 - 2,
        "the daily count survived: {usage}"
    );

    // A broken file: refused with its error at file:line, counted, and
    // the previous plans keep working; /readyz stays ready.
    let before = metric(
        &h.metrics().await,
        r#"tollgate_config_reloads_total{result="error"}"#,
    )
    .unwrap_or(0.0);
    std::fs::write(h.dir.path().join("plans.yaml"), "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: -3, per: second }\n").unwrap();
    let (status, p) = reload(&h).await;
    assert_eq!(status, 409);
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("plans.yaml:5:") && detail.contains("`requests` must be a positive number"),
        "{detail}"
    );
    let after = metric(
        &h.metrics().await,
        r#"tollgate_config_reloads_total{result="error"}"#,
    )
    .unwrap();
    assert!(after >= before + 1.0);
    assert_eq!(free_limit(&h, &free).await, "7");
    let r = h
        .client
        .get(format!("http://{}/readyz", h.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = h
        .client
        .get(format!("http://{}/", h.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("failed") && page.contains("requests"),
        "the status page shows the error"
    );

    // The file watcher picks up a fixed file by itself.
    std::fs::write(h.dir.path().join("plans.yaml"), plans(9)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while free_limit(&h, &free).await != "9" {
        assert!(
            Instant::now() < deadline,
            "the watched change was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_takes_a_restart_is_named_and_nothing_is_applied() {
    let h = Harness::builder()
        .plans(&plans(50))
        .admin_token(TOKEN)
        .build();
    let free = h.key("cus_r", None);
    let path = h.dir.path().join("tollgate.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // A new listen address and a plans change together: neither applies.
    let moved = text.replacen("listen: 127.0.0.1:", "listen: 127.0.0.2:", 1);
    std::fs::write(&path, moved).unwrap();
    std::fs::write(h.dir.path().join("plans.yaml"), plans(3)).unwrap();
    let (status, p) = reload(&h).await;
    assert_eq!(status, 409);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("take a restart (listen)"),
        "{p}"
    );
    assert_eq!(free_limit(&h, &free).await, "50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_docs_page_shows_the_plans_in_force_after_a_reload() {
    let h = Harness::builder()
        .plans(&plans(50).replace("  pro:\n", "  pro:\n    display_name: Pro Classic\n"))
        .config("docs: { title: Reloaded API, serve: true }")
        .admin_token(TOKEN)
        .build();
    let page = |path: &'static str| {
        let (client, url) = (h.client.clone(), h.url(path));
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert!(page("/_tollgate/docs").await.contains("Pro Classic"));
    std::fs::write(
        h.dir.path().join("plans.yaml"),
        plans(50).replace("  pro:\n", "  pro:\n    display_name: Pro Plus\n"),
    )
    .unwrap();
    assert_eq!(reload(&h).await.0, 200);
    let body = page("/_tollgate/docs").await;
    assert!(
        body.contains("Pro Plus") && !body.contains("Pro Classic"),
        "the docs page still shows the old plans"
    );
}
