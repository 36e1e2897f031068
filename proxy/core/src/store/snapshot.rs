//! The lookup snapshot: an immutable, indexed view of the store for the hot
//! path. Keys and customers sit in [`SHARDS`] shards each, behind their own
//! `Arc`, so a change to one key or customer ([`Snapshot::with_key`],
//! [`Snapshot::with_customer`]) copies the shards it touches (1/256 of the
//! store) and shares the rest with the snapshot before it, instead of
//! rebuilding everything: the Redis replica applies each published change
//! that way, and the file store each line of its journal, in place
//! ([`Snapshot::set_key`], [`Snapshot::set_customer`]); the file store also
//! loads its document record by record that way.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use super::{admin, CustomerRecord, Identity, KeyInfo, KeyRecord, KeyRejection, StoreData};
use crate::clock::{parse_rfc3339, Millis};
use crate::keys::{self, KeyHash};

/// Shards of keys, and of customers. A key's shard is its hash's ninth
/// byte, which the in-shard index (the first eight) does not use.
pub const SHARDS: usize = 256;

#[derive(Debug, Clone)]
struct Entry {
    hash: KeyHash,
    expires: Option<Millis>,
    revoked: bool,
    info: Identity,
}

/// The first 8 bytes of a SHA-256 are already uniformly distributed: they
/// index the key map as they are, with no second hash.
#[derive(Debug, Default, Clone, Copy)]
struct PassThrough(u64);

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

/// One shard of keys, indexed by the first 8 bytes of the hash; the full
/// hash is then compared in constant time. Keys sharing those 8 bytes
/// (never seen in practice) go to `overflow`.
#[derive(Debug, Default, Clone)]
struct KeyShard {
    keys: PassThroughMap<Entry>,
    overflow: Vec<Entry>,
}

fn bucket(hash: &KeyHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(b)
}

fn key_shard(hash: &KeyHash) -> usize {
    usize::from(hash[8])
}

impl KeyShard {
    fn get(&self, hash: &KeyHash) -> Option<&Entry> {
        let found = self
            .keys
            .get(&bucket(hash))
            .filter(|e| keys::hashes_equal(&e.hash, hash));
        if found.is_some() || self.overflow.is_empty() {
            return found;
        }
        self.overflow
            .iter()
            .find(|e| keys::hashes_equal(&e.hash, hash))
    }

    fn get_mut(&mut self, hash: &KeyHash) -> Option<&mut Entry> {
        let b = bucket(hash);
        if self.keys.get(&b).is_some_and(|e| e.hash == *hash) {
            return self.keys.get_mut(&b);
        }
        self.overflow.iter_mut().find(|e| e.hash == *hash)
    }

    fn insert(&mut self, entry: Entry) {
        match self.keys.entry(bucket(&entry.hash)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
            std::collections::hash_map::Entry::Occupied(_) => self.overflow.push(entry),
        }
    }

    fn remove(&mut self, hash: &KeyHash) -> Option<Entry> {
        let b = bucket(hash);
        if self.keys.get(&b).is_some_and(|e| e.hash == *hash) {
            return self.keys.remove(&b);
        }
        let i = self.overflow.iter().position(|e| e.hash == *hash)?;
        Some(self.overflow.swap_remove(i))
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.keys.values().chain(&self.overflow)
    }
}

/// What the snapshot keeps of a customer.
#[derive(Debug, Clone, Default)]
pub struct CustomerView {
    /// None: the default plan.
    pub plan: Option<Arc<str>>,
    pub suspended: bool,
    pub billing: Option<super::BillingStatus>,
    pub limits: Option<Arc<[crate::plans::Limit]>>,
}

impl CustomerView {
    fn of(c: &CustomerRecord) -> Self {
        CustomerView {
            plan: c.plan.as_deref().map(Into::into),
            suspended: c.is_suspended(),
            billing: c.billing.as_ref().map(|b| b.status),
            // Stored limits were checked when written; one that no longer
            // parses is left out rather than refusing all.
            limits: c
                .limits
                .as_ref()
                .map(|l| l.iter().filter_map(|s| s.limit()).collect()),
        }
    }
}

/// A customer: its record as the store has it (None: it has keys but no
/// record, so the default plan), and its keys, so that a change to the
/// customer reaches them without a scan of every key.
#[derive(Debug, Clone, Default)]
struct Slot {
    view: Option<CustomerView>,
    keys: Vec<KeyHash>,
}

type CustomerShard = HashMap<Arc<str>, Slot>;

