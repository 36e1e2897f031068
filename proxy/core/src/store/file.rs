//! The file store of the embedded default: a JSON document (`keys.db`)
//! and the journal of the changes made since it was written
//! (`keys.db.journal`, see [`super::journal`]). A change appends one line
//! to the journal under the store's lock (`keys.db.lock`); a running proxy
//! applies the lines it has not seen to its snapshot within ~250 ms, and
//! re-reads everything only when the document itself was replaced (a
//! compaction, or an operator's edit).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use super::journal::{self, Change, Folded};
use super::{
    CustomerRecord, Inspect, KeyRecord, KeyStore, Only, Snapshot, StoreData, StoreError,
    UpdateStore,
};

/// The journal is folded into the document once it holds at least this
/// many bytes and a quarter of the document's size.
const COMPACT_AT: u64 = 1 << 20;

/// The file-backed store.
pub struct FileStore {
    path: PathBuf,
    journal: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    /// What was read of the files (None: nothing yet); held for the whole
    /// of a reload, so reloads do not race each other.
    seen: Mutex<Option<Seen>>,
    /// Whether a snapshot is kept (the running proxy) or not (the CLI,
    /// which only reads and writes the files).
    snapshots: bool,
    compact_at: u64,
}

/// The files as a reader last read them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// The document (None: it did not exist), so an unchanged one is not
    /// re-read four times a second.
    document: Option<Stamp>,
    /// The journal's inode (None: there was none), and how many of its
    /// bytes and lines were applied.
    journal: Option<u64>,
    applied: u64,
    lines: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
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
        Self::open_inspecting(path, &mut ())
    }

    /// [`open`](Self::open), showing `inspect` each record as the snapshot
    /// is built from it: `run` checks the store this way, with one read of
    /// the files instead of two.
    pub fn open_inspecting(path: &Path, inspect: &mut dyn Inspect) -> Result<Self, StoreError> {
        let store = Self {
            snapshots: true,
            ..Self::unsnapshotted(path)
        };
        store.reload_inspecting(inspect)?;
        Ok(store)
    }

    /// The store for reading and writing its files only (the CLI): nothing
    /// is read until asked, and no lookup snapshot is built, before or
    /// after a write (benches/README.md, "Scale of state").
    pub fn unsnapshotted(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            journal: with_suffix(path, ".journal"),
            current: RwLock::new(Arc::new(Snapshot::default())),
            seen: Mutex::new(None),
            snapshots: false,
            compact_at: COMPACT_AT,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal of changes beside the document (`<path>.journal`).
    pub fn journal_path(&self) -> &Path {
        &self.journal
    }

    /// Brings the snapshot up to date: the journal's new lines applied to
    /// it when only they changed, else everything read into a fresh one. A
    /// broken file is reported and the previous snapshot kept: keys keep
    /// working.
    pub fn reload(&self) -> Result<bool, StoreError> {
        self.reload_inspecting(&mut ())
    }

    fn reload_inspecting(&self, inspect: &mut dyn Inspect) -> Result<bool, StoreError> {
        let mut seen = crate::lock(&self.seen);
        if let Some(last) = seen.as_ref().filter(|s| s.document == stamp(&self.path)) {
            match self.follow(last)? {
                Follow::Nothing => return Ok(false),
                Follow::Applied(next) => {
                    *seen = Some(next);
                    return Ok(true);
                }
                Follow::Replaced => {}
            }
        }
        let (snap, now_seen) = self.load(inspect)?;
        *crate::sync::write(&self.current) = Arc::new(snap);
        *seen = Some(now_seen);
        Ok(true)
    }

    /// The store read straight into a snapshot, as [`read_state`] reads
    /// it but without a `StoreData` of it beside the snapshot: the journal
    /// folded first, then the document's records streamed into the
    /// snapshot (each replaced by the journal's last write of it, if any),
    /// then the records only the journal holds.
    ///
    /// [`read_state`]: Self::read_state
    fn load(&self, inspect: &mut dyn Inspect) -> Result<(Snapshot, Seen), StoreError> {
        for _ in 0..8 {
            let document = stamp(&self.path);
            let (journal, (applied, lines), folded) = match self.read_journal()? {
                Some((ino, changes, used)) => (Some(ino), used, Folded::new(changes)),
                None => (None, (0, 0), Folded::default()),
            };
            let mut loader = Loader {
                snap: Snapshot::default(),
                folded,
                inspect: &mut *inspect,
            };
            super::document::scan_file(&self.path, &mut loader)?;
            let snap = loader.finish();
            if stamp(&self.path) == document {
                let seen = Seen {
                    document,
                    journal,
                    applied,
                    lines,
                };
                return Ok((snap, seen));
            }
            inspect.restart();
        }
        Err(self.kept_changing())
    }

    /// Applies the journal's lines written since `seen` to the snapshot,
    /// in place of a re-read of everything.
    fn follow(&self, seen: &Seen) -> Result<Follow, StoreError> {
        let io = |e| StoreError::Io(self.journal.clone(), e);
        let mut file = match File::open(&self.journal) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(match seen.journal {
                    None => Follow::Nothing,
                    // Folded into the document, or removed by hand.
                    Some(_) => Follow::Replaced,
                });
            }
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        let from = match seen.journal {
            Some(ino) if ino == meta.ino() => seen.applied,
            // The first change since the document was read.
            None => 0,
            Some(_) => return Ok(Follow::Replaced),
        };
        if meta.len() < from {
            return Ok(Follow::Replaced);
        }
        if meta.len() == from {
            return Ok(Follow::Nothing);
        }
        file.seek(SeekFrom::Start(from)).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (changes, used) = journal::parse(&self.journal, &bytes, seen.lines)?;
        if used == 0 {
            return Ok(Follow::Nothing);
        }
        // A compaction between the document's stamp and this read.
        if stamp(&self.path) != seen.document {
            return Ok(Follow::Replaced);
        }
        let mut next = Snapshot::clone(&self.snapshot());
        for c in &changes {
            c.apply_to_snapshot(&mut next);
        }
        *crate::sync::write(&self.current) = Arc::new(next);
        Ok(Follow::Applied(Seen {
            document: seen.document.clone(),
            journal: Some(meta.ino()),
            applied: from + used as u64,
            lines: seen.lines + newlines(&bytes[..used]),
        }))
    }

    /// The store as the document and the journal make it, and what was
    /// read of them. Read again if the document was replaced meanwhile (a
    /// writer folding the journal into it), so a reader never applies a
    /// journal to a document older than the one it was folded into.
    fn read_state(&self) -> Result<(StoreData, Seen), StoreError> {
        for _ in 0..8 {
            let document = stamp(&self.path);
            let mut data = read_data(&self.path)?;
            let (journal, (applied, lines)) = match self.read_journal()? {
                Some((ino, changes, used)) => {
                    journal::apply(&mut data, changes);
                    (Some(ino), used)
                }
                None => (None, (0, 0)),
            };
            if stamp(&self.path) == document {
                let seen = Seen {
                    document,
                    journal,
                    applied,
                    lines,
                };
                return Ok((data, seen));
            }
        }
        Err(self.kept_changing())
    }

    fn kept_changing(&self) -> StoreError {
        StoreError::Conflict(format!(
            "{} kept being replaced while it was read",
            self.path.display()
        ))
    }

    /// The records `only` names, as the document and the journal make
    /// them, without building the document's other records (see
    /// [`super::document`]). Under the store's lock: nobody replaces the
    /// files meanwhile.
    fn read_named(&self, only: Only<'_>) -> Result<StoreData, StoreError> {
        let mut data = super::document::named(&self.path, &read_file(&self.path)?, only)?;
        if let Some((_, changes, _)) = self.read_journal()? {
            journal::apply(&mut data, changes);
        }
        Ok(subset(data, only))
    }

    /// The journal's inode, its changes and the bytes and lines they
    /// span; None if there is no journal.
    #[allow(clippy::type_complexity)]
    fn read_journal(&self) -> Result<Option<(u64, Vec<Change>, (u64, u64))>, StoreError> {
        let io = |e| StoreError::Io(self.journal.clone(), e);
        let mut f = match File::open(&self.journal) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let ino = f.metadata().map_err(io)?.ino();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        let (changes, used) = journal::parse(&self.journal, &bytes, 0)?;
        Ok(Some((
            ino,
            changes,
            (used as u64, newlines(&bytes[..used])),
        )))
    }

    /// Re-reads the files every `every` until `stop` flips, on a plain thread
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

    /// Applies `f` to the whole store under an exclusive lock and journals
    /// what it changed; safe against concurrent CLIs and running proxies.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write(None, f)
    }

    /// [`update`](Self::update) showing `f` only the records `only` names
    /// (see [`UpdateStore::update_only`]).
    pub fn update_only<T>(
        &self,
        only: Only<'_>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write(Some(only), f)
    }

    fn write<T>(
        &self,
        only: Option<Only<'_>>,
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
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(with_suffix(&self.path, ".lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let (out, change, whole) = match only {
            Some(only) => {
                let old = self.read_named(only)?;
                let mut new = old.clone();
                let out = f(&mut new)?;
                (out, Change::between(&old, &new), None)
            }
            None => {
                let (mut data, _) = self.read_state()?;
                let old = data.clone();
                let out = f(&mut data)?;
                (out, Change::between(&old, &data), Some(data))
            }
        };
        if !change.is_empty() {
            let journal_len = journal::append(&self.journal, &change)?;
            // From here the change is made: whatever fails after this is
            // logged and left to the next writer, never reported as a
            // change not made (a `keys create` told so would lose its key).
            // The first write makes the document (so `keys.db` is there
            // from the first key on, as it always was).
            let fold = match stamp(&self.path) {
                None => true,
                Some(d) => journal_len >= self.compact_at && journal_len.saturating_mul(4) >= d.len,
            };
            if fold {
                // The change is in the journal: a whole read includes it.
                let folded = match whole {
                    Some(data) => Ok(data),
                    None => self.read_state().map(|(data, _)| data),
                }
                .and_then(|data| self.compact(data));
                if let Err(e) = folded {
                    log::warn!("key store: the change is journaled, but folding the journal into the document failed (the next change tries again): {e}");
                }
            }
        }
        drop(lock);
        if self.snapshots {
            if let Err(e) = self.reload() {
                log::warn!(
                    "key store: the change is made, but this process has not read it back yet: {e}"
                );
            }
        }
        Ok(out)
    }

    /// Writes the whole store as the document (temp file, fsync, rename),
    /// then replaces the journal folded into it by an empty one, also by
    /// a rename: the journal a reader finds after a fold is always a new
    /// file (its inode was taken while the old one still existed), so a
    /// reader that read the new document with the old journal sees it was
    /// replaced. The change that prompted the fold is in the old journal
    /// already: a reader of the new document and the old journal replays
    /// records to the state the document holds.
    fn compact(&self, mut data: StoreData) -> Result<(), StoreError> {
        data.version = 1;
        let text =
            serde_json::to_vec_pretty(&data).map_err(|e| StoreError::Invalid(e.to_string()))?;
        drop(data);
        replace(&self.path, &text)?;
        replace(&self.journal, b"")
    }

    /// The whole store: the document with the journal applied.
    pub fn data(&self) -> Result<StoreData, StoreError> {
        self.read_state().map(|(data, _)| data)
    }

    /// The data and the files' text (for locating records in messages).
    pub fn data_and_text(&self) -> Result<(StoreData, StoreText), StoreError> {
        for _ in 0..8 {
            let document = stamp(&self.path);
            let (doc, journal) = (read_file(&self.path)?, read_file(&self.journal)?);
            let mut data = parse_data(&self.path, &doc)?;
            journal::apply(&mut data, journal::parse(&self.journal, &journal, 0)?.0);
            if stamp(&self.path) == document {
                // Lossy: the journal's unfinished last line (a crash's) may
                // end inside a character, and is no change anyway.
                let text = |path: &Path, bytes: Vec<u8>| {
                    let text = String::from_utf8(bytes)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
                    (path.to_path_buf(), text)
                };
                let text = StoreText {
                    document: text(&self.path, doc),
                    journal: text(&self.journal, journal),
                };
                return Ok((data, text));
            }
        }
        Err(self.kept_changing())
    }
}

