//! The composition root: the only place that picks concrete backends. From
//! a validated [`Config`] it builds the key store, the limiter and the
//! usage spool, and ties them to core's [`Gate`] in the [`App`] that every
//! request, the admin API and the background services share.

use std::sync::Arc;

use tollgate_core::clock::Clock;
use tollgate_core::gate::Gate;
use tollgate_core::limiter::{Decision, Fallback, Limiter, LimiterError, MemoryLimiter};
use tollgate_core::meter::{JournalState, Meter};
use tollgate_core::plans::Plan;
use tollgate_core::store::{
    FileStore, KeyStore, Only, StaticKeys, StoreData, StoreError, StoreText, UpdateStore,
};
use tollgate_core::usage::UsageLedger;
use tollgate_metering::spool::{Spool, SpoolConfig};
use tollgate_redis::{BlockingRedisAdmin, RedisConn, RedisKeyStore, RedisLimiter, RedisRuntime};

use crate::config::{Config, StoreKind};

/// Everything a request needs, shared by all workers.
pub struct App {
    /// The config the process started with: what a reload may not change
    /// (listeners, backends, sinks, secrets) is read from here.
    pub config: Arc<Config>,
    /// The config in force: plans, CORS, timeouts and webhook mappings
    /// follow reloads (see [`App::reload_config`]).
    live: tollgate_core::sync::Shared<Config>,
    pub gate: Gate<Limiters>,
    /// The ledger, the spool and the billable statuses: the metering step.
    pub meter: Meter<Spool>,
    pub keys: Keys,
    /// The durable usage spool (None with `metering.enabled: false`).
    pub spool: Option<Arc<Spool>>,
    /// Consumer self-service at Stripe (`checkout:`).
    pub checkout: Option<tollgate_metering::billing::checkout::StripeCheckout>,
    /// The access log writer (None: `access_log.enabled: false`).
    pub access_log: Option<crate::access_log::AccessLog>,
    /// When this process started (the status page's uptime).
    pub started: std::time::Instant,
    /// The status page's short history of the counters.
    pub history: crate::admin::status::History,
    /// The last reload: when, and its error if it failed.
    last_reload: std::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// Held while a reload runs.
    reloading: std::sync::Mutex<()>,
    /// Checkout and portal sessions per customer and minute.
    pub sessions: crate::own::billing::Throttle,
    /// The consumer docs page, when `docs.serve` (rendered at start and
    /// on each reload).
    pub docs_page: tollgate_core::sync::Shared<Option<crate::own::dashboard::Dashboard>>,
    /// The consumer dashboard page (rendered at start and on each reload).
    pub dashboard: tollgate_core::sync::Shared<crate::own::dashboard::Dashboard>,
    /// Runs the Redis connections' driver tasks while the app lives.
    redis_rt: Option<Arc<RedisRuntime>>,
    /// Credits shared through Redis (Redis limits), whose charges the
    /// billing service delivers there.
    pub shared_credits: Option<Arc<crate::shared_credits::SharedCredits>>,
}

/// The configured key store, and the one handle to it: the proxy reads its
/// snapshot, and the CLI, the admin API and tests write through it.
#[derive(Clone)]
pub enum Keys {
    File(Arc<FileStore>),
    Redis {
        /// The running proxy's local replica (None in the CLI).
        replica: Option<Arc<RedisKeyStore>>,
        admin: Arc<BlockingRedisAdmin>,
    },
}

impl Keys {
    /// The store `config` names, for writing (the CLI): connects to Redis
    /// if the keys live there.
    pub fn open(config: &Config) -> Result<Self, StoreError> {
        match (config.keys_store, &config.redis) {
            (StoreKind::Redis, Some(rc)) => Ok(Keys::Redis {
                replica: None,
                admin: Arc::new(BlockingRedisAdmin::connect(rc.clone())?),
            }),
            _ => Ok(Keys::File(Arc::new(FileStore::unsnapshotted(
                &config.keys_path,
            )))),
        }
    }

