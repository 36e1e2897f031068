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

mod write;

use tollgate_core::keys::KeyHash;
use tollgate_core::store::{
    CustomerRecord, Identity, KeyRecord, KeyStore, Snapshot, StoreData, StoreError,
};
pub use write::{BlockingRedisAdmin, RedisAdmin};

/// How long an unknown key is remembered as unknown.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// At most this many unknown keys are remembered; then the memory is reset.
pub const NEGATIVE_CAP: usize = 65_536;
/// How often each instance compares its version with Redis's.
pub const VERSION_POLL: Duration = Duration::from_millis(400);

pub(super) fn k_key(p: &str, hash: &str) -> String {
    format!("{p}:key:{hash}")
}
pub(super) fn k_keyid(p: &str, id: &str) -> String {
    format!("{p}:keyid:{id}")
}
pub(super) fn k_customer(p: &str, id: &str) -> String {
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

pub(crate) fn redis_err(e: impl std::fmt::Display) -> StoreError {
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
