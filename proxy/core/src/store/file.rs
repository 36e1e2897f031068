//! The file store of the embedded default: a JSON document written
//! atomically (lock, temp file, fsync, rename) and re-read by running
//! proxies within ~250 ms of a change.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::{KeyStore, Snapshot, StoreData, StoreError, UpdateStore};

/// The file-backed store.
pub struct FileStore {
    path: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// What the file looked like when last read (None: never read; `Some(None)`:
    /// it did not exist), so a missing file is not re-read four times a second.
    stamp: std::sync::Mutex<Option<Option<Stamp>>>,
    /// Whether a snapshot is kept (the running proxy) or not (the CLI,
    /// which only reads and writes the file).
    snapshots: bool,
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
        Self::open_inspecting(path, |_| ())
    }

    /// [`open`](Self::open), showing `inspect` the data it parsed before
    /// the snapshot is built from it: `run` checks the store this way, with
    /// one parse of the file instead of two.
    pub fn open_inspecting(
        path: &Path,
        inspect: impl FnOnce(&StoreData),
    ) -> Result<Self, StoreError> {
        let store = Self {
            snapshots: true,
            ..Self::unsnapshotted(path)
        };
        store.reload_inspecting(inspect)?;
        Ok(store)
    }

    /// The store for reading and writing its file only (the CLI): nothing
    /// is read until asked, and no lookup snapshot is built, before or
    /// after a write. With a million keys that is the difference between
    /// one parse of the file per command and three parses and two
    /// snapshots (benches/README.md, "Scale of state").
    pub fn unsnapshotted(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(Snapshot::default())),
            stamp: std::sync::Mutex::new(None),
            snapshots: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file into a fresh snapshot if it changed. A broken file is
    /// reported and the previous snapshot kept: keys keep working.
    pub fn reload(&self) -> Result<bool, StoreError> {
        self.reload_inspecting(|_| ())
    }

    fn reload_inspecting(&self, inspect: impl FnOnce(&StoreData)) -> Result<bool, StoreError> {
        let now_stamp = stamp(&self.path);
        {
            let last = crate::lock(&self.stamp);
            if last.as_ref() == Some(&now_stamp) {
                return Ok(false);
            }
        }
        let data = read_data(&self.path)?;
        inspect(&data);
        let snap = Arc::new(Snapshot::build(&data));
        *crate::sync::write(&self.current) = snap;
        *crate::lock(&self.stamp) = Some(now_stamp);
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
        // A missing directory is a wrong path, not a store to create.
        if let Some(dir) = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return Err(StoreError::Invalid(format!(
                "the key store's directory {} does not exist",
                dir.display()
            )));
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
        if self.snapshots {
            self.reload()?;
        }
        Ok(out)
    }

    pub fn data(&self) -> Result<StoreData, StoreError> {
        read_data(&self.path)
    }

    /// The data and the file's text (for locating records in messages),
    /// from one read; an empty text for a missing file.
    pub fn data_and_text(&self) -> Result<(StoreData, String), StoreError> {
        let bytes = read_file(&self.path)?;
        let data = parse_data(&self.path, &bytes)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| StoreError::Corrupt(self.path.clone(), e.to_string()))?;
        Ok((data, text))
    }
}

impl KeyStore for FileStore {
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&crate::sync::read(&self.current))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn read_data(path: &Path) -> Result<StoreData, StoreError> {
    parse_data(path, &read_file(path)?)
}

/// The file's bytes; none for a missing file (an empty store).
fn read_file(path: &Path) -> Result<Vec<u8>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Io(path.to_path_buf(), e)),
    }
}

/// The store in `bytes` (all blank: an empty store).
fn parse_data(path: &Path, bytes: &[u8]) -> Result<StoreData, StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StoreData::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(path.to_path_buf(), e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Millis;
    use crate::clock::HOUR;
    use crate::keys;
    use crate::store::admin::*;
    use crate::store::{KeyRejection, KeyStore};

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
                set_plan: false,
                meta: None,
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
        assert!(matches!(
            s.snapshot().lookup(&keys::hash("nope"), NOW),
            Err(KeyRejection::Unknown)
        ));
        let b = rotate(&s, "tg_test_", &a.record.id, HOUR, NOW).unwrap();
        assert!(
            s.snapshot().lookup(&h, NOW + HOUR - 1).is_ok(),
            "old key works during grace"
        );
        assert!(matches!(
            s.snapshot().lookup(&h, NOW + HOUR),
            Err(KeyRejection::Expired)
        ));
        assert!(s
            .snapshot()
            .lookup(&keys::hash(&b.raw), NOW + 2 * HOUR)
            .is_ok());
        revoke(&s, &b.record.id, NOW).unwrap();
        assert!(matches!(
            s.snapshot().lookup(&keys::hash(&b.raw), NOW),
            Err(KeyRejection::Revoked)
        ));
        assert!(matches!(
            revoke(&s, "key_missing", NOW),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn the_key_gauge_counts_the_snapshot_as_status_names_the_records() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        create(&s, "cus_2");
        let c = create(&s, "cus_3");
        rotate(&s, "tg_test_", &a.record.id, HOUR, NOW).unwrap();
        revoke(&s, &c.record.id, NOW).unwrap();
        for now in [NOW, NOW + 2 * HOUR] {
            let mut want = std::collections::BTreeMap::new();
            for st in ["active", "expiring", "expired", "revoked"] {
                want.insert(st, 0);
            }
            for k in &s.data().unwrap().keys {
                *want.get_mut(status(k, now)).unwrap() += 1;
            }
            assert_eq!(s.snapshot().key_statuses(now), want, "at {now}");
        }
        let counts = s.snapshot().key_statuses(NOW + 2 * HOUR);
        assert_eq!((counts["expired"], counts["revoked"]), (1, 1));
    }

    #[test]
    fn the_cli_handle_reads_and_writes_the_file_without_a_snapshot() {
        let (_d, s) = store();
        let cli = FileStore::unsnapshotted(s.path());
        let k = create(&cli, "cus_cli");
        assert_eq!(cli.snapshot().key_count, 0, "no snapshot kept");
        let (data, text) = cli.data_and_text().unwrap();
        assert_eq!(data.keys.len(), 1);
        assert!(text.contains(&k.record.id));
        assert!(s.reload().unwrap());
        assert!(s.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
        fs::write(s.path(), "{ not json").unwrap();
        assert!(matches!(cli.data_and_text(), Err(StoreError::Corrupt(..))));
    }

    #[test]
    fn a_missing_file_is_read_once_until_it_appears() {
        let (dir, s) = store();
        assert!(!s.reload().unwrap(), "still missing: nothing to re-read");
        let other = FileStore::open(&dir.path().join("keys.db")).unwrap();
        create(&other, "cus_late");
        assert!(s.reload().unwrap(), "it appeared: read it");
        assert_eq!(s.snapshot().key_count, 1);
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
