//! The spool's line format: space-separated fields, percent-escaped names,
//! and a CRC-32 of the rest at the end of every line.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;

use tollgate_core::keys::crc32;

use super::{Record, Seal, SpoolError};

pub(super) fn line_with_crc(body: &str) -> String {
    format!("{body} {:08x}\n", crc32(body.as_bytes()))
}

/// The body of a line whose CRC matches; None for torn or foreign lines.
pub(super) fn checked(line: &str) -> Option<&str> {
    let (body, crc) = line.rsplit_once(' ')?;
    (u32::from_str_radix(crc, 16).ok()? == crc32(body.as_bytes())).then_some(body)
}

/// Whether a byte can stand in a space-separated line as it is.
pub(super) fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'%'
}

/// Escapes what would break a space-separated line.
pub(super) fn esc(s: &str) -> String {
    tollgate_core::pct::encode(s, plain)
}

pub(super) fn unesc(s: &str) -> Arc<str> {
    if s.contains('%') {
        tollgate_core::pct::decode(s, false).into()
    } else {
        s.into()
    }
}

pub(super) fn io_err(path: &Path, e: std::io::Error) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// `R …` for a record, `P rseq window customer meter units identifier sink`
/// for a replayed dead letter owed to one sink.
pub(super) fn record_line(r: &Record) -> String {
    if let Some(sink) = &r.only {
        return line_with_crc(&format!(
            "P {} {} {} {} {} {} {}",
            r.rseq,
            r.window_start,
            esc(&r.customer),
            esc(&r.meter),
            r.units,
            r.identifier,
            esc(sink)
        ));
    }
    line_with_crc(&format!(
        "R {} {} {} {} {} {} {}",
        r.rseq,
        r.upto,
        r.window_start,
        esc(&r.customer),
        esc(&r.meter),
        r.units,
        r.identifier
    ))
}

/// The lines of a spool file, opened when the spool is sealed (a line that
/// opens with no key, torn by a crash, is left out as a bad CRC would be).
pub(super) fn read_lines(path: &Path, seal: Option<&Seal>) -> Vec<String> {
    let lines = match File::open(path) {
        Ok(f) => BufReader::new(f).lines().map_while(Result::ok),
        Err(_) => return Vec::new(),
    };
    match seal {
        None => lines.collect(),
        Some(seal) => lines.filter_map(|l| seal.open(&l)).collect(),
    }
}

/// `text` as it is written: sealed line by line when the spool is sealed.
pub(super) fn sealed(seal: Option<&Seal>, text: String) -> Result<String, SpoolError> {
    match seal {
        None => Ok(text),
        Some(seal) => seal.seal(&text),
    }
}
