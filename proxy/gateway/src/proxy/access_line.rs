//! The access log's line for one request.
//!
//! Written field by field into one `String`: the line's shape is fixed
//! (every field on every line, in alphabetical order, `null` when unknown),
//! and serialising it through serde and `format!` cost about a tenth of a
//! request's instructions (benches/README.md, callgrind).

use std::fmt::Write as _;

use http::header;
use pingora::proxy::Session;

use super::Ctx;

/// One access log line: the path without its query (where a client may
/// have put its key), the key's id, never the key.
pub(super) fn access_line(session: &Session, ctx: &Ctx, total_ms: f64, now: u64) -> String {
    let req = session.req_header();
    let who = ctx.identity.as_ref();
    let user_agent = req
        .headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    Line::new()
        .int("bytes_sent", Some(session.body_bytes_sent() as u64))
        .str("customer", who.map(|i| &*i.customer))
        .str("key_id", who.map(|i| &*i.key_id))
        .str("meter", ctx.meter.as_deref())
        .str("method", Some(req.method.as_str()))
        .str("outcome", Some(ctx.outcome))
        .str("path", Some(clip(req.uri.path())))
        .str("plan", ctx.plan.as_ref().map(|p| &*p.name))
        .str("request_id", Some(&ctx.request_id))
        .int(
            "status",
            session
                .response_written()
                .map(|r| u64::from(r.status.as_u16())),
        )
        .time("time", now)
        .millis("total_ms", Some(total_ms))
        .int("units", ctx.units)
        .millis("upstream_ms", ctx.upstream_ms)
        .str("user_agent", user_agent.as_deref().map(clip))
        .end()
}

/// A JSON object being written, one field after the other.
struct Line(String);

impl Line {
    fn new() -> Self {
        Self(String::with_capacity(384))
    }

    fn key(mut self, name: &str) -> Self {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
        self
    }

    fn str(self, name: &str, value: Option<&str>) -> Self {
        let mut s = self.key(name);
        match value {
            Some(v) => escape(&mut s.0, v),
            None => s.0.push_str("null"),
        }
        s
    }

    fn int(self, name: &str, value: Option<u64>) -> Self {
        let mut s = self.key(name);
        match value {
            Some(n) => s.0.push_str(itoa::Buffer::new().format(n)),
            None => s.0.push_str("null"),
        }
        s
    }

    /// Milliseconds rounded to the microsecond, written as JSON's shortest
    /// form of that number (`1.5`, `0.042`, `3.0`), as serde wrote it.
    fn millis(self, name: &str, value: Option<f64>) -> Self {
        let mut s = self.key(name);
        match value.filter(|v| v.is_finite() && *v >= 0.0) {
            Some(v) => {
                let micros = (v * 1000.0).round() as u64;
                s.0.push_str(itoa::Buffer::new().format(micros / 1000));
                s.0.push('.');
                let frac = micros % 1000;
                let digits = [frac / 100, frac / 10 % 10, frac % 10];
                let keep = digits.iter().rposition(|&d| d != 0).map_or(1, |i| i + 1);
                for d in &digits[..keep] {
                    s.0.push(char::from(b'0' + *d as u8));
                }
            }
            None => s.0.push_str("null"),
        }
        s
    }

    fn time(self, name: &str, ms: u64) -> Self {
        let mut s = self.key(name);
        s.0.push('"');
        tollgate_core::clock::push_rfc3339_millis(&mut s.0, ms);
        s.0.push('"');
        s
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A JSON string: `"` and `\` escaped, control characters as `\n`, `\t`…
/// or `\u00XX`, as serde_json writes them.
fn escape(out: &mut String, s: &str) {
    out.push('"');
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[from..i]);
        if short.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(short);
        }
        from = i + 1;
    }
    out.push_str(&s[from..]);
    out.push('"');
}

/// At most 256 bytes of a client-supplied field, so a log line stays small.
fn clip(s: &str) -> &str {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in [
            "plain",
            "",
            "quote \" and \\ backslash",
            "new\nline\r\ttab\u{8}\u{c}",
            "nul\0 and \u{1f} and \u{7f}",
            "ünïcödé 🦀",
            "curl/8.5.0 \"quoted\" \\path\\",
        ] {
            let mut ours = String::new();
            escape(&mut ours, s);
            assert_eq!(ours, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn the_line_is_json_with_every_field_and_numbers_as_serde_wrote_them() {
        for (v, want) in [
            (1.5, "1.5"),
            (0.0421, "0.042"),
            (3.0, "3.0"),
            (0.0004, "0.0"),
            (12.3456, "12.346"),
            (0.1, "0.1"),
            (1234.5678, "1234.568"),
        ] {
            let line = Line::new().millis("ms", Some(v)).end();
            assert_eq!(line, format!("{{\"ms\":{want}}}"));
            // The same number serde_json writes for the rounded value.
            let rounded = (v * 1000.0_f64).round() / 1000.0;
            assert_eq!(want, serde_json::to_string(&rounded).unwrap());
        }
        let line = Line::new()
            .int("a", Some(7))
            .int("b", None)
            .str("c", Some("x\"y"))
            .str("d", None)
            .millis("e", None)
            .time("f", 1_796_000_000_042)
            .end();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "a": 7, "b": null, "c": "x\"y", "d": null, "e": null,
                "f": "2026-11-30T00:53:20.042Z"
            })
        );
    }
}
