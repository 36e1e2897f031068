//! Several instances behind Redis: shared keys, exact shared limits, and a
//! defined answer when Redis fails (the limiter on its own is tested in
//! `proxy/redis/tests`). Every test starts its own redis-server
//! processes on free ports; none touches the machine's Redis on 6379.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{create_key, Harness, RedisCluster, RedisServer};
use tollgate_core::clock::{Clock, ManualClock, SystemClock};

const MONTHLY: &str = "default_plan: metered\nplans:\n  metered:\n    limits:\n      - { name: monthly, requests: 300, per: month }\n    meter: api_requests\n";
const PER_SECOND: &str = "default_plan: burst\nplans:\n  burst:\n    limits:\n      - { name: burst, requests: 50, per: second }\n";

/// 900 requests from 64 concurrent clients, alternating between instances.
async fn hammer(instances: &[&Harness], key: &str, total: usize) -> (usize, usize) {
    let urls: Vec<String> = instances.iter().map(|h| h.url("/v1/x")).collect();
    let urls = Arc::new(urls);
    let mut tasks = Vec::new();
    for c in 0..64 {
        let (urls, key) = (urls.clone(), key.to_owned());
        let n = total / 64 + usize::from(c < total % 64);
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut limited) = (0, 0);
            for i in 0..n {
                let url = &urls[(c + i) % urls.len()];
                let r = client.get(url).bearer_auth(&key).send().await.unwrap();
                match r.status().as_u16() {
                    200 => ok += 1,
                    429 => limited += 1,
                    s => panic!(
                        "unexpected status {s}: {}",
                        r.text().await.unwrap_or_default()
                    ),
                }
            }
            (ok, limited)
        }));
    }
    let mut out = (0, 0);
    for t in tasks {
        let (o, l) = t.await.unwrap();
        out.0 += o;
        out.1 += l;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exact_quota() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\", timeout: 2s", redis.url());
    let a = Harness::builder().plans(MONTHLY).redis(&r).build();
    let b = Harness::builder().plans(MONTHLY).redis(&r).build();
    let key = a.key("cus_shared", None);
    b.sync();
    let (ok, limited) = hammer(&[&a, &b], &key, 900).await;
    assert_eq!(
        (ok, limited),
        (300, 600),
        "exactly the monthly quota across both instances"
    );
    assert_eq!(a.upstream_hits() + b.upstream_hits(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_exact_per_second_limit() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\", timeout: 2s", redis.url());
    // Both instances on one frozen clock: the second never ends, so the
    // count is exact however long 900 requests take on a slow machine.
    let clock = ManualClock::at(SystemClock.now_ms());
    let a = Harness::builder()
        .plans(PER_SECOND)
        .redis(&r)
        .clock(Arc::new(clock.clone()))
        .build();
    let b = Harness::builder()
        .plans(PER_SECOND)
        .redis(&r)
        .clock(Arc::new(clock.clone()))
        .build();
    let key = a.key("cus_burst", None);
    b.sync();
    let (ok, _) = hammer(&[&a, &b], &key, 900).await;
    assert_eq!(ok, 50, "exactly the per-second limit across both instances");
    // One second later (exactly), the window has slid past every request.
    clock.advance(1000);
    let (ok, _) = hammer(&[&a, &b], &key, 120).await;
    assert_eq!(ok, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_revocations_and_plan_changes_reach_every_instance_within_a_second() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\"", redis.url());
    let a = Harness::builder().redis(&r).build();
    let b = Harness::builder().redis(&r).build();

    // Created through A's store; B never syncs by hand.
    let (key, id) = a.key_with_id("cus_multi", Some("pro"));
    let created = Instant::now();
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.headers()["x-ratelimit-limit"], "1000");
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(1),
            "new key not usable on B within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tollgate_core::store::admin::set_plan(&a.store, "cus_multi", "enterprise").unwrap();
    let changed = Instant::now();
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if !r.headers().contains_key("x-ratelimit-limit") {
            break; // enterprise is unlimited
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "plan change not seen on B within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tollgate_core::store::admin::revoke(&a.store, &id, SystemClock.now_ms()).unwrap();
    let revoked = Instant::now();
    loop {
        let r = b.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "revocation not seen on B within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many times Redis ran `command` since its stats were reset.
fn calls(redis: &RedisServer, command: &str) -> u32 {
    let stats = redis.cli(&["info", "commandstats"]);
    stats
        .lines()
        .find(|l| l.starts_with(&format!("cmdstat_{command}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
}

/// A key or customer change through the CLI or admin API reads only the
/// records it names (no scan of the store), with the same answers as a
/// change run on the whole store: a plan conflict, a revoked key, a key
/// rotated, an unknown id. The changes are made by the CLI's store alone
/// (no running proxy, whose replica may read everything when it
/// subscribes), then a proxy started on the result follows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_customer_changes_read_only_their_records() {
    use tollgate_core::store::{admin, StoreError, UpdateStore};
    let redis = RedisServer::start();
    let url = redis.url();
    let (redis, revoked_key, rotated_key) = tokio::task::spawn_blocking(move || {
        let store =
            tollgate_redis::BlockingRedisAdmin::connect(Arc::new(tollgate_redis::RedisConfig {
                urls: vec![url],
                cluster: false,
                password: None,
                on_error: tollgate_core::limiter::OnError::Local,
                timeout: Duration::from_millis(500),
                prefix: "tg".into(),
            }))
            .unwrap();
        let now = SystemClock.now_ms();
        let create =
            |customer: &str, plan: Option<&str>| create_key(&store, "tg_test_", customer, plan);
        for i in 0..40 {
            create(&format!("cus_{i}"), None).unwrap();
        }
        let first = create("cus_pro", Some("pro")).unwrap();
        redis.cli(&["config", "resetstat"]);

        let refused = create("cus_pro", Some("enterprise"));
        assert!(
            matches!(refused, Err(StoreError::Conflict(ref why)) if why.contains("on plan pro")),
            "{refused:?}"
        );
        let id = first.record.id.clone();
        let rotated = admin::rotate(&store, "tg_test_", &id, 60_000, now).unwrap();
        assert_eq!(rotated.record.customer, "cus_pro");
        let revoked = admin::revoke(&store, &id, now).unwrap();
        assert!(revoked.revoked.is_some() && revoked.expires.is_some());
        assert!(matches!(
            admin::revoke(&store, "key_nonexistent00", now),
            Err(StoreError::NotFound(_))
        ));
        admin::set_suspended(&store, "cus_pro", true).unwrap();
        assert!(matches!(
            admin::set_suspended(&store, "cus_nobody", true),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            calls(&redis, "sscan") + calls(&redis, "smembers"),
            0,
            "no scan of the store"
        );
        assert!(
            calls(&redis, "hgetall") < 10,
            "{} HGETALLs",
            calls(&redis, "hgetall")
        );
        let data = store.data().unwrap();
        assert_eq!(data.keys.len(), 42);
        assert!(data.customers["cus_pro"].suspended);
        (redis, first.raw, rotated.raw)
    })
    .await
    .unwrap();
    let r = format!("url: \"{}\"", redis.url());
    let h = Harness::builder().redis(&r).build();
    assert_eq!(h.status("/v1/x", &revoked_key).await, 401, "revoked");
    assert_eq!(
        h.status("/v1/x", &rotated_key).await,
        403,
        "its customer suspended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_negatively_cached() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\"", redis.url());
    let h = Harness::builder().redis(&r).build();
    let guess = tollgate_core::keys::from_secret("tg_test_", &[3u8; 32]);
    redis.cli(&["config", "resetstat"]);
    for _ in 0..50 {
        assert_eq!(h.status("/v1/x", &guess).await, 401);
    }
    let stats = redis.cli(&["info", "commandstats"]);
    let hgetall = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_hgetall:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    assert_eq!(
        hgetall, 1,
        "one lookup for 50 tries of one guessed key:\n{stats}"
    );
}

/// Starts an instance on a Redis that persists (so a restart keeps keys),
/// checks traffic flows, kills Redis, and returns what requests get then.
async fn outage(on_error: &str) -> (RedisServer, Harness, String, Vec<u16>) {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let r = format!(
        "url: \"{}\", on_error: {on_error}, timeout: 200ms",
        redis.url()
    );
    let h = Harness::builder().redis(&r).build();
    let key = h.key("cus_outage", Some("pro"));
    assert_eq!(h.status("/v1/x", &key).await, 200);
    redis.kill();
    let mut statuses = Vec::new();
    let started = Instant::now();
    for _ in 0..40 {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 503 {
            assert!(
                r.headers().contains_key("retry-after"),
                "503 carries Retry-After"
            );
        }
    }
    // The breaker keeps the outage from costing a timeout per request.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    (redis, h, key, statuses)
}

async fn recovers(mut redis: RedisServer, h: Harness, key: String) {
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = h.get("/v1/x").bearer_auth(&key).send().await.unwrap();
        // Back on Redis: the shared counter moves again.
        let keys = redis.cli(&["--scan", "--pattern", "{tg:cus_outage}*"]);
        if r.status() == 200 && !keys.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery: {} / {keys:?}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_local_keeps_serving_known_keys() {
    let (redis, h, key, statuses) = outage("local").await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "never 401 or 5xx for a valid key: {statuses:?}"
    );
    recovers(redis, h, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_open_admits() {
    let (redis, h, key, statuses) = outage("open").await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    recovers(redis, h, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_error_closed_answers_503() {
    let (redis, h, key, statuses) = outage("closed").await;
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    let metrics = h.metrics().await;
    assert!(
        harness::metric(
            &metrics,
            "tollgate_limiter_fallback_total{policy=\"closed\"}"
        ) >= Some(1.0),
        "{metrics}"
    );
    recovers(redis, h, key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_three_node_cluster_share_one_exact_quota() {
    let cluster = RedisCluster::start(3);
    let r = format!("{}, timeout: 2s", cluster.nodes_yaml());
    let a = Harness::builder().plans(MONTHLY).redis(&r).build();
    let b = Harness::builder().plans(MONTHLY).redis(&r).build();
    let key = a.key("cus_cluster", None);
    b.sync();
    let (ok, limited) = hammer(&[&a, &b], &key, 900).await;
    assert_eq!((ok, limited), (300, 600));
}

/// A Redis Cluster node dies under load: customers whose slots it held are
/// decided by `on_error: local` (memory), every request is still answered
/// 200 or 429 (never a 5xx), and the breaker keeps each answer fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cluster_node_falls_back_to_local_limits_without_errors() {
    let mut cluster = RedisCluster::start(3);
    let r = format!("{}, timeout: 300ms, on_error: local", cluster.nodes_yaml());
    let h = Harness::builder().redis(&r).build();
    // Twelve customers: their hash tags spread them over the three nodes.
    let keys: Vec<String> = (0..12)
        .map(|i| h.key(&format!("cus_node_{i}"), None))
        .collect();
    for k in &keys {
        assert_eq!(h.get_n("/v1/x", k, 1).await, vec![200]);
    }
    cluster.nodes[0].kill();
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for _ in 0..3 {
        for k in &keys {
            *statuses.entry(h.get_n("/v1/x", k, 1).await[0]).or_default() += 1;
        }
    }
    assert!(
        statuses.keys().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&200).copied().unwrap_or(0) >= 24,
        "{statuses:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let metrics = h.metrics().await;
    assert!(
        harness::metric(
            &metrics,
            "tollgate_limiter_fallback_total{policy=\"local\"}"
        ) >= Some(1.0),
        "{metrics}"
    );
}