/// An immutable, indexed view of the store for the hot path.
#[derive(Debug, Clone)]
pub struct Snapshot {
    keys: Vec<Arc<KeyShard>>,
    customers: Vec<Arc<CustomerShard>>,
    /// Picks a customer's shard; kept by every snapshot derived from this
    /// one, so a customer stays in its shard.
    spread: std::collections::hash_map::RandomState,
    pub key_count: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            keys: vec![Arc::default(); SHARDS],
            customers: vec![Arc::default(); SHARDS],
            spread: Default::default(),
            key_count: 0,
        }
    }
}

impl Snapshot {
    pub fn build(data: &StoreData) -> Self {
        let spread = std::collections::hash_map::RandomState::new();
        let mut customers: Vec<CustomerShard> = vec![HashMap::new(); SHARDS];
        for (id, c) in &data.customers {
            let id: Arc<str> = id.as_str().into();
            let slot = Slot {
                view: Some(CustomerView::of(c)),
                keys: Vec::new(),
            };
            customers[customer_shard(&spread, &id)].insert(id, slot);
        }
        let mut shards: Vec<KeyShard> = vec![KeyShard::default(); SHARDS];
        let per_shard = data.keys.len() / SHARDS + data.keys.len() / SHARDS / 8 + 1;
        for s in &mut shards {
            s.keys.reserve(per_shard);
        }
        let mut key_count = 0;
        for k in &data.keys {
            let Some(hash) = decode_hash(k) else { continue };
            let shard = &mut customers[customer_shard(&spread, &k.customer)];
            let entry = link(shard, k, hash);
            shards[key_shard(&hash)].insert(entry);
            key_count += 1;
        }
        // A customer's first key is allocated alone; only customers with
        // several keys can hold spare room.
        for shard in &mut customers {
            for slot in shard.values_mut() {
                slot.keys.shrink_to_fit();
            }
        }
        Snapshot {
            keys: shards.into_iter().map(Arc::new).collect(),
            customers: customers.into_iter().map(Arc::new).collect(),
            spread,
            key_count,
        }
    }

    /// This snapshot with the key of `hash` as `record` says (None:
    /// removed). The shards it does not touch are shared with `self`.
    pub fn with_key(&self, hash: &KeyHash, record: Option<&KeyRecord>) -> Snapshot {
        let mut next = self.clone();
        next.set_key(hash, record);
        next
    }

    /// [`with_key`](Self::with_key) in place: a shard already copied by an
    /// earlier change is changed without another copy, so a run of changes
    /// (the file store's journal) copies each shard it touches once.
    pub fn set_key(&mut self, hash: &KeyHash, record: Option<&KeyRecord>) {
        let shard = Arc::make_mut(&mut self.keys[key_shard(hash)]);
        if let Some(old) = shard.remove(hash) {
            self.key_count -= 1;
            let cs = Arc::make_mut(
                &mut self.customers[customer_shard(&self.spread, &old.info.customer)],
            );
            if let Some(slot) = cs.get_mut(&*old.info.customer) {
                slot.keys.retain(|h| h != hash);
                if slot.view.is_none() && slot.keys.is_empty() {
                    cs.remove(&*old.info.customer);
                }
            }
        }
        if let Some(rec) = record {
            let cs =
                Arc::make_mut(&mut self.customers[customer_shard(&self.spread, &rec.customer)]);
            let entry = link(cs, rec, *hash);
            Arc::make_mut(&mut self.keys[key_shard(hash)]).insert(entry);
            self.key_count += 1;
        }
    }

    /// This snapshot with customer `id`'s record as `record` says (None:
    /// it has none, so the default plan), and its keys following it.
    pub fn with_customer(&self, id: &str, record: Option<&CustomerRecord>) -> Snapshot {
        let mut next = self.clone();
        next.set_customer(id, record);
        next
    }

    /// [`with_customer`](Self::with_customer) in place, as
    /// [`set_key`](Self::set_key).
    pub fn set_customer(&mut self, id: &str, record: Option<&CustomerRecord>) {
        let cs = Arc::make_mut(&mut self.customers[customer_shard(&self.spread, id)]);
        let customer: Arc<str> = match cs.get_key_value(id) {
            Some((k, _)) => Arc::clone(k),
            None => id.into(),
        };
        let slot = cs.entry(Arc::clone(&customer)).or_default();
        slot.view = record.map(CustomerView::of);
        let view = slot.view.clone().unwrap_or_default();
        let hashes = if slot.view.is_none() && slot.keys.is_empty() {
            cs.remove(id);
            Vec::new()
        } else {
            slot.keys.clone()
        };
        for h in &hashes {
            let shard = Arc::make_mut(&mut self.keys[key_shard(h)]);
            if let Some(e) = shard.get_mut(h) {
                let key_id = Arc::clone(&e.info.key_id);
                e.info = Arc::new(KeyInfo::new(key_id, Arc::clone(&customer), view.clone()));
            }
        }
    }