    /// The read side the gate looks keys up in.
    pub fn as_key_store(&self) -> Arc<dyn KeyStore> {
        match self {
            Keys::File(f) => f.clone(),
            Keys::Redis {
                replica: Some(r), ..
            } => r.clone(),
            Keys::Redis { replica: None, .. } => Arc::new(StaticKeys(Default::default())),
        }
    }

    /// Re-reads the store now (the Redis replica otherwise follows its
    /// change feed, the file store its watcher).
    pub async fn reload(&self) -> Result<(), StoreError> {
        match self {
            Keys::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.reload().map(|_| ()))
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?
            }
            Keys::Redis {
                replica: Some(r), ..
            } => r.full_reload().await,
            Keys::Redis { replica: None, .. } => Ok(()),
        }
    }
}

impl UpdateStore for Keys {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        match self {
            Keys::File(s) => FileStore::update(s, f),
            Keys::Redis { admin, .. } => admin.update(f),
        }
    }

    fn update_only<T: Send>(
        &self,
        only: Only<'_>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        match self {
            Keys::File(s) => s.update_only(only, f),
            Keys::Redis { admin, .. } => admin.update_only(only, f),
        }
    }

    /// The whole store (a running proxy's Redis store answers from its replica).
    fn data(&self) -> Result<StoreData, StoreError> {
        match self {
            Keys::File(f) => f.data(),
            Keys::Redis {
                replica: Some(r), ..
            } => Ok(r.data()),
            Keys::Redis { admin, .. } => admin.data(),
        }
    }
}

/// The configured limiter: memory, or Redis behind `redis.on_error`.
pub enum Limiters {
    Memory(MemoryLimiter),
    Redis(Fallback<RedisLimiter>),
}

impl Limiters {
    /// The in-process limiter (the whole limiter, or Redis's fallback).
    pub fn memory(&self) -> &MemoryLimiter {
        match self {
            Limiters::Memory(m) | Limiters::Redis(Fallback { local: m, .. }) => m,
        }
    }
}

impl Limiter for Limiters {
    fn name(&self) -> &'static str {
        match self {
            Limiters::Memory(m) => m.name(),
            Limiters::Redis(r) => r.name(),
        }
    }

    fn shared(&self) -> bool {
        matches!(self, Limiters::Redis(_))
    }

    async fn check(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
    ) -> Result<Decision, LimiterError> {
        match self {
            Limiters::Memory(m) => m.check(customer, plan, cost).await,
            Limiters::Redis(r) => r.check(customer, plan, cost).await,
        }
    }

    async fn check_credits(
        &self,
        customer: &Arc<str>,
        plan: &Arc<Plan>,
        cost: u64,
        ask: tollgate_core::limiter::CreditAsk,
    ) -> Result<(Decision, Option<tollgate_core::limiter::CreditAnswer>), LimiterError> {
        match self {
            Limiters::Memory(m) => m.check_credits(customer, plan, cost, ask).await,
            Limiters::Redis(r) => r.check_credits(customer, plan, cost, ask).await,
        }
    }

    fn release(&self, customer: &Arc<str>, plan: &Arc<Plan>, decision: &Decision) {
        match self {
            Limiters::Memory(m) => m.release(customer, plan),
            Limiters::Redis(r) => r.release(customer, plan, decision),
        }
    }
}

impl App {
    /// Builds the shared state, connecting to Redis if configured
    /// (start-up fails with a clear message if it cannot be reached).
    pub fn build(config: Arc<Config>, clock: Arc<dyn Clock>) -> Result<Arc<App>, String> {
        Self::build_with(config, clock, || std::time::Duration::ZERO)
    }

