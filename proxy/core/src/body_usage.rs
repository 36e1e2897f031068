//! Billable units read from the response body (`usage:` on a route): the
//! token counts an OpenAI- or Anthropic-compatible upstream reports in its
//! JSON body or in the events of a `text/event-stream`, or numbers at
//! paths the route names.
//!
//! The scanner sees each chunk as it passes (it never changes or holds
//! one back): a JSON body is copied into a buffer of at most the bound, a
//! stream is cut into events with at most one event's data held at a time.

use std::sync::Arc;

/// `ai_input_tokens`: prompt tokens (OpenAI's `prompt_tokens` or
/// `input_tokens`, cached ones included as OpenAI counts them; Anthropic's
/// `input_tokens` plus `cache_creation_input_tokens`).
pub const AI_INPUT: &str = "ai_input_tokens";
/// `ai_output_tokens`: completion tokens.
pub const AI_OUTPUT: &str = "ai_output_tokens";
/// `ai_cached_input_tokens`: prompt tokens served from a cache (OpenAI's
/// `*_tokens_details.cached_tokens`, Anthropic's `cache_read_input_tokens`).
pub const AI_CACHED_INPUT: &str = "ai_cached_input_tokens";

/// Where a route's response reports its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFormat {
    OpenAi,
    Anthropic,
    /// Meter name and the JSON pointer (`/usage/input_tokens`) of its number.
    Json(Vec<(Arc<str>, String)>),
}

impl BodyFormat {
    /// `a.b.c` as the JSON pointer `/a/b/c`; None for an empty segment.
    pub fn pointer(dotted: &str) -> Option<String> {
        let mut out = String::with_capacity(dotted.len() + 1);
        for seg in dotted.split('.') {
            if seg.is_empty() {
                return None;
            }
            out.push('/');
            out.push_str(&seg.replace('~', "~0").replace('/', "~1"));
        }
        Some(out)
    }

    /// The meters this format bills, in a fixed order.
    /// The highest of `price` over the meters this format reports, without
    /// allocating (the gate asks on every request of a `reserve` route).
    pub fn max_over_meters(&self, price: impl Fn(&str) -> u64) -> u64 {
        match self {
            BodyFormat::OpenAi | BodyFormat::Anthropic => [AI_INPUT, AI_OUTPUT, AI_CACHED_INPUT]
                .into_iter()
                .map(price)
                .max()
                .unwrap_or(0),
            BodyFormat::Json(m) => m.iter().map(|(n, _)| price(n)).max().unwrap_or(0),
        }
    }

    pub fn meters(&self) -> Vec<Arc<str>> {
        match self {
            BodyFormat::OpenAi | BodyFormat::Anthropic => {
                vec![AI_INPUT.into(), AI_OUTPUT.into(), AI_CACHED_INPUT.into()]
            }
            BodyFormat::Json(m) => m.iter().map(|(name, _)| name.clone()).collect(),
        }
    }

    /// The numbers each event or body is searched for: per slot, the
    /// pointers tried in order (the last event that has one wins).
    fn slots(&self) -> Vec<Vec<String>> {
        let own = |ps: &[&str]| ps.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        match self {
            BodyFormat::OpenAi => vec![
                own(&[
                    "/usage/prompt_tokens",
                    "/usage/input_tokens",
                    "/response/usage/input_tokens",
                ]),
                own(&[
                    "/usage/completion_tokens",
                    "/usage/output_tokens",
                    "/response/usage/output_tokens",
                ]),
                own(&[
                    "/usage/prompt_tokens_details/cached_tokens",
                    "/usage/input_tokens_details/cached_tokens",
                    "/response/usage/input_tokens_details/cached_tokens",
                ]),
            ],
            BodyFormat::Anthropic => [
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
            ]
            .iter()
            .map(|f| vec![format!("/usage/{f}"), format!("/message/usage/{f}")])
            .collect(),
            BodyFormat::Json(m) => m.iter().map(|(_, p)| vec![p.clone()]).collect(),
        }
    }

