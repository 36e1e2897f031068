//! Prepaid credits in Redis, against a `redis-server` of the test's own:
//! the account `credits.lua` keeps ends where core's `credits::Account`
//! ends through the same history (period edges, rollover, a plan change,
//! idempotent grants), a spool's charges delivered twice count once, and
//! the limiter's script refuses a call out of credits without charging
//! its limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::clock::Clock;
use tollgate_core::clock::{days_from_civil, Date, ManualClock, Millis, DAY};
use tollgate_core::credits::{Account, Allowance, CreditPolicy, Grant, Source};
use tollgate_core::limiter::{CreditAnswer, CreditAsk, Limiter};
use tollgate_core::plans::{Limit, Plan, Window};
use tollgate_redis::conn::{OnError, RedisConfig, RedisConn};
use tollgate_redis::credits::{Charge, RedisCredits};
use tollgate_redis::RedisLimiter;
use tollgate_testkit::RedisServer;

async fn conn(redis: &RedisServer, prefix: &str) -> RedisConn {
    RedisConn::connect(Arc::new(RedisConfig {
        urls: vec![redis.url()],
        cluster: false,
        password: None,
        on_error: OnError::Closed,
        timeout: Duration::from_millis(500),
        prefix: prefix.into(),
    }))
    .await
    .unwrap()
}

fn at(year: i64, month: u32, day: u32) -> Millis {
    days_from_civil(Date { year, month, day }) as Millis * DAY
}

fn grant(at: Millis, amount: i64, key: Option<&str>) -> Grant {
    Grant {
        at,
        amount,
        idempotency_key: key.map(Into::into),
        reason: "test".into(),
        source: Source::Admin,
    }
}

enum Op {
    Charge(Allowance, u64, Millis),
    Grant(Allowance, Grant),
}

