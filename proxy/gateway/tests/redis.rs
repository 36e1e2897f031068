//! Several instances behind Redis: shared keys, exact shared limits, and a
//! defined answer when Redis fails. Every test starts its own redis-server
//! processes on free ports; none touches the machine's Redis on 6379.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{Harness, RedisCluster, RedisServer};
use tollgate_core::clock::{Clock, ManualClock, SystemClock};
use tollgate_core::limiter::conformance;
use tollgate_redis::conn::{OnError, RedisConfig, RedisConn};
use tollgate_redis::limiter::RedisLimiter;

fn redis_config(urls: Vec<String>, cluster: bool, prefix: &str) -> Arc<RedisConfig> {
    Arc::new(RedisConfig {
        urls,
        cluster,
        password: None,
        on_error: OnError::Local,
        timeout: Duration::from_millis(500),
        prefix: prefix.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_limiter_passes_the_same_conformance_suite_as_memory() {
    let redis = RedisServer::start();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let url = redis.url();
    // Each case gets its own key prefix, so cases cannot see each other.
    let conns: Vec<RedisConn> = {
        let mut v = Vec::new();
        for i in 0..16 {
            v.push(
                RedisConn::connect(redis_config(vec![url.clone()], false, &format!("conf{i}")))
                    .await
                    .unwrap(),
            );
        }
        v
    };
    conformance::run(|clock: ManualClock| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        RedisLimiter::new(conns[i].clone(), Arc::new(clock)).unwrap()
    })
    .await;
}

/// Concurrent requests of one instance share script calls, and stay exact:
/// each sees the charges of those decided before it, whichever window binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_share_script_calls_and_stay_exact() {
    use tollgate_core::limiter::Limiter;
    use tollgate_core::plans::Window;
    let redis = RedisServer::start();
    let conn = RedisConn::connect(redis_config(vec![redis.url()], false, "batch"))
        .await
        .unwrap();
    let limiter = Arc::new(RedisLimiter::new(conn.clone(), Arc::new(SystemClock)).unwrap());
    let plans = [
        (
            "calendar",
            [
                ("daily", 50, Window::Day),
                ("hourly", 1000, Window::Sliding(3_600_000)),
            ],
        ),
        (
            "sliding",
            [
                ("daily", 1000, Window::Day),
                ("minute", 50, Window::Sliding(60_000)),
            ],
        ),
    ];
    for (binding, limits) in plans {
        let plan = conformance::plan(&limits);
        let customer: Arc<str> = format!("cus_{binding}").into();
        let _: () = conn
            .admin(redis::cmd("CONFIG").arg("RESETSTAT"))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (limiter, plan, customer) = (limiter.clone(), plan.clone(), customer.clone());
                tokio::spawn(async move { limiter.check(&customer, &plan, 1).await.unwrap() })
            })
            .collect();
        let mut remaining = Vec::new();
        for t in tasks {
            let d = t.await.unwrap();
            let tight = if binding == "calendar" { 0 } else { 1 };
            if d.allowed {
                remaining.push(d.policies[tight].remaining);
            } else {
                assert!(
                    d.policies[tight].violated && d.retry_after_secs >= 1,
                    "{d:?}"
                );
            }
        }
        remaining.sort_unstable();
        assert_eq!(
            remaining,
            (0..50).collect::<Vec<u64>>(),
            "{binding}: exactly the quota, each admitted request seeing the ones before it"
        );
        let stats: String = conn
            .admin(redis::cmd("INFO").arg("commandstats"))
            .await
            .unwrap();
        let calls: u64 = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            (1..200).contains(&calls),
            "{binding}: 200 concurrent checks took {calls} script calls"
        );
        // A sliding window stores one charge per script call, not one per
        // request: its memory follows the calls.
        let (name, _, Window::Sliding(w)) = limits[1] else {
            unreachable!("the second limit slides")
        };
        let set = format!("{{batch:{customer}}}:s:{name}:{w}");
        let charges: Vec<String> = conn
            .admin(redis::cmd("ZRANGE").arg(set).arg(0).arg(-1))
            .await
            .unwrap();
        let units: u64 = charges
            .iter()
            .map(|m| m.rsplit(':').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(units, 50, "{binding}: {charges:?}");
        assert!(
            (charges.len() as u64) <= calls && charges.len() < 50,
            "{binding}: {} stored charges for {calls} calls",
            charges.len()
        );
        // What the batches wrote back is what the next request sees.
        let d = limiter.check(&customer, &plan, 0).await.unwrap();
        assert_eq!(
            (d.policies[0].remaining, d.policies[1].remaining),
            if binding == "calendar" {
                (0, 950)
            } else {
                (950, 0)
            },
            "{d:?}"
        );
    }
}