    /// [`App::build`], calling `before_spool` once everything but the
    /// usage spool is ready (a binary upgrade takes the listeners over
    /// there, when nothing else can fail); it returns how long to wait for
    /// the replaced process to release the spool.
    pub fn build_with(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        before_spool: impl FnOnce() -> std::time::Duration,
    ) -> Result<Arc<App>, String> {
        let redis = connect_redis(&config)?;
        let keys = open_keys(&config, redis.as_ref())?;
        let limiter = limiter(&config, redis.as_ref().map(|(_, c)| c.clone()), &clock)?;
        let usage = Arc::new(UsageLedger::new(clock.clone(), Vec::new()));
        let wait = before_spool();
        let spool = open_spool(&config, &usage, &clock, wait)?;
        // With Redis limits, balances live in Redis (charges go there
        // from the spool; see shared_credits.rs).
        let shared_credits = match (&redis, &spool) {
            (Some((rt, conn)), Some(sp)) if config.redis_limits => {
                Some(Arc::new(crate::shared_credits::SharedCredits {
                    redis: tollgate_redis::RedisCredits::new(conn.clone()),
                    spool: sp.clone(),
                    rt: rt.clone(),
                    alerts: config
                        .alerts
                        .as_ref()
                        .map(|_| sp.clone() as Arc<dyn tollgate_core::alerts::AlertJournal>),
                }))
            }
            _ => None,
        };
        let gate = Gate {
            plans: tollgate_core::sync::Shared::new(config.plans.clone()),
            keys: keys.as_key_store(),
            limiter: Arc::new(limiter),
            clock,
            prefix: config.key_prefix.clone(),
            answer_preflights: config.cors.is_some(),
            journal: spool.clone().map(|s| {
                Arc::new(move || s.state()) as Arc<dyn Fn() -> JournalState + Send + Sync>
            }),
            jwt: config.auth.as_ref().map(|a| a.verifier.clone()),
            credits: match &shared_credits {
                Some(book) => Some(book.clone() as Arc<dyn tollgate_core::credits::CreditBook>),
                None => spool
                    .clone()
                    .map(|s| s as Arc<dyn tollgate_core::credits::CreditBook>),
            },
            alerts: spool
                .clone()
                .filter(|_| config.alerts.is_some())
                .map(|s| s as Arc<dyn tollgate_core::alerts::AlertJournal>),
            holds: Default::default(),
        };
        // On the memory backend the day and month counters live here: the
        // spool journals their charges and gives them back on start.
        let calendar = matches!(*gate.limiter, Limiters::Memory(_)) && spool.is_some();
        if let (Limiters::Memory(m), Some(sp)) = (&*gate.limiter, &spool) {
            let counters = sp.calendar_counters();
            for c in &counters {
                m.restore(&c.customer, &c.limit, c.window, c.start, c.used);
            }
            if !counters.is_empty() {
                log::info!(
                    "restored {} day and month counters from the usage spool",
                    counters.len()
                );
            }
        }
        let meter = Meter {
            ledger: usage,
            journal: spool.clone(),
            billable: tollgate_core::sync::Shared::new(Arc::new(config.plans.billable.clone())),
            calendar,
        };
        let checkout = config.checkout.clone().map(|c| {
            tollgate_metering::billing::checkout::StripeCheckout::new(
                c,
                config.metering.sink_timeout,
            )
        });
        let access_log = match &config.access_log {
            Some(t) => Some(
                crate::access_log::AccessLog::start(t.clone())
                    .map_err(|e| format!("cannot open the access log {t:?}: {e}"))?,
            ),
            None => None,
        };
        Ok(Arc::new(App {
            live: tollgate_core::sync::Shared::new(config.clone()),
            access_log,
            checkout,
            dashboard: tollgate_core::sync::Shared::new(Arc::new(
                crate::own::dashboard::Dashboard::new(&config),
            )),
            docs_page: tollgate_core::sync::Shared::new(Arc::new(
                crate::own::dashboard::docs_page(&config),
            )),
            sessions: Default::default(),
            started: std::time::Instant::now(),
            history: Default::default(),
            last_reload: std::sync::Mutex::new(None),
            reloading: std::sync::Mutex::new(()),
            spool,
            config,
            gate,
            meter,
            keys,
            redis_rt: redis.map(|(rt, _)| rt),
            shared_credits,
        }))
    }

    /// The config in force.
    pub fn live(&self) -> Arc<Config> {
        self.live.load()
    }

