//! Reading the file store's document record by record, without building
//! a `StoreData` of it: only the records a change names ([`named`], for
//! `update_only`: other customers and keys are passed over as JSON tokens,
//! never built), or every record handed to a [`Records`] as it is read
//! (the running proxy's load, which builds its snapshot from them without
//! holding a second copy of the store). The scan refuses what the full
//! parse refuses (unknown and duplicated fields, a missing `version`,
//! values of the wrong type): a record passed over is read as strictly,
//! into text borrowed from the document, and dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{CustomerRecord, KeyRecord, Only, StoreData, StoreError};

/// What a scan of the document does with its records.
pub(super) trait Records {
    /// The customers to build, by id (None: all).
    fn customer_ids(&self) -> Option<&[&str]> {
        None
    }
    /// The keys to build, by id (None: all).
    fn key_ids(&self) -> Option<&[&str]> {
        None
    }
    /// Whether the applied webhook deliveries are wanted.
    fn wants_events(&self) -> bool {
        false
    }
    fn customer(&mut self, id: String, c: CustomerRecord);
    fn key(&mut self, k: KeyRecord);
    fn events(&mut self, _events: BTreeMap<String, u64>) {}
}

/// Hands the records of `bytes` (the document) to `records`, in the order
/// they stand.
pub(super) fn scan(
    path: &Path,
    bytes: &[u8],
    records: &mut impl Records,
) -> Result<(), StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    scan_with(path, serde_json::Deserializer::from_slice(bytes), records)
}

/// [`scan`] of the document file at `path`, read through a buffer instead
/// of whole: a large store is never in memory as text beside its records.
/// (A small one is read whole, which is faster.)
pub(super) fn scan_file(path: &Path, records: &mut impl Records) -> Result<(), StoreError> {
    let io = |e| StoreError::Io(path.to_path_buf(), e);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    if len < 1 << 20 {
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(io)?;
        return scan(path, &bytes, records);
    }
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    // Blank (however long) is an empty store, as `scan` has it.
    loop {
        let buf = std::io::BufRead::fill_buf(&mut reader).map_err(io)?;
        if buf.is_empty() {
            return Ok(());
        }
        if buf.iter().any(|b| !b.is_ascii_whitespace()) {
            break;
        }
        let n = buf.len();
        std::io::BufRead::consume(&mut reader, n);
    }
    scan_with(path, serde_json::Deserializer::from_reader(reader), records)
}

fn scan_with<'de, J: serde_json::de::Read<'de>>(
    path: &Path,
    mut de: serde_json::Deserializer<J>,
    records: &mut impl Records,
) -> Result<(), StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(path.to_path_buf(), e.to_string());
    Document(records).deserialize(&mut de).map_err(corrupt)?;
    de.end().map_err(corrupt)
}

/// The records of `bytes` (the document) that `only` names and that exist.
pub(super) fn named(path: &Path, bytes: &[u8], only: Only<'_>) -> Result<StoreData, StoreError> {
    struct Named<'a> {
        only: Only<'a>,
        data: StoreData,
    }
    impl Records for Named<'_> {
        fn customer_ids(&self) -> Option<&[&str]> {
            Some(self.only.customers)
        }
        fn key_ids(&self) -> Option<&[&str]> {
            Some(self.only.key_ids)
        }
        fn wants_events(&self) -> bool {
            self.only.webhook_events
        }
        fn customer(&mut self, id: String, c: CustomerRecord) {
            self.data.customers.insert(id, c);
        }
        fn key(&mut self, k: KeyRecord) {
            self.data.keys.push(k);
        }
        fn events(&mut self, events: BTreeMap<String, u64>) {
            self.data.webhook_events = events;
        }
    }
    let mut named = Named {
        only,
        data: StoreData {
            version: 1,
            ..StoreData::default()
        },
    };
    scan(path, bytes, &mut named)?;
    Ok(named.data)
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Version,
    Customers,
    Keys,
    WebhookEvents,
}

struct Document<'r, R>(&'r mut R);

