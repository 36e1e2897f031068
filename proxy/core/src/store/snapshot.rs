//! The lookup snapshot: an immutable, indexed view of the store for the hot
//! path. Keys and customers sit in [`SHARDS`] shards each, behind their own
//! `Arc`, so a change to one key or customer ([`Snapshot::with_key`],
//! [`Snapshot::with_customer`]) copies the shard it touches (1/256 of the
//! store) and shares the rest with the snapshot before it, instead of
//! rebuilding everything: the Redis replica applies each published change
//! that way, and the file store each line of its journal, in place
//! ([`Snapshot::set_key`], [`Snapshot::set_customer`]); the file store also
//! loads its document record by record that way.
//!
//! Sized for a million keys: a key is one plain [`Entry`] in its shard's
//! array (its id inline; its customer's id an `Arc<str>`, shared with the
//! customer's record when that was there first), found through an index
//! of 16-byte slots;
//! a customer is its view, in its shard's map. A lookup joins the two into
//! the [`Identity`] it returns, so a change to a customer touches nothing
//! but its own record.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use super::{
    admin, CustomLimits, CustomerRecord, Identity, KeyId, KeyInfo, KeyRecord, KeyRejection,
    StoreData,
};
use crate::clock::{parse_rfc3339, Millis};
use crate::keys::{self, KeyHash};

/// Shards of keys, and of customers. A key's shard is its hash's ninth
/// byte, which the in-shard index (the first eight) does not use; a
/// customer's the low byte of its id's hash. One byte names either.
pub const SHARDS: usize = 256;
const _: () = assert!(SHARDS == 256, "a shard is named by one byte");

/// An [`Entry`]'s expiry when it has none.
const NEVER: Millis = Millis::MAX;

#[derive(Debug, Clone)]
struct Entry {
    hash: KeyHash,
    /// [`NEVER`] when the key does not expire.
    expires: Millis,
    revoked: bool,
    /// Its customer's shard (in what would be padding), so a lookup
    /// hashes the customer's id once, in that shard's map.
    customer_shard: u8,
    key_id: KeyId,
    customer: Arc<str>,
}

impl Entry {
    fn expiry(&self) -> Option<Millis> {
        (self.expires != NEVER).then_some(self.expires)
    }
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

/// One shard of keys: their entries in one array, indexed by the first 8
/// bytes of the hash (the index holds positions, not entries, so the
/// slack of its power-of-two table costs 16 bytes a slot, not an entry);
/// the full hash is then compared in constant time. Keys sharing those 8
/// bytes (never seen in practice) go to `overflow`.
#[derive(Debug, Default, Clone)]
struct KeyShard {
    index: PassThroughMap<u32>,
    entries: Vec<Entry>,
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
    fn with_capacity(n: usize) -> Self {
        KeyShard {
            index: PassThroughMap::with_capacity_and_hasher(n, Default::default()),
            entries: Vec::with_capacity(n),
            overflow: Vec::new(),
        }
    }

    /// The position in `entries` of the entry of `hash`, if it is there.
    fn position(&self, hash: &KeyHash) -> Option<usize> {
        let i = *self.index.get(&bucket(hash))? as usize;
        self.entries
            .get(i)
            .is_some_and(|e| keys::hashes_equal(&e.hash, hash))
            .then_some(i)
    }

    fn get(&self, hash: &KeyHash) -> Option<&Entry> {
        if let Some(i) = self.position(hash) {
            return self.entries.get(i);
        }
        self.overflow
            .iter()
            .find(|e| keys::hashes_equal(&e.hash, hash))
    }

    fn insert(&mut self, entry: Entry) {
        let at = u32::try_from(self.entries.len());
        match (self.index.entry(bucket(&entry.hash)), at) {
            (std::collections::hash_map::Entry::Vacant(v), Ok(at)) => {
                v.insert(at);
                // A shard copied for a change has no spare room, and a
                // push would double it: past a thousand entries, grow by
                // an eighth instead (still amortised O(1) a key).
                let len = self.entries.len();
                if len == self.entries.capacity() && len >= 1024 {
                    self.entries.reserve_exact(len / 8);
                }
                self.entries.push(entry);
            }
            _ => self.overflow.push(entry),
        }
    }

