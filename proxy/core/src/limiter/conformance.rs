//! A conformance suite of window semantics, run against every backend so
//! they cannot drift apart. `make` builds a limiter on the given clock.
#![allow(clippy::panic)] // test support: a failed case must fail the test

use std::sync::Arc;

use super::{Decision, Limiter};
use crate::clock::{days_from_civil, Date, ManualClock, Millis, DAY, HOUR, MINUTE, SECOND};
use crate::plans::{Limit, Plan, Window};

pub fn plan(limits: &[(&str, u64, Window)]) -> Arc<Plan> {
    Arc::new(build(limits))
}

fn build(limits: &[(&str, u64, Window)]) -> Plan {
    let limits: Vec<Limit> = limits
        .iter()
        .map(|&(n, q, w)| Limit {
            name: n.into(),
            quota: q,
            window: w,
            overage: false,
            overage_meter: None,
        })
        .collect();
    Plan {
        name: "test".into(),
        policy_header: crate::plans::policy_header(&limits),
        limits,
        meter: None,
        billed: true,
        display: Default::default(),
        credits: None,
    }
}

fn date(y: i64, m: u32, d: u32) -> Millis {
    days_from_civil(Date {
        year: y,
        month: m,
        day: d,
    }) as Millis
        * DAY
}

async fn admit<L: Limiter>(l: &L, c: &str, p: &Arc<Plan>, cost: u64) -> Decision {
    match l.check(&c.into(), p, cost).await {
        Ok(d) => d,
        Err(e) => panic!("limiter failed: {e:?}"),
    }
}

/// Runs every case; panics with the case name on the first mismatch.
pub async fn run<L: Limiter, F: Fn(ManualClock) -> L>(make: F) {
    sliding_window_is_exact(&make).await;
    rejected_requests_consume_nothing(&make).await;
    all_limits_must_have_room(&make).await;
    calendar_day_resets_at_utc_midnight(&make).await;
    calendar_month_is_a_real_month(&make).await;
    customers_are_independent(&make).await;
    zero_cost_reports_without_charging(&make).await;
    refusal_headers_describe_a_violated_policy(&make).await;
    overage_admits_past_the_quota_and_says_so(&make).await;
    many_charges_leave_the_window_at_once(&make).await;
    concurrency_caps_hold_until_released(&make).await;
}

/// Report calls until `done` holds (a shared store's release lands in the
/// background; each call is a round trip that lets it).
async fn until<L: Limiter>(l: &L, c: &str, p: &Arc<Plan>, done: impl Fn(&Decision) -> bool) {
    for _ in 0..2000 {
        if done(&admit(l, c, p, 0).await) {
            return;
        }
    }
    panic!("the release never landed");
}

async fn concurrency_caps_hold_until_released<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[
        ("parallel", 2, Window::Concurrent),
        ("daily", 100, Window::Day),
    ]);
    let a = admit(&l, "c", &p, 5).await;
    assert!(a.allowed && a.policies[0].concurrent && !a.policies[1].concurrent);
    assert_eq!(a.policies[0].remaining, 1, "a cap takes one per request");
    let b = admit(&l, "c", &p, 5).await;
    assert!(b.allowed);
    let refused = admit(&l, "c", &p, 5).await;
    assert!(!refused.allowed && refused.policies[0].violated && !refused.policies[1].violated);
    assert_eq!(refused.retry_after_secs, 1);
    assert_eq!(
        refused.policies[1].remaining, 90,
        "the refusal charged nothing"
    );
    assert!(
        admit(&l, "c", &p, 0).await.allowed,
        "a report holds no slot"
    );
    assert!(
        admit(&l, "other", &p, 5).await.allowed,
        "customers are independent"
    );
    let c: Arc<str> = "c".into();
    l.release(&c, &p, &a);
    until(&l, "c", &p, |d| d.policies[0].remaining == 1).await;
    let d = admit(&l, "c", &p, 5).await;
    assert!(d.allowed);
    l.release(&c, &p, &b);
    l.release(&c, &p, &d);
    until(&l, "c", &p, |d| d.policies[0].remaining == 2).await;
    // Released twice: never more room than the cap.
    l.release(&c, &p, &d);
    let after = admit(&l, "c", &p, 0).await;
    assert_eq!(after.policies[0].remaining, 2);
    assert!(admit(&l, "c", &p, 1).await.allowed && admit(&l, "c", &p, 1).await.allowed);
    assert!(!admit(&l, "c", &p, 1).await.allowed);
}

