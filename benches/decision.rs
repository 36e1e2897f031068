//! The per-request decision at 100k customers: key format check + SHA-256 +
//! constant-time lookup, plan resolution, the exact memory limiter, and
//! header rendering (and, apart, a prepaid balance). Target: under 2 µs.
//! Run: `cargo bench -p tollgate-core`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tollgate_core::clock::{rfc3339, Clock, SystemClock};
use tollgate_core::credits::Account;
use tollgate_core::diag::Source;
use tollgate_core::gate::Gate;
use tollgate_core::headers::RateHeaders;
use tollgate_core::keys;
use tollgate_core::limiter::MemoryLimiter;
use tollgate_core::plans::Plans;
use tollgate_core::store::{CustomerRecord, KeyRecord, Snapshot, StaticKeys, StoreData};

const CUSTOMERS: usize = 100_000;
const PLANS: &str = "default_plan: pro\nplans:\n  pro:\n    limits:\n      - { name: burst, requests: 1000000, per: second }\n      - { name: monthly, requests: 1000000000000, per: month }\n    meter: api_requests\n";

/// A store of `CUSTOMERS` customers with one key each, and the keys.
fn store() -> (StoreData, Vec<String>) {
    let now = SystemClock.now_ms();
    let mut data = StoreData {
        version: 1,
        ..StoreData::default()
    };
    let mut raw = Vec::with_capacity(CUSTOMERS);
    for i in 0..CUSTOMERS {
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let key = keys::from_secret("tg_live_", &secret);
        let customer = format!("cus_{i:08}");
        data.customers.insert(
            customer.clone(),
            CustomerRecord {
                plan: Some("pro".into()),
                ..CustomerRecord::default()
            },
        );
        data.keys.push(KeyRecord {
            meta: None,
            id: format!("key_{i:016}"),
            hash: hex::encode(keys::hash(&key)),
            start: key[..12].to_owned(),
            customer,
            name: None,
            created: rfc3339(now),
            expires: None,
            revoked: None,
        });
        raw.push(key);
    }
    (data, raw)
}

/// The gate over `store()`'s keys, the keys, and the store (kept by the
/// caller so its memory is not freed and reused while the limiter's own
/// is measured).
fn setup() -> (Gate<MemoryLimiter>, Vec<String>, StoreData) {
    let (data, raw) = store();
    let plans = Plans::parse(&Source::new("plans.yaml".as_ref(), PLANS.into())).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // What the lookup snapshot holds of a key and its customer (issue 16:
    // a million keys in ≤ 300 MB), printed once.
    let before = rss();
    let snapshot = Arc::new(Snapshot::build(&data));
    let grown = rss().saturating_sub(before);
    eprintln!(
        "lookup snapshot, {CUSTOMERS} keys of one customer each: {:.1} MB ({} bytes a key; resident memory grown by building it)",
        grown as f64 / 1e6,
        grown / CUSTOMERS as u64
    );
    let gate = Gate {
        plans: tollgate_core::sync::Shared::new(Arc::new(plans)),
        keys: Arc::new(StaticKeys(snapshot)),
        limiter: Arc::new(MemoryLimiter::new(clock.clone())),
        clock,
        prefix: "tg_live_".into(),
        answer_preflights: false,
        journal: None,
        jwt: None,
        credits: None,
        alerts: None,
        holds: Default::default(),
    };
    (gate, raw, data)
}

