use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sections::parse_upstream;
use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const PLANS: &str = "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 5, per: second }\n";

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn minimal_config_gets_defaults_and_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\n",
    );
    let c = Config::load_with_env(&f, &|k| {
        (k == "TOLLGATE_ADMIN_TOKEN").then(|| "s3cret".into())
    })
    .unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.upstream.addr.to_string(), "127.0.0.1:8000");
    assert_eq!(c.keys_path, dir.path().join("keys.db"));
    assert_eq!(c.key_prefix, "tg_live_");
    assert_eq!(c.admin.token.as_deref(), Some("s3cret"));
    assert_eq!(c.timeouts.connect, Duration::from_secs(5));
}

#[test]
fn all_errors_of_both_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", "default_plan: nope\nplans: {}\n");
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "listen: everywhere\nupstream: ftp://x\nkeys: { store: file, prefix: \"bad prefix\" }\ntimeouts: { connect: soon }\ncors: { allow_origins: [app.example.com] }\n",
    );
    let d = Config::load_with_env(&f, &no_env).unwrap_err();
    let all = d.to_string();
    let cfg = f.display().to_string();
    for needle in [
        format!("{cfg}:1:9: error: `everywhere` is not an address"),
        format!("{cfg}:2:11: error: upstream `ftp://x` must start with http:// or https://"),
        format!("{cfg}:3:30: error: key prefix `bad prefix`"),
        format!("{cfg}:4:22: error: `soon` is not a duration"),
        format!("{cfg}:5:25: error: `app.example.com` is not an origin"),
        "plans.yaml:1:15: error: `default_plan` names unknown plan `nope`".to_string(),
    ] {
        assert!(all.contains(&needle), "missing `{needle}` in:\n{all}");
    }
    assert_eq!(d.0.len(), 6, "{all}");
}

#[test]
fn unknown_keys_are_errors_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let f = write(dir.path(), "tollgate.yaml", "upstream: http://127.0.0.1:1\nlisten: 0.0.0.0:1\nadmin:\n  listen: 127.0.0.1:2\n  tokenenv: X\n");
    let all = Config::load_with_env(&f, &no_env).unwrap_err().to_string();
    assert!(
        all.contains(":5:3: error: unknown field `tokenenv`"),
        "{all}"
    );
    assert!(all.contains("hint:"), "{all}");
}

#[test]
fn a_broken_section_does_not_hide_the_others() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", "default_plan: x\nplans: {}\n");
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstreem: http://127.0.0.1:1\ntimeouts: { connect: [1] }\nthreads: many\nadmin: { listen: nowhere }\n",
    );
    let all = Config::load_with_env(&f, &no_env).unwrap_err().to_string();
    for needle in [
        ":1:1: error: unknown field `upstreem`",
        ":2:13: error: invalid type: sequence",
        ":3:10: error: invalid type: string \"many\"",
        ":4:18: error: `nowhere` is not an address",
        "`upstream` is missing",
        "plans.yaml:1:15: error: `default_plan` names unknown plan `x`",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn upstream_forms() {
    let u = parse_upstream("https://localhost:8443/").unwrap();
    assert!(u.tls && u.port == 8443 && u.host == "localhost");
    assert_eq!(parse_upstream("http://127.0.0.1").unwrap().port, 80);
    assert_eq!(
        parse_upstream("http://[::1]:81").unwrap().addr.to_string(),
        "[::1]:81"
    );
    assert!(parse_upstream("http://host/path").is_err());
    assert!(parse_upstream("http://127.0.0.1:99999").is_err());
    assert!(parse_upstream("http://no-such-host.invalid").is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(
        parse_duration("90d"),
        Some(Duration::from_secs(90 * 86_400))
    );
    assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
    assert_eq!(parse_duration("1.5s"), None);
    assert_eq!(parse_duration("s"), None);
    assert_eq!(parse_duration("10"), None);
}

#[test]
fn admin_hosts() {
    let admin = |listen: &str, allowed: Option<Vec<String>>| Admin {
        listen: listen.parse().unwrap(),
        token_env: "T".into(),
        token: None,
        allowed_hosts: allowed,
    };
    let local = admin("127.0.0.1:9090", None);
    for host in [
        None,
        Some("127.0.0.1:9090"),
        Some("localhost"),
        Some("LOCALHOST:1"),
        Some("[::1]:9090"),
    ] {
        assert!(local.host_allowed(host), "{host:?}");
    }
    for host in [
        Some("evil.example.com"),
        Some("evil.example.com:9090"),
        Some("10.0.0.5:9090"),
        Some(""),
    ] {
        assert!(!local.host_allowed(host), "DNS rebinding through {host:?}");
    }
    let listed = admin("127.0.0.1:9090", Some(vec!["tollgate.internal".into()]));
    assert!(listed.host_allowed(Some("tollgate.internal:9090")));
    assert!(!listed.host_allowed(Some("localhost")));
    assert!(admin("0.0.0.0:9090", None).host_allowed(Some("tollgate.monitoring.svc:9090")));
}

#[test]
fn config_that_can_never_work_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "plans.yaml",
        "default_plan: free\nplans:\n  free: {}\nroutes:\n  - { match: \"GET /%68ealth\", public: true }\n  - { match: \"POST /v1/sms/../ai/*\" }\n  - { match: \"GET /health?x=1\", public: true }\n",
    );
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:1\nmetering: { max_spool_mb: 0 }\n",
    );
    let all = Config::load_with_env(&f, &no_env).unwrap_err().to_string();
    for needle in [
        ":2:27: error: `max_spool_mb` must be at least 1",
        "plans.yaml:5:14: error: path `/%68ealth` can never match: it holds a percent-escape",
        "plans.yaml:6:14: error: path `/v1/sms/../ai/*` can never match: it holds a `.` or `..` segment",
        "plans.yaml:7:14: error: path `/health?x=1` can never match: it holds a query",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn spool_encryption_keys_come_from_the_environment_and_must_be_256_bits() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:1\nmetering:\n  encryption: { key_env: SPOOL_KEY, previous_key_env: OLD_KEY }\n",
    );
    let good = "ab".repeat(32);
    let c = Config::load_with_env(&f, &|k| match k {
        "SPOOL_KEY" | "OLD_KEY" => Some(good.clone()),
        _ => None,
    })
    .unwrap();
    assert!(c.metering.seal.is_some());
    let all = Config::load_with_env(&f, &|k| (k == "SPOOL_KEY").then(|| "short".into()))
        .unwrap_err()
        .to_string();
    assert!(
        all.contains("SPOOL_KEY does not hold a 256-bit key"),
        "{all}"
    );
    assert!(
        all.contains("environment variable OLD_KEY is not set"),
        "{all}"
    );
}

