//! Key and customer storage. The proxy looks keys up in an in-memory
//! [`Snapshot`]; backends keep that snapshot fresh. The file store (the
//! embedded default) is a JSON document written atomically (lock, temp file,
//! fsync, rename) and re-read by running proxies within ~250 ms of a change.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::clock::{parse_rfc3339, rfc3339, Millis};
use crate::keys::{self, KeyHash};

/// A stored key: never the key itself, only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: String,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    /// Prefix and first 4 characters, for humans telling keys apart.
    pub start: String,
    pub customer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct CustomerRecord {
    /// None: the default plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

/// The whole store.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreData {
    pub version: u32,
    #[serde(default)]
    pub customers: BTreeMap<String, CustomerRecord>,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// Who a valid key belongs to, resolved when the snapshot is built so a
/// lookup touches one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: Arc<str>,
    pub customer: Arc<str>,
    /// None: the default plan.
    pub plan: Option<Arc<str>>,
    pub suspended: bool,
}

/// What a successful lookup returns; cheap to clone.
pub type Identity = Arc<KeyInfo>;

/// Why a well-formed key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRejection {
    Unknown,
    Revoked,
    Expired,
}

#[derive(Debug)]
struct Entry {
    hash: KeyHash,
    expires: Option<Millis>,
    revoked: bool,
    info: Identity,
}

/// The first 8 bytes of a SHA-256 are already uniformly distributed: they
/// index the key map as they are, with no second hash.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PassThroughMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<PassThrough>>;

/// An immutable, indexed view of the store for the hot path.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Indexed by the first 8 bytes of the hash; the full hash is then
    /// compared in constant time. Keys sharing those 8 bytes (never seen in
    /// practice) go to `overflow`.
    keys: PassThroughMap<Entry>,
    overflow: Vec<Entry>,
    customers: HashMap<Arc<str>, (Option<Arc<str>>, bool)>,
    pub key_count: usize,
}

fn bucket(hash: &KeyHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

impl Snapshot {
    pub fn build(data: &StoreData) -> Self {
        let mut s = Snapshot::default();
        for (id, c) in &data.customers {
            s.customers.insert(
                id.as_str().into(),
                (c.plan.as_deref().map(Into::into), c.suspended),
            );
        }
        s.keys.reserve(data.keys.len());
        for k in &data.keys {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
                log::warn!(
                    "key store: key {} has a malformed hash and is ignored",
                    k.id
                );
                continue;
            }
            let (customer, plan, suspended) = match s.customers.get_key_value(k.customer.as_str()) {
                Some((c, (plan, suspended))) => (c.clone(), plan.clone(), *suspended),
                None => (k.customer.as_str().into(), None, false),
            };
            let entry = Entry {
                hash,
                // An expiry that does not parse fails closed: expired.
                expires: k.expires.as_deref().map(|e| parse_rfc3339(e).unwrap_or(0)),
                revoked: k.revoked.is_some(),
                info: Arc::new(KeyInfo {
                    key_id: k.id.as_str().into(),
                    customer,
                    plan,
                    suspended,
                }),
            };
            match s.keys.entry(bucket(&hash)) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(entry);
                }
                std::collections::hash_map::Entry::Occupied(_) => s.overflow.push(entry),
            }
            s.key_count += 1;
        }
        s
    }

    /// Every customer the store knows.
    pub fn customer_ids(&self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.customers.keys().cloned()
    }

    /// A customer's plan name (None: default) and suspension.
    pub fn customer(&self, id: &str) -> Option<(Option<Arc<str>>, bool)> {
        self.customers.get(id).cloned()
    }

    pub fn lookup(&self, hash: &KeyHash, now: Millis) -> Result<Identity, KeyRejection> {
        let mut found = self
            .keys
            .get(&bucket(hash))
            .filter(|e| keys::hashes_equal(&e.hash, hash));
        if found.is_none() && !self.overflow.is_empty() {
            found = self
                .overflow
                .iter()
                .find(|e| keys::hashes_equal(&e.hash, hash));
        }
        let e = found.ok_or(KeyRejection::Unknown)?;
        if e.revoked {
            return Err(KeyRejection::Revoked);
        }
        if e.expires.is_some_and(|t| t <= now) {
            return Err(KeyRejection::Expired);
        }
        Ok(Arc::clone(&e.info))
    }
}

/// The read side every backend offers the proxy: a current snapshot, and
/// for shared stores a way to ask about a key the snapshot does not know.
pub trait KeyStore: Send + Sync {
    fn snapshot(&self) -> Arc<Snapshot>;

