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
}
