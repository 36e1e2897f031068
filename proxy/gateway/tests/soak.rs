//! Soak: the real binary under sustained load, with keys created and
//! revoked and the key store reloaded all along; its RSS is sampled every
//! 10 s and must stay bounded, and no answer may be a 5xx.
//!
//! CI runs it for 2 minutes; `scripts/soak.sh` runs the full 10
//! (`TOLLGATE_SOAK_SECS` sets the length).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{free_port, wait_for_port, MockUpstream};

const PLANS: &str = "default_plan: pro\nplans:\n  pro:\n    limits:\n      - { name: burst, requests: 200, per: second }\n      - { name: monthly, requests: 100000000, per: month }\n    meter: api_requests\n";
const TOKEN: &str = "soak-admin-token";

fn cli(dir: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(out.status.success(), "tollgate {args:?}: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A new key and its id (from `created key_… for customer …`).
fn create_key(dir: &Path, customer: &str) -> (String, String) {
    let (key, err) = cli(dir, &["keys", "create", "--customer", customer]);
    let id = err
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_owned();
    (key, id)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_with_key_churn_and_reloads_stays_bounded() {
    let secs: u64 = std::env::var("TOLLGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(dir.path().join("plans.yaml"), PLANS).unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{}\nkeys: {{ path: keys.db, prefix: tg_soak_ }}\nadmin: {{ listen: 127.0.0.1:{admin}, token_env: SOAK_ADMIN_TOKEN }}\nthreads: 1\n",
            mock.addr
        ),
    )
    .unwrap();
    let keys: Arc<Mutex<Vec<(String, String)>>> = Arc::new(Mutex::new(
        (0..20)
            .map(|i| create_key(dir.path(), &format!("cus_{i}")))
            .collect(),
    ));
    let proxy = Proxy(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("run")
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .env("SOAK_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = proxy.0.id();
    wait_for_port(format!("127.0.0.1:{port}").parse().unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let statuses: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let mut load = Vec::new();
    for worker in 0..12usize {
        let (stop, statuses, keys) = (stop.clone(), statuses.clone(), keys.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let url = format!("http://127.0.0.1:{port}/v1/items");
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                i = i.wrapping_add(7);
                let key = {
                    let k = keys.lock().unwrap();
                    k[i % k.len()].0.clone()
                };
                // One in ten sends a revoked, mistyped or absent key.
                let req = match i % 10 {
                    0 => client.get(&url).bearer_auth(format!("{key}x")),
                    1 => client.get(&url),
                    _ => client.get(&url).bearer_auth(&key),
                };
                let status = match req.send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                *statuses.lock().unwrap().entry(status).or_default() += 1;
            }
        }));
    }

    // Churn and reloads on this thread; RSS every 10 s.
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next_sample = Duration::from_secs(10);
    let admin_client = reqwest::Client::new();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        round += 1;
        let path = dir.path().to_owned();
        let fresh =
            tokio::task::spawn_blocking(move || create_key(&path, &format!("cus_new_{round}")))
                .await
                .unwrap();
        let old = {
            let mut k = keys.lock().unwrap();
            k.push(fresh);
            k.remove(0)
        };
        // Revoked: its requests now get 401 (the load keeps no copy).
        let path = dir.path().to_owned();
        tokio::task::spawn_blocking(move || cli(&path, &["keys", "revoke", &old.1]))
            .await
            .unwrap();
        if round.is_multiple_of(3) {
            let r = admin_client
                .post(format!("http://127.0.0.1:{admin}/admin/reload"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "reload");
        }
        if started.elapsed() >= next_sample {
            samples.push(rss_kb(pid));
            next_sample += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    let total: u64 = statuses.values().sum();
    // 401 for bad keys, 429 when a customer passes 200 a second; never a
    // 5xx, never a dropped connection (0).
    assert!(
        statuses.keys().all(|s| [200, 401, 429].contains(s)),
        "only 200, 401 and 429: {statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > total / 2,
        "{statuses:?}"
    );
    // Bounded: after the first sample (warm), RSS grows by less than 64 MB.
    let warm = samples[0];
    let peak = samples.iter().copied().max().unwrap();
    assert!(
        peak < warm + 64 * 1024,
        "RSS grew from {warm} kB to {peak} kB: {samples:?}"
    );
    eprintln!("soak: {total} requests in {secs}s, {statuses:?}, RSS kB every 10 s: {samples:?}");
}
