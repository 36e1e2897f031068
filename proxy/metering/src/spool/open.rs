//! Opening a spool: take its lock, read (or make) its instance id, replay
//! its files into memory, compact them, and start the writer thread.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tollgate_core::clock::{month_bounds, Clock, Millis};
use tollgate_core::sync::Pending;

use super::codec::{checked, io_err, read_lines, unesc};
use super::compact::{compact_files, replace_file};
use super::seal::KEY_CHECK;
use super::writer::Writer;
use super::{GroupKey, Record, Seal, Spool, SpoolConfig, SpoolError, State, Summary};

impl Spool {
    /// Opens (creating) the spool, replays it, compacts it and starts the writer.
    pub fn open(config: SpoolConfig, clock: Arc<dyn Clock>) -> Result<Arc<Self>, SpoolError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock_file = lock_dir(&dir)?;
        check_key(&dir, config.seal.as_deref())?;
        let instance = instance_id(&dir)?;
        // Events on disk were grouped with the rollup they were written
        // under; a changed setting applies to new events only.
        let rollup_path = dir.join("rollup");
        let (month_start, _) = month_bounds(clock.now_ms());
        let seal = config.seal.as_deref();
        let mut st = load_state(&config, month_start);
        // Rewritten under the current key (a rotation ends here).
        let size = compact_files(&dir, &config.sinks, &mut st, clock.now_ms(), seal)?;
        write_key_check(&dir, seal)?;
        fs::write(&rollup_path, config.rollup.to_string()).map_err(|e| io_err(&rollup_path, e))?;
        let spool = Self::start(config, clock, instance, st, size, lock_file)?;
        spool.update_gauges();
        Ok(spool)
    }

    /// [`Spool::open`], waiting up to `wait` for another process to
    /// release the spool (the process a binary upgrade replaces holds it
    /// until its last request has been recorded).
    pub fn open_waiting(
        config: SpoolConfig,
        clock: Arc<dyn Clock>,
        wait: std::time::Duration,
    ) -> Result<Arc<Self>, SpoolError> {
        let deadline = std::time::Instant::now() + wait;
        let mut logged = false;
        loop {
            match Self::open(config.clone(), clock.clone()) {
                Err(SpoolError::InUse(_)) if std::time::Instant::now() < deadline => {
                    if !logged {
                        log::info!(
                            "waiting up to {} s for the running Tollgate to release the usage spool",
                            wait.as_secs()
                        );
                        logged = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    /// The writer and its thread, on replayed state.
    fn start(
        config: SpoolConfig,
        clock: Arc<dyn Clock>,
        instance: String,
        st: State,
        size: u64,
        lock_file: File,
    ) -> Result<Arc<Self>, SpoolError> {
        let bytes = Arc::new(AtomicU64::new(size));
        let failed_at = Arc::new(AtomicU64::new(0));
        let credits = st.credits.clone();
        let alerts = st.alerts.clone();
        let (owed, owed_ready) = (st.owed.clone(), st.owed_ready.clone());
        let state = Arc::new(Mutex::new(st));
        let (tx, rx) = mpsc::channel();
        let writer = Arc::new(Mutex::new(Writer::open(
            &config,
            &instance,
            clock.clone(),
            state.clone(),
            bytes.clone(),
            failed_at.clone(),
        )?));
        let handle = {
            let writer = writer.clone();
            let interval = config.fsync_interval;
            std::thread::Builder::new()
                .name("tollgate-spool".into())
                .spawn(move || Writer::run(&writer, &rx, interval))
                .map_err(SpoolError::Thread)?
        };
        Ok(Arc::new(Spool {
            aging: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            queue: Mutex::new(Pending::default()),
            closed: AtomicBool::new(false),
            writer,
            state,
            bytes,
            failed_at,
            full: AtomicBool::new(false),
            config,
            clock,
            instance,
            thread: Mutex::new(Some(handle)),
            lock: Mutex::new(Some(lock_file)),
            credits,
            alerts,
            owed,
            owed_ready,
        }))
    }
}

/// The spool's files replayed into memory (read only).
pub(super) fn load_state(config: &SpoolConfig, month_start: Millis) -> State {
    let (dir, seal) = (&config.dir, config.seal.as_deref());
    let disk_rollup = fs::read_to_string(dir.join("rollup"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(config.rollup);
    let mut st = State {
        shared_credits: config.shared_credits,
        ..State::default()
    };
    let covered = replay_records(dir, &mut st, month_start, seal);
    replay_acks(dir, &config.sinks, &mut st, seal);
    replay_events(dir, &mut st, &covered, disk_rollup, seal);
    st
}

/// `dir/lock`, held (flock) for the spool's lifetime: one process per spool.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let lock_path = dir.join("lock");
    let lock_file = File::create(&lock_path).map_err(|e| io_err(&lock_path, e))?;
    match lock_file.try_lock() {
        Ok(()) => Ok(lock_file),
        Err(fs::TryLockError::WouldBlock) => Err(SpoolError::InUse(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&lock_path, e)),
    }
}

/// A sealed spool opens only with its key (or the previous one, while it
/// is rotated away from), and only sealed: `key-check` holds a known line
/// sealed with the key the files were last written with.
pub(super) fn check_key(dir: &Path, seal: Option<&Seal>) -> Result<(), SpoolError> {
    let path = dir.join("key-check");
    let line = match fs::read_to_string(&path) {
        Ok(s) => s.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(&path, e)),
    };
    match seal {
        None => Err(SpoolError::Sealed(dir.to_path_buf())),
        Some(seal) if seal.open(&line).as_deref() == Some(KEY_CHECK) => Ok(()),
        Some(_) => Err(SpoolError::WrongKey(dir.to_path_buf())),
    }
}

/// Records which key the files are now sealed with (none: no file).
fn write_key_check(dir: &Path, seal: Option<&Seal>) -> Result<(), SpoolError> {
    let path = dir.join("key-check");
    match seal {
        Some(seal) => {
            replace_file(&path, format!("{KEY_CHECK}\n"), Some(seal))?;
            Ok(())
        }
        None => match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(&path, e)),
            _ => Ok(()),
        },
    }
}

/// This spool's id, part of every identifier; made once, then kept.
fn instance_id(dir: &Path) -> Result<String, SpoolError> {
    let id_path = dir.join("instance-id");
    match fs::read_to_string(&id_path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let mut b = [0u8; 5];
            tollgate_core::keys::random_bytes(&mut b).map_err(|e| io_err(&id_path, e))?;
            let id = hex::encode(b);
            fs::write(&id_path, &id).map_err(|e| io_err(&id_path, e))?;
            Ok(id)
        }
    }
}

/// `records.log`: the high-water mark, this month's settled summaries and
/// the records still owed. Returns, per group, the last event sequence a
/// record already covers.
fn replay_records(
    dir: &Path,
    st: &mut State,
    month_start: Millis,
    seal: Option<&Seal>,
) -> HashMap<GroupKey, u64> {
    let mut covered: HashMap<GroupKey, u64> = HashMap::new();
    for line in read_lines(&dir.join("records.log"), seal) {
        let Some(body) = checked(&line) else { continue };
        let f: Vec<&str> = body.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match f.first().copied() {
            Some("H") => st.next_rseq = st.next_rseq.max(num(1).unwrap_or(0)),
            Some("S") if f.len() == 6 => {
                let (Some(month), Some(rec), Some(rep)) = (num(1), num(4), num(5)) else {
                    continue;
                };
                if month >= month_start {
                    st.summaries.entry(unesc(f[2])).or_default().insert(
                        unesc(f[3]),
                        Summary {
                            month,
                            recorded: rec,
                            reported: rep,
                        },
                    );
                }
            }
            Some("R") if f.len() == 8 => {
                let (Some(rseq), Some(upto), Some(window), Some(units)) =
                    (num(1), num(2), num(3), num(6))
                else {
                    continue;
                };
                let r = Record {
                    rseq,
                    upto,
                    window_start: window,
                    customer: unesc(f[4]),
                    meter: unesc(f[5]),
                    units,
                    identifier: f[7].to_owned(),
                    only: None,
                };
                let g = covered
                    .entry((r.customer.clone(), r.meter.clone(), window))
                    .or_insert(0);
                *g = (*g).max(upto);
                st.next_rseq = st.next_rseq.max(rseq + 1);
                st.next_seq = st.next_seq.max(upto + 1);
                st.records.insert(rseq, r);
            }
            Some("P") if f.len() == 8 => {
                let (Some(rseq), Some(window), Some(units)) = (num(1), num(2), num(5)) else {
                    continue;
                };
                st.next_rseq = st.next_rseq.max(rseq + 1);
                st.records.insert(
                    rseq,
                    Record {
                        rseq,
                        upto: 0,
                        window_start: window,
                        customer: unesc(f[3]),
                        meter: unesc(f[4]),
                        units,
                        identifier: f[6].to_owned(),
                        only: Some(unesc(f[7])),
                    },
                );
            }
            _ => {}
        }
    }
    covered
}

/// `acks-<sink>.log`: what each configured sink has settled.
fn replay_acks(dir: &Path, sinks: &[String], st: &mut State, seal: Option<&Seal>) {
    for sink in sinks {
        let set = st.settled.entry(sink.clone()).or_default();
        for line in read_lines(&dir.join(format!("acks-{sink}.log")), seal) {
            let Some(body) = checked(&line) else { continue };
            let f: Vec<&str> = body.split(' ').collect();
            if let (3, Some("A"), Some(Ok(rseq))) = (
                f.len(),
                f.first().copied(),
                f.get(1).map(|s| s.parse::<u64>()),
            ) {
                // Acks of records no longer on disk are stale.
                if st.records.contains_key(&rseq) {
                    set.insert(rseq, f[2] == "ok");
                }
            }
        }
    }
}

/// `events.log`: billable responses no record covers yet, grouped by the
/// rollup they were written under.
fn replay_events(
    dir: &Path,
    st: &mut State,
    covered: &HashMap<GroupKey, u64>,
    rollup: u64,
    seal: Option<&Seal>,
) {
    for line in read_lines(&dir.join("events.log"), seal) {
        let Some(body) = checked(&line) else { continue };
        let f: Vec<&str> = body.split(' ').collect();
        if f.len() == 6 && f[0] == "C" && (f[2] == "d" || f[2] == "m") {
            if let (Ok(start), Ok(units)) = (f[1].parse::<u64>(), f[5].parse::<u64>()) {
                st.count((unesc(f[3]), unesc(f[4]), f[2].as_bytes()[0]), start, units);
            }
            continue;
        }
        if st.replay_credit_line(&f) || st.replay_alert_line(&f) {
            continue;
        }
        if f.len() != 6 || f[0] != "E" {
            continue;
        }
        let (Ok(seq), Ok(ts), Ok(units)) = (
            f[1].parse::<u64>(),
            f[2].parse::<u64>(),
            f[5].parse::<u64>(),
        ) else {
            continue;
        };
        st.next_seq = st.next_seq.max(seq + 1);
        let key: GroupKey = (unesc(f[3]), unesc(f[4]), ts - ts % rollup);
        if covered.get(&key).is_some_and(|&upto| upto >= seq) {
            continue; // already in a record
        }
        let g = st.pending.entry(key).or_default();
        g.units = g.units.saturating_add(units);
        g.max_seq = g.max_seq.max(seq);
    }
}
