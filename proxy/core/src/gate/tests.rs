//! `Gate::admit` from request parts alone: no socket, no Pingora.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::Request;

use super::*;
use crate::alerts::{Alert, AlertJournal, Thresholds};
use crate::clock::{days_from_civil, Date, ManualClock, Millis, DAY};
use crate::diag::Source;
use crate::keys;
use crate::limiter::MemoryLimiter;
use crate::meter::JournalState;
use crate::store::{CustomerRecord, KeyRecord, Snapshot, StaticKeys, StoreData};

const PLANS: &str = "default_plan: free
plans:
  free:
    limits:
      - { name: burst, requests: 5, per: second }
  pro:
    meter: api_requests
    limits:
      - { name: daily, requests: 10, per: day, overage_meter: api_overage }
routes:
  - { match: \"GET /health\", public: true }
  - { match: \"POST /v1/sms/*\", cost: 5, meter: sms }
  - { match: \"GET /v1/ai/*\", usage_header: x-usage-tokens, meter: ai_tokens }
";

struct Setup {
    gate: Gate<MemoryLimiter>,
    free: String,
    pro: String,
}

fn setup(answer_preflights: bool) -> Setup {
    setup_with(answer_preflights, None)
}

fn setup_with(answer_preflights: bool, journal_full: Option<Arc<AtomicBool>>) -> Setup {
    let now: Millis = days_from_civil(Date {
        year: 2026,
        month: 6,
        day: 1,
    }) as Millis
        * DAY;
    let clock = Arc::new(ManualClock::at(now));
    let plans = Plans::parse(&Source::new(
        std::path::Path::new("plans.yaml"),
        PLANS.into(),
    ))
    .unwrap();
    let (free, pro) = (
        keys::from_secret("tg_test_", &[1; 32]),
        keys::from_secret("tg_test_", &[2; 32]),
    );
    let mut data = StoreData::default();
    for (i, (key, customer, plan)) in [(&free, "cus_free", None), (&pro, "cus_pro", Some("pro"))]
        .into_iter()
        .enumerate()
    {
        data.customers.insert(
            customer.into(),
            CustomerRecord {
                plan: plan.map(Into::into),
                ..CustomerRecord::default()
            },
        );
        data.keys.push(KeyRecord {
            meta: None,
            id: format!("key_{i:016}"),
            hash: hex::encode(keys::hash(key)),
            start: key[..12].into(),
            customer: customer.into(),
            name: None,
            created: "2026-01-01T00:00:00Z".into(),
            expires: None,
            revoked: None,
        });
    }
    Setup {
        gate: Gate {
            plans: crate::sync::Shared::new(Arc::new(plans)),
            keys: Arc::new(StaticKeys(Arc::new(Snapshot::build(&data)))),
            limiter: Arc::new(MemoryLimiter::new(clock.clone())),
            clock,
            prefix: "tg_test_".into(),
            answer_preflights,
            journal: journal_full.map(|f| {
                Arc::new(move || {
                    if f.load(Ordering::Relaxed) {
                        JournalState::Full
                    } else {
                        JournalState::Open
                    }
                }) as Arc<dyn Fn() -> JournalState + Send + Sync>
            }),
            jwt: None,
            credits: None,
            alerts: None,
            holds: Default::default(),
        },
        free,
        pro,
    }
}

fn request(method: &str, uri: &str, key: Option<&str>) -> http::request::Parts {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(()).unwrap().into_parts().0
}

async fn admit(g: &Gate<MemoryLimiter>, r: &http::request::Parts) -> Verdict {
    g.admit(&r.method, r.uri.path(), &r.headers).await
}

fn passed(v: Verdict) -> Admitted {
    match v.admission {
        Ok(Admission::Pass(a)) => a,
        other => panic!("expected a pass, got {other:?}"),
    }
}

fn refused(v: Verdict) -> Refused {
    match v.admission {
        Err(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_keyed_request_passes_with_its_route_cost_and_meter() {
    let s = setup(false);
    let a = passed(admit(&s.gate, &request("POST", "/v1/sms/send", Some(&s.pro))).await);
    assert_eq!(&*a.identity.customer, "cus_pro");
    assert_eq!(&*a.plan.name, "pro");
    assert_eq!((a.cost, a.meter.as_deref()), (5, Some("sms")));
    assert_eq!(a.decision.policies[0].remaining, 5);
    // No route: cost 1, the plan's meter.
    let a = passed(admit(&s.gate, &request("GET", "/v1/other", Some(&s.pro))).await);
    assert_eq!((a.cost, a.meter.as_deref()), (1, Some("api_requests")));
    let a = passed(admit(&s.gate, &request("GET", "/v1/ai/chat", Some(&s.pro))).await);
    assert_eq!(
        a.usage_header.as_ref().map(|h| h.as_str()),
        Some("x-usage-tokens")
    );
}

#[tokio::test]
async fn refusals_are_typed_and_carry_what_the_headers_need() {
    let s = setup(false);
    let r = refused(admit(&s.gate, &request("GET", "/v1/x", None)).await);
    assert_eq!(
        (r.rejection, r.plan.is_none()),
        (Rejection::MissingKey, true)
    );
    let r = refused(admit(&s.gate, &request("GET", "/v1/x", Some("tg_test_junk"))).await);
    assert_eq!(r.rejection, Rejection::MalformedKey);
    let unknown = keys::from_secret("tg_test_", &[9; 32]);
    let r = refused(admit(&s.gate, &request("GET", "/v1/x", Some(&unknown))).await);
    assert_eq!(r.rejection, Rejection::UnknownKey);
    for _ in 0..5 {
        passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.free))).await);
    }
    let r = refused(admit(&s.gate, &request("GET", "/v1/x", Some(&s.free))).await);
    assert!(
        matches!(r.rejection, Rejection::Limited { retry_after: 1, .. }),
        "{r:?}"
    );
    assert_eq!(r.plan.map(|p| p.name.to_string()).as_deref(), Some("free"));
    assert!(r.decision.is_some_and(|d| !d.allowed));
}

#[tokio::test]
async fn public_routes_preflights_and_the_usage_report_need_no_charge() {
    let s = setup(false);
    let v = admit(&s.gate, &request("GET", "/health", None)).await;
    assert!(matches!(v.admission, Ok(Admission::Forward)));
    let mut pre = request("OPTIONS", "/v1/sms/send", None);
    pre.headers.insert(
        http::header::ACCESS_CONTROL_REQUEST_METHOD,
        "POST".parse().unwrap(),
    );
    // Without an Origin it is no browser's preflight: it needs a key.
    let r = refused(admit(&s.gate, &pre).await);
    assert_eq!(r.rejection, Rejection::MissingKey);
    pre.headers.insert(
        http::header::ORIGIN,
        "https://app.example.com".parse().unwrap(),
    );
    assert!(matches!(
        admit(&s.gate, &pre).await.admission,
        Ok(Admission::Forward)
    ));
    // With a body it is not a preflight either.
    let mut with_body = pre.clone();
    with_body
        .headers
        .insert(http::header::CONTENT_LENGTH, "5".parse().unwrap());
    let r = refused(admit(&s.gate, &with_body).await);
    assert_eq!(r.rejection, Rejection::MissingKey);
    let answered = setup(true);
    assert!(matches!(
        admit(&answered.gate, &pre).await.admission,
        Ok(Admission::Preflight)
    ));
    for _ in 0..3 {
        let v = admit(&s.gate, &request("GET", USAGE_PATH, Some(&s.free))).await;
        match v.admission {
            Ok(Admission::Report(a)) => assert_eq!(a.decision.policies[0].remaining, 5),
            other => panic!("expected a report, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_path_is_routed_and_forwarded_normalised() {
    let s = setup(false);
    let v = admit(
        &s.gate,
        &request("POST", "/v1/%73ms/../sms//send", Some(&s.pro)),
    )
    .await;
    assert_eq!(v.rewrite.as_deref(), Some("/v1/sms/send"));
    assert_eq!(passed(v).cost, 5, "routed on the normalised path");
    let v = admit(&s.gate, &request("GET", "/health/../v1/private", None)).await;
    assert_eq!(refused(v).rejection, Rejection::MissingKey);
    let v = admit(&s.gate, &request("GET", "/v1/plain", Some(&s.pro))).await;
    assert_eq!(v.rewrite, None, "a normal path is forwarded as it came");
    // A trailing slash does not dodge a route's cost.
    let a = passed(admit(&s.gate, &request("POST", "/v1/sms/send/", Some(&s.pro))).await);
    assert_eq!(a.cost, 5);
    // Path parameters, which Java servers strip before routing, are refused.
    for path in ["/health/..;/v1/x", "/v1/sms;/send", "/v1/sms%3B/send"] {
        let v = admit(&s.gate, &request("POST", path, Some(&s.pro))).await;
        assert_eq!(refused(v).rejection, Rejection::BadPath, "{path}");
    }
    // A preflight is canonicalised like any request.
    let mut pre = request("OPTIONS", "/health/..%2fv1", None);
    pre.headers
        .insert(http::header::ORIGIN, "https://a.example".parse().unwrap());
    pre.headers.insert(
        http::header::ACCESS_CONTROL_REQUEST_METHOD,
        "POST".parse().unwrap(),
    );
    assert_eq!(
        refused(admit(&s.gate, &pre).await).rejection,
        Rejection::BadPath
    );
}

#[tokio::test]
async fn past_an_included_quota_units_go_to_the_overage_meter() {
    let s = setup(false);
    for i in 0..12 {
        let a = passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.pro))).await);
        let want = if i < 10 {
            "api_requests"
        } else {
            "api_overage"
        };
        assert_eq!(a.meter.as_deref(), Some(want), "request {i}");
    }
}

#[tokio::test]
async fn encoded_separators_are_refused_before_any_lookup() {
    let s = setup(false);
    for path in ["/v1%2Fsms%2Fsend", "/health/..%2fv1%2fsecret", "/v1/a%00"] {
        let v = admit(&s.gate, &request("POST", path, Some(&s.pro))).await;
        assert_eq!(refused(v).rejection, Rejection::BadPath, "{path}");
    }
    // The daily quota of pro is untouched by the refusals.
    let a = passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.pro))).await);
    assert_eq!(a.decision.policies[0].remaining, 9);
}

