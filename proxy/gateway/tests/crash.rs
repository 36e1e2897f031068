//! kill -9 under load, then restart: usage written before the crash is
//! billed after it, once. Runs the real `tollgate` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    file_key, free_port, start_binary, usage_report, wait_billed, wait_port, write_project,
    MockStripe, MockUpstream, STRIPE_KEY,
};

fn start(dir: &std::path::Path) -> Child {
    start_binary(dir, &[("TEST_STRIPE_KEY", STRIPE_KEY)])
}

/// A client calling `url` until `stop`, counting the 200s it received whole.
fn client(
    url: String,
    key: String,
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !stop.load(Ordering::Relaxed) {
            match client.get(&url).bearer_auth(&key).send().await {
                Ok(r) if r.status() == 200 => {
                    // Counted only once the whole answer arrived.
                    if r.bytes().await.is_ok() {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(r) => panic!("unexpected {}", r.status()),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_then_restart_bills_every_answered_request_once() {
    let upstream = MockUpstream::start();
    let stripe = MockStripe::start(|_| false);
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(
        dir.path().join("plans.yaml"),
        "default_plan: pro\nplans:\n  pro:\n    limits: []\n    meter: api_requests\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{}\nadmin: {{ listen: 127.0.0.1:{admin} }}\nthreads: 2\n\
             metering: {{ flush_interval: 100ms, rollup: 1s, sinks: [{}] }}\n",
            upstream.addr,
            stripe.sink()
        ),
    )
    .unwrap();
    let key = file_key(dir.path(), "cus_crash");

    let mut child = start(dir.path());
    wait_port(port);
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (ok, stop, key) = (ok.clone(), stop.clone(), key.clone());
        let url = format!("http://127.0.0.1:{port}/slow?ms=3");
        clients.push(client(url, key, ok, stop));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answered = ok.load(Ordering::SeqCst);
    let served = upstream.hits();
    assert!(answered > 100, "load was real: {answered}");

    let mut child = start(dir.path());
    wait_port(port);
    // Billed must reach what clients received, and may exceed it only by
    // responses the API served but the crash kept from the client.
    wait_billed(&stripe, "api_requests", answered).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let billed = stripe.total("api_requests");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        (answered..=served).contains(&billed),
        "clients got {answered} answers, the API served {served}, Stripe billed {billed}"
    );
    // A record re-sent after the restart (its delivery was not yet noted
    // when the process died) carries the same identifier and value, which is
    // what lets Stripe count it once.
    let mut values = std::collections::HashMap::new();
    for c in stripe.server.captured() {
        let f = c.form();
        let v = values
            .entry(f["identifier"].clone())
            .or_insert_with(|| f["payload[value]"].clone());
        assert_eq!(
            *v, f["payload[value]"],
            "identifier {} re-sent with another value",
            f["identifier"]
        );
    }
}

/// `tollgate run` of `dir`'s config with an access log and a short grace.
fn project(dir: &std::path::Path, port: u16, admin: u16, upstream: &str, sink: &str) -> String {
    std::fs::write(
        dir.join("plans.yaml"),
        "default_plan: pro\nplans:\n  pro:\n    limits: []\n    meter: api_requests\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{upstream}\nadmin: {{ listen: 127.0.0.1:{admin} }}\nthreads: 2\n\
             shutdown: {{ grace: 2s }}\naccess_log: {{ to: access.log }}\n\
             metering: {{ flush_interval: 1h, rollup: 1s, sinks: [{sink}] }}\n"
        ),
    )
    .unwrap();
    file_key(dir, "cus_term")
}

/// The binary running [`project`] in front of a mock upstream, with a
/// mock Stripe as its sink.
struct Running {
    _upstream: MockUpstream,
    stripe: MockStripe,
    dir: tempfile::TempDir,
    port: u16,
    key: String,
    child: Child,
}

fn launch() -> Running {
    let upstream = MockUpstream::start();
    let stripe = MockStripe::start(|_| false);
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let key = project(
        dir.path(),
        port,
        admin,
        &upstream.addr.to_string(),
        &stripe.sink(),
    );
    let child = start(dir.path());
    wait_port(port);
    Running {
        _upstream: upstream,
        stripe,
        dir,
        port,
        key,
        child,
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_short_grace_exits_in_time_and_flushes_usage() {
    let Running {
        _upstream,
        stripe,
        dir: _dir,
        port,
        key,
        mut child,
    } = launch();
    let client = reqwest::Client::new();
    for _ in 0..7 {
        let r = client
            .get(format!("http://127.0.0.1:{port}/v1/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // flush_interval is an hour: nothing has reached Stripe yet.
    assert_eq!(stripe.total("api_requests"), 0);
    let asked = Instant::now();
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    // One second to stop accepting, then at most the 2 s grace.
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    assert_eq!(
        stripe.total("api_requests"),
        7,
        "the usage was flushed on the way out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_after_logrotate_moved_it() {
    let Running {
        _upstream,
        stripe: _stripe,
        dir,
        port,
        key,
        mut child,
    } = launch();
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(format!("http://127.0.0.1:{port}/v1/x"))
            .bearer_auth(&key)
            .send()
    };
    let log = dir.path().join("access.log");
    let count = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&log) < 1 {
        assert!(Instant::now() < deadline, "no access log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // logrotate: move the file, then tell Tollgate.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    signal(&child, "USR1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get().await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(&log) < 1 {
        assert!(Instant::now() < deadline, "the access log was not reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&rotated), 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// The case: on the embedded default, a restart (even `kill -9`)
/// must not give any customer its day's or month's quota back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_each_customers_daily_and_monthly_use() {
    let upstream = MockUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = write_project(
        dir.path(),
        "default_plan: quota\nplans:\n  quota:\n    meter: api_requests\n    limits:\n      \
         - { name: daily, requests: 1000000, per: day }\n      \
         - { name: monthly, requests: 5000000, per: month }\n      \
         - { name: burst, requests: 1000000, per: second }\n",
        upstream.addr,
        "",
    );
    let customers = ["cus_q1", "cus_q2", "cus_q3", "cus_q4"];
    let keys: Vec<String> = customers.iter().map(|c| file_key(dir.path(), c)).collect();
    let mut child = start(dir.path());
    wait_port(port);
    let answered: Vec<Arc<AtomicU64>> = customers.iter().map(|_| Arc::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    // 64 clients, 16 per customer.
    for i in 0..64 {
        let (ok, stop, key) = (answered[i % 4].clone(), stop.clone(), keys[i % 4].clone());
        clients.push(client(
            format!("http://127.0.0.1:{port}/v1/x"),
            key,
            ok,
            stop,
        ));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let served = upstream.hits();

    let mut child = start(dir.path());
    wait_port(port);
    let mut used_total = 0;
    for (c, key) in customers.iter().zip(&keys) {
        let report = usage_report(port, key).await;
        let used = |name: &str| {
            let p = report["policies"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap();
            p["limit"].as_u64().unwrap() - p["remaining"].as_u64().unwrap()
        };
        let got = answered[customers.iter().position(|x| x == c).unwrap()].load(Ordering::SeqCst);
        assert!(got > 20, "{c}: load was real: {got}");
        let (daily, monthly) = (used("daily"), used("monthly"));
        // Every answer the client received counts; beyond that only
        // responses the crash kept from their client (at most one per
        // client of this customer).
        assert!(
            (got..=got + 16).contains(&daily),
            "{c}: clients received {got} answers, the daily count after the restart is {daily}"
        );
        assert_eq!(daily, monthly, "{c}: both windows were charged alike");
        assert_eq!(used("burst"), 0, "{c}: sliding windows start afresh");
        used_total += daily;
    }
    assert!(
        used_total <= served,
        "counted {used_total}, the upstream served only {served}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Streams of token usage under load, `kill -9`, restart: what was billed
/// covers every stream a client received whole and nothing the upstream
/// did not report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_streams_bills_every_stream_received_whole() {
    let llm = harness::MockLlm::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = write_project(
        dir.path(),
        "default_plan: ai\nplans:\n  ai:\n    limits: []\nroutes:\n  \
         - { match: \"POST /v1/chat/completions\", usage: openai, cost: 50, meter: ai_fallback_tokens }\n",
        llm.addr,
        "",
    );
    let key = file_key(dir.path(), "cus_stream");
    let mut child = start(dir.path());
    wait_port(port);
    let whole = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (whole, stop, key) = (whole.clone(), stop.clone(), key.clone());
        let url = format!("http://127.0.0.1:{port}/v1/chat/completions?stream=1&stall_ms=20");
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = client.post(&url).bearer_auth(&key).body("{}").send().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                // Whole: every byte through the end of the stream.
                if let Ok(body) = r.text().await {
                    if body.ends_with("data: [DONE]\n\n") {
                        whole.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL, streams in flight
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let whole = whole.load(Ordering::SeqCst);
    let asked = llm.accept_encoding.lock().unwrap().len() as u64;
    assert!(whole > 20, "load was real: {whole} streams");

    let mut child = start(dir.path());
    wait_port(port);
    let usage = usage_report(port, &key).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // 7 output tokens a stream (tollgate_testkit::OPENAI_STREAM).
    let billed = usage["usage"]["ai_output_tokens"].as_u64().unwrap_or(0);
    assert!(
        billed >= 7 * whole,
        "{whole} streams received whole, but only {billed} output tokens billed: {usage}"
    );
    assert!(
        billed <= 7 * asked,
        "{billed} output tokens billed for {asked} streams the upstream sent: {usage}"
    );
}

/// Credits charged under load, `kill -9`, restart: the balance still holds
/// every charge of an answer the clients received, and no charge the
/// upstream did not serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_credit_charge() {
    let upstream = MockUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let grant = 10_000_000;
    let (port, _) = write_project(
        dir.path(),
        &format!(
            "default_plan: prepaid\nplans:\n  prepaid:\n    meter: api_requests\n    \
             credits: {{ grant: {grant}, per: month }}\n    \
             meters: {{ api_requests: {{ credits_per_unit: 3 }} }}\n"
        ),
        upstream.addr,
        "",
    );
    let key = file_key(dir.path(), "cus_credit");
    let mut child = start(dir.path());
    wait_port(port);
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|_| {
            client(
                format!("http://127.0.0.1:{port}/v1/x"),
                key.clone(),
                ok.clone(),
                stop.clone(),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (got, served) = (ok.load(Ordering::SeqCst), upstream.hits());
    assert!(got > 20, "load was real: {got}");

    let mut child = start(dir.path());
    wait_port(port);
    let report = usage_report(port, &key).await;
    let used = report["credits"]["used"].as_u64().unwrap();
    assert!(
        (got * 3..=served * 3).contains(&used),
        "clients received {got} answers, the upstream served {served}; {used} credits charged"
    );
    assert_eq!(
        report["credits"]["remaining"].as_i64().unwrap(),
        grant as i64 - used as i64
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
