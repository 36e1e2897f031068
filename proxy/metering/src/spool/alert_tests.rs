//! Threshold alerts in the spool: raised once per threshold and period,
//! through restarts and compaction.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use super::tests::config;
use super::*;

/// Waits (up to 2 s) for the spool's thread to make `n` alerts due.
fn due_soon(s: &Spool, n: usize) -> Vec<tollgate_core::alerts::Alert> {
    for _ in 0..200 {
        let due = s.alerts_due(100, |_| true);
        if due.len() >= n {
            return due;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    s.alerts_due(100, |_| true)
}

#[tokio::test]
async fn alerts_are_raised_once_per_threshold_and_period_across_restarts() {
    use tollgate_core::alerts::{Alert, AlertJournal, Thresholds, CREDITS};
    use tollgate_core::clock::{month_bounds, ManualClock};
    use tollgate_core::credits::{Allowance, CreditPolicy};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(1_780_000_000_000);
    let cfg = SpoolConfig {
        alerts: Thresholds::new(vec![50, 100]),
        ..config(dir.path(), &[])
    };
    let policy = Arc::new(CreditPolicy {
        plan: "prepaid".into(),
        allowance: Allowance {
            grant: 1000,
            per: Window::Month,
            rollover: false,
        },
        prices: [("tokens".into(), 1)].into_iter().collect(),
    });
    let (c, tokens): (Arc<str>, Arc<str>) = ("cus 1".into(), "tokens".into());
    let (month, month_end) = month_bounds(clock.now_ms());
    let quota = Alert {
        customer: c.clone(),
        plan: "prepaid".into(),
        policy: "monthly".into(),
        percent: 50,
        used: 5,
        limit: 10,
        period_start: month,
        period_end: month_end,
        at: clock.now_ms(),
    };
    let charge = |s: &Arc<Spool>, n| {
        let s = s.clone();
        let (c, tokens, policy) = (c.clone(), tokens.clone(), policy.clone());
        async move {
            assert!(s
                .journal(&c, Some((&tokens, n)), None, Some(&policy))
                .await
                .unwrap())
        }
    };
    let s = Spool::open(cfg.clone(), Arc::new(clock.clone())).unwrap();
    charge(&s, 400).await;
    assert!(
        s.alerts_due(10, |_| true).is_empty(),
        "40 % crosses nothing"
    );
    charge(&s, 200).await;
    // In the same write as the charge: due at once.
    let due = s.alerts_due(10, |_| true);
    assert_eq!(due.len(), 1);
    assert_eq!(
        (&*due[0].policy, due[0].percent, due[0].used, due[0].limit),
        (CREDITS, 50, 600, 1000)
    );
    assert_eq!((&*due[0].plan, due[0].period_end), ("prepaid", month_end));
    // A quota's alert the gate raises, twice: kept once.
    s.raise(quota.clone());
    s.raise(Alert {
        used: 6,
        ..quota.clone()
    });
    assert_eq!(due_soon(&s, 2).len(), 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.alerts_due(10, |_| true).len(), 2);
    s.settle_alerts(&[(due[0].clone(), None)]);
    // As an X line writes it (the customer escaped).
    let settled = format!("X cus%201 credits 50 {month} ok");
    assert_eq!(s.alerts_owed(), 1);
    s.close();
    drop(s);
    for round in ["replayed", "compacted"] {
        let s = Spool::open(cfg.clone(), Arc::new(clock.clone())).unwrap();
        let due = s.alerts_due(10, |_| true);
        assert_eq!(due.len(), 1, "{round}: the quota alert is still owed");
        assert_eq!(due[0].id(), quota.id(), "{round}");
        assert!(
            fs::read_to_string(dir.path().join("events.log"))
                .unwrap()
                .contains(&settled),
            "{round}"
        );
        // Raised again by the gate, and 50 % of the credits reached again
        // by a charge: neither is new.
        s.raise(quota.clone());
        charge(&s, 1).await;
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            s.alerts_due(10, |_| true).len(),
            1,
            "{round}: no threshold is raised twice in a period"
        );
        s.close();
    }
    let s = Spool::open(cfg.clone(), Arc::new(clock.clone())).unwrap();
    charge(&s, 399).await;
    let due = s.alerts_due(10, |_| true);
    assert_eq!(due.len(), 2, "1000 of 1000 used: 100 % is crossed");
    let hundred = due.iter().find(|a| a.percent == 100).unwrap().clone();
    s.settle_alerts(&[(hundred.clone(), Some("HTTP 400: no".into()))]);
    let dead = fs::read_to_string(dir.path().join("dead-alerts.jsonl")).unwrap();
    assert!(
        dead.contains("HTTP 400: no") && dead.contains(&hundred.id()),
        "{dead}"
    );
    s.close();
    drop(s);
    // Next month: what was settled is forgotten; what is owed is not.
    clock.set(month_end + 1000);
    let s = Spool::open(cfg.clone(), Arc::new(clock.clone())).unwrap();
    assert_eq!(s.alerts_due(10, |_| true).len(), 1, "still owed");
    let events = fs::read_to_string(dir.path().join("events.log")).unwrap();
    assert!(
        !events.contains(&settled) && !events.contains(" dead "),
        "compaction drops last month's settled alerts: {events}"
    );
    charge(&s, 600).await;
    let due = s.alerts_due(10, |_| true);
    assert_eq!(due.len(), 2, "a new period's 50 %");
    // Credits taken away raise the share used: 600 of 499 (last month's
    // overdraft of 1 carried in) is past 100 %.
    let removal = tollgate_core::credits::Grant {
        at: clock.now_ms(),
        amount: -500,
        idempotency_key: None,
        reason: "refund".into(),
        source: tollgate_core::credits::Source::Admin,
    };
    tollgate_core::credits::CreditBook::grant(&*s, &c, &policy, removal).unwrap();
    let due = s.alerts_due(10, |_| true);
    assert_eq!(due.len(), 3, "{due:?}");
    assert!(
        due.iter()
            .any(|a| a.percent == 100 && a.used == 600 && a.limit == 499),
        "{due:?}"
    );
    s.close();
}
