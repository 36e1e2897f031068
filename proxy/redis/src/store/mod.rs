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

use std::collections::{BTreeMap, HashMap};
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

/// A key's record from its hash's fields, taking them (no copy of each).
fn record_from(hash: &str, mut fields: HashMap<String, String>) -> Option<KeyRecord> {
    Some(KeyRecord {
        id: fields.remove("id")?,
        hash: hash.to_owned(),
        start: fields.remove("start").unwrap_or_default(),
        customer: fields.remove("customer")?,
        name: fields.remove("name"),
        meta: fields
            .remove("meta")
            .and_then(|m| serde_json::from_str(&m).ok()),
        created: fields.remove("created").unwrap_or_default(),
        expires: fields.remove("expires"),
        revoked: fields.remove("revoked"),
    })
}

fn customer_from(mut fields: HashMap<String, String>) -> CustomerRecord {
    CustomerRecord {
        plan: fields.remove("plan"),
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

/// Reads of the whole store go to Redis this many at a time.
const LOAD_BATCH: usize = 512;

/// At most this many batches are in flight.
const LOAD_IN_FLIGHT: usize = 4;

/// One batch of [`load_all`]: keys (true) or customers, by hash or id.
type Batch = (bool, Vec<(String, HashMap<String, String>)>);

fn take_batch(
    data: &mut StoreData,
    joined: Result<Result<Batch, redis::RedisError>, tokio::task::JoinError>,
) -> Result<(), StoreError> {
    let (are_keys, read) = joined.map_err(redis_err)?.map_err(redis_err)?;
    for (id, f) in read {
        if !are_keys {
            data.customers.insert(id, customer_from(f));
        } else if let Some(rec) = record_from(&id, f) {
            data.keys.push(rec);
        }
    }
    Ok(())
}

/// A set's members, `SSCAN`ned a few thousand at a time, so that no reply
/// is megabytes long (`SMEMBERS` of a million hashes is 64 MB, which Redis
/// builds in one go while it serves nothing else).
async fn members(conn: &RedisConn, set: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = conn
            .admin(
                redis::cmd("SSCAN")
                    .arg(set)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(LOAD_BATCH * 8),
            )
            .await
            .map_err(redis_err)?;
        out.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SSCAN may return a member twice if the set grows while it scans.
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Reads the whole store.
pub async fn load_all(conn: &RedisConn) -> Result<(u64, StoreData), StoreError> {
    let p = &conn.config.prefix;
    let version: Option<u64> = conn
        .admin(Cmd::get(format!("{p}:version")))
        .await
        .map_err(redis_err)?;
    let hashes = members(conn, &format!("{p}:keys")).await?;
    let ids = members(conn, &format!("{p}:customers")).await?;
    let mut data = StoreData {
        version: 1,
        // Allocated once: grown by doubling, the last copy moves 100 MB
        // at a million records.
        keys: Vec::with_capacity(hashes.len()),
        ..StoreData::default()
    };
    // Pipelines of `LOAD_BATCH` reads, `LOAD_IN_FLIGHT` at a time on the
    // multiplexed connection (enough to keep Redis busy, without queueing
    // every reply at once): a round trip per key, and one customer at a
    // time, took 1.3 s for 10 000 keys.
    let batches = hashes
        .chunks(LOAD_BATCH)
        .map(|c| (true, c))
        .chain(ids.chunks(LOAD_BATCH).map(|c| (false, c)));
    let mut set = tokio::task::JoinSet::new();
    for (are_keys, chunk) in batches {
        if set.len() >= LOAD_IN_FLIGHT {
            if let Some(r) = set.join_next().await {
                take_batch(&mut data, r)?;
            }
        }
        let (c, chunk) = (conn.clone(), chunk.to_vec());
        let cmds: Vec<Cmd> = chunk
            .iter()
            .map(|id| {
                Cmd::hgetall(if are_keys {
                    k_key(p, id)
                } else {
                    k_customer(p, id)
                })
            })
            .collect();
        set.spawn(async move {
            let fields: Vec<HashMap<String, String>> = c.admin_each(&cmds).await?;
            Ok::<_, redis::RedisError>((are_keys, chunk.into_iter().zip(fields).collect()))
        });
    }
    while let Some(r) = set.join_next().await {
        take_batch(&mut data, r)?;
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

/// The replica's copy of the records, indexed by what a published change
/// names, so that applying one costs O(change).
#[derive(Default)]
struct Mirror {
    customers: BTreeMap<String, CustomerRecord>,
    /// By hash (hex).
    keys: HashMap<String, KeyRecord>,
    webhook_events: BTreeMap<String, u64>,
}

impl Mirror {
    fn new(data: StoreData) -> Self {
        Mirror {
            customers: data.customers,
            keys: data.keys.into_iter().map(|k| (k.hash.clone(), k)).collect(),
            webhook_events: data.webhook_events,
        }
    }

    /// The store as [`load_all`] reads it: keys in order of creation.
    fn data(&self) -> StoreData {
        let mut keys: Vec<KeyRecord> = self.keys.values().cloned().collect();
        keys.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        StoreData {
            version: 1,
            customers: self.customers.clone(),
            keys,
            webhook_events: self.webhook_events.clone(),
        }
    }
}

/// The proxy side: a local replica of the store kept fresh from Redis.
/// Each change is applied to the snapshot as a change
/// ([`Snapshot::with_key`], [`Snapshot::with_customer`]), not by rebuilding
/// it: with a million keys that is a copy of one shard instead of a copy of
/// every record and a rebuild of every entry.
pub struct RedisKeyStore {
    conn: RedisConn,
    /// Also serialises changes to `snapshot`.
    mirror: Mutex<Mirror>,
    snapshot: RwLock<Arc<Snapshot>>,
    applied: AtomicU64,
    negative: Mutex<HashMap<KeyHash, Instant>>,
}

impl RedisKeyStore {
    /// Loads everything; fails if Redis cannot be read at start-up.
    pub async fn open(conn: RedisConn) -> Result<Arc<Self>, StoreError> {
        Self::open_inspecting(conn, |_| ()).await
    }

    /// [`open`](Self::open), showing `inspect` the data it read before the
    /// snapshot is built from it: `run` checks the store this way, with one
    /// read of every record instead of two.
    pub async fn open_inspecting(
        conn: RedisConn,
        inspect: impl FnOnce(&StoreData),
    ) -> Result<Arc<Self>, StoreError> {
        let (version, data) = load_all(&conn).await?;
        inspect(&data);
        let snap = Arc::new(Snapshot::build(&data));
        Ok(Arc::new(Self {
            conn,
            mirror: Mutex::new(Mirror::new(data)),
            snapshot: RwLock::new(snap),
            applied: AtomicU64::new(version),
            negative: Mutex::new(HashMap::new()),
        }))
    }

    pub fn data(&self) -> StoreData {
        lock(&self.mirror).data()
    }

    /// Replaces the snapshot by `f` of it; called with the mirror locked,
    /// so changes apply one at a time.
    fn swap(&self, f: impl FnOnce(&Snapshot) -> Snapshot) {
        let next = Arc::new(f(&self.snapshot()));
        *tollgate_core::sync::write(&self.snapshot) = next;
    }

    /// The key of hash `hex` is now `rec` (None: gone).
    fn change_key(&self, hex: &str, rec: Option<KeyRecord>) {
        let mut hash = [0u8; 32];
        let valid = hex::decode_to_slice(hex, &mut hash).is_ok();
        let mut m = lock(&self.mirror);
        if valid {
            self.swap(|s| s.with_key(&hash, rec.as_ref()));
        }
        match rec {
            Some(r) => m.keys.insert(hex.to_owned(), r),
            None => m.keys.remove(hex),
        };
    }

    /// Customer `id` is now `rec`.
    fn change_customer(&self, id: &str, rec: CustomerRecord) {
        let mut m = lock(&self.mirror);
        self.swap(|s| s.with_customer(id, Some(&rec)));
        m.customers.insert(id.to_owned(), rec);
    }

    fn clear_negative(&self) {
        lock(&self.negative).clear();
    }

    /// Re-reads everything (start, gaps, reconnects).
    pub async fn full_reload(&self) -> Result<(), StoreError> {
        let (version, data) = load_all(&self.conn).await?;
        {
            let mut m = lock(&self.mirror);
            self.swap(|_| Snapshot::build(&data));
            *m = Mirror::new(data);
        }
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
                let mut hash = [0u8; 32];
                if hex::decode_to_slice(id, &mut hash).is_ok() {
                    lock(&self.negative).remove(&hash);
                }
                self.change_key(id, record_from(id, f));
            }
            "customer" => {
                let f: HashMap<String, String> = self
                    .conn
                    .admin(Cmd::hgetall(k_customer(p, id)))
                    .await
                    .map_err(redis_err)?;
                self.change_customer(id, customer_from(f));
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
                            // Anything published while we were away (or
                            // since the store was read at start): read
                            // everything again only if the version moved.
                            let version = me
                                .conn
                                .query::<Option<u64>>(&Cmd::get(format!(
                                    "{}:version",
                                    me.conn.config.prefix
                                )))
                                .await;
                            let moved = !matches!(version,
                                Ok(v) if v.unwrap_or(0) == me.applied.load(Ordering::Acquire));
                            if moved {
                                if let Err(e) = me.full_reload().await {
                                    log::warn!("redis key store: reload failed: {e}");
                                }
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
        match record_from(&hex, f) {
            Some(rec) => {
                let c: HashMap<String, String> = self
                    .conn
                    .query(&Cmd::hgetall(k_customer(
                        &self.conn.config.prefix,
                        &rec.customer,
                    )))
                    .await
                    .ok()?;
                self.change_customer(&rec.customer, customer_from(c));
                self.change_key(&hex, Some(rec));
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
