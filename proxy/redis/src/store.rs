//! The Redis key store: the same records as the file store, shared by every
//! instance.
//!
//! Layout (prefix `P`, default `tg`):
//! - `P:key:<sha256 hex>`: hash with id, start, customer, name, meta (JSON),
//!   created, expires, revoked; `P:keyid:<id>` → the hash; `P:keys`: set of hashes;
//! - `P:customer:<id>`: hash with plan, suspended, billing and limits (JSON);
//!   `P:customers`: set of ids;
//! - `P:webhook_events`: hash of applied billing webhook deliveries
//!   (`provider:event id` → Unix ms), read and written under the store lock;
//! - `P:version`: incremented on every change, which is also published on
//!   channel `P:changes` as `<version> key <hash>` or `<version> customer <id>`.
//!
//! Each proxy keeps the whole store in memory (a known key costs no round
//! trip), applies published changes as they come, and re-reads everything
//! when it notices a gap in versions (a lost message, a reconnect). A key it
//! does not know is looked up once in Redis and, if absent, remembered as
//! unknown for a while (bounded), so guessed keys cannot hammer Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::Cmd;
use tollgate_core::sync::lock;

use crate::conn::RedisConn;
use tollgate_core::keys::KeyHash;
use tollgate_core::store::{
    CustomerRecord, Identity, KeyRecord, KeyStore, Snapshot, StoreData, StoreError,
};

/// How long an unknown key is remembered as unknown.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// At most this many unknown keys are remembered; then the memory is reset.
pub const NEGATIVE_CAP: usize = 65_536;
/// How often each instance compares its version with Redis's.
pub const VERSION_POLL: Duration = Duration::from_millis(400);

fn k_key(p: &str, hash: &str) -> String {
    format!("{p}:key:{hash}")
}
fn k_keyid(p: &str, id: &str) -> String {
    format!("{p}:keyid:{id}")
}
fn k_customer(p: &str, id: &str) -> String {
    format!("{p}:customer:{id}")
}

fn record_from(hash: &str, fields: &HashMap<String, String>) -> Option<KeyRecord> {
    Some(KeyRecord {
        id: fields.get("id")?.clone(),
        hash: hash.to_owned(),
        start: fields.get("start").cloned().unwrap_or_default(),
        customer: fields.get("customer")?.clone(),
        name: fields.get("name").cloned(),
        meta: fields
            .get("meta")
            .and_then(|m| serde_json::from_str(m).ok()),
        created: fields.get("created").cloned().unwrap_or_default(),
        expires: fields.get("expires").cloned(),
        revoked: fields.get("revoked").cloned(),
    })
}

fn customer_from(fields: &HashMap<String, String>) -> CustomerRecord {
    CustomerRecord {
        plan: fields.get("plan").cloned(),
        suspended: fields.get("suspended").is_some_and(|s| s == "1"),
        // A state this version cannot read is dropped, not fatal: the next
        // webhook writes it again.
        billing: fields
            .get("billing")
            .and_then(|b| serde_json::from_str(b).ok()),
        limits: fields
            .get("limits")
            .and_then(|l| serde_json::from_str(l).ok()),
    }
}

fn redis_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// Reads the whole store.
pub async fn load_all(conn: &RedisConn) -> Result<(u64, StoreData), StoreError> {
    let p = &conn.config.prefix;
    let version: Option<u64> = conn
        .admin(Cmd::get(format!("{p}:version")))
        .await
        .map_err(redis_err)?;
    let hashes: Vec<String> = conn
        .admin(Cmd::smembers(format!("{p}:keys")))
        .await
        .map_err(redis_err)?;
    let ids: Vec<String> = conn
        .admin(Cmd::smembers(format!("{p}:customers")))
        .await
        .map_err(redis_err)?;
    let mut data = StoreData {
        version: 1,
        ..StoreData::default()
    };
    // Many requests in flight on the multiplexed connection at once.
    let mut set = tokio::task::JoinSet::new();
    for chunk in hashes.chunks(256) {
        let (c, chunk, p) = (conn.clone(), chunk.to_vec(), p.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            for h in chunk {
                let f: HashMap<String, String> = c.admin(Cmd::hgetall(k_key(&p, &h))).await?;
                out.push((h, f));
            }
            Ok::<_, redis::RedisError>(out)
        });
    }
    while let Some(r) = set.join_next().await {
        for (h, f) in r.map_err(redis_err)?.map_err(redis_err)? {
            if let Some(rec) = record_from(&h, &f) {
                data.keys.push(rec);
            }
        }
    }
    for id in ids {
        let f: HashMap<String, String> = conn
            .admin(Cmd::hgetall(k_customer(p, &id)))
            .await
            .map_err(redis_err)?;
        data.customers.insert(id, customer_from(&f));
    }
    let events: HashMap<String, u64> = conn
        .admin(Cmd::hgetall(format!("{p}:webhook_events")))
        .await
        .map_err(redis_err)?;
    data.webhook_events = events.into_iter().collect();
    data.keys
        .sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok((version.unwrap_or(0), data))
}

