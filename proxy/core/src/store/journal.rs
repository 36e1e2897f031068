//! The file store's journal (`<store>.journal`): each change to the store
//! is one line, the records it wrote as they now are, appended and fsynced
//! instead of a rewrite of the whole JSON document. Readers apply the lines
//! in order on top of the document; a running proxy applies the lines it
//! has not seen to its snapshot, change by change. A writer folds the
//! journal into the document (compaction) once it holds at least 1 MiB and
//! a quarter of the document's size, so a change costs O(change) in the
//! store file and in the running proxy, amortised.
//!
//! A line is whole records, never a delta of fields, so replaying a line
//! twice, or replaying a journal onto the document it was folded into,
//! ends in the same state: that is what makes compaction safe for readers
//! that read the new document and the old journal.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CustomerRecord, KeyRecord, Snapshot, StoreData, StoreError};

/// One change: the records it wrote (None: removed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct Change {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    customers: BTreeMap<String, Option<CustomerRecord>>,
    /// Keys written, whole; a key is known by its hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<KeyRecord>,
    /// Hashes of keys removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removed_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    webhook_events: BTreeMap<String, Option<u64>>,
}

impl Change {
    /// What turned `old` into `new`.
    pub(super) fn between(old: &StoreData, new: &StoreData) -> Change {
        let before: HashMap<&str, &KeyRecord> =
            old.keys.iter().map(|k| (k.hash.as_str(), k)).collect();
        let after: std::collections::HashSet<&str> =
            new.keys.iter().map(|k| k.hash.as_str()).collect();
        let keys = new
            .keys
            .iter()
            .filter(|k| before.get(k.hash.as_str()) != Some(k))
            .cloned()
            .collect();
        let removed_keys = old
            .keys
            .iter()
            .filter(|k| !after.contains(k.hash.as_str()))
            .map(|k| k.hash.clone())
            .collect();
        Change {
            customers: changed(&old.customers, &new.customers),
            keys,
            removed_keys,
            webhook_events: changed(&old.webhook_events, &new.webhook_events),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.customers.is_empty()
            && self.keys.is_empty()
            && self.removed_keys.is_empty()
            && self.webhook_events.is_empty()
    }

    /// Applies the change to a running proxy's snapshot, in place: each
    /// shard it touches is copied once ([`Snapshot::set_key`]).
    pub(super) fn apply_to_snapshot(&self, snap: &mut Snapshot) {
        for (id, c) in &self.customers {
            snap.set_customer(id, c.as_ref());
        }
        for k in &self.keys {
            if let Some(hash) = decode(&k.hash) {
                snap.set_key(&hash, Some(k));
            }
        }
        for h in &self.removed_keys {
            if let Some(hash) = decode(h) {
                snap.set_key(&hash, None);
            }
        }
    }
}

pub(super) fn decode(hex_hash: &str) -> Option<crate::keys::KeyHash> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).ok()?;
    Some(hash)
}

/// The entries of `new` that differ from `old`'s, and those `old` had and
/// `new` has not (None).
fn changed<V: Clone + PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> BTreeMap<String, Option<V>> {
    let mut out: BTreeMap<String, Option<V>> = new
        .iter()
        .filter(|(id, v)| old.get(*id) != Some(v))
        .map(|(id, v)| (id.clone(), Some(v.clone())))
        .collect();
    for id in old.keys().filter(|id| !new.contains_key(*id)) {
        out.insert(id.clone(), None);
    }
    out
}

/// Changes folded into the last write of each record they touch.
#[derive(Debug, Default)]
pub(super) struct Folded {
    pub(super) customers: BTreeMap<String, Option<CustomerRecord>>,
    /// By hash, with the order in which each hash was first written.
    pub(super) keys: HashMap<String, Option<KeyRecord>>,
    order: Vec<String>,
    events: BTreeMap<String, Option<u64>>,
}

