//! Test support shared by every crate's integration tests: free ports,
//! `redis-server` processes of the test's own (never the machine's Redis on
//! 6379), and HTTP servers that record what they were sent (a mock
//! upstream, and billing providers speaking their documented wire formats).
//! Never a dependency of anything but tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of one series (`name{labels}` exactly as exported) in a
/// Prometheus text exposition; None when it is not there.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

// ---- mock upstream ---------------------------------------------------------

/// A small HTTP/1.1 server standing in for the operator's API.
///
/// - `/status/{code}`: answers that status;
/// - `/v1/ai/*?tokens=N`: 200 with `X-Usage-Tokens: N`;
/// - `/slow?ms=N`: answers after N ms;
/// - anything else: 200 with the request's headers as a JSON object
///   (lower-case names to lists of values; `_target` holds the request target).
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    _server: ServerThread,
}

impl MockUpstream {
    pub fn start() -> Self {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let server = ServerThread::spawn(2, move |sock| serve(sock, h.clone()));
        Self {
            addr: server.addr,
            hits,
            _server: server,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An HTTP server on a free port, on its own thread and runtime, stopped
/// when dropped; `serve` handles each accepted connection.
pub struct ServerThread {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    pub fn spawn<F, Fut>(workers: usize, serve: F) -> Self
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => return,
                        accepted = listener.accept() => {
                            if let Ok((sock, _)) = accepted {
                                tokio::spawn(serve(sock));
                            }
                        }
                    }
                }
            });
        });
        Self {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request as the mocks see it.
struct RawRequest {
    method: String,
    target: String,
    /// Lower-case names, every value in order.
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

/// Reads the next request on a keep-alive connection; None when it closes.
async fn read_request(reader: &mut BufReader<tokio::net::TcpStream>) -> Option<RawRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut content_length = 0usize;
    loop {
        let mut h = Vec::new();
        if reader.read_until(b'\n', &mut h).await.unwrap_or(0) == 0 {
            return None;
        }
        let h = String::from_utf8_lossy(&h).trim_end().to_owned();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                content_length = v.trim().parse().unwrap_or(0);
            }
            headers.entry(k).or_default().push(v.trim().to_owned());
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).await.ok()?;
    Some(RawRequest {
        method,
        target,
        headers,
        body,
    })
}

/// A number in a query string (`a=1&b=2`).
fn query_param(query: &str, name: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse::<u64>().ok())
}

async fn serve(sock: tokio::net::TcpStream, hits: Arc<AtomicU64>) {
    let mut reader = BufReader::new(sock);
    while let Some(req) = read_request(&mut reader).await {
        let (target, mut headers) = (req.target, req.headers);
        hits.fetch_add(1, Ordering::SeqCst);
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |name: &str| query_param(query, name);
        let mut status = 200u16;
        let mut extra = String::new();
        if let Some(code) = path.strip_prefix("/status/") {
            status = code.parse().unwrap_or(500);
        } else if path.starts_with("/v1/ai/") {
            extra = format!("X-Usage-Tokens: {}\r\n", param("tokens").unwrap_or(0));
        } else if path == "/slow" {
            tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(0))).await;
        }
        headers.insert("_target".into(), vec![target.clone()]);
        let json = serde_json::to_string(&headers).unwrap();
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{json}",
            json.len()
        );
        if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

// ---- mock LLM upstream --------------------------------------------------------

/// An OpenAI chat completion stream with `stream_options.include_usage`, as
/// OpenAI's API reference ("The chat completion chunk object") shows it:
/// every chunk has `"usage": null` but the last one before `[DONE]`. 12
/// prompt tokens (4 of them cached), 7 completion tokens.
pub const OPENAI_STREAM: [&str; 5] = [
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    "data: [DONE]\n\n",
];

