//! The records of a load of the file store on their way into the running
//! proxy's snapshot ([`FileStore::load`](super::FileStore)): the journal
//! folded first, each document record replaced by the journal's last
//! write of it, then the records only the journal holds.

use super::super::journal::{self, Folded};
use super::super::{CustomerRecord, HashSeen, Inspect, KeyRecord, Snapshot};

/// The records of a load on their way into the snapshot.
pub(super) struct Loader<'a> {
    pub(super) snap: Snapshot,
    pub(super) folded: Folded,
    pub(super) inspect: &'a mut dyn Inspect,
}

impl Loader<'_> {
    fn put_key(&mut self, k: &KeyRecord) {
        match journal::decode(&k.hash) {
            // A second record of one hash is not the key's (the first is,
            // as `Snapshot::build` has it; `check` reports the second).
            Some(hash) if self.snap.holds(&hash) => {
                self.inspect.key(k, HashSeen::Repeated);
                log::warn!(
                    "key store: key {} repeats the hash of an earlier key and is ignored",
                    k.id
                );
            }
            Some(hash) => {
                self.inspect.key(k, HashSeen::First);
                self.snap.set_key(&hash, Some(k));
            }
            None => {
                self.inspect.key(k, HashSeen::Malformed);
                log::warn!(
                    "key store: key {} has a malformed hash and is ignored",
                    k.id
                );
            }
        }
    }

    /// The snapshot, with what only the journal holds.
    pub(super) fn finish(mut self) -> Snapshot {
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

impl super::super::document::Records for Loader<'_> {
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
