//! Test harness: a mock upstream and a Tollgate proxy, both on free ports
//! inside the test process (the servers themselves are in `tollgate-testkit`). The proxy runs Pingora's `Server::run` with a
//! shutdown signal the harness controls (never `run_forever`, which exits).
//!
//! ```ignore
//! let h = Harness::builder().plans(PLANS).build();
//! let key = h.key("cus_1", Some("pro"));
//! let resp = h.get("/v1/x").bearer_auth(&key).send().await?;
//! ```
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};

use tollgate::app::Keys;
use tollgate::config::Config;
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::store::admin::{self, CreateKey};
pub use tollgate_testkit::*;

/// A new key of `customer` in `dir/keys.db` (prefix `tg_live_`), for the
/// tests that run the `tollgate` binary on a project directory.
pub fn file_key(dir: &std::path::Path, customer: &str) -> String {
    let store = tollgate_core::store::FileStore::open(&dir.join("keys.db")).unwrap();
    admin::create_key(
        &store,
        "tg_live_",
        CreateKey {
            customer,
            plan: None,
            name: None,
            expires: None,
            set_plan: false,
            meta: None,
        },
        SystemClock.now_ms(),
    )
    .unwrap()
    .raw
}

/// The `tollgate` binary running `dir/tollgate.yaml` with `env` set.
pub fn start_binary(dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Child {
    start_binary_with(dir, &[], env)
}

/// [`start_binary`] with more arguments to `tollgate run`.
pub fn start_binary_with(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run", "-c"])
        .arg(dir.join("tollgate.yaml"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "error")
        // A child left behind by a failed assertion must not hold the test
        // runner's output open (scripts/test.sh would wait for it forever).
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `dir`'s plans.yaml and a tollgate.yaml in front of `upstream` (no
/// access log, default metering, then `extra`); returns the proxy's port
/// and the admin port.
pub fn write_project(
    dir: &std::path::Path,
    plans: &str,
    upstream: SocketAddr,
    extra: &str,
) -> (u16, u16) {
    let (port, admin) = (free_port(), free_port());
    std::fs::write(dir.join("plans.yaml"), plans).unwrap();
    std::fs::write(
        dir.join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{upstream}\nadmin: {{ listen: 127.0.0.1:{admin} }}\nthreads: 2\n\
             access_log: {{ enabled: false }}\n{extra}"
        ),
    )
    .unwrap();
    (port, admin)
}

/// Waits (up to 15 s) for a started `tollgate` binary to listen on `port`.
pub fn wait_port(port: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "tollgate did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The body of `GET url` (a port the harness does not own, such as a
/// started binary's admin port).
pub async fn text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// `GET /_tollgate/usage` with `key` of a started binary's proxy on `port`.
pub async fn usage_report(port: u16, key: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/_tollgate/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (up to 20 s) until `stripe` has billed at least `units` of `meter`.
pub async fn wait_billed(stripe: &MockStripe, meter: &str, units: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stripe.total(meter) < units {
        assert!(
            std::time::Instant::now() < deadline,
            "billed {} < {units}",
            stripe.total(meter)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Polls `done` every 50 ms until it holds; fails the test after `secs`.
pub async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub const DEFAULT_PLANS: &str = r#"
default_plan: free
plans:
  free:
    limits:
      - { name: burst, requests: 5, per: second }
      - { name: daily, requests: 100, per: day }
  pro:
    limits:
      - { name: burst, requests: 1000, per: second }
    meter: api_requests
  enterprise:
    limits: []
    meter: api_requests
routes:
  - { match: "GET /health", public: true }
  - { match: "POST /v1/sms/*", cost: 5, meter: sms_sent }
  - { match: "/v1/ai/*", usage_header: X-Usage-Tokens, meter: ai_tokens }
billable_statuses: [2xx]
"#;

pub struct HarnessBuilder {
    /// Files written into the proxy's folder before it starts.
    files: Vec<(PathBuf, Vec<u8>)>,
    clock: Option<Arc<dyn Clock>>,
    plans: String,
    extra: String,
    redis: Option<String>,
    upstream: Option<SocketAddr>,
    env: Vec<(String, String)>,
}

impl HarnessBuilder {
    pub fn plans(mut self, yaml: &str) -> Self {
        self.plans = yaml.to_owned();
        self
    }
    /// Extra top-level lines for tollgate.yaml (e.g. `cors:` or `timeouts:`).
    pub fn config(mut self, yaml: &str) -> Self {
        self.extra.push_str(yaml);
        self.extra.push('\n');
        self
    }
    /// Point the proxy at this address instead of a fresh mock upstream.
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = Some(addr);
        self
    }
    /// Keys and limits in Redis: `redis` is the `redis:` section's inner
    /// YAML, e.g. `url: "redis://127.0.0.1:7001", on_error: local`.
    pub fn redis(mut self, redis: &str) -> Self {
        self.redis = Some(redis.to_owned());
        self
    }

    /// An environment variable the config may name (e.g. a sink's key).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// A file the proxy finds in its folder at start (e.g. a spool's
    /// events), at `path` relative to tollgate.yaml.
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.into(), contents.into()));
        self
    }

    /// The proxy's clock (a shared `ManualClock` freezes windows).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn admin_token(mut self, token: &str) -> Self {
        self.env.push(("TEST_ADMIN_TOKEN".into(), token.into()));
        self
    }

    pub fn build(self) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mock = match self.upstream {
            Some(_) => None,
            None => Some(MockUpstream::start()),
        };
        let upstream = self.upstream.unwrap_or_else(|| mock.as_ref().unwrap().addr);
        let (port, admin_port) = (free_port(), free_port());
        std::fs::write(dir.path().join("plans.yaml"), &self.plans).unwrap();
        for (path, contents) in &self.files {
            let path = dir.path().join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(path, contents).unwrap();
        }
        let backends = match &self.redis {
            Some(r) => format!("keys: {{ store: redis, prefix: tg_test_ }}\nlimits: {{ backend: redis }}\nredis: {{ {r} }}\n"),
            None => "keys: { store: file, path: keys.db, prefix: tg_test_ }\n".to_owned(),
        };
        // The access log goes to the test's own stdout only when a test asks.
        let access = if self.extra.contains("access_log:") {
            ""
        } else {
            "access_log: { enabled: false }\n"
        };
        let config_text = format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{upstream}\nplans: plans.yaml\n{backends}admin: {{ listen: 127.0.0.1:{admin_port}, token_env: TEST_ADMIN_TOKEN }}\nthreads: 2\n{access}{}",
            self.extra
        );
        let config_path = dir.path().join("tollgate.yaml");
        std::fs::write(&config_path, config_text).unwrap();
        let env = self.env.clone();
        let config = Config::load_with_env(&config_path, &move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|d| panic!("test config invalid:\n{d}"));
        let config = Arc::new(config);
        let clock = self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        let (server, app) = tollgate::server::build(config.clone(), clock).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(TestShutdown(tokio::sync::Mutex::new(Some(rx)))),
            });
        });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_port(addr);
        wait_for_port(config.admin.listen);
        // Its own handle, opened as `tollgate keys …` opens it.
        let store = Keys::open(&config).unwrap();
        Harness {
            app,
            addr,
            admin: config.admin.listen,
            config,
            store,
            mock,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            stop: Some(tx),
            thread: Some(thread),
            dir,
        }
    }
}

