//! tollgate.yaml as anything an operator (or a broken editor) could write:
//! the config loads, or every problem is reported; never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tollgate::config::Config;
use tollgate_core::diag::Source;

/// Lines of known sections with plausible and implausible values.
fn configs() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "listen: [0-9.:a-z]{0,16}",
        "upstream: (http|https|ftp)://[a-z0-9.:/@]{0,20}",
        "keys: \\{ store: (file|redis|x), prefix: [a-z_ ]{0,10} \\}",
        "limits: \\{ backend: (memory|redis|[a-z]{0,5}) \\}",
        "redis: \\{ (url|nodes): [a-z:/\\[\\]0-9.]{0,20}, on_error: [a-z]{0,6} \\}",
        "admin: \\{ listen: [0-9.:]{0,15}, allowed_hosts: \\[[a-z.]{0,10}\\] \\}",
        "metering: \\{ max_spool_mb: -?[0-9]{0,4}, rollup: [0-9]{0,4}[a-z]{0,2}, sinks: \\[\\{ (stripe|lago|nope): \\{ api_key_env: [A-Z]{0,6} \\} \\}\\] \\}",
        "connections: \\{ max: [0-9]{0,6}, header_timeout: [0-9a-z]{0,5}, max_header_kb: [0-9]{0,5} \\}",
        "cors: \\{ allow_origins: \\[[a-z:/\"*]{0,16}\\] \\}",
        "timeouts: \\{ connect: [0-9a-z]{0,5} \\}",
        "threads: -?[0-9a-z]{0,4}",
        "\\PC{0,30}",
    ];
    proptest::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1500,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/config_properties.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_config_loads_or_says_why(text in configs()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("plans.yaml"),
            "default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 5, per: second }\n",
        )
        .unwrap();
        let src = Source::new(&dir.path().join("tollgate.yaml"), text);
        if let Err(d) = Config::parse(&src, &|_| Some("x".repeat(64))) {
            prop_assert!(!d.0.is_empty(), "a refusal says why");
            for e in &d.0 {
                prop_assert!(e.line >= 1 && e.column >= 1, "{}", e);
            }
        }
    }
}
