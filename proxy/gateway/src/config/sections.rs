//! Each section of tollgate.yaml but `redis:`, checked into its validated
//! form: one function per section, all errors collected in the [`Check`].

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use tollgate_core::diag::Check;
use tollgate_metering::billing::SinkConfig;

use super::raw::{
    RawAdmin, RawConnections, RawCors, RawEncryption, RawKeys, RawLimits, RawMetering, RawTimeouts,
    RawTls,
};
use super::{Admin, Cors, Metering, StoreKind, Timeouts, TlsFiles, Upstream};
use crate::connections::Limits;
use std::sync::Arc;
use tollgate_metering::spool::seal::parse_key;
use tollgate_metering::spool::Seal;

pub(super) fn tls(cx: &mut Check<'_>, t: &RawTls) -> TlsFiles {
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
}

pub(super) fn upstream(cx: &mut Check<'_>, u: Option<&str>) -> Option<Upstream> {
    match u {
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
    }
}

/// Where keys live and what they look like.
pub(super) struct Keys {
    pub store: StoreKind,
    pub path: PathBuf,
    pub prefix: String,
}

pub(super) fn keys(cx: &mut Check<'_>, keys: Option<&RawKeys>) -> Keys {
    let store = match keys.and_then(|k| k.store.as_deref()) {
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
    let path = cx.path(keys.and_then(|k| k.path.as_deref()).unwrap_or("keys.db"));
    // A typo must not make a new, empty store somewhere else.
    if store == StoreKind::File {
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            cx.err(
                "keys.path",
                format!("the key store's directory {} does not exist", dir.display()),
                Some("keys.path is relative to the config file; create the directory, or fix the path"),
            );
        }
    }
    let prefix = keys
        .and_then(|k| k.prefix.clone())
        .unwrap_or_else(|| "tg_live_".into());
    if !tollgate_core::keys::valid_prefix(&prefix) {
        cx.err(
            "keys.prefix",
            format!("key prefix `{prefix}` must be 1-32 letters, digits, `_` or `-`"),
            Some("e.g. sk_live_"),
        );
    }
    Keys {
        store,
        path,
        prefix,
    }
}

/// Whether the limiter runs on Redis.
pub(super) fn limits(cx: &mut Check<'_>, limits: Option<&RawLimits>) -> bool {
    match limits.and_then(|l| l.backend.as_deref()) {
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
    }
}

/// With no `redis:` section, neither keys nor limits may ask for it.
pub(super) fn require_redis(cx: &mut Check<'_>, store: StoreKind, redis_limits: bool) {
    const HINT: &str = "e.g. redis: { url: \"redis://127.0.0.1:6379\" }";
    if store == StoreKind::Redis {
        cx.err(
            "keys.store",
            "`store: redis` needs a `redis:` section",
            Some(HINT),
        );
    }
    if redis_limits {
        cx.err(
            "limits.backend",
            "`backend: redis` needs a `redis:` section",
            Some(HINT),
        );
    }
}

pub(super) fn admin(cx: &mut Check<'_>, admin: Option<&RawAdmin>) -> Option<Admin> {
    let listen = admin
        .and_then(|a| a.listen.clone())
        .unwrap_or_else(|| "127.0.0.1:9090".into());
    let listen = cx.addr("admin.listen", &listen);
    let token_env = admin
        .and_then(|a| a.token_env.clone())
        .unwrap_or_else(|| "TOLLGATE_ADMIN_TOKEN".into());
    let token = (cx.env)(&token_env).filter(|t| !t.is_empty());
    Some(Admin {
        listen: listen?,
        token_env,
        token,
        allowed_hosts: admin.and_then(|a| a.allowed_hosts.clone()),
    })
}

pub(super) fn metering(cx: &mut Check<'_>, metering: Option<&RawMetering>) -> Metering {
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
    let sinks = sinks(cx, metering.map(|m| m.sinks.as_slice()).unwrap_or_default());
    let seal = metering
        .and_then(|m| m.encryption.as_ref())
        .and_then(|e| encryption(cx, e));
    let sink_timeout = cx.duration(
        "metering.sink_timeout",
        metering.and_then(|m| m.sink_timeout.as_deref()),
        Duration::from_secs(10),
    );
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
        max_usage_body: usize::try_from(
            metering
                .and_then(|m| m.max_usage_body_kb)
                .unwrap_or(1024)
                .clamp(1, 1 << 20)
                .saturating_mul(1024),
        )
        .unwrap_or(usize::MAX),
        sinks,
        sink_timeout,
        seal,
    };
    if metering.max_spool_bytes == 0 {
        cx.err(
            "metering.max_spool_mb",
            "`max_spool_mb` must be at least 1",
            Some("with no room every billable request would get 503; the default is 1024"),
        );
    }
    if !metering.enabled && !metering.sinks.is_empty() {
        cx.err("metering.enabled", "sinks need metering enabled", None);
    }
    metering
}

