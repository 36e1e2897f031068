//! The `redis:` section.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::diag::Check;
use tollgate_core::limiter::OnError;
use tollgate_redis::RedisConfig;

use super::raw::RawRedis;

/// `redis:`: one server (`url`) or a cluster (`nodes`), credentials only
/// from the environment.
pub(super) fn parse(cx: &mut Check<'_>, r: &RawRedis) -> Option<Arc<RedisConfig>> {
    let before = cx.d.0.len();
    let (urls, cluster) = urls(cx, r);
    let password = match &r.password_env {
        Some(var) => match (cx.env)(var).filter(|p| !p.is_empty()) {
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
    if !tollgate_core::plans::valid_token(&prefix) {
        cx.err(
            "redis.prefix",
            format!("`{prefix}` may only hold letters, digits, `_`, `-` and `.`"),
            None,
        );
    }
    cx.clean_since(before).then(|| {
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

/// The server's URL, or the cluster's seed nodes; each a `redis://` URL
/// without credentials.
fn urls(cx: &mut Check<'_>, r: &RawRedis) -> (Vec<String>, bool) {
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
    (urls, cluster)
}