#[tokio::test]
async fn a_full_journal_refuses_billable_work_before_charging_it() {
    let full = Arc::new(AtomicBool::new(true));
    let s = setup_with(false, Some(full.clone()));
    let r = refused(admit(&s.gate, &request("GET", "/v1/x", Some(&s.pro))).await);
    assert_eq!(r.rejection, Rejection::SpoolFull);
    // free bills nothing on an unmetered route: it is served.
    passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.free))).await);
    full.store(false, Ordering::Relaxed);
    let a = passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.pro))).await);
    assert_eq!(
        a.decision.policies[0].remaining, 9,
        "the refusal consumed nothing"
    );
}

#[tokio::test]
async fn case_insensitive_routes_are_a_choice_of_the_plans_file() {
    let s = setup(false);
    let a = passed(admit(&s.gate, &request("POST", "/V1/SMS/send", Some(&s.pro))).await);
    assert_eq!(a.cost, 1, "case-sensitive by default: no route matched");
    let ci = setup(false);
    let plans = Plans::parse(&Source::new(
        std::path::Path::new("plans.yaml"),
        format!("{PLANS}routes_case_insensitive: true\n"),
    ))
    .unwrap();
    assert!(plans.routes_case_insensitive);
    ci.gate.plans.store(Arc::new(plans));
    let a = passed(admit(&ci.gate, &request("POST", "/V1/SMS/send", Some(&ci.pro))).await);
    assert_eq!((a.cost, a.meter.as_deref()), (5, Some("sms")));
    let v = admit(&ci.gate, &request("GET", "/HEALTH", None)).await;
    assert!(matches!(v.admission, Ok(Admission::Forward)));
}