impl<'de, R: Records> DeserializeSeed<'de> for Document<'_, R> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, R: Records> Visitor<'de> for Document<'_, R> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("struct StoreData")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let mut seen = [false; 4];
        while let Some(field) = map.next_key::<Field>()? {
            let (i, name) = match field {
                Field::Version => (0, "version"),
                Field::Customers => (1, "customers"),
                Field::Keys => (2, "keys"),
                Field::WebhookEvents => (3, "webhook_events"),
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(A::Error::duplicate_field(name));
            }
            match field {
                Field::Version => {
                    map.next_value::<u32>()?;
                }
                Field::Customers => map.next_value_seed(Customers(&mut *self.0))?,
                Field::Keys => map.next_value_seed(Keys(&mut *self.0))?,
                Field::WebhookEvents if self.0.wants_events() => {
                    self.0.events(map.next_value()?);
                }
                Field::WebhookEvents => {
                    map.next_value::<ObjectOf<u64>>()?;
                }
            }
        }
        if !seen[0] {
            return Err(A::Error::missing_field("version"));
        }
        Ok(())
    }
}

/// An object of `V`s, checked as a map of them reads it and not kept: the
/// applied webhook deliveries (`V = u64`, Unix ms), a key's `meta`
/// (`V = IgnoredAny`, any JSON).
struct ObjectOf<V>(std::marker::PhantomData<V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for ObjectOf<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ObjectOf(std::marker::PhantomData))
    }
}

impl<'de, V: Deserialize<'de>> Visitor<'de> for ObjectOf<V> {
    type Value = ObjectOf<V>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, V>()?.is_some() {}
        Ok(self)
    }
}

/// The document's `customers` object.
struct Customers<'r, R>(&'r mut R);

impl<'de, R: Records> DeserializeSeed<'de> for Customers<'_, R> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, R: Records> Visitor<'de> for Customers<'_, R> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(id) = map.next_key_seed(Wanted(self.0.customer_ids()))? {
            match id {
                Some(id) => {
                    let c = map.next_value()?;
                    self.0.customer(id, c);
                }
                None => {
                    // Read as the full parse reads it (a customer record
                    // rarely holds a string to copy), and dropped.
                    map.next_value::<CustomerRecord>()?;
                }
            }
        }
        Ok(())
    }
}

/// A customer id: itself if it is wanted, else None (read without a copy).
struct Wanted<'a>(Option<&'a [&'a str]>);

impl<'de> DeserializeSeed<'de> for Wanted<'_> {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Wanted<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a customer id")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let wanted = self.0.is_none_or(|ids| ids.contains(&v));
        Ok(wanted.then(|| v.to_owned()))
    }
}

/// The document's `keys` array. Keys wanted by id are read as borrowed
/// text ([`KeyCheck`]) and copied into a record only if wanted.
struct Keys<'r, R>(&'r mut R);

impl<'de, R: Records> DeserializeSeed<'de> for Keys<'_, R> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, R: Records> Visitor<'de> for Keys<'_, R> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // Owned: the few ids named, while `self.0` takes the keys.
        let ids: Vec<String> = match self.0.key_ids() {
            None => {
                while let Some(k) = seq.next_element::<KeyRecord>()? {
                    self.0.key(k);
                }
                return Ok(());
            }
            Some(ids) => ids.iter().map(|id| (*id).to_owned()).collect(),
        };
        while let Some(k) = seq.next_element::<KeyCheck<'de>>()? {
            if ids.iter().any(|id| *id == *k.id) {
                self.0
                    .key(k.into_record().map_err(serde::de::Error::custom)?);
            } else if let Some(meta) = k.meta {
                serde_json::from_str::<ObjectOf<IgnoredAny>>(meta.get())
                    .map_err(serde::de::Error::custom)?;
            }
        }
        Ok(())
    }
}

