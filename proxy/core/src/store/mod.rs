//! Key and customer storage. The proxy looks keys up in an in-memory
//! [`Snapshot`]; backends keep that snapshot fresh. The file store (the
//! embedded default) is a JSON document and a journal of the changes since
//! it was written, which running proxies apply within ~250 ms of a change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::keys::KeyHash;

pub mod admin;
mod document;
mod file;
mod journal;
mod snapshot;

pub use file::{FileStore, StoreText};

pub use snapshot::{CustomerView, Snapshot, SHARDS};

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
    /// The operator's own data about the key (bounded: see
    /// [`admin::check_meta`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
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
    /// What the billing provider last said, when its webhooks drive the
    /// plan (`billing_webhooks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<BillingState>,
    /// This customer's own limits, instead of its plan's (`[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Vec<crate::plans::custom::LimitSpec>>,
}

impl CustomerRecord {
    /// Suspended by an operator, or by billing (`on_past_due: suspend`).
    pub fn is_suspended(&self) -> bool {
        self.suspended || self.billing.as_ref().is_some_and(|b| b.suspended)
    }
}

/// A customer's subscription as its billing provider's webhooks describe it.
/// Unknown fields are tolerated (unlike the rest of the store): during a
/// rolling upgrade an older instance must not drop a newer one's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BillingState {
    /// `stripe`, `paystack`, `paddle` or `standard`.
    pub provider: String,
    pub status: BillingStatus,
    /// The plan the subscription pays for, restored when a late payment
    /// arrives (`on_past_due` may have moved the customer elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_plan: Option<String>,
    /// Suspended by billing; lifted by a payment or an operator's resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// The provider's time of the last event applied (Unix ms): an older
    /// event changes nothing, as providers do not deliver in order.
    pub last_event_at: u64,
    pub last_event_id: String,
}

/// A subscription's state, as the dashboard and `/_tollgate/usage` show it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BillingStatus {
    Active,
    PastDue,
    Paused,
    /// Cancelled at the end of the period: the plan stays until then.
    Canceling,
    Canceled,
}

impl BillingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingStatus::Active => "active",
            BillingStatus::PastDue => "past_due",
            BillingStatus::Paused => "paused",
            BillingStatus::Canceling => "canceling",
            BillingStatus::Canceled => "canceled",
        }
    }
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
    /// Billing webhook deliveries already applied (`provider:event id` →
    /// when, Unix ms), so a redelivery changes nothing. Bounded: see
    /// [`crate::lifecycle::remember`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub webhook_events: BTreeMap<String, u64>,
}

/// Who a valid key belongs to: the key's id and customer, with that
/// customer's state, as a lookup found them.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub key_id: KeyId,
    pub customer: Arc<str>,
    /// None: the default plan.
    pub plan: Option<Arc<str>>,
    pub suspended: bool,
    /// The subscription's state, when billing webhooks drive the plan.
    pub billing: Option<BillingStatus>,
    /// The customer's own limits, replacing its plan's.
    pub limits: Option<Arc<CustomLimits>>,
}

impl KeyInfo {
    pub fn new(key_id: KeyId, customer: Arc<str>, view: CustomerView) -> Self {
        Self {
            key_id,
            customer,
            plan: view.plan,
            suspended: view.suspended,
            billing: view.billing,
            limits: view.limits,
        }
    }
}

/// A key's id: inline when short (those Tollgate makes are 20 bytes), so
/// a snapshot holds a million of them without a million allocations and
/// a lookup copies one from the entry it has already read, allocating
/// nothing. Reads as a `str`.
#[derive(Clone)]
pub enum KeyId {
    Inline { len: u8, bytes: [u8; KeyId::INLINE] },
    Shared(Arc<str>),
}

impl KeyId {
    const INLINE: usize = 22;

    pub fn new(id: &str) -> Self {
        let mut bytes = [0u8; Self::INLINE];
        match (bytes.get_mut(..id.len()), u8::try_from(id.len())) {
            (Some(b), Ok(len)) => {
                b.copy_from_slice(id.as_bytes());
                KeyId::Inline { len, bytes }
            }
            _ => KeyId::Shared(id.into()),
        }
    }
}

