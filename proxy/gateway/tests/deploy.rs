//! What `deploy/` ships is checked by the tools that will read it: the
//! alert rules by promtool (syntax and unit tests), the systemd unit by
//! systemd-analyze, the Kubernetes and compose files by parsing them and
//! loading their Tollgate config with Tollgate's own validation, every
//! metric the rules and the dashboard name against a running Tollgate's
//! /metrics, and a real Prometheus scraping a running Tollgate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{free_port, Harness};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup.sh installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    let out = run(Command::new("promtool")
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&dir));
    assert!(out.contains("SUCCESS: 9 rules found"), "{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn the_systemd_unit_verifies() {
    // systemd-analyze checks that ExecStart exists: the built binary
    // stands in for /usr/local/bin/tollgate; nothing else is changed.
    let unit = std::fs::read_to_string(deploy().join("tollgate.service")).unwrap();
    for needed in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=tollgate",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/tollgate", env!("CARGO_BIN_EXE_tollgate")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("tollgate.service:"),
        "{text}"
    );
}

/// Tollgate's own validation of a config and plans shipped in a recipe.
fn validates(config: &str, plans: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plans.yaml"), plans).unwrap();
    // Paths and names of the deployment itself: the spool's volume, and
    // compose's `app` service, which resolves only inside compose.
    let config = config
        .replace("/var/lib/tollgate/spool", "spool")
        .replace("http://app:8000", "http://127.0.0.1:8000");
    std::fs::write(dir.path().join("tollgate.yaml"), config).unwrap();
    let env = |_: &str| Some("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0".to_owned());
    if let Err(d) = tollgate::config::Config::load_with_env(&dir.path().join("tollgate.yaml"), &env)
    {
        panic!("a shipped config does not validate:\n{d}");
    }
}

#[test]
fn the_kubernetes_manifests_and_compose_file_hold_valid_tollgate_config() {
    let text = std::fs::read_to_string(deploy().join("kubernetes/tollgate-sidecar.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "StatefulSet", "Service"]);
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d:?}"
        );
    }
    let cm = &docs[0]["data"];
    validates(
        cm["tollgate.yaml"].as_str().unwrap(),
        cm["plans.yaml"].as_str().unwrap(),
    );
    let sts = &docs[2]["spec"];
    let containers = sts["template"]["spec"]["containers"].as_sequence().unwrap();
    let tg = containers
        .iter()
        .find(|c| c["name"] == "tollgate")
        .expect("a tollgate sidecar");
    assert_eq!(containers.len(), 2, "beside the app");
    assert_eq!(tg["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(tg["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(tg["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        sts["volumeClaimTemplates"][0]["metadata"]["name"], "state",
        "a spool volume per pod"
    );

    let compose: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy().join("compose/compose.yaml")).unwrap(),
    )
    .unwrap();
    for svc in ["app", "tollgate", "redis", "prometheus"] {
        assert!(compose["services"][svc].is_mapping(), "{svc}");
    }
    let plans =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plans.yaml"))
            .unwrap();
    validates(
        &std::fs::read_to_string(deploy().join("compose/tollgate.yaml")).unwrap(),
        &plans,
    );

    let docker = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert_eq!(
        docker.lines().filter(|l| l.starts_with("FROM ")).count(),
        2,
        "multi-stage"
    );
    for needed in [
        "USER 10001",
        "HEALTHCHECK",
        "VOLUME",
        "ca-certificates",
        "cargo build --release --locked",
    ] {
        assert!(docker.contains(needed), "{needed}");
    }
}

/// Metric names in PromQL text (`tollgate_…`, without `_bucket` and the like).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("tollgate_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| {
            n.strip_suffix(s).map(str::to_owned).unwrap_or(n)
        });
        out.insert(base);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboard_use_is_exported() {
    // A config that names a sink, a webhook provider and Redis, so every
    // labelled series exists from the start.
    let redis = harness::RedisServer::start();
    let stripe = harness::MockStripe::start(|_| false);
    let h = Harness::builder()
        .redis(&format!("url: \"{}\", on_error: local", redis.url()))
        .env("TEST_STRIPE_KEY", harness::STRIPE_KEY)
        .env("T_WH", "whsec_test")
        .config(&format!(
            "metering: {{ sinks: [{}] }}\nbilling_webhooks: {{ stripe: {{ secret_env: T_WH }} }}",
            stripe.sink()
        ))
        .build();
    let exported = h.metrics().await;
    let rules = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let dash = std::fs::read_to_string(deploy().join("grafana/tollgate.json")).unwrap();
    let _: Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    let mut names = metric_names(&rules);
    names.extend(metric_names(&dash));
    for n in &names {
        assert!(
            exported.contains(&format!("# TYPE {n} ")),
            "{n} is not exported by Tollgate"
        );
    }
    assert!(names.len() >= 12, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_tollgate() {
    let h = Harness::start();
    let key = h.key("cus_scraped", None);
    assert_eq!(h.get_n("/v1/x", &key, 3).await, vec![200; 3]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!("global: {{ scrape_interval: 1s }}\nscrape_configs:\n  - job_name: tollgate\n    static_configs: [{{ targets: [\"{}\"] }}]\n", h.admin),
    )
    .unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus (Debian's package; scripts/setup.sh installs it)");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let url = format!("http://127.0.0.1:{port}/api/v1/query?query=sum(tollgate_requests_total%7Boutcome%3D%22allowed%22%7D)");
        if let Ok(r) = client.get(&url).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if let Some(x) = v["data"]["result"][0]["value"][1].as_str() {
                    break x.to_owned();
                }
            }
        }
        if Instant::now() > deadline {
            let _ = prom.kill();
            panic!("Prometheus never had tollgate_requests_total");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(found, "3");
}
