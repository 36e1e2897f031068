//! `tollgate check`: the config, the plans and the key store, every
//! problem located at its file and line.

use tollgate::app::Keys;
use tollgate::config::store_check::{problems, store_name};
use tollgate::config::Config;
use tollgate_core::store::{StoreData, StoreText, UpdateStore};

use super::open_store;

/// Problems in the key store (unreadable, unknown plans, broken records),
/// located at the line of the record in the file.
pub(super) fn check_store(config: &Config, _now: u64) -> Vec<String> {
    let (data, text, path) = match read_store(config) {
        Ok(read) => read,
        Err(e) => return vec![e],
    };
    problems(config, &data, &path, |needle| {
        text.as_ref().and_then(|t| t.locate(needle))
    })
}

/// The store's data, its text (for locating records: the file store's
/// document and journal) and how to name it in messages.
fn read_store(config: &Config) -> Result<(StoreData, Option<StoreText>, String), String> {
    Ok(match open_store(config) {
        Err(e) => return Err(format!("{}:1:1: error: {e}", config.file.display())),
        Ok(Keys::File(store)) => {
            let path = store_name(config);
            match store.data_and_text() {
                Ok((d, text)) => (d, Some(text), path),
                Err(e) => return Err(format!("{path}:1:1: error: {e}")),
            }
        }
        Ok(store @ Keys::Redis { .. }) => {
            let path = store_name(config);
            match store.data() {
                Ok(d) => (d, None, path),
                Err(e) => return Err(format!("{path}: error: {e}")),
            }
        }
    })
}
