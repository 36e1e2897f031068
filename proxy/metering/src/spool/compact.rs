//! Compaction: the spool's files rewritten with only what is still owed.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use tollgate_core::clock::{month_bounds, Millis};

use super::codec::{esc, io_err, line_with_crc, record_line, sealed};
use super::{counter_current, Seal, SpoolError, State};

/// Replaces `path` with `text` (sealed if the spool is) atomically;
/// returns the bytes written.
pub(super) fn replace_file(
    path: &Path,
    text: String,
    seal: Option<&Seal>,
) -> Result<u64, SpoolError> {
    let text = sealed(seal, text)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(text.len() as u64)
}

/// Rewrites the three kinds of file with what is still needed, in the order
/// that keeps a crash at any point safe: events first (so no event loses
/// the record that covers it), then records (with the high-water mark, so no
/// sequence is reused), then acks. Returns the new size of events + records.
pub(super) fn compact_files(
    dir: &Path,
    sinks: &[String],
    st: &mut State,
    now: Millis,
    seal: Option<&Seal>,
) -> Result<u64, SpoolError> {
    let (month_start, _) = month_bounds(now);
    st.fold_settled(sinks, month_start);
    let mut events = String::new();
    for ((c, m, w), g) in &st.pending {
        // One line per group carries its sum under its highest sequence.
        events.push_str(&line_with_crc(&format!(
            "E {} {} {} {} {}",
            g.max_seq,
            w,
            esc(c),
            esc(m),
            g.units
        )));
    }
    // Calendar charges: one line per counter, for the windows current now.
    st.counters
        .retain(|(_, _, w), (start, _)| counter_current(*w, *start, now));
    for ((c, l, w), (start, used)) in &st.counters {
        events.push_str(&line_with_crc(&format!(
            "C {start} {} {} {} {used}",
            *w as char,
            esc(c),
            esc(l)
        )));
    }
    // Prepaid credits: each account as it stands.
    events.push_str(&st.credit_lines());
    // Alerts still owed, and those that keep a threshold from firing twice
    // in a period.
    events.push_str(&st.alert_lines(now));
    let mut records = line_with_crc(&format!("H {}", st.next_rseq));
    for ((c, m), sum) in st
        .summaries
        .iter()
        .flat_map(|(c, ms)| ms.iter().map(move |(m, s)| ((c, m), s)))
    {
        if sum.month >= month_start {
            records.push_str(&line_with_crc(&format!(
                "S {} {} {} {} {}",
                sum.month,
                esc(c),
                esc(m),
                sum.recorded,
                sum.reported
            )));
        }
    }
    for r in st.records.values() {
        records.push_str(&record_line(r));
    }
    let size = replace_file(&dir.join("events.log"), events, seal)?
        + replace_file(&dir.join("records.log"), records, seal)?;
    for sink in sinks {
        let mut acks = String::new();
        for (r, ok) in st.settled.get(sink).into_iter().flatten() {
            acks.push_str(&line_with_crc(&format!(
                "A {r} {}",
                if *ok { "ok" } else { "dead" }
            )));
        }
        replace_file(&dir.join(format!("acks-{sink}.log")), acks, seal)?;
    }
    Ok(size)
}