/// Writes the differences between `old` and `new`, then announces them.
async fn write_changes(
    conn: &RedisConn,
    old: &StoreData,
    new: &StoreData,
) -> Result<(), StoreError> {
    let p = &conn.config.prefix;
    let before: HashMap<&str, &KeyRecord> = old.keys.iter().map(|k| (k.hash.as_str(), k)).collect();
    let mut changes = Vec::new();
    for k in &new.keys {
        if before.get(k.hash.as_str()) != Some(&k) {
            write_key(conn, p, k).await?;
            changes.push(format!("key {}", k.hash));
        }
    }
    for (id, c) in &new.customers {
        if old.customers.get(id) != Some(c) {
            write_customer(conn, p, id, c).await?;
            changes.push(format!("customer {id}"));
        }
    }
    // Applied webhook deliveries: one hash, read and written under the
    // store lock only (the proxies' replicas do not need it).
    let events = format!("{p}:webhook_events");
    let added: Vec<(&String, &u64)> = new
        .webhook_events
        .iter()
        .filter(|(id, _)| !old.webhook_events.contains_key(*id))
        .collect();
    if !added.is_empty() {
        conn.admin::<()>(Cmd::hset_multiple(&events, &added))
            .await
            .map_err(redis_err)?;
    }
    let gone: Vec<&String> = old
        .webhook_events
        .keys()
        .filter(|id| !new.webhook_events.contains_key(*id))
        .collect();
    if !gone.is_empty() {
        conn.admin::<()>(Cmd::hdel(&events, gone))
            .await
            .map_err(redis_err)?;
    }
    for change in changes {
        let v: u64 = conn
            .admin(Cmd::incr(format!("{p}:version"), 1))
            .await
            .map_err(redis_err)?;
        conn.admin::<()>(Cmd::publish(
            format!("{p}:changes"),
            format!("{v} {change}"),
        ))
        .await
        .map_err(redis_err)?;
    }
    Ok(())
}

/// A key's hash, its id index and its membership of the key set.
async fn write_key(conn: &RedisConn, p: &str, k: &KeyRecord) -> Result<(), StoreError> {
    let key = k_key(p, &k.hash);
    let mut fields = vec![
        ("id", k.id.clone()),
        ("start", k.start.clone()),
        ("customer", k.customer.clone()),
        ("created", k.created.clone()),
    ];
    let mut absent = Vec::new();
    let meta = k
        .meta
        .as_ref()
        .map(|m| serde_json::Value::from(m.clone()).to_string());
    for (name, v) in [
        ("name", &k.name),
        ("meta", &meta),
        ("expires", &k.expires),
        ("revoked", &k.revoked),
    ] {
        match v {
            Some(v) => fields.push((name, v.clone())),
            None => absent.push(name),
        }
    }
    conn.admin::<()>(Cmd::hset_multiple(&key, &fields))
        .await
        .map_err(redis_err)?;
    if !absent.is_empty() {
        conn.admin::<()>(Cmd::hdel(&key, absent))
            .await
            .map_err(redis_err)?;
    }
    conn.admin::<()>(Cmd::set(k_keyid(p, &k.id), &k.hash))
        .await
        .map_err(redis_err)?;
    conn.admin::<()>(Cmd::sadd(format!("{p}:keys"), &k.hash))
        .await
        .map_err(redis_err)?;
    Ok(())
}