#[tokio::test(flavor = "current_thread")]
async fn the_redis_account_ends_where_cores_account_does() {
    let redis = RedisServer::start();
    let book = RedisCredits::new(conn(&redis, "acct").await);
    let monthly = |grant, rollover| Allowance {
        grant,
        per: Window::Month,
        rollover,
    };
    let (plain, rolling) = (monthly(100, false), monthly(100, true));
    let daily = Allowance {
        grant: 10,
        per: Window::Day,
        rollover: false,
    };
    let jan = at(2027, 1, 30);
    // One history per customer: each op, then the balance compared at
    // `t + 1`, and the history at the end.
    let histories: Vec<(&str, Vec<Op>)> = vec![
        (
            "expiring",
            vec![
                Op::Grant(plain, grant(jan, 50, Some("k1"))),
                Op::Charge(plain, 120, jan + 1),
                Op::Grant(plain, grant(jan + 2, 50, Some("k1"))),
                Op::Grant(plain, grant(jan + 3, 70, Some("k1"))),
                Op::Grant(plain, grant(jan + 4, -10, None)),
                // Into February: the plan's 100 are new, the rest stays.
                Op::Charge(plain, 30, at(2027, 2, 1)),
                Op::Charge(plain, 200, at(2027, 2, 3)),
            ],
        ),
        (
            "rolling",
            vec![
                Op::Charge(rolling, 40, jan),
                // Idle through March: April keeps February's and March's grants.
                Op::Charge(rolling, 5, at(2027, 4, 2)),
                Op::Grant(rolling, grant(at(2027, 4, 3), 7, None)),
            ],
        ),
        (
            "changed",
            vec![
                Op::Grant(Allowance::default(), grant(jan, 50, None)),
                Op::Charge(monthly(100, false), 30, jan + 2),
                Op::Charge(monthly(300, false), 1, jan + 3),
                Op::Charge(monthly(20, false), 1, jan + 4),
            ],
        ),
        (
            "daily",
            vec![
                Op::Charge(daily, 10, jan + 5),
                Op::Charge(daily, 3, jan + DAY),
                Op::Charge(daily, 4, jan + 3 * DAY + 1),
            ],
        ),
    ];
    for (customer, ops) in histories {
        let mut core: Option<Account> = None;
        let mut seq = 0;
        let mut last = (Allowance::default(), 0);
        for op in ops {
            let (a, t) = match op {
                Op::Charge(a, credits, t) => {
                    core.get_or_insert_with(|| Account::new(a, t))
                        .charge(a, credits, t);
                    seq += 1;
                    let c = Charge {
                        seq,
                        credits,
                        at: t,
                    };
                    let applied = book.charge(customer, "inst", a, t, &[c]).await.unwrap();
                    assert_eq!(applied.status, 1, "{customer}: charge {seq} applied");
                    (a, t)
                }
                Op::Grant(a, g) => {
                    let t = g.at;
                    let want = core
                        .get_or_insert_with(|| Account::new(a, t))
                        .grant(a, g.clone());
                    let (got, _) = book.grant(customer, a, &g).await.unwrap();
                    assert_eq!(got, want, "{customer}: grant at {t}");
                    (a, t)
                }
            };
            let acc = book.account(customer, a, t + 1).await.unwrap();
            let core = core.as_ref().unwrap();
            assert_eq!(
                acc.balance(a, t + 1),
                core.balance(a, t + 1),
                "{customer}: balance after the op at {t}"
            );
            last = (a, t + 1);
        }
        let (a, now) = last;
        let acc = book.account(customer, a, now).await.unwrap();
        assert_eq!(
            acc.history(a, now),
            core.unwrap().history(a, now),
            "{customer}: history"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn charges_delivered_again_after_a_crash_count_once() {
    let redis = RedisServer::start();
    let book = RedisCredits::new(conn(&redis, "dup").await);
    let a = Allowance {
        grant: 100,
        per: Window::Month,
        rollover: false,
    };
    let t = at(2027, 5, 3);
    let c = |seq, credits| Charge {
        seq,
        credits,
        at: t,
    };
    let first = book
        .charge("cus", "one", a, t, &[c(1, 10), c(2, 5)])
        .await
        .unwrap();
    assert_eq!((first.status, first.after.remaining), (2, 85));
    // The same two again (the Y line was lost), and one new.
    let again = book
        .charge("cus", "one", a, t, &[c(1, 10), c(2, 5), c(3, 1)])
        .await
        .unwrap();
    assert_eq!(
        (again.status, again.before.remaining, again.after.remaining),
        (1, 85, 84)
    );
    // Another instance's spool numbers its own charges.
    let other = book.charge("cus", "two", a, t, &[c(1, 4)]).await.unwrap();
    assert_eq!((other.status, other.after.remaining), (1, 80));
    assert_eq!(other.after.used, 20);
}

#[tokio::test(flavor = "current_thread")]
async fn the_limiter_refuses_a_call_out_of_credits_without_charging_its_limits() {
    let redis = RedisServer::start();
    let c = conn(&redis, "gate").await;
    let clock = ManualClock::at(at(2027, 6, 1) + 5_000);
    let limiter = RedisLimiter::new(c.clone(), Arc::new(clock.clone())).unwrap();
    let book = RedisCredits::new(c);
    let allowance = Allowance {
        grant: 30,
        per: Window::Month,
        rollover: false,
    };
    let limits = vec![Limit {
        name: "daily".into(),
        quota: 100,
        window: Window::Day,
        overage: false,
        overage_meter: None,
    }];
    let plan = Arc::new(Plan {
        name: "prepaid".into(),
        policy_header: tollgate_core::plans::policy_header(&limits),
        limits,
        meter: None,
        billed: true,
        display: Default::default(),
        credits: Some(Arc::new(CreditPolicy {
            plan: "prepaid".into(),
            allowance,
            prices: Default::default(),
        })),
    });
    let customer: Arc<str> = "cus".into();
    let ask = |held, want| CreditAsk {
        allowance,
        held,
        want,
        required: true,
    };
    let daily_left = |d: &tollgate_core::limiter::Decision| d.policies[0].remaining;
    // A first call: the plan's 30, unspent.
    let (d, answer) = limiter
        .check_credits(&customer, &plan, 1, ask(0, 0))
        .await
        .unwrap();
    assert!(d.allowed);
    let Some(CreditAnswer::Admitted(b)) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!((b.remaining, b.granted, b.used), (30, 30, 0));
    assert_eq!(daily_left(&d), 99);
    // Held by this instance's other calls: 20 free, a hold of 25 is refused,
    // one of 20 is not.
    let (_, answer) = limiter
        .check_credits(&customer, &plan, 1, ask(10, 25))
        .await
        .unwrap();
    assert!(
        matches!(answer, Some(CreditAnswer::Refused(_))),
        "{answer:?}"
    );
    let (d, answer) = limiter
        .check_credits(&customer, &plan, 1, ask(10, 20))
        .await
        .unwrap();
    assert!(matches!(answer, Some(CreditAnswer::Admitted(_))));
    assert_eq!(daily_left(&d), 98, "the refused call charged no limit");
    // Spent: every call that costs credits is refused, and charges nothing.
    book.charge(
        "cus",
        "inst",
        allowance,
        clock.now_ms(),
        &[Charge {
            seq: 1,
            credits: 30,
            at: clock.now_ms(),
        }],
    )
    .await
    .unwrap();
    for _ in 0..3 {
        let (_, answer) = limiter
            .check_credits(&customer, &plan, 1, ask(0, 0))
            .await
            .unwrap();
        let Some(CreditAnswer::Refused(b)) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!((b.remaining, b.used), (0, 30));
    }
    // A call that costs none is admitted, and reads the balance.
    let free = CreditAsk {
        required: false,
        ..ask(0, 0)
    };
    let (d, answer) = limiter
        .check_credits(&customer, &plan, 1, free)
        .await
        .unwrap();
    assert!(matches!(answer, Some(CreditAnswer::Admitted(b)) if b.remaining == 0));
    assert_eq!(daily_left(&d), 97);
    // July: the plan grants 30 again.
    clock.set(at(2027, 7, 1));
    let (_, answer) = limiter
        .check_credits(&customer, &plan, 1, ask(0, 0))
        .await
        .unwrap();
    assert!(matches!(answer, Some(CreditAnswer::Admitted(b)) if b.remaining == 30));
}
