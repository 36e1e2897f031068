//! Caps on requests in flight (`{ name: parallel, concurrent: N }`): on one
//! instance, shared by two through Redis, and given back by an instance
//! killed mid-request once its leases expire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::time::{Duration, Instant};

use harness::{free_port, wait_for_port, Harness, MockUpstream, RedisServer};
use serde_json::Value;

const PLANS: &str = r#"
default_plan: agents
plans:
  agents:
    limits:
      - { name: parallel, concurrent: 2 }
      - { name: daily, requests: 1000, per: day }
routes:
  - { match: "/free/*", cost: 0 }
"#;

/// `n` requests to `/slow?ms=…` at once; their statuses, and the 429 bodies.
async fn burst(h: &Harness, key: &str, n: usize, ms: u64) -> (Vec<u16>, Vec<reqwest::Response>) {
    let calls = (0..n).map(|_| {
        h.client
            .get(h.url(&format!("/slow?ms={ms}")))
            .bearer_auth(key)
            .send()
    });
    let responses: Vec<reqwest::Response> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    let refused = responses
        .into_iter()
        .filter(|r| r.status() == 429)
        .collect();
    (statuses, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_admits_that_many_at_once_and_refuses_the_rest_by_name() {
    let h = Harness::builder().plans(PLANS).build();
    let key = h.key("cus_agent", None);
    let (statuses, refused) = burst(&h, &key, 5, 600).await;
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
    for r in refused {
        assert_eq!(r.headers()["retry-after"], "1");
        let policy = r.headers()["ratelimit-policy"].to_str().unwrap().to_owned();
        assert!(
            !policy.contains("parallel"),
            "a cap is not a window: {policy}"
        );
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["violated-policies"], serde_json::json!(["parallel"]));
        assert!(p["detail"].as_str().unwrap().contains("in flight"), "{p}");
    }
    // All finished: the cap is free again, and only the admitted ones
    // were charged to the daily quota.
    let (statuses, _) = burst(&h, &key, 2, 10).await;
    assert_eq!(statuses, vec![200, 200]);
    let r = h
        .get("/_tollgate/usage")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let usage: Value = r.json().await.unwrap();
    let daily = usage["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "daily")
        .unwrap()
        .clone();
    assert_eq!(daily["remaining"], 1000 - 4);
    let parallel = usage["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "parallel")
        .unwrap()
        .clone();
    assert_eq!(
        (parallel["limit"].as_u64(), parallel["remaining"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(parallel["window"], "concurrent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_cap_through_redis() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\", timeout: 2s", redis.url());
    let a = Harness::builder().plans(PLANS).redis(&r).build();
    let b = Harness::builder().plans(PLANS).redis(&r).build();
    let key = a.key("cus_two", None);
    b.sync();
    // Two long requests through A hold the cap; B refuses the third.
    let slow = |h: &Harness| {
        h.client
            .get(h.url("/slow?ms=1500"))
            .bearer_auth(&key)
            .send()
    };
    let (first, second) = (slow(&a), slow(&a));
    let held = tokio::spawn(async move {
        let (x, y) = tokio::join!(first, second);
        (x.unwrap().status().as_u16(), y.unwrap().status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 429, "B saw A's requests in flight");
    assert_eq!(held.await.unwrap(), (200, 200));
    // Released when they ended: B admits again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the leases were never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_request_gives_its_slots_back_when_the_leases_expire() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\", timeout: 2s", redis.url());
    let b = Harness::builder().plans(PLANS).redis(&r).build();
    let key = b.key("cus_crash", None);
    // Instance A: the real binary, on the same Redis, killed with -9 while
    // it has both of the customer's slots.
    let upstream = MockUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(dir.path().join("plans.yaml"), PLANS).unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{}\nplans: plans.yaml\n\
             keys: {{ store: redis, prefix: tg_test_ }}\nlimits: {{ backend: redis }}\nredis: {{ {r} }}\n\
             admin: {{ listen: 127.0.0.1:{admin} }}\naccess_log: {{ enabled: false }}\nmetering: {{ enabled: false }}\n",
            upstream.addr
        ),
    )
    .unwrap();
    // Killed when dropped, so a failing assertion never leaves it running
    // (holding the test runner's output open); its output is not ours.
    let mut a = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["run", "-c"])
            .arg(dir.path().join("tollgate.yaml"))
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(format!("127.0.0.1:{port}").parse().unwrap());
    let client = reqwest::Client::new();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..2 {
        let (client, key, stop) = (client.clone(), key.clone(), stop.clone());
        // Each keeps one long request running through A (again, should
        // one end early on a loaded machine) until the test stops it.
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client
                    .get(format!("http://127.0.0.1:{port}/slow?ms=60000"))
                    .bearer_auth(&key)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    // Both slots taken (seen from B), then A dies holding them.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 429 {
            break;
        }
        assert!(Instant::now() < deadline, "A never held the slots");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed = Instant::now();
    let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 429, "still held right after the crash");
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            killed.elapsed() < tollgate_redis::limiter::LEASE + Duration::from_secs(5),
            "the dead instance's leases never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        killed.elapsed() > Duration::from_secs(2),
        "freed before the leases could have expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_calls_take_no_slot_and_give_none_back() {
    let h = Harness::builder().plans(PLANS).build();
    let key = h.key("cus_free_calls", None);
    let slow = |h: &Harness| {
        h.client
            .get(h.url("/slow?ms=1200"))
            .bearer_auth(&key)
            .send()
    };
    let (a, b) = (slow(&h), slow(&h));
    let held = tokio::spawn(async move {
        let (x, y) = tokio::join!(a, b);
        (x.unwrap().status().as_u16(), y.unwrap().status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cost-0 calls pass while the cap is full, and their ends free nothing.
    for _ in 0..5 {
        let r = h.get("/free/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "the free calls gave back slots they never took"
    );
    assert_eq!(held.await.unwrap(), (200, 200));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