    /// The units per meter from the slots found.
    fn units(&self, slots: &[Option<u64>]) -> Vec<(Arc<str>, u64)> {
        let get = |i: usize| slots.get(i).copied().flatten();
        let pick = |m: &str, v: Option<u64>| v.map(|n| (Arc::<str>::from(m), n));
        match self {
            BodyFormat::OpenAi => [
                pick(AI_INPUT, get(0)),
                pick(AI_OUTPUT, get(1)),
                pick(AI_CACHED_INPUT, get(2)),
            ]
            .into_iter()
            .flatten()
            .collect(),
            BodyFormat::Anthropic => {
                let input = match (get(0), get(3)) {
                    (None, None) => None,
                    (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
                };
                [
                    pick(AI_INPUT, input),
                    pick(AI_OUTPUT, get(1)),
                    pick(AI_CACHED_INPUT, get(2)),
                ]
                .into_iter()
                .flatten()
                .collect()
            }
            BodyFormat::Json(m) => m
                .iter()
                .zip(slots)
                .filter_map(|((name, _), v)| v.map(|n| (name.clone(), n)))
                .collect(),
        }
    }

    /// A cheap test before parsing: could this data hold a number we want?
    fn worth_parsing(&self, data: &[u8]) -> bool {
        let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
        match self {
            BodyFormat::OpenAi | BodyFormat::Anthropic => has(b"_tokens"),
            BodyFormat::Json(m) => m.iter().any(|(_, p)| {
                p.rsplit('/')
                    .next()
                    .is_some_and(|last| has(last.as_bytes()))
            }),
        }
    }
}

/// What a response body said about its usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Units per meter, as reported.
    Units(Vec<(Arc<str>, u64)>),
    /// The body held no usage (a stream without its usage event, or one
    /// that ended before it).
    Missing,
    /// A JSON body longer than the bound, or an event that was.
    TooLarge,
    /// Compressed, so not read (Tollgate asks the upstream for identity
    /// encoding; an upstream that compresses anyway is not scanned).
    Unreadable,
}

impl Scan {
    /// Why the route's fallback `cost` applies (a metric label), or None
    /// when the units were reported.
    pub fn fallback_reason(&self) -> Option<&'static str> {
        match self {
            Scan::Units(_) => None,
            Scan::Missing => Some("missing"),
            Scan::TooLarge => Some("too_large"),
            Scan::Unreadable => Some("unreadable"),
        }
    }
}

#[derive(Debug)]
enum Mode {
    Json(Vec<u8>),
    Sse(Sse),
    Skip,
}

/// A `text/event-stream` cut into events (WHATWG HTML, "Server-sent
/// events"): lines end with CRLF, LF or CR; `data:` lines of one event are
/// joined with LF; a blank line ends the event.
#[derive(Debug, Default)]
struct Sse {
    line: Vec<u8>,
    data: Vec<u8>,
    /// The last byte was a CR (a following LF belongs to the same line end).
    after_cr: bool,
    /// The current event passed the bound: skipped to its end.
    skipping: bool,
    /// Bytes of the current line were dropped (it is not a blank line).
    dropped: bool,
}

/// Scans one response body for its usage.
#[derive(Debug)]
pub struct Scanner {
    format: Arc<BodyFormat>,
    slots: Vec<Vec<String>>,
    found: Vec<Option<u64>>,
    mode: Mode,
    limit: usize,
    too_large: bool,
    unreadable: bool,
}

impl Scanner {
    /// For a response of `content_type` and `content_encoding`, holding
    /// at most `limit` bytes (a JSON body, or one event of a stream).
    pub fn new(
        format: Arc<BodyFormat>,
        content_type: Option<&[u8]>,
        content_encoding: Option<&[u8]>,
        limit: usize,
    ) -> Self {
        let slots = format.slots();
        let encoded = content_encoding.is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"));
        let sse = content_type
            .is_some_and(|t| t.len() >= 17 && t[..17].eq_ignore_ascii_case(b"text/event-stream"));
        let mode = if encoded {
            Mode::Skip
        } else if sse {
            Mode::Sse(Sse::default())
        } else {
            Mode::Json(Vec::new())
        };
        Self {
            found: vec![None; slots.len()],
            slots,
            format,
            mode,
            limit,
            too_large: false,
            unreadable: encoded,
        }
    }

    /// Sees the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Skip => {}
            Mode::Json(buf) => {
                if buf.len() + chunk.len() > self.limit {
                    self.too_large = true;
                    self.mode = Mode::Skip;
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            Mode::Sse(_) => self.feed_sse(chunk),
        }
    }