#[tokio::test]
async fn a_request_too_big_for_what_is_left_says_so_and_head_follows_get() {
    let s = setup(false);
    for _ in 0..3 {
        passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.free))).await);
    }
    // 2 left of burst 5: the sms route's cost 5 does not fit.
    let r = refused(admit(&s.gate, &request("POST", "/v1/sms/send", Some(&s.free))).await);
    let body: serde_json::Value = serde_json::from_str(&r.rejection.body()).unwrap();
    assert_eq!(
        body["detail"],
        "This request costs 5 units and `burst` has 2 left; retry after the time in Retry-After, or send a request that costs less."
    );
    let v = admit(&s.gate, &request("HEAD", "/health", None)).await;
    assert!(
        matches!(v.admission, Ok(Admission::Forward)),
        "HEAD of a public GET route"
    );
}

#[test]
fn sliding_windows_of_any_whole_seconds_up_to_an_hour() {
    use crate::plans::Window;
    assert_eq!(Window::parse("10s"), Some(Window::Sliding(10_000)));
    assert_eq!(Window::parse("5m"), Some(Window::Sliding(300_000)));
    assert_eq!(Window::parse("2h"), None);
    assert_eq!(Window::parse("1500ms"), None);
    assert_eq!(Window::Sliding(10_000).name(), "10s");
    assert_eq!(Window::Sliding(60_000).name(), "minute");
}

