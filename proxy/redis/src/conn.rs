//! The shared Redis connection (single node or cluster), with short
//! timeouts and a circuit breaker so a Redis outage costs one timeout per
//! cool-down, not one per request.

use std::borrow::Borrow;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, RedisResult};
pub use tollgate_core::limiter::OnError;

/// `redis:` from tollgate.yaml, validated.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One URL, or the cluster's seed nodes.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// From the env var `password_env` names, if any.
    pub password: Option<String>,
    pub on_error: OnError,
    /// Per command on the request path; also the connect timeout.
    pub timeout: Duration,
    /// Prefix of every Redis key Tollgate writes.
    pub prefix: String,
}

impl RedisConfig {
    pub fn connection_info(&self, url: &str) -> RedisResult<redis::ConnectionInfo> {
        let info = url.into_connection_info()?;
        Ok(match &self.password {
            Some(p) => {
                let settings = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    }
}

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A multiplexed connection: clones share one pipelined socket per node.
#[derive(Clone)]
pub struct RedisConn {
    inner: Inner,
    timeout: Duration,
    pub breaker: Arc<Breaker>,
    pub config: Arc<RedisConfig>,
}

/// Why a Redis call did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisFailure {
    /// The breaker is open: Redis was not asked.
    Skipped,
    Timeout,
    Error(String),
}

impl std::fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisFailure::Skipped => write!(f, "redis skipped (circuit open)"),
            RedisFailure::Timeout => write!(f, "redis timed out"),
            RedisFailure::Error(e) => write!(f, "redis error: {e}"),
        }
    }
}

/// How long an administrative command (the CLI, reading the whole store)
/// may wait for its answer. Commands on the request path are held to
/// `redis.timeout` by [`RedisConn::query`] and [`RedisConn::script`]
/// themselves; the connection's own deadline is this one, so that loading a
/// million records is not failed by a 100 ms stall (a page-fault storm, a
/// busy core) meant for requests.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

fn admin_timeout(config: &RedisConfig) -> Duration {
    config.timeout.max(ADMIN_TIMEOUT)
}

