use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use super::*;

pub(super) fn config(dir: &Path, sinks: &[&str]) -> SpoolConfig {
    SpoolConfig {
        dir: dir.to_path_buf(),
        fsync_interval: Duration::from_millis(10),
        max_bytes: 1 << 30,
        rollup: 1000,
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        seal: None,
        alerts: Default::default(),
        shared_credits: false,
    }
}

fn sealed(dir: &Path, sinks: &[&str], key: u8, previous: Option<u8>) -> SpoolConfig {
    SpoolConfig {
        seal: Some(Arc::new(Seal::new(
            &[key; 32],
            previous.map(|p| [p; 32]).as_ref(),
        ))),
        ..config(dir, sinks)
    }
}

/// Every file the spool wrote, as one text.
fn all_files(dir: &Path) -> String {
    let mut out = String::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        out.push_str(&String::from_utf8_lossy(
            &fs::read(e.path()).unwrap_or_default(),
        ));
    }
    out
}

#[tokio::test]
async fn a_sealed_spool_holds_no_plain_usage_and_opens_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_secret".into(), "api".into());
    let s = Spool::open(sealed(dir.path(), &["stripe"], 1, None), clock()).unwrap();
    for _ in 0..3 {
        assert!(s.append(&c, &m, 2).await.unwrap());
    }
    assert_eq!(s.rollup(true).await, 1);
    let r = s.unsettled("stripe", 10, |_| true).remove(0);
    s.dead_letter("stripe", &r, "refused");
    assert!(s.append(&c, &m, 1).await.unwrap());
    s.close();
    let files = all_files(dir.path());
    assert!(
        !files.contains("cus_secret"),
        "plain usage at rest:\n{files}"
    );

    // The right key: everything back. Another key, or none: refused, and
    // nothing is dropped (the files are untouched).
    let wrong = Spool::open(sealed(dir.path(), &["stripe"], 9, None), clock());
    assert!(
        matches!(wrong, Err(SpoolError::WrongKey(_))),
        "{:?}",
        wrong.err()
    );
    let none = Spool::open(config(dir.path(), &["stripe"]), clock());
    assert!(
        matches!(none, Err(SpoolError::Sealed(_))),
        "{:?}",
        none.err()
    );
    let s = Spool::open(sealed(dir.path(), &["stripe"], 1, None), clock()).unwrap();
    assert_eq!(s.totals("cus_secret")["api"].recorded, 7);
    assert_eq!(s.unsettled("stripe", 10, |_| true).len(), 1);
    s.close();
}

#[tokio::test]
async fn keys_rotate_and_a_plain_spool_is_sealed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_rot".into(), "api".into());
    // Written plain, before sealing was turned on.
    let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
    assert!(s.append(&c, &m, 5).await.unwrap());
    s.close();
    let s = Spool::open(sealed(dir.path(), &[], 1, None), clock()).unwrap();
    assert_eq!(s.totals("cus_rot")["api"].recorded, 5);
    s.close();
    assert!(!all_files(dir.path()).contains("cus_rot"), "sealed on open");
    // Rotate from key 1 to key 2, then drop key 1.
    let s = Spool::open(sealed(dir.path(), &[], 2, Some(1)), clock()).unwrap();
    assert!(s.append(&c, &m, 1).await.unwrap());
    s.close();
    let s = Spool::open(sealed(dir.path(), &[], 2, None), clock()).unwrap();
    assert_eq!(s.totals("cus_rot")["api"].recorded, 6);
    s.close();
    let old = Spool::open(sealed(dir.path(), &[], 1, None), clock());
    assert!(
        matches!(old, Err(SpoolError::WrongKey(_))),
        "{:?}",
        old.err()
    );
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(tollgate_core::clock::SystemClock)
}

