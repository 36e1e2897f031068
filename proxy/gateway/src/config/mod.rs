//! `tollgate.yaml`: read into serde structs (`deny_unknown_fields`, in
//! [`raw`]), then validated into [`Config`], one function per section (in
//! [`sections`], [`redis`], and each billing sink's own parser in
//! `tollgate-metering`). Every problem is collected with file, line, column
//! and a hint; secrets are read only from the env vars the file names;
//! relative paths resolve against the config file; the upstream address is
//! resolved here, once, so nothing resolves DNS on the request path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::diag::{Check, Diagnostic, Diagnostics, Source};
use tollgate_core::plans::Plans;

pub use tollgate_core::clock::parse_duration;
pub use tollgate_core::diag::{process_env, Env};

mod auth;
mod raw;
mod redis;
mod sections;
pub mod store_check;
#[cfg(test)]
mod tests;
mod webhooks;

pub use auth::{Auth, JwksFetch};
use raw::RawConfig;
pub use webhooks::WebhookConfig;

// ---- the validated form ------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Upstream {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Resolved at load.
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Cors {
    /// `*` allows any origin.
    pub allow_origins: Vec<String>,
    pub allow_headers: String,
    pub expose_headers: String,
    pub max_age_secs: u64,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request's `Origin`.
    pub fn allow_origin<'a>(&'a self, origin: Option<&'a str>) -> Option<&'a str> {
        if self.allow_origins.iter().any(|o| o == "*") {
            return Some("*");
        }
        let origin = origin?;
        self.allow_origins
            .iter()
            .any(|o| o == origin)
            .then_some(origin)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token_env: String,
    /// None: the `/admin` JSON API is disabled (metrics and health still serve).
    pub token: Option<String>,
    /// `Host` values the admin port answers (any port). None: loopback
    /// names and addresses when it listens on loopback (so a web page
    /// cannot read it through DNS rebinding), any otherwise.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Admin {
    /// Whether a request with this `Host` header (None: absent) is served.
    pub fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(host) = host else { return true };
        let name = strip_port(host);
        // The address it listens on always names it (`tollgate usage` uses it).
        let ip = name.trim_start_matches('[').trim_end_matches(']');
        if ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip == self.listen.ip())
        {
            return true;
        }
        match &self.allowed_hosts {
            Some(list) => list.iter().any(|h| h.eq_ignore_ascii_case(name)),
            None if self.listen.ip().is_loopback() => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            None => true,
        }
    }
}

/// `host` of `host:port` (`[v6]:port` keeps its brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) =>
        {
            h
        }
        _ => host,
    }
}

#[derive(Debug, Clone)]
pub struct Metering {
    /// Usage is spooled and reported (default); off: counted in memory only.
    pub enabled: bool,
    pub spool_dir: PathBuf,
    /// How often closed windows become records and sinks are fed.
    pub flush_interval: Duration,
    /// At most this much usage is lost on power failure.
    pub fsync_interval: Duration,
    /// The window usage is aggregated over (one record per customer, meter
    /// and window).
    pub rollup: Duration,
    pub max_spool_bytes: u64,
    /// A JSON body (or one event of a stream) read for `usage:` holds at
    /// most this many bytes; past it the route's `cost` is billed.
    pub max_usage_body: usize,
    pub sinks: Vec<tollgate_metering::billing::SinkConfig>,
    /// How long one request to a billing provider may take before it is
    /// retried (under the same identifier).
    pub sink_timeout: Duration,
    /// Seal the spool's files at rest with these keys (`encryption`).
    pub seal: Option<Arc<tollgate_metering::spool::Seal>>,
}