impl std::ops::Deref for KeyId {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            // Copied whole from a `str`, so always UTF-8.
            KeyId::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            KeyId::Shared(id) => id,
        }
    }
}

impl From<&str> for KeyId {
    fn from(id: &str) -> Self {
        KeyId::new(id)
    }
}

impl From<String> for KeyId {
    fn from(id: String) -> Self {
        KeyId::new(&id)
    }
}

impl PartialEq for KeyId {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for KeyId {}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// A customer's own limits, shared by every lookup of its keys, and the
/// plan they make, built on first use: (the plan it was built from, the
/// plan with these limits), so a request does not build it again.
#[derive(Debug, Default)]
pub struct CustomLimits {
    pub limits: Box<[crate::plans::Limit]>,
    pub plan: std::sync::OnceLock<(Arc<crate::plans::Plan>, Arc<crate::plans::Plan>)>,
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

/// What `run` checks of the store as it loads it: shown each record as the
/// store now holds it, once; keys in the order [`FileStore::data`] lists
/// them, customers in any order.
pub trait Inspect {
    fn customer(&mut self, id: &str, c: &CustomerRecord);
    /// A key, and what its loader found of its hash (which it decodes and
    /// indexes anyway, so an inspector keeps no set of every hash).
    fn key(&mut self, k: &KeyRecord, hash: HashSeen);
    /// The store changed while it was read, and is read again from the
    /// start: forget what was shown.
    fn restart(&mut self) {}
}

/// Looks at nothing.
impl Inspect for () {
    fn customer(&mut self, _: &str, _: &CustomerRecord) {}
    fn key(&mut self, _: &KeyRecord, _: HashSeen) {}
}

/// A key record's hash, as a load of the store found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashSeen {
    /// Not 64 hex digits: the key cannot be used.
    Malformed,
    /// The first record of this hash: the one in force.
    First,
    /// The hash of an earlier record (a hand edit): ignored.
    Repeated,
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
    /// The request itself is wrong (a bad id, a revoked key to rotate).
    Invalid(String),
    /// A concurrent change won; the caller may retry.
    Conflict(String),
    /// The store's backend (Redis) could not be reached or answered an error.
    Unavailable(String),
}

impl StoreError {
    /// The HTTP status an API answers with for this error.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::NotFound(_) => 404,
            StoreError::Invalid(_) => 400,
            StoreError::Conflict(_) => 409,
            StoreError::Io(..) | StoreError::Corrupt(..) | StoreError::Unavailable(_) => 503,
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Corrupt(p, e) => write!(f, "{}: not a valid key store: {e}", p.display()),
            StoreError::NotFound(what) => write!(f, "{what} not found"),
            StoreError::Invalid(what) | StoreError::Conflict(what) => write!(f, "{what}"),
            StoreError::Unavailable(why) => write!(f, "key store unavailable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// The records a change reads, for [`UpdateStore::update_only`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Only<'a> {
    pub customers: &'a [&'a str],
    /// By key id.
    pub key_ids: &'a [&'a str],
    /// The billing webhook deliveries already applied (bounded by
    /// [`crate::lifecycle::REMEMBER_MAX`]).
    pub webhook_events: bool,
}

/// A store that can apply a change atomically: the file store, or Redis
/// through the Redis backend's blocking admin.
pub trait UpdateStore {
    fn update<T: Send>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError>;

    /// [`update`](Self::update) for a change that reads no record but
    /// those `only` names: `f` may be shown a store holding just those (the
    /// ones that exist) and nothing else, and what it adds or changes is
    /// written. A store that reads records one by one (Redis) reads only
    /// these, so a change costs O(change), not O(keys); the file store
    /// reads its whole document, then journals only what `f` changed.
    fn update_only<T: Send>(
        &self,
        only: Only<'_>,
        f: impl FnOnce(&mut StoreData) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        let _ = only;
        self.update(f)
    }
    fn data(&self) -> Result<StoreData, StoreError>;
}