fn newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The records of a load on their way into the snapshot.
struct Loader<'a> {
    snap: Snapshot,
    folded: Folded,
    inspect: &'a mut dyn Inspect,
}

impl Loader<'_> {
    fn put_key(&mut self, k: &KeyRecord) {
        self.inspect.key(k);
        match journal::decode(&k.hash) {
            // A second record of one hash is not the key's (the first is,
            // as `Snapshot::build` has it; `check` reports the second).
            Some(hash) if self.snap.holds(&hash) => {
                log::warn!(
                    "key store: key {} repeats the hash of an earlier key and is ignored",
                    k.id
                );
            }
            Some(hash) => self.snap.set_key(&hash, Some(k)),
            None => log::warn!(
                "key store: key {} has a malformed hash and is ignored",
                k.id
            ),
        }
    }

    /// The snapshot, with what only the journal holds.
    fn finish(mut self) -> Snapshot {
        let customers = std::mem::take(&mut self.folded.customers);
        for (id, c) in &customers {
            if let Some(c) = c {
                self.inspect.customer(id, c);
            }
            self.snap.set_customer(id, c.as_ref());
        }
        let folded = std::mem::take(&mut self.folded);
        for k in folded.remaining_keys() {
            self.put_key(&k);
        }
        self.snap
    }
}

