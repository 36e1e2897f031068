//! The key store checked against the config: customers on plans the
//! config does not define, malformed or duplicated key ids, hashes and
//! times, each located at its record's line in the file. `tollgate check`
//! runs it on the store it reads; `run` on the data the file store parses
//! as it opens (one parse of the file, not two).

use std::collections::{BTreeMap, HashSet};

use tollgate_core::store::{CustomerRecord, Inspect, KeyRecord, StoreData};

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
    for k in &data.keys {
        check.key(k);
    }
    check.errors()
}

/// [`problems`], record by record: `run` shows it each record as the file
/// store loads it, without a `StoreData` of the whole store.
pub struct Checker<'a, L> {
    config: &'a Config,
    path: &'a str,
    locate: L,
    /// By customer id, so they are listed in the same order however the
    /// customers came.
    customers: BTreeMap<String, String>,
    keys: Vec<String>,
    /// The well-formed key ids seen (all 20 bytes long).
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

    /// Where `needle` stands, located only when there is something to
    /// report: a search of the files per record would make the check
    /// quadratic in keys.
    fn at(&self, needle: &str) -> String {
        (self.locate)(needle).unwrap_or_else(|| format!("{} ({needle})", self.path))
    }

    pub fn errors(self) -> Vec<String> {
        self.customers.into_values().chain(self.keys).collect()
    }
}

impl<L: Fn(&str) -> Option<String>> Inspect for Checker<'_, L> {
    fn customer(&mut self, id: &str, c: &CustomerRecord) {
        let Some(plan) = &c.plan else { return };
        if self.config.plans.get(plan).is_none() {
            let e = format!(
                "{}: error: customer {id} is on plan `{plan}`, which {} does not define\n  hint: it gets the default plan until you run `tollgate customers set-plan {id} <plan>`",
                self.at(&format!("\"{id}\"")),
                self.config.plans_file.display()
            );
            self.customers.insert(id.to_owned(), e);
        }
    }

    fn key(&mut self, k: &KeyRecord) {
        let loc = |me: &Self| me.at(&format!("\"{}\"", k.id));
        let fresh = <[u8; 20]>::try_from(k.id.as_bytes())
            .is_ok_and(|id| tollgate_core::keys::valid_key_id(&k.id) && self.ids.insert(id));
        if !fresh {
            let e = format!(
                "{}: error: key id `{}` is malformed or duplicated",
                loc(self),
                k.id
            );
            self.keys.push(e);
        }
        if k.hash.len() != 64 || hex::decode(&k.hash).is_err() {
            let e = format!("{}: error: key {} has a malformed hash\n  hint: the key cannot be used; revoke it and create a new one", loc(self), k.id);
            self.keys.push(e);
        }
        for (field, value) in [
            ("created", Some(&k.created)),
            ("expires", k.expires.as_ref()),
            ("revoked", k.revoked.as_ref()),
        ] {
            if let Some(v) = value {
                if tollgate_core::clock::parse_rfc3339(v).is_none() {
                    let e = format!(
                        "{}: error: key {} has `{field}: {v}`, not a time like 2026-01-31T12:00:00Z\n  hint: an expiry that does not parse is treated as already expired",
                        loc(self),
                        k.id
                    );
                    self.keys.push(e);
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