/// A customer's hash and its membership of the customer set.
async fn write_customer(
    conn: &RedisConn,
    p: &str,
    id: &str,
    c: &CustomerRecord,
) -> Result<(), StoreError> {
    let key = k_customer(p, id);
    let mut fields = vec![(
        "suspended",
        if c.suspended { "1".into() } else { "0".into() },
    )];
    let mut absent = Vec::new();
    match &c.plan {
        Some(plan) => fields.push(("plan", plan.clone())),
        None => absent.push("plan"),
    }
    match &c.billing {
        Some(b) => fields.push(("billing", serde_json::to_string(b).map_err(redis_err)?)),
        None => absent.push("billing"),
    }
    match &c.limits {
        Some(l) => fields.push(("limits", serde_json::to_string(l).map_err(redis_err)?)),
        None => absent.push("limits"),
    }
    conn.admin::<()>(Cmd::hset_multiple(&key, &fields))
        .await
        .map_err(redis_err)?;
    if !absent.is_empty() {
        conn.admin::<()>(Cmd::hdel(&key, absent))
            .await
            .map_err(redis_err)?;
    }
    conn.admin::<()>(Cmd::sadd(format!("{p}:customers"), id))
        .await
        .map_err(redis_err)?;
    Ok(())
}

/// The writer side, used by the CLI: the same operations as the file store
/// (`store::admin`), serialised across writers by a lock key.
pub struct RedisAdmin {
    pub conn: RedisConn,
}

impl RedisAdmin {
    /// Applies `f` under the store lock (a `SET NX` key with an expiry).
    pub async fn update_with(
        &self,
        f: &mut (dyn FnMut(&mut StoreData) -> Result<(), StoreError> + Send),
    ) -> Result<(), StoreError> {
        let p = &self.conn.config.prefix;
        let lock = format!("{p}:lock");
        let mut token = [0u8; 12];
        tollgate_core::keys::random_bytes(&mut token).map_err(redis_err)?;
        let token = hex::encode(token);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Cmd::new();
            cmd.arg("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(10_000);
            let got: Option<String> = self.conn.admin(&cmd).await.map_err(redis_err)?;
            if got.is_some() {
                break;
            }
            if Instant::now() > deadline {
                return Err(StoreError::Conflict(
                    "another writer holds the redis store lock".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let result = async {
            let (_, old) = load_all(&self.conn).await?;
            let mut new = old.clone();
            f(&mut new)?;
            write_changes(&self.conn, &old, &new).await?;
            Ok(())
        }
        .await;
        // Release only our own lock.
        let release = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let _: Result<i64, _> = release
            .key(&lock)
            .arg(&token)
            .invoke_async(&mut self.conn_clone())
            .await;
        result
    }

    fn conn_clone(&self) -> AdminConn {
        AdminConn(self.conn.clone())
    }

    pub async fn data(&self) -> Result<StoreData, StoreError> {
        Ok(load_all(&self.conn).await?.1)
    }
}

/// Adapts [`RedisConn`] to redis' `ConnectionLike` for one-off scripts.
struct AdminConn(RedisConn);

impl redis::aio::ConnectionLike for AdminConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move { self.0.admin(cmd).await })
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        _cmd: &'a redis::Pipeline,
        _offset: usize,
        _count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "pipelines are not used here",
            )))
        })
    }
    fn get_db(&self) -> i64 {
        0
    }
}

/// The proxy side: a local replica of the store kept fresh from Redis.
pub struct RedisKeyStore {
    conn: RedisConn,
    mirror: Mutex<StoreData>,
    snapshot: RwLock<Arc<Snapshot>>,
    applied: AtomicU64,
    negative: Mutex<HashMap<KeyHash, Instant>>,
}

impl RedisKeyStore {
    /// Loads everything; fails if Redis cannot be read at start-up.
    pub async fn open(conn: RedisConn) -> Result<Arc<Self>, StoreError> {
        let (version, data) = load_all(&conn).await?;
        let snap = Arc::new(Snapshot::build(&data));
        Ok(Arc::new(Self {
            conn,
            mirror: Mutex::new(data),
            snapshot: RwLock::new(snap),
            applied: AtomicU64::new(version),
            negative: Mutex::new(HashMap::new()),
        }))
    }

    pub fn data(&self) -> StoreData {
        lock(&self.mirror).clone()
    }

    fn rebuild(&self, data: &StoreData) {
        let snap = Arc::new(Snapshot::build(data));
        *tollgate_core::sync::write(&self.snapshot) = snap;
    }

    fn clear_negative(&self) {
        lock(&self.negative).clear();
    }

    /// Re-reads everything (start, gaps, reconnects).
    pub async fn full_reload(&self) -> Result<(), StoreError> {
        let (version, data) = load_all(&self.conn).await?;
        self.rebuild(&data);
        *lock(&self.mirror) = data;
        self.applied.store(version, Ordering::Release);
        self.clear_negative();
        tollgate_core::metrics::CONFIG_RELOADS
            .with_label_values(&["success"])
            .inc();
        Ok(())
    }