impl RedisConn {
    /// Connects now; fails if Redis cannot be reached at start-up.
    pub async fn connect(config: Arc<RedisConfig>) -> RedisResult<Self> {
        let inner = if config.cluster {
            let mut nodes = Vec::new();
            for u in &config.urls {
                nodes.push(config.connection_info(u)?);
            }
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(config.timeout)
                .response_timeout(admin_timeout(&config))
                .retries(2)
                .build()?;
            Inner::Cluster(client.get_async_connection().await?)
        } else {
            let url = config
                .urls
                .first()
                .map(String::as_str)
                .unwrap_or("redis://127.0.0.1:6379");
            let client = redis::Client::open(config.connection_info(url)?)?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(admin_timeout(&config)))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            Inner::Single(ConnectionManager::new_with_config(client, cfg).await?)
        };
        Ok(Self {
            inner,
            timeout: config.timeout,
            breaker: Arc::new(Breaker::new(Duration::from_secs(1))),
            config,
        })
    }

    /// Another connection to the same Redis, sharing this one's breaker,
    /// made on the calling runtime: its driver task then runs beside the
    /// requests that use it. Skipped while the breaker is open. A failed
    /// connect is not counted by the breaker: this connection still works.
    pub async fn connect_here(&self) -> Result<Self, RedisFailure> {
        if self.breaker.is_open() {
            return Err(RedisFailure::Skipped);
        }
        let c = match tokio::time::timeout(self.timeout, Self::connect(self.config.clone())).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(RedisFailure::Error(e.to_string())),
            Err(_) => return Err(RedisFailure::Timeout),
        };
        Ok(Self {
            breaker: self.breaker.clone(),
            ..c
        })
    }

    /// A client for pub/sub: the first node (cluster PUBLISH reaches every node).
    pub fn pubsub_client(&self) -> RedisResult<redis::Client> {
        let url = self
            .config
            .urls
            .first()
            .map(String::as_str)
            .unwrap_or("redis://127.0.0.1:6379");
        redis::Client::open(self.config.connection_info(url)?)
    }

    /// Runs one command through the breaker with the configured timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: impl Borrow<Cmd>) -> Result<T, RedisFailure> {
        let cmd = cmd.borrow();
        self.guarded(|c| async move {
            match c {
                Inner::Single(mut m) => cmd.query_async(&mut m).await,
                Inner::Cluster(mut m) => cmd.query_async(&mut m).await,
            }
        })
        .await
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT) through the breaker.
    pub async fn script<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisFailure> {
        self.guarded(|c| async move {
            match c {
                Inner::Single(mut m) => inv.invoke_async(&mut m).await,
                Inner::Cluster(mut m) => inv.invoke_async(&mut m).await,
            }
        })
        .await
    }

    /// Runs a command without the breaker (administration, start-up).
    pub async fn admin<T: FromRedisValue>(&self, cmd: impl Borrow<Cmd>) -> RedisResult<T> {
        let cmd = cmd.borrow();
        match self.inner.clone() {
            Inner::Single(mut m) => cmd.query_async(&mut m).await,
            Inner::Cluster(mut m) => cmd.query_async(&mut m).await,
        }
    }

    /// Runs `cmds` without the breaker (administration, start-up) and
    /// answers in their order: as one pipeline on a single node; on a
    /// cluster one after the other, as their keys may live on other nodes.
    pub async fn admin_each<T: FromRedisValue>(&self, cmds: &[Cmd]) -> RedisResult<Vec<T>> {
        match self.inner.clone() {
            Inner::Single(mut m) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c.clone());
                }
                pipe.query_async(&mut m).await
            }
            Inner::Cluster(mut m) => {
                let mut out = Vec::with_capacity(cmds.len());
                for c in cmds {
                    out.push(c.query_async(&mut m).await?);
                }
                Ok(out)
            }
        }
    }

    /// Runs `f` with the timeout, unless the breaker is open, and tells the
    /// breaker how it went.
    async fn guarded<T, F, Fut>(&self, f: F) -> Result<T, RedisFailure>
    where
        F: FnOnce(Inner) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        if !self.breaker.allow() {
            return Err(RedisFailure::Skipped);
        }
        match tokio::time::timeout(self.timeout, f(self.inner.clone())).await {
            Ok(Ok(v)) => {
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.breaker.failure(&e.to_string());
                Err(RedisFailure::Error(e.to_string()))
            }
            Err(_) => {
                self.breaker.failure("timeout");
                Err(RedisFailure::Timeout)
            }
        }
    }
}

/// Opens after `THRESHOLD` consecutive failures; while open, calls are
/// skipped for `cooldown`, then one probe goes through; a success closes it.
/// Transitions are logged once each, never per request.
pub struct Breaker {
    failures: AtomicU32,
    open: AtomicBool,
    /// Milliseconds since `epoch` before which calls are skipped.
    retry_at: AtomicU64,
    cooldown: Duration,
    epoch: Instant,
}

const THRESHOLD: u32 = 3;

impl Breaker {
    pub fn new(cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
            retry_at: AtomicU64::new(0),
            cooldown,
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether to try Redis now. While open, lets one probe through per cool-down.
    pub fn allow(&self) -> bool {
        if !self.is_open() {
            return true;
        }
        let now = self.now();
        let at = self.retry_at.load(Ordering::Acquire);
        now >= at
            && self
                .retry_at
                .compare_exchange(
                    at,
                    now + self.cooldown.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            log::warn!("redis is reachable again: shared keys and limits are back in force");
        }
    }

    pub fn failure(&self, why: &str) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= THRESHOLD || self.is_open() {
            self.retry_at.store(
                self.now() + self.cooldown.as_millis() as u64,
                Ordering::Release,
            );
            if !self.open.swap(true, Ordering::AcqRel) {
                log::error!(
                    "redis unavailable ({why}); applying redis.on_error until it answers again"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_once_per_cooldown() {
        let b = Breaker::new(Duration::from_millis(50));
        assert!(b.allow());
        b.failure("x");
        b.failure("x");
        assert!(!b.is_open() && b.allow(), "two failures are not an outage");
        b.failure("x");
        assert!(b.is_open());
        assert!(!b.allow(), "open: skip");
        std::thread::sleep(Duration::from_millis(60));
        assert!(b.allow(), "one probe after the cool-down");
        assert!(!b.allow(), "only one");
        b.success();
        assert!(!b.is_open() && b.allow());
    }
}
