//! Usage reaches billing providers exactly once: through failures, retries,
//! outages and crashes. Each provider is a local server that speaks its wire
//! format as the provider's documentation and official SDKs define it (the
//! source is named at each mock).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{wait_for, Captured, Harness, MockProvider, Reply};
use serde_json::Value;

use harness::{Fault, MockStripe as Stripe, STRIPE_KEY};

fn metering(sinks: &[String]) -> String {
    format!(
        "metering: {{ flush_interval: 100ms, rollup: 1s, sinks: [{}] }}",
        sinks.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_successes_and_five_failures_bill_exactly_forty_with_the_sdk_wire_format() {
    // The first two attempts fail with 500: they must be retried, not lost.
    let stripe = Stripe::start(|i| i <= 2);
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&metering(&[stripe.sink()]))
        .build();
    let key = h.key("cus_forty", Some("pro"));
    assert_eq!(h.get_n("/v1/x", &key, 40).await, vec![200; 40]);
    assert_eq!(h.get_n("/status/503", &key, 5).await, vec![503; 5]);
    wait_for("40 units at Stripe", 15, || {
        stripe.total("api_requests") == 40
    })
    .await;
    // Nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        stripe.billed(),
        BTreeMap::from([(("api_requests".into(), "cus_forty".into()), 40)])
    );

    let reqs: Vec<Captured> = stripe
        .server
        .captured()
        .into_iter()
        .filter(|c| c.path == "/v1/billing/meter_events")
        .collect();
    assert!(reqs.len() >= 3, "the two failures were retried");
    for c in &reqs {
        assert_eq!(c.method, "POST");
        assert_eq!(
            c.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            c.header("stripe-version"),
            Some(tollgate_metering::billing::STRIPE_VERSION)
        );
        let f = c.form();
        let keys: Vec<&str> = f.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "event_name",
                "identifier",
                "payload[stripe_customer_id]",
                "payload[value]",
                "timestamp"
            ]
        );
        assert_eq!(
            c.header("idempotency-key"),
            Some(f["identifier"].as_str()),
            "Idempotency-Key is the identifier"
        );
        assert!(f["identifier"].starts_with("tg-") && f["identifier"].len() <= 100);
        let ts: u64 = f["timestamp"].parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            ts <= now + 300 && ts + 35 * 86_400 > now,
            "timestamp within Stripe's window"
        );
    }
    // At most one billing event per (customer, meter, rollup window): every
    // event of a window carries that window's one identifier.
    let mut ids_per_window: HashMap<(String, String, String), std::collections::HashSet<String>> =
        HashMap::new();
    for c in &reqs {
        let f = c.form();
        ids_per_window
            .entry((
                f["payload[stripe_customer_id]"].clone(),
                f["event_name"].clone(),
                f["timestamp"].clone(),
            ))
            .or_default()
            .insert(f["identifier"].clone());
    }
    assert!(
        ids_per_window.values().all(|ids| ids.len() == 1),
        "one event per customer, meter and window: {ids_per_window:?}"
    );
    // A retried record keeps its identifier.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for c in &reqs {
        *by_id.entry(c.form()["identifier"].clone()).or_default() += 1;
    }
    assert!(
        by_id.values().any(|&n| n >= 2),
        "a failed event was re-sent under the same identifier: {by_id:?}"
    );

    // `tollgate usage` numbers: recorded 40, all reported.
    let u = h.report(&key).await;
    assert_eq!(u["usage"]["api_requests"], 40);
    assert_eq!(
        u["billing"]["api_requests"],
        serde_json::json!({"recorded": 40, "reported": 40, "pending": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_delays_but_loses_nothing() {
    let down_until = Instant::now() + Duration::from_secs(3);
    let stripe = Stripe::start(move |_| Instant::now() < down_until);
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&metering(&[stripe.sink()]))
        .build();
    let k1 = h.key("cus_a", Some("pro"));
    let k2 = h.key("cus_b", Some("pro"));
    for i in 0..30 {
        let k = if i % 3 == 0 { &k2 } else { &k1 };
        assert_eq!(h.status("/v1/x", k).await, 200);
        tokio::time::sleep(Duration::from_millis(40)).await; // spread over several windows
    }
    wait_for("everything after the outage", 30, || {
        stripe.total("api_requests") == 30
    })
    .await;
    let billed = stripe.billed();
    assert_eq!(billed[&("api_requests".into(), "cus_a".into())], 20);
    assert_eq!(billed[&("api_requests".into(), "cus_b".into())], 10);
    let failed = stripe.server.captured().len() - stripe.events.lock().unwrap().len();
    assert!(failed > 0, "the outage was seen");
    let metrics = h.metrics().await;
    assert!(
        harness::metric(
            &metrics,
            "tollgate_billing_events_total{result=\"retry\",sink=\"stripe\"}"
        ) >= Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reported_in_a_header_is_billed_under_its_own_meter() {
    let stripe = Stripe::start(|_| false);
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&metering(&[stripe.sink()]))
        .build();
    let key = h.key("cus_ai", Some("pro"));
    for tokens in [1200, 34, 5] {
        let r = h
            .client
            .post(h.url(&format!("/v1/ai/chat?tokens={tokens}")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(h.status("/v1/plain", &key).await, 200);
    wait_for("AI tokens at Stripe", 15, || {
        stripe.total("ai_tokens") == 1239 && stripe.total("api_requests") == 1
    })
    .await;
}

/// Stripe answering 429 for a while, then recording events but answering
/// only after the sink gave up (a timeout): every unit is billed once, the
/// retries of what Stripe already had de-duplicated by their identifiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_then_stalling_provider_bills_everything_once() {
    let stripe = Stripe::start_with(|i| match i {
        1..=3 => Fault::Status(429),
        4..=6 => Fault::RecordThenStall(Duration::from_millis(900)),
        _ => Fault::None,
    });
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&format!(
            "metering: {{ flush_interval: 100ms, rollup: 1s, sink_timeout: 300ms, sinks: [{}] }}",
            stripe.sink()
        ))
        .build();
    let (a, b) = (h.key("cus_a", Some("pro")), h.key("cus_b", Some("pro")));
    for i in 0..24 {
        let k = if i % 2 == 0 { &a } else { &b };
        assert_eq!(h.get_n("/v1/x", k, 1).await, vec![200]);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    wait_for("24 units at Stripe", 30, || {
        stripe.total("api_requests") == 24
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stripe.billed(),
        BTreeMap::from([
            (("api_requests".into(), "cus_a".into()), 12),
            (("api_requests".into(), "cus_b".into()), 12),
        ]),
        "each unit billed once"
    );
    let sent = stripe.server.captured().len();
    let kept = stripe.events.lock().unwrap().len();
    assert!(
        sent >= kept + 6,
        "429s and stalls were retried: {sent} sent, {kept} kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sink_does_not_hold_up_the_others() {
    let stripe = Stripe::start(|_| false);
    let dead = format!("http://127.0.0.1:{}", harness::free_port());
    let webhook =
        format!("{{ webhook: {{ url: \"{dead}/usage\", secret_env: TEST_WEBHOOK_SECRET }} }}");
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .env(
            "TEST_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
        .config(&metering(&[webhook, stripe.sink()]))
        .build();
    let key = h.key("cus_two", Some("pro"));
    assert_eq!(h.get_n("/v1/x", &key, 12).await, vec![200; 12]);
    // Records appear ~2 s after their window; Stripe has them soon after.
    wait_for("Stripe despite the dead webhook", 8, || {
        stripe.total("api_requests") == 12
    })
    .await;
    let spool = h.app.spool.as_ref().unwrap();
    assert_eq!(
        spool.pending_units("webhook").0,
        12,
        "the dead sink still owes everything"
    );
    // Stripe's deliveries are noted just after Stripe has them.
    wait_for("Stripe settled", 5, || spool.pending_units("stripe").0 == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_batches_are_signed_per_standard_webhooks() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    // Verification as the Standard Webhooks libraries do it:
    // HMAC-SHA256 over "{webhook-id}.{webhook-timestamp}.{body}".
    let server = MockProvider::start(|c: &Captured| -> Reply {
        let key = tollgate_metering::billing::webhook_key(SECRET);
        let (id, ts) = (
            c.header("webhook-id").unwrap_or(""),
            c.header("webhook-timestamp").unwrap_or("0"),
        );
        let expected = tollgate_metering::billing::standard_webhooks_signature(
            &key,
            id,
            ts.parse().unwrap_or(0),
            &c.body,
        );
        if c.header("webhook-signature") == Some(expected.as_str()) {
            (204, String::new())
        } else {
            (400, "bad signature".into())
        }
    });
    let webhook = format!(
        "{{ webhook: {{ url: \"{}/hooks/usage\", secret_env: TEST_WEBHOOK_SECRET }} }}",
        server.url()
    );
    let h = Harness::builder()
        .env("TEST_WEBHOOK_SECRET", SECRET)
        .config(&metering(&[webhook]))
        .build();
    let key = h.key("cus_hook", Some("pro"));
    for _ in 0..7 {
        h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    }
    let units = || -> u64 {
        server
            .captured()
            .iter()
            .flat_map(|c| c.json()["records"].as_array().cloned().unwrap_or_default())
            .map(|r| r["units"].as_u64().unwrap_or(0))
            .sum()
    };
    wait_for("signed webhook", 10, || units() == 7).await;
    for c in server.captured() {
        assert_eq!(c.path, "/hooks/usage");
        assert!(c.header("webhook-signature").unwrap().starts_with("v1,"));
        assert_eq!(c.json()["type"], "usage.recorded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_v2_stream_refreshes_its_session_on_expiry_and_401() {
    // Stripe v2: `POST /v2/billing/meter_event_session` returns
    // `authentication_token` and `expires_at` (RFC 3339, 15 minutes); events
    // go to `POST /v2/billing/meter_event_stream` on the meter-events host
    // with `Authorization: Bearer <token>`, JSON `{"events":[…]}`, at most 100
    // (Stripe API reference, "Meter event streams"; stripe-node
    // MeterEventStreamResource). This mock lets each token send one batch,
    // then answers 401 as for an expired session.
    let sessions = Arc::new(Mutex::new(0u32));
    let used: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let events: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let (s2, u2, e2) = (sessions.clone(), used.clone(), events.clone());
    let server = MockProvider::start(move |c: &Captured| -> Reply {
        match c.path.as_str() {
            "/v2/billing/meter_event_session" => {
                assert_eq!(
                    c.header("authorization"),
                    Some(&*format!("Bearer {STRIPE_KEY}"))
                );
                let mut s = s2.lock().unwrap();
                *s += 1;
                let exp = tollgate_core::clock::rfc3339(
                    tollgate_core::clock::Clock::now_ms(&tollgate_core::clock::SystemClock)
                        + 15 * 60_000,
                );
                (
                    200,
                    format!(
                        r#"{{"object":"v2.billing.meter_event_session","id":"mes_{s}","authentication_token":"tok_{s}","expires_at":"{exp}","livemode":false}}"#
                    ),
                )
            }
            "/v2/billing/meter_event_stream" => {
                let token = c
                    .header("authorization")
                    .unwrap_or("")
                    .trim_start_matches("Bearer ")
                    .to_owned();
                let mut u = u2.lock().unwrap();
                let n = u.entry(token).or_default();
                *n += 1;
                if *n > 1 {
                    return (
                        401,
                        r#"{"error":{"code":"billing_meter_event_session_expired"}}"#.into(),
                    );
                }
                let v = c.json();
                let list = v["events"].as_array().unwrap();
                assert!(list.len() <= 100);
                for e in list {
                    assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
                    let value: u64 = e["payload"]["value"].as_str().unwrap().parse().unwrap();
                    e2.lock()
                        .unwrap()
                        .entry(e["identifier"].as_str().unwrap().to_owned())
                        .or_insert(value);
                }
                (200, "{}".into())
            }
            _ => (404, "{}".into()),
        }
    });
    let sink = format!(
        "{{ stripe: {{ api: v2, api_key_env: TEST_STRIPE_KEY, base_url: \"{0}\", stream_url: \"{0}\" }} }}",
        server.url()
    );
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&metering(&[sink]))
        .build();
    let key = h.key("cus_v2", Some("pro"));
    for round in 0..3 {
        for _ in 0..5 {
            h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        }
        let want = 5 * (round + 1);
        wait_for("v2 events", 10, || {
            events.lock().unwrap().values().sum::<u64>() == want
        })
        .await;
    }
    assert!(
        *sessions.lock().unwrap() >= 3,
        "a new session after each 401"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lago_422_value_already_exist_counts_as_delivered() {
    // Lago `POST /api/v1/events/batch` with `{"events":[{transaction_id,
    // external_subscription_id, code, timestamp, properties}]}` (Lago API
    // reference, "Batch multiple events"). A batch is all or nothing: one
    // known transaction_id gets 422 with `error_details` by index and
    // `value_already_exist`. This mock stores the first batch but answers 500
    // (an answer lost on the way), so the retry must meet that 422.
    let stored: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let answered = Arc::new(Mutex::new(false));
    let saw_422 = Arc::new(Mutex::new(false));
    let (st, an, s422) = (stored.clone(), answered.clone(), saw_422.clone());
    let server = MockProvider::start(move |c: &Captured| -> Reply {
        assert_eq!(c.path, "/api/v1/events/batch");
        assert_eq!(c.header("authorization"), Some("Bearer lago_key"));
        let v = c.json();
        let events = v["events"].as_array().unwrap().clone();
        let mut s = st.lock().unwrap();
        let dups: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| s.contains_key(e["transaction_id"].as_str().unwrap()))
            .map(|(i, _)| i)
            .collect();
        if !dups.is_empty() {
            *s422.lock().unwrap() = true;
            let details: serde_json::Map<String, Value> = dups
                .iter()
                .map(|i| {
                    (
                        i.to_string(),
                        serde_json::json!({"transaction_id": ["value_already_exist"]}),
                    )
                })
                .collect();
            return (422, serde_json::json!({"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": details}).to_string());
        }
        for e in &events {
            assert!(
                e["external_subscription_id"].is_string()
                    && e["code"].is_string()
                    && e["timestamp"].is_u64()
            );
            s.insert(
                e["transaction_id"].as_str().unwrap().to_owned(),
                e["properties"]["value"].as_u64().unwrap(),
            );
        }
        let mut a = an.lock().unwrap();
        if !*a {
            *a = true;
            return (500, "{}".into());
        }
        (200, serde_json::json!({ "events": events }).to_string())
    });
    let sink = format!(
        "{{ lago: {{ url: \"{}\", api_key_env: TEST_LAGO_KEY }} }}",
        server.url()
    );
    let h = Harness::builder()
        .env("TEST_LAGO_KEY", "lago_key")
        .config(&metering(&[sink]))
        .build();
    let key = h.key("cus_lago", Some("pro"));
    for _ in 0..9 {
        h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    }
    wait_for("Lago settles", 15, || {
        h.app.spool.as_ref().unwrap().pending_units("lago").0 == 0
            && stored.lock().unwrap().values().sum::<u64>() == 9
    })
    .await;
    assert!(
        *saw_422.lock().unwrap(),
        "the retry met value_already_exist"
    );
    assert_eq!(
        stored.lock().unwrap().values().sum::<u64>(),
        9,
        "each unit once"
    );
    let dead = h.app.config.metering.spool_dir.join("dead-lago.jsonl");
    assert!(!dead.exists(), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmeter_receives_cloudevents_with_stable_ids() {
    // OpenMeter `POST /api/v1/events`, `Content-Type:
    // application/cloudevents-batch+json`, CloudEvents 1.0 with `id`,
    // `source`, `type`, `subject`, `time`, `data` (OpenMeter API reference,
    // "Ingest events"); 204 on success, duplicates by (id, source) ignored.
    let server = MockProvider::start(|c: &Captured| -> Reply {
        assert_eq!(
            c.header("content-type"),
            Some("application/cloudevents-batch+json")
        );
        (204, String::new())
    });
    let sink = format!(
        "{{ openmeter: {{ url: \"{}\", token_env: TEST_OM_TOKEN, source: tollgate-test }} }}",
        server.url()
    );
    let h = Harness::builder()
        .env("TEST_OM_TOKEN", "om_token")
        .config(&metering(&[sink]))
        .build();
    let key = h.key("cus_om", Some("pro"));
    for _ in 0..4 {
        h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    }
    let events = || -> Vec<Value> {
        server
            .captured()
            .iter()
            .flat_map(|c| c.json().as_array().cloned().unwrap_or_default())
            .collect()
    };
    wait_for("OpenMeter", 10, || {
        events()
            .iter()
            .map(|e| e["data"]["value"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 4
    })
    .await;
    for e in events() {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["source"], "tollgate-test");
        assert_eq!(e["subject"], "cus_om");
        assert_eq!(e["type"], "api_requests");
        assert!(e["id"].as_str().unwrap().starts_with("tg-"));
    }
    assert_eq!(
        server.captured()[0].header("authorization"),
        Some("Bearer om_token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_admits_past_the_quota_and_bills_the_overage_meter() {
    let stripe = Stripe::start(|_| false);
    let plans = "default_plan: growth\nplans:\n  growth:\n    limits:\n      - { name: included, requests: 3, per: month, overage_meter: api_overage }\n    meter: api_requests\n";
    let h = Harness::builder()
        .plans(plans)
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .config(&metering(&[stripe.sink()]))
        .build();
    let key = h.key("cus_growth", None);
    for i in 0..5 {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i} is admitted");
        let remaining = if i < 3 { 2 - i } else { 0 };
        assert_eq!(
            r.headers()["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }
    wait_for("included and overage units", 10, || {
        stripe.total("api_requests") == 3 && stripe.total("api_overage") == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_billable_requests_loudly() {
    // A spool that starts at its 1 MB bound: usage nobody has rolled up yet.
    let h = Harness::builder()
        .config("metering: { max_spool_mb: 1 }")
        .file("data/spool/events.log", pending_events(25_000))
        .build();
    let billed = h.key("cus_billed", Some("pro"));
    let free = h.key("cus_free", None); // free has no meter: nothing to record
    let r = h.get("/v1/x").bearer_auth(&billed).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:usage-spool-full");
    assert_eq!(h.status("/v1/x", &free).await, 200);
    assert_eq!(
        h.upstream_hits(),
        1,
        "the refused request never reached the API"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("tollgate_spool_rejected_total{plan=\"pro\"} 1"),
        "{metrics}"
    );
    // The refusal consumed nothing of the plan's limits.
    let usage = h.report(&billed).await;
    assert_eq!(usage["policies"][0]["remaining"], 1000, "{usage}");
}

/// `n` spool event lines (`E seq ts customer meter units crc`, the spool's
/// own format), one customer each so that compaction at start keeps them
/// all, written now.
fn pending_events(n: u64) -> String {
    let now = tollgate_core::clock::Clock::now_ms(&tollgate_core::clock::SystemClock);
    (1..=n)
        .map(|seq| {
            let body = format!("E {seq} {now} cus_backlog_{seq} api_requests 1");
            format!(
                "{body} {:08x}\n",
                tollgate_core::keys::crc32(body.as_bytes())
            )
        })
        .collect()
}

/// A tmpfs of the test's own, unmounted on drop (mounting needs root, which
/// CI has; elsewhere the test says so and does nothing).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Self> {
        let root = std::process::Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0" {
            eprintln!("not root: the full-disk test needs to mount a tmpfs, skipped");
            return None;
        }
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "root could not mount a tmpfs");
        Some(Self(path.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The spool's disk fills up: the response whose usage could not be written
/// is refused (503), billable work is then refused before it reaches the
/// upstream, `/readyz` says not ready, and every answered request is in the
/// spool. With room again, requests are served and the instance is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_billable_work_and_loses_nothing_answered() {
    let mnt = tempfile::tempdir().unwrap();
    let spool_dir = mnt.path().join("spool");
    let Some(disk) = Tmpfs::mount(&spool_dir, "64k") else {
        return;
    };
    let h = Harness::builder()
        .config(&format!(
            "metering: {{ spool_dir: \"{}\" }}",
            spool_dir.display()
        ))
        .build();
    let key = h.key("cus_disk", Some("enterprise")); // unlimited, metered
    let mut answered = 0u64;
    let first_refusal: Value = loop {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        match r.status().as_u16() {
            200 => answered += 1,
            503 => break r.json().await.unwrap(),
            s => panic!("answered {s}"),
        }
        assert!(answered < 10_000, "64 KiB never filled up");
    };
    assert_eq!(
        first_refusal["type"],
        "urn:tollgate:problem:usage-not-recorded"
    );
    let hits = h.upstream_hits();
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(h.upstream_hits(), hits, "refused before the upstream ran");
    let admin = |path: &str| format!("http://{}{path}", h.admin);
    let ready = h.client.get(admin("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(h
        .metrics()
        .await
        .contains("tollgate_spool_write_errors_total 1"));

    disk.resize("4m");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get_n("/v1/x", &key, 3).await, vec![200; 3]);
    let ready = h.client.get(admin("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let usage = h.report(&key).await;
    assert_eq!(
        usage["billing"]["api_requests"]["recorded"],
        answered + 3,
        "{usage}"
    );
    assert_eq!(usage["usage"]["api_requests"], answered + 3, "{usage}");
    drop(h);
}

/// An upstream that resets every connection mid-request: 502, never billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_resets_is_502_and_never_billed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut &conn, &mut buf);
            drop(conn); // closed with the request half read
        }
    });
    let h = Harness::builder().upstream(addr).build();
    let key = h.key("cus_reset", Some("enterprise"));
    assert_eq!(h.get_n("/v1/x", &key, 5).await, vec![502; 5]);
    let usage = h.report(&key).await;
    assert_eq!(usage["usage"], serde_json::json!({}), "{usage}");
    assert_eq!(usage["billing"], serde_json::json!({}), "{usage}");
}

/// `tollgate billing …` against the harness's config, with the admin token
/// but no sink secret in its environment.
fn billing_cli(h: &Harness, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("billing")
        .args(args)
        .arg("-c")
        .arg(h.dir.path().join("tollgate.yaml"))
        .current_dir(h.dir.path())
        .env_remove("TEST_STRIPE_KEY")
        .env("TEST_ADMIN_TOKEN", "admin-secret")
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_is_delivered_once_under_its_original_identifier() {
    // Stripe refuses for good (400) until the operator has fixed the cause.
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let r = refuse.clone();
    let stripe = Stripe::start_with(move |_| {
        if r.load(std::sync::atomic::Ordering::SeqCst) {
            Fault::Status(400)
        } else {
            Fault::None
        }
    });
    let h = Harness::builder()
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .admin_token("admin-secret")
        .config(&metering(&[stripe.sink()]))
        .build();
    let key = h.key("cus_fix_me", Some("pro"));
    assert_eq!(h.get_n("/v1/x", &key, 3).await, vec![200; 3]);
    let spool = h.app.spool.as_ref().unwrap().clone();
    wait_for("the dead letter", 10, || {
        spool.status().sinks[0].dead_letters == 1
    })
    .await;

    let out = billing_cli(&h, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["sinks"][0]["sink"], "stripe");
    assert_eq!(st["sinks"][0]["dead_letters"], 1);
    assert_eq!(st["sinks"][0]["pending_units"], 0);

    let out = billing_cli(&h, &["dead-letters", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dead: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["customer"], "cus_fix_me");
    assert_eq!(dead[0]["units"], 3);
    let id = dead[0]["identifier"].as_str().unwrap().to_owned();
    let table = billing_cli(&h, &["dead-letters", "--sink", "stripe"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id));

    // An id that is not a dead letter: nothing replayed, exit 1.
    let out = billing_cli(&h, &["replay", "--sink", "stripe", "--id", "tg-nope-9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tg-nope-9"));
    let out = billing_cli(&h, &["replay", "--sink", "nosuch"]);
    assert!(!out.status.success());

    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    // The proxy holds the spool: the CLI goes through its admin API.
    let out = billing_cli(&h, &["replay", "--sink", "stripe", "--id", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    wait_for("the replayed delivery", 10, || {
        stripe
            .billed()
            .get(&("api_requests".into(), "cus_fix_me".into()))
            == Some(&3)
    })
    .await;
    wait_for("Stripe settled", 5, || spool.pending_units("stripe").0 == 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent: Vec<_> = stripe
        .server
        .captured()
        .into_iter()
        .filter(|c| c.form().get("identifier") == Some(&id))
        .collect();
    assert_eq!(sent.len(), 2, "refused once, delivered once, under {id}");
    assert!(sent
        .iter()
        .all(|c| c.header("idempotency-key") == Some(id.as_str())));
    let st: Value = serde_json::from_slice(&billing_cli(&h, &["status", "--json"]).stdout).unwrap();
    assert_eq!(st["sinks"][0]["dead_letters"], 0);
    // Replaying again finds nothing: it cannot be sent twice.
    let out = billing_cli(&h, &["replay", "--sink", "stripe"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    // Counted once as recorded, and now as reported.
    let usage: Value = h
        .client
        .get(format!(
            "http://{}/admin/customers/cus_fix_me/usage",
            h.admin
        ))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        usage[0]["billing"]["api_requests"]["recorded"], 3,
        "{usage}"
    );
    assert_eq!(
        usage[0]["billing"]["api_requests"]["reported"], 3,
        "{usage}"
    );
}