async fn many_charges_leave_the_window_at_once<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let t0 = date(2026, 5, 1) + 10 * HOUR;
    let clock = ManualClock::at(t0);
    let l = make(clock.clone());
    let p = plan(&[("burst", 100, Window::Sliding(SECOND))]);
    // 30 charges of 1, 2 or 3 units, 10 ms apart: 60 units.
    let cost = |i: u64| 1 + i % 3;
    for i in 0..30 {
        clock.set(t0 + i * 10);
        assert!(admit(&l, "c", &p, cost(i)).await.allowed);
    }
    // 155 ms past the window: the 16 charges made at 0..=150 ms have left.
    clock.set(t0 + SECOND + 155);
    let d = admit(&l, "c", &p, 0).await;
    let left: u64 = (16..30).map(cost).sum();
    assert_eq!(d.policies[0].remaining, 100 - left, "{d:?}");
    // The oldest charge still inside was made at 160 ms: it leaves in 5 ms.
    assert_eq!(d.policies[0].reset_secs, 1, "{d:?}");
    // And the total stays right as the rest leave.
    clock.set(t0 + SECOND + 285);
    let d = admit(&l, "c", &p, 0).await;
    let left: u64 = (29..30).map(cost).sum();
    assert_eq!(d.policies[0].remaining, 100 - left, "{d:?}");
    clock.set(t0 + 2 * SECOND + 290);
    let d = admit(&l, "c", &p, 5).await;
    assert!(d.allowed);
    assert_eq!(d.policies[0].remaining, 95, "{d:?}");
    assert_eq!(d.policies[0].reset_secs, 1, "{d:?}");
}

async fn overage_admits_past_the_quota_and_says_so<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let mut p = build(&[
        ("burst", 4, Window::Sliding(SECOND)),
        ("monthly", 2, Window::Month),
    ]);
    p.limits[1].overage = true;
    p.limits[1].overage_meter = Some("api_overage".into());
    let p = Arc::new(p);
    for i in 0..4 {
        let d = admit(&l, "c", &p, 1).await;
        assert!(d.allowed, "overage never refuses (request {i})");
        assert_eq!(d.overage, i >= 2, "request {i} is overage: {d:?}");
        assert_eq!(
            d.overage_meter.as_deref(),
            (i >= 2).then_some("api_overage")
        );
        assert_eq!(d.policies[1].remaining, 2u64.saturating_sub(i + 1));
        assert!(!d.policies[1].violated);
    }
    // A limit without overage still refuses.
    let d = admit(&l, "c", &p, 1).await;
    assert!(!d.allowed && d.policies[0].violated && !d.overage, "{d:?}");
}

async fn sliding_window_is_exact<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let t0 = date(2026, 5, 1) + 10 * HOUR;
    let clock = ManualClock::at(t0);
    let l = make(clock.clone());
    let p = plan(&[("burst", 3, Window::Sliding(SECOND))]);
    for i in 0..3 {
        clock.set(t0 + i * 300); // at 0, 300, 600 ms
        assert!(admit(&l, "c", &p, 1).await.allowed, "sliding: request {i}");
    }
    clock.set(t0 + 999);
    let d = admit(&l, "c", &p, 1).await;
    assert!(!d.allowed, "sliding: 4th within the second must be refused");
    assert_eq!(
        d.retry_after_secs, 1,
        "sliding: retry when the first leaves"
    );
    assert_eq!(d.policies[0].remaining, 0);
    clock.set(t0 + 1000); // the request at t0 has left the window, exactly
    assert!(
        admit(&l, "c", &p, 1).await.allowed,
        "sliding: room after exactly one window"
    );
    assert!(
        !admit(&l, "c", &p, 1).await.allowed,
        "sliding: only one unit came back"
    );
    // A minute window, checked at its edge.
    let p = plan(&[("per_min", 2, Window::Sliding(MINUTE))]);
    clock.set(t0 + HOUR);
    assert!(admit(&l, "m", &p, 2).await.allowed);
    clock.set(t0 + HOUR + MINUTE - 1);
    let d = admit(&l, "m", &p, 1).await;
    assert!(
        !d.allowed && d.policies[0].reset_secs == 1,
        "minute edge: {d:?}"
    );
    clock.set(t0 + HOUR + MINUTE);
    assert!(
        admit(&l, "m", &p, 2).await.allowed,
        "minute edge: full quota back"
    );
}