    fn remove(&mut self, hash: &KeyHash) -> Option<Entry> {
        if let Some(i) = self.position(hash) {
            self.index.remove(&bucket(hash));
            let e = self.entries.swap_remove(i);
            // The last entry took its place.
            if let Some(moved) = self.entries.get(i) {
                self.index.insert(bucket(&moved.hash), i as u32);
            }
            return Some(e);
        }
        let i = self.overflow.iter().position(|e| e.hash == *hash)?;
        Some(self.overflow.swap_remove(i))
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().chain(&self.overflow)
    }
}

/// What the snapshot keeps of a customer.
#[derive(Debug, Clone, Default)]
pub struct CustomerView {
    /// None: the default plan.
    pub plan: Option<Arc<str>>,
    pub suspended: bool,
    pub billing: Option<super::BillingStatus>,
    pub limits: Option<Arc<CustomLimits>>,
}

impl CustomerView {
    fn of(c: &CustomerRecord, plan_names: &mut Vec<Arc<str>>) -> Self {
        CustomerView {
            plan: c.plan.as_deref().map(|p| intern(plan_names, p)),
            suspended: c.is_suspended(),
            billing: c.billing.as_ref().map(|b| b.status),
            // Stored limits were checked when written; one that no longer
            // parses is left out rather than refusing all.
            limits: c.limits.as_ref().map(|l| {
                Arc::new(CustomLimits {
                    limits: l.iter().filter_map(|s| s.limit()).collect(),
                    plan: std::sync::OnceLock::new(),
                })
            }),
        }
    }
}

/// How many plan names a snapshot shares among its customers; past that
/// (no real store has so many plans), a customer's is its own. Names are
/// kept for the life of the snapshot and those derived from it, the
/// snapshot a process builds at start or on a full reload.
const PLAN_NAMES: usize = 64;

/// `name` as an `Arc` shared by every customer on that plan: one
/// allocation, and one cache line a lookup touches, per plan.
fn intern(names: &mut Vec<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(n) = names.iter().find(|n| ***n == *name) {
        return Arc::clone(n);
    }
    let n: Arc<str> = name.into();
    if names.len() < PLAN_NAMES {
        names.push(Arc::clone(&n));
    }
    n
}

/// The customers with a record in the store. A customer with keys and no
/// record has the default plan, and is not here.
type CustomerShard = HashMap<Arc<str>, CustomerView>;

/// An immutable, indexed view of the store for the hot path.
#[derive(Debug, Clone)]
pub struct Snapshot {
    keys: Vec<Arc<KeyShard>>,
    customers: Vec<Arc<CustomerShard>>,
    /// Picks a customer's shard; kept by every snapshot derived from this
    /// one, so a customer stays in its shard.
    spread: std::collections::hash_map::RandomState,
    plan_names: Vec<Arc<str>>,
    pub key_count: usize,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            keys: vec![Arc::default(); SHARDS],
            customers: vec![Arc::default(); SHARDS],
            spread: Default::default(),
            plan_names: Vec::new(),
            key_count: 0,
        }
    }
}

