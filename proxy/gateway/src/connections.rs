//! What one client connection may cost before it has sent a request:
//! Pingora 0.9 reads a request head with a timeout per read (a byte every
//! minute keeps a connection forever), buffers up to 1 MiB of it, and has
//! no connection cap. [`GuardedApp`] wraps the proxy's application and
//! [`GuardedStream`] each accepted connection, so that:
//!
//! - at most `max` connections are open at once; more are closed at accept
//!   and counted in `tollgate_connections_refused_total`;
//! - a connection that sends nothing for `idle_timeout` (before its first
//!   request, or between two on a kept-alive connection) is closed;
//! - each request head must be complete within `header_timeout` of its
//!   first byte, and no longer than `max_header_bytes`; past either, the
//!   connection is closed (and counted as a client hang-up by Pingora's
//!   log line, see `logging`).
//!
//! - on shutdown (SIGTERM, or handing over to an upgraded process),
//!   connections accepted before the listeners closed get their first
//!   request read before Pingora drops every connection still waiting for
//!   a head (for at most a second), so a client that connected in that
//!   instant is answered, not reset.
//!
//! [`Rearm`] sits between Pingora's HTTP loop and the proxy: each request a
//! connection starts (its first, and every one after on a kept-alive
//! connection) re-arms the guard, so a request's body, and what follows a
//! `100 Continue`, are never taken for a head.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `connections:` in tollgate.yaml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per process.
    pub max: usize,
    /// From the first byte to the end of the first request head.
    pub header_timeout: Duration,
    /// Silence before the first byte (and between requests, see `proxy/mod.rs`).
    pub idle_timeout: Duration,
    /// The first request head's size.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// An application whose connections are [`GuardedStream`]s.
pub struct GuardedApp<A> {
    inner: Arc<A>,
    limits: Limits,
    open: Arc<AtomicUsize>,
    /// Connections that have not yet sent their first request head.
    fresh: Arc<AtomicUsize>,
}

/// How long shutdown waits for connections accepted just before it to
/// send their first request (bounded by `header_timeout` too).
pub const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

