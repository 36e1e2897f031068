//! The file store: its document, its journal, readers following them.

use super::*;
use crate::clock::Millis;
use crate::clock::HOUR;
use crate::keys;
use crate::store::admin::*;
use crate::store::{CustomerRecord, HashSeen, KeyRecord, KeyRejection, KeyStore};

const NOW: Millis = 1_800_000_000_000;

fn store() -> (tempfile::TempDir, FileStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = FileStore::open(&dir.path().join("keys.db")).unwrap();
    (dir, s)
}

fn create(s: &FileStore, customer: &str) -> NewKey {
    create_key(
        s,
        "tg_test_",
        CreateKey {
            customer,
            plan: Some("pro"),
            name: None,
            expires: None,
            set_plan: false,
            meta: None,
        },
        NOW,
    )
    .unwrap()
}

#[test]
fn only_the_hash_is_stored() {
    let (_d, s) = store();
    let k = create(&s, "cus_1");
    let journaled = create(&s, "cus_1");
    for (key, file) in [(&k, s.path()), (&journaled, s.journal_path())] {
        let text = fs::read_to_string(file).unwrap();
        assert!(!text.contains(&key.raw), "raw key must never be written");
        assert!(text.contains(&hex::encode(keys::hash(&key.raw))));
    }
    let id = s.snapshot().lookup(&keys::hash(&k.raw), NOW).unwrap();
    assert_eq!((&*id.customer, id.plan.as_deref()), ("cus_1", Some("pro")));
    assert_eq!(&*id.key_id, k.record.id);
}