/// Where keys and customers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    File,
    Redis,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub keys_store: StoreKind,
    /// The limiter runs on Redis (else in memory).
    pub redis_limits: bool,
    pub redis: Option<Arc<tollgate_redis::RedisConfig>>,
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub upstream: Upstream,
    pub plans_file: PathBuf,
    pub plans: Arc<Plans>,
    pub keys_path: PathBuf,
    pub key_prefix: String,
    pub admin: Admin,
    pub metering: Metering,
    pub cors: Option<Cors>,
    pub timeouts: Timeouts,
    pub threads: usize,
    /// What a client connection may cost before its first request.
    pub connections: crate::connections::Limits,
    /// The billing providers whose webhooks change plans.
    pub webhooks: Vec<WebhookConfig>,
    /// JWT issuers whose tokens stand in for keys (`auth.jwt`).
    pub auth: Option<Auth>,
    /// The top-level settings as written, for telling what a reload changed.
    pub sections: serde_yaml::Mapping,
    /// A short hash of the config and plans files: names the config in
    /// force (`tollgate_config_info`, the status page).
    pub version: String,
    /// How long SIGTERM waits for in-flight requests and the usage flush.
    pub shutdown_grace: Duration,
    /// Where access log lines go (None: off).
    pub access_log: Option<crate::access_log::Target>,
    /// What `tollgate docs` says about the API, and whether Tollgate
    /// serves the page at `/_tollgate/docs`.
    pub docs: Option<Docs>,
    /// Consumer self-service at Stripe (checkout, portal).
    pub checkout: Option<tollgate_metering::billing::checkout::CheckoutConfig>,
    /// Usage threshold alerts and where they are sent.
    pub alerts: Option<tollgate_metering::alerts::AlertConfig>,
}

/// `docs:`.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    pub title: Option<String>,
    pub description: Option<String>,
    pub support: Option<String>,
    pub example_path: Option<String>,
    pub serve: bool,
}

/// The settings of tollgate.yaml a reload may not change: they are
/// compared as written (variable names, URLs, paths), so a change hidden
/// from `Debug` (a sink's URL, an issuer's key set) is still caught.
/// Plans, CORS (its content), timeouts and webhook mappings follow a reload.
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "tls",
    "upstream",
    "plans",
    "keys",
    "limits",
    "redis",
    "admin",
    "metering",
    "auth",
    "checkout",
    "alerts",
    "docs",
    "access_log",
    "shutdown",
    "threads",
    "connections",
];

/// The settings that differ between `old` and `new` and take a restart.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = RESTART_ONLY
        .iter()
        .copied()
        .filter(|k| old.sections.get(*k) != new.sections.get(*k))
        .collect();
    // Tollgate answers preflights itself only with `cors`: turning it on
    // or off changes the gate.
    if old.cors.is_some() != new.cors.is_some() {
        out.push("cors (turning it on or off)");
    }
    out
}

impl Config {
    /// The endpoint config of `provider`, when its webhooks are followed.
    pub fn webhook(&self, provider: tollgate_core::lifecycle::Provider) -> Option<&WebhookConfig> {
        self.webhooks.iter().find(|w| w.provider == provider)
    }
}

const KNOWN_SETTINGS: &str = "listen, tls, upstream, plans, keys, limits, redis, auth, admin, metering, billing_webhooks, checkout, alerts, docs, access_log, shutdown, cors, timeouts, threads, connections";

impl Config {
    /// Loads and validates the config file and the plans it names.
    pub fn load(file: &Path) -> Result<Config, Diagnostics> {
        Self::load_with_env(file, &process_env)
    }

    /// For commands that use no secret (keys, customers, usage): sink and
    /// spool secrets may be unset; their values are then empty.
    pub fn load_without_secrets(file: &Path) -> Result<Config, Diagnostics> {
        Self::read(file, &process_env, true)
    }

    pub fn load_with_env(file: &Path, env: Env<'_>) -> Result<Config, Diagnostics> {
        Self::read(file, env, false)
    }