#[test]
fn billing_webhooks_and_checkout_are_read_and_checked_against_the_plans() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let ok = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\nbilling_webhooks:\n  stripe: { secret_env: WH, previous_secret_env: WH_OLD, plans: { price_1: free }, on_cancel: free, on_past_due: suspend, tolerance: 2m }\n  standard: { secret_env: STD }\ncheckout:\n  stripe: { api_key_env: SK, prices: { free: price_1 }, success_url: \"https://e.com/ok\", cancel_url: \"https://e.com/no\" }\n",
    );
    let env = |k: &str| match k {
        "STD" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        "WH" | "WH_OLD" | "SK" => Some(format!("{k}-value")),
        _ => None,
    };
    let c = Config::load_with_env(&ok, &env).unwrap();
    let stripe = c
        .webhook(tollgate_core::lifecycle::Provider::Stripe)
        .unwrap();
    assert_eq!(stripe.secrets, ["WH-value", "WH_OLD-value"]);
    assert_eq!(stripe.tolerance_secs, 120);
    assert_eq!(
        stripe.policy.on_past_due,
        tollgate_core::lifecycle::OnPastDue::Suspend
    );
    assert_eq!(c.webhooks.len(), 2);
    assert_eq!(c.checkout.as_ref().unwrap().prices["free"], "price_1");
    // Secrets stay out of debug output.
    assert!(!format!("{c:?}").contains("-value") && !format!("{c:?}").contains("whsec_"));

    let bad = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\nbilling_webhooks:\n  stripe: { secret_env: WH, plans: { price_1: gold }, on_cancel: silver }\n  paystack: { secret_env: NOPE, tolerance: 1m }\n  standard: { secret_env: WH, plans: { a: free } }\n  chargebee: { secret_env: WH }\ncheckout:\n  stripe: { api_key_env: SK, prices: { bronze: price_9 }, success_url: \"/ok\", cancel_url: \"https://e.com/no\" }\n",
    );
    let all = Config::load_with_env(&bad, &env).unwrap_err().to_string();
    let cfg = bad.display().to_string();
    for needle in [
        format!("{cfg}:3:47: error: `gold` is not a plan in plans.yaml"),
        "error: `silver` is not a plan in plans.yaml".to_string(),
        "error: Paystack signs no timestamp".to_string(),
        "error: environment variable NOPE is not set".to_string(),
        "error: `plans` does not apply to Standard Webhooks".to_string(),
        // WH-value decodes to far fewer than 16 bytes of key.
        "error: a Standard Webhooks secret must hold at least 16 bytes of key".to_string(),
        "chargebee".to_string(),
        "error: `bronze` is not a plan in plans.yaml".to_string(),
        "error: `/ok` is not an http(s) URL".to_string(),
    ] {
        assert!(all.contains(&needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn alerts_are_checked_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\nmetering: { enabled: false }\nalerts:\n  at: [80, 0, 150]\n  webhook: { url: ops.example.com, secret_env: ALERT_SECRET }\n",
    );
    let all = Config::load_with_env(&f, &no_env).unwrap_err().to_string();
    let cfg = f.display().to_string();
    for needle in [
        format!("{cfg}:4:12: error: `0` is not a percent from 1 to 100"),
        format!("{cfg}:4:15: error: `150` is not a percent from 1 to 100"),
        format!("{cfg}:5:19: error: `ops.example.com` is not an http(s) URL"),
        format!("{cfg}:5:48: error: environment variable ALERT_SECRET is not set"),
        format!("{cfg}:3:1: error: alerts are journaled in the usage spool"),
    ] {
        assert!(all.contains(&needle), "missing `{needle}` in:\n{all}");
    }
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\nalerts: { at: [100, 80], webhook: { url: \"https://ops.example.com/h\", secret_env: ALERT_SECRET } }\n",
    );
    let c = Config::load_with_env(&f, &|k| {
        (k == "ALERT_SECRET").then(|| "whsec_c2VjcmV0".into())
    })
    .unwrap();
    let a = c.alerts.unwrap();
    assert_eq!(a.at.as_slice(), &[80, 100]);
    assert_eq!(a.url, "https://ops.example.com/h");
}

#[test]
fn no_sink_may_be_called_alerts() {
    // `tollgate billing` names the alert webhook `alerts` beside the sinks.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "plans.yaml", PLANS);
    let f = write(
        dir.path(),
        "tollgate.yaml",
        "upstream: http://127.0.0.1:8000\nmetering:\n  sinks:\n    - webhook: { name: alerts, url: \"https://x.example/h\", secret_env: S }\n",
    );
    let all = Config::load_with_env(&f, &|_| Some("whsec_c2VjcmV0".into()))
        .unwrap_err()
        .to_string();
    assert!(all.contains("`alerts` names the alert webhook"), "{all}");
}
