//! The state machine: each change on each prior state, duplicates and
//! reordering. Payload parsing per provider is tested in the gateway's
//! webhook tests, with signatures the providers' own libraries make.

use super::*;
use crate::store::StoreData;

const T0: Millis = 1_700_000_000_000;

fn policy(on_past_due: OnPastDue) -> Policy {
    Policy {
        plans: [("price_pro", "pro"), ("team_monthly", "team")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect(),
        on_cancel: Some("free".into()),
        on_past_due,
    }
}

fn ev(id: &str, at: Millis, change: Change, sources: &[&str]) -> Event {
    Event {
        id: id.into(),
        kind: "test".into(),
        customer: "cus_1".into(),
        at,
        change,
        sources: sources.iter().map(|s| (*s).to_owned()).collect(),
        plan: None,
        purchase: None,
    }
}

fn any_plan(_: &str) -> bool {
    true
}

/// Applies each event in turn; the customer's plan and suspension after.
fn run(p: &Policy, events: &[Event]) -> (Option<String>, bool, Vec<Applied>) {
    let mut d = StoreData::default();
    let mut out = Vec::new();
    for e in events {
        out.push(apply(&mut d, Provider::Stripe, e, p, &any_plan, T0).unwrap());
    }
    let c = &d.customers["cus_1"];
    (c.plan.clone(), c.is_suspended(), out)
}

#[test]
fn a_paid_subscription_sets_its_plan_and_a_cancellation_falls_back() {
    let p = policy(OnPastDue::Keep);
    let (plan, suspended, _) = run(&p, &[ev("e1", T0, Change::Active, &["price_pro"])]);
    assert_eq!((plan.as_deref(), suspended), (Some("pro"), false));
    // lookup_key is the second source of the same item.
    let (plan, ..) = run(
        &p,
        &[ev("e1", T0, Change::Active, &["price_x", "team_monthly"])],
    );
    assert_eq!(plan.as_deref(), Some("team"));
    let (plan, ..) = run(
        &p,
        &[
            ev("e1", T0, Change::Active, &["price_pro"]),
            ev("e2", T0 + 1000, Change::Canceled, &[]),
        ],
    );
    assert_eq!(plan.as_deref(), Some("free"));
}

#[test]
fn an_unmapped_price_changes_nothing() {
    let p = policy(OnPastDue::Keep);
    let (plan, _, out) = run(
        &p,
        &[
            ev("e1", T0, Change::Active, &["price_pro"]),
            ev("e2", T0 + 1, Change::Active, &["price_other_product"]),
        ],
    );
    assert_eq!(plan.as_deref(), Some("pro"));
    assert_eq!(out[1], Applied::Unmapped);
}

#[test]
fn events_about_another_product_change_nothing_whatever_they_say() {
    let p = policy(OnPastDue::Suspend);
    for change in [
        Change::Canceled,
        Change::PastDue,
        Change::Paused,
        Change::Paid,
    ] {
        let (plan, suspended, out) = run(
            &p,
            &[
                ev("e1", T0, Change::Active, &["price_pro"]),
                ev("e2", T0 + 1, change, &["price_tshirt"]),
            ],
        );
        assert_eq!(
            (plan.as_deref(), suspended),
            (Some("pro"), false),
            "{change:?}"
        );
        assert_eq!(out[1], Applied::Unmapped, "{change:?}");
    }
    // And they create no customer record either.
    let mut d = StoreData::default();
    let e = ev("e9", T0, Change::Canceled, &["price_tshirt"]);
    apply(&mut d, Provider::Stripe, &e, &p, &any_plan, T0).unwrap();
    assert!(d.customers.is_empty());
}

#[test]
fn a_far_future_event_time_cannot_freeze_a_customer() {
    let p = policy(OnPastDue::Keep);
    let mut d = StoreData::default();
    let year = 365 * 86_400_000;
    apply(
        &mut d,
        Provider::Stripe,
        &ev("e1", T0 + year, Change::Active, &["price_pro"]),
        &p,
        &any_plan,
        T0,
    )
    .unwrap();
    let later = ev("e2", T0 + MAX_SKEW_MS + 1000, Change::Canceled, &[]);
    let out = apply(
        &mut d,
        Provider::Stripe,
        &later,
        &p,
        &any_plan,
        T0 + 2 * MAX_SKEW_MS,
    )
    .unwrap();
    assert!(matches!(out, Applied::Done { .. }), "{out:?}");
    assert_eq!(d.customers["cus_1"].plan.as_deref(), Some("free"));
}

#[test]
fn each_past_due_policy_and_the_payment_that_restores() {
    let events = |fail: Change| {
        vec![
            ev("e1", T0, Change::Active, &["price_pro"]),
            ev("e2", T0 + 1000, fail, &[]),
        ]
    };
    let keep = policy(OnPastDue::Keep);
    assert_eq!(
        run(&keep, &events(Change::PastDue)).0.as_deref(),
        Some("pro")
    );
    let suspend = policy(OnPastDue::Suspend);
    let (plan, suspended, _) = run(&suspend, &events(Change::PastDue));
    assert_eq!((plan.as_deref(), suspended), (Some("pro"), true));
    // Paused behaves like past due.
    assert!(run(&suspend, &events(Change::Paused)).1);
    let downgrade = policy(OnPastDue::Plan("free".into()));
    assert_eq!(
        run(&downgrade, &events(Change::PastDue)).0.as_deref(),
        Some("free")
    );
    for p in [&suspend, &downgrade] {
        let mut all = events(Change::PastDue);
        all.push(ev("e3", T0 + 2000, Change::Paid, &[]));
        let (plan, suspended, _) = run(p, &all);
        assert_eq!((plan.as_deref(), suspended), (Some("pro"), false), "{p:?}");
    }
}

#[test]
fn a_payment_without_a_failure_changes_nothing() {
    let p = policy(OnPastDue::Plan("free".into()));
    let (plan, ..) = run(&p, &[ev("e1", T0, Change::Paid, &[])]);
    assert_eq!(plan, None);
}

#[test]
fn duplicates_and_late_events_change_nothing() {
    let p = policy(OnPastDue::Keep);
    let (plan, _, out) = run(
        &p,
        &[
            ev("e1", T0, Change::Active, &["price_pro"]),
            ev("e2", T0 + 5000, Change::Canceled, &[]),
            // Stripe redelivers e1, and an update older than the
            // cancellation arrives last.
            ev("e1", T0, Change::Active, &["price_pro"]),
            ev("e0", T0 + 10, Change::Active, &["team_monthly"]),
        ],
    );
    assert_eq!(plan.as_deref(), Some("free"));
    assert_eq!(out[2], Applied::Duplicate);
    assert_eq!(out[3], Applied::Stale);
}

#[test]
fn events_of_the_same_second_all_apply() {
    let p = policy(OnPastDue::Suspend);
    let (plan, suspended, _) = run(
        &p,
        &[
            ev("e1", T0, Change::PastDue, &["price_pro"]),
            ev("e2", T0, Change::Paid, &[]),
        ],
    );
    assert_eq!((plan.as_deref(), suspended), (Some("pro"), false));
}

#[test]
fn a_named_plan_must_exist_and_a_refused_event_is_not_remembered() {
    let p = Policy::default();
    let mut d = StoreData::default();
    let mut e = ev("w1", T0, Change::SetPlan, &[]);
    e.plan = Some("gold".into());
    let only_pro = |p: &str| p == "pro";
    assert!(apply(&mut d, Provider::Standard, &e, &p, &only_pro, T0).is_err());
    assert!(d.webhook_events.is_empty());
    e.plan = Some("pro".into());
    let done = apply(&mut d, Provider::Standard, &e, &p, &only_pro, T0).unwrap();
    assert!(matches!(done, Applied::Done { new_plan: Some(ref n), .. } if n == "pro"));
    assert!(d.webhook_events.contains_key("standard:w1"));
}

#[test]
fn an_operator_resume_lifts_a_billing_suspension() {
    let p = policy(OnPastDue::Suspend);
    let mut d = StoreData::default();
    apply(
        &mut d,
        Provider::Stripe,
        &ev("e1", T0, Change::PastDue, &[]),
        &p,
        &any_plan,
        T0,
    )
    .unwrap();
    assert!(d.customers["cus_1"].is_suspended());
    let store = MemStore(std::sync::Mutex::new(d));
    crate::store::admin::set_suspended(&store, "cus_1", false).unwrap();
    assert!(!store.0.lock().unwrap().customers["cus_1"].is_suspended());
}

#[test]
fn remembered_deliveries_stay_bounded() {
    let mut events: BTreeMap<String, u64> = (0..REMEMBER_MAX)
        .map(|i| (format!("stripe:evt_{i}"), T0 + i as u64))
        .collect();
    for i in REMEMBER_MAX..REMEMBER_MAX + 10 {
        remember(&mut events, format!("stripe:evt_{i}"), T0 + i as u64);
    }
    assert_eq!(events.len(), REMEMBER_MAX);
    assert!(!events.contains_key("stripe:evt_0"));
    remember(
        &mut events,
        "stripe:late".into(),
        T0 + REMEMBER_MS + 100_000,
    );
    assert_eq!(events.len(), 1);
}

struct MemStore(std::sync::Mutex<StoreData>);

impl crate::store::UpdateStore for MemStore {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, crate::store::StoreError> + Send,
    ) -> Result<T, crate::store::StoreError> {
        f(&mut self.0.lock().unwrap())
    }
    fn data(&self) -> Result<StoreData, crate::store::StoreError> {
        Ok(self.0.lock().unwrap().clone())
    }
}