impl super::document::Records for Loader<'_> {
    fn customer(&mut self, id: String, c: CustomerRecord) {
        // The journal's last write of it goes in at the end.
        if !self.folded.customers.contains_key(&id) {
            self.inspect.customer(&id, &c);
            self.snap.set_customer(&id, Some(&c));
        }
    }
    fn key(&mut self, k: KeyRecord) {
        match self.folded.keys.remove(&k.hash) {
            None => self.put_key(&k),
            Some(Some(now)) => self.put_key(&now),
            Some(None) => {}
        }
    }
}

enum Follow {
    Nothing,
    Applied(Seen),
    /// The journal is not the one read before: read everything again.
    Replaced,
}

/// The records of `data` that `only` names, as the Redis store reads them.
fn subset(mut data: StoreData, only: Only<'_>) -> StoreData {
    data.customers
        .retain(|id, _| only.customers.contains(&id.as_str()));
    data.keys.retain(|k| only.key_ids.contains(&k.id.as_str()));
    if !only.webhook_events {
        data.webhook_events.clear();
    }
    data
}

/// The text of a store's document and journal, to tell where a record
/// stands (`tollgate check`'s messages): its newest line in the journal,
/// else its line in the document. Missing files are empty.
pub struct StoreText {
    document: (PathBuf, String),
    journal: (PathBuf, String),
}

