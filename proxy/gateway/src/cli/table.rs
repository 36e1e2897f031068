//! Tables for the CLI: columns as wide as their widest cell, so long plan,
//! meter and customer names keep them aligned; durations as `30d 4h`.

/// Prints `head` and `rows`; the columns in `right` are right-aligned
/// (numbers).
pub(super) fn print(head: &[&str], rows: &[Vec<String>], right: &[usize]) {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let head: Vec<String> = head.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&head).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, &w))| {
                if right.contains(&i) {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `30d 4h`, `2h 5m`, `4m 10s`, `9s`: the largest unit and the next.
pub(super) fn human(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let i = UNITS
        .iter()
        .position(|(size, _)| secs >= *size)
        .unwrap_or(3);
    let (size, name) = UNITS[i];
    let mut out = format!("{}{name}", secs / size);
    if let Some((next, next_name)) = UNITS.get(i + 1) {
        let n = secs % size / next;
        if n > 0 {
            out.push_str(&format!(" {n}{next_name}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(9), "9s");
        assert_eq!(human(60), "1m");
        assert_eq!(human(250), "4m 10s");
        assert_eq!(human(3_600), "1h");
        assert_eq!(human(7_500), "2h 5m");
        assert_eq!(human(30 * 86_400 + 4 * 3_600 + 59), "30d 4h");
        assert_eq!(human(86_400 + 30), "1d");
    }
}