/// An Anthropic Messages stream (docs.anthropic.com, "Streaming Messages"):
/// 25 input tokens plus 5 written to and 10 read from the cache in
/// `message_start`, 15 output tokens (cumulative) in `message_delta`.
pub const ANTHROPIC_STREAM: [&str; 6] = [
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":5,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

/// An OpenAI chat completion body: 19 prompt tokens (3 cached), 10
/// completion tokens.
pub const OPENAI_JSON: &str = "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3}}}";

/// A stand-in for an OpenAI- or Anthropic-compatible API:
/// - `/v1/chat/completions`: [`OPENAI_JSON`], or with `stream=1`
///   [`OPENAI_STREAM`] as chunked `text/event-stream`, one event per chunk;
/// - `/v1/messages?stream=1`: [`ANTHROPIC_STREAM`] likewise;
/// - `usage=0`: the stream without its usage event; `pad=N`: a JSON body
///   padded by N bytes; `stall_ms=N`: waits N ms after the first event.
///
/// Records whether each request asked for a compressed answer.
pub struct MockLlm {
    pub addr: SocketAddr,
    /// `Accept-Encoding` of each request, in order (None: absent).
    pub accept_encoding: Arc<Mutex<Vec<Option<String>>>>,
    _server: ServerThread,
}

impl MockLlm {
    pub fn start() -> Self {
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let s = seen.clone();
        let server = ServerThread::spawn(2, move |sock| serve_llm(sock, s.clone()));
        Self {
            addr: server.addr,
            accept_encoding: seen,
            _server: server,
        }
    }
}

async fn serve_llm(sock: tokio::net::TcpStream, seen: Arc<Mutex<Vec<Option<String>>>>) {
    let mut reader = BufReader::new(sock);
    while let Some(req) = read_request(&mut reader).await {
        seen.lock()
            .unwrap()
            .push(req.headers.get("accept-encoding").map(|v| v.join(", ")));
        let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
        let param = |name: &str| query_param(query, name);
        let w = reader.get_mut();
        if param("stream") != Some(1) {
            let mut body = OPENAI_JSON.to_owned();
            if let Some(pad) = param("pad") {
                body = format!(
                    "{{\"pad\":\"{}\",{}",
                    "x".repeat(pad as usize),
                    &OPENAI_JSON[1..]
                );
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if w.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let events: Vec<&str> = if path == "/v1/messages" {
            ANTHROPIC_STREAM.to_vec()
        } else {
            OPENAI_STREAM.to_vec()
        };
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for (i, e) in events.iter().enumerate() {
            if param("usage") == Some(0) && e.contains("_tokens\":") {
                continue;
            }
            let chunk = format!("{:x}\r\n{e}\r\n", e.len());
            if w.write_all(chunk.as_bytes()).await.is_err() || w.flush().await.is_err() {
                return;
            }
            if i == 0 {
                if let Some(ms) = param("stall_ms") {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
        if w.write_all(b"0\r\n\r\n").await.is_err() {
            return;
        }
    }
}

// ---- mock billing providers ---------------------------------------------------

/// One request a mock provider received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    /// The body as `application/x-www-form-urlencoded` pairs, decoded.
    pub fn form(&self) -> BTreeMap<String, String> {
        self.body
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (decode(k), decode(v)))
            .collect()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn decode(s: &str) -> String {
    tollgate_core::pct::decode(s, true)
}

pub type Reply = (u16, String);
type Handler = dyn Fn(&Captured) -> Reply + Send + Sync;

/// An HTTP server standing in for a billing provider: every request is
/// captured and answered by `handler`.
pub struct MockProvider {
    pub addr: SocketAddr,
    pub requests: Arc<std::sync::Mutex<Vec<Captured>>>,
    _server: ServerThread,
}

impl MockProvider {
    pub fn start(handler: impl Fn(&Captured) -> Reply + Send + Sync + 'static) -> Self {
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let reqs = requests.clone();
        let server = ServerThread::spawn(1, move |sock| {
            serve_provider(sock, handler.clone(), reqs.clone())
        });
        Self {
            addr: server.addr,
            requests,
            _server: server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve_provider(
    sock: tokio::net::TcpStream,
    handler: Arc<Handler>,
    reqs: Arc<std::sync::Mutex<Vec<Captured>>>,
) {
    let mut reader = BufReader::new(sock);
    while let Some(req) = read_request(&mut reader).await {
        let headers = req
            .headers
            .into_iter()
            .filter_map(|(k, mut v)| Some((k, v.pop()?)))
            .collect();
        let c = Captured {
            method: req.method,
            path: req.target,
            headers,
            body: String::from_utf8_lossy(&req.body).into_owned(),
        };
        let (status, text) = handler(&c);
        reqs.lock().unwrap().push(c);
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

// ---- Stripe ----------------------------------------------------------------------

pub const STRIPE_KEY: &str = "sk_test_tollgate";

/// Stripe `POST /v1/billing/meter_events` ("Create a billing meter event",
/// Stripe API reference; form fields as stripe-node and stripe-python encode
/// them: `event_name`, `payload[stripe_customer_id]`, `payload[value]`,
/// `identifier`, `timestamp`). Like Stripe, it keeps one event per
/// identifier: a repeat is not counted again. `fail` decides, per request,
/// whether to answer 500 instead (nothing recorded).
/// identifier -> (event_name, customer, value)
pub type StripeEvents = Arc<Mutex<BTreeMap<String, (String, String, u64)>>>;

pub struct MockStripe {
    pub server: MockProvider,
    pub events: StripeEvents,
}

/// What [`MockStripe::start_with`] does with its `i`-th request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer as Stripe does.
    None,
    /// Record nothing and answer this status (500, 429, ...).
    Status(u16),
    /// Record the event, then answer only after this long: a client that
    /// gave up meanwhile retries what Stripe already has.
    RecordThenStall(Duration),
}

impl MockStripe {
    /// `fail(i)`: answer the `i`-th request with 500 instead.
    pub fn start(fail: impl Fn(usize) -> bool + Send + Sync + 'static) -> Self {
        Self::start_with(move |i| {
            if fail(i) {
                Fault::Status(500)
            } else {
                Fault::None
            }
        })
    }

    pub fn start_with(fault: impl Fn(usize) -> Fault + Send + Sync + 'static) -> Self {
        let events: StripeEvents = Arc::default();
        let seen = events.clone();
        let n = Arc::new(Mutex::new(0usize));
        let server = MockProvider::start(move |c: &Captured| -> Reply {
            let i = {
                let mut n = n.lock().unwrap();
                *n += 1;
                *n
            };
            if c.path != "/v1/billing/meter_events" || c.method != "POST" {
                return (404, r#"{"error":{"type":"invalid_request_error"}}"#.into());
            }
            if c.header("authorization") != Some(&format!("Bearer {STRIPE_KEY}")) {
                return (
                    401,
                    r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key"}}"#
                        .into(),
                );
            }
            let fault = fault(i);
            match fault {
                Fault::Status(429) => {
                    return (
                        429,
                        r#"{"error":{"type":"invalid_request_error","code":"rate_limit"}}"#.into(),
                    )
                }
                Fault::Status(s) => return (s, r#"{"error":{"type":"api_error"}}"#.into()),
                Fault::None | Fault::RecordThenStall(_) => {}
            }
            let f = c.form();
            let id = f["identifier"].clone();
            seen.lock().unwrap().entry(id.clone()).or_insert((
                f["event_name"].clone(),
                f["payload[stripe_customer_id]"].clone(),
                f["payload[value]"].parse().unwrap(),
            ));
            if let Fault::RecordThenStall(d) = fault {
                std::thread::sleep(d);
            }
            (
                200,
                format!(
                    r#"{{"object":"billing.meter_event","identifier":"{id}","event_name":"{}"}}"#,
                    f["event_name"]
                ),
            )
        });
        Self { server, events }
    }

    /// Units billed per (meter, customer), each identifier counted once.
    pub fn billed(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        for (meter, customer, v) in self.events.lock().unwrap().values() {
            *out.entry((meter.clone(), customer.clone())).or_insert(0) += v;
        }
        out
    }

    pub fn total(&self, meter: &str) -> u64 {
        self.billed()
            .iter()
            .filter(|((m, _), _)| m == meter)
            .map(|(_, v)| v)
            .sum()
    }

    pub fn sink(&self) -> String {
        format!(
            "{{ stripe: {{ api_key_env: TEST_STRIPE_KEY, base_url: \"{}\" }} }}",
            self.server.url()
        )
    }
}

// ---- the proxy ---------------------------------------------------------------

// ---- redis-server processes -------------------------------------------------

/// A `redis-server` of the test's own on a free port; killed on drop. It
/// never touches the machine's shared Redis on 6379.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            // Neither stream is the test's: a server a crashed test binary
            // left behind must not hold the runner's output open.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/setup.sh installs it)");
        self.child = Some(child);
        wait_for_port(format!("127.0.0.1:{}", self.port).parse().unwrap());
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `n` masters, no replicas, on free ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self { nodes }
    }

    /// The `nodes:` list for tollgate.yaml.
    pub fn nodes_yaml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("nodes: [{}]", urls.join(", "))
    }
}