impl StoreText {
    pub fn read(store: &Path) -> StoreText {
        let read = |p: PathBuf| {
            let text = fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        };
        StoreText {
            document: read(store.to_path_buf()),
            journal: read(with_suffix(store, ".journal")),
        }
    }

    /// `file:line:column` of `needle`, if it stands in either file.
    pub fn locate(&self, needle: &str) -> Option<String> {
        let at = |path: &Path, i: usize, line: &str| {
            line.find(needle)
                .map(|c| format!("{}:{}:{}", path.display(), i + 1, c + 1))
        };
        let j = &self.journal;
        let d = &self.document;
        j.1.lines()
            .enumerate()
            .filter_map(|(i, l)| at(&j.0, i, l))
            .last()
            .or_else(|| d.1.lines().enumerate().find_map(|(i, l)| at(&d.0, i, l)))
    }
}

impl KeyStore for FileStore {
    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&crate::sync::read(&self.current))
    }
}

/// Replaces the file at `path` by one holding `text` (and a final newline
/// unless empty): a temporary file beside it, fsynced, renamed over it,
/// the directory fsynced. The temporary file is removed if anything fails.
fn replace(path: &Path, text: &[u8]) -> Result<(), StoreError> {
    let io = |e| StoreError::Io(path.to_path_buf(), e);
    let tmp = with_suffix(path, &format!(".tmp{}", std::process::id()));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        if !text.is_empty() {
            file.write_all(text)?;
            file.write_all(b"\n")?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    sync_dir(path);
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Makes a rename or a new file in `path`'s directory durable.
pub(super) fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
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
    fn update_only<T: Send>(
        &self,
        only: Only<'_>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        FileStore::update_only(self, only, f)
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
        let journaled = create(&s, "cus_1");
        for (key, file) in [(&k, s.path()), (&journaled, s.journal_path())] {
            let text = fs::read_to_string(file).unwrap();
            assert!(!text.contains(&key.raw), "raw key must never be written");
            assert!(text.contains(&hex::encode(keys::hash(&key.raw))));
        }
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
        let second = create(&cli, "cus_cli");
        let (data, text) = cli.data_and_text().unwrap();
        assert_eq!(data.keys.len(), 2);
        let located = |id: &str| text.locate(&format!("\"{id}\"")).unwrap();
        assert!(located(&k.record.id).starts_with(&format!("{}:", s.path().display())));
        assert_eq!(
            located(&second.record.id),
            format!("{}:1:{}", cli.journal_path().display(), {
                let line = fs::read_to_string(cli.journal_path()).unwrap();
                line.find(&format!("\"{}\"", second.record.id)).unwrap() + 1
            }),
            "a record written since the document is located in the journal"
        );
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

    /// A handle that writes as another process would (a CLI), folding the
    /// journal into the document once it reaches `compact_at` bytes.
    fn writer(s: &FileStore, compact_at: u64) -> FileStore {
        FileStore {
            compact_at,
            ..FileStore::unsnapshotted(s.path())
        }
    }

    #[test]
    fn a_change_is_one_journal_line_and_leaves_the_document_alone() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        let document = fs::read(s.path()).unwrap();
        assert_eq!(
            fs::metadata(s.journal_path()).unwrap().len(),
            0,
            "the first write makes the document"
        );
        let b = create(&s, "cus_2");
        revoke(&s, &a.record.id, NOW).unwrap();
        set_plan(&s, "cus_2", "enterprise").unwrap();
        set_plan(&s, "cus_2", "enterprise").unwrap();
        assert_eq!(
            fs::read(s.path()).unwrap(),
            document,
            "the document is not rewritten"
        );
        let journal = fs::read_to_string(s.journal_path()).unwrap();
        assert_eq!(
            journal.lines().count(),
            3,
            "one line per change, none for no change: {journal}"
        );
        let fresh = FileStore::open(s.path()).unwrap();
        let snap = fresh.snapshot();
        assert_eq!(
            snap.lookup(&keys::hash(&a.raw), NOW).err(),
            Some(KeyRejection::Revoked)
        );
        let id = snap.lookup(&keys::hash(&b.raw), NOW).unwrap();
        assert_eq!(id.plan.as_deref(), Some("enterprise"));
        assert_eq!(fresh.data().unwrap(), s.data().unwrap());
    }

    #[test]
    fn a_running_store_applies_a_change_without_rebuilding_its_snapshot() {
        let (_d, s) = store();
        s.update(|d| {
            for i in 0..300 {
                d.keys.push(super::super::KeyRecord {
                    id: format!("key_{i:016}"),
                    hash: hex::encode(keys::hash(&format!("raw {i}"))),
                    start: "tg_test_abcd".into(),
                    customer: format!("cus_{i}"),
                    name: None,
                    meta: None,
                    created: "2026-01-01T00:00:00Z".into(),
                    expires: None,
                    revoked: None,
                });
            }
            Ok(())
        })
        .unwrap();
        let cli = writer(&s, COMPACT_AT);
        let before = s.snapshot();
        let k = create(&cli, "cus_new");
        assert!(s.reload().unwrap());
        let after = s.snapshot();
        assert_eq!(
            after.shared_shards(&before),
            2 * super::super::SHARDS - 2,
            "one key shard and one customer shard copied"
        );
        assert!(after.lookup(&keys::hash(&k.raw), NOW).is_ok());
        assert_eq!(after.key_count, 301);
        set_suspended(&cli, "cus_new", true).unwrap();
        assert!(s.reload().unwrap());
        assert!(
            s.snapshot()
                .lookup(&keys::hash(&k.raw), NOW)
                .unwrap()
                .suspended
        );
        assert!(!s.reload().unwrap(), "nothing new: nothing applied");
    }

    #[test]
    fn an_unfinished_last_line_is_skipped_then_cut_by_the_next_write() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        let other = FileStore::open(s.path()).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(s.journal_path())
            .unwrap();
        f.write_all(b"{\"keys\":[{\"id\":\"key_").unwrap();
        assert!(
            !other.reload().unwrap(),
            "a line still being written is no change"
        );
        assert_eq!(other.data().unwrap().keys.len(), 1);
        let b = create(&s, "cus_2");
        let journal = fs::read_to_string(s.journal_path()).unwrap();
        assert!(
            journal.starts_with("{\"customers\""),
            "the torn line was cut: {journal}"
        );
        assert!(other.reload().unwrap());
        for k in [&a, &b] {
            assert!(other.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
        }
    }

    #[test]
    fn readers_follow_the_journal_through_its_compactions() {
        let (_d, s) = store();
        let reader = FileStore::open(s.path()).unwrap();
        let w = writer(&s, 1_000);
        let mut made = Vec::new();
        let mut folded = 0;
        for i in 0..30 {
            made.push(create(&w, &format!("cus_{}", i % 7)));
            if i % 3 == 0 {
                revoke(&w, &made[i / 2].record.id, NOW).unwrap();
            }
            if fs::metadata(w.journal_path()).unwrap().len() == 0 {
                folded += 1;
            }
            if i % 4 == 0 {
                reader.reload().unwrap();
            }
        }
        assert!(folded >= 3, "the journal was folded {folded} times");
        reader.reload().unwrap();
        let data = w.data().unwrap();
        assert_eq!(data.keys.len(), 30);
        let want = Snapshot::build(&data);
        for k in &made {
            let h = keys::hash(&k.raw);
            assert_eq!(
                reader.snapshot().lookup(&h, NOW).map(|i| i.key_id.clone()),
                want.lookup(&h, NOW).map(|i| i.key_id.clone()),
                "{}",
                k.record.id
            );
        }
        assert_eq!(reader.snapshot().key_count, 30);
    }

    #[test]
    fn a_whole_store_update_journals_what_it_removed() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        create(&s, "cus_2");
        let reader = FileStore::open(s.path()).unwrap();
        s.update(|d| {
            d.keys.retain(|k| k.id != a.record.id);
            d.customers.remove("cus_1");
            Ok(())
        })
        .unwrap();
        assert!(reader.reload().unwrap());
        let snap = reader.snapshot();
        assert_eq!(
            snap.lookup(&keys::hash(&a.raw), NOW).err(),
            Some(KeyRejection::Unknown)
        );
        assert_eq!(snap.key_count, 1);
        assert!(snap.customer("cus_1").is_none());
        assert_eq!(
            FileStore::open(s.path()).unwrap().data().unwrap(),
            s.data().unwrap()
        );
    }

    #[test]
    fn a_load_of_the_document_and_journal_is_the_snapshot_of_the_store() {
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        let b = create(&s, "cus_2");
        let c = create(&s, "cus_3");
        set_plan(&s, "cus_1", "enterprise").unwrap();
        revoke(&s, &b.record.id, NOW).unwrap();
        s.update(|d| {
            d.keys.retain(|k| k.id != c.record.id);
            d.customers.remove("cus_3");
            Ok(())
        })
        .unwrap();
        let d = create(&s, "cus_4");
        assert!(fs::metadata(s.journal_path()).unwrap().len() > 0);
        let data = s.data().unwrap();
        let (built, loaded) = (
            Snapshot::build(&data),
            FileStore::open(s.path()).unwrap().snapshot(),
        );
        for k in [&a, &b, &c, &d] {
            let seen = |snap: &Snapshot| {
                snap.lookup(&keys::hash(&k.raw), NOW).map(|i| {
                    (
                        i.key_id.clone(),
                        i.customer.clone(),
                        i.plan.clone(),
                        i.suspended,
                    )
                })
            };
            assert_eq!(seen(&loaded), seen(&built), "{}", k.record.id);
        }
        assert_eq!(loaded.key_count, 3);
        let ids = |snap: &Snapshot| {
            let mut v: Vec<_> = snap.customer_ids().collect();
            v.sort();
            v
        };
        assert_eq!(ids(&loaded), ids(&built));
        assert_eq!(loaded.key_statuses(NOW), built.key_statuses(NOW));
    }

    #[test]
    fn a_load_shows_each_record_once_as_the_store_holds_it() {
        #[derive(Default)]
        struct Seen(Vec<String>);
        impl Inspect for Seen {
            fn customer(&mut self, id: &str, c: &CustomerRecord) {
                self.0.push(format!("{id} {:?}", c.plan));
            }
            fn key(&mut self, k: &KeyRecord) {
                self.0.push(format!("{} {}", k.id, k.revoked.is_some()));
            }
        }
        let (_d, s) = store();
        let a = create(&s, "cus_1");
        let b = create(&s, "cus_2");
        revoke(&s, &a.record.id, NOW).unwrap();
        set_plan(&s, "cus_2", "enterprise").unwrap();
        let mut seen = Seen::default();
        FileStore::open_inspecting(s.path(), &mut seen).unwrap();
        let mut want = vec![
            "cus_1 Some(\"pro\")".to_owned(),
            format!("{} true", a.record.id),
            "cus_2 Some(\"enterprise\")".to_owned(),
            format!("{} false", b.record.id),
        ];
        want.sort();
        seen.0.sort();
        assert_eq!(seen.0, want);
    }

    #[test]
    fn a_large_document_is_read_through_a_buffer_as_a_small_one_is_read_whole() {
        let (_d, s) = store();
        s.update(|d| {
            for i in 0..6_000 {
                d.customers
                    .insert(format!("cus_{i}"), CustomerRecord::default());
                d.keys.push(KeyRecord {
                    id: format!("key_{i:016}"),
                    hash: hex::encode(keys::hash(&format!("raw {i}"))),
                    start: "tg_test_abcd".into(),
                    customer: format!("cus_{i}"),
                    name: Some(format!("the key \"{i}\"")),
                    meta: None,
                    created: "2026-01-01T00:00:00Z".into(),
                    expires: None,
                    revoked: (i % 3 == 0).then(|| "2026-01-02T00:00:00Z".into()),
                });
            }
            Ok(())
        })
        .unwrap();
        assert!(
            fs::metadata(s.path()).unwrap().len() > 1 << 20,
            "over the threshold"
        );
        let fresh = create(&s, "cus_new");
        revoke(&s, "key_0000000000000001", NOW).unwrap();
        set_plan(&s, "cus_2", "enterprise").unwrap();
        assert!(fs::metadata(s.journal_path()).unwrap().len() > 0);
        let loaded = FileStore::open(s.path()).unwrap().snapshot();
        let built = Snapshot::build(&s.data().unwrap());
        assert_eq!(loaded.key_count, 6_001);
        assert!(loaded.lookup(&keys::hash(&fresh.raw), NOW).is_ok());
        assert_eq!(
            loaded.lookup(&keys::hash("raw 1"), NOW).err(),
            Some(KeyRejection::Revoked)
        );
        let plan = loaded
            .lookup(&keys::hash("raw 2"), NOW)
            .unwrap()
            .plan
            .clone();
        assert_eq!(plan.as_deref(), Some("enterprise"));
        assert_eq!(loaded.key_statuses(NOW), built.key_statuses(NOW));
        for i in [0, 1, 2, 2_999, 5_999] {
            let h = keys::hash(&format!("raw {i}"));
            let seen = |snap: &Snapshot| snap.lookup(&h, NOW).map(|i| i.customer.clone());
            assert_eq!(seen(&loaded), seen(&built), "{i}");
        }
    }
}