#[tokio::test]
async fn events_survive_a_restart_and_roll_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
    for _ in 0..5 {
        assert!(s.append(&c, &m, 2).await.unwrap());
    }
    // Dropped without close: like a crash after the writes.
    drop(s);
    let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
    assert_eq!(
        s.totals("cus_1")["api"],
        MeterTotals {
            recorded: 10,
            reported: 0,
            pending: 10
        }
    );
    assert_eq!(s.rollup(true).await, 1);
    let recs = s.unsettled("stripe", 10, |_| true);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].units, 10);
    let id = recs[0].identifier.clone();
    assert!(id.starts_with(&format!("tg-{}-", s.instance)) && id.len() <= 100);
    s.close();
    // The record and its identifier come back unchanged; the events do not
    // come back as pending (no double count).
    let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
    let recs = s.unsettled("stripe", 10, |_| true);
    assert_eq!(
        (recs.len(), recs[0].identifier.as_str(), recs[0].units),
        (1, id.as_str(), 10)
    );
    assert_eq!(s.totals("cus_1")["api"].recorded, 10);
    assert_eq!(
        s.recorded_this_month()[&(c.clone(), m.clone())],
        10,
        "seeds the ledger after a restart"
    );
    s.settle("stripe", &[recs[0].rseq], true).unwrap();
    assert!(s.unsettled("stripe", 10, |_| true).is_empty());
    assert_eq!(
        s.totals("cus_1")["api"],
        MeterTotals {
            recorded: 10,
            reported: 10,
            pending: 0
        }
    );
    s.close();
    let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
    assert!(
        s.unsettled("stripe", 10, |_| true).is_empty(),
        "settled stays settled"
    );
}

#[tokio::test]
async fn a_torn_last_line_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
    assert!(s.append(&c, &m, 3).await.unwrap());
    s.close();
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join("events.log"))
        .unwrap();
    f.write_all(b"E 99 1 cus_1 api 1000 dead").unwrap(); // no CRC match, no newline
    let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
    assert_eq!(s.totals("cus_1")["api"].recorded, 3);
}

#[tokio::test]
async fn each_sink_settles_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["a", "b"]), clock()).unwrap();
    assert!(s.append(&c, &m, 1).await.unwrap());
    s.rollup(true).await;
    let r = s.unsettled("a", 1, |_| true)[0].rseq;
    s.settle("a", &[r], true).unwrap();
    assert!(s.unsettled("a", 9, |_| true).is_empty());
    assert_eq!(s.unsettled("b", 9, |_| true).len(), 1);
    assert_eq!(s.pending_units("b").0, 1);
    assert_eq!(
        s.totals("cus_1")["api"].reported,
        0,
        "reported once every sink has it"
    );
}

#[tokio::test]
async fn identifiers_are_never_reused_after_settled_records_are_dropped() {
    use tollgate_core::clock::{days_from_civil, Date, ManualClock, DAY};
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let jan = days_from_civil(Date {
        year: 2027,
        month: 1,
        day: 20,
    }) as Millis
        * DAY;
    let clock = ManualClock::at(jan);
    let s = Spool::open(config(dir.path(), &["stripe"]), Arc::new(clock.clone())).unwrap();
    assert!(s.append(&c, &m, 1).await.unwrap());
    s.rollup(true).await;
    let first = s.unsettled("stripe", 9, |_| true)[0].clone();
    s.settle("stripe", &[first.rseq], true).unwrap();
    s.close();
    // A month later every January record is gone from the files...
    clock.set(jan + 31 * DAY);
    let s = Spool::open(config(dir.path(), &["stripe"]), Arc::new(clock.clone())).unwrap();
    assert!(s.totals("cus_1").is_empty());
    let records = fs::read_to_string(dir.path().join("records.log")).unwrap();
    assert!(!records.contains(&first.identifier), "{records}");
    // ...but the next identifier is still new.
    assert!(s.append(&c, &m, 1).await.unwrap());
    s.rollup(true).await;
    let second = s.unsettled("stripe", 9, |_| true)[0].clone();
    assert!(second.rseq > first.rseq, "{second:?} reuses {first:?}");
    assert_ne!(second.identifier, first.identifier);
}

