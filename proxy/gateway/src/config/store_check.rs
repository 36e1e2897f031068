//! The key store checked against the config: customers on plans the
//! config does not define, malformed or duplicated key ids, hashes and
//! times, each located at its record's line in the file. `tollgate check`
//! runs it on the store it reads; `run` on the data the file store parses
//! as it opens (one parse of the file, not two).

use tollgate_core::store::StoreData;

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
    let at = |needle: &str| locate(needle).unwrap_or_else(|| format!("{path} ({needle})"));
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
        // files per key would make `check` quadratic in keys.
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