    fn feed_sse(&mut self, chunk: &[u8]) {
        let Mode::Sse(mut sse) = std::mem::replace(&mut self.mode, Mode::Skip) else {
            return;
        };
        let mut rest = chunk;
        while !rest.is_empty() {
            if sse.after_cr {
                sse.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.take_line_part(&mut sse, rest);
                    rest = &[];
                }
                Some(i) => {
                    self.take_line_part(&mut sse, &rest[..i]);
                    sse.after_cr = rest[i] == b'\r';
                    self.end_line(&mut sse);
                    rest = &rest[i + 1..];
                }
            }
        }
        self.mode = Mode::Sse(sse);
    }

    /// Part of a line: kept only while it could be a `data:` line within
    /// the bound.
    fn take_line_part(&mut self, sse: &mut Sse, part: &[u8]) {
        if sse.skipping {
            sse.dropped |= !part.is_empty();
            return;
        }
        if sse.line.len() + sse.data.len() + part.len() > self.limit {
            sse.skipping = true;
            sse.dropped = true;
            sse.line.clear();
            sse.data.clear();
            self.too_large = true;
            return;
        }
        sse.line.extend_from_slice(part);
    }

    fn end_line(&mut self, sse: &mut Sse) {
        if std::mem::take(&mut sse.dropped) {
            // The end of a line that went over the bound: not a blank one.
            sse.line.clear();
            return;
        }
        if sse.line.is_empty() {
            // A blank line: the event is complete.
            if !sse.skipping && !sse.data.is_empty() {
                let data = std::mem::take(&mut sse.data);
                self.event(&data);
                sse.data = data;
                sse.data.clear();
            }
            sse.skipping = false;
            return;
        }
        if let Some(v) = sse.line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            if !sse.data.is_empty() {
                sse.data.push(b'\n');
            }
            sse.data.extend_from_slice(v);
        }
        sse.line.clear();
    }

    /// One JSON document (a body, or an event's data): the slots it has.
    fn event(&mut self, data: &[u8]) {
        if !self.format.worth_parsing(data) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        for (slot, pointers) in self.found.iter_mut().zip(&self.slots) {
            if let Some(n) = pointers
                .iter()
                .find_map(|p| v.pointer(p).and_then(serde_json::Value::as_u64))
            {
                *slot = Some(n);
            }
        }
    }

    /// What the body reported by now (for a stream cut short).
    pub fn so_far(&self) -> Scan {
        let units = self.format.units(&self.found);
        if !units.is_empty() {
            Scan::Units(units)
        } else if self.unreadable {
            Scan::Unreadable
        } else if self.too_large {
            Scan::TooLarge
        } else {
            Scan::Missing
        }
    }

    /// The end of the body: what it reported.
    pub fn finish(&mut self) -> Scan {
        match std::mem::replace(&mut self.mode, Mode::Skip) {
            Mode::Json(buf) => self.event(&buf),
            Mode::Sse(mut sse) => {
                // A stream that ends without a blank line ends its event.
                if !sse.line.is_empty() {
                    self.end_line(&mut sse);
                }
                self.end_line(&mut sse);
            }
            Mode::Skip => {}
        }
        self.so_far()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(format: BodyFormat, ct: &str, chunks: &[&[u8]], limit: usize) -> Scan {
        let mut s = Scanner::new(Arc::new(format), Some(ct.as_bytes()), None, limit);
        for c in chunks {
            s.feed(c);
        }
        s.finish()
    }

    fn units(pairs: &[(&str, u64)]) -> Scan {
        Scan::Units(pairs.iter().map(|(m, n)| (Arc::from(*m), *n)).collect())
    }

    #[test]
    fn openai_chat_and_responses_bodies() {
        let chat = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3}}}"#;
        assert_eq!(
            scan(BodyFormat::OpenAi, "application/json", &[chat], 1 << 20),
            units(&[(AI_INPUT, 19), (AI_OUTPUT, 10), (AI_CACHED_INPUT, 3)])
        );
        let responses = br#"{"object":"response","usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"total_tokens":123}}"#;
        assert_eq!(
            scan(
                BodyFormat::OpenAi,
                "application/json; charset=utf-8",
                &[responses],
                1 << 20
            ),
            units(&[(AI_INPUT, 36), (AI_OUTPUT, 87), (AI_CACHED_INPUT, 0)])
        );
    }

    #[test]
    fn a_body_over_the_bound_is_too_large_and_one_without_usage_missing() {
        let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(
            scan(BodyFormat::OpenAi, "application/json", &[body], 10),
            Scan::TooLarge
        );
        assert_eq!(
            scan(
                BodyFormat::OpenAi,
                "application/json",
                &[b"{\"error\":{}}"],
                100
            ),
            Scan::Missing
        );
        let mut s = Scanner::new(
            Arc::new(BodyFormat::OpenAi),
            Some(b"application/json"),
            Some(b"gzip"),
            100,
        );
        s.feed(body);
        assert_eq!(s.finish(), Scan::Unreadable);
    }

    #[test]
    fn custom_paths() {
        let f = BodyFormat::Json(vec![
            (
                "chars".into(),
                BodyFormat::pointer("meta.billing.chars").unwrap(),
            ),
            ("pages".into(), BodyFormat::pointer("pages").unwrap()),
        ]);
        assert_eq!(
            scan(
                f,
                "application/json",
                &[br#"{"pages":4,"meta":{"billing":{"chars":1200}}}"#],
                1000
            ),
            units(&[("chars", 1200), ("pages", 4)])
        );
        assert_eq!(BodyFormat::pointer("a..b"), None);
    }

    /// An OpenAI chat completion stream with `stream_options.include_usage`
    /// (the format of OpenAI's API reference, "The chat completion chunk
    /// object"): every chunk has `"usage": null` but the last before
    /// `[DONE]`.
    pub(crate) const OPENAI_STREAM: &[u8] = b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n\
data: [DONE]\n\n";

    /// An Anthropic Messages stream (docs.anthropic.com, "Streaming
    /// Messages"): input tokens in `message_start`, the cumulative output
    /// in `message_delta`.
    pub(crate) const ANTHROPIC_STREAM: &[u8] = b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_start\r\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\r\n\r\n\
event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n\
event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\r\n\r\n\
event: content_block_stop\r\ndata: {\"type\":\"content_block_stop\",\"index\":0}\r\n\r\n\
event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    #[test]
    fn every_split_point_of_a_recorded_stream_gives_the_same_units() {
        for (format, stream, want) in [
            (
                BodyFormat::OpenAi,
                OPENAI_STREAM,
                units(&[(AI_INPUT, 12), (AI_OUTPUT, 7), (AI_CACHED_INPUT, 4)]),
            ),
            (
                BodyFormat::Anthropic,
                ANTHROPIC_STREAM,
                units(&[(AI_INPUT, 30), (AI_OUTPUT, 15), (AI_CACHED_INPUT, 10)]),
            ),
        ] {
            assert_eq!(
                scan(format.clone(), "text/event-stream", &[stream], 4096),
                want
            );
            for i in 0..=stream.len() {
                for j in i..=stream.len().min(i + 7) {
                    let got = scan(
                        format.clone(),
                        "text/event-stream; charset=utf-8",
                        &[&stream[..i], &stream[i..j], &stream[j..]],
                        4096,
                    );
                    assert_eq!(got, want, "split at {i} and {j}");
                }
            }
            // One byte at a time.
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(scan(format, "text/event-stream", &bytes, 4096), want);
        }
    }

    #[test]
    fn a_stream_without_usage_is_missing_and_a_cut_one_has_what_it_had() {
        let usage_at = OPENAI_STREAM
            .windows(22)
            .position(|w| w == b"\"choices\":[],\"usage\":{")
            .unwrap();
        let event_at = OPENAI_STREAM[..usage_at]
            .windows(2)
            .rposition(|w| w == b"\n\n")
            .unwrap()
            + 2;
        let no_usage = [&OPENAI_STREAM[..event_at], &b"data: [DONE]\n\n"[..]].concat();
        assert_eq!(
            scan(BodyFormat::OpenAi, "text/event-stream", &[&no_usage], 4096),
            Scan::Missing
        );
        // Cut inside its usage event: nothing yet.
        let mut s = Scanner::new(
            Arc::new(BodyFormat::OpenAi),
            Some(b"text/event-stream"),
            None,
            4096,
        );
        s.feed(&OPENAI_STREAM[..usage_at + 40]);
        assert_eq!(s.so_far(), Scan::Missing);
        // An Anthropic stream abandoned after message_start: its input
        // counts, and the output reported so far.
        let mut s = Scanner::new(
            Arc::new(BodyFormat::Anthropic),
            Some(b"text/event-stream"),
            None,
            4096,
        );
        let start_end = ANTHROPIC_STREAM
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        s.feed(&ANTHROPIC_STREAM[..start_end]);
        assert_eq!(
            s.so_far(),
            units(&[(AI_INPUT, 30), (AI_OUTPUT, 1), (AI_CACHED_INPUT, 10)])
        );
    }

    #[test]
    fn an_event_over_the_bound_is_skipped_and_later_ones_still_read() {
        let mut big = b"data: {\"pad\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 5000));
        big.extend_from_slice(b"\"}\n\n");
        big.extend_from_slice(
            b"data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n",
        );
        assert_eq!(
            scan(BodyFormat::OpenAi, "text/event-stream", &[&big], 1024),
            units(&[(AI_INPUT, 2), (AI_OUTPUT, 3)])
        );
        // An oversized event of two `data:` lines is skipped whole: its
        // second line is not read as an event of its own.
        let mut two = b"data: {\"pad\":\"".to_vec();
        two.extend(std::iter::repeat_n(b'x', 5000));
        two.extend_from_slice(
            b"\"}\ndata: {\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9}}\n\n",
        );
        assert_eq!(
            scan(BodyFormat::OpenAi, "text/event-stream", &[&two], 1024),
            Scan::TooLarge
        );
        let only_big = &big[..5020];
        assert_eq!(
            scan(BodyFormat::OpenAi, "text/event-stream", &[only_big], 1024),
            Scan::TooLarge
        );
    }
}
