//! Reading from the file store's document only the records a change names
//! ([`Only`]), for `update_only`: the document is scanned once as JSON
//! tokens and only those records are built, so a change in the CLI costs
//! one read of the file instead of the allocation of every record in it.
//! The scan is as strict as the full parse (unknown fields are refused,
//! every value must be well-formed JSON); a record it skips is checked as
//! the full parse would check it when the store is read whole (`check`,
//! `run`).

use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{CustomerRecord, KeyRecord, Only, StoreData, StoreError};

/// The records of `bytes` (the document) that `only` names and that exist.
pub(super) fn read(path: &Path, bytes: &[u8], only: Only<'_>) -> Result<StoreData, StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StoreData::default());
    }
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(path.to_path_buf(), e.to_string());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let data = Document(only).deserialize(&mut de).map_err(corrupt)?;
    de.end().map_err(corrupt)?;
    Ok(data)
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Version,
    Customers,
    Keys,
    WebhookEvents,
}

struct Document<'a>(Only<'a>);

impl<'de> DeserializeSeed<'de> for Document<'_> {
    type Value = StoreData;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<StoreData, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Document<'_> {
    type Value = StoreData;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key store document")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StoreData, A::Error> {
        let mut data = StoreData::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Version => data.version = map.next_value()?,
                Field::Customers => data.customers = map.next_value_seed(Customers(self.0))?,
                Field::Keys => data.keys = map.next_value_seed(Keys(self.0))?,
                Field::WebhookEvents if self.0.webhook_events => {
                    data.webhook_events = map.next_value()?;
                }
                Field::WebhookEvents => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(data)
    }
}

/// The customers named, from the document's `customers` object.
struct Customers<'a>(Only<'a>);

impl<'de> DeserializeSeed<'de> for Customers<'_> {
    type Value = std::collections::BTreeMap<String, CustomerRecord>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Customers<'_> {
    type Value = std::collections::BTreeMap<String, CustomerRecord>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("customers by id")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Self::Value::new();
        while let Some(id) = map.next_key_seed(Named(self.0.customers))? {
            match id {
                Some(id) => {
                    out.insert(id, map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

/// A customer id: itself if it is one of those named, else None (read
/// without a copy).
struct Named<'a>(&'a [&'a str]);

impl<'de> DeserializeSeed<'de> for Named<'_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Named<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a customer id")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.contains(&v).then(|| v.to_owned()))
    }
}

/// The keys named by id, from the document's `keys` array: each record is
/// passed over as raw JSON and built only if it holds one of the ids.
struct Keys<'a>(Only<'a>);

impl<'de> DeserializeSeed<'de> for Keys<'_> {
    type Value = Vec<KeyRecord>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = Vec<KeyRecord>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of keys")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let ids = self.0.key_ids;
        let mut out = Vec::new();
        if ids.is_empty() {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(out);
        }
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            let text = raw.get();
            if !ids.iter().any(|id| text.contains(id)) {
                continue;
            }
            let k: KeyRecord = serde_json::from_str(text).map_err(serde::de::Error::custom)?;
            if ids.contains(&k.id.as_str()) {
                out.push(k);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> StoreData {
        let key = |id: &str, customer: &str| KeyRecord {
            id: id.into(),
            hash: "ab".repeat(32),
            start: "tg_test_abcd".into(),
            customer: customer.into(),
            name: Some("a \"quoted\" name".into()),
            meta: None,
            created: "2026-01-01T00:00:00Z".into(),
            expires: None,
            revoked: None,
        };
        let mut d = StoreData {
            version: 1,
            keys: vec![
                key("key_a", "cus_1"),
                key("key_b", "cus_2"),
                key("key_ab", "cus_1"),
            ],
            ..StoreData::default()
        };
        for (id, plan) in [("cus_1", "pro"), ("cus_2", "free"), ("cus_\u{e9}", "x")] {
            d.customers.insert(
                id.into(),
                CustomerRecord {
                    plan: Some(plan.into()),
                    ..CustomerRecord::default()
                },
            );
        }
        d.webhook_events.insert("stripe:evt_1".into(), 7);
        d
    }

    fn only<'a>(customers: &'a [&'a str], key_ids: &'a [&'a str], events: bool) -> Only<'a> {
        Only {
            customers,
            key_ids,
            webhook_events: events,
        }
    }

    #[test]
    fn it_reads_the_named_records_as_the_whole_parse_does() {
        let d = doc();
        let p = Path::new("keys.db");
        for text in [
            serde_json::to_vec_pretty(&d).unwrap(),
            serde_json::to_vec(&d).unwrap(),
        ] {
            let got = read(p, &text, only(&["cus_2", "cus_missing"], &["key_a"], false)).unwrap();
            assert_eq!(got.customers.keys().collect::<Vec<_>>(), ["cus_2"]);
            assert_eq!(got.customers["cus_2"], d.customers["cus_2"]);
            assert_eq!(got.keys, vec![d.keys[0].clone()], "key_a, not key_ab");
            assert!(got.webhook_events.is_empty());
            let got = read(p, &text, only(&["cus_\u{e9}"], &[], true)).unwrap();
            assert_eq!(got.customers.len(), 1);
            assert!(got.keys.is_empty());
            assert_eq!(got.webhook_events, d.webhook_events);
        }
        // An escaped id is still that id.
        let escaped = br#"{"version":1,"customers":{"cus_\u00e9":{"plan":"x"}}}"#;
        let got = read(p, escaped, only(&["cus_\u{e9}"], &[], false)).unwrap();
        assert_eq!(got.customers["cus_\u{e9}"].plan.as_deref(), Some("x"));
    }

    #[test]
    fn it_refuses_what_the_whole_parse_refuses() {
        let p = Path::new("keys.db");
        for bad in [
            &br#"{"version":1,"extra":true}"#[..],
            br#"{"keys":[{"id":"key_a"}]}"#,
            br#"{"customers":{"cus_1":{"plan":"x"},}}"#,
            br#"{"keys":[] } trailing"#,
        ] {
            let only = only(&["cus_1"], &["key_a"], false);
            assert!(
                matches!(read(p, bad, only), Err(StoreError::Corrupt(..))),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(serde_json::from_slice::<StoreData>(bad).is_err());
        }
    }
}