    fn read(file: &Path, env: Env<'_>, defer_secrets: bool) -> Result<Config, Diagnostics> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Diagnostics(vec![Diagnostic {
                file: file.to_path_buf(),
                line: 1,
                column: 1,
                message: format!("cannot read config file: {e}"),
                hint: Some("pass the path with -c or TOLLGATE_CONFIG".into()),
            }])
        })?;
        let src = Source::new(file, text);
        Self::parse_with(&src, env, defer_secrets)
    }

    pub fn parse(src: &Source, env: Env<'_>) -> Result<Config, Diagnostics> {
        Self::parse_with(src, env, false)
    }

    fn parse_with(src: &Source, env: Env<'_>, defer_secrets: bool) -> Result<Config, Diagnostics> {
        let mut cx = Check::new(src, env);
        cx.defer_secrets = defer_secrets;
        let (raw, sections) = read_sections(&mut cx)?;
        let listen = cx.addr("listen", raw.listen.as_deref().unwrap_or("0.0.0.0:8080"));
        let tls = raw.tls.as_ref().map(|t| sections::tls(&mut cx, t));
        let upstream = sections::upstream(&mut cx, raw.upstream.as_deref());
        let plans_file = cx.path(raw.plans.as_deref().unwrap_or("plans.yaml"));
        let plans = match Plans::load(&plans_file) {
            Ok(p) => Some(Arc::new(p)),
            Err(d) => {
                cx.d.extend(d);
                None
            }
        };
        let keys = sections::keys(&mut cx, raw.keys.as_ref());
        let redis_limits = sections::limits(&mut cx, raw.limits.as_ref());
        let redis = raw.redis.as_ref().and_then(|r| redis::parse(&mut cx, r));
        if raw.redis.is_none() {
            sections::require_redis(&mut cx, keys.store, redis_limits);
        }
        let webhooks = raw
            .billing_webhooks
            .as_ref()
            .map(|w| webhooks::parse(&mut cx, w, plans.as_deref()))
            .unwrap_or_default();
        let auth = raw.auth.as_ref().and_then(|a| auth::parse(&mut cx, a));
        let version = {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            h.update(src.text.as_bytes());
            h.update(std::fs::read(&plans_file).unwrap_or_default());
            hex::encode(&h.finalize()[..6])
        };
        let shutdown_grace = cx.duration(
            "shutdown.grace",
            raw.shutdown.as_ref().and_then(|s| s.grace.as_deref()),
            Duration::from_secs(10),
        );
        // On by default, to stdout, as a proxy's access log is.
        let access_log = match raw.access_log.as_ref() {
            Some(a) if a.enabled == Some(false) => None,
            Some(a) => Some(match a.to.as_deref() {
                None | Some("stdout") => crate::access_log::Target::Stdout,
                Some(path) => crate::access_log::Target::File(cx.path(path)),
            }),
            None => Some(crate::access_log::Target::Stdout),
        };
        let docs = raw.docs.map(|d| {
            if let Some(p) = &d.example_path {
                if !p.starts_with('/') {
                    cx.err(
                        "docs.example_path",
                        format!("`{p}` is not a path"),
                        Some("e.g. /v1/vat/DE136695976"),
                    );
                }
            }
            Docs {
                title: d.title,
                description: d.description,
                support: d.support,
                example_path: d.example_path,
                serve: d.serve,
            }
        });
        let checkout = raw.checkout.as_ref().and_then(|c| {
            let known = |p: &str| plans.as_ref().is_none_or(|ps| ps.get(p).is_some());
            tollgate_metering::billing::checkout::CheckoutConfig::parse(&mut cx, c, &known)
        });
        let admin = sections::admin(&mut cx, raw.admin.as_ref());
        let metering = sections::metering(&mut cx, raw.metering.as_ref());
        let alerts = raw
            .alerts
            .as_ref()
            .and_then(|a| tollgate_metering::alerts::AlertConfig::parse(&mut cx, a));
        if raw.alerts.is_some() && !metering.enabled {
            cx.err(
                "alerts",
                "alerts are journaled in the usage spool (once per period, across restarts); metering cannot be off",
                None,
            );
        }
        let cors = raw.cors.as_ref().map(|c| sections::cors(&mut cx, c));
        let timeouts = sections::timeouts(&mut cx, raw.timeouts.as_ref());
        let threads = sections::threads(&mut cx, raw.threads);
        let connections = sections::connections(&mut cx, raw.connections.as_ref());
        if let Some(p) = plans.as_deref() {
            credits_need_spool(&mut cx, p, metering.enabled);
        }
        match (listen, upstream, plans, admin) {
            (Some(listen), Some(upstream), Some(plans), Some(admin)) if cx.d.is_empty() => {
                Ok(Config {
                    file: src.file.clone(),
                    keys_store: keys.store,
                    redis_limits,
                    redis,
                    listen,
                    tls,
                    upstream,
                    plans_file,
                    plans,
                    keys_path: keys.path,
                    key_prefix: keys.prefix,
                    admin,
                    metering,
                    cors,
                    timeouts,
                    threads,
                    connections,
                    webhooks,
                    auth,
                    docs,
                    access_log,
                    shutdown_grace,
                    version,
                    sections,
                    checkout,
                    alerts,
                })
            }
            _ => Err(cx.d),
        }
    }
}

