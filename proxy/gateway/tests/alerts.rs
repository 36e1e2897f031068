//! Threshold alerts (`alerts:`): a customer crossing 50 % and 100 % of a
//! monthly quota or of their credits gives one Standard Webhooks-signed
//! `usage.threshold_reached` event per threshold and period, retried
//! while the receiver fails, dead-lettered when it refuses, and neither
//! lost nor repeated across a `kill -9`.
//!
//! The receiver is a local HTTP server; every delivery it takes is
//! verified with the official Standard Webhooks library (PyPI
//! `standardwebhooks`, `tests/py/verify.py`), as a receiver would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{
    file_key, metric, start_binary, wait_for, wait_port, write_project, Captured, Harness,
    MockProvider, MockUpstream,
};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `pro`: 10 requests a month. `prepaid`: 100 credits a month, 10 a request.
const PLANS: &str = r#"
default_plan: pro
plans:
  pro:
    meter: api_requests
    limits: [{ name: monthly, requests: 10, per: month }]
  prepaid:
    meter: api_requests
    credits: { grant: 100, per: month }
    meters: { api_requests: { credits_per_unit: 10 } }
"#;

fn alerts_config(receiver: &MockProvider) -> String {
    format!(
        "alerts: {{ at: [50, 100], webhook: {{ url: \"{}/hooks/alerts\", secret_env: ALERT_SECRET }} }}\n",
        receiver.url()
    )
}

/// A receiver answering each delivery with `status()`; returns it and the
/// (webhook-id, status) of every delivery.
fn receiver(status: impl Fn() -> u16 + Send + Sync + 'static) -> (MockProvider, Answers) {
    let answers: Answers = Arc::default();
    let log = answers.clone();
    let server = MockProvider::start(move |c: &Captured| {
        let s = status();
        log.lock().unwrap().push((
            c.header("webhook-id").unwrap_or("").to_owned(),
            s,
            c.clone(),
        ));
        (s, String::new())
    });
    (server, answers)
}

type Answers = Arc<Mutex<Vec<(String, u16, Captured)>>>;

/// The deliveries the receiver took (2xx), by webhook-id.
fn taken(a: &Answers) -> BTreeMap<String, Vec<Captured>> {
    let mut out: BTreeMap<String, Vec<Captured>> = BTreeMap::new();
    for (id, s, c) in a.lock().unwrap().iter() {
        if (200..300).contains(s) {
            out.entry(id.clone()).or_default().push(c.clone());
        }
    }
    out
}

/// Each delivery verified by the official library: its payload.
fn verified(deliveries: &[&Captured]) -> Vec<Value> {
    let items: Vec<Value> = deliveries
        .iter()
        .map(|c| {
            json!({
                "secret": SECRET,
                "body": c.body,
                "headers": {
                    "webhook-id": c.header("webhook-id"),
                    "webhook-timestamp": c.header("webhook-timestamp"),
                    "webhook-signature": c.header("webhook-signature"),
                },
            })
        })
        .collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/verify.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh installs it and standardwebhooks)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::from(items).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "verify.py failed (run scripts/setup.sh)"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_credit_thresholds_are_delivered_signed_once_each() {
    // The first delivery fails (503): it is retried under the same id.
    let calls = Arc::new(AtomicU16::new(0));
    let c = calls.clone();
    let (server, answers) = receiver(move || {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            503
        } else {
            204
        }
    });
    let h = Harness::builder()
        .plans(PLANS)
        .env("ALERT_SECRET", SECRET)
        .config(&alerts_config(&server))
        .build();
    let (pro, prepaid) = (
        h.key("cus_quota", None),
        h.key("cus_credits", Some("prepaid")),
    );
    let mut statuses = h.get_n("/v1/x", &pro, 11).await;
    statuses.extend(h.get_n("/v1/x", &prepaid, 11).await);
    assert_eq!(statuses[..10], [200; 10]);
    assert_eq!(statuses[10], 429);
    assert_eq!(statuses[11..21], [200; 10]);
    assert_eq!(statuses[21], 402);
    wait_for("four alerts delivered", 15, || taken(&answers).len() == 4).await;
    // Nothing more comes: one event per threshold.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = taken(&answers);
    assert_eq!(taken.len(), 4, "{:?}", taken.keys());
    assert!(taken.values().all(|d| d.len() == 1), "each taken once");
    let all: Vec<&Captured> = taken.values().map(|d| &d[0]).collect();
    let payloads = verified(&all);
    let mut seen = BTreeSet::new();
    for (p, c) in payloads.iter().zip(&all) {
        assert!(p.get("error").is_none(), "signature rejected: {p}");
        assert_eq!(c.path, "/hooks/alerts");
        assert_eq!(p["type"], "usage.threshold_reached");
        let d = &p["data"];
        seen.insert((
            d["customer"].as_str().unwrap().to_owned(),
            d["policy"].as_str().unwrap().to_owned(),
            d["percent"].as_u64().unwrap(),
            d["used"].as_u64().unwrap(),
            d["limit"].as_u64().unwrap(),
        ));
        assert!(
            d["period_end"].as_str().unwrap().ends_with("T00:00:00Z"),
            "{d}"
        );
    }
    let want: BTreeSet<_> = [
        ("cus_quota", "monthly", 50, 5, 10),
        ("cus_quota", "monthly", 100, 10, 10),
        ("cus_credits", "credits", 50, 50, 100),
        ("cus_credits", "credits", 100, 100, 100),
    ]
    .into_iter()
    .map(|(c, p, pc, u, l)| (c.to_owned(), p.to_owned(), pc, u, l))
    .collect();
    assert_eq!(seen, want);
    // The failed attempt was the same event as one taken later.
    let first = answers.lock().unwrap()[0].clone();
    assert_eq!(first.1, 503);
    assert!(taken.contains_key(&first.0));
    // Only this test of the process retries (`raised` and `delivered` are
    // counted by the others too; the kill -9 test reads its own process's).
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_alerts_total{result=\"retry\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_receiver_refuses_goes_to_the_dead_letters_and_is_replayed() {
    // Refused (400) until the operator fixes the receiver.
    let answer = Arc::new(AtomicU16::new(400));
    let a = answer.clone();
    let (server, answers) = receiver(move || a.load(Ordering::SeqCst));
    let h = Harness::builder()
        .plans(PLANS)
        .env("ALERT_SECRET", SECRET)
        .admin_token("alerts-admin")
        .config(&alerts_config(&server))
        .build();
    let key = h.key("cus_refused", None);
    assert_eq!(h.get_n("/v1/x", &key, 5).await, vec![200; 5]);
    let dead = h
        .app
        .spool
        .as_ref()
        .unwrap()
        .config()
        .dir
        .join("dead-alerts.jsonl");
    wait_for("a dead letter", 10, || dead.exists()).await;
    let line: Value = serde_json::from_str(std::fs::read_to_string(&dead).unwrap().trim()).unwrap();
    assert_eq!(line["event"]["data"]["percent"], 50);
    assert!(line["reason"].as_str().unwrap().contains("400"), "{line}");
    // Refused for good: not sent again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(answers.lock().unwrap().len(), 1);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_alerts_total{result=\"dead_letter\"}"),
        Some(1.0)
    );
    // `tollgate billing status` and `dead-letters` show it beside the sinks.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["billing"])
            .args(args)
            .arg("-c")
            .arg(h.dir.path().join("tollgate.yaml"))
            .env("ALERT_SECRET", SECRET)
            .env("TEST_ADMIN_TOKEN", "alerts-admin")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status: Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    let row = status["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "alerts")
        .cloned()
        .unwrap_or_else(|| panic!("no alerts row in {status}"));
    assert_eq!(row["dead_letters"], 1, "{row}");
    let listed: Value =
        serde_json::from_str(&cli(&["dead-letters", "--sink", "alerts", "--json"])).unwrap();
    assert_eq!(listed[0]["id"], line["id"]);
    // Fixed, then replayed (through the running proxy's admin API): sent
    // again under the same id, and taken.
    answer.store(204, Ordering::SeqCst);
    let replayed = cli(&["replay", "--sink", "alerts"]);
    assert_eq!(replayed.trim(), line["id"].as_str().unwrap());
    wait_for("the replayed alert", 10, || taken(&answers).len() == 1).await;
    assert!(taken(&answers).contains_key(line["id"].as_str().unwrap()));
    assert_eq!(
        std::fs::read_to_string(&dead).unwrap(),
        "",
        "no longer a dead letter"
    );
    // The status page says none is owed any more.
    let page = wait_until_page(&h, "Usage alerts: 0 owed").await;
    assert!(page.contains("Usage alerts: 0 owed"), "{page}");
}

