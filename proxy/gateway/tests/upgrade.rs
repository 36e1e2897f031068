//! Zero-downtime binary upgrade, as `docs/operations.md` tells operators
//! to do it: start `tollgate run --upgrade`, send the running process
//! SIGQUIT. Under load, no client sees an error, and every answered
//! request is billed once and counted once against its day's quota.
//! Runs the real `tollgate` binary twice on one project directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{
    file_key, start_binary, start_binary_with, usage_report, wait_billed, wait_port, write_project,
    MockStripe, MockUpstream, STRIPE_KEY,
};

/// What the clients saw.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    /// Connection errors (refused, reset) and non-200 answers.
    failed: AtomicU64,
}

/// A client opening a new connection for each request to `url` until
/// `stop` (new connections are what an upgrade could refuse).
fn client(
    url: String,
    key: String,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        while !stop.load(Ordering::Relaxed) {
            let got = match client.get(&url).bearer_auth(&key).send().await {
                Ok(r) if r.status() == 200 => {
                    r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                }
                Ok(r) => Err(format!("answered {}", r.status())),
                Err(e) => Err(format!("{e:?}")),
            };
            match got {
                Ok(()) => {
                    seen.ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    if seen.failed.fetch_add(1, Ordering::SeqCst) < 5 {
                        eprintln!("request failed: {e}");
                    }
                }
            };
        }
    })
}

/// Killed when the test ends, passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exited_within(child: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_load_refuses_nothing_and_bills_every_request_once() {
    let upstream = MockUpstream::start();
    let stripe = MockStripe::start(|_| false);
    let dir = tempfile::tempdir().unwrap();
    let (port, _) = write_project(
        dir.path(),
        "default_plan: quota\nplans:\n  quota:\n    meter: api_requests\n    limits:\n      \
         - { name: daily, requests: 1000000, per: day }\n",
        upstream.addr,
        &format!(
            "metering: {{ flush_interval: 100ms, rollup: 1s, sinks: [{}] }}\nshutdown: {{ grace: 5s }}\n",
            stripe.sink()
        ),
    );
    let key = file_key(dir.path(), "cus_up");
    let env = [("TEST_STRIPE_KEY", STRIPE_KEY)];
    let pid_file = dir.path().join("data/spool/tollgate.pid");
    let pid_of = || {
        std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_owned()
    };

    let mut old = Running(start_binary(dir.path(), &env));
    wait_port(port);
    harness::wait_for("the pid file", 10, || pid_file.exists()).await;
    assert_eq!(pid_of(), old.0.id().to_string());

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = format!("http://127.0.0.1:{port}/slow?ms=3");
            client(url, key.clone(), seen.clone(), stop.clone())
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The documented recipe: the new process first, then SIGQUIT.
    let mut new = Running(start_binary_with(dir.path(), &["--upgrade"], &env));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quit = std::process::Command::new("kill")
        .args(["-QUIT", &pid_of()])
        .status()
        .unwrap();
    assert!(quit.success());
    assert!(
        exited_within(&mut old.0, 30),
        "the old process did not exit after handing over"
    );
    assert!(
        old.0.wait().unwrap().success(),
        "the old process exits cleanly"
    );
    let at_exit = seen.ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process is still running"
    );
    assert!(
        seen.ok.load(Ordering::SeqCst) > at_exit + 50,
        "the new process serves after the old one exited"
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let answered = seen.ok.load(Ordering::SeqCst);
    assert_eq!(seen.failed.load(Ordering::SeqCst), 0, "no request failed");
    assert!(answered > 500, "load was real: {answered}");
    assert_eq!(
        answered,
        upstream.hits(),
        "every request the API served was answered"
    );
    assert_eq!(
        pid_of(),
        new.0.id().to_string(),
        "the pid file names the new process"
    );

    // The day's count carried over: the old process's requests, then the new one's.
    let report = usage_report(port, &key).await;
    let daily = &report["policies"][0];
    assert_eq!(daily["name"], "daily");
    let used = daily["limit"].as_u64().unwrap() - daily["remaining"].as_u64().unwrap();
    assert_eq!(
        used, answered,
        "each answered request counted once: {report}"
    );

    // And billed once: what the old process had not delivered, the new one does.
    wait_billed(&stripe, "api_requests", answered).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stripe.total("api_requests"), answered, "billed once");
}