    /// A key missing from the snapshot. `None`: unknown.
    fn lookup_miss<'a>(
        &'a self,
        _hash: &'a KeyHash,
        _now: Millis,
    ) -> futures_util::future::BoxFuture<'a, Option<Result<Identity, KeyRejection>>> {
        Box::pin(std::future::ready(None))
    }
}

/// A fixed snapshot: for benchmarks and embedding.
pub struct StaticKeys(pub Arc<Snapshot>);

impl KeyStore for StaticKeys {
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.0)
    }
}

/// Errors of store administration, shown to operators.
#[derive(Debug)]
pub enum StoreError {
    Io(PathBuf, std::io::Error),
    Corrupt(PathBuf, String),
    NotFound(String),
    Invalid(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Corrupt(p, e) => write!(f, "{}: not a valid key store: {e}", p.display()),
            StoreError::NotFound(what) => write!(f, "{what} not found"),
            StoreError::Invalid(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The file-backed store.
pub struct FileStore {
    path: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    stamp: std::sync::Mutex<Option<Stamp>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

impl FileStore {
    /// Opens the store; a missing file is an empty store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let store = Self {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(Snapshot::default())),
            stamp: std::sync::Mutex::new(None),
        };
        store.reload()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file into a fresh snapshot if it changed. A broken file is
    /// reported and the previous snapshot kept: keys keep working.
    pub fn reload(&self) -> Result<bool, StoreError> {
        let now_stamp = stamp(&self.path);
        {
            let last = self
                .stamp
                .lock()
                .map_err(|_| StoreError::Invalid("lock poisoned".into()))?;
            if last.is_some() && *last == now_stamp {
                return Ok(false);
            }
        }
        let data = read_data(&self.path)?;
        let snap = Arc::new(Snapshot::build(&data));
        if let Ok(mut cur) = self.current.write() {
            *cur = snap;
        }
        if let Ok(mut last) = self.stamp.lock() {
            *last = now_stamp;
        }
        Ok(true)
    }

    /// Re-reads the file every `every` until `stop` flips, on a plain thread
    /// (file I/O stays off the async workers).
    pub fn watch(self: &Arc<Self>, every: Duration, stop: Arc<std::sync::atomic::AtomicBool>) {
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("tollgate-keys-watch".into())
            .spawn(move || {
                let mut failing = false;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(every);
                    match me.reload() {
                        Ok(true) => {
                            failing = false;
                            log::info!("key store reloaded from {}", me.path.display());
                        }
                        Ok(false) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            log::error!("key store reload failed, keeping the previous keys: {e}");
                        }
                        Err(_) => {}
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the key store watcher: {e}");
        }
    }

    /// Applies `f` to the store under an exclusive lock and writes the result
    /// atomically; safe against concurrent CLIs and running proxies.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let io = |e| StoreError::Io(self.path.clone(), e);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = with_suffix(&self.path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let mut data = read_data(&self.path)?;
        let out = f(&mut data)?;
        data.version = 1;
        let text =
            serde_json::to_vec_pretty(&data).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let tmp = with_suffix(&self.path, &format!(".tmp{}", std::process::id()));
        {
            let mut file = File::create(&tmp).map_err(io)?;
            file.write_all(&text).map_err(io)?;
            file.write_all(b"\n").map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        drop(lock);
        self.reload()?;
        Ok(out)
    }

    pub fn data(&self) -> Result<StoreData, StoreError> {
        read_data(&self.path)
    }
}

impl KeyStore for FileStore {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(s) => Arc::clone(&s),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn read_data(path: &Path) -> Result<StoreData, StoreError> {
    match fs::read(path) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(StoreData::default()),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(path.to_path_buf(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreData::default()),
        Err(e) => Err(StoreError::Io(path.to_path_buf(), e)),
    }
}

/// A store that can apply a change atomically: the file store, or Redis
/// through [`crate::redis_store::BlockingRedisAdmin`].
pub trait UpdateStore {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError>;
    fn data(&self) -> Result<StoreData, StoreError>;
}

impl UpdateStore for FileStore {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        FileStore::update(self, f)
    }
    fn data(&self) -> Result<StoreData, StoreError> {
        FileStore::data(self)
    }
}

/// The configured store, as the CLI and the admin API write it.
pub enum AnyStore {
    File(Arc<FileStore>),
    Redis(crate::redis_store::BlockingRedisAdmin),
}

impl AnyStore {
    /// Opens the store `config` names (connecting to Redis if it is Redis).
    pub fn open(config: &crate::config::Config) -> Result<Self, StoreError> {
        match (config.keys_store, &config.redis) {
            (crate::config::StoreKind::Redis, Some(rc)) => Ok(AnyStore::Redis(
                crate::redis_store::BlockingRedisAdmin::connect(rc.clone())?,
            )),
            _ => Ok(AnyStore::File(Arc::new(FileStore::open(
                &config.keys_path,
            )?))),
        }
    }
}

impl UpdateStore for AnyStore {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        match self {
            AnyStore::File(s) => FileStore::update(s, f),
            AnyStore::Redis(s) => s.update(f),
        }
    }
    fn data(&self) -> Result<StoreData, StoreError> {
        match self {
            AnyStore::File(s) => FileStore::data(s),
            AnyStore::Redis(s) => s.data(),
        }
    }
}

/// Operations behind `tollgate keys …` and `tollgate customers …`, the same
/// for every store.
pub mod admin {
    use super::*;

    /// A key just created: the raw key is returned once and never stored.
    #[derive(Debug)]
    pub struct NewKey {
        pub raw: String,
        pub record: KeyRecord,
    }

    fn customer_id_ok(id: &str) -> Result<(), StoreError> {
        let ok = !id.is_empty()
            && id.len() <= 255
            && id
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if ok {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "customer id `{id}` must be 1-255 visible ASCII characters (e.g. a Stripe cus_… id)"
            )))
        }
    }