    /// Re-reads tollgate.yaml and its plans file, validates them as
    /// `tollgate check` does, and swaps them in at once: requests in flight
    /// finish on the plans they started with; limits keeping their name and
    /// window keep what was used. Nothing changes when the files have an
    /// error or change what takes a restart. Counted and noted either way.
    pub fn reload_config(&self) -> Result<String, String> {
        let result = self.try_reload_config();
        let label = if result.is_ok() { "success" } else { "error" };
        tollgate_core::metrics::CONFIG_RELOADS
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(v) => log::info!("config reloaded: version {v} in force"),
            Err(e) => {
                log::error!("config reload refused, the previous config stays in force:\n{e}")
            }
        }
        self.note_reload(result.clone().map(|_| ()));
        result
    }

    fn try_reload_config(&self) -> Result<String, String> {
        // One reload at a time (the file watcher, SIGHUP, the admin API).
        let _one = tollgate_core::lock(&self.reloading);
        let new = Config::load(&self.config.file).map_err(|d| d.to_string())?;
        let changed = crate::config::needs_restart(&self.config, &new);
        if !changed.is_empty() {
            return Err(format!(
                "{}: these settings take a restart ({}); nothing was applied",
                self.config.file.display(),
                changed.join(", ")
            ));
        }
        let old = self.live();
        self.gate.plans.store(new.plans.clone());
        self.meter
            .billable
            .store(Arc::new(new.plans.billable.clone()));
        let _ = tollgate_core::metrics::CONFIG_INFO.remove_label_values(&[&old.version]);
        // The new plans' series exist from the start, as at start-up.
        let sinks: Vec<&str> = new.metering.sinks.iter().map(|s| s.name()).collect();
        let providers: Vec<&str> = new.webhooks.iter().map(|w| w.provider.name()).collect();
        tollgate_core::metrics::expose(
            &new.plans,
            &sinks,
            tollgate_core::limiter::Limiter::name(&*self.gate.limiter),
            new.redis
                .as_ref()
                .filter(|_| new.redis_limits)
                .map(|r| r.on_error.as_str()),
            &providers,
        );
        tollgate_core::metrics::CONFIG_INFO
            .with_label_values(&[&new.version])
            .set(1);
        // The pages show the plans (and their prices) in force.
        self.dashboard
            .store(Arc::new(crate::own::dashboard::Dashboard::new(&new)));
        self.docs_page
            .store(Arc::new(crate::own::dashboard::docs_page(&new)));
        let version = new.version.clone();
        self.live.store(Arc::new(new));
        Ok(version)
    }

    /// Notes a reload (admin, SIGHUP) for the status page.
    pub fn note_reload(&self, result: Result<(), String>) {
        *tollgate_core::lock(&self.last_reload) = Some((std::time::Instant::now(), result));
    }

    pub fn last_reload(&self) -> Option<(std::time::Instant, Result<(), String>)> {
        tollgate_core::lock(&self.last_reload).clone()
    }

    /// Makes this instance see the key store as it is now, from synchronous
    /// code (tests, after writing through [`App::keys`]).
    pub fn reload_keys_blocking(&self) -> Result<(), StoreError> {
        match (&self.keys, &self.redis_rt) {
            (Keys::File(f), _) => f.reload().map(|_| ()),
            (keys, Some(rt)) => {
                let keys = keys.clone();
                rt.block_on(async move { keys.reload().await })
                    .ok_or_else(|| StoreError::Unavailable("the redis runtime stopped".into()))?
            }
            (_, None) => Ok(()),
        }
    }
}

type Redis = (Arc<RedisRuntime>, RedisConn);