#[tokio::test]
async fn a_changed_rollup_does_not_count_rolled_events_again() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus 1%".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["stripe"]), clock()).unwrap();
    for _ in 0..3 {
        assert!(s.append(&c, &m, 1).await.unwrap());
    }
    s.rollup(true).await;
    s.close();
    let mut cfg = config(dir.path(), &["stripe"]);
    cfg.rollup = 60_000;
    let s = Spool::open(cfg, clock()).unwrap();
    let recs = s.unsettled("stripe", 9, |_| true);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        &*recs[0].customer, "cus 1%",
        "odd ids survive the line format"
    );
    assert_eq!(s.totals("cus 1%")["api"].recorded, 3, "not 6");
}

#[tokio::test]
async fn settled_usage_leaves_memory_and_files_but_stays_in_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    for _ in 0..100 {
        assert!(s.append(&c, &m, 1).await.unwrap());
    }
    s.rollup(true).await;
    let r = s.unsettled("a", 9, |_| true)[0].rseq;
    s.settle("a", &[r], true).unwrap();
    assert_eq!(lock(&s.state).records.len(), 0, "folded into the summary");
    s.close();
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    assert_eq!(
        s.totals("cus_1")["api"],
        MeterTotals {
            recorded: 100,
            reported: 100,
            pending: 0
        }
    );
    let size = |f: &str| fs::metadata(dir.path().join(f)).unwrap().len();
    assert!(
        size("events.log") == 0 && size("records.log") < 200,
        "compacted at start"
    );
    assert!(!s.is_full());
}

#[tokio::test]
async fn a_dead_letter_is_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    assert!(s.append(&c, &m, 4).await.unwrap());
    s.rollup(true).await;
    let r = s.unsettled("a", 9, |_| true)[0].rseq;
    s.settle("a", &[r], false).unwrap();
    assert_eq!(
        s.totals("cus_1")["api"],
        MeterTotals {
            recorded: 4,
            reported: 0,
            pending: 0
        }
    );
}

#[tokio::test]
async fn a_replayed_dead_letter_is_owed_again_under_its_identifier_once() {
    let dir = tempfile::tempdir().unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    let s = Spool::open(config(dir.path(), &["a", "b"]), clock()).unwrap();
    assert!(s.append(&c, &m, 4).await.unwrap());
    s.rollup(true).await;
    let r = s.unsettled("a", 9, |_| true).remove(0);
    s.dead_letter("a", &r, "400 no such customer");
    s.settle("a", &[r.rseq], false).unwrap();
    s.settle("b", &[r.rseq], true).unwrap();
    assert!(s.unsettled("a", 9, |_| true).is_empty());
    let dead = s.dead_letters("a");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].identifier, r.identifier);
    assert_eq!(dead[0].reason, "400 no such customer");

    // An unknown id replays nothing; the right one, once.
    assert!(s
        .replay("a", Some(&["tg-nope-1".into()]))
        .unwrap()
        .is_empty());
    assert_eq!(s.replay("a", None).unwrap(), vec![r.identifier.clone()]);
    assert!(s.replay("a", None).unwrap().is_empty(), "replayed twice");
    assert!(s.dead_letters("a").is_empty());
    let again = s.unsettled("a", 9, |_| true);
    assert_eq!(again.len(), 1);
    assert_eq!(
        (&again[0].identifier, again[0].units, again[0].window_start),
        (&r.identifier, 4, r.window_start)
    );
    assert!(s.unsettled("b", 9, |_| true).is_empty(), "b already has it");
    assert_eq!(s.pending_units("a").0, 4);
    assert_eq!(s.pending_units("b").0, 0);
    // Counted as recorded once, not again for the replay.
    assert_eq!(s.totals("cus_1")["api"].recorded, 4);

    // Owed across a restart (and a compaction) too.
    s.close();
    drop(s);
    let st = Spool::inspect(&config(dir.path(), &["a", "b"]), clock().now_ms()).unwrap();
    assert_eq!(st.sinks[0].pending_units, 4);
    assert_eq!(st.sinks[0].dead_letters, 0);
    let s = Spool::open(config(dir.path(), &["a", "b"]), clock()).unwrap();
    let again = s.unsettled("a", 9, |_| true);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].identifier, r.identifier);
    s.settle("a", &[again[0].rseq], true).unwrap();
    assert!(s.unsettled("a", 9, |_| true).is_empty());
    assert_eq!(
        s.totals("cus_1")["api"],
        MeterTotals {
            recorded: 4,
            reported: 4,
            pending: 0
        }
    );
}

