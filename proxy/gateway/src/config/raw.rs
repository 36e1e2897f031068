//! `tollgate.yaml` as written: one serde struct per section, each
//! deserialised on its own so one broken section does not hide the others.

use serde::Deserialize;

/// The top level; each section is deserialised on its own (see
/// [`Config::parse`]) so one broken section does not hide the others.
#[derive(Debug, Default)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) upstream: Option<String>,
    pub(super) plans: Option<String>,
    pub(super) keys: Option<RawKeys>,
    pub(super) limits: Option<RawLimits>,
    pub(super) redis: Option<RawRedis>,
    pub(super) admin: Option<RawAdmin>,
    pub(super) metering: Option<RawMetering>,
    /// Read provider by provider in `webhooks.rs`.
    pub(super) billing_webhooks: Option<serde_yaml::Value>,
    pub(super) auth: Option<super::auth::RawAuth>,
    pub(super) docs: Option<RawDocs>,
    pub(super) access_log: Option<RawAccessLog>,
    pub(super) shutdown: Option<RawShutdown>,
    /// Parsed by `tollgate_metering::billing::checkout`.
    pub(super) checkout: Option<serde_yaml::Value>,
    /// Parsed by `tollgate_metering::alerts`.
    pub(super) alerts: Option<serde_yaml::Value>,
    pub(super) cors: Option<RawCors>,
    pub(super) timeouts: Option<RawTimeouts>,
    pub(super) threads: Option<usize>,
    pub(super) connections: Option<RawConnections>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) grace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessLog {
    pub(super) to: Option<String>,
    pub(super) enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDocs {
    pub(super) title: Option<String>,
    pub(super) description: Option<String>,
    pub(super) support: Option<String>,
    pub(super) example_path: Option<String>,
    #[serde(default)]
    pub(super) serve: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnections {
    pub(super) max: Option<usize>,
    pub(super) header_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_header_kb: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKeys {
    pub(super) store: Option<String>,
    pub(super) path: Option<String>,
    pub(super) prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) backend: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) nodes: Option<Vec<String>>,
    pub(super) password_env: Option<String>,
    pub(super) on_error: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetering {
    pub(super) enabled: Option<bool>,
    pub(super) spool_dir: Option<String>,
    pub(super) flush_interval: Option<String>,
    pub(super) fsync_interval: Option<String>,
    pub(super) rollup: Option<String>,
    pub(super) max_spool_mb: Option<u64>,
    pub(super) max_usage_body_kb: Option<u64>,
    pub(super) sink_timeout: Option<String>,
    pub(super) encryption: Option<RawEncryption>,
    #[serde(default)]
    pub(super) sinks: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncryption {
    pub(super) key_env: String,
    pub(super) previous_key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCors {
    #[serde(default)]
    pub(super) allow_origins: Vec<String>,
    pub(super) allow_headers: Option<Vec<String>>,
    pub(super) expose_headers: Option<Vec<String>>,
    pub(super) max_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) connect: Option<String>,
    pub(super) read: Option<String>,
    pub(super) write: Option<String>,
}