struct TestShutdown(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for TestShutdown {
    async fn recv(&self) -> ShutdownSignal {
        if let Some(rx) = self.0.lock().await.take() {
            let _ = rx.await;
        }
        ShutdownSignal::FastShutdown
    }
}

pub struct Harness {
    /// The running proxy's state (its key store, limiter, ledger).
    pub app: Arc<tollgate::app::App>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: Arc<Config>,
    /// The store as the CLI writes it.
    pub store: Keys,
    pub mock: Option<MockUpstream>,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder {
            files: Vec::new(),
            clock: None,
            plans: DEFAULT_PLANS.into(),
            extra: String::new(),
            redis: None,
            upstream: None,
            env: Vec::new(),
        }
    }

    pub fn start() -> Harness {
        Self::builder().build()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path))
    }

    /// `n` GETs of `path` with `key`, one after another: their statuses.
    pub async fn get_n(&self, path: &str, key: &str, n: usize) -> Vec<u16> {
        let mut statuses = Vec::with_capacity(n);
        for _ in 0..n {
            let r = self.get(path).bearer_auth(key).send().await.unwrap();
            statuses.push(r.status().as_u16());
        }
        statuses
    }

    /// The status of a GET of `path` with `key`.
    pub async fn status(&self, path: &str, key: &str) -> reqwest::StatusCode {
        self.get(path)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// `GET /_tollgate/usage` with `key`: the consumer's own report.
    pub async fn report(&self, key: &str) -> serde_json::Value {
        usage_report(self.addr.port(), key).await
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Creates a key the way `tollgate keys create` does, and makes the
    /// running proxy see it now (tests of reload latency use their own store).
    pub fn key(&self, customer: &str, plan: Option<&str>) -> String {
        self.key_with_id(customer, plan).0
    }

    pub fn key_with_id(&self, customer: &str, plan: Option<&str>) -> (String, String) {
        let k = create_key(&self.store, &self.config.key_prefix, customer, plan).unwrap();
        self.sync();
        (k.raw, k.record.id)
    }

    /// Makes the proxy re-read the key store now.
    pub fn sync(&self) {
        self.app.reload_keys_blocking().unwrap();
    }

    pub fn keys_path(&self) -> PathBuf {
        self.config.keys_path.clone()
    }

    pub fn upstream_hits(&self) -> u64 {
        self.mock.as_ref().map_or(0, MockUpstream::hits)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Creates a key in `store` the way `tollgate keys create` does (no name,
/// no expiry, no `--set-plan`).
pub fn create_key(
    store: &impl tollgate_core::store::UpdateStore,
    prefix: &str,
    customer: &str,
    plan: Option<&str>,
) -> Result<admin::NewKey, tollgate_core::store::StoreError> {
    let req = CreateKey {
        customer,
        plan,
        name: None,
        expires: None,
        set_plan: false,
        meta: None,
    };
    admin::create_key(store, prefix, req, SystemClock.now_ms())
}