async fn rejected_requests_consume_nothing<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[("daily", 10, Window::Day)]);
    assert!(admit(&l, "c", &p, 8).await.allowed);
    for _ in 0..5 {
        let d = admit(&l, "c", &p, 3).await;
        assert!(!d.allowed, "cost 3 with 2 left must be refused");
        assert_eq!(d.policies[0].remaining, 2, "a refusal must not consume");
    }
    assert!(
        admit(&l, "c", &p, 2).await.allowed,
        "the 2 left are still there"
    );
    assert_eq!(admit(&l, "c", &p, 0).await.policies[0].remaining, 0);
}

async fn all_limits_must_have_room<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[
        ("burst", 5, Window::Sliding(SECOND)),
        ("daily", 3, Window::Day),
    ]);
    for _ in 0..3 {
        assert!(admit(&l, "c", &p, 1).await.allowed);
    }
    let d = admit(&l, "c", &p, 1).await;
    assert!(!d.allowed);
    assert!(!d.policies[0].violated && d.policies[1].violated, "{d:?}");
    assert_eq!(
        d.policies[0].remaining, 2,
        "burst must not be charged for a refused request"
    );
    assert_eq!(d.tightest().map(|p| &*p.name), Some("daily"));
    assert_eq!(d.retry_after_secs, DAY / 1000, "retry at next UTC midnight");
}

async fn calendar_day_resets_at_utc_midnight<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let midnight = date(2026, 3, 1);
    let clock = ManualClock::at(midnight - 1);
    let l = make(clock.clone());
    let p = plan(&[("daily", 1, Window::Day)]);
    let d = admit(&l, "c", &p, 1).await;
    assert!(d.allowed);
    assert_eq!(
        d.policies[0].reset_secs, 1,
        "1 ms before midnight rounds up to 1 s"
    );
    assert!(!admit(&l, "c", &p, 1).await.allowed);
    clock.set(midnight);
    assert!(admit(&l, "c", &p, 1).await.allowed, "new day, new quota");
}

async fn calendar_month_is_a_real_month<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    // February of a leap year: 29 days, then March starts a new window.
    let clock = ManualClock::at(date(2028, 2, 1));
    let l = make(clock.clone());
    let p = plan(&[("monthly", 2, Window::Month)]);
    assert!(admit(&l, "c", &p, 2).await.allowed);
    clock.set(date(2028, 2, 29) + 23 * HOUR);
    let d = admit(&l, "c", &p, 1).await;
    assert!(!d.allowed, "Feb 29 is still February");
    assert_eq!(d.retry_after_secs, HOUR / 1000);
    clock.set(date(2028, 3, 1));
    assert!(admit(&l, "c", &p, 2).await.allowed, "March is a new month");
    // December rolls over into the next year.
    clock.set(date(2028, 12, 31) + 12 * HOUR);
    assert!(admit(&l, "c", &p, 2).await.allowed);
    clock.set(date(2029, 1, 1));
    assert!(admit(&l, "c", &p, 2).await.allowed);
}

async fn customers_are_independent<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[("daily", 1, Window::Day)]);
    assert!(admit(&l, "a", &p, 1).await.allowed);
    assert!(admit(&l, "b", &p, 1).await.allowed);
    assert!(!admit(&l, "a", &p, 1).await.allowed);
}

async fn zero_cost_reports_without_charging<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[("burst", 2, Window::Sliding(SECOND))]);
    for _ in 0..3 {
        let d = admit(&l, "c", &p, 0).await;
        assert!(d.allowed && d.policies[0].remaining == 2 && d.policies[0].reset_secs == 0);
    }
    assert!(admit(&l, "c", &p, 1).await.allowed);
    let d = admit(&l, "c", &p, 0).await;
    assert_eq!((d.policies[0].remaining, d.policies[0].reset_secs), (1, 1));
}

async fn refusal_headers_describe_a_violated_policy<L: Limiter>(make: &impl Fn(ManualClock) -> L) {
    let clock = ManualClock::at(date(2026, 6, 1));
    let l = make(clock.clone());
    let p = plan(&[
        ("burst", 5, Window::Sliding(SECOND)),
        ("daily", 100, Window::Day),
    ]);
    assert!(admit(&l, "c", &p, 3).await.allowed);
    // Cost 5 does not fit burst (2 left) although daily has 97 left.
    let d = admit(&l, "c", &p, 5).await;
    assert!(!d.allowed);
    let t = d.tightest().map(|t| (t.name.to_string(), t.remaining));
    assert_eq!(t, Some(("burst".to_string(), 2)), "{d:?}");
}