#[test]
fn inspect_reads_a_spool_in_use_without_taking_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (c, m): (Arc<str>, Arc<str>) = ("cus_1".into(), "api".into());
    assert!(rt.block_on(s.append(&c, &m, 3)).unwrap());
    let st = Spool::inspect(&config(dir.path(), &["a"]), clock().now_ms()).unwrap();
    assert_eq!(st.sinks.len(), 1);
    assert_eq!(st.sinks[0].pending_units, 3);
    assert!(st.sinks[0].oldest.is_some());
    assert!(st.bytes > 0);
    // Still the owner's.
    assert!(matches!(
        Spool::open(config(dir.path(), &["a"]), clock()),
        Err(SpoolError::InUse(_))
    ));
}

#[tokio::test]
async fn calendar_charges_survive_reopening_and_compaction_until_their_window_ends() {
    use tollgate_core::clock::{ManualClock, DAY};
    use tollgate_core::meter::CalendarCharge;
    let dir = tempfile::tempdir().unwrap();
    // Mid-month, mid-day.
    let t = 1_780_000_000_000 - 1_780_000_000_000 % DAY + 10 * DAY + 3_600_000;
    let clock = ManualClock::at(t);
    let plans = tollgate_core::plans::Plans::parse(&tollgate_core::diag::Source::new(
        Path::new("plans.yaml"),
        "default_plan: q\nplans:\n  q:\n    limits:\n      - { name: daily, requests: 9, per: day }\n      - { name: monthly, requests: 99, per: month }\n      - { name: burst, requests: 9, per: second }\n".into(),
    ))
    .unwrap();
    let plan = plans.get("q").unwrap();
    let c: Arc<str> = "cus 1".into(); // escaped on disk
    let m: Arc<str> = "api".into();
    let s = Spool::open(config(dir.path(), &[]), Arc::new(clock.clone())).unwrap();
    for (usage, cost) in [(Some((&m, 2)), 2), (None, 3)] {
        let charge = CalendarCharge {
            plan: plan.clone(),
            cost,
            at: clock.now_ms(),
        };
        assert!(s.journal(&c, usage, Some(charge), None).await.unwrap());
    }
    let mut counters = s.calendar_counters();
    counters.sort_by_key(|x| x.window == Window::Day);
    let got: Vec<(&str, Window, u64)> = counters
        .iter()
        .map(|x| (&*x.limit, x.window, x.used))
        .collect();
    assert_eq!(
        got,
        vec![("monthly", Window::Month, 5), ("daily", Window::Day, 5)]
    );
    s.close();
    drop(s);
    // Reopened (which compacts): the same; a day later the daily is over.
    let s = Spool::open(config(dir.path(), &[]), Arc::new(clock.clone())).unwrap();
    assert_eq!(s.calendar_counters().len(), 2);
    assert_eq!(s.totals("cus 1")["api"].recorded, 2, "usage is still usage");
    s.close();
    drop(s);
    clock.advance(DAY);
    let s = Spool::open(config(dir.path(), &[]), Arc::new(clock.clone())).unwrap();
    let left: Vec<(String, u64)> = s
        .calendar_counters()
        .iter()
        .map(|x| (x.limit.to_string(), x.used))
        .collect();
    assert_eq!(left, vec![("monthly".to_owned(), 5)]);
    assert!(!all_files(dir.path()).contains("daily"), "compacted away");
}

#[test]
fn a_second_process_cannot_open_a_spool_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(config(dir.path(), &[]), clock()).unwrap();
    let err = Spool::open(config(dir.path(), &[]), clock())
        .err()
        .expect("the spool is locked");
    assert!(matches!(err, SpoolError::InUse(_)), "{err}");
    assert!(
        err.to_string()
            .contains("in use by another Tollgate process"),
        "{err}"
    );
    s.close();
    Spool::open(config(dir.path(), &[]), clock()).expect("free again after close");
}