/// The process's resident memory, in bytes (Linux).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn decision(c: &mut Criterion) {
    let (gate, raw, data) = setup();
    // Warm every customer into the limiter so the map holds 100k entries;
    // what that grows the process by is the limiter's state (issue 16:
    // ≤ 64 MB for 100 000 active customers), printed once.
    let before = rss();
    for k in &raw {
        let (id, plan) = gate.authenticate_cached(k).unwrap();
        gate.limiter.decide(&id.customer, &plan, 1);
    }
    let grown = rss().saturating_sub(before);
    drop(data);
    eprintln!(
        "limiter state, {CUSTOMERS} customers with two limits each (a sliding second holding one request, a month): {:.1} MB ({} bytes a customer; resident memory grown by warming them)",
        grown as f64 / 1e6,
        grown / CUSTOMERS as u64
    );
    let mut i = 0usize;
    c.bench_function("decision_100k_customers", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS; // stride through customers
            let (id, plan) = gate.authenticate_cached(black_box(&raw[i])).unwrap();
            let d = gate.limiter.decide(&id.customer, &plan, 1);
            black_box(RateHeaders::render(&d))
        })
    });
    // The parts, to see where the time goes.
    c.bench_function("part_authenticate", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS;
            black_box(gate.authenticate_cached(black_box(&raw[i])).is_ok())
        })
    });
    // One key again and again: a caller whose key and customer stay in
    // the cache, against the stride above that misses it every time.
    c.bench_function("part_authenticate_warm", |b| {
        b.iter(|| black_box(gate.authenticate_cached(black_box(&raw[0])).is_ok()))
    });
    let (id0, plan0) = gate.authenticate_cached(&raw[0]).unwrap();
    let ids: Vec<_> = raw
        .iter()
        .map(|k| gate.authenticate_cached(k).unwrap().0)
        .collect();
    c.bench_function("part_limiter", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS;
            black_box(gate.limiter.decide(&ids[i].customer, &plan0, 1).allowed)
        })
    });
    let d = gate.limiter.decide(&id0.customer, &plan0, 1);
    c.bench_function("part_render", |b| {
        b.iter(|| black_box(RateHeaders::render(black_box(&d))))
    });
    // The per-request strings Tollgate writes itself: a generated
    // X-Request-Id and the access log line's timestamp.
    c.bench_function("part_request_id", |b| {
        b.iter(|| {
            black_box(tollgate_core::request_id::generate(black_box(
                1_796_000_000_042,
            )))
        })
    });
    c.bench_function("part_log_time", |b| {
        let mut line = String::with_capacity(32);
        b.iter(|| {
            line.clear();
            tollgate_core::clock::push_rfc3339_millis(&mut line, black_box(1_796_000_000_042));
            black_box(line.len())
        })
    });
    c.bench_function("part_sha256", |b| {
        b.iter(|| black_box(keys::hash(black_box(&raw[0]))))
    });
    // A prepaid customer's balance, as the spool's credit book answers it
    // (one map lookup under its lock, then the account's balance), for
    // 100k accounts that each have spent some this month.
    let allowance = tollgate_core::credits::Allowance {
        grant: 100_000,
        ..Default::default()
    };
    let now = SystemClock.now_ms();
    let accounts: std::sync::Mutex<std::collections::HashMap<Arc<str>, Account>> = ids
        .iter()
        .map(|id| {
            let mut a = Account::new(allowance, now);
            a.charge(allowance, 1234, now);
            (id.customer.clone(), a)
        })
        .collect::<std::collections::HashMap<_, _>>()
        .into();
    c.bench_function("part_credit_balance", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS;
            let m = accounts.lock().unwrap();
            black_box(
                m.get(&ids[i].customer)
                    .map(|a| a.balance(allowance, now).remaining),
            )
        })
    });
    // What a request of a customer past an alert threshold pays on top
    // (`alerts:` on, memory limiter): the thresholds its decision reached,
    // then the journal's shared-read check that each was raised before
    // (the spool's `raise` fast path: a read lock and a hash lookup).
    let th = tollgate_core::alerts::Thresholds::new(vec![80, 100]);
    let status = |name: &str, quota, remaining| tollgate_core::limiter::PolicyStatus {
        name: name.into(),
        quota,
        remaining,
        reset_secs: 1,
        violated: false,
        concurrent: false,
    };
    let past = tollgate_core::limiter::Decision {
        policies: vec![
            status("burst", 1_000_000, 999_999),
            status("monthly", 100, 10),
        ],
        ..tollgate_core::limiter::Decision::unlimited()
    };
    let raised: std::sync::RwLock<std::collections::HashSet<tollgate_core::alerts::AlertKey>> =
        std::sync::RwLock::new(
            ids.iter()
                .flat_map(|id| {
                    tollgate_core::alerts::limit_crossings(
                        &th,
                        &id.customer,
                        &plan0,
                        &past,
                        1,
                        now,
                        false,
                    )
                })
                .map(|a| a.key())
                .collect(),
        );
    c.bench_function("part_alerts_past_threshold", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS;
            let found = tollgate_core::alerts::limit_crossings(
                &th,
                &ids[i].customer,
                &plan0,
                black_box(&past),
                1,
                now,
                false,
            );
            let r = raised.read().unwrap();
            black_box(found.iter().all(|a| r.contains(&a.key())))
        })
    });
    // A `reserve` route's hold on the credits: taken, then settled.
    let holds = Arc::new(tollgate_core::credits::Holds::default());
    c.bench_function("part_credit_hold", |b| {
        b.iter(|| {
            i = (i + 7919) % CUSTOMERS;
            let h = holds.take(&ids[i].customer, 40, 1000, || black_box(1000));
            black_box(h.map(|h| h.settle()))
        })
    });
    c.bench_function("reject_malformed_key", |b| {
        b.iter(|| black_box(gate.authenticate_cached(black_box("tg_live_not-a-key"))).is_err())
    });
}

/// What a running proxy does with one change to its store: the file store
/// builds a new snapshot of every key (`snapshot_build_100k`); the Redis
/// replica, which once did as much plus a copy of every record for each
/// published change (`replica_change_before_100k`), now derives the next
/// snapshot from the current one (`replica_change_key_100k`: a new key;
/// `replica_change_customer_100k`: a plan change).
fn replica_changes(c: &mut Criterion) {
    let (data, _) = store();
    c.bench_function("snapshot_build_100k", |b| {
        b.iter(|| black_box(Snapshot::build(black_box(&data)).key_count))
    });
    c.bench_function("replica_change_before_100k", |b| {
        b.iter(|| black_box(Snapshot::build(&black_box(&data).clone()).key_count))
    });
    let snap = Snapshot::build(&data);
    let mut record = data.keys[0].clone();
    record.id = "key_new".into();
    let hash = keys::hash(&keys::from_secret("tg_live_", &[0xee; 32]));
    c.bench_function("replica_change_key_100k", |b| {
        b.iter(|| black_box(snap.with_key(black_box(&hash), Some(&record)).key_count))
    });
    let pro = CustomerRecord {
        plan: Some("enterprise".into()),
        ..CustomerRecord::default()
    };
    c.bench_function("replica_change_customer_100k", |b| {
        b.iter(|| black_box(snap.with_customer("cus_00004242", Some(&pro)).key_count))
    });
}

criterion_group!(benches, decision, replica_changes);
criterion_main!(benches);
