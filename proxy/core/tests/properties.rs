//! Properties of the parsers every request and every config goes through,
//! checked on generated input in every CI run (proptest; failing cases are
//! kept in `tests/proptest-regressions.txt` and replayed first).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tollgate_core::diag::Source;
use tollgate_core::gate::{canonical_path, extract_key};
use tollgate_core::keys;
use tollgate_core::lifecycle::{events, signature, Provider};
use tollgate_core::pct;
use tollgate_core::plans::Plans;

/// Paths as clients write them: segments of letters, dots, escapes (of
/// anything, separators included) and the odd backslash.
fn paths() -> impl Strategy<Value = String> {
    "(/([a-zA-Z0-9._~!$&'()*+,;=:@ -]|%[0-9A-Fa-f]{2}|%|\\.\\.|\\.|\\\\){0,5}){0,6}/?"
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        // Failing inputs are kept here and replayed first in every run.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// What an upstream that decodes the forwarded path reads is exactly
    /// the path Tollgate routed on, and that path has no dot segments or
    /// empty segments left for the upstream to resolve differently.
    #[test]
    fn the_routed_path_is_what_a_decoding_upstream_sees(raw in paths()) {
        match canonical_path(&raw) {
            Ok(c) => {
                let forwarded = c.forward.clone().unwrap_or_else(|| raw.clone());
                prop_assert_eq!(pct::decode(&forwarded, false), c.routed.to_string());
                let routed: &str = &c.routed;
                prop_assert!(routed.starts_with('/'));
                prop_assert!(!routed.contains("//"), "{}", routed);
                prop_assert!(!routed.split('/').any(|s| s == "." || s == ".."), "{}", routed);
                // Forwarding what was forwarded changes nothing.
                let again = canonical_path(&forwarded).unwrap();
                prop_assert_eq!(again.routed.to_string(), c.routed.to_string());
                prop_assert_eq!(again.forward, None);
            }
            Err(_) => prop_assert!(raw.contains(['%', '\\', ';']), "{}", raw),
        }
    }

    /// Any string is classified without a panic, and only keys made by
    /// `keys::generate`'s scheme pass.
    #[test]
    fn key_checks_never_panic_and_only_pass_real_keys(s in "\\PC{0,80}", secret in any::<[u8; 32]>()) {
        let _ = keys::check_format("tg_live_", &s);
        prop_assert_eq!(keys::check_format("tg_live_", &keys::from_secret("tg_live_", &secret)), Ok(()));
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {s}")) {
            headers.insert(http::header::AUTHORIZATION, v);
            let _ = extract_key(&headers);
        }
    }

    /// Rate-limit headers are valid header values in the draft's shape for
    /// any plan and any decision.
    #[test]
    fn rate_limit_headers_are_valid_for_any_decision(
        policies in proptest::collection::vec(("[A-Za-z0-9_.-]{1,16}", 1u64..u64::MAX, 0u64..u64::MAX, 0u64..u64::MAX, any::<bool>()), 0..6),
        allowed in any::<bool>(),
    ) {
        use tollgate_core::headers::RateHeaders;
        use tollgate_core::limiter::{Decision, PolicyStatus};
        use tollgate_core::plans::{policy_header, Limit, Window};
        let limits: Vec<Limit> = policies.iter().map(|(n, q, ..)| Limit {
            name: n.as_str().into(), quota: *q, window: Window::Day, overage: false, overage_meter: None,
        }).collect();
        let policy = policy_header(&limits);
        prop_assert!(http::HeaderValue::from_str(&policy).is_ok(), "{}", policy);
        let d = Decision {
            allowed,
            policies: policies.iter().map(|(n, q, r, t, v)| PolicyStatus {
                name: n.as_str().into(), quota: *q, remaining: (*r).min(*q), reset_secs: *t, violated: *v, concurrent: false,
            }).collect(),
            retry_after_secs: 1,
            overage: false,
            overage_meter: None,
            lease: None,
        };
        match RateHeaders::render(&d) {
            None => prop_assert!(policies.is_empty()),
            Some(h) => {
                prop_assert!(http::HeaderValue::from_str(&h.ratelimit).is_ok(), "{}", h.ratelimit);
                for item in h.ratelimit.split(", ") {
                    prop_assert!(item.starts_with('"') && item.contains("\";r=") && item.contains(";t="), "{}", item);
                }
                prop_assert!(h.remaining <= h.limit);
            }
        }
    }

    /// Whatever plans.yaml holds, parsing answers with plans or located
    /// errors, never a panic.
    #[test]
    fn plans_parsing_never_panics(text in "(default_plan: [a-z]{0,5}\\n)?(plans:\\n(  [a-z]{1,5}:\\n(    limits: \\[\\{ name: [a-z]{1,4}, requests: -?[0-9]{1,3}, per: [a-z]{3,7} \\}\\]\\n)?){0,3})?(routes:\\n(  - \\{ match: \"[A-Z]{0,4} ?/[a-z/*%.]{0,8}\", cost: [0-9]{1,2} \\}\\n){0,3})?\\PC{0,20}") {
        let _ = Plans::parse(&Source::new(Path::new("plans.yaml"), text));
    }

    #[test]
    fn webhook_signature_headers_never_panic_and_a_forgery_never_passes(
        header in "(t|ts|v1|h1|v0|[a-z]{0,3})=[0-9a-f]{0,70}([,;] ?(t|ts|v1|h1)=[0-9a-zA-Z+/=,]{0,70}){0,4}|\\PC{0,120}",
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let secrets = ["whsec_property".to_owned()];
        let now = 1_700_000_000;
        // Nothing generated here knows the secret: nothing may verify.
        prop_assert!(signature::stripe(Some(&header), &body, &secrets, now, u64::MAX).is_err());
        prop_assert!(signature::paddle(Some(&header), &body, &secrets, now, u64::MAX).is_err());
        prop_assert!(signature::paystack(Some(&header), &body, &secrets).is_err());
        let parts: Vec<&str> = header.splitn(3, ',').collect();
        let h = signature::StandardHeaders {
            id: parts.first().copied(),
            timestamp: parts.get(1).copied(),
            signature: parts.get(2).copied(),
        };
        prop_assert!(signature::standard(h, &body, &secrets, now, u64::MAX).is_err());
        for p in Provider::ALL {
            let _ = events::parse(p, &body, Some("msg_1"), Some(now), now * 1000);
        }
    }
}