/// A key record as [`KeyRecord`] reads it, with its text borrowed from
/// the document where it holds no escapes. Only for a document read whole
/// ([`scan`]): `meta` is borrowed raw JSON, which a buffered read
/// ([`scan_file`]) cannot lend.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyCheck<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    hash: Cow<'a, str>,
    #[serde(borrow)]
    start: Cow<'a, str>,
    #[serde(borrow)]
    customer: Cow<'a, str>,
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(default, borrow)]
    meta: Option<&'a RawValue>,
    #[serde(borrow)]
    created: Cow<'a, str>,
    #[serde(default, borrow)]
    expires: Option<Text<'a>>,
    #[serde(default, borrow)]
    revoked: Option<Text<'a>>,
}

/// Text borrowed where it can be (serde borrows a bare `Cow` only, not
/// one inside an `Option`).
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn owned(t: Option<Text<'_>>) -> Option<String> {
    t.map(|t| t.0.into_owned())
}

impl KeyCheck<'_> {
    fn into_record(self) -> Result<KeyRecord, serde_json::Error> {
        Ok(KeyRecord {
            id: self.id.into_owned(),
            hash: self.hash.into_owned(),
            start: self.start.into_owned(),
            customer: self.customer.into_owned(),
            name: owned(self.name),
            meta: self
                .meta
                .map(|m| serde_json::from_str(m.get()))
                .transpose()?,
            created: self.created.into_owned(),
            expires: owned(self.expires),
            revoked: owned(self.revoked),
        })
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
            let got = named(p, &text, only(&["cus_2", "cus_missing"], &["key_a"], false)).unwrap();
            assert_eq!(got.customers.keys().collect::<Vec<_>>(), ["cus_2"]);
            assert_eq!(got.customers["cus_2"], d.customers["cus_2"]);
            assert_eq!(got.keys, vec![d.keys[0].clone()], "key_a, not key_ab");
            assert!(got.webhook_events.is_empty());
            let got = named(p, &text, only(&["cus_\u{e9}"], &[], true)).unwrap();
            assert_eq!(got.customers.len(), 1);
            assert!(got.keys.is_empty());
            assert_eq!(got.webhook_events, d.webhook_events);
        }
        // An escaped id is still that id.
        let escaped = br#"{"version":1,"customers":{"cus_\u00e9":{"plan":"x"}}}"#;
        let got = named(p, escaped, only(&["cus_\u{e9}"], &[], false)).unwrap();
        assert_eq!(got.customers["cus_\u{e9}"].plan.as_deref(), Some("x"));
        let escaped = br#"{"version":1,"keys":[{"id":"key_\u0061","hash":"h","start":"s","customer":"c","created":"t","meta":{"n":1}}]}"#;
        let got = named(p, escaped, only(&[], &["key_a"], false)).unwrap();
        assert_eq!(got.keys.len(), 1);
        assert_eq!(got.keys[0].meta.as_ref().unwrap()["n"], 1);
    }

    #[test]
    fn it_refuses_what_the_whole_parse_refuses() {
        let p = Path::new("keys.db");
        for bad in [
            &br#"{"version":1,"extra":true}"#[..],
            br#"{"keys":[{"id":"key_a"}]}"#,
            br#"{"customers":{"cus_1":{"plan":"x"},}}"#,
            br#"{"keys":[] } trailing"#,
            br#"{"customers":{}}"#,
            br#"{"version":1,"version":1}"#,
            br#"{"version":1,"customers":{"cus_other":{"plan":"x","note":1}}}"#,
            br#"{"version":1,"keys":[{"id":"key_other","hash":"h","start":"s","customer":"c","created":"t","note":1}]}"#,
            br#"{"version":1,"keys":[{"id":"key_other","hash":"h","start":"s","customer":"c","created":"t","meta":5}]}"#,
            br#"{"version":1,"webhook_events":{"stripe:evt_1":"soon"}}"#,
        ] {
            let only = only(&["cus_1"], &["key_a"], false);
            assert!(
                matches!(named(p, bad, only), Err(StoreError::Corrupt(..))),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(serde_json::from_slice::<StoreData>(bad).is_err());
        }
    }
}