impl Folded {
    pub(super) fn new(changes: impl IntoIterator<Item = Change>) -> Folded {
        let mut f = Folded::default();
        for c in changes {
            f.customers.extend(c.customers);
            f.events.extend(c.webhook_events);
            let written = c.keys.into_iter().map(|k| (k.hash.clone(), Some(k)));
            let removed = c.removed_keys.into_iter().map(|h| (h, None));
            for (hash, v) in written.chain(removed) {
                if !f.keys.contains_key(&hash) {
                    f.order.push(hash.clone());
                }
                f.keys.insert(hash, v);
            }
        }
        f
    }

    /// The keys not yet taken (with [`HashMap::remove`] on `keys`), in the
    /// order they were first written: those the document did not hold.
    pub(super) fn remaining_keys(mut self) -> impl Iterator<Item = KeyRecord> {
        let order = std::mem::take(&mut self.order);
        order
            .into_iter()
            .filter_map(move |h| self.keys.remove(&h).flatten())
    }

    /// Applies the changes to the store's document: one pass over its keys
    /// whatever their number (a changed key stays where it stood; new keys
    /// go last, in the order they were written, as a rewrite of the
    /// document would have put them).
    fn apply(mut self, data: &mut StoreData) {
        for (id, v) in std::mem::take(&mut self.customers) {
            match v {
                Some(v) => data.customers.insert(id, v),
                None => data.customers.remove(&id),
            };
        }
        for (id, v) in std::mem::take(&mut self.events) {
            match v {
                Some(v) => data.webhook_events.insert(id, v),
                None => data.webhook_events.remove(&id),
            };
        }
        if self.keys.is_empty() {
            return;
        }
        data.keys.retain_mut(|k| match self.keys.remove(&k.hash) {
            None => true,
            Some(Some(now)) => {
                *k = now;
                true
            }
            Some(None) => false,
        });
        data.keys.extend(self.remaining_keys());
    }
}

/// Applies `changes`, in order, to the store's document (see
/// [`Folded::apply`]).
pub(super) fn apply(data: &mut StoreData, changes: impl IntoIterator<Item = Change>) {
    Folded::new(changes).apply(data);
}

/// The changes in the complete lines of `bytes` (a line not ended by a
/// newline is a write still in progress, or one a crash cut short: it is
/// not a change yet), and how many bytes they span. `first_line` is the
/// number of lines before `bytes` in the file, for messages.
pub(super) fn parse(
    path: &Path,
    bytes: &[u8],
    first_line: u64,
) -> Result<(Vec<Change>, usize), StoreError> {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut changes = Vec::new();
    for (i, line) in bytes[..end].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let change = serde_json::from_slice(line).map_err(|e| {
            let line = first_line + i as u64 + 1;
            StoreError::Corrupt(path.to_path_buf(), format!("line {line}: {e}"))
        })?;
        changes.push(change);
    }
    Ok((changes, end))
}

/// Appends `change` as one line and makes it durable; returns the
/// journal's length after it. A line a crashed writer left unfinished is
/// cut off first, so it cannot run into this one.
pub(super) fn append(path: &Path, change: &Change) -> Result<u64, StoreError> {
    let io = |e| StoreError::Io(path.to_path_buf(), e);
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let kept = whole_lines(&file, len).map_err(io)?;
    if kept != len {
        log::warn!(
            "{}: dropping an unfinished last line ({} bytes) a crashed writer left",
            path.display(),
            len - kept
        );
        file.set_len(kept).map_err(io)?;
    }
    let mut line = serde_json::to_vec(change).map_err(|e| StoreError::Invalid(e.to_string()))?;
    line.push(b'\n');
    if let Err(e) = file.write_all(&line).and_then(|()| file.sync_data()) {
        // Not durable, so not made: take back what may have been written,
        // or readers would apply a change its writer reported as failed.
        let _ = file.set_len(kept);
        return Err(io(e));
    }
    if !existed {
        super::file::sync_dir(path);
    }
    Ok(kept + line.len() as u64)
}