    /// How many keys are in each [`admin::status`] at `now` (the
    /// `tollgate_keys` gauge), from the snapshot: no read of the store.
    pub fn key_statuses(&self, now: Millis) -> BTreeMap<&'static str, i64> {
        let mut counts: BTreeMap<&'static str, i64> = ["active", "expiring", "expired", "revoked"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
        for e in self.keys.iter().flat_map(|s| s.entries()) {
            *counts
                .entry(admin::status_of(e.revoked, e.expires, now))
                .or_default() += 1;
        }
        counts
    }

    /// Every customer the store has a record of.
    pub fn customer_ids(&self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.customers
            .iter()
            .flat_map(|s| s.iter())
            .filter(|(_, slot)| slot.view.is_some())
            .map(|(id, _)| Arc::clone(id))
    }

    /// A customer's plan name (None: default), suspension and billing state.
    pub fn customer(&self, id: &str) -> Option<CustomerView> {
        self.customers[customer_shard(&self.spread, id)]
            .get(id)
            .and_then(|slot| slot.view.clone())
    }

    /// Whether a key of this hash is in the snapshot (valid or not).
    pub fn holds(&self, hash: &KeyHash) -> bool {
        self.keys[key_shard(hash)].get(hash).is_some()
    }

    pub fn lookup(&self, hash: &KeyHash, now: Millis) -> Result<Identity, KeyRejection> {
        let e = self.keys[key_shard(hash)]
            .get(hash)
            .ok_or(KeyRejection::Unknown)?;
        if e.revoked {
            return Err(KeyRejection::Revoked);
        }
        if e.expires.is_some_and(|t| t <= now) {
            return Err(KeyRejection::Expired);
        }
        Ok(Arc::clone(&e.info))
    }
}

#[cfg(test)]
impl Snapshot {
    /// How many of the shards (keys and customers) `self` shares with
    /// `other`: what an incremental change left uncopied.
    pub(crate) fn shared_shards(&self, other: &Snapshot) -> usize {
        fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> usize {
            a.iter().zip(b).filter(|(x, y)| Arc::ptr_eq(x, y)).count()
        }
        same(&self.keys, &other.keys) + same(&self.customers, &other.customers)
    }
}

fn customer_shard(spread: &std::collections::hash_map::RandomState, id: &str) -> usize {
    (spread.hash_one(id) % SHARDS as u64) as usize
}

fn decode_hash(k: &KeyRecord) -> Option<KeyHash> {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
        log::warn!(
            "key store: key {} has a malformed hash and is ignored",
            k.id
        );
        return None;
    }
    Some(hash)
}