    fn new_record(
        prefix: &str,
        customer: &str,
        name: Option<&str>,
        now: Millis,
        expires: Option<Millis>,
    ) -> Result<NewKey, StoreError> {
        let io = |e| StoreError::Io(PathBuf::from("<os random>"), e);
        let raw = keys::generate(prefix).map_err(io)?;
        let record = KeyRecord {
            id: keys::new_key_id().map_err(io)?,
            hash: hex::encode(keys::hash(&raw)),
            start: raw.get(..prefix.len() + 4).unwrap_or(prefix).to_owned(),
            customer: customer.to_owned(),
            name: name.map(str::to_owned),
            created: rfc3339(now),
            expires: expires.map(rfc3339),
            revoked: None,
        };
        Ok(NewKey { raw, record })
    }

    pub struct CreateKey<'a> {
        pub customer: &'a str,
        pub plan: Option<&'a str>,
        pub name: Option<&'a str>,
        pub expires: Option<Millis>,
    }

    pub fn create_key(
        store: &impl UpdateStore,
        prefix: &str,
        req: CreateKey<'_>,
        now: Millis,
    ) -> Result<NewKey, StoreError> {
        customer_id_ok(req.customer)?;
        let new = new_record(prefix, req.customer, req.name, now, req.expires)?;
        let record = new.record.clone();
        store.update(|d| {
            let c = d.customers.entry(req.customer.to_owned()).or_default();
            if let Some(plan) = req.plan {
                c.plan = Some(plan.to_owned());
            }
            d.keys.push(record);
            Ok(())
        })?;
        Ok(new)
    }

    pub fn revoke(
        store: &impl UpdateStore,
        id: &str,
        now: Millis,
    ) -> Result<KeyRecord, StoreError> {
        store.update(|d| {
            let k = d
                .keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
            if k.revoked.is_none() {
                k.revoked = Some(rfc3339(now));
            }
            Ok(k.clone())
        })
    }

    /// Issues a new key for the same customer; the old one expires after `grace`.
    pub fn rotate(
        store: &impl UpdateStore,
        prefix: &str,
        id: &str,
        grace: Millis,
        now: Millis,
    ) -> Result<NewKey, StoreError> {
        store.update(|d| {
            let old = d
                .keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
            if old.revoked.is_some() {
                return Err(StoreError::Invalid(format!(
                    "key {id} is revoked; create a new key instead"
                )));
            }
            let old_expiry = old.expires.as_deref().and_then(parse_rfc3339);
            let until = now.saturating_add(grace);
            let new_expiry = old_expiry.map_or(until, |e| e.min(until));
            old.expires = Some(rfc3339(new_expiry));
            let (customer, name) = (old.customer.clone(), old.name.clone());
            let new = new_record(prefix, &customer, name.as_deref(), now, old_expiry)?;
            d.keys.push(new.record.clone());
            Ok(new)
        })
    }

    pub fn set_plan(
        store: &impl UpdateStore,
        customer: &str,
        plan: &str,
    ) -> Result<(), StoreError> {
        customer_id_ok(customer)?;
        store.update(|d| {
            d.customers.entry(customer.to_owned()).or_default().plan = Some(plan.to_owned());
            Ok(())
        })
    }

    pub fn set_suspended(
        store: &impl UpdateStore,
        customer: &str,
        suspended: bool,
    ) -> Result<(), StoreError> {
        store.update(|d| {
            let c = d
                .customers
                .get_mut(customer)
                .ok_or_else(|| StoreError::NotFound(format!("customer {customer}")))?;
            c.suspended = suspended;
            Ok(())
        })
    }

    /// `active`, `revoked`, `expired`, or `expiring` (rotated, still valid).
    pub fn status(k: &KeyRecord, now: Millis) -> &'static str {
        if k.revoked.is_some() {
            return "revoked";
        }
        match k.expires.as_deref().map(|e| parse_rfc3339(e).unwrap_or(0)) {
            Some(t) if t <= now => "expired",
            Some(_) => "expiring",
            None => "active",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::admin::*;
    use super::*;
    use crate::clock::HOUR;

    const NOW: Millis = 1_800_000_000_000;

    fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("keys.db")).unwrap();
        (dir, s)
    }

    fn create(s: &FileStore, customer: &str) -> NewKey {
        create_key(
            s,
            "tg_test_",
            CreateKey {
                customer,
                plan: Some("pro"),
                name: None,
                expires: None,
            },
            NOW,
        )
        .unwrap()
    }

    #[test]
    fn only_the_hash_is_stored() {
        let (_d, s) = store();
        let k = create(&s, "cus_1");
        let text = fs::read_to_string(s.path()).unwrap();
        assert!(!text.contains(&k.raw), "raw key must never be written");
        assert!(text.contains(&hex::encode(keys::hash(&k.raw))));
        let id = s.snapshot().lookup(&keys::hash(&k.raw), NOW).unwrap();
        assert_eq!((&*id.customer, id.plan.as_deref()), ("cus_1", Some("pro")));
        assert_eq!(&*id.key_id, k.record.id);
    }

    #[test]
    fn revoked_expired_and_unknown_are_told_apart() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        let h = keys::hash(&a.raw);
        assert_eq!(
            s.snapshot().lookup(&keys::hash("nope"), NOW),
            Err(KeyRejection::Unknown)
        );
        let b = rotate(&s, "tg_test_", &a.record.id, HOUR, NOW).unwrap();
        assert!(
            s.snapshot().lookup(&h, NOW + HOUR - 1).is_ok(),
            "old key works during grace"
        );
        assert_eq!(
            s.snapshot().lookup(&h, NOW + HOUR),
            Err(KeyRejection::Expired)
        );
        assert!(s
            .snapshot()
            .lookup(&keys::hash(&b.raw), NOW + 2 * HOUR)
            .is_ok());
        revoke(&s, &b.record.id, NOW).unwrap();
        assert_eq!(
            s.snapshot().lookup(&keys::hash(&b.raw), NOW),
            Err(KeyRejection::Revoked)
        );
        assert!(matches!(
            revoke(&s, "key_missing", NOW),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn a_second_handle_sees_writes_after_reload() {
        let (_d, s) = store();
        let other = FileStore::open(s.path()).unwrap();
        let k = create(&s, "cus_2");
        assert!(other.reload().unwrap());
        assert!(other.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
        set_plan(&s, "cus_2", "enterprise").unwrap();
        set_suspended(&s, "cus_2", true).unwrap();
        other.reload().unwrap();
        let id = other.snapshot().lookup(&keys::hash(&k.raw), NOW).unwrap();
        assert_eq!(id.plan.as_deref(), Some("enterprise"));
        assert!(id.suspended);
    }

    #[test]
    fn a_corrupt_file_keeps_the_previous_snapshot() {
        let (_d, s) = store();
        let k = create(&s, "cus_3");
        fs::write(s.path(), "{ not json").unwrap();
        assert!(matches!(s.reload(), Err(StoreError::Corrupt(..))));
        assert!(s.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let (_d, s) = store();
        let s = Arc::new(s);
        std::thread::scope(|sc| {
            for t in 0..4 {
                let s = Arc::clone(&s);
                sc.spawn(move || {
                    let other = FileStore::open(s.path()).unwrap();
                    for i in 0..10 {
                        create(&other, &format!("cus_{t}_{i}"));
                    }
                });
            }
        });
        assert_eq!(s.data().unwrap().keys.len(), 40);
    }
}