/// Charges of credits are journaled in the usage spool (and, with Redis
/// limits, delivered from it to the shared balance): plans with credits
/// need metering on.
fn credits_need_spool(cx: &mut Check<'_>, plans: &Plans, metering: bool) {
    let Some(plan) = plans.plans.values().find(|p| p.credits.is_some()) else {
        return;
    };
    if !metering {
        cx.err(
            "metering.enabled",
            format!(
                "plan `{}` has prepaid credits, which are journaled in the usage spool; metering cannot be off",
                plan.name
            ),
            None,
        );
    }
}

/// The file's top-level mapping, each known section deserialised on its own.
fn read_sections(cx: &mut Check<'_>) -> Result<(RawConfig, serde_yaml::Mapping), Diagnostics> {
    let src = cx.src;
    let top: serde_yaml::Value =
        serde_yaml::from_str(&src.text).map_err(|e| Diagnostics(vec![src.syntax_error(&e)]))?;
    let map = match top {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(Diagnostics(vec![src.error(
                "",
                "the config must be a mapping of settings",
                Some("start with `upstream: http://127.0.0.1:8000`"),
            )]))
        }
    };
    let mut raw = RawConfig::default();
    for (k, v) in &map {
        let Some(key) = k.as_str() else {
            cx.err("", "setting names must be strings", None);
            continue;
        };
        match key {
            "listen" => raw.listen = cx.typed(key, v),
            "tls" => raw.tls = cx.typed(key, v),
            "upstream" => raw.upstream = cx.typed(key, v),
            "plans" => raw.plans = cx.typed(key, v),
            "keys" => raw.keys = cx.typed(key, v),
            "limits" => raw.limits = cx.typed(key, v),
            "redis" => raw.redis = cx.typed(key, v),
            "admin" => raw.admin = cx.typed(key, v),
            "metering" => raw.metering = cx.typed(key, v),
            "billing_webhooks" => raw.billing_webhooks = Some(v.clone()),
            "checkout" => raw.checkout = Some(v.clone()),
            "alerts" => raw.alerts = Some(v.clone()),
            "auth" => raw.auth = cx.typed(key, v),
            "docs" => raw.docs = cx.typed(key, v),
            "access_log" => raw.access_log = cx.typed(key, v),
            "shutdown" => raw.shutdown = cx.typed(key, v),
            "cors" => raw.cors = cx.typed(key, v),
            "timeouts" => raw.timeouts = cx.typed(key, v),
            "threads" => raw.threads = cx.typed(key, v),
            "connections" => raw.connections = cx.typed(key, v),
            other => cx.d.0.push(src.unknown_key(other, KNOWN_SETTINGS)),
        }
    }
    Ok((raw, map))
}
