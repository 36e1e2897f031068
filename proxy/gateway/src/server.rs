//! Assembles a Pingora [`Server`] from a validated [`Config`]: the proxy
//! service, the admin service and the background housekeeping.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::sync::broadcast;

use tollgate_core::clock::{Clock, Millis};
use tollgate_core::metrics;

use crate::admin::AdminApp;
use crate::app::{App, Keys};
use crate::config::Config;
use crate::connections::{GuardedApp, Rearm};
use crate::proxy::TollgateProxy;

/// How often running proxies look for key store changes.
pub const KEY_RELOAD_EVERY: Duration = Duration::from_millis(250);
/// How often the config and plans files are looked at for a change.
pub const CONFIG_WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often idle limiter state is evicted.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Keeps the key snapshot fresh and the limiter's memory bounded.
struct Housekeeping {
    app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut reload = tokio::time::interval(KEY_RELOAD_EVERY);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        let mut sample = tokio::time::interval(crate::admin::status::SAMPLE_EVERY);
        let mut watch = tokio::time::interval(CONFIG_WATCH_EVERY);
        let stamp = |app: &App| {
            let c = &app.config;
            [c.file.clone(), app.live().plans_file.clone()]
                .map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok())
        };
        let mut seen = stamp(&self.app);
        let mut failing = false;
        update_key_gauge(&self.app, self.app.gate.clock.now_ms());
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = sample.tick() => self.app.history.sample(),
                _ = watch.tick() => {
                    // tollgate.yaml or the plans file changed on disk.
                    let now = stamp(&self.app);
                    if now != seen {
                        seen = now;
                        let app = Arc::clone(&self.app);
                        let _ = tokio::task::spawn_blocking(move || app.reload_config()).await;
                    }
                }
                _ = reload.tick() => {
                    // The Redis store follows its own change feed.
                    let Keys::File(store) = &self.app.keys else { continue };
                    let store = Arc::clone(store);
                    // File I/O off the async workers.
                    let result = tokio::task::spawn_blocking(move || store.reload()).await;
                    match result {
                        Ok(Ok(true)) => {
                            failing = false;
                            metrics::CONFIG_RELOADS.with_label_values(&["success"]).inc();
                            update_key_gauge(&self.app, self.app.gate.clock.now_ms());
                            log::info!("key store reloaded");
                        }
                        Ok(Ok(false)) => failing = false,
                        Ok(Err(e)) => {
                            if !failing {
                                metrics::CONFIG_RELOADS.with_label_values(&["error"]).inc();
                                log::error!("key store reload failed, keeping the previous keys: {e}");
                            }
                            failing = true;
                        }
                        Err(e) => log::error!("key store reload task failed: {e}"),
                    }
                }
                _ = sweep.tick() => {
                    // Keys pass from expiring to expired without a store change.
                    update_key_gauge(&self.app, self.app.gate.clock.now_ms());
                    let removed = self.app.gate.limiter.memory().sweep();
                    if removed > 0 {
                        log::debug!("limiter: evicted {removed} idle customers");
                    }
                }
            }
        }
    }
}

fn update_key_gauge(app: &App, now: Millis) {
    for (s, n) in app.gate.keys.snapshot().key_statuses(now) {
        metrics::KEYS.with_label_values(&[s]).set(n);
    }
}

/// Keeps each `jwks_url` issuer's key set fresh: every `jwks_refresh`, and
/// when a token names a `kid` the set lacks, at most once a minute. A
/// failed fetch keeps the last good set (counted and logged). Never on the
/// request path.
struct Jwks {
    fetch: Vec<crate::config::JwksFetch>,
}

/// The least time between two fetches of one key set.
pub const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(60);

#[async_trait]
impl BackgroundService for Jwks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.fetch.is_empty() {
            return;
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let mut last: Vec<Option<std::time::Instant>> = vec![None; self.fetch.len()];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            for (f, last) in self.fetch.iter().zip(last.iter_mut()) {
                let due = match last {
                    None => true,
                    Some(t) => {
                        t.elapsed() >= f.refresh
                            || (f.issuer.wants_refresh() && t.elapsed() >= JWKS_MIN_INTERVAL)
                    }
                };
                if due {
                    *last = Some(std::time::Instant::now());
                    fetch_jwks(&client, f).await;
                }
            }
        }
    }
}

