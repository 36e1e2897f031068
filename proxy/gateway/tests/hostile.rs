//! Requests an attacker would send, on raw sockets so nothing normalises
//! them on the way: each reproduction of the security review is here, and
//! each must end in a clear 4xx (or a request the upstream sees only in the
//! one canonical form), never in a request that reaches the upstream
//! unauthenticated or cheaper than its route.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::{free_port, Harness, MockUpstream, DEFAULT_PLANS};
use serde_json::Value;

/// One request written as it is; the whole answer, read to the close.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

fn raw(h: &Harness, request: &str) -> Answer {
    let mut conn = TcpStream::connect(h.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: api.test\r\n{extra}Connection: close\r\n\r\n")
}

fn problem_type(a: &Answer) -> String {
    let v: Value = serde_json::from_str(&a.body).unwrap_or_else(|_| panic!("{}", a.body));
    v["type"].as_str().unwrap_or_default().to_owned()
}

/// What the mock upstream saw: its answer echoes the request's headers.
fn echoed(a: &Answer) -> Value {
    serde_json::from_str(&a.body).unwrap_or_else(|_| panic!("{} {}", a.head, a.body))
}

const PUBLIC_DOCS: &str = "  - { match: \"GET /docs/*\", public: true }\n";

#[test]
fn encoded_slashes_and_dots_are_refused_before_routing() {
    let h = Harness::builder()
        .plans(&DEFAULT_PLANS.replace("routes:\n", &format!("routes:\n{PUBLIC_DOCS}")))
        .build();
    let key = h.key("cus_pro", Some("pro"));
    let auth = format!("Authorization: Bearer {key}\r\n");
    for (method, path) in [
        ("POST", "/v1%2Fsms%2Fsend"),
        ("GET", "/v1%2Fai%2Fchat"),
        ("GET", "/docs/..%2fv1%2fsecret"),
        ("GET", "/docs/%2e%2e/v1/secret"),
        ("GET", "/v1/a%5Cb"),
        ("GET", "/v1/a%00b"),
        ("GET", "/v1/x%zz"),
    ] {
        let a = raw(
            &h,
            &format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(a.status, 400, "{method} {path}: {}", a.head);
        assert_eq!(problem_type(&a), "urn:tollgate:problem:bad-path");
    }
    let a = raw(&h, &get("/docs/..\\v1", ""));
    assert_eq!(a.status, 400, "a raw backslash: {}", a.head);
    assert_eq!(h.upstream_hits(), 0, "none of them reached the upstream");

    // Decodable escapes are routed decoded, and forwarded so that an
    // upstream decoding them reads the same path.
    let a = raw(&h, &get("/v1/%61i/chat?tokens=7", &auth));
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(echoed(&a)["_target"][0], "/v1/ai/chat?tokens=7");
    let u = raw(&h, &get("/_tollgate/usage", &auth));
    let report: Value = serde_json::from_str(&u.body).unwrap();
    assert_eq!(
        report["usage"]["ai_tokens"], 7,
        "metered on the route the upstream ran: {}",
        u.body
    );
}

#[test]
fn keys_and_method_overrides_never_reach_the_upstream_in_any_spelling() {
    let h = Harness::start();
    let a_key = h.key("cus_a", None);
    let b_key = h.key("cus_b", None);
    // A tab after Bearer is still a bearer token: two different keys.
    let a = raw(
        &h,
        &get(
            "/echo",
            &format!("Authorization: Bearer\t{a_key}\r\nX-API-Key: {b_key}\r\n"),
        ),
    );
    assert_eq!(a.status, 401, "{}", a.head);
    assert_eq!(problem_type(&a), "urn:tollgate:problem:ambiguous-key");
    assert_eq!(h.upstream_hits(), 0);

    let a = raw(
        &h,
        &get(
            "/echo",
            &format!(
                "Authorization: Bearer\t{a_key}\r\nX_Api_Key: {b_key}\r\nX-HTTP-Method-Override: POST\r\nX_HTTP_Method: PUT\r\nX-Method-Override: DELETE\r\nX-Tollgate_Plan: enterprise\r\n"
            ),
        ),
    );
    assert_eq!(a.status, 200, "{}", a.head);
    let seen = echoed(&a);
    for name in [
        "authorization",
        "x_api_key",
        "x-http-method-override",
        "x_http_method",
        "x-method-override",
        "x-tollgate_plan",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{name} reached the upstream: {seen}"
        );
    }
    assert_eq!(seen["x-tollgate-customer"][0], "cus_a");
    assert!(!a.body.contains(&a_key) && !a.body.contains(&b_key));
}

#[test]
fn an_options_request_is_a_preflight_only_with_an_origin_and_no_body() {
    let h = Harness::start();
    // The reproduction: no cors configured, a body, no Origin.
    let a = raw(
        &h,
        "OPTIONS /v1/sms/send HTTP/1.1\r\nHost: x\r\nAccess-Control-Request-Method: POST\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(a.status, 401, "{}", a.head);
    let a = raw(
        &h,
        "OPTIONS /v1/sms/send HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(a.status, 401, "with a body it is no preflight: {}", a.head);
    assert_eq!(h.upstream_hits(), 0);
    // A browser's preflight goes to the upstream, which answers its own.
    let a = raw(
        &h,
        "OPTIONS /v1/sms/send HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(a.status, 200, "{}", a.head);
    assert_eq!(h.upstream_hits(), 1);
}

#[test]
fn an_http_1_1_request_without_host_is_refused() {
    let h = Harness::start();
    let key = h.key("cus_host", None);
    let a = raw(
        &h,
        &format!("GET /v1/x HTTP/1.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(a.status, 400, "{}", a.head);
    assert_eq!(h.upstream_hits(), 0);
}

/// The binary at `RUST_LOG=trace`, fed requests that carry a key in every
/// place a log line could pick it up: the key appears in no line.
#[test]
fn keys_appear_in_no_log_line_at_any_level() {
    let dir = tempfile::tempdir().unwrap();
    let mock = MockUpstream::start();
    let (port, admin) = (free_port(), free_port());
    std::fs::write(dir.path().join("plans.yaml"), DEFAULT_PLANS).unwrap();
    std::fs::write(
        dir.path().join("tollgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nupstream: http://{}\nkeys: {{ path: keys.db, prefix: tg_test_ }}\nadmin: {{ listen: 127.0.0.1:{admin} }}\ntimeouts: {{ connect: 200ms }}\nthreads: 1\n",
            mock.addr
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let created = Command::new(bin)
        .args(["keys", "create", "--customer", "cus_log"])
        .current_dir(dir.path())
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("tg_test_"), "{key}");
    let mut child = Command::new(bin)
        .arg("run")
        .current_dir(dir.path())
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    harness::wait_for_port(format!("127.0.0.1:{port}").parse().unwrap());
    let send = |req: &[u8]| {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = c.write_all(req);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    };
    // Unparseable: Pingora would log its first bytes at debug.
    send(
        format!(
            "GET /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Bad\x01: y\r\n\r\n"
        )
        .as_bytes(),
    );
    // Every request's headers at trace.
    send(format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").as_bytes());
    // A key in the query of a request whose upstream fails (the 502 line).
    drop(mock);
    send(format!("GET /v1/x?api_key={key} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n").as_bytes());
    // A client that hangs up mid-headers, many times.
    for _ in 0..20 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = c.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n");
    }
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("tollgate listening"), "the proxy ran: {log}");
    assert!(!log.contains(&key), "the key is in the log:\n{log}");
    assert!(
        !log.contains(&key[8..20]),
        "part of the key is in the log:\n{log}"
    );
    assert!(
        !log.contains("while reading request headers"),
        "client hang-ups are counted, not logged:\n{log}"
    );
}

fn raw_bytes(h: &Harness, request: &[u8]) -> u16 {
    let mut conn = TcpStream::connect(h.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = conn.write_all(request);
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Request smuggling and malformed framing: every attempt ends in a 4xx or
/// a closed connection, never a 5xx of Tollgate's, and nothing, hidden or
/// not, reaches the upstream without a key.
#[test]
fn smuggled_and_malformed_requests_never_reach_the_upstream() {
    let h = Harness::start();
    let hidden = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let big = "a".repeat(2 << 20);
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "CL and TE",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}").into_bytes(),
        ),
        (
            "two Content-Lengths",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello {hidden}").into_bytes(),
        ),
        (
            "obfuscated TE",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc{hidden}").into_bytes(),
        ),
        (
            "TE list",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{hidden}").into_bytes(),
        ),
        (
            "bad chunk size",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{hidden}").into_bytes(),
        ),
        (
            "a request hidden in the body of a 401",
            format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}", hidden.len()).into_bytes(),
        ),
        (
            "bare LF",
            format!("GET /v1/x HTTP/1.1\nHost: x\n\n{hidden}").into_bytes(),
        ),
        (
            "bare CR in a header value",
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "non-UTF-8 path",
            b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "a 2 MiB header",
            format!("GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").into_bytes(),
        ),
        (
            "300 headers",
            format!("GET /v1/x HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes(),
        ),
        (
            "h2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "h2c upgrade",
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec(),
        ),
    ];
    for (name, request) in &cases {
        let status = raw_bytes(&h, request);
        assert!(
            status == 0 || (400..500).contains(&status),
            "{name}: answered {status}"
        );
    }
    assert_eq!(h.upstream_hits(), 0, "something reached the upstream");
}

/// Slowloris: 200 connections dribbling a request head are closed at the
/// head deadline, and good requests are not delayed meanwhile.
#[test]
fn slow_heads_are_cut_off_at_the_deadline_without_delaying_others() {
    let h = Harness::builder()
        .config("connections: { header_timeout: 1s, max: 1000 }")
        .build();
    let key = h.key("cus_good", Some("pro"));
    let rss_before = rss_kb();
    let started = std::time::Instant::now();
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = TcpStream::connect(h.addr).unwrap();
            c.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    for round in 0..8 {
        for c in &mut slow {
            let _ = c.write_all(b"X");
        }
        let t = std::time::Instant::now();
        let a = raw(
            &h,
            &get("/v1/x", &format!("Authorization: Bearer {key}\r\n")),
        );
        assert_eq!(a.status, 200, "round {round}: {}", a.head);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a good request waited {:?} behind the slow ones",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for (i, c) in slow.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(n) => assert_eq!(n, 0, "slow connection {i} was answered, not closed"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "slow connection {i} still open after {:?}",
                started.elapsed()
            ),
        }
    }
    assert_eq!(h.upstream_hits(), 8, "only the good requests went upstream");
    // The proxy runs in this process: its memory is bounded by the limits.
    let grown = rss_kb().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} kB for 200 slow heads"
    );
}

/// This process's resident memory (the proxy under test runs in it).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Past `connections.max`, a new connection is closed at accept (and
/// counted); a slot comes back when a connection closes.
#[test]
fn connections_past_the_cap_are_closed_at_accept() {
    let h = Harness::builder().config("connections: { max: 3 }").build();
    let key = h.key("cus_cap", Some("pro"));
    std::thread::sleep(Duration::from_millis(200)); // the harness's own port probes close
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(h.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let auth = format!("Authorization: Bearer {key}\r\n");
    let a = raw(&h, &get("/v1/x", &auth));
    assert_eq!(a.status, 0, "a fourth connection got an answer: {}", a.head);
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let a = raw(&h, &get("/v1/x", &auth));
    assert_eq!(a.status, 200, "{}", a.head);
    let mut admin = TcpStream::connect(h.admin).unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut metrics = String::new();
    let _ = admin.read_to_string(&mut metrics);
    assert!(
        metrics.contains("tollgate_connections_refused_total 1"),
        "{metrics}"
    );
}

/// RFC 9112 3.2.2: a server accepts the absolute form of a request target;
/// it is routed, limited and metered on its path like any other.
#[test]
fn absolute_form_targets_are_accepted_and_routed_on_their_path() {
    let h = Harness::start();
    let key = h.key("cus_abs", Some("pro"));
    let a = raw(
        &h,
        &format!("POST http://api.test/v1/sms/send HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(a.status, 200, "{}", a.head);
    let target = echoed(&a)["_target"][0].as_str().unwrap().to_owned();
    assert!(target.ends_with("/v1/sms/send"), "{target}");
    assert!(
        a.head.contains("x-ratelimit-remaining: 995"),
        "cost 5 of the sms route: {}",
        a.head
    );
}

/// After a complete request, the next head on the same kept-alive
/// connection is held to the same deadline.
#[test]
fn a_slow_second_head_on_a_kept_alive_connection_is_cut_off() {
    let h = Harness::builder()
        .config("connections: { header_timeout: 1s }")
        .build();
    let key = h.key("cus_keepalive", Some("pro"));
    let mut c = TcpStream::connect(h.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    write!(
        c,
        "GET /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    // Read the whole first answer (its Content-Length tells where it ends).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed after the first request");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap();
            if body.len() >= len {
                assert!(head.starts_with("http/1.1 200"), "{head}");
                break;
            }
        }
    }
    c.write_all(b"GET /v1/x HTTP/1.1\r\nHost: x\r\n").unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        let _ = c.write_all(b"X");
    }
    match c.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "answered instead of closed"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the slow second head was not cut off"
        ),
    }
    assert_eq!(h.upstream_hits(), 1);
}

/// The head deadline and size limit are for heads: a large body sent slowly
/// after a prompt head (as after `Expect: 100-continue`) goes through.
#[test]
fn a_large_body_sent_slowly_after_the_head_is_not_cut_off() {
    let h = Harness::builder()
        .config("connections: { header_timeout: 1s, max_header_kb: 8 }")
        .build();
    let key = h.key("cus_upload", Some("pro"));
    let mut c = TcpStream::connect(h.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = vec![b'a'; 300_000];
    write!(
        c,
        "POST /v1/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    c.write_all(&body[..100_000]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.write_all(&body[100_000..]).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
}
