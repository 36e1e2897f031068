//! The admin status page, in a real headless Chromium: traffic by outcome
//! and plan with sparklines, latency, limiter, sinks, keys, config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use harness::{Harness, MockStripe, STRIPE_KEY};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_traffic_latency_limiter_and_sinks_in_chromium() {
    let stripe = MockStripe::start(|_| false);
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&format!("metering: {{ sinks: [{}] }}", stripe.sink()))
        .build();
    let key = h.key("cus_status", Some("pro"));
    // Three samples with traffic between them, as the 5 s sampler would take.
    h.app.history.sample();
    for _ in 0..3 {
        assert_eq!(h.get_n("/v1/x", &key, 4).await, vec![200; 4]);
        assert_eq!(h.get("/v1/x").send().await.unwrap().status(), 401);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        h.app.history.sample();
    }
    let (url, out) = (
        format!("http://{}", h.admin),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts"),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/status_page.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &url, out.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["title"], "Tollgate status");
    assert_eq!(
        seen["headings"],
        serde_json::json!([
            "Requests by outcome",
            "Requests by plan",
            "Latency, last 5 minutes",
            "Limiter",
            "Billing sinks",
            "Keys and customers"
        ])
    );
    let text = seen["text"].as_str().unwrap();
    for needle in [
        "allowed",
        "unauthenticated",
        "pro",
        "added by Tollgate",
        "upstream",
        "Backend memory",
        "stripe",
        "1 keys",
        &h.config.version,
    ] {
        assert!(text.contains(needle), "`{needle}` not on the page:\n{text}");
    }
    assert!(seen["sparklines"].as_u64().unwrap() >= 3, "{seen}");
    assert_eq!(
        seen["external"],
        serde_json::json!([]),
        "no external assets"
    );
    assert!(!text.contains(&key));
}