/// Alerts as the gate raises them, the first of each id kept (as the
/// spool keeps them; its own test shows it does).
struct Raised(Thresholds, std::sync::Mutex<Vec<Alert>>);

impl AlertJournal for Raised {
    fn thresholds(&self) -> &Thresholds {
        &self.0
    }
    fn raise(&self, alert: Alert) {
        let mut all = self.1.lock().unwrap();
        if all.iter().all(|a| a.id() != alert.id()) {
            all.push(alert);
        }
    }
}

#[tokio::test]
async fn quota_thresholds_are_raised_by_the_request_that_crosses_them() {
    let mut s = setup(false);
    let raised = Arc::new(Raised(Thresholds::new(vec![50, 100]), Default::default()));
    s.gate.alerts = Some(raised.clone());
    let seen = || {
        raised
            .1
            .lock()
            .unwrap()
            .iter()
            .map(|a| (a.policy.to_string(), a.percent, a.used, a.limit))
            .collect::<Vec<_>>()
    };
    let sms = request("POST", "/v1/sms/send", Some(&s.pro));
    // 10 a day, 5 per SMS: the first reaches 50 %, the second 100 %.
    passed(admit(&s.gate, &sms).await);
    assert_eq!(seen(), vec![("daily".into(), 50, 5, 10)]);
    // A request that costs 1 and crosses nothing new raises nothing new
    // (the memory limiter is this process's alone: every request raises
    // what its customer has reached, and the journal keeps the first).
    let a = passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.pro))).await);
    assert_eq!(a.cost, 1);
    assert_eq!(seen().len(), 1);
    // 6 + 5 passes the quota (as overage): 100 %.
    passed(admit(&s.gate, &sms).await);
    assert_eq!(seen()[1], ("daily".into(), 100, 10, 10));
    let alert = raised.1.lock().unwrap()[1].clone();
    assert_eq!((&*alert.customer, &*alert.plan), ("cus_pro", "pro"));
    assert_eq!(alert.period_end - alert.period_start, DAY);
    // Past the quota as overage: nothing new.
    passed(admit(&s.gate, &sms).await);
    assert_eq!(seen().len(), 2);
    // Per-second limits have no period to warn about.
    for _ in 0..5 {
        passed(admit(&s.gate, &request("GET", "/v1/x", Some(&s.free))).await);
    }
    assert_eq!(seen().len(), 2);
}

/// A balance that stays where it is (charges are the spool's business).
struct Fixed(i64);

