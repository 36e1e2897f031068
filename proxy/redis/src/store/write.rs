//! The writer side of the Redis key store: the changes of one locked
//! read-modify-write turned into Redis commands and announced on the change
//! feed, for the CLI, the admin API and billing webhooks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Cmd;
use tollgate_core::store::{CustomerRecord, KeyRecord, Only, StoreData, StoreError};

use super::{customer_from, k_customer, k_key, k_keyid, load_all, record_from, redis_err};
use crate::conn::RedisConn;
use crate::runtime::RedisRuntime;

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

/// The records `only` names that exist, read one by one, as [`load_all`]
/// would have read them: O(change) instead of O(keys).
async fn load_some(conn: &RedisConn, only: Only<'_>) -> Result<StoreData, StoreError> {
    let p = &conn.config.prefix;
    let mut data = StoreData {
        version: 1,
        ..StoreData::default()
    };
    for id in only.key_ids {
        let hash: Option<String> = conn
            .admin(Cmd::get(k_keyid(p, id)))
            .await
            .map_err(redis_err)?;
        let Some(hash) = hash else { continue };
        let listed: bool = conn
            .admin(Cmd::sismember(format!("{p}:keys"), &hash))
            .await
            .map_err(redis_err)?;
        let f: HashMap<String, String> = conn
            .admin(Cmd::hgetall(k_key(p, &hash)))
            .await
            .map_err(redis_err)?;
        if let Some(rec) = record_from(&hash, f).filter(|r| listed && r.id == *id) {
            data.keys.push(rec);
        }
    }
    for id in only.customers {
        let listed: bool = conn
            .admin(Cmd::sismember(format!("{p}:customers"), *id))
            .await
            .map_err(redis_err)?;
        if listed {
            let f: HashMap<String, String> = conn
                .admin(Cmd::hgetall(k_customer(p, id)))
                .await
                .map_err(redis_err)?;
            data.customers.insert((*id).to_owned(), customer_from(f));
        }
    }
    if only.webhook_events {
        let events: HashMap<String, u64> = conn
            .admin(Cmd::hgetall(format!("{p}:webhook_events")))
            .await
            .map_err(redis_err)?;
        data.webhook_events = events.into_iter().collect();
    }
    Ok(data)
}

impl RedisAdmin {
    /// Applies `f` under the store lock (a `SET NX` key with an expiry), on
    /// the whole store or, given `only`, on just the records it names.
    pub async fn update_with(
        &self,
        only: Option<Only<'_>>,
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
            let old = match only {
                Some(only) => load_some(&self.conn, only).await?,
                None => load_all(&self.conn).await?.1,
            };
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

impl BlockingRedisAdmin {
    fn update_blocking<T: Send>(
        &self,
        only: Option<Only<'_>>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        // `f` runs on the helper thread; it is not required to be Send, so
        // run it here between a read and a write instead.
        let admin = &self.admin;
        let mut f = Some(f);
        let mut out = None;
        let result = self
            .rt
            .block_on(admin.update_with(only, &mut |d: &mut StoreData| {
                let f = f.take().ok_or_else(|| redis_err("update ran twice"))?;
                out = Some(f(d)?);
                Ok(())
            }));
        result.ok_or_else(|| redis_err("runtime failed"))??;
        out.ok_or_else(|| redis_err("update did not run"))
    }
}

impl tollgate_core::store::UpdateStore for BlockingRedisAdmin {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.update_blocking(None, f)
    }

    fn update_only<T: Send>(
        &self,
        only: Only<'_>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.update_blocking(Some(only), f)
    }

    fn data(&self) -> Result<StoreData, StoreError> {
        self.rt
            .block_on(self.admin.data())
            .ok_or_else(|| redis_err("runtime failed"))?
    }
}