#[test]
fn revoked_expired_and_unknown_are_told_apart() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    let h = keys::hash(&a.raw);
    assert!(matches!(
        s.snapshot().lookup(&keys::hash("nope"), NOW),
        Err(KeyRejection::Unknown)
    ));
    let b = rotate(&s, "tg_test_", &a.record.id, HOUR, NOW).unwrap();
    assert!(
        s.snapshot().lookup(&h, NOW + HOUR - 1).is_ok(),
        "old key works during grace"
    );
    assert!(matches!(
        s.snapshot().lookup(&h, NOW + HOUR),
        Err(KeyRejection::Expired)
    ));
    assert!(s
        .snapshot()
        .lookup(&keys::hash(&b.raw), NOW + 2 * HOUR)
        .is_ok());
    revoke(&s, &b.record.id, NOW).unwrap();
    assert!(matches!(
        s.snapshot().lookup(&keys::hash(&b.raw), NOW),
        Err(KeyRejection::Revoked)
    ));
    assert!(matches!(
        revoke(&s, "key_missing", NOW),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn the_key_gauge_counts_the_snapshot_as_status_names_the_records() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    create(&s, "cus_2");
    let c = create(&s, "cus_3");
    rotate(&s, "tg_test_", &a.record.id, HOUR, NOW).unwrap();
    revoke(&s, &c.record.id, NOW).unwrap();
    for now in [NOW, NOW + 2 * HOUR] {
        let mut want = std::collections::BTreeMap::new();
        for st in ["active", "expiring", "expired", "revoked"] {
            want.insert(st, 0);
        }
        for k in &s.data().unwrap().keys {
            *want.get_mut(status(k, now)).unwrap() += 1;
        }
        assert_eq!(s.snapshot().key_statuses(now), want, "at {now}");
    }
    let counts = s.snapshot().key_statuses(NOW + 2 * HOUR);
    assert_eq!((counts["expired"], counts["revoked"]), (1, 1));
}

#[test]
fn the_cli_handle_reads_and_writes_the_file_without_a_snapshot() {
    let (_d, s) = store();
    let cli = FileStore::unsnapshotted(s.path());
    let k = create(&cli, "cus_cli");
    assert_eq!(cli.snapshot().key_count, 0, "no snapshot kept");
    let second = create(&cli, "cus_cli");
    let (data, text) = cli.data_and_text().unwrap();
    assert_eq!(data.keys.len(), 2);
    let located = |id: &str| text.locate(&format!("\"{id}\"")).unwrap();
    assert!(located(&k.record.id).starts_with(&format!("{}:", s.path().display())));
    assert_eq!(
        located(&second.record.id),
        format!("{}:1:{}", cli.journal_path().display(), {
            let line = fs::read_to_string(cli.journal_path()).unwrap();
            line.find(&format!("\"{}\"", second.record.id)).unwrap() + 1
        }),
        "a record written since the document is located in the journal"
    );
    assert!(s.reload().unwrap());
    assert!(s.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
    fs::write(s.path(), "{ not json").unwrap();
    assert!(matches!(cli.data_and_text(), Err(StoreError::Corrupt(..))));
}

#[test]
fn a_missing_file_is_read_once_until_it_appears() {
    let (dir, s) = store();
    assert!(!s.reload().unwrap(), "still missing: nothing to re-read");
    let other = FileStore::open(&dir.path().join("keys.db")).unwrap();
    create(&other, "cus_late");
    assert!(s.reload().unwrap(), "it appeared: read it");
    assert_eq!(s.snapshot().key_count, 1);
}

#[test]
fn a_second_handle_sees_writes_after_reload() {
    let (_d, s) = store();
    let other = FileStore::open(s.path()).unwrap();
    let k = create(&s, "cus_2");
    assert!(other.reload().unwrap());
    assert!(other.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
    set_plan(&s, "cus_2", "enterprise").unwrap();
    set_suspended(&s, "cus_2", true).unwrap();
    other.reload().unwrap();
    let id = other.snapshot().lookup(&keys::hash(&k.raw), NOW).unwrap();
    assert_eq!(id.plan.as_deref(), Some("enterprise"));
    assert!(id.suspended);
}

#[test]
fn a_corrupt_file_keeps_the_previous_snapshot() {
    let (_d, s) = store();
    let k = create(&s, "cus_3");
    fs::write(s.path(), "{ not json").unwrap();
    assert!(matches!(s.reload(), Err(StoreError::Corrupt(..))));
    assert!(s.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
}

#[test]
fn concurrent_writers_lose_nothing() {
    let (_d, s) = store();
    let s = Arc::new(s);
    std::thread::scope(|sc| {
        for t in 0..4 {
            let s = Arc::clone(&s);
            sc.spawn(move || {
                let other = FileStore::open(s.path()).unwrap();
                for i in 0..10 {
                    create(&other, &format!("cus_{t}_{i}"));
                }
            });
        }
    });
    assert_eq!(s.data().unwrap().keys.len(), 40);
}

/// A handle that writes as another process would (a CLI), folding the
/// journal into the document once it reaches `compact_at` bytes.
fn writer(s: &FileStore, compact_at: u64) -> FileStore {
    FileStore {
        compact_at,
        ..FileStore::unsnapshotted(s.path())
    }
}

#[test]
fn a_change_is_one_journal_line_and_leaves_the_document_alone() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    let document = fs::read(s.path()).unwrap();
    assert_eq!(
        fs::metadata(s.journal_path()).unwrap().len(),
        0,
        "the first write makes the document"
    );
    let b = create(&s, "cus_2");
    revoke(&s, &a.record.id, NOW).unwrap();
    set_plan(&s, "cus_2", "enterprise").unwrap();
    set_plan(&s, "cus_2", "enterprise").unwrap();
    assert_eq!(
        fs::read(s.path()).unwrap(),
        document,
        "the document is not rewritten"
    );
    let journal = fs::read_to_string(s.journal_path()).unwrap();
    assert_eq!(
        journal.lines().count(),
        3,
        "one line per change, none for no change: {journal}"
    );
    let fresh = FileStore::open(s.path()).unwrap();
    let snap = fresh.snapshot();
    assert_eq!(
        snap.lookup(&keys::hash(&a.raw), NOW).err(),
        Some(KeyRejection::Revoked)
    );
    let id = snap.lookup(&keys::hash(&b.raw), NOW).unwrap();
    assert_eq!(id.plan.as_deref(), Some("enterprise"));
    assert_eq!(fresh.data().unwrap(), s.data().unwrap());
}

#[test]
fn a_running_store_applies_a_change_without_rebuilding_its_snapshot() {
    let (_d, s) = store();
    s.update(|d| {
        for i in 0..300 {
            d.keys.push(super::super::KeyRecord {
                id: format!("key_{i:016}"),
                hash: hex::encode(keys::hash(&format!("raw {i}"))),
                start: "tg_test_abcd".into(),
                customer: format!("cus_{i}"),
                name: None,
                meta: None,
                created: "2026-01-01T00:00:00Z".into(),
                expires: None,
                revoked: None,
            });
        }
        Ok(())
    })
    .unwrap();
    let cli = writer(&s, COMPACT_AT);
    let before = s.snapshot();
    let k = create(&cli, "cus_new");
    assert!(s.reload().unwrap());
    let after = s.snapshot();
    assert_eq!(
        after.shared_shards(&before),
        2 * super::super::SHARDS - 2,
        "one key shard and one customer shard copied"
    );
    assert!(after.lookup(&keys::hash(&k.raw), NOW).is_ok());
    assert_eq!(after.key_count, 301);
    set_suspended(&cli, "cus_new", true).unwrap();
    assert!(s.reload().unwrap());
    assert!(
        s.snapshot()
            .lookup(&keys::hash(&k.raw), NOW)
            .unwrap()
            .suspended
    );
    assert!(!s.reload().unwrap(), "nothing new: nothing applied");
}

#[test]
fn an_unfinished_last_line_is_skipped_then_cut_by_the_next_write() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    let other = FileStore::open(s.path()).unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(s.journal_path())
        .unwrap();
    f.write_all(b"{\"keys\":[{\"id\":\"key_").unwrap();
    assert!(
        !other.reload().unwrap(),
        "a line still being written is no change"
    );
    assert_eq!(other.data().unwrap().keys.len(), 1);
    let b = create(&s, "cus_2");
    let journal = fs::read_to_string(s.journal_path()).unwrap();
    assert!(
        journal.starts_with("{\"customers\""),
        "the torn line was cut: {journal}"
    );
    assert!(other.reload().unwrap());
    for k in [&a, &b] {
        assert!(other.snapshot().lookup(&keys::hash(&k.raw), NOW).is_ok());
    }
}

#[test]
fn readers_follow_the_journal_through_its_compactions() {
    let (_d, s) = store();
    let reader = FileStore::open(s.path()).unwrap();
    let w = writer(&s, 1_000);
    let mut made = Vec::new();
    let mut folded = 0;
    for i in 0..30 {
        made.push(create(&w, &format!("cus_{}", i % 7)));
        if i % 3 == 0 {
            revoke(&w, &made[i / 2].record.id, NOW).unwrap();
        }
        if fs::metadata(w.journal_path()).unwrap().len() == 0 {
            folded += 1;
        }
        if i % 4 == 0 {
            reader.reload().unwrap();
        }
    }
    assert!(folded >= 3, "the journal was folded {folded} times");
    reader.reload().unwrap();
    let data = w.data().unwrap();
    assert_eq!(data.keys.len(), 30);
    let want = Snapshot::build(&data);
    for k in &made {
        let h = keys::hash(&k.raw);
        assert_eq!(
            reader.snapshot().lookup(&h, NOW).map(|i| i.key_id.clone()),
            want.lookup(&h, NOW).map(|i| i.key_id.clone()),
            "{}",
            k.record.id
        );
    }
    assert_eq!(reader.snapshot().key_count, 30);
}

#[test]
fn a_whole_store_update_journals_what_it_removed() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    create(&s, "cus_2");
    let reader = FileStore::open(s.path()).unwrap();
    s.update(|d| {
        d.keys.retain(|k| k.id != a.record.id);
        d.customers.remove("cus_1");
        Ok(())
    })
    .unwrap();
    assert!(reader.reload().unwrap());
    let snap = reader.snapshot();
    assert_eq!(
        snap.lookup(&keys::hash(&a.raw), NOW).err(),
        Some(KeyRejection::Unknown)
    );
    assert_eq!(snap.key_count, 1);
    assert!(snap.customer("cus_1").is_none());
    assert_eq!(
        FileStore::open(s.path()).unwrap().data().unwrap(),
        s.data().unwrap()
    );
}

#[test]
fn a_load_of_the_document_and_journal_is_the_snapshot_of_the_store() {
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    let b = create(&s, "cus_2");
    let c = create(&s, "cus_3");
    set_plan(&s, "cus_1", "enterprise").unwrap();
    revoke(&s, &b.record.id, NOW).unwrap();
    s.update(|d| {
        d.keys.retain(|k| k.id != c.record.id);
        d.customers.remove("cus_3");
        Ok(())
    })
    .unwrap();
    let d = create(&s, "cus_4");
    assert!(fs::metadata(s.journal_path()).unwrap().len() > 0);
    let data = s.data().unwrap();
    let (built, loaded) = (
        Snapshot::build(&data),
        FileStore::open(s.path()).unwrap().snapshot(),
    );
    for k in [&a, &b, &c, &d] {
        let seen = |snap: &Snapshot| {
            snap.lookup(&keys::hash(&k.raw), NOW).map(|i| {
                (
                    i.key_id.clone(),
                    i.customer.clone(),
                    i.plan.clone(),
                    i.suspended,
                )
            })
        };
        assert_eq!(seen(&loaded), seen(&built), "{}", k.record.id);
    }
    assert_eq!(loaded.key_count, 3);
    let ids = |snap: &Snapshot| {
        let mut v: Vec<_> = snap.customer_ids().collect();
        v.sort();
        v
    };
    assert_eq!(ids(&loaded), ids(&built));
    assert_eq!(loaded.key_statuses(NOW), built.key_statuses(NOW));
}

#[test]
fn a_load_shows_each_record_once_as_the_store_holds_it() {
    #[derive(Default)]
    struct Seen(Vec<String>);
    impl Inspect for Seen {
        fn customer(&mut self, id: &str, c: &CustomerRecord) {
            self.0.push(format!("{id} {:?}", c.plan));
        }
        fn key(&mut self, k: &KeyRecord, hash: HashSeen) {
            assert_eq!(hash, HashSeen::First);
            self.0.push(format!("{} {}", k.id, k.revoked.is_some()));
        }
    }
    let (_d, s) = store();
    let a = create(&s, "cus_1");
    let b = create(&s, "cus_2");
    revoke(&s, &a.record.id, NOW).unwrap();
    set_plan(&s, "cus_2", "enterprise").unwrap();
    let mut seen = Seen::default();
    FileStore::open_inspecting(s.path(), &mut seen).unwrap();
    let mut want = vec![
        "cus_1 Some(\"pro\")".to_owned(),
        format!("{} true", a.record.id),
        "cus_2 Some(\"enterprise\")".to_owned(),
        format!("{} false", b.record.id),
    ];
    want.sort();
    seen.0.sort();
    assert_eq!(seen.0, want);
}

#[test]
fn a_large_document_is_read_through_a_buffer_as_a_small_one_is_read_whole() {
    let (_d, s) = store();
    s.update(|d| {
        for i in 0..6_000 {
            d.customers
                .insert(format!("cus_{i}"), CustomerRecord::default());
            d.keys.push(KeyRecord {
                id: format!("key_{i:016}"),
                hash: hex::encode(keys::hash(&format!("raw {i}"))),
                start: "tg_test_abcd".into(),
                customer: format!("cus_{i}"),
                name: Some(format!("the key \"{i}\"")),
                meta: None,
                created: "2026-01-01T00:00:00Z".into(),
                expires: None,
                revoked: (i % 3 == 0).then(|| "2026-01-02T00:00:00Z".into()),
            });
        }
        Ok(())
    })
    .unwrap();
    assert!(
        fs::metadata(s.path()).unwrap().len() > 1 << 20,
        "over the threshold"
    );
    let fresh = create(&s, "cus_new");
    revoke(&s, "key_0000000000000001", NOW).unwrap();
    set_plan(&s, "cus_2", "enterprise").unwrap();
    assert!(fs::metadata(s.journal_path()).unwrap().len() > 0);
    let loaded = FileStore::open(s.path()).unwrap().snapshot();
    let built = Snapshot::build(&s.data().unwrap());
    assert_eq!(loaded.key_count, 6_001);
    assert!(loaded.lookup(&keys::hash(&fresh.raw), NOW).is_ok());
    assert_eq!(
        loaded.lookup(&keys::hash("raw 1"), NOW).err(),
        Some(KeyRejection::Revoked)
    );
    let plan = loaded
        .lookup(&keys::hash("raw 2"), NOW)
        .unwrap()
        .plan
        .clone();
    assert_eq!(plan.as_deref(), Some("enterprise"));
    assert_eq!(loaded.key_statuses(NOW), built.key_statuses(NOW));
    for i in [0, 1, 2, 2_999, 5_999] {
        let h = keys::hash(&format!("raw {i}"));
        let seen = |snap: &Snapshot| snap.lookup(&h, NOW).map(|i| i.customer.clone());
        assert_eq!(seen(&loaded), seen(&built), "{i}");
    }
}