/// The admin status page once it holds `text` (up to 5 s).
async fn wait_until_page(h: &Harness, want: &str) -> String {
    let mut page = String::new();
    for _ in 0..100 {
        page = harness::text(&format!("http://{}/", h.admin)).await;
        if page.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    page
}

/// Kills the child when dropped (a failed assertion leaves nothing behind).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_owed_at_kill_9_is_delivered_after_the_restart_and_not_raised_again() {
    // Down (503) until the restart.
    let up = Arc::new(AtomicU16::new(503));
    let u = up.clone();
    let (server, answers) = receiver(move || u.load(Ordering::SeqCst));
    let upstream = MockUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = write_project(dir.path(), PLANS, upstream.addr, &alerts_config(&server));
    let key = file_key(dir.path(), "cus_crash");
    let client = reqwest::Client::new();
    let get = |n: usize| {
        let (client, key) = (client.clone(), key.clone());
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let r = client
                    .get(format!("http://127.0.0.1:{port}/v1/x"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                out.push(r.status().as_u16());
            }
            out
        }
    };
    let mut child = Running(start_binary(dir.path(), &[("ALERT_SECRET", SECRET)]));
    wait_port(port);
    assert_eq!(get(5).await, vec![200; 5]);
    wait_for("a failed delivery", 10, || {
        !answers.lock().unwrap().is_empty()
    })
    .await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    up.store(204, Ordering::SeqCst);
    let _child = Running(start_binary(dir.path(), &[("ALERT_SECRET", SECRET)]));
    wait_port(port);
    wait_for("the owed alert", 10, || taken(&answers).len() == 1).await;
    // The month's count came back from the spool: 5 more reach 100 %. Each
    // of them finds 50 % reached (the memory limiter's alerts are raised
    // by every request past a threshold), and the replayed spool knows it
    // was raised: it is not raised again (`raised` below counts 1).
    assert_eq!(get(6).await, [vec![200; 5], vec![429]].concat());
    wait_for("the 100 % alert", 10, || taken(&answers).len() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = taken(&answers);
    let percents: Vec<u64> = taken
        .values()
        .map(|d| {
            assert_eq!(d.len(), 1, "taken once");
            d[0].json()["data"]["percent"].as_u64().unwrap()
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(percents, vec![50, 100]);
    // The attempts before the crash were the same event.
    let ids: BTreeSet<String> = answers
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.0.clone())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    // This process raised one (100 %) and delivered both.
    let m = harness::text(&format!("http://127.0.0.1:{admin}/metrics")).await;
    assert_eq!(
        metric(&m, "tollgate_alerts_total{result=\"raised\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "tollgate_alerts_total{result=\"delivered\"}"),
        Some(2.0)
    );
}
