//! `tollgate docs`: the consumer documentation says what the gateway does,
//! its examples run, its Postman collection and OpenAPI document are valid
//! (checked by `openapi-spec-validator` from PyPI), and "Try it" works in
//! a real headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::process::Command;

use harness::Harness;
use serde_json::{json, Value};

const PLANS: &str = r#"
default_plan: free
plans:
  free:
    display_name: Free
    price: "$0"
    description: To try the API.
    limits:
      - { name: burst, requests: 5, per: second }
      - { name: daily, requests: 100, per: day }
  pro:
    display_name: Pro
    price: "$49 / month"
    limits:
      - { name: burst, requests: 50, per: second }
      - { name: monthly, requests: 1000000, per: month }
    meter: api_requests
  enterprise:
    limits: []
routes:
  - { match: "GET /health", public: true }
  - { match: "GET /v1/vat/*", cost: 1 }
"#;

const DOCS: &str = "docs: { title: VAT validation API, description: Validate EU VAT numbers., support: support@example.com, example_path: /v1/vat/DE136695976, serve: true }";

/// An upstream document as a user would have it (3.0, YAML-free JSON).
fn upstream(version: &str) -> Value {
    json!({
        "openapi": version,
        "info": {"title": "VAT", "version": "1.0"},
        "paths": {
            "/v1/vat/{number}": {"get": {"operationId": "checkVat", "summary": "Check a VAT number",
                "parameters": [{"name": "number", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The result", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/health": {"get": {"operationId": "health", "responses": {"200": {"description": "ok"}}}}
        }
    })
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The text of `<code data-snippet="lang">`.
fn snippet(page: &str, lang: &str) -> String {
    let open = format!("<code data-snippet=\"{lang}\">");
    let start = page
        .find(&open)
        .unwrap_or_else(|| panic!("no {lang} snippet"))
        + open.len();
    let end = start + page[start..].find("</code>").unwrap();
    unescape(&page[start..end])
}

#[test]
fn the_cli_writes_a_page_a_collection_and_a_valid_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plans.yaml"), PLANS).unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!("upstream: http://127.0.0.1:8000\nkeys: {{ path: keys.db, prefix: tg_live_ }}\n{DOCS}\n"),
    )
    .unwrap();
    for version in ["3.0.3", "3.1.0"] {
        std::fs::write(
            dir.path().join("upstream.json"),
            upstream(version).to_string(),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "-c",
                "tollgate.yaml",
                "docs",
                "--out",
                "site",
                "--base-url",
                "https://api.example.com",
                "--openapi",
                "upstream.json",
            ])
            .current_dir(dir.path())
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let site = dir.path().join("site");
        let page = std::fs::read_to_string(site.join("index.html")).unwrap();
        for needle in [
            "VAT validation API",
            "Validate EU VAT numbers.",
            "support@example.com",
            // Every plan, with its display fields and its limits in words.
            "Free",
            "$0",
            "To try the API.",
            "5 requests a second and 100 a day (UTC).",
            "$49 / month",
            "50 requests a second and 1,000,000 a calendar month (UTC).",
            "enterprise",
            "No limits.",
            // Both key headers, the rate-limit headers, every error body.
            "Authorization: Bearer tg_live_",
            "X-API-Key: tg_live_",
            "RateLimit-Policy",
            "Retry-After",
            "urn:tollgate:problem:missing-key",
            "urn:tollgate:problem:rate-limited",
            "urn:tollgate:problem:suspended",
            "urn:tollgate:problem:upstream-timeout",
            // The dashboard link.
            "https://api.example.com/_tollgate/",
        ] {
            assert!(
                page.contains(&crate::html(needle)),
                "{version}: `{needle}` missing from index.html"
            );
        }
        assert!(
            page.contains("<form id=\"try-form\""),
            "{version}: no Try it form"
        );
        // No JWT configured: no JWT section, no invalid-token error.
        assert!(!page.contains("invalid-token"));
        for lang in ["curl", "javascript", "python", "php"] {
            assert!(
                snippet(&page, lang).contains("https://api.example.com/v1/vat/DE136695976"),
                "{lang}"
            );
        }
        // Self-contained: nothing loaded from elsewhere.
        for external in ["<script src", "<link", "@import", "url(http"] {
            assert!(!page.contains(external), "{external}");
        }

        let postman: Value = serde_json::from_str(
            &std::fs::read_to_string(site.join("postman_collection.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            postman["info"]["schema"],
            "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
        );
        assert_eq!(postman["auth"]["type"], "bearer");
        let names: Vec<&str> = postman["item"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"Check a VAT number") && names.contains(&"GET /v1/vat/*"),
            "{names:?}"
        );
        for item in postman["item"].as_array().unwrap() {
            let url = &item["request"]["url"];
            assert!(
                url["raw"].as_str().unwrap().starts_with("{{baseUrl}}/"),
                "{item}"
            );
            assert!(item["request"]["method"].is_string());
        }

        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(site.join("openapi.json")).unwrap())
                .unwrap();
        assert_eq!(doc["openapi"], version, "the version is kept");
        let op = &doc["paths"]["/v1/vat/{number}"]["get"];
        for code in ["200", "401", "403", "429"] {
            assert!(op["responses"].get(code).is_some(), "{version}: {code}");
        }
        assert!(op["responses"]["200"]["headers"].get("RateLimit").is_some());
        assert_eq!(
            doc["paths"]["/health"]["get"]["security"],
            json!([]),
            "a public route needs no key"
        );
        assert!(doc["components"]["securitySchemes"]["tollgateApiKey"].is_object());
        let check = Command::new("python3")
            .args(["-c", "import json,sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
            .arg(site.join("openapi.json"))
            .output()
            .expect("python3 with openapi-spec-validator (scripts/setup.sh installs it)");
        assert!(
            check.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curl_and_python_examples_run_against_the_gateway() {
    let h = Harness::builder().plans(PLANS).config(DOCS).build();
    let key = h.key("cus_reader", None);
    let site = tollgate::docs::render(&h.config, &h.url(""), None).unwrap();
    let python = snippet(&site.index, "python").replace("YOUR_API_KEY", &key);
    let curl = snippet(&site.index, "curl").replace("YOUR_API_KEY", &key);
    let (py, sh) = tokio::task::spawn_blocking(move || {
        (
            Command::new("python3")
                .args(["-c", &python])
                .output()
                .unwrap(),
            Command::new("sh")
                .args(["-c", &format!("{curl} -o /dev/null -w '%{{http_code}}'")])
                .output()
                .unwrap(),
        )
    })
    .await
    .unwrap();
    let py_out = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success() && py_out.starts_with("200 "),
        "python: {py_out} {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&sh.stdout),
        "200",
        "curl: {}",
        String::from_utf8_lossy(&sh.stderr)
    );
    assert_eq!(h.upstream_hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_it_gets_a_200_in_chromium_from_the_page_tollgate_serves() {
    let h = Harness::builder().plans(PLANS).config(DOCS).build();
    let key = h.key("cus_try", Some("pro"));
    let r = h.get("/_tollgate/docs").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("connect-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let (base, out) = (
        h.url(""),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts"),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/docs_try.py");
    let k = key.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &base, &k, out.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "docs_try.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["title"], "VAT validation API");
    assert_eq!(seen["plans"], json!(["free", "enterprise", "pro"]));
    assert_eq!(seen["status"], "200", "{seen}");
    assert!(
        seen["headers"]
            .as_str()
            .unwrap()
            .contains("ratelimit-policy: \"burst\";q=50;w=1"),
        "{seen}"
    );
    assert_eq!(seen["csp_violations"], json!([]));
    assert_eq!(seen["key_in_url"], false);
}