/// A binary upgrade: the new process waits for the old one to close the
/// spool, and then sees what it recorded; it gives up after its wait.
#[tokio::test]
async fn opening_waits_for_the_process_holding_the_spool_to_close_it() {
    let dir = tempfile::tempdir().unwrap();
    let old = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    let err = Spool::open_waiting(
        config(dir.path(), &["a"]),
        clock(),
        Duration::from_millis(50),
    )
    .err()
    .expect("still held after the wait");
    assert!(matches!(err, SpoolError::InUse(_)), "{err}");
    let (c, m): (Arc<str>, Arc<str>) = ("cus_up".into(), "api".into());
    assert!(old.append(&c, &m, 7).await.unwrap());
    let closing = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        old.close();
    });
    let started = std::time::Instant::now();
    let new = Spool::open_waiting(config(dir.path(), &["a"]), clock(), Duration::from_secs(10))
        .expect("opened once the old process closed it");
    assert!(started.elapsed() >= Duration::from_millis(150));
    closing.join().unwrap();
    new.rollup(true).await;
    assert_eq!(
        new.unsettled("a", 10, |_| true)
            .iter()
            .map(|r| r.units)
            .sum::<u64>(),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_each_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    let m: Arc<str> = "api".into();
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let (s, m) = (s.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            let c: Arc<str> = format!("cus_{}", i % 4).into();
            s.append(&c, &m, 1 + i % 3).await.unwrap()
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    // A rollup may hold the writer while appends arrive; whether they
    // are written here or on the spool's thread, each lands once.
    let more: Vec<_> = (0..100u64)
        .map(|_| {
            let (s, m) = (s.clone(), m.clone());
            tokio::spawn(async move { s.append(&"cus_0".into(), &m, 1).await.unwrap() })
        })
        .collect();
    s.rollup(false).await;
    for t in more {
        assert!(t.await.unwrap());
    }
    s.close();
    drop(s);
    let events = fs::read_to_string(dir.path().join("events.log")).unwrap();
    let seqs: BTreeSet<u64> = events
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs.len(), 500, "one line and one sequence per response");
    let s = Spool::open(config(dir.path(), &["a"]), clock()).unwrap();
    let expect = |c: u64| {
        (0..400u64)
            .filter(|i| i % 4 == c)
            .map(|i| 1 + i % 3)
            .sum::<u64>()
    };
    for c in 0..4u64 {
        let extra = if c == 0 { 100 } else { 0 };
        assert_eq!(
            s.totals(&format!("cus_{c}"))["api"].recorded,
            expect(c) + extra
        );
    }
}

#[tokio::test]
async fn credit_charges_and_grants_survive_reopening_and_compaction() {
    use tollgate_core::clock::ManualClock;
    use tollgate_core::credits::{Allowance, CreditBook, CreditPolicy, Grant, Granted, Source};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(1_780_000_000_000);
    let policy = Arc::new(CreditPolicy {
        plan: "prepaid".into(),
        allowance: Allowance {
            grant: 1000,
            per: Window::Month,
            rollover: false,
        },
        prices: [
            ("ai_output_tokens".into(), 4),
            ("ai_input_tokens".into(), 1),
        ]
        .into_iter()
        .collect(),
    });
    let c: Arc<str> = "cus 9".into(); // escaped on disk
    let (input, output, free): (Arc<str>, Arc<str>, Arc<str>) = (
        "ai_input_tokens".into(),
        "ai_output_tokens".into(),
        "api_requests".into(),
    );
    let pack = |amount| Grant {
        at: clock.now_ms(),
        amount,
        idempotency_key: Some("evt 1".into()),
        reason: "credit pack, 500".into(),
        source: Source::Stripe,
    };
    let s = Spool::open(config(dir.path(), &[]), Arc::new(clock.clone())).unwrap();
    assert_eq!(s.grant(&c, &policy, pack(500)).unwrap().0, Granted::Applied);
    assert!(s
        .journal(&c, Some((&input, 100)), None, Some(&policy))
        .await
        .unwrap());
    assert!(s.journal_now(
        &c,
        &[(output.clone(), 50), (free.clone(), 7)],
        Some(&policy)
    ));
    // 1000 + 500 - 100 - 4 * 50; the unpriced meter costs nothing.
    let want = 1200;
    assert_eq!(s.balance(&c, &policy, clock.now_ms()).remaining, want);
    s.close();
    drop(s);
    for round in ["replayed", "compacted"] {
        let s = Spool::open(config(dir.path(), &[]), Arc::new(clock.clone())).unwrap();
        let b = s.balance(&c, &policy, clock.now_ms());
        assert_eq!(
            (b.remaining, b.granted, b.used),
            (want, 1500, 300),
            "{round}"
        );
        let h: i64 = s
            .history(&c, &policy, clock.now_ms())
            .iter()
            .map(|e| e.amount)
            .sum();
        assert_eq!(h, want, "{round}: the history adds up");
        assert_eq!(
            s.grant(&c, &policy, pack(500)).unwrap().0,
            Granted::Duplicate,
            "{round}: the idempotency key is remembered"
        );
        s.close();
    }
}

