//! Usage read from response bodies (`usage:` on a route), end to end:
//! OpenAI and Anthropic JSON and `text/event-stream` responses from a
//! local upstream that sends the providers' documented formats (see
//! `tollgate_testkit::OPENAI_STREAM` and `ANTHROPIC_STREAM` for where each
//! comes from), through the proxy, into the spool.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::{Harness, MockLlm, ANTHROPIC_STREAM, OPENAI_JSON, OPENAI_STREAM};

const PLANS: &str = r#"
default_plan: pro
plans:
  pro:
    limits:
      - { name: burst, requests: 1000, per: second }
  free:
    billed: false
    limits: []
  tiny:
    limits:
      - { name: daily, requests: 3, per: day }
routes:
  - { match: "POST /v1/chat/completions", usage: openai, cost: 50, meter: ai_fallback_tokens }
  - { match: "POST /v1/messages", usage: anthropic, cost: 50, meter: ai_fallback_tokens }
  - { match: "POST /v1/nometer", usage: openai }
"#;

fn gateway(llm: &MockLlm, extra: &str) -> Harness {
    Harness::builder()
        .plans(PLANS)
        .upstream(llm.addr)
        .config(extra)
        .build()
}

/// What the spool holds for `customer`, per meter (recorded units).
fn recorded(h: &Harness, customer: &str) -> BTreeMap<String, u64> {
    h.app
        .spool
        .as_ref()
        .unwrap()
        .totals(customer)
        .into_iter()
        .map(|(m, t)| (m, t.recorded))
        .collect()
}

fn units(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect()
}