/// One script call deciding several requests gives each the decision the
/// memory limiter gives when it takes the same requests one by one at the
/// same instant: remaining units, resets, refusals and waits, overage, and
/// arrival order across a plan change.
#[tokio::test(flavor = "current_thread")]
async fn a_batch_decides_each_request_like_the_memory_limiter() {
    use tollgate_core::limiter::{Limiter, MemoryLimiter};
    use tollgate_core::plans::{Limit, Plan, Window};
    let redis = RedisServer::start();
    let conn = RedisConn::connect(redis_config(vec![redis.url()], false, "replay"))
        .await
        .unwrap();
    let clock = ManualClock::at(1_780_000_000_000);
    let batched = Arc::new(RedisLimiter::new(conn.clone(), Arc::new(clock.clone())).unwrap());
    let memory = MemoryLimiter::new(Arc::new(clock.clone()));
    let limit = |name: &str, quota, window, overage: bool| Limit {
        name: name.into(),
        quota,
        window,
        overage,
        overage_meter: overage.then(|| "api_overage".into()),
    };
    let limits = vec![
        limit("minute", 10, Window::Sliding(60_000), false),
        limit("daily", 8, Window::Day, true),
    ];
    let plan = Arc::new(Plan {
        name: "mixed".into(),
        policy_header: tollgate_core::plans::policy_header(&limits),
        limits,
        meter: None,
    });
    // The same limits with a bigger burst: a plan change while requests
    // are in flight. Both plans' limits count against the same windows.
    let mut bigger = plan.limits.clone();
    bigger[0].quota = 12;
    let other = Arc::new(Plan {
        name: "bigger".into(),
        policy_header: tollgate_core::plans::policy_header(&bigger),
        limits: bigger,
        meter: None,
    });
    let customer: Arc<str> = "cus".into();
    // History at different times, so the window holds charges that leave
    // it at different moments.
    for (advance, cost) in [(0, 3), (20_000, 2), (15_000, 1)] {
        clock.advance(advance);
        let a = batched.check(&customer, &plan, cost).await.unwrap();
        assert_eq!(a, memory.decide(&customer, &plan, cost));
    }
    clock.advance(10_000);
    let stats = |conn: RedisConn| async move {
        let info: String = conn
            .admin(redis::cmd("INFO").arg("commandstats"))
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = stats(conn.clone()).await;
    let costs = [1, 4, 2, 1, 3, 1, 0, 2, 5, 1, 2, 1];
    let plan_of = |i: usize| {
        if [3, 4, 8, 10].contains(&i) {
            &other
        } else {
            &plan
        }
    };
    // Spawned on this single-threaded runtime, they all queue before the
    // batch is sent.
    let tasks: Vec<_> = costs
        .iter()
        .enumerate()
        .map(|(i, &cost)| {
            let (l, c, p) = (batched.clone(), customer.clone(), plan_of(i).clone());
            tokio::spawn(async move { l.check(&c, &p, cost).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert_eq!(stats(conn.clone()).await - before, 1, "one script call");
    let want: Vec<_> = costs
        .iter()
        .enumerate()
        .map(|(i, &cost)| memory.decide(&customer, plan_of(i), cost))
        .collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} (cost {})", costs[i]);
    }
    assert!(want.iter().any(|d| !d.allowed) && want.iter().any(|d| d.overage));
}

/// A sliding window's total never outlives its charges: if the set of
/// charges is gone (expired in Redis), the window is empty whatever the
/// total key still says.
#[tokio::test]
async fn a_sliding_total_without_its_charges_counts_nothing() {
    use tollgate_core::limiter::Limiter;
    use tollgate_core::plans::Window;
    let redis = RedisServer::start();
    let conn = RedisConn::connect(redis_config(vec![redis.url()], false, "phantom"))
        .await
        .unwrap();
    let limiter = RedisLimiter::new(conn.clone(), Arc::new(SystemClock)).unwrap();
    let plan = conformance::plan(&[("minute", 10, Window::Sliding(60_000))]);
    for _ in 0..4 {
        assert!(
            limiter
                .check(&"cus".into(), &plan, 2)
                .await
                .unwrap()
                .allowed
        );
    }
    let set = "{phantom:cus}:s:minute:60000";
    let total: u64 = conn
        .admin(redis::cmd("GET").arg(format!("{set}:t")))
        .await
        .unwrap();
    assert_eq!(total, 8);
    let ttl: i64 = conn.admin(redis::cmd("PTTL").arg(set)).await.unwrap();
    assert!(
        ttl > 0 && ttl <= 60_000,
        "the set expires with the window: {ttl}"
    );
    // The set goes (as it would by expiring) while the total stays.
    let _: () = conn.admin(redis::cmd("DEL").arg(set)).await.unwrap();
    let d = limiter.check(&"cus".into(), &plan, 0).await.unwrap();
    assert_eq!(d.policies[0].remaining, 10, "{d:?}");
    let d = limiter.check(&"cus".into(), &plan, 3).await.unwrap();
    assert_eq!(d.policies[0].remaining, 7, "{d:?}");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_negatively_cached() {
    let redis = RedisServer::start();
    let r = format!("url: \"{}\"", redis.url());
    let h = Harness::builder().redis(&r).build();
    let guess = tollgate_core::keys::from_secret("tg_test_", &[3u8; 32]);
    redis.cli(&["config", "resetstat"]);
    for _ in 0..50 {
        assert_eq!(
            h.get("/v1/x")
                .bearer_auth(&guess)
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
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
    assert_eq!(
        h.get("/v1/x")
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
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
        metrics.contains("tollgate_limiter_fallback_total{policy=\"closed\"}"),
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
