//! `tollgate.yaml`: read into serde structs (`deny_unknown_fields`), then
//! validated into [`Config`]. Every problem is collected with file, line,
//! column and a hint; secrets are read only from the env vars the file names;
//! relative paths resolve against the config file; the upstream address is
//! resolved here, once, so nothing resolves DNS on the request path.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::diag::{Diagnostic, Diagnostics, Source};
use crate::plans::Plans;

// ---- the file as written ---------------------------------------------------

/// The top level; each section is deserialised on its own (see
/// [`Config::parse`]) so one broken section does not hide the others.
#[derive(Debug, Default)]
struct RawConfig {
    listen: Option<String>,
    tls: Option<RawTls>,
    upstream: Option<String>,
    plans: Option<String>,
    keys: Option<RawKeys>,
    limits: Option<RawLimits>,
    redis: Option<RawRedis>,
    admin: Option<RawAdmin>,
    metering: Option<RawMetering>,
    billing_webhooks: Option<serde_yaml::Value>,
    cors: Option<RawCors>,
    timeouts: Option<RawTimeouts>,
    threads: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    store: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    backend: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    nodes: Option<Vec<String>>,
    password_env: Option<String>,
    on_error: Option<String>,
    timeout: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetering {
    enabled: Option<bool>,
    spool_dir: Option<String>,
    flush_interval: Option<String>,
    fsync_interval: Option<String>,
    rollup: Option<String>,
    max_spool_mb: Option<u64>,
    #[serde(default)]
    sinks: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStripe {
    name: Option<String>,
    api_key_env: String,
    api: Option<String>,
    base_url: Option<String>,
    stream_url: Option<String>,
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenMeter {
    name: Option<String>,
    url: String,
    token_env: Option<String>,
    source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLago {
    name: Option<String>,
    url: String,
    api_key_env: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Option<String>,
    url: String,
    secret_env: String,
}

/// A billing sink, secrets resolved.
#[derive(Clone)]
pub enum SinkConfig {
    Stripe {
        name: String,
        v2: bool,
        base_url: String,
        stream_url: String,
        api_key: String,
        version: String,
    },
    OpenMeter {
        name: String,
        url: String,
        token: Option<String>,
        source: String,
    },
    Lago {
        name: String,
        url: String,
        api_key: String,
    },
    Webhook {
        name: String,
        url: String,
        secret: String,
    },
}

impl std::fmt::Debug for SinkConfig {
    // Secrets stay out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SinkConfig({})", self.name())
    }
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Stripe { name, .. }
            | SinkConfig::OpenMeter { name, .. }
            | SinkConfig::Lago { name, .. }
            | SinkConfig::Webhook { name, .. } => name,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCors {
    #[serde(default)]
    allow_origins: Vec<String>,
    allow_headers: Option<Vec<String>>,
    expose_headers: Option<Vec<String>>,
    max_age: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect: Option<String>,
    read: Option<String>,
    write: Option<String>,
}

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
    pub sinks: Vec<SinkConfig>,
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
    pub redis: Option<Arc<crate::redis_conn::RedisConfig>>,
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
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `90d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

const KNOWN_SETTINGS: &str = "listen, tls, upstream, plans, keys, limits, redis, admin, metering, billing_webhooks, cors, timeouts, threads";

const DURATION_HINT: &str = "write a number and a unit: ms, s, m, h or d (e.g. 30s)";

/// Where environment variables come from (the process, or a test's map).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

struct Ctx<'a> {
    src: &'a Source,
    dir: PathBuf,
    d: Diagnostics,
}

impl Ctx<'_> {
    fn err(&mut self, path: &str, msg: impl Into<String>, hint: Option<&str>) {
        self.d.0.push(self.src.error(path, msg, hint));
    }
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
    fn addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("`{value}` is not an address like 0.0.0.0:8080"),
                    Some("give an IP and a port; use 0.0.0.0 for all interfaces"),
                );
                None
            }
        }
    }
    fn duration(&mut self, path: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match parse_duration(v).filter(|d| !d.is_zero()) {
                Some(d) => d,
                None => {
                    self.err(
                        path,
                        format!("`{v}` is not a duration"),
                        Some(DURATION_HINT),
                    );
                    default
                }
            },
        }
    }
}

impl Config {
    /// Loads and validates the config file and the plans it names.
    pub fn load(file: &Path) -> Result<Config, Diagnostics> {
        Self::load_with_env(file, &process_env)
    }

    pub fn load_with_env(file: &Path, env: Env<'_>) -> Result<Config, Diagnostics> {
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
        Self::parse(&src, env)
    }

    pub fn parse(src: &Source, env: Env<'_>) -> Result<Config, Diagnostics> {
        let mut d = Diagnostics::default();
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
                d.0.push(src.error("", "setting names must be strings", None));
                continue;
            };
            match key {
                "listen" => raw.listen = src.typed(key, v, &mut d),
                "tls" => raw.tls = src.typed(key, v, &mut d),
                "upstream" => raw.upstream = src.typed(key, v, &mut d),
                "plans" => raw.plans = src.typed(key, v, &mut d),
                "keys" => raw.keys = src.typed(key, v, &mut d),
                "limits" => raw.limits = src.typed(key, v, &mut d),
                "redis" => raw.redis = src.typed(key, v, &mut d),
                "admin" => raw.admin = src.typed(key, v, &mut d),
                "metering" => raw.metering = src.typed(key, v, &mut d),
                "billing_webhooks" => raw.billing_webhooks = Some(v.clone()),
                "cors" => raw.cors = src.typed(key, v, &mut d),
                "timeouts" => raw.timeouts = src.typed(key, v, &mut d),
                "threads" => raw.threads = src.typed(key, v, &mut d),
                other => d.0.push(src.unknown_key(other, KNOWN_SETTINGS)),
            }
        }
        let dir = src
            .file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut cx = Ctx { src, dir, d };

        let listen = cx.addr("listen", raw.listen.as_deref().unwrap_or("0.0.0.0:8080"));

        let tls = raw.tls.as_ref().map(|t| {
            let files = TlsFiles {
                cert: cx.path(&t.cert),
                key: cx.path(&t.key),
            };
            for (field, p) in [("cert", &files.cert), ("key", &files.key)] {
                if !p.is_file() {
                    cx.err(
                        &format!("tls.{field}"),
                        format!("{} does not exist", p.display()),
                        Some("paths are relative to the config file"),
                    );
                }
            }
            files
        });

        let upstream = match raw.upstream.as_deref() {
            None => {
                cx.err(
                    "",
                    "`upstream` is missing",
                    Some("the API to protect, e.g. upstream: http://127.0.0.1:8000"),
                );
                None
            }
            Some(u) => match parse_upstream(u) {
                Ok(up) => Some(up),
                Err((msg, hint)) => {
                    cx.err("upstream", msg, Some(hint));
                    None
                }
            },
        };

        let plans_file = cx.path(raw.plans.as_deref().unwrap_or("plans.yaml"));
        let plans = match Plans::load(&plans_file) {
            Ok(p) => Some(Arc::new(p)),
            Err(d) => {
                cx.d.extend(d);
                None
            }
        };

        let keys = raw.keys.as_ref();
        let keys_store = match keys.and_then(|k| k.store.as_deref()) {
            None | Some("file") => StoreKind::File,
            Some("redis") => StoreKind::Redis,
            Some(other) => {
                cx.err(
                    "keys.store",
                    format!("unknown key store `{other}`"),
                    Some("use file or redis"),
                );
                StoreKind::File
            }
        };
        let keys_path = cx.path(keys.and_then(|k| k.path.as_deref()).unwrap_or("keys.db"));
        let key_prefix = keys
            .and_then(|k| k.prefix.clone())
            .unwrap_or_else(|| "tg_live_".into());
        if !crate::keys::valid_prefix(&key_prefix) {
            cx.err(
                "keys.prefix",
                format!("key prefix `{key_prefix}` must be 1-32 letters, digits, `_` or `-`"),
                Some("e.g. sk_live_"),
            );
        }

        let redis_limits = match raw.limits.as_ref().and_then(|l| l.backend.as_deref()) {
            None | Some("memory") => false,
            Some("redis") => true,
            Some(other) => {
                cx.err(
                    "limits.backend",
                    format!("unknown limiter backend `{other}`"),
                    Some("use memory or redis"),
                );
                false
            }
        };
        let redis = raw
            .redis
            .as_ref()
            .and_then(|r| parse_redis(&mut cx, r, env));
        if redis.is_none() && raw.redis.is_none() {
            if keys_store == StoreKind::Redis {
                cx.err(
                    "keys.store",
                    "`store: redis` needs a `redis:` section",
                    Some("e.g. redis: { url: \"redis://127.0.0.1:6379\" }"),
                );
            }
            if redis_limits {
                cx.err(
                    "limits.backend",
                    "`backend: redis` needs a `redis:` section",
                    Some("e.g. redis: { url: \"redis://127.0.0.1:6379\" }"),
                );
            }
        }
        if raw.billing_webhooks.is_some() {
            cx.err(
                "billing_webhooks",
                "billing webhooks are not available in this version",
                Some("change plans with `tollgate customers set-plan` for now"),
            );
        }

        let admin_listen = raw
            .admin
            .as_ref()
            .and_then(|a| a.listen.clone())
            .unwrap_or_else(|| "127.0.0.1:9090".into());
        let admin_listen = cx.addr("admin.listen", &admin_listen);
        let token_env = raw
            .admin
            .as_ref()
            .and_then(|a| a.token_env.clone())
            .unwrap_or_else(|| "TOLLGATE_ADMIN_TOKEN".into());
        let token = env(&token_env).filter(|t| !t.is_empty());

        let metering = raw.metering.as_ref();
        let spool_dir = cx.path(
            metering
                .and_then(|m| m.spool_dir.as_deref())
                .unwrap_or("data/spool"),
        );
        let flush_interval = cx.duration(
            "metering.flush_interval",
            metering.and_then(|m| m.flush_interval.as_deref()),
            Duration::from_secs(60),
        );
        let fsync_interval = cx.duration(
            "metering.fsync_interval",
            metering.and_then(|m| m.fsync_interval.as_deref()),
            Duration::from_millis(100),
        );
        let rollup = cx.duration(
            "metering.rollup",
            metering.and_then(|m| m.rollup.as_deref()),
            Duration::from_secs(60),
        );
        if !rollup.as_millis().is_multiple_of(1000) || rollup > Duration::from_secs(3600) {
            cx.err(
                "metering.rollup",
                "`rollup` must be whole seconds, at most 1h",
                Some("the default, 60s, makes one billing event per customer, meter and minute"),
            );
        }
        let mut sinks = Vec::new();
        for (i, item) in metering
            .map(|m| m.sinks.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(sink) = parse_sink(&mut cx, &format!("metering.sinks[{i}]"), item, env) {
                if sinks.iter().any(|s: &SinkConfig| s.name() == sink.name()) {
                    cx.err(
                        &format!("metering.sinks[{i}]"),
                        format!("two sinks are named `{}`", sink.name()),
                        Some("give one a `name:`"),
                    );
                }
                sinks.push(sink);
            }
        }
        let metering = Metering {
            enabled: metering.and_then(|m| m.enabled).unwrap_or(true),
            spool_dir,
            flush_interval,
            fsync_interval,
            rollup,
            max_spool_bytes: metering
                .and_then(|m| m.max_spool_mb)
                .unwrap_or(1024)
                .saturating_mul(1 << 20),
            sinks,
        };
        if !metering.enabled && !metering.sinks.is_empty() {
            cx.err("metering.enabled", "sinks need metering enabled", None);
        }

        let cors = raw.cors.as_ref().map(|c| {
            if c.allow_origins.is_empty() {
                cx.err("cors.allow_origins", "`allow_origins` is empty", Some("list origins like https://app.example.com, or \"*\""));
            }
            for (i, o) in c.allow_origins.iter().enumerate() {
                if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                    cx.err(&format!("cors.allow_origins[{i}]"), format!("`{o}` is not an origin"), Some("an origin is scheme://host[:port], e.g. https://app.example.com"));
                }
            }
            let max_age = cx.duration("cors.max_age", c.max_age.as_deref(), Duration::from_secs(600));
            Cors {
                allow_origins: c.allow_origins.clone(),
                allow_headers: c.allow_headers.as_ref().map_or_else(|| "authorization, x-api-key, content-type".into(), |h| h.join(", ")),
                expose_headers: c.expose_headers.as_ref().map_or_else(
                    || "x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, ratelimit, ratelimit-policy, retry-after".into(),
                    |h| h.join(", "),
                ),
                max_age_secs: max_age.as_secs(),
            }
        });

        let t = raw.timeouts.as_ref();
        let timeouts = Timeouts {
            connect: cx.duration(
                "timeouts.connect",
                t.and_then(|t| t.connect.as_deref()),
                Duration::from_secs(5),
            ),
            read: cx.duration(
                "timeouts.read",
                t.and_then(|t| t.read.as_deref()),
                Duration::from_secs(60),
            ),
            write: cx.duration(
                "timeouts.write",
                t.and_then(|t| t.write.as_deref()),
                Duration::from_secs(60),
            ),
        };
        let threads = match raw.threads {
            Some(0) => {
                cx.err("threads", "`threads` must be at least 1", None);
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };

        match (listen, upstream, plans, admin_listen) {
            (Some(listen), Some(upstream), Some(plans), Some(admin_listen)) if cx.d.is_empty() => {
                Ok(Config {
                    file: src.file.clone(),
                    keys_store,
                    redis_limits,
                    redis,
                    listen,
                    tls,
                    upstream,
                    plans_file,
                    plans,
                    keys_path,
                    key_prefix,
                    admin: Admin {
                        listen: admin_listen,
                        token_env,
                        token,
                    },
                    metering,
                    cors,
                    timeouts,
                    threads,
                })
            }
            _ => Err(cx.d),
        }
    }
}

fn parse_redis(
    cx: &mut Ctx<'_>,
    r: &RawRedis,
    env: Env<'_>,
) -> Option<Arc<crate::redis_conn::RedisConfig>> {
    use crate::redis_conn::{OnError, RedisConfig};
    let before = cx.d.0.len();
    let (urls, cluster) = match (&r.url, &r.nodes) {
        (Some(u), None) => (vec![u.clone()], false),
        (None, Some(n)) if !n.is_empty() => (n.clone(), true),
        (Some(_), Some(_)) => {
            cx.err(
                "redis.nodes",
                "give either `url` (one server) or `nodes` (a cluster), not both",
                None,
            );
            (Vec::new(), false)
        }
        _ => {
            cx.err(
                "redis",
                "`redis` needs `url` or `nodes`",
                Some("e.g. url: \"redis://127.0.0.1:6379\""),
            );
            (Vec::new(), false)
        }
    };
    for (i, u) in urls.iter().enumerate() {
        let path = if cluster {
            format!("redis.nodes[{i}]")
        } else {
            "redis.url".to_owned()
        };
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            cx.err(
                &path,
                format!("`{u}` is not a redis:// URL"),
                Some("e.g. redis://10.0.0.5:6379"),
            );
        } else if u.contains('@') {
            cx.err(
                &path,
                "the URL holds credentials; secrets come only from environment variables",
                Some("remove them and set `password_env: REDIS_PASSWORD`"),
            );
        }
    }
    let password = match &r.password_env {
        Some(var) => match env(var).filter(|p| !p.is_empty()) {
            Some(p) => Some(p),
            None => {
                cx.err(
                    "redis.password_env",
                    format!("environment variable {var} is not set"),
                    None,
                );
                None
            }
        },
        None => None,
    };
    let on_error = match r.on_error.as_deref() {
        None => OnError::Local,
        Some(s) => OnError::parse(s).unwrap_or_else(|| {
            cx.err(
                "redis.on_error",
                format!("unknown on_error `{s}`"),
                Some("use local, open or closed"),
            );
            OnError::Local
        }),
    };
    let timeout = cx.duration(
        "redis.timeout",
        r.timeout.as_deref(),
        Duration::from_millis(100),
    );
    let prefix = r.prefix.clone().unwrap_or_else(|| "tg".into());
    if !crate::plans::valid_token(&prefix) {
        cx.err(
            "redis.prefix",
            format!("`{prefix}` may only hold letters, digits, `_`, `-` and `.`"),
            None,
        );
    }
    (cx.d.0.len() == before).then(|| {
        Arc::new(RedisConfig {
            urls,
            cluster,
            password,
            on_error,
            timeout,
            prefix,
        })
    })
}

fn parse_sink(
    cx: &mut Ctx<'_>,
    path: &str,
    item: &serde_yaml::Value,
    env: Env<'_>,
) -> Option<SinkConfig> {
    let map = item.as_mapping().filter(|m| m.len() == 1);
    let Some((kind, body)) = map.and_then(|m| m.iter().next()) else {
        cx.err(
            path,
            "a sink is one of `stripe:`, `openmeter:`, `lago:` or `webhook:` with its settings",
            Some("e.g. - stripe: { api_key_env: STRIPE_API_KEY }"),
        );
        return None;
    };
    let kind = kind.as_str().unwrap_or("");
    let p = format!("{path}.{kind}");
    let secret = |cx: &mut Ctx<'_>, field: &str, var: &str| -> Option<String> {
        let v = env(var).filter(|v| !v.is_empty());
        if v.is_none() {
            cx.err(
                &format!("{p}.{field}"),
                format!("environment variable {var} is not set"),
                Some("secrets come only from the environment"),
            );
        }
        v
    };
    let url_ok = |cx: &mut Ctx<'_>, field: &str, u: &str| {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            cx.err(
                &format!("{p}.{field}"),
                format!("`{u}` is not an http(s) URL"),
                None,
            );
        }
    };
    match kind {
        "stripe" => {
            let r: RawStripe = cx.src.typed(&p, body, &mut cx.d)?;
            let v2 = match r.api.as_deref() {
                None | Some("v1") => false,
                Some("v2") => true,
                Some(other) => {
                    cx.err(
                        &format!("{p}.api"),
                        format!("unknown Stripe API `{other}`"),
                        Some("v1 (meter events) or v2 (meter event stream, for high volume)"),
                    );
                    false
                }
            };
            let base_url = r
                .base_url
                .unwrap_or_else(|| "https://api.stripe.com".into());
            let stream_url = r
                .stream_url
                .unwrap_or_else(|| "https://meter-events.stripe.com".into());
            url_ok(cx, "base_url", &base_url);
            url_ok(cx, "stream_url", &stream_url);
            let api_key = secret(cx, "api_key_env", &r.api_key_env)?;
            Some(SinkConfig::Stripe {
                name: r.name.unwrap_or_else(|| "stripe".into()),
                v2,
                base_url: base_url.trim_end_matches('/').to_owned(),
                stream_url: stream_url.trim_end_matches('/').to_owned(),
                api_key,
                version: r
                    .version
                    .unwrap_or_else(|| crate::billing::STRIPE_VERSION.into()),
            })
        }
        "openmeter" => {
            let r: RawOpenMeter = cx.src.typed(&p, body, &mut cx.d)?;
            url_ok(cx, "url", &r.url);
            let token = match &r.token_env {
                Some(var) => Some(secret(cx, "token_env", var)?),
                None => None,
            };
            Some(SinkConfig::OpenMeter {
                name: r.name.unwrap_or_else(|| "openmeter".into()),
                url: r.url.trim_end_matches('/').to_owned(),
                token,
                source: r.source.unwrap_or_else(|| "tollgate".into()),
            })
        }
        "lago" => {
            let r: RawLago = cx.src.typed(&p, body, &mut cx.d)?;
            url_ok(cx, "url", &r.url);
            let api_key = secret(cx, "api_key_env", &r.api_key_env)?;
            Some(SinkConfig::Lago {
                name: r.name.unwrap_or_else(|| "lago".into()),
                url: r.url.trim_end_matches('/').to_owned(),
                api_key,
            })
        }
        "webhook" => {
            let r: RawWebhook = cx.src.typed(&p, body, &mut cx.d)?;
            url_ok(cx, "url", &r.url);
            let secret = secret(cx, "secret_env", &r.secret_env)?;
            Some(SinkConfig::Webhook {
                name: r.name.unwrap_or_else(|| "webhook".into()),
                url: r.url,
                secret,
            })
        }
        other => {
            cx.err(
                path,
                format!("unknown sink `{other}`"),
                Some("use stripe, openmeter, lago or webhook"),
            );
            None
        }
    }
}

/// `http(s)://host[:port]`, resolved now. No path: Tollgate forwards the
/// request path as it came.
fn parse_upstream(u: &str) -> Result<Upstream, (String, &'static str)> {
    const HINT: &str = "e.g. upstream: http://127.0.0.1:8000 or https://api.internal:443";
    let (tls, rest) = if let Some(r) = u.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = u.strip_prefix("https://") {
        (true, r)
    } else {
        return Err((
            format!("upstream `{u}` must start with http:// or https://"),
            HINT,
        ));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err((
            format!("upstream `{u}` must be scheme://host[:port] with no path or credentials"),
            HINT,
        ));
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(port) if !h.contains(':') || h.starts_with('[') => (h.to_owned(), port),
            _ if authority.starts_with('[') && authority.ends_with(']') => {
                (authority.to_owned(), default_port)
            }
            _ => return Err((format!("upstream `{u}` has a bad port"), HINT)),
        },
        _ => (authority.to_owned(), default_port),
    };
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = (bare.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| {
            (
                format!("cannot resolve upstream host `{bare}`: {e}"),
                "check the name, or use an IP address",
            )
        })?
        .next()
        .ok_or_else(|| {
            (
                format!("upstream host `{bare}` has no address"),
                "check the name, or use an IP address",
            )
        })?;
    Ok(Upstream {
        tls,
        host: bare,
        port,
        addr,
    })
}

#[cfg(test)]
mod tests {
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
}