async fn fetch_jwks(client: &reqwest::Client, f: &crate::config::JwksFetch) {
    let name = &*f.issuer.name;
    let got = async {
        let resp = client.get(&f.url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        if body.len() > 1 << 20 {
            return Err("the key set is over 1 MiB".into());
        }
        tollgate_core::jwt::parse_jwks(&body)
    }
    .await;
    match got.map(|set| (f.issuer.set_jwks(&set), set)) {
        Ok((n, _)) if n > 0 => {
            metrics::JWKS_FETCHES
                .with_label_values(&[name, "success"])
                .inc();
            metrics::JWKS_KEYS.with_label_values(&[name]).set(n as i64);
            log::info!("jwt issuer {name}: {n} keys from its jwks_url");
        }
        Ok(_) => {
            metrics::JWKS_FETCHES
                .with_label_values(&[name, "error"])
                .inc();
            log::warn!("jwt issuer {name}: its jwks_url holds no usable key");
        }
        Err(e) => {
            metrics::JWKS_FETCHES
                .with_label_values(&[name, "error"])
                .inc();
            log::warn!(
                "jwt issuer {name}: fetching its jwks_url failed, keeping the last good keys: {e}"
            );
        }
    }
}

/// SIGUSR1 reopens the access log file (logrotate's `postrotate`);
/// SIGHUP re-reads the key store, the config and the plans (systemd's
/// `ExecReload`).
struct Signals {
    app: Arc<App>,
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut usr1), Ok(mut hup)) = (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::hangup()),
        ) else {
            log::warn!("cannot listen for SIGUSR1 and SIGHUP");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = usr1.recv() => {
                    if let Some(log) = &self.app.access_log {
                        log.reopen();
                        log::info!("SIGUSR1: reopening the access log");
                    }
                }
                _ = hup.recv() => {
                    if let Err(e) = self.app.keys.reload().await {
                        metrics::CONFIG_RELOADS.with_label_values(&["error"]).inc();
                        self.app.note_reload(Err(format!("key store: {e}")));
                        log::error!("SIGHUP: the key store could not be re-read, the previous keys stay: {e}");
                        continue;
                    }
                    let app = Arc::clone(&self.app);
                    // Logged and counted by reload_config.
                    let _ = tokio::task::spawn_blocking(move || app.reload_config()).await;
                }
            }
        }
    }
}

/// Rolls usage into records every `flush_interval` and feeds every sink; on
/// shutdown, rolls up everything and gives sinks a few seconds to deliver.
/// When the process is being replaced (SIGQUIT, see [`build_as`]), it
/// instead hands the spool over: once the last request has been recorded
/// it closes the spool, which the new process is waiting to open.
struct Billing {
    app: Arc<App>,
    phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    /// The proxy's open client connections.
    open: Arc<AtomicUsize>,
}

impl Billing {
    /// Whether the server was told to hand its listeners to a new process.
    fn upgrading(&self) -> bool {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rx) = phases.as_mut() else {
            return false;
        };
        loop {
            match rx.try_recv() {
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => return true,
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    }

    /// Waits for the proxy's connections to end (bounded by the shutdown
    /// grace), then closes the spool for the process taking over.
    async fn hand_over(&self, spool: &tollgate_metering::spool::Spool) {
        let left = crate::connections::drained(&self.open, self.app.config.shutdown_grace).await;
        spool.close();
        if left > 0 {
            log::warn!("upgrade: handed the usage spool over with {left} connections still open");
        } else {
            log::info!("upgrade: every request recorded; the usage spool is handed over");
        }
    }
}

/// How long shutdown waits for sinks to deliver what is left (at most half
/// of `shutdown.grace`).
pub const FLUSH_ON_SHUTDOWN: Duration = Duration::from_secs(4);

#[async_trait]
impl BackgroundService for Billing {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(spool) = self.app.spool.clone() else {
            return;
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut loops = Vec::new();
        for cfg in &self.app.config.metering.sinks {
            let sink =
                tollgate_metering::billing::build(cfg, self.app.config.metering.sink_timeout);
            loops.push(tokio::spawn(tollgate_metering::billing::deliver(
                sink,
                spool.clone(),
                stop_rx.clone(),
            )));
        }
        if let Some(cfg) = &self.app.config.alerts {
            let hook = tollgate_metering::alerts::AlertWebhook::new(
                cfg,
                self.app.config.metering.sink_timeout,
            );
            loops.push(tokio::spawn(tollgate_metering::alerts::deliver_alerts(
                Arc::new(hook),
                spool.clone(),
                stop_rx.clone(),
            )));
        }
        if let Some(book) = &self.app.shared_credits {
            loops.push(tokio::spawn(crate::shared_credits::deliver(
                book.clone(),
                stop_rx.clone(),
            )));
        }
        let mut tick = tokio::time::interval(self.app.config.metering.flush_interval);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    spool.rollup(false).await;
                    spool.update_gauges();
                }
            }
        }
        let n = spool.rollup(true).await;
        if self.upgrading() {
            // The new process delivers what is left.
            let _ = stop_tx.send(true);
            for l in loops {
                let _ = l.await;
            }
            self.hand_over(&spool).await;
            return;
        }
        // Half the shutdown grace at most: the rest is for in-flight requests.
        let wait = FLUSH_ON_SHUTDOWN.min(self.app.config.shutdown_grace / 2);
        log::info!(
            "shutting down: {n} usage records rolled up; giving sinks {} ms to deliver",
            wait.as_millis()
        );
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline
            && self
                .app
                .config
                .metering
                .sinks
                .iter()
                .any(|s| !spool.unsettled(s.name(), 1, |_| true).is_empty())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
        for l in loops {
            let _ = l.await;
        }
        // The spool stays open: requests still in flight keep recording
        // until the proxy has drained; its writer syncs on the way out.
        spool.update_gauges();
    }
}

