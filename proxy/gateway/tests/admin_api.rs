//! The admin API against its own OpenAPI document: schemathesis (PyPI)
//! generates requests from `/admin/openapi.json` and runs every check it
//! has (`--checks all`: no 5xx, every status documented, responses matching
//! their schemas, schema-valid requests accepted and invalid ones refused,
//! undeclared methods answered 405, auth enforced, stateful links).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use harness::Harness;

const TOKEN: &str = "schemathesis-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_with_every_check() {
    // A sink whose dead letters can be replayed (it is never reachable).
    let h = Harness::builder()
        .admin_token(TOKEN)
        .env("TEST_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .config(&format!(
            "metering: {{ sinks: [{{ webhook: {{ url: \"http://127.0.0.1:{}/usage\", secret_env: TEST_WEBHOOK_SECRET }} }}] }}",
            harness::free_port()
        ))
        .build();
    // Something to find: a customer with keys, limits and usage.
    let key = h.key("cus_seed", Some("pro"));
    assert_eq!(h.get_n("/v1/x", &key, 3).await, vec![200; 3]);
    let url = format!("http://{}/admin/openapi.json", h.admin);
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                "-m",
                "schemathesis.cli",
                "--config-file",
                config,
                "run",
                &url,
            ])
            .args([
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--seed",
                "20261202",
            ])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .output()
            .expect("python3 with schemathesis (scripts/setup.sh installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("No issues found"),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It did test the operations, not skip them.
    assert!(stdout.contains("Tested: 24"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_methods_are_405_with_allow_and_unknown_paths_404() {
    let h = Harness::builder().admin_token(TOKEN).build();
    let base = format!("http://{}", h.admin);
    for (method, path, allow) in [
        ("TRACE", "/readyz", "GET"),
        ("POST", "/metrics", "GET"),
        ("PATCH", "/admin/customers/cus_1/limits", "GET, PUT, DELETE"),
        ("DELETE", "/admin/keys", "GET, POST"),
    ] {
        let r = h
            .client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = h
        .client
        .get(format!("{base}/admin/nothing"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The document lists this config's plans: what it allows, the API takes.
    let doc: serde_json::Value = h
        .client
        .get(format!("{base}/admin/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["components"]["schemas"]["PlanName"]["enum"],
        serde_json::json!(["enterprise", "free", "pro"])
    );
}