impl<A> GuardedApp<A> {
    pub fn new(inner: A, limits: Limits) -> Self {
        Self {
            inner: Arc::new(inner),
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            fresh: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The number of connections open now (shared, live).
    pub fn open_connections(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for GuardedApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream: Stream = if stream.as_any().is::<GuardedStream>() {
            stream
        } else {
            let Some(slot) = Slot::take(&self.open, self.limits.max) else {
                tollgate_core::metrics::CONNECTIONS_REFUSED.inc();
                return None;
            };
            let fresh = Slot::count(&self.fresh);
            Box::new(GuardedStream::new(stream, slot, fresh, self.limits))
        };
        self.inner.process_new(stream, shutdown).await
    }

    /// Runs once the listeners are closed. Pingora's cleanup drops every
    /// connection waiting for a request head, including one accepted an
    /// instant ago whose request is still on the wire: those get their
    /// first head read first.
    async fn cleanup(&self) {
        drained(
            &self.fresh,
            FIRST_REQUEST_WAIT.min(self.limits.header_timeout),
        )
        .await;
        self.inner.cleanup().await;
    }
}

/// Waits until the count `n` is 0, or for `wait` at most; what is left.
pub async fn drained(n: &AtomicUsize, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    while n.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n.load(Ordering::Acquire)
}

/// The proxy application, re-arming its connection's [`GuardedStream`]
/// for each request Pingora's HTTP/1 loop starts on it.
pub struct Rearm<A>(Arc<A>);

impl<A> Rearm<A> {
    pub fn new(inner: A) -> Self {
        Self(Arc::new(inner))
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for Rearm<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let guarded = session
            .stream()
            .and_then(|s| s.as_any().downcast_ref::<GuardedStream>());
        if let Some(g) = guarded {
            g.rearm_requested.store(true, Ordering::Relaxed);
        }
        self.0.process_new_http(session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.0.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.0.server_options()
    }

    async fn http_cleanup(&self) {
        self.0.http_cleanup().await;
    }
}

/// One of the `max` connection slots, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(open.clone()))
    }

    /// Counted in `n`, without a limit.
    fn count(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Slot(n.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client connection held to [`Limits`] while it owes a request head.
#[derive(Debug)]
pub struct GuardedStream {
    inner: Stream,
    _slot: Slot,
    /// Held until the first request head is complete.
    fresh: Option<Slot>,
    limits: Limits,
    /// While `armed`: when the connection is closed for being idle or slow.
    deadline: Pin<Box<Sleep>>,
    /// Waiting for a request head (from accept, or a kept-alive reuse,
    /// until the head is complete).
    armed: bool,
    /// Set by [`Rearm`] when Pingora starts reading the next request.
    rearm_requested: AtomicBool,
    /// Bytes of the current head seen so far (0: none yet).
    head_bytes: usize,
    /// The last bytes seen, to find the blank line that ends the head.
    tail: [u8; 3],
}

impl GuardedStream {
    fn new(inner: Stream, slot: Slot, fresh: Slot, limits: Limits) -> Self {
        Self {
            inner,
            _slot: slot,
            fresh: Some(fresh),
            limits,
            deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            armed: true,
            rearm_requested: AtomicBool::new(false),
            head_bytes: 0,
            tail: [0; 3],
        }
    }

    /// Waits for the next request's head (a kept-alive reuse).
    fn rearm(&mut self) {
        self.armed = true;
        self.head_bytes = 0;
        self.tail = [0; 3];
        let at = Instant::now() + self.limits.idle_timeout;
        self.deadline.as_mut().reset(at);
    }

    /// Follows the current head through `data`; an error once it is too large.
    fn scan(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(end) = head_end(self.tail, data) {
            self.armed = false;
            self.fresh = None;
            self.head_bytes += end;
            return Ok(());
        }
        if self.head_bytes == 0 && !data.is_empty() {
            // A head begun but not complete in its first read: it has
            // `header_timeout` to finish.
            let at = Instant::now() + self.limits.header_timeout;
            self.deadline.as_mut().reset(at);
        }
        self.head_bytes += data.len();
        for &b in data.iter().rev().take(3).rev() {
            self.tail = [self.tail[1], self.tail[2], b];
        }
        if self.head_bytes > self.limits.max_header_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head larger than connections.max_header_kb",
            ));
        }
        Ok(())
    }
}

/// Where in `data` the blank line ending a head is (just past it): CRLF
/// CRLF, or LF LF as lenient parsers accept; `tail` holds the three bytes
/// read before `data`, the last one last.
fn head_end(tail: [u8; 3], data: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = data[from..].iter().position(|&b| b == b'\n') {
        let i = from + found;
        // The byte `k` places before the LF, from `data` or from `tail`.
        let before = |k: usize| if i >= k { data[i - k] } else { tail[3 + i - k] };
        let d = before(1);
        if d == b'\n' || (d == b'\r' && before(2) == b'\n' && before(3) == b'\r') {
            return Some(i + 1);
        }
        from = i + 1;
    }
    None
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.rearm_requested.load(Ordering::Relaxed) {
            this.rearm_requested.store(false, Ordering::Relaxed);
            this.rearm();
        }
        if this.armed && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head in time",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if this.armed => {
                let filled = buf.filled();
                Poll::Ready(this.scan(&filled[before..]))
            }
            other => other,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest);
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(limits: Limits) -> (GuardedStream, tokio::io::DuplexStream, Arc<AtomicUsize>) {
        let (s, b, open, _) = counted(limits);
        (s, b, open)
    }

    /// [`stream`], with the count of connections yet to send a head.
    fn counted(
        limits: Limits,
    ) -> (
        GuardedStream,
        tokio::io::DuplexStream,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (open, fresh) = Default::default();
        let slot = Slot::take(&open, 1).unwrap();
        let first = Slot::count(&fresh);
        (
            GuardedStream::new(Box::new(a), slot, first, limits),
            b,
            open,
            fresh,
        )
    }

    #[tokio::test]
    async fn a_head_ends_at_its_blank_line_however_the_reads_split_it() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody";
        let end = head.len() - 4;
        for split in 0..=head.len() {
            let (a, b) = head.split_at(split);
            let mut g = stream(Limits::default()).0;
            g.scan(a).unwrap();
            let found = if split >= end {
                assert!(!g.armed, "complete in the first read at {split}");
                g.head_bytes
            } else {
                assert!(g.armed, "not complete at {split}");
                g.scan(b).unwrap();
                assert!(!g.armed, "complete after the second read at {split}");
                g.head_bytes
            };
            assert_eq!(found, end, "split at {split}");
        }
        assert_eq!(head_end([0; 3], b"GET / HTTP/1.0\n\n"), Some(16), "LF LF");
        assert_eq!(head_end(*b"\r\n\r", b"\n"), Some(1), "CRLF CR | LF");
        assert_eq!(head_end(*b"x\r\n", b"Host: x\r\n"), None);
        assert_eq!(head_end(*b"\n\r\n", b"x"), None);
    }

    #[tokio::test]
    async fn a_connection_is_fresh_until_its_first_head_is_complete() {
        use tokio::io::AsyncWriteExt;
        let (mut s, mut client, _, fresh) = counted(Limits::default());
        assert_eq!(fresh.load(Ordering::Acquire), 1);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        read_all(&mut s).await.unwrap();
        assert_eq!(fresh.load(Ordering::Acquire), 1, "half a head");
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        read_all(&mut s).await.unwrap();
        assert_eq!(fresh.load(Ordering::Acquire), 0, "its head is read");
        s.rearm();
        assert_eq!(fresh.load(Ordering::Acquire), 0, "a kept-alive wait is not");

        let (s, _client, _, fresh) = counted(Limits::default());
        drop(s);
        assert_eq!(fresh.load(Ordering::Acquire), 0, "a closed one is not");
    }

    async fn read_all(s: &mut GuardedStream) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut out = vec![0u8; 1 << 20];
        let n = s.read(&mut out).await?;
        out.truncate(n);
        Ok(out)
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_dribbled_past_the_deadline_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let (mut s, mut client, _) = stream(Limits {
            header_timeout: Duration::from_secs(10),
            ..Limits::default()
        });
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read_all(&mut s).await.unwrap(), b"GET / HTTP/1.1\r\n");
        // Slowloris: a byte every few seconds keeps each read within any
        // per-read timeout, but not within the head's deadline.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(3)).await;
            client.write_all(b"X").await.unwrap();
            assert!(read_all(&mut s).await.is_ok());
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = read_all(&mut s).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_head_disarms_the_guard_and_silence_is_bounded() {
        use tokio::io::AsyncWriteExt;
        let (mut s, mut client, _) = stream(Limits::default());
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
            .await
            .unwrap();
        assert!(read_all(&mut s).await.is_ok());
        tokio::time::advance(Duration::from_secs(3600)).await;
        client.write_all(b"c").await.unwrap();
        assert_eq!(
            read_all(&mut s).await.unwrap(),
            b"c",
            "the body is not a head"
        );

        let (mut idle, _client, _) = stream(Limits::default());
        tokio::time::advance(Duration::from_secs(61)).await;
        let err = read_all(&mut idle).await.unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "silent for the idle timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_guarded_again_for_each_request() {
        use tokio::io::AsyncWriteExt;
        let (mut s, mut client, _) = stream(Limits::default());
        client
            .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_all(&mut s).await.is_ok());
        // The next request: a head dribbled past the deadline is cut off.
        s.rearm();
        client.write_all(b"GET /2 HTTP/1.1\r\n").await.unwrap();
        assert!(read_all(&mut s).await.is_ok());
        tokio::time::advance(Duration::from_secs(11)).await;
        let err = read_all(&mut s).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_and_slots_come_back() {
        use tokio::io::AsyncWriteExt;
        let (mut s, mut client, open) = stream(Limits {
            max_header_bytes: 1024,
            ..Limits::default()
        });
        assert!(Slot::take(&open, 1).is_none(), "the one slot is taken");
        client.write_all(&[b'a'; 2048]).await.unwrap();
        let err = read_all(&mut s).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(s);
        assert!(
            Slot::take(&open, 1).is_some(),
            "closing gives the slot back"
        );
    }
}