/// The runtime and the start-up connection, when keys or limits use Redis.
fn connect_redis(config: &Config) -> Result<Option<Redis>, String> {
    let uses_redis = config.keys_store == StoreKind::Redis || config.redis_limits;
    let Some(rc) = config.redis.as_ref().filter(|_| uses_redis) else {
        return Ok(None);
    };
    let rt = RedisRuntime::new().map_err(|e| format!("cannot start the redis runtime: {e}"))?;
    let conn = rt
        .block_on(RedisConn::connect(rc.clone()))
        .ok_or("the redis runtime failed")?
        .map_err(|e| format!("cannot connect to redis at {}: {e}", rc.urls.join(", ")))?;
    Ok(Some((Arc::new(rt), conn)))
}

fn open_keys(config: &Config, redis: Option<&Redis>) -> Result<Keys, String> {
    match (config.keys_store, redis) {
        (StoreKind::Redis, Some((rt, conn))) => {
            // Checked on the data the replica reads as it opens, as the
            // file store is below.
            let path = crate::config::store_check::store_name(config);
            let mut problems = Vec::new();
            let open = RedisKeyStore::open_inspecting(conn.clone(), |data| {
                problems = crate::config::store_check::problems(config, data, &path, |_| None);
            });
            let store = rt
                .block_on(open)
                .ok_or("the redis runtime failed")?
                .map_err(|e| format!("cannot load keys from redis: {e}"))?;
            crate::config::store_check::refuse_on(problems, &config.file)?;
            rt.spawn(Arc::clone(&store).follow());
            Ok(Keys::Redis {
                replica: Some(store),
                admin: Arc::new(BlockingRedisAdmin::from_conn(conn.clone(), rt.clone())),
            })
        }
        _ => {
            // Checked record by record as the store loads (`tollgate run`
            // does not read the files a second time to check them).
            let path = crate::config::store_check::store_name(config);
            // The files' text is read only when a problem is to be located.
            let text = std::cell::OnceCell::new();
            let mut check = crate::config::store_check::Checker::new(config, &path, |needle| {
                text.get_or_init(|| StoreText::read(&config.keys_path))
                    .locate(needle)
            });
            let store = FileStore::open_inspecting(&config.keys_path, &mut check)
                .map_err(|e| e.to_string())?;
            let problems = check.errors();
            crate::config::store_check::refuse_on(problems, &config.file)?;
            Ok(Keys::File(Arc::new(store)))
        }
    }
}

fn limiter(
    config: &Config,
    conn: Option<RedisConn>,
    clock: &Arc<dyn Clock>,
) -> Result<Limiters, String> {
    Ok(match (&config.redis, conn) {
        (Some(rc), Some(conn)) if config.redis_limits => Limiters::Redis(Fallback {
            primary: RedisLimiter::new(conn, clock.clone()).map_err(|e| e.to_string())?,
            local: MemoryLimiter::new(clock.clone()),
            on_error: rc.on_error,
        }),
        _ => Limiters::Memory(MemoryLimiter::new(clock.clone())),
    })
}

/// The usage spool as `metering` configures it.
pub fn spool_config(config: &Config) -> SpoolConfig {
    let m = &config.metering;
    SpoolConfig {
        dir: m.spool_dir.clone(),
        fsync_interval: m.fsync_interval,
        max_bytes: m.max_spool_bytes,
        rollup: m.rollup.as_millis() as u64,
        sinks: m.sinks.iter().map(|s| s.name().to_owned()).collect(),
        seal: m.seal.clone(),
        alerts: config
            .alerts
            .as_ref()
            .map(|a| a.at.clone())
            .unwrap_or_default(),
        shared_credits: config.redis_limits,
    }
}

fn open_spool(
    config: &Config,
    usage: &UsageLedger,
    clock: &Arc<dyn Clock>,
    wait: std::time::Duration,
) -> Result<Option<Arc<Spool>>, String> {
    let m = &config.metering;
    if !m.enabled {
        return Ok(None);
    }
    let spool = Spool::open_waiting(spool_config(config), clock.clone(), wait)
        .map_err(|e| format!("cannot open the usage spool: {e}"))?;
    // /_tollgate/usage counts what was recorded before a restart too.
    for ((customer, meter), units) in spool.recorded_this_month() {
        usage.seed(&customer, &meter, units);
    }
    Ok(Some(spool))
}
