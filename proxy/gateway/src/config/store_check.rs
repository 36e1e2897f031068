//! The key store checked against the config: customers on plans the
//! config does not define, malformed or duplicated key ids, hashes and
//! times, two records of one key, each located at its record's line in
//! the store's files. `tollgate check` runs it on the store it reads; `run`
//! on each record as the file store loads it (one read of the files, and
//! no second copy of the store).

use std::collections::{BTreeMap, HashSet};

use tollgate_core::store::{CustomerRecord, HashSeen, Inspect, KeyRecord, StoreData};

use super::{Config, StoreKind};

/// How messages name the configured key store: the file's path, or
/// `redis <urls>`.
pub fn store_name(config: &Config) -> String {
    match (config.keys_store, &config.redis) {
        (StoreKind::Redis, Some(r)) => format!("redis {}", r.urls.join(",")),
        (StoreKind::Redis, None) => "redis".to_owned(),
        _ => config.keys_path.display().to_string(),
    }
}

/// The store's problems; `path` names it in messages, `locate` tells
/// where a record (given as the text that stands in its line) is, when the
/// store has lines to tell (the file store's document and journal, see
/// `StoreText`; Redis has none).
pub fn problems(
    config: &Config,
    data: &StoreData,
    path: &str,
    locate: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut check = Checker::new(config, path, locate);
    for (id, c) in &data.customers {
        check.customer(id, c);
    }
    // What a load finds of each hash, as `FileStore`'s loader tells `run`.
    let mut hashes = HashSet::new();
    for k in &data.keys {
        let mut hash = [0u8; 32];
        let seen = if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
            HashSeen::Malformed
        } else if hashes.insert(hash) {
            HashSeen::First
        } else {
            HashSeen::Repeated
        };
        check.key(k, seen);
    }
    check.errors()
}

/// [`problems`], record by record: `run` shows it each record as the file
/// store loads it, without a `StoreData` of the whole store. Problems are
/// located when asked for ([`errors`](Self::errors)), in the store as it
/// was finally read.
pub struct Checker<'a, L> {
    config: &'a Config,
    path: &'a str,
    locate: L,
    /// By customer id, so they are listed in the same order however the
    /// customers came; each as (the text to locate, the message).
    customers: BTreeMap<String, (String, String)>,
    keys: Vec<(String, String)>,
    /// The well-formed key ids seen.
    ids: HashSet<[u8; 20]>,
}

impl<'a, L: Fn(&str) -> Option<String>> Checker<'a, L> {
    pub fn new(config: &'a Config, path: &'a str, locate: L) -> Self {
        Checker {
            config,
            path,
            locate,
            customers: BTreeMap::new(),
            keys: Vec::new(),
            ids: HashSet::new(),
        }
    }

    /// Each problem at `file:line:column` (located only now, and only
    /// problems: a search of the files per record would make the check
    /// quadratic in keys).
    pub fn errors(self) -> Vec<String> {
        let at = |needle: &str| {
            (self.locate)(needle).unwrap_or_else(|| format!("{} ({needle})", self.path))
        };
        self.customers
            .into_values()
            .chain(self.keys)
            .map(|(needle, e)| format!("{}: {e}", at(&needle)))
            .collect()
    }
}

impl<L: Fn(&str) -> Option<String>> Inspect for Checker<'_, L> {
    fn customer(&mut self, id: &str, c: &CustomerRecord) {
        // A customer listed twice is as its last record says.
        self.customers.remove(id);
        let Some(plan) = &c.plan else { return };
        if self.config.plans.get(plan).is_none() {
            let e = format!(
                "error: customer {id} is on plan `{plan}`, which {} does not define\n  hint: it gets the default plan until you run `tollgate customers set-plan {id} <plan>`",
                self.config.plans_file.display()
            );
            self.customers
                .insert(id.to_owned(), (format!("\"{id}\""), e));
        }
    }

    fn key(&mut self, k: &KeyRecord, hash: HashSeen) {
        let needle = || format!("\"{}\"", k.id);
        let fresh = <[u8; 20]>::try_from(k.id.as_bytes())
            .is_ok_and(|id| tollgate_core::keys::valid_key_id(&k.id) && self.ids.insert(id));
        if !fresh {
            let e = format!("error: key id `{}` is malformed or duplicated", k.id);
            self.keys.push((needle(), e));
        }
        match hash {
            HashSeen::First => {}
            HashSeen::Malformed => {
                let e = format!("error: key {} has a malformed hash\n  hint: the key cannot be used; revoke it and create a new one", k.id);
                self.keys.push((needle(), e));
            }
            HashSeen::Repeated => {
                let e = format!("error: key {} has the hash of an earlier key: one key, two records\n  hint: the earlier record is the one in force; remove this one", k.id);
                self.keys.push((needle(), e));
            }
        }
        for (field, value) in [
            ("created", Some(&k.created)),
            ("expires", k.expires.as_ref()),
            ("revoked", k.revoked.as_ref()),
        ] {
            if let Some(v) = value {
                if tollgate_core::clock::parse_rfc3339(v).is_none() {
                    let e = format!(
                        "error: key {} has `{field}: {v}`, not a time like 2026-01-31T12:00:00Z\n  hint: an expiry that does not parse is treated as already expired",
                        k.id
                    );
                    self.keys.push((needle(), e));
                }
            }
        }
    }

    fn restart(&mut self) {
        self.customers.clear();
        self.keys.clear();
        self.ids.clear();
    }
}

/// `run` starts only where `check` passes: the same errors, the same lines.
pub fn refuse_on(errors: Vec<String>, config: &std::path::Path) -> Result<(), String> {
    if errors.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} has errors; not starting:\n{}",
        config.display(),
        errors.join("\n")
    ))
}
