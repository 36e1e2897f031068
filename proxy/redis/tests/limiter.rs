//! The Redis limiter on its own, against `redis-server` processes of the
//! test's own on free ports (never the machine's Redis on 6379): the same
//! conformance suite as the memory limiter, batching, and the script's
//! bookkeeping.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::clock::{ManualClock, SystemClock};
use tollgate_core::limiter::conformance;
use tollgate_redis::conn::{OnError, RedisConfig, RedisConn};
use tollgate_redis::limiter::RedisLimiter;
use tollgate_testkit::RedisServer;

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
        billed: true,
        display: Default::default(),
        credits: None,
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
        billed: true,
        display: Default::default(),
        credits: None,
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