impl Snapshot {
    pub fn build(data: &StoreData) -> Self {
        let spread = std::collections::hash_map::RandomState::new();
        let mut customers: Vec<CustomerShard> = vec![HashMap::new(); SHARDS];
        let mut plan_names = Vec::new();
        for (id, c) in &data.customers {
            customers[usize::from(customer_shard(&spread, id))]
                .insert(id.as_str().into(), CustomerView::of(c, &mut plan_names));
        }
        let per_shard = data.keys.len() / SHARDS + data.keys.len() / SHARDS / 8 + 1;
        let mut shards: Vec<KeyShard> = (0..SHARDS)
            .map(|_| KeyShard::with_capacity(per_shard))
            .collect();
        let mut key_count = 0;
        for k in &data.keys {
            let Some(hash) = decode_hash(k) else { continue };
            let cs = customer_shard(&spread, &k.customer);
            let entry = entry(&customers[usize::from(cs)], cs, k, hash);
            shards[key_shard(&hash)].insert(entry);
            key_count += 1;
        }
        Snapshot {
            keys: shards.into_iter().map(Arc::new).collect(),
            customers: customers.into_iter().map(Arc::new).collect(),
            spread,
            plan_names,
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
        let new = record.map(|rec| {
            let cs = customer_shard(&self.spread, &rec.customer);
            entry(&self.customers[usize::from(cs)], cs, rec, *hash)
        });
        let shard = Arc::make_mut(&mut self.keys[key_shard(hash)]);
        if shard.remove(hash).is_some() {
            self.key_count -= 1;
        }
        if let Some(entry) = new {
            shard.insert(entry);
            self.key_count += 1;
        }
    }

    /// This snapshot with customer `id`'s record as `record` says (None:
    /// it has none, so the default plan). Its keys see it on their next
    /// lookup: nothing of theirs changes.
    pub fn with_customer(&self, id: &str, record: Option<&CustomerRecord>) -> Snapshot {
        let mut next = self.clone();
        next.set_customer(id, record);
        next
    }

    /// [`with_customer`](Self::with_customer) in place, as
    /// [`set_key`](Self::set_key).
    pub fn set_customer(&mut self, id: &str, record: Option<&CustomerRecord>) {
        let cs = Arc::make_mut(&mut self.customers[usize::from(customer_shard(&self.spread, id))]);
        match (record, cs.get_mut(id)) {
            (Some(c), Some(view)) => *view = CustomerView::of(c, &mut self.plan_names),
            (Some(c), None) => {
                cs.insert(id.into(), CustomerView::of(c, &mut self.plan_names));
            }
            (None, _) => {
                cs.remove(id);
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
                .entry(admin::status_of(e.revoked, e.expiry(), now))
                .or_default() += 1;
        }
        counts
    }

    /// Every customer the store has a record of.
    pub fn customer_ids(&self) -> impl Iterator<Item = Arc<str>> + '_ {
        self.customers.iter().flat_map(|s| s.keys()).map(Arc::clone)
    }

    /// A customer's plan name (None: default), suspension and billing state.
    pub fn customer(&self, id: &str) -> Option<CustomerView> {
        self.customers[usize::from(customer_shard(&self.spread, id))]
            .get(id)
            .cloned()
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
        if e.expires <= now {
            return Err(KeyRejection::Expired);
        }
        let view = self.customers[usize::from(e.customer_shard)]
            .get(&*e.customer)
            .cloned()
            .unwrap_or_default();
        Ok(Arc::new(KeyInfo::new(
            e.key_id.clone(),
            Arc::clone(&e.customer),
            view,
        )))
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

fn customer_shard(spread: &std::collections::hash_map::RandomState, id: &str) -> u8 {
    // SHARDS is 256: the low byte.
    spread.hash_one(id) as u8
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

/// The entry of key `k`, whose customer is in shard `shard`
/// (`customers`); its customer's id shared with the customer's record
/// there, when it has one.
fn entry(customers: &CustomerShard, shard: u8, k: &KeyRecord, hash: KeyHash) -> Entry {
    let customer: Arc<str> = match customers.get_key_value(k.customer.as_str()) {
        Some((c, _)) => Arc::clone(c),
        None => k.customer.as_str().into(),
    };
    Entry {
        hash,
        // An expiry that does not parse fails closed: expired.
        expires: k
            .expires
            .as_deref()
            .map_or(NEVER, |e| parse_rfc3339(e).unwrap_or(0)),
        revoked: k.revoked.is_some(),
        customer_shard: shard,
        key_id: KeyId::new(&k.id),
        customer,
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
    fn a_key_id_of_any_length_comes_back_as_stored() {
        let hashes = pool();
        let ids = [
            "key_0123456789abcdef".to_string(),
            "k".repeat(22),
            "k".repeat(23),
            "kéy_ünïcode_ідентифікатор".into(),
        ];
        let mut data = StoreData::default();
        for (i, id) in ids.iter().enumerate() {
            data.keys.push(KeyRecord {
                id: id.to_string(),
                ..record(i, &hashes[i + 2], "acme", false, false)
            });
        }
        let snap = Snapshot::build(&data);
        for (i, id) in ids.iter().enumerate() {
            let found = snap
                .lookup(&hashes[i + 2], NOW)
                .map(|k| k.key_id.to_string());
            assert_eq!(found.as_deref(), Ok(&**id));
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
        let suspended = CustomerRecord {
            suspended: true,
            ..CustomerRecord::default()
        };
        let c = b.with_customer("globex", Some(&suspended));
        assert_eq!(
            shared(&b, &c),
            SHARDS,
            "a customer's change copies no key shard"
        );
        let customers_shared = c
            .customers
            .iter()
            .zip(&b.customers)
            .filter(|(p, q)| Arc::ptr_eq(p, q))
            .count();
        assert_eq!(customers_shared, SHARDS - 1, "and one customer shard");
        assert!(c.lookup(&hashes[4], NOW).is_ok_and(|i| i.suspended));
        assert!(b.lookup(&hashes[4], NOW).is_ok_and(|i| !i.suspended));
    }
}