/// `metering.encryption`: the spool's key (and the previous one while it is
/// rotated), each 32 bytes as 64 hex digits or base64, from the environment.
fn encryption(cx: &mut Check<'_>, e: &RawEncryption) -> Option<Arc<Seal>> {
    let key = |cx: &mut Check<'_>, field: &str, var: &str| {
        let path = format!("metering.encryption.{field}");
        let text = cx.secret(&path, var)?;
        if text.is_empty() {
            return None; // deferred: this command opens no spool
        }
        let key = parse_key(&text);
        if key.is_none() {
            cx.err(
                &path,
                format!("{var} does not hold a 256-bit key"),
                Some("64 hex digits, or 32 bytes in base64 (`openssl rand -base64 32`)"),
            );
        }
        key
    };
    let current = key(cx, "key_env", &e.key_env);
    let previous = match &e.previous_key_env {
        Some(var) => Some(key(cx, "previous_key_env", var)?),
        None => None,
    };
    Some(Arc::new(Seal::new(&current?, previous.as_ref())))
}

/// `metering.sinks`: each parsed by its provider; names must differ.
fn sinks(cx: &mut Check<'_>, items: &[serde_yaml::Value]) -> Vec<SinkConfig> {
    let mut sinks: Vec<SinkConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("metering.sinks[{i}]");
        if let Some(sink) = SinkConfig::parse(cx, &path, item) {
            if sinks.iter().any(|s| s.name() == sink.name()) {
                cx.err(
                    &path,
                    format!("two sinks are named `{}`", sink.name()),
                    Some("give one a `name:`"),
                );
            }
            sinks.push(sink);
        }
    }
    sinks
}

pub(super) fn cors(cx: &mut Check<'_>, c: &RawCors) -> Cors {
    if c.allow_origins.is_empty() {
        cx.err(
            "cors.allow_origins",
            "`allow_origins` is empty",
            Some("list origins like https://app.example.com, or \"*\""),
        );
    }
    for (i, o) in c.allow_origins.iter().enumerate() {
        if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
            cx.err(
                &format!("cors.allow_origins[{i}]"),
                format!("`{o}` is not an origin"),
                Some("an origin is scheme://host[:port], e.g. https://app.example.com"),
            );
        }
    }
    let max_age = cx.duration(
        "cors.max_age",
        c.max_age.as_deref(),
        Duration::from_secs(600),
    );
    Cors {
        allow_origins: c.allow_origins.clone(),
        allow_headers: c.allow_headers.as_ref().map_or_else(
            || "authorization, x-api-key, content-type".into(),
            |h| h.join(", "),
        ),
        expose_headers: c.expose_headers.as_ref().map_or_else(
            || "x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, ratelimit, ratelimit-policy, retry-after, tollgate-credits-remaining, x-request-id".into(),
            |h| h.join(", "),
        ),
        max_age_secs: max_age.as_secs(),
    }
}

pub(super) fn timeouts(cx: &mut Check<'_>, t: Option<&RawTimeouts>) -> Timeouts {
    Timeouts {
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
    }
}

/// `connections:` (all optional; see `connections::Limits` for defaults).
pub(super) fn connections(cx: &mut Check<'_>, c: Option<&RawConnections>) -> Limits {
    let d = Limits::default();
    let max = match c.and_then(|c| c.max) {
        Some(0) => {
            cx.err("connections.max", "`max` must be at least 1", None);
            d.max
        }
        Some(n) => n,
        None => d.max,
    };
    let max_header_kb = match c.and_then(|c| c.max_header_kb) {
        Some(n) if !(1..=1024).contains(&n) => {
            cx.err(
                "connections.max_header_kb",
                "`max_header_kb` must be 1 to 1024",
                Some("Pingora refuses request heads over 1 MiB in any case"),
            );
            d.max_header_bytes / 1024
        }
        Some(n) => n,
        None => d.max_header_bytes / 1024,
    };
    Limits {
        max,
        header_timeout: cx.duration(
            "connections.header_timeout",
            c.and_then(|c| c.header_timeout.as_deref()),
            d.header_timeout,
        ),
        idle_timeout: cx.duration(
            "connections.idle_timeout",
            c.and_then(|c| c.idle_timeout.as_deref()),
            d.idle_timeout,
        ),
        max_header_bytes: max_header_kb * 1024,
    }
}

pub(super) fn threads(cx: &mut Check<'_>, threads: Option<usize>) -> usize {
    match threads {
        Some(0) => {
            cx.err("threads", "`threads` must be at least 1", None);
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    }
}

/// `http(s)://host[:port]`, resolved now. No path: Tollgate forwards the
/// request path as it came.
pub(super) fn parse_upstream(u: &str) -> Result<Upstream, (String, &'static str)> {
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
