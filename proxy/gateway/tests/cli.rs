//! The `tollgate` binary as an operator uses it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

fn tollgate(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plans.yaml"),
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 5, per: second }\n  pro:\n    limits: []\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        "upstream: http://127.0.0.1:8000\nkeys: { path: keys.db, prefix: sk_live_ }\n",
    )
    .unwrap();
    dir
}

#[test]
fn check_reports_every_error_with_file_line_and_column_and_exits_1() {
    let dir = project();
    std::fs::write(
        dir.path().join("plans.yaml"),
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: -1, per: second }\n      - { name: daily, requests: 10, per: week }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        "upstream: http://127.0.0.1:8000\nlistne: 0.0.0.0:1\n",
    )
    .unwrap();
    let out = tollgate(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("tollgate.yaml:2:1: error: unknown field `listne`"),
        "{stdout}"
    );

    std::fs::write(
        dir.path().join("tollgate.yaml"),
        "upstream: http://127.0.0.1:8000\n",
    )
    .unwrap();
    let out = tollgate(dir.path(), &["check", "-c", "tollgate.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("plans.yaml:5:34: error: `requests` must be a positive number, got -1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("plans.yaml:6:43: error: unknown window `week`"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hint: use one of: second, minute, hour, day, month"),
        "{stdout}"
    );

    let out = tollgate(dir.path(), &["check", "-c", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn key_lifecycle_through_the_cli() {
    let dir = project();
    let out = tollgate(dir.path(), &["check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = tollgate(
        dir.path(),
        &[
            "keys",
            "create",
            "--customer",
            "cus_42",
            "--plan",
            "pro",
            "--name",
            "ci",
            "-c",
            "tollgate.yaml",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds the key alone: {stdout:?}");
    let key = lines[0];
    assert_eq!(tollgate_core::keys::check_format("sk_live_", key), Ok(()));
    let db = std::fs::read_to_string(dir.path().join("keys.db")).unwrap();
    assert!(!db.contains(key), "the raw key is never stored");

    let out = tollgate(dir.path(), &["keys", "list"]);
    let listing = text(&out.stdout);
    assert!(
        listing.contains("cus_42") && listing.contains("pro") && listing.contains("active"),
        "{listing}"
    );
    assert!(
        !listing.contains(key) && !listing.contains(&hex::encode(tollgate_core::keys::hash(key)))
    );
    let id = listing
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(tollgate_core::keys::valid_key_id(&id), "{id}");

    let out = tollgate(dir.path(), &["keys", "rotate", &id, "--grace", "1h"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let new_key = text(&out.stdout).trim().to_owned();
    assert_ne!(new_key, key);
    let listing = text(&tollgate(dir.path(), &["keys", "list", "--customer", "cus_42"]).stdout);
    assert!(
        listing.contains("expiring") && listing.contains("active"),
        "{listing}"
    );

    assert!(tollgate(dir.path(), &["keys", "revoke", &id])
        .status
        .success());
    assert!(text(&tollgate(dir.path(), &["keys", "list"]).stdout).contains("revoked"));
    assert!(
        !tollgate(dir.path(), &["keys", "revoke", "key_0000000000000000"])
            .status
            .success()
    );

    let out = tollgate(dir.path(), &["customers", "set-plan", "cus_42", "gold"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown plan `gold`"));
    assert!(
        tollgate(dir.path(), &["customers", "set-plan", "cus_42", "free"])
            .status
            .success()
    );
    assert!(tollgate(dir.path(), &["check"]).status.success());
}

#[test]
fn the_shipped_example_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tollgate(&root, &["check", "-c", "examples/tollgate.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The AI example plans too, with the same config around them.
    let dir = tempfile::tempdir().unwrap();
    let plans = root.join("examples/ai-plans.yaml");
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "upstream: http://127.0.0.1:8000\nplans: {}\nkeys: {{ path: keys.db }}\n",
            plans.display()
        ),
    )
    .unwrap();
    let out = tollgate(dir.path(), &["check", "-c", "tollgate.yaml"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tollgate run` in `dir`, killed after `secs` if it is still up: its exit
/// code (None: it was still running) and stderr.
fn run_for(dir: &Path, secs: u64) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("run")
        .current_dir(dir)
        .env_remove("TOLLGATE_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    (code, err)
}

fn listen_on(dir: &Path, port: u16, admin: u16) {
    std::fs::write(
        dir.join("tollgate.yaml"),
        format!("listen: 127.0.0.1:{port}\nupstream: http://127.0.0.1:8000\nkeys: {{ path: keys.db, prefix: sk_live_ }}\nadmin: {{ listen: 127.0.0.1:{admin} }}\nmetering: {{ spool_dir: spool }}\n"),
    )
    .unwrap();
}

/// A customer with a key on `pro`, then `pro` renamed in plans.yaml: what
/// `check` says first, and that `run` exits 1 saying it too.
fn strand_a_customer_then_run(dir: &Path) -> String {
    let created = tollgate(
        dir,
        &[
            "keys",
            "create",
            "--customer",
            "cus_paying",
            "--plan",
            "pro",
        ],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    std::fs::write(
        dir.join("plans.yaml"),
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 5, per: second }\n  professional:\n    limits: []\n",
    )
    .unwrap();
    let check = text(&tollgate(dir, &["check"]).stdout);
    let (code, err) = run_for(dir, 10);
    assert_eq!(code, Some(1), "{err}");
    let line = check.lines().next().unwrap();
    assert!(
        line.contains("customer cus_paying is on plan `pro`"),
        "{check}"
    );
    assert!(err.contains(line), "run says what check says:\n{err}");
    line.to_owned()
}

#[test]
fn run_refuses_to_strand_customers_on_a_plan_that_no_longer_exists() {
    let dir = project();
    listen_on(dir.path(), free_port(), free_port());
    strand_a_customer_then_run(dir.path());
}

/// A customer stranded by a change made since the store's document was
/// written stands in the journal: `check` and `run` both say so, at its
/// line there, and the same of one in the document at its line there.
#[test]
fn check_and_run_locate_a_journaled_record_in_the_journal() {
    let dir = project();
    listen_on(dir.path(), free_port(), free_port());
    for customer in ["cus_first", "cus_later"] {
        let created = tollgate(
            dir.path(),
            &["keys", "create", "--customer", customer, "--plan", "pro"],
        );
        assert!(created.status.success(), "{}", text(&created.stderr));
    }
    let journal = std::fs::read_to_string(dir.path().join("keys.db.journal")).unwrap();
    assert_eq!(journal.lines().count(), 1, "the second key is journaled");
    std::fs::write(
        dir.path().join("plans.yaml"),
        "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 5, per: second }\n",
    )
    .unwrap();
    let check = text(&tollgate(dir.path(), &["check"]).stdout);
    let (code, err) = run_for(dir.path(), 10);
    assert_eq!(code, Some(1), "{err}");
    let line = |customer: &str| {
        check
            .lines()
            .find(|l| l.contains(&format!("customer {customer} is on plan `pro`")))
            .unwrap_or_else(|| panic!("{customer}: {check}"))
            .to_owned()
    };
    let (first, later) = (line("cus_first"), line("cus_later"));
    let column = journal.find("\"cus_later\"").unwrap() + 1;
    assert!(
        later.contains(&format!("keys.db.journal:1:{column}: error")),
        "{later}"
    );
    assert!(
        first.contains("keys.db:") && !first.contains("journal"),
        "{first}"
    );
    for l in [&first, &later] {
        assert!(err.contains(l.as_str()), "run says what check says:\n{err}");
    }
}

/// Two records of one hash (a hand edit) are one key with two sets of
/// facts: `check` and `run` refuse the store at the second record's line.
#[test]
fn check_and_run_refuse_two_records_of_one_key() {
    let dir = project();
    listen_on(dir.path(), free_port(), free_port());
    let created = tollgate(dir.path(), &["keys", "create", "--customer", "cus_1"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let path = dir.path().join("keys.db");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut twin = doc["keys"][0].clone();
    twin["id"] = serde_json::json!("key_BBBBBBBBBBBBBBBB");
    twin["customer"] = serde_json::json!("cus_2");
    doc["keys"].as_array_mut().unwrap().push(twin);
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let check = tollgate(dir.path(), &["check"]);
    assert_eq!(check.status.code(), Some(1));
    let stdout = text(&check.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("key key_BBBBBBBBBBBBBBBB has the hash of an earlier key"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("keys.db:"), "{line}");
    let (code, err) = run_for(dir.path(), 10);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(line), "run says what check says:\n{err}");
}

#[test]
fn a_busy_port_ends_the_process_at_once_with_one_line() {
    let dir = project();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    listen_on(dir.path(), port, free_port());
    let started = std::time::Instant::now();
    let (code, err) = run_for(dir.path(), 10);
    assert_eq!(code, Some(1), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains(&format!("cannot listen on 127.0.0.1:{port} (listen)")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_says_once_what_it_loaded() {
    let dir = project();
    let port = free_port();
    listen_on(dir.path(), port, free_port());
    assert!(
        tollgate(dir.path(), &["keys", "create", "--customer", "cus_1"])
            .status
            .success()
    );
    let (code, err) = run_for(dir.path(), 3);
    assert_eq!(code, None, "still serving: {err}");
    assert!(
        err.contains("loaded 2 plans, 1 keys, 1 customers, 0 sinks"),
        "{err}"
    );
}

#[test]
fn a_key_store_path_in_a_missing_directory_is_an_error_not_a_new_store() {
    let dir = project();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        "upstream: http://127.0.0.1:8000\nkeys: { path: conf/keys.db, prefix: sk_live_ }\n",
    )
    .unwrap();
    let out = tollgate(dir.path(), &["keys", "create", "--customer", "cus_1"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("tollgate.yaml:2:15: error: the key store's directory"),
        "{err}"
    );
    assert!(err.contains("conf does not exist"), "{err}");
    assert!(!dir.path().join("conf").exists(), "no directory was made");
    let check = tollgate(dir.path(), &["check"]);
    assert_eq!(check.status.code(), Some(1));
}

#[test]
fn key_commands_need_no_sink_secrets_but_check_and_run_do() {
    let dir = project();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        "upstream: http://127.0.0.1:8000\nkeys: { path: keys.db, prefix: sk_live_ }\nmetering:\n  sinks:\n    - stripe: { api_key_env: TEST_UNSET_STRIPE_KEY }\n  encryption: { key_env: TEST_UNSET_SPOOL_KEY }\n",
    )
    .unwrap();
    for args in [
        &["keys", "create", "--customer", "cus_1"][..],
        &["keys", "list"],
        &["customers", "set-plan", "cus_1", "pro"],
    ] {
        let out = tollgate(dir.path(), args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let check = text(&tollgate(dir.path(), &["check"]).stdout);
    assert!(
        check.contains("environment variable TEST_UNSET_STRIPE_KEY is not set"),
        "{check}"
    );
    assert!(
        check.contains("environment variable TEST_UNSET_SPOOL_KEY is not set"),
        "{check}"
    );
}

#[test]
fn keys_list_json_parses_and_never_holds_a_key_or_hash() {
    let dir = project();
    let out = tollgate(
        dir.path(),
        &["keys", "create", "--customer", "cus_json", "--plan", "pro"],
    );
    let key = text(&out.stdout).trim().to_owned();
    let out = tollgate(dir.path(), &["keys", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = &list.as_array().unwrap()[0];
    assert_eq!(item["customer"], "cus_json");
    assert_eq!(item["plan"], "pro");
    assert_eq!(item["status"], "active");
    assert!(tollgate_core::keys::valid_key_id(
        item["id"].as_str().unwrap()
    ));
    let raw = text(&out.stdout);
    assert!(!raw.contains(&key) && !raw.contains(&hex::encode(tollgate_core::keys::hash(&key))));
}

#[test]
fn customers_get_their_own_limits_from_a_file_and_lose_them_again() {
    let dir = project();
    let out = tollgate(dir.path(), &["keys", "create", "--customer", "cus_big"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(
        dir.path().join("bad.yaml"),
        "limits:\n  - { name: burst, requests: 0, per: second }\n  - { name: daily, requests: 10, per: fortnight }\n",
    )
    .unwrap();
    let out = tollgate(
        dir.path(),
        &["customers", "set-limits", "cus_big", "--file", "bad.yaml"],
    );
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml:2:30: error: limits[0].requests: must be a positive whole number"),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:3:39: error: limits[1].per: must be second, minute"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("big.yaml"),
        "limits:\n  - { name: burst, requests: 500, per: second }\n  - { name: monthly, requests: 10000000, per: month }\n",
    )
    .unwrap();
    let out = tollgate(
        dir.path(),
        &["customers", "set-limits", "cus_big", "--file", "big.yaml"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let store: serde_json::Value = serde_json::to_value(
        tollgate_core::store::FileStore::unsnapshotted(&dir.path().join("keys.db"))
            .data()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        store["customers"]["cus_big"]["limits"],
        serde_json::json!([{"name": "burst", "requests": 500, "per": "second"}, {"name": "monthly", "requests": 10_000_000, "per": "month"}])
    );
    let out = tollgate(dir.path(), &["customers", "clear-limits", "cus_big"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let store: serde_json::Value = serde_json::to_value(
        tollgate_core::store::FileStore::unsnapshotted(&dir.path().join("keys.db"))
            .data()
            .unwrap(),
    )
    .unwrap();
    assert!(store["customers"]["cus_big"].get("limits").is_none());
}

#[test]
fn customers_list_and_show_read_the_store_and_an_unknown_customer_is_an_error() {
    let dir = project();
    for (c, plan) in [("cus_a", Some("pro")), ("cus_b", None)] {
        let mut args = vec!["keys", "create", "--customer", c];
        if let Some(p) = plan {
            args.extend(["--plan", p]);
        }
        assert!(tollgate(dir.path(), &args).status.success());
    }
    assert!(tollgate(dir.path(), &["customers", "suspend", "cus_b"])
        .status
        .success());
    let out = tollgate(dir.path(), &["customers", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "cus_a");
    assert_eq!(list[0]["plan"], "pro");
    assert_eq!(list[1]["plan"], "free", "no plan set: the default");
    assert_eq!(list[1]["suspended"], true);
    assert_eq!(
        list[0]["keys"],
        serde_json::json!({"active": 1, "total": 1})
    );
    let table = text(&tollgate(dir.path(), &["customers", "list"]).stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("CUSTOMER  PLAN  STATUS"), "{table}");
    assert!(
        lines[2].starts_with("cus_b     free  suspended"),
        "aligned: {table}"
    );
    // A suspended customer's keys say so; a key with a distant expiry is
    // active, one within 7 days of it expiring.
    let keys: serde_json::Value =
        serde_json::from_slice(&tollgate(dir.path(), &["keys", "list", "--json"]).stdout).unwrap();
    let status = |c: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["customer"] == c)
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("cus_b"), "suspended");
    assert_eq!(status("cus_a"), "active");
    for (c, expires, want) in [("cus_90d", "90d", "active"), ("cus_3d", "3d", "expiring")] {
        assert!(tollgate(
            dir.path(),
            &["keys", "create", "--customer", c, "--expires", expires]
        )
        .status
        .success());
        let table = text(&tollgate(dir.path(), &["keys", "list", "--customer", c]).stdout);
        let row = table.lines().nth(1).unwrap();
        assert!(row.ends_with(want), "{c}: {table}");
    }
    // Columns line up under their heads, however long the names.
    let long = "cus_with_a_rather_long_customer_identifier_0123456789";
    assert!(
        tollgate(dir.path(), &["keys", "create", "--customer", long])
            .status
            .success()
    );
    let table = text(&tollgate(dir.path(), &["keys", "list"]).stdout);
    let at = table.lines().next().unwrap().find("PLAN").unwrap();
    for line in table.lines().skip(1) {
        let before: String = line.chars().take(at).collect();
        assert!(before.ends_with("  "), "PLAN column misaligned:\n{table}");
    }
    let show = tollgate(dir.path(), &["customers", "show", "cus_a", "--json"]);
    let one: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert!(one["key_ids"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("key_"));
    let out = tollgate(dir.path(), &["customers", "show", "cus_nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no customer `cus_nobody`"),
        "{}",
        text(&out.stderr)
    );
}

/// `run` on a Redis key store checks the records it loads (one read of the
/// store, as with the file store) and refuses them as `check` does.
#[test]
fn run_on_a_redis_store_refuses_what_check_refuses() {
    let redis = tollgate_testkit::RedisServer::start();
    let dir = project();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{}\nupstream: http://127.0.0.1:8000\nkeys: {{ store: redis, prefix: sk_live_ }}\nredis: {{ url: \"{}\" }}\nadmin: {{ listen: 127.0.0.1:{} }}\nmetering: {{ spool_dir: spool }}\n",
            free_port(),
            redis.url(),
            free_port()
        ),
    )
    .unwrap();
    let line = strand_a_customer_then_run(dir.path());
    assert!(line.starts_with("redis "), "named by its store: {line}");
}
