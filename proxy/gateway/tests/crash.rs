//! kill -9 under load, then restart: usage written before the crash is
//! billed after it, once. Runs the real `tollgate` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{free_port, MockStripe, MockUpstream, STRIPE_KEY};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::store::admin::{create_key, CreateKey};
use tollgate_core::store::FileStore;

fn start(dir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c"])
        .arg(dir.join("tollgate.yaml"))
        .env("TEST_STRIPE_KEY", STRIPE_KEY)
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap()
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tollgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let store = FileStore::open(&dir.path().join("keys.db")).unwrap();
    let key = create_key(
        &store,
        "tg_live_",
        CreateKey {
            customer: "cus_crash",
            plan: None,
            name: None,
            expires: None,
            set_plan: false,
            meta: None,
        },
        SystemClock.now_ms(),
    )
    .unwrap()
    .raw;

    let mut child = start(dir.path());
    wait_port(port);
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (ok, stop, key) = (ok.clone(), stop.clone(), key.clone());
        let url = format!("http://127.0.0.1:{port}/slow?ms=3");
        clients.push(tokio::spawn(async move {
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
        }));
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while stripe.total("api_requests") < answered {
        assert!(
            Instant::now() < deadline,
            "billed {} < answered {answered}",
            stripe.total("api_requests")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