    /// Applies one published change: `<version> key <hash>` or `<version> customer <id>`.
    async fn apply(&self, msg: &str) -> Result<(), StoreError> {
        let mut parts = msg.splitn(3, ' ');
        let (Some(v), Some(kind), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(());
        };
        let Ok(v) = v.parse::<u64>() else {
            return Ok(());
        };
        let applied = self.applied.load(Ordering::Acquire);
        if v <= applied {
            return Ok(());
        }
        if v != applied + 1 {
            // A gap: some change was missed.
            return self.full_reload().await;
        }
        let p = &self.conn.config.prefix;
        match kind {
            "key" => {
                let f: HashMap<String, String> = self
                    .conn
                    .admin(Cmd::hgetall(k_key(p, id)))
                    .await
                    .map_err(redis_err)?;
                let rec = record_from(id, &f);
                let mut hash = [0u8; 32];
                if hex::decode_to_slice(id, &mut hash).is_ok() {
                    lock(&self.negative).remove(&hash);
                }
                let data = {
                    let mut m = lock(&self.mirror);
                    m.keys.retain(|k| k.hash != id);
                    if let Some(r) = rec {
                        m.keys.push(r);
                    }
                    m.clone()
                };
                self.rebuild(&data);
            }
            "customer" => {
                let f: HashMap<String, String> = self
                    .conn
                    .admin(Cmd::hgetall(k_customer(p, id)))
                    .await
                    .map_err(redis_err)?;
                let data = {
                    let mut m = lock(&self.mirror);
                    m.customers.insert(id.to_owned(), customer_from(&f));
                    m.clone()
                };
                self.rebuild(&data);
            }
            _ => return self.full_reload().await,
        }
        self.applied.store(v, Ordering::Release);
        Ok(())
    }