/// The entry of key `k`, resolved against its customer in `shard` (a slot
/// made for a customer with no record), and noted among that customer's keys.
fn link(shard: &mut CustomerShard, k: &KeyRecord, hash: KeyHash) -> Entry {
    let customer: Arc<str> = match shard.get_key_value(k.customer.as_str()) {
        Some((c, _)) => Arc::clone(c),
        None => k.customer.as_str().into(),
    };
    let slot = shard.entry(Arc::clone(&customer)).or_default();
    if slot.keys.is_empty() {
        slot.keys.reserve_exact(1);
    }
    slot.keys.push(hash);
    Entry {
        hash,
        // An expiry that does not parse fails closed: expired.
        expires: k.expires.as_deref().map(|e| parse_rfc3339(e).unwrap_or(0)),
        revoked: k.revoked.is_some(),
        info: Arc::new(KeyInfo::new(
            k.id.as_str().into(),
            customer,
            slot.view.clone().unwrap_or_default(),
        )),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: Millis = 1_800_000_000_000;

    /// Hashes chosen to meet in the index: 0 and 1 share their first 8
    /// bytes and their shard (1 goes to the overflow), 2 and 3 their first
    /// 8 bytes but not their shard.
    pub(crate) fn pool() -> Vec<KeyHash> {
        let mut h1 = [1u8; 32];
        h1[31] = 9;
        let mut h3 = [2u8; 32];
        h3[8] = 7;
        vec![[1u8; 32], h1, [2u8; 32], h3, [3u8; 32], [4u8; 32]]
    }

    pub(crate) const CUSTOMERS: [&str; 3] = ["acme", "globex", "initech"];

    #[derive(Debug, Clone)]
    pub(crate) enum Op {
        PutKey {
            key: usize,
            customer: usize,
            revoked: bool,
            expired: bool,
        },
        RemoveKey(usize),
        PutCustomer {
            customer: usize,
            plan: Option<usize>,
            suspended: bool,
        },
        RemoveCustomer(usize),
    }

    pub(crate) fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize, 0..3usize, any::<bool>(), any::<bool>()).prop_map(
                |(key, customer, revoked, expired)| Op::PutKey {
                    key,
                    customer,
                    revoked,
                    expired
                }
            ),
            (0..6usize).prop_map(Op::RemoveKey),
            (0..3usize, proptest::option::of(0..2usize), any::<bool>()).prop_map(
                |(customer, plan, suspended)| Op::PutCustomer {
                    customer,
                    plan,
                    suspended
                }
            ),
            (0..3usize).prop_map(Op::RemoveCustomer),
        ]
    }

    pub(crate) fn record(
        n: usize,
        hash: &KeyHash,
        customer: &str,
        revoked: bool,
        expired: bool,
    ) -> KeyRecord {
        KeyRecord {
            id: format!("key_{n}_{customer}"),
            hash: hex::encode(hash),
            start: "tg_test_abcd".into(),
            customer: customer.into(),
            name: None,
            meta: None,
            created: "2026-01-01T00:00:00Z".into(),
            expires: expired.then(|| "2020-01-01T00:00:00Z".into()),
            revoked: revoked.then(|| "2026-01-02T00:00:00Z".into()),
        }
    }

    /// Everything a caller can see of a snapshot.
    pub(crate) fn observe(s: &Snapshot) -> String {
        let mut out = String::new();
        for h in pool() {
            let seen = s.lookup(&h, NOW).map(|i| {
                (
                    i.key_id.to_string(),
                    i.customer.to_string(),
                    i.plan.clone(),
                    i.suspended,
                    i.billing,
                )
            });
            out += &format!("{seen:?}\n");
        }
        for c in CUSTOMERS {
            out += &format!("{c}: {:?}\n", s.customer(c));
        }
        let mut ids: Vec<_> = s.customer_ids().collect();
        ids.sort();
        out += &format!("{ids:?} {} {:?}", s.key_count, s.key_statuses(NOW));
        out
    }

    proptest! {
        /// Applied change by change, a snapshot answers every question as
        /// one built from the resulting store does, and the snapshots it
        /// was derived from still answer as they did.
        #[test]
        fn a_snapshot_changed_key_by_key_answers_as_one_built_whole(ops in proptest::collection::vec(op(), 1..40)) {
            let hashes = pool();
            let mut data = StoreData::default();
            let mut snap = Snapshot::build(&data);
            for op in ops {
                let before = observe(&snap);
                let next = match op {
                    Op::PutKey { key, customer, revoked, expired } => {
                        let rec = record(key, &hashes[key], CUSTOMERS[customer], revoked, expired);
                        data.keys.retain(|k| k.hash != rec.hash);
                        data.keys.push(rec.clone());
                        snap.with_key(&hashes[key], Some(&rec))
                    }
                    Op::RemoveKey(key) => {
                        data.keys.retain(|k| k.hash != hex::encode(hashes[key]));
                        snap.with_key(&hashes[key], None)
                    }
                    Op::PutCustomer { customer, plan, suspended } => {
                        let rec = CustomerRecord {
                            plan: plan.map(|p| format!("plan{p}")),
                            suspended,
                            ..CustomerRecord::default()
                        };
                        data.customers.insert(CUSTOMERS[customer].into(), rec.clone());
                        snap.with_customer(CUSTOMERS[customer], Some(&rec))
                    }
                    Op::RemoveCustomer(customer) => {
                        data.customers.remove(CUSTOMERS[customer]);
                        snap.with_customer(CUSTOMERS[customer], None)
                    }
                };
                prop_assert_eq!(observe(&snap), before, "the snapshot before the change is untouched");
                prop_assert_eq!(observe(&next), observe(&Snapshot::build(&data)));
                snap = next;
            }
        }
    }

    #[test]
    fn a_change_copies_only_the_shards_it_touches() {
        let hashes = pool();
        let data = StoreData {
            keys: vec![
                record(0, &hashes[0], "acme", false, false),
                record(4, &hashes[4], "globex", false, false),
            ],
            ..StoreData::default()
        };
        let a = Snapshot::build(&data);
        let b = a.with_key(&hashes[0], None);
        let shared = |x: &Snapshot, y: &Snapshot| {
            x.keys
                .iter()
                .zip(&y.keys)
                .filter(|(p, q)| Arc::ptr_eq(p, q))
                .count()
        };
        assert_eq!(shared(&a, &b), SHARDS - 1, "one key shard copied");
        assert!(b.lookup(&hashes[4], NOW).is_ok());
        assert_eq!(b.lookup(&hashes[0], NOW).err(), Some(KeyRejection::Unknown));
        let c = b.with_customer("globex", Some(&CustomerRecord::default()));
        assert_eq!(
            shared(&b, &c),
            SHARDS - 1,
            "the key of the customer's shard copied"
        );
    }
}