/// With the balances in a shared store, charges are owed to it in order,
/// numbered, until delivered: through a restart and a compaction, never
/// twice a number, and none kept in a local account.
#[tokio::test]
async fn charges_owed_to_a_shared_store_survive_until_delivered() {
    use tollgate_core::clock::ManualClock;
    use tollgate_core::credits::{Allowance, CreditBook, CreditPolicy};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::at(1_780_000_000_000);
    let cfg = || SpoolConfig {
        shared_credits: true,
        ..config(dir.path(), &[])
    };
    let policy = Arc::new(CreditPolicy {
        plan: "prepaid".into(),
        allowance: Allowance {
            grant: 100,
            per: Window::Month,
            rollover: false,
        },
        prices: [("tokens".into(), 2)].into_iter().collect(),
    });
    let (a, b, tokens): (Arc<str>, Arc<str>, Arc<str>) =
        ("cus a".into(), "cus-b".into(), "tokens".into());
    let s = Spool::open(cfg(), Arc::new(clock.clone())).unwrap();
    for (c, units) in [(&a, 5), (&b, 1), (&a, 3)] {
        assert!(s
            .journal(c, Some((&tokens, units)), None, Some(&policy))
            .await
            .unwrap());
    }
    let owed = s.credits_owed(10);
    let seqs: Vec<u64> = owed.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, [0, 1, 2], "numbered in order");
    assert_eq!(owed[0].customer, a);
    assert_eq!((owed[0].credits, owed[2].credits), (10, 6));
    assert_eq!((s.credits_pending(&a), s.credits_pending(&b)), (16, 2));
    assert_eq!(
        s.balance(&a, &policy, clock.now_ms()).used,
        0,
        "no local account: the store keeps the balance"
    );
    s.credits_delivered(&[0]);
    assert_eq!(s.credits_pending(&a), 6);
    s.close();
    drop(s);
    for round in ["replayed", "compacted"] {
        let s = Spool::open(cfg(), Arc::new(clock.clone())).unwrap();
        let seqs: Vec<u64> = s.credits_owed(10).iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [1, 2], "{round}: the delivered one is not owed");
        assert_eq!(s.credits_pending(&a), 6, "{round}");
        s.close();
    }
    // Everything delivered, compacted away: the next number is still new.
    let s = Spool::open(cfg(), Arc::new(clock.clone())).unwrap();
    s.credits_delivered(&[1, 2]);
    s.close();
    drop(s);
    for _ in 0..2 {
        let s = Spool::open(cfg(), Arc::new(clock.clone())).unwrap();
        assert!(s.credits_owed(10).is_empty());
        s.close();
    }
    let s = Spool::open(cfg(), Arc::new(clock.clone())).unwrap();
    assert!(s
        .journal(&b, Some((&tokens, 1)), None, Some(&policy))
        .await
        .unwrap());
    assert_eq!(s.credits_owed(10)[0].seq, 3, "numbers are never reused");
    s.close();
}
