//! JWT bearer tokens beside keys: every token is made by PyJWT
//! (`tests/py/jwt_tokens.py`), keys and key sets by Python's `cryptography`,
//! and the `jwks_url` is a local server serving the set as an IdP would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::{metric, Harness, MockProvider};
use serde_json::{json, Value};

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes-for-hs256";
const HS_ISS: &str = "https://auth.example.com/";
const RS_ISS: &str = "https://idp.example.com/";
const PEM_ISS: &str = "https://pem.example.com/";
const URL_ISS: &str = "https://rotating.example.com/";

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/jwt_tokens.py")
}

/// RSA keys and key sets, fresh for each test.
fn keys() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ok = Command::new("python3")
        .args([script(), "keys", dir.path().to_str().unwrap()])
        .status()
        .expect("python3 with pyjwt[crypto] (scripts/setup.sh installs it)");
    assert!(ok.success());
    dir
}

fn tokens(specs: &[Value]) -> Vec<String> {
    let mut child = Command::new("python3")
        .args([script(), "tokens"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::from(specs.to_vec()).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jwt_tokens.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(iss: &str, sub: &str, extra: Value) -> Value {
    let mut c = json!({"iss": iss, "aud": "my-api", "sub": sub, "iat": now(), "exp": now() + 600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs(c: Value) -> Value {
    json!({"alg": "HS256", "key": format!("secret:{SECRET}"), "claims": c})
}

fn rs(dir: &tempfile::TempDir, kid: &str, c: Value) -> Value {
    json!({"alg": "RS256", "key": format!("rsa:{}/{kid}.key", dir.path().display()), "kid": kid, "claims": c})
}

/// A JWKS endpoint whose set a test can change.
fn idp(dir: &tempfile::TempDir) -> (MockProvider, Arc<Mutex<(u16, String)>>) {
    let first = std::fs::read_to_string(dir.path().join("jwks_k1.json")).unwrap();
    let state = Arc::new(Mutex::new((200u16, first)));
    let s = state.clone();
    let server = MockProvider::start(move |_| s.lock().unwrap().clone());
    (server, state)
}

fn harness(dir: &tempfile::TempDir, jwks_url: &str) -> Harness {
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    Harness::builder()
        .env("T_JWT_SECRET", SECRET)
        .file("jwks_k1.json", read("jwks_k1.json"))
        .file("k1.pub.pem", read("k1.pub.pem"))
        .config(&format!(
            r#"auth:
  jwt:
    - {{ issuer: "{HS_ISS}", audience: my-api, hs256_secret_env: T_JWT_SECRET, customer_claim: sub, plan_claim: plan }}
    - {{ issuer: "{RS_ISS}", name: idp, audience: my-api, jwks_file: jwks_k1.json }}
    - {{ issuer: "{PEM_ISS}", name: pem, audience: [my-api, other-api], public_key_file: k1.pub.pem, algorithms: [RS256] }}
    - {{ issuer: "{URL_ISS}", name: rotating, audience: my-api, jwks_url: "{jwks_url}/jwks.json", jwks_refresh: 1s }}
"#
        ))
        .build()
}

async fn call(h: &Harness, token: &str, path: &str) -> reqwest::Response {
    h.get(path).bearer_auth(token).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hs256_token_is_a_key_with_its_plan_claim() {
    let dir = keys();
    let (idp, _) = idp(&dir);
    let h = harness(&dir, &idp.url());
    let t = tokens(&[
        hs(claims(HS_ISS, "cus_jwt", json!({"plan": "pro"}))),
        hs(claims(HS_ISS, "cus_jwt2", json!({"plan": "gold"}))),
        hs(claims(HS_ISS, "cus_stored", json!({}))),
        // 10 s past exp, inside the 30 s leeway.
        hs(claims(HS_ISS, "cus_jwt", json!({"exp": now() - 10}))),
    ]);
    let r = call(&h, &t[0], "/v1/x").await;
    assert_eq!(r.status(), 200);
    // pro: burst 1000 a second, in the headers as for a key.
    assert_eq!(r.headers()["x-ratelimit-limit"], "1000");
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["x-tollgate-customer"], json!(["cus_jwt"]));
    assert_eq!(seen["x-tollgate-plan"], json!(["pro"]));
    assert_eq!(seen["x-tollgate-key-id"], json!(["jwt:auth.example.com"]));
    // The token never reaches the upstream.
    assert!(seen.get("authorization").is_none(), "{seen}");
    let usage: Value = call(&h, &t[0], "/_tollgate/usage")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (usage["customer"].as_str(), usage["plan"].as_str()),
        (Some("cus_jwt"), Some("pro"))
    );
    // A plan claim naming no plan falls back to the customer's stored plan
    // (here none: the default).
    let usage: Value = call(&h, &t[1], "/_tollgate/usage")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["plan"], "free");
    // Without a plan claim: the stored plan.
    tollgate_core::store::admin::set_plan(&h.store, "cus_stored", "enterprise").unwrap();
    h.sync();
    let usage: Value = call(&h, &t[2], "/_tollgate/usage")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["plan"], "enterprise");
    assert_eq!(call(&h, &t[3], "/v1/x").await.status(), 200);
    // A suspended customer's valid token is 403.
    tollgate_core::store::admin::set_suspended(&h.store, "cus_stored", true).unwrap();
    h.sync();
    let r = call(&h, &t[2], "/v1/x").await;
    assert_eq!(r.status(), 403);
    // Limits are the customer's, whatever carries its identity: a key and
    // a token of cus_jwt share one quota.
    let key = h.key("cus_jwt", None);
    let before: Value = call(&h, &key, "/_tollgate/usage")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(call(&h, &t[0], "/v1/x").await.status(), 200);
    let after: Value = call(&h, &key, "/_tollgate/usage")
        .await
        .json()
        .await
        .unwrap();
    let rem = |v: &Value| v["policies"][0]["remaining"].as_u64().unwrap();
    assert_eq!(rem(&before), rem(&after) + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_a_401_invalid_token() {
    let dir = keys();
    let (idp, _) = idp(&dir);
    let h = harness(&dir, &idp.url());
    let pem = format!("{}/k1.pub.pem", dir.path().display());
    let good = hs(claims(HS_ISS, "cus_bad", json!({})));
    let cases = [
        (
            "expired",
            hs(claims(HS_ISS, "cus_bad", json!({"exp": now() - 120}))),
        ),
        (
            "not yet valid",
            hs(claims(HS_ISS, "cus_bad", json!({"nbf": now() + 120}))),
        ),
        (
            "wrong audience",
            hs(claims(HS_ISS, "cus_bad", json!({"aud": "someone-else"}))),
        ),
        (
            "unknown issuer",
            hs(claims("https://evil.example.com/", "cus_bad", json!({}))),
        ),
        (
            "wrong secret",
            json!({"alg": "HS256", "key": "secret:another-secret-of-at-least-32-bytes!!", "claims": claims(HS_ISS, "cus_bad", json!({}))}),
        ),
        (
            "alg none",
            json!({"alg": "none", "key": "none", "claims": claims(HS_ISS, "cus_bad", json!({}))}),
        ),
        (
            "HS256 keyed with the PEM issuer's public key",
            json!({"alg": "HS256", "key": format!("hmac-with-pem:{pem}"), "claims": claims(PEM_ISS, "cus_bad", json!({}))}),
        ),
        (
            "HS256 keyed with the JWKS issuer's public key",
            json!({"alg": "HS256", "key": format!("hmac-with-pem:{pem}"), "claims": claims(RS_ISS, "cus_bad", json!({}))}),
        ),
        (
            "RS256 for an HS256 issuer",
            rs(&dir, "k1", claims(HS_ISS, "cus_bad", json!({}))),
        ),
        (
            "a key the set lacks",
            rs(&dir, "k2", claims(RS_ISS, "cus_bad", json!({}))),
        ),
        (
            "oversized",
            hs(claims(HS_ISS, "cus_bad", json!({"pad": "x".repeat(9000)}))),
        ),
        (
            "no exp",
            hs(json!({"iss": HS_ISS, "aud": "my-api", "sub": "cus_bad"})),
        ),
    ];
    let mut specs: Vec<Value> = cases.iter().map(|(_, s)| s.clone()).collect();
    specs.push(good);
    let t = tokens(&specs);
    // The good one passes: each refusal below is for its own reason.
    assert_eq!(call(&h, &t[cases.len()], "/v1/x").await.status(), 200);
    // A valid token with its payload swapped for a richer one.
    let parts: Vec<&str> = t[cases.len()].split('.').collect();
    let forged = base64_url(&claims(HS_ISS, "cus_bad", json!({"plan": "enterprise"})).to_string());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    let mut all: Vec<(&str, String)> = cases
        .iter()
        .map(|(w, _)| *w)
        .zip(t.iter().cloned())
        .collect();
    all.push(("tampered payload", tampered));
    for (what, token) in &all {
        let r = call(&h, token, "/v1/x").await;
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );
        let p: Value = r.json().await.unwrap();
        let kind = p["type"].as_str().unwrap();
        assert!(kind == "urn:tollgate:problem:invalid-token", "{what}: {p}");
        assert!(
            !p.to_string().contains(token.as_str()),
            "{what}: the token is echoed"
        );
    }
    assert_eq!(h.upstream_hits(), 1);
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_through_a_jwks_file_a_pem_and_a_rotating_jwks_url() {
    let dir = keys();
    let (idp, set) = idp(&dir);
    let h = harness(&dir, &idp.url());
    let t = tokens(&[
        rs(&dir, "k1", claims(RS_ISS, "cus_rs", json!({}))),
        rs(
            &dir,
            "k1",
            claims(PEM_ISS, "cus_rs", json!({"aud": "other-api"})),
        ),
        rs(&dir, "k1", claims(URL_ISS, "cus_rs", json!({}))),
        rs(&dir, "k2", claims(URL_ISS, "cus_rs", json!({}))),
    ]);
    let r = call(&h, &t[0], "/v1/x").await;
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["x-tollgate-key-id"], json!(["jwt:idp"]));
    assert_eq!(
        call(&h, &t[1], "/v1/x").await.status(),
        200,
        "a PEM key, the second audience"
    );
    // The key set is fetched in the background at start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&h, &t[2], "/v1/x").await.status() != 200 {
        assert!(Instant::now() < deadline, "the jwks_url was never fetched");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // k2 is not published yet.
    assert_eq!(call(&h, &t[3], "/v1/x").await.status(), 401);
    // The IdP rotates: k2 is published beside k1 (and an encryption key
    // the verifier skips); within the refresh both verify.
    set.lock().unwrap().1 = std::fs::read_to_string(dir.path().join("jwks_k1k2.json")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&h, &t[3], "/v1/x").await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "the rotated key set was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The IdP fails: the last good set stays, and the failure is counted.
    let errors = |m: &str| {
        metric(
            m,
            r#"tollgate_jwks_fetches_total{issuer="rotating",result="error"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = errors(&h.metrics().await);
    *set.lock().unwrap() = (500, "{}".into());
    let deadline = Instant::now() + Duration::from_secs(10);
    while errors(&h.metrics().await) <= before {
        assert!(
            Instant::now() < deadline,
            "the failed fetch was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(call(&h, &t[2], "/v1/x").await.status(), 200);
    assert_eq!(call(&h, &t[3], "/v1/x").await.status(), 200);
    assert_eq!(
        metric(
            &h.metrics().await,
            r#"tollgate_jwks_keys{issuer="rotating"}"#
        ),
        Some(2.0)
    );
}