    /// Follows `P:changes` and polls `P:version`, for as long as its runtime runs.
    pub async fn follow(self: Arc<Self>) {
        let me = Arc::clone(&self);
        let subscriber = async move {
            let channel = format!("{}:changes", me.conn.config.prefix);
            loop {
                let client = match me.conn.pubsub_client() {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("redis key store: bad pub/sub address: {e}");
                        return;
                    }
                };
                match client.get_async_pubsub().await {
                    Ok(mut ps) => {
                        if ps.subscribe(&channel).await.is_ok() {
                            // Anything published while we were away.
                            if let Err(e) = me.full_reload().await {
                                log::warn!("redis key store: reload failed: {e}");
                            }
                            let mut stream = ps.on_message();
                            while let Some(msg) = stream.next().await {
                                if let Ok(text) = msg.get_payload::<String>() {
                                    if let Err(e) = me.apply(&text).await {
                                        log::warn!("redis key store: cannot apply change: {e}");
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => log::debug!("redis key store: pub/sub connect failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        let me = Arc::clone(&self);
        let poller = async move {
            let key = format!("{}:version", me.conn.config.prefix);
            // The version seen behind at the previous poll, if any.
            let mut behind: Option<u64> = None;
            loop {
                tokio::time::sleep(VERSION_POLL).await;
                let Ok(v) = me.conn.query::<Option<u64>>(&Cmd::get(&key)).await else {
                    continue;
                };
                let v = v.unwrap_or(0);
                let applied = me.applied.load(Ordering::Acquire);
                behind = match behind {
                    _ if v <= applied => None,
                    // The changes seen last time never arrived: messages were lost.
                    Some(prev) if applied < prev => {
                        if let Err(e) = me.full_reload().await {
                            log::warn!("redis key store: reload failed: {e}");
                        }
                        None
                    }
                    _ => Some(v),
                };
            }
        };
        tokio::select! {
            _ = subscriber => {}
            _ = poller => {}
        }
    }

    /// A key missing from the replica: ask Redis once, remember absences.
    pub async fn lookup_miss(
        &self,
        hash: &KeyHash,
        now: u64,
    ) -> Option<Result<Identity, tollgate_core::store::KeyRejection>> {
        {
            let mut neg = lock(&self.negative);
            if let Some(t) = neg.get(hash) {
                if t.elapsed() < NEGATIVE_TTL {
                    return None;
                }
                neg.remove(hash);
            }
        }
        let hex = hex::encode(hash);
        let f: HashMap<String, String> = match self
            .conn
            .query(&Cmd::hgetall(k_key(&self.conn.config.prefix, &hex)))
            .await
        {
            Ok(f) => f,
            // Redis down: the key stays unknown; nothing is remembered.
            Err(_) => return None,
        };
        match record_from(&hex, &f) {
            Some(rec) => {
                let c: HashMap<String, String> = self
                    .conn
                    .query(&Cmd::hgetall(k_customer(
                        &self.conn.config.prefix,
                        &rec.customer,
                    )))
                    .await
                    .ok()?;
                let data = {
                    let mut m = lock(&self.mirror);
                    m.customers.insert(rec.customer.clone(), customer_from(&c));
                    m.keys.retain(|k| k.hash != hex);
                    m.keys.push(rec);
                    m.clone()
                };
                self.rebuild(&data);
                Some(self.snapshot().lookup(hash, now))
            }
            None => {
                let mut neg = lock(&self.negative);
                if neg.len() >= NEGATIVE_CAP {
                    neg.clear();
                }
                neg.insert(*hash, Instant::now());
                None
            }
        }
    }

    pub fn negative_len(&self) -> usize {
        lock(&self.negative).len()
    }
}

impl RedisKeyStore {
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }
}

impl KeyStore for RedisKeyStore {
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&tollgate_core::sync::read(&self.snapshot))
    }

    fn lookup_miss<'a>(
        &'a self,
        hash: &'a KeyHash,
        now: u64,
    ) -> futures_util::future::BoxFuture<
        'a,
        Option<Result<Identity, tollgate_core::store::KeyRejection>>,
    > {
        Box::pin(RedisKeyStore::lookup_miss(self, hash, now))
    }
}

/// A dedicated runtime for Redis connections: their driver tasks live here,
/// so callers on any runtime (Pingora's, a test's, none) can use them.
pub struct RedisRuntime(Option<tokio::runtime::Runtime>);

impl RedisRuntime {
    pub fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-redis")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    /// Runs `fut` to completion from synchronous code, even when called
    /// from inside another runtime (on a scoped helper thread).
    pub fn block_on<F: std::future::Future + Send>(&self, fut: F) -> Option<F::Output>
    where
        F::Output: Send,
    {
        let rt = self.0.as_ref()?;
        std::thread::scope(|s| s.spawn(|| rt.block_on(fut)).join().ok())
    }

    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(rt) = &self.0 {
            rt.spawn(fut);
        }
    }
}

impl Drop for RedisRuntime {
    fn drop(&mut self) {
        // Safe from async contexts, unlike dropping a Runtime.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// [`RedisAdmin`] for synchronous callers (the CLI, tests).
pub struct BlockingRedisAdmin {
    admin: RedisAdmin,
    rt: Arc<RedisRuntime>,
}

impl BlockingRedisAdmin {
    pub fn connect(config: Arc<crate::conn::RedisConfig>) -> Result<Self, StoreError> {
        let rt = RedisRuntime::new().map_err(redis_err)?;
        let conn = rt
            .block_on(RedisConn::connect(config))
            .ok_or_else(|| redis_err("runtime failed"))?
            .map_err(|e| redis_err(format!("cannot connect: {e}")))?;
        Ok(Self {
            admin: RedisAdmin { conn },
            rt: Arc::new(rt),
        })
    }

    /// On a running proxy's own connection and runtime.
    pub fn from_conn(conn: RedisConn, rt: Arc<RedisRuntime>) -> Self {
        Self {
            admin: RedisAdmin { conn },
            rt,
        }
    }
}

impl tollgate_core::store::UpdateStore for BlockingRedisAdmin {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        // `f` runs on the helper thread; it is not required to be Send, so
        // run it here between a read and a write instead.
        let admin = &self.admin;
        let mut f = Some(f);
        let mut out = None;
        let result = self
            .rt
            .block_on(admin.update_with(&mut |d: &mut StoreData| {
                let f = f.take().ok_or_else(|| redis_err("update ran twice"))?;
                out = Some(f(d)?);
                Ok(())
            }));
        result.ok_or_else(|| redis_err("runtime failed"))??;
        out.ok_or_else(|| redis_err("update did not run"))
    }

    fn data(&self) -> Result<StoreData, StoreError> {
        self.rt
            .block_on(self.admin.data())
            .ok_or_else(|| redis_err("runtime failed"))?
    }
}
