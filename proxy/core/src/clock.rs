//! Time for the limiter and the ledger, injectable so window edges can be
//! tested, plus the few UTC calendar calculations Tollgate needs (calendar
//! day and month windows, RFC 3339 timestamps) without a date library.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = u64;

pub const SECOND: Millis = 1_000;
pub const MINUTE: Millis = 60 * SECOND;
pub const HOUR: Millis = 60 * MINUTE;
pub const DAY: Millis = 24 * HOUR;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> Millis;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; shared by clones.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn at(ms: Millis) -> Self {
        Self(Arc::new(AtomicU64::new(ms)))
    }
    pub fn set(&self, ms: Millis) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}

/// A civil (proleptic Gregorian) date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

/// Days since 1970-01-01 for a civil date (H. Hinnant's algorithm).
pub fn days_from_civil(d: Date) -> i64 {
    let y = if d.month <= 2 { d.year - 1 } else { d.year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(d.month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number counted from 1970-01-01.
pub fn civil_from_days(z: i64) -> Date {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Date { year, month, day }
}

/// Start of the UTC day containing `ms`.
pub fn day_start(ms: Millis) -> Millis {
    ms - ms % DAY
}

/// Start of the UTC calendar month containing `ms`, and the start of the next.
pub fn month_bounds(ms: Millis) -> (Millis, Millis) {
    let days = (ms / DAY) as i64;
    let d = civil_from_days(days);
    let start = days_from_civil(Date { day: 1, ..d });
    let (ny, nm) = if d.month == 12 {
        (d.year + 1, 1)
    } else {
        (d.year, d.month + 1)
    };
    let next = days_from_civil(Date {
        year: ny,
        month: nm,
        day: 1,
    });
    (start as Millis * DAY, next as Millis * DAY)
}

/// `2026-11-21T05:38:13Z` for a Unix time in milliseconds (seconds precision).
pub fn rfc3339(ms: Millis) -> String {
    let secs = ms / 1000;
    let d = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year,
        d.month,
        d.day,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Appends `2026-11-21T05:38:13.042Z` ([`rfc3339`] with milliseconds),
/// digit by digit: the access log writes one per request, and `format!`
/// cost more than the rest of its line (benches/README.md).
pub fn push_rfc3339_millis(out: &mut String, ms: Millis) {
    let secs = ms / 1000;
    let d = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut digits = |n: u64, width: u32, after: char| {
        for i in (0..width).rev() {
            let digit = (n / 10u64.pow(i)) % 10;
            out.push(char::from(b'0' + digit as u8));
        }
        out.push(after);
    };
    digits(d.year.clamp(0, 9999) as u64, 4, '-');
    digits(u64::from(d.month), 2, '-');
    digits(u64::from(d.day), 2, 'T');
    digits(rem / 3600, 2, ':');
    digits(rem % 3600 / 60, 2, ':');
    digits(rem % 60, 2, '.');
    digits(ms % 1000, 3, 'Z');
}

/// Parses the `YYYY-MM-DDTHH:MM:SSZ` form written by [`rfc3339`].
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(Date {
        year: i64::from(year),
        month,
        day,
    });
    let secs = days * 86_400 + i64::from(h * 3600 + m * 60 + sec);
    u64::try_from(secs).ok().map(|s| s * 1000)
}

/// Parses `500ms`, `30s`, `5m`, `24h`, `90d`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, m: u32, d: u32) -> Millis {
        days_from_civil(Date {
            year: y,
            month: m,
            day: d,
        }) as Millis
            * DAY
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for z in (-800_000..800_000).step_by(97) {
            assert_eq!(days_from_civil(civil_from_days(z)), z);
        }
        assert_eq!(
            days_from_civil(Date {
                year: 1970,
                month: 1,
                day: 1
            }),
            0
        );
        assert_eq!(
            civil_from_days(19_000),
            Date {
                year: 2022,
                month: 1,
                day: 8
            }
        );
    }

    #[test]
    fn month_bounds_handle_year_end_and_leap_february() {
        // Last millisecond of 2026 belongs to December; the next to January.
        let new_year = ms(2027, 1, 1);
        assert_eq!(month_bounds(new_year - 1), (ms(2026, 12, 1), new_year));
        assert_eq!(month_bounds(new_year), (new_year, ms(2027, 2, 1)));
        // February 2028 is a leap month (29 days), 2100 is not a leap year.
        let (s, e) = month_bounds(ms(2028, 2, 29) + 5 * HOUR);
        assert_eq!((e - s) / DAY, 29);
        let (s, e) = month_bounds(ms(2100, 2, 10));
        assert_eq!((e - s) / DAY, 28);
        let (s, e) = month_bounds(ms(2000, 2, 10));
        assert_eq!((e - s) / DAY, 29);
    }

    #[test]
    fn day_start_is_utc_midnight() {
        let t = ms(2026, 3, 31) + 23 * HOUR + 59 * MINUTE;
        assert_eq!(day_start(t), ms(2026, 3, 31));
        assert_eq!(day_start(ms(2026, 4, 1)), ms(2026, 4, 1));
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = ms(2024, 2, 29) + 13 * HOUR + 7 * MINUTE + 9 * SECOND;
        assert_eq!(rfc3339(t), "2024-02-29T13:07:09Z");
        assert_eq!(parse_rfc3339("2024-02-29T13:07:09Z"), Some(t));
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