/// How long a binary upgrade waits for the other process: the new one for
/// the old one's SIGQUIT, the old one for the new one to take its listeners.
pub const UPGRADE_WAIT_SECS: usize = 60;
/// Pingora's pause between handing the listeners over and stopping.
const PINGORA_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a running Tollgate hands its listeners to the one replacing it.
pub fn upgrade_socket(config: &Config) -> std::path::PathBuf {
    config.metering.spool_dir.join("upgrade.sock")
}

/// The process id of the Tollgate holding `metering.spool_dir`.
pub fn pid_file(config: &Config) -> std::path::PathBuf {
    config.metering.spool_dir.join("tollgate.pid")
}

/// A server ready to `run`, and the state it serves (for tests and the CLI).
pub fn build(config: Arc<Config>, clock: Arc<dyn Clock>) -> Result<(Server, Arc<App>), String> {
    build_as(config, clock, false)
}

/// [`build`]; with `upgrade`, taking over from the Tollgate running the
/// same config: it receives that process's listeners through
/// [`upgrade_socket`] when that process gets SIGQUIT (Pingora's graceful
/// upgrade), then opens the usage spool once that process has recorded its
/// last request and closed it.
pub fn build_as(
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    upgrade: bool,
) -> Result<(Server, Arc<App>), String> {
    metrics::init();
    let sock = upgrade_socket(&config);
    // sockaddr_un holds 108 bytes; Pingora would panic on a longer path.
    if sock.as_os_str().len() > 100 {
        return Err(format!(
            "the upgrade socket {} is too long a path for a Unix socket: choose a shorter metering.spool_dir",
            sock.display()
        ));
    }
    if upgrade {
        std::fs::create_dir_all(&config.metering.spool_dir)
            .map_err(|e| format!("cannot create {}: {e}", config.metering.spool_dir.display()))?;
    }
    // SIGTERM: stop accepting after a second (Pingora's default waits 300 s
    // for an upgrading process to take the listeners), then give in-flight
    // requests and the usage flush `shutdown.grace`.
    let mut conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(config.shutdown_grace.as_secs().max(1)),
        upgrade_sock: sock.to_string_lossy().into_owned(),
        upgrade_sock_connect_accept_max_retries: Some(UPGRADE_WAIT_SECS),
        ..ServerConf::default()
    };
    conf.upstream_keepalive_pool_size = 256;
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    let phases = server.watch_execution_phase();
    let grace = config.shutdown_grace;
    let app = App::build_with(config.clone(), clock, || {
        // Blocks until the old process sends its listeners (or exits the
        // process after UPGRADE_WAIT_SECS).
        server.bootstrap();
        if upgrade {
            // Its in-flight requests (bounded by the grace), and again as
            // much if it is a Tollgate that keeps the spool until it exits.
            PINGORA_CLOSE_TIMEOUT + 2 * grace + Duration::from_secs(10)
        } else {
            Duration::ZERO
        }
    })?;
    let sinks: Vec<&str> = config.metering.sinks.iter().map(|s| s.name()).collect();
    metrics::expose(
        &config.plans,
        &sinks,
        tollgate_core::limiter::Limiter::name(&*app.gate.limiter),
        config
            .redis
            .as_ref()
            .filter(|_| config.redis_limits)
            .map(|r| r.on_error.as_str()),
        &config
            .webhooks
            .iter()
            .map(|w| w.provider.name())
            .collect::<Vec<_>>(),
    );

    metrics::CONFIG_INFO
        .with_label_values(&[&config.version])
        .set(1);
    metrics::SPOOL_MAX_BYTES
        .set(i64::try_from(config.metering.max_spool_bytes).unwrap_or(i64::MAX));

    let guarded = GuardedApp::new(
        Rearm::new(pingora::proxy::http_proxy(
            &server.configuration,
            TollgateProxy { app: app.clone() },
        )),
        config.connections,
    );
    let open = guarded.open_connections();
    let mut proxy = Service::new("tollgate proxy".to_string(), guarded);
    let listen = config.listen.to_string();
    match &config.tls {
        Some(tls) => proxy
            .add_tls(
                &listen,
                &tls.cert.to_string_lossy(),
                &tls.key.to_string_lossy(),
            )
            .map_err(|e| format!("cannot set up TLS on {listen}: {e}"))?,
        None => proxy.add_tcp(&listen),
    }
    server.add_service(proxy);

    let mut admin = Service::new(
        "tollgate admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(AdminApp::new(app.clone())),
    );
    admin.add_tcp(&config.admin.listen.to_string());
    server.add_service(admin);

    server.add_service(background_service(
        "tollgate billing",
        Billing {
            app: app.clone(),
            phases: std::sync::Mutex::new(Some(phases)),
            open,
        },
    ));
    server.add_service(background_service(
        "tollgate signals",
        Signals { app: app.clone() },
    ));
    server.add_service(background_service(
        "tollgate jwks",
        Jwks {
            fetch: config
                .auth
                .as_ref()
                .map(|a| a.fetch.clone())
                .unwrap_or_default(),
        },
    ));
    server.add_service(background_service(
        "tollgate housekeeping",
        Housekeeping { app: app.clone() },
    ));
    Ok((server, app))
}
