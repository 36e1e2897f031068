//! `tollgate check`: the config, the plans and the key store, every
//! problem located at its file and line.

use tollgate::app::Keys;
use tollgate::config::Config;
use tollgate_core::store::{StoreData, UpdateStore};

use super::open_store;

/// Problems in the key store (unreadable, unknown plans, broken records),
/// located at the line of the record in the file.
pub(super) fn check_store(config: &Config, _now: u64) -> Vec<String> {
    let (data, text, path) = match read_store(config) {
        Ok(read) => read,
        Err(e) => return vec![e],
    };
    // The line and column where `needle` first stands in the file.
    let at = |needle: &str| -> String {
        text.lines()
            .enumerate()
            .find_map(|(i, l)| {
                l.find(needle)
                    .map(|c| format!("{path}:{}:{}", i + 1, c + 1))
            })
            .unwrap_or_else(|| {
                if text.is_empty() {
                    format!("{path} ({needle})")
                } else {
                    format!("{path}:1:1")
                }
            })
    };
    let mut errors = Vec::new();
    for (id, c) in &data.customers {
        if let Some(plan) = &c.plan {
            if config.plans.get(plan).is_none() {
                errors.push(format!(
                    "{}: error: customer {id} is on plan `{plan}`, which {} does not define\n  hint: it gets the default plan until you run `tollgate customers set-plan {id} <plan>`",
                    at(&format!("\"{id}\"")),
                    config.plans_file.display()
                ));
            }
        }
    }
    let mut ids = std::collections::HashSet::new();
    for k in &data.keys {
        // Located only when there is something to report: a search of the
        // file per key would make `check` quadratic in keys.
        let loc = || at(&format!("\"{}\"", k.id));
        if !tollgate_core::keys::valid_key_id(&k.id) || !ids.insert(&k.id) {
            errors.push(format!(
                "{}: error: key id `{}` is malformed or duplicated",
                loc(),
                k.id
            ));
        }
        if k.hash.len() != 64 || hex::decode(&k.hash).is_err() {
            errors.push(format!("{}: error: key {} has a malformed hash\n  hint: the key cannot be used; revoke it and create a new one", loc(), k.id));
        }
        for (field, value) in [
            ("created", Some(&k.created)),
            ("expires", k.expires.as_ref()),
            ("revoked", k.revoked.as_ref()),
        ] {
            if let Some(v) = value {
                if tollgate_core::clock::parse_rfc3339(v).is_none() {
                    errors.push(format!(
                        "{}: error: key {} has `{field}: {v}`, not a time like 2026-01-31T12:00:00Z\n  hint: an expiry that does not parse is treated as already expired",
                        loc(),
                        k.id
                    ));
                }
            }
        }
    }
    errors
}

/// The store's data, its text (for locating records: the file store's
/// JSON) and how to name it in messages.
fn read_store(config: &Config) -> Result<(StoreData, String, String), String> {
    Ok(match open_store(config) {
        Err(e) => return Err(format!("{}:1:1: error: {e}", config.file.display())),
        Ok(Keys::File(store)) => {
            let path = config.keys_path.display().to_string();
            match store.data_and_text() {
                Ok((d, text)) => (d, text, path),
                Err(e) => return Err(format!("{path}:1:1: error: {e}")),
            }
        }
        Ok(store @ Keys::Redis { .. }) => {
            let path = format!(
                "redis {}",
                config
                    .redis
                    .as_ref()
                    .map(|r| r.urls.join(","))
                    .unwrap_or_default()
            );
            match store.data() {
                Ok(d) => (d, String::new(), path),
                Err(e) => return Err(format!("{path}: error: {e}")),
            }
        }
    })
}
