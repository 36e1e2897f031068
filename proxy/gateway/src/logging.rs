//! The process logger: `env_logger` as `RUST_LOG` configures it, behind a
//! guard for what Pingora writes.
//!
//! - Pingora's own lines are kept at `info` and above whatever `RUST_LOG`
//!   says: at `debug` it prints the first bytes of a request it cannot
//!   parse, at `trace` every request's headers, and both hold keys.
//! - The one error line Pingora writes when a client hangs up while sending
//!   its headers ("Downstream ConnectionClosed … while reading request
//!   headers") is no error of Tollgate's, and any unauthenticated client can
//!   make it by the thousand: it is counted in
//!   `tollgate_client_disconnects_total` and not written. Pingora has no
//!   hook for it, so the guard recognises the line.
//!
//! Tollgate's own lines never hold a key, a token or a secret to begin with.

use log::{Level, Log, Metadata, Record};

/// Installs the guarded logger for the process (`info` unless `RUST_LOG`
/// says otherwise).
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Guarded { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// A logger that applies the rules above before `inner` sees a record.
pub struct Guarded<L> {
    pub inner: L,
}

fn is_pingora(target: &str) -> bool {
    target.starts_with("pingora")
}

/// Pingora's line for a client that went away (or stalled) before its
/// request head was read. Matched on the start of the line, which Pingora
/// writes itself: the client's own text (a `Host` value) only ever comes
/// later in a line, so it cannot make other lines vanish.
fn is_client_hangup(message: &str) -> bool {
    const HANGUPS: [&str; 3] = [
        "Fail to proxy: Downstream ConnectionClosed context: while reading request headers",
        "Fail to proxy: Downstream ReadError context: while reading request headers",
        "Fail to proxy: Downstream ReadTimedout context: timeout: ",
    ];
    HANGUPS.iter().any(|h| message.starts_with(h))
}

impl<L: Log> Log for Guarded<L> {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        !(is_pingora(m.target()) && m.level() > Level::Info) && self.inner.enabled(m)
    }

    fn log(&self, r: &Record<'_>) {
        if is_pingora(r.target()) {
            if r.level() > Level::Info {
                return;
            }
            if r.level() == Level::Error && is_client_hangup(&r.args().to_string()) {
                tollgate_core::metrics::CLIENT_DISCONNECTS.inc();
                return;
            }
        }
        self.inner.log(r);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Capture(Mutex<Vec<String>>);

    impl Log for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &Record<'_>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", r.target(), r.args()));
        }
        fn flush(&self) {}
    }

    fn send(g: &Guarded<Capture>, target: &str, level: Level, msg: &str) {
        g.log(
            &Record::builder()
                .target(target)
                .level(level)
                .args(format_args!("{msg}"))
                .build(),
        );
    }

    #[test]
    fn pingora_stays_at_info_and_client_hangups_are_counted_not_logged() {
        let g = Guarded {
            inner: Capture::default(),
        };
        let before = tollgate_core::metrics::CLIENT_DISCONNECTS.get();
        send(
            &g,
            "pingora_core::protocols::http::v1::server",
            Level::Debug,
            "Invalid request header: Authorization: Bearer tg_live_x",
        );
        send(
            &g,
            "pingora_proxy",
            Level::Trace,
            "Request header: authorization",
        );
        send(&g, "pingora_proxy", Level::Error, "Fail to proxy: Downstream ConnectionClosed context: while reading request headers, bytes already read: 1, downstream session type: h1");
        send(
            &g,
            "pingora_proxy",
            Level::Error,
            "Fail to proxy: Upstream ConnectRefused",
        );
        // A client's Host cannot hide a line by quoting the hang-up's words.
        send(&g, "pingora_proxy", Level::Error, "Fail to proxy: Upstream ConnectRefused, tries: 1, GET /x, Host: Downstream ConnectionClosed while reading request headers");
        send(&g, "pingora_proxy", Level::Error, "Fail to proxy: Downstream ReadTimedout context: timeout: 60s, downstream session type: h1");
        send(
            &g,
            "tollgate::server",
            Level::Debug,
            "limiter: evicted 3 idle customers",
        );
        let lines = g.inner.0.lock().unwrap().clone();
        assert_eq!(
            lines,
            vec![
                "pingora_proxy Fail to proxy: Upstream ConnectRefused".to_string(),
                "pingora_proxy Fail to proxy: Upstream ConnectRefused, tries: 1, GET /x, Host: Downstream ConnectionClosed while reading request headers".to_string(),
                "tollgate::server limiter: evicted 3 idle customers".to_string(),
            ]
        );
        assert_eq!(tollgate_core::metrics::CLIENT_DISCONNECTS.get(), before + 2);
        assert!(!g.enabled(
            &Metadata::builder()
                .target("pingora_core")
                .level(Level::Debug)
                .build()
        ));
    }
}