/// The length of `file`'s complete lines: `len` unless its last byte is not
/// a newline, then up to the last newline (read back in blocks).
fn whole_lines(file: &File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut block = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let buf = &mut block[..(end - start) as usize];
        file.read_exact_at(buf, start)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyHash;
    use crate::store::snapshot::tests::{observe, op, pool, record, Op, CUSTOMERS};
    use proptest::prelude::*;

    fn step(data: &mut StoreData, op: Op, hashes: &[KeyHash]) {
        match op {
            Op::PutKey {
                key,
                customer,
                revoked,
                expired,
            } => {
                let rec = record(key, &hashes[key], CUSTOMERS[customer], revoked, expired);
                data.keys.retain(|k| k.hash != rec.hash);
                data.keys.push(rec);
            }
            Op::RemoveKey(key) => data.keys.retain(|k| k.hash != hex::encode(hashes[key])),
            Op::PutCustomer {
                customer,
                plan,
                suspended,
            } => {
                let rec = CustomerRecord {
                    plan: plan.map(|p| format!("plan{p}")),
                    suspended,
                    ..CustomerRecord::default()
                };
                data.customers.insert(CUSTOMERS[customer].into(), rec);
                let event = format!("stripe:evt_{customer}");
                data.webhook_events.insert(event, 1);
            }
            Op::RemoveCustomer(customer) => {
                data.customers.remove(CUSTOMERS[customer]);
                data.webhook_events
                    .remove(&format!("stripe:evt_{customer}"));
            }
        }
    }

    /// The store with its keys in hash order: a replay puts a changed key
    /// where it stood, a rewrite last, and neither order is a promise.
    fn sorted(mut d: StoreData) -> StoreData {
        d.keys.sort_by(|a, b| a.hash.cmp(&b.hash));
        d
    }

    proptest! {
        /// The journal's lines, replayed in one pass onto the document
        /// they followed, replayed again onto the document they were
        /// folded into (a reader racing a compaction), and applied line by
        /// line to a running snapshot, all end where the store did.
        #[test]
        fn a_journal_replays_to_the_store_it_recorded(
            ops in proptest::collection::vec(op(), 1..40),
            document in 0..40usize,
        ) {
            let hashes = pool();
            let mut data = StoreData::default();
            let mut changes = Vec::new();
            let mut snap = Snapshot::build(&data);
            let mut base = data.clone();
            for (i, op) in ops.into_iter().enumerate() {
                if i == document {
                    base = data.clone();
                    snap = Snapshot::build(&data);
                    changes.clear();
                }
                let old = data.clone();
                step(&mut data, op, &hashes);
                let change = Change::between(&old, &data);
                let mut line = serde_json::to_vec(&change).unwrap();
                line.push(b'\n');
                let (mut parsed, used) = parse(Path::new("keys.db.journal"), &line, 0).unwrap();
                prop_assert_eq!(used, line.len());
                let change = parsed.pop().unwrap();
                change.apply_to_snapshot(&mut snap);
                changes.push(change);
            }
            prop_assert_eq!(observe(&snap), observe(&Snapshot::build(&data)));
            apply(&mut base, changes.clone());
            prop_assert_eq!(sorted(base), sorted(data.clone()));
            let mut folded = data.clone();
            apply(&mut folded, changes);
            prop_assert_eq!(sorted(folded), sorted(data));
        }
    }

    #[test]
    fn an_unfinished_line_is_not_a_change_yet() {
        let p = Path::new("keys.db.journal");
        let whole = b"{\"removed_keys\":[\"00\"]}\n";
        let mut bytes = whole.to_vec();
        bytes.extend_from_slice(b"{\"keys\":[{\"id");
        let (changes, used) = parse(p, &bytes, 0).unwrap();
        assert_eq!((changes.len(), used), (1, whole.len()));
        let bad = parse(p, b"{}\n{\"keys\": nope}\n", 7)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("line 9:"), "{bad}");
    }
}