impl crate::credits::CreditBook for Fixed {
    fn balance(
        &self,
        _: &str,
        _: &crate::credits::CreditPolicy,
        _: Millis,
    ) -> crate::credits::Balance {
        crate::credits::Balance {
            remaining: self.0,
            granted: self.0,
            used: 0,
            period_end: 0,
        }
    }
    fn grant(
        &self,
        _: &Arc<str>,
        _: &crate::credits::CreditPolicy,
        _: crate::credits::Grant,
    ) -> Result<(crate::credits::Granted, crate::credits::Balance), crate::credits::CreditError>
    {
        unreachable!("not granted here")
    }
    fn history(
        &self,
        _: &str,
        _: &crate::credits::CreditPolicy,
        _: Millis,
    ) -> Vec<crate::credits::Entry> {
        Vec::new()
    }
}

#[tokio::test]
async fn a_reserve_route_holds_credits_until_its_request_ends() {
    let mut s = setup(false);
    // 100 credits; a chat call may bill output tokens at 4 a unit, so a
    // reserve of 10 holds 40.
    let plans = Plans::parse(&Source::new(
        std::path::Path::new("plans.yaml"),
        "default_plan: free
plans:
  free: {}
  pro:
    limits: [{ name: daily, requests: 5, per: day }]
    credits: { grant: 100 }
    meters: { ai_input_tokens: { credits_per_unit: 1 }, ai_output_tokens: { credits_per_unit: 4 } }
routes:
  - { match: \"POST /v1/chat\", usage: openai, reserve: 10 }
  - { match: \"GET /v1/free\", meter: ai_input_tokens }
  - { match: \"GET /v1/once\", usage: openai, reserve: 1 }
"
        .into(),
    ))
    .unwrap();
    s.gate.plans = crate::sync::Shared::new(Arc::new(plans));
    s.gate.credits = Some(Arc::new(Fixed(100)));
    let chat = request("POST", "/v1/chat", Some(&s.pro));
    let (a, b) = (
        passed(admit(&s.gate, &chat).await),
        passed(admit(&s.gate, &chat).await),
    );
    assert_eq!((a.hold.amount(), b.hold.amount()), (40, 40));
    // 20 are not held: not enough for a third, and the problem says so.
    let r = refused(admit(&s.gate, &chat).await);
    let Rejection::CreditsExhausted { detail: Some(d) } = &r.rejection else {
        panic!("{:?}", r.rejection)
    };
    assert!(
        d.contains("holds 40 credits") && d.contains("20 of your 100"),
        "{d}"
    );
    // A request with no reserve needs only something unheld.
    let other = passed(admit(&s.gate, &request("GET", "/v1/free", Some(&s.pro))).await);
    assert_eq!(other.hold.amount(), 0);
    s.gate.release(&a);
    let c = passed(admit(&s.gate, &chat).await);
    assert_eq!(s.gate.holds.held("cus_pro"), 80);
    s.gate.release(&b);
    drop(c);
    assert_eq!(
        s.gate.holds.held("cus_pro"),
        0,
        "given back, released or dropped"
    );
}

/// A customer's own limits make its plan once: every lookup of its keys
/// (each a fresh identity) gets that plan, not one built again, and a
/// change of the customer's record makes a new one.
#[test]
fn a_customers_own_plan_is_built_once_for_all_its_lookups() {
    let s = setup_with(false, None);
    let own = CustomerRecord {
        plan: Some("pro".into()),
        limits: Some(vec![crate::plans::custom::LimitSpec {
            name: "mine".into(),
            requests: 7,
            per: "minute".into(),
            overage: false,
            overage_meter: None,
        }]),
        ..CustomerRecord::default()
    };
    let snap = s.gate.keys.snapshot().with_customer("cus_pro", Some(&own));
    let hash = keys::hash(&s.pro);
    let plan_of = |snap: &Snapshot| {
        let id = snap.lookup(&hash, 0).expect("the pro key");
        s.gate.plan_of(&id)
    };
    let first = plan_of(&snap);
    assert_eq!(first.limits.len(), 1);
    assert_eq!(&*first.limits[0].name, "mine");
    assert!(Arc::ptr_eq(&first, &plan_of(&snap)), "built once");
    let changed = snap.with_customer("cus_pro", Some(&own));
    assert!(
        !Arc::ptr_eq(&first, &plan_of(&changed)),
        "a new record, a new plan"
    );
}