async fn post(h: &Harness, key: &str, path: &str) -> reqwest::Response {
    h.client
        .post(h.url(path))
        .bearer_auth(key)
        .header("accept-encoding", "gzip, br")
        .body("{}")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_json_and_streams_are_billed_per_token_meter_and_pass_unchanged() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let key = h.key("cus_ai", None);
    // Metrics are the process's: other tests here add to them too.
    let out_series = "tollgate_usage_units_total{meter=\"ai_output_tokens\"}";
    let before = harness::metric(&h.metrics().await, out_series).unwrap_or(0.0);

    let r = post(&h, &key, "/v1/chat/completions").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), OPENAI_JSON, "the body, unchanged");
    // Durable before the last byte reached the client: no waiting here.
    assert_eq!(
        recorded(&h, "cus_ai"),
        units(&[
            ("ai_input_tokens", 19),
            ("ai_output_tokens", 10),
            ("ai_cached_input_tokens", 3)
        ])
    );

    let r = post(&h, &key, "/v1/chat/completions?stream=1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    assert_eq!(r.text().await.unwrap(), OPENAI_STREAM.concat());
    assert_eq!(
        recorded(&h, "cus_ai"),
        units(&[
            ("ai_input_tokens", 19 + 12),
            ("ai_output_tokens", 10 + 7),
            ("ai_cached_input_tokens", 3 + 4)
        ])
    );
    // The upstream was asked for an uncompressed body it can be read from.
    assert!(llm
        .accept_encoding
        .lock()
        .unwrap()
        .iter()
        .all(Option::is_none));
    let after = harness::metric(&h.metrics().await, out_series).unwrap_or(0.0);
    assert!(after - before >= 17.0, "{before} -> {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_streams_count_message_start_and_the_last_message_delta() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let key = h.key("cus_claude", None);
    let r = post(&h, &key, "/v1/messages?stream=1").await;
    assert_eq!(r.text().await.unwrap(), ANTHROPIC_STREAM.concat());
    assert_eq!(
        recorded(&h, "cus_claude"),
        units(&[
            ("ai_input_tokens", 25 + 5),
            ("ai_output_tokens", 15),
            ("ai_cached_input_tokens", 10)
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_not_buffered_the_first_event_arrives_before_the_rest() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let key = h.key("cus_ttfb", None);
    let sent = Instant::now();
    let mut r = post(&h, &key, "/v1/chat/completions?stream=1&stall_ms=800").await;
    let first = r.chunk().await.unwrap().unwrap();
    let ttfb = sent.elapsed();
    assert!(first.starts_with(OPENAI_STREAM[0].as_bytes()));
    assert!(
        ttfb < Duration::from_millis(600),
        "the first event waited for the rest of the stream: {ttfb:?}"
    );
    let mut rest = first.to_vec();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, OPENAI_STREAM.concat().as_bytes());
    assert_eq!(recorded(&h, "cus_ttfb")["ai_output_tokens"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usage_in_the_body_bills_the_routes_cost_and_counts_why() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "metering: { max_usage_body_kb: 1 }");
    let key = h.key("cus_none", None);
    let fallbacks = |m: &str| {
        ["missing", "too_large"].map(|r| {
            harness::metric(
                m,
                &format!("tollgate_usage_body_fallback_total{{reason=\"{r}\"}}"),
            )
            .unwrap_or(0.0)
        })
    };
    let before = fallbacks(&h.metrics().await);
    // A stream without its usage chunk.
    let r = post(&h, &key, "/v1/chat/completions?stream=1&usage=0").await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    assert_eq!(
        recorded(&h, "cus_none"),
        units(&[("ai_fallback_tokens", 50)])
    );
    // A JSON body over the 1 KiB bound: passed on whole, billed the cost.
    let r = post(&h, &key, "/v1/chat/completions?pad=2000").await;
    let body = r.text().await.unwrap();
    assert!(body.len() > 2000 && body.ends_with("}}"), "{}", body.len());
    assert_eq!(
        recorded(&h, "cus_none"),
        units(&[("ai_fallback_tokens", 100)])
    );
    // A route without a meter for its cost bills nothing, and says so.
    let r = post(&h, &key, "/v1/nometer?stream=1&usage=0").await;
    r.text().await.unwrap();
    assert_eq!(
        recorded(&h, "cus_none"),
        units(&[("ai_fallback_tokens", 100)])
    );
    let after = fallbacks(&h.metrics().await);
    assert!(
        after[0] - before[0] >= 2.0,
        "missing: {before:?} -> {after:?}"
    );
    assert!(
        after[1] - before[1] >= 1.0,
        "too_large: {before:?} -> {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_stream_is_billed_what_the_upstream_had_reported() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let spool = h.app.spool.clone().unwrap();
    let abandoned = "tollgate_usage_body_fallback_total{reason=\"abandoned\"}";
    let before = harness::metric(&h.metrics().await, abandoned).unwrap_or(0.0);
    // Anthropic reports input tokens in its first event: the client reads
    // it and goes away while the upstream stalls.
    let key = h.key("cus_gone", None);
    let mut r = post(&h, &key, "/v1/messages?stream=1&stall_ms=3000").await;
    let first = r.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: message_start"));
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(8);
    while spool.totals("cus_gone").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the abandoned stream was never billed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        recorded(&h, "cus_gone"),
        units(&[
            ("ai_input_tokens", 30),
            ("ai_output_tokens", 1),
            ("ai_cached_input_tokens", 10)
        ])
    );
    // OpenAI reports only at the end: abandoned before it, the route's cost.
    let key = h.key("cus_gone2", None);
    let mut r = post(&h, &key, "/v1/chat/completions?stream=1&stall_ms=3000").await;
    r.chunk().await.unwrap().unwrap();
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(8);
    while spool.totals("cus_gone2").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the abandoned stream was never billed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        recorded(&h, "cus_gone2"),
        units(&[("ai_fallback_tokens", 50)])
    );
    let after = harness::metric(&h.metrics().await, abandoned).unwrap_or(0.0);
    assert!(after - before >= 1.0, "{before} -> {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbilled_plan_is_never_metered_from_the_body() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let key = h.key("cus_free", Some("free"));
    let r = post(&h, &key, "/v1/chat/completions?stream=1").await;
    assert_eq!(r.text().await.unwrap(), OPENAI_STREAM.concat());
    assert!(recorded(&h, "cus_free").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_counts_one_against_request_limits_whatever_its_tokens_or_fallback() {
    let llm = MockLlm::start();
    let h = gateway(&llm, "");
    let key = h.key("cus_tiny", Some("tiny"));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let r = post(&h, &key, "/v1/chat/completions?stream=1&usage=0").await;
        statuses.push(r.status().as_u16());
        r.text().await.unwrap();
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    assert_eq!(
        recorded(&h, "cus_tiny"),
        units(&[("ai_fallback_tokens", 150)])
    );
}
