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

mod load;
mod text;

pub use text::StoreText;

use super::journal::{self, Change, Folded};
use super::{Inspect, KeyStore, Only, Snapshot, StoreData, StoreError, UpdateStore};
use load::Loader;

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
        self.read_consistent(|changes| {
            // A read again from the start: what was shown is forgotten.
            inspect.restart();
            let mut loader = Loader {
                snap: Snapshot::default(),
                folded: Folded::new(changes),
                inspect: &mut *inspect,
            };
            super::document::scan_file(&self.path, &mut loader)?;
            Ok(loader.finish())
        })
    }

    /// Applies the journal's lines written since `seen` to the snapshot,
    /// in place of a re-read of everything.
    fn follow(&self, seen: &Seen) -> Result<Follow, StoreError> {
        let io = |e| StoreError::Io(self.journal.clone(), e);
        let Some(mut file) = self.open_journal()? else {
            return Ok(match seen.journal {
                None => Follow::Nothing,
                // Folded into the document, or removed by hand.
                Some(_) => Follow::Replaced,
            });
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
    /// read of them.
    fn read_state(&self) -> Result<(StoreData, Seen), StoreError> {
        self.read_consistent(|changes| {
            let mut data = read_data(&self.path)?;
            journal::apply(&mut data, changes);
            Ok(data)
        })
    }

    /// `read` of the document given the journal's changes, read again if
    /// the document was replaced meanwhile (a writer folding the journal
    /// into it), so a reader never applies a journal to a document older
    /// than the one it was folded into; with what was read of the files.
    fn read_consistent<T>(
        &self,
        mut read: impl FnMut(Vec<Change>) -> Result<T, StoreError>,
    ) -> Result<(T, Seen), StoreError> {
        for _ in 0..8 {
            let document = stamp(&self.path);
            let (journal, applied, lines, changes) = match self.read_journal()? {
                Some(j) => (Some(j.ino), j.applied, j.lines, j.changes),
                None => (None, 0, 0, Vec::new()),
            };
            let out = read(changes)?;
            if stamp(&self.path) == document {
                let seen = Seen {
                    document,
                    journal,
                    applied,
                    lines,
                };
                return Ok((out, seen));
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
        if let Some(j) = self.read_journal()? {
            journal::apply(&mut data, j.changes);
        }
        Ok(subset(data, only))
    }

    /// The journal, read whole; None if there is none.
    fn read_journal(&self) -> Result<Option<JournalRead>, StoreError> {
        let io = |e| StoreError::Io(self.journal.clone(), e);
        let Some(mut f) = self.open_journal()? else {
            return Ok(None);
        };
        let ino = f.metadata().map_err(io)?.ino();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        let (changes, used) = journal::parse(&self.journal, &bytes, 0)?;
        Ok(Some(JournalRead {
            ino,
            changes,
            applied: used as u64,
            lines: newlines(&bytes[..used]),
        }))
    }

    /// The journal file; None if there is none.
    fn open_journal(&self) -> Result<Option<File>, StoreError> {
        match File::open(&self.journal) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io(self.journal.clone(), e)),
        }
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
        let ((data, doc), _) = self.read_consistent(|changes| {
            let doc = read_file(&self.path)?;
            let mut data = parse_data(&self.path, &doc)?;
            journal::apply(&mut data, changes);
            Ok((data, doc))
        })?;
        // Lossy: the journal's unfinished last line (a crash's) may end
        // inside a character, and is no change anyway.
        let text = |path: &Path, bytes: Vec<u8>| {
            let text = String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            (path.to_path_buf(), text)
        };
        let text = StoreText {
            document: text(&self.path, doc),
            journal: text(&self.journal, read_file(&self.journal)?),
        };
        Ok((data, text))
    }
}

/// What a whole read of the journal found: its inode, its changes, and
/// the bytes and lines they span.
struct JournalRead {
    ino: u64,
    changes: Vec<Change>,
    applied: u64,
    lines: u64,
}

fn newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
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
mod tests;
