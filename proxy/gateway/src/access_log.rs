//! The access log: one JSON line per request, to stdout or a file, written
//! by a thread of its own, every 20 ms. A request only hands its line to a bounded
//! queue; when the queue is full (a stalled disk) the line is dropped and
//! counted in `tollgate_access_log_dropped_total`, never the request.
//! SIGUSR1 reopens the file (after logrotate moved it).

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::metrics::ACCESS_LOG_DROPPED;

/// Lines waiting for the writer at most.
pub const QUEUE: usize = 65_536;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

pub struct AccessLog {
    tx: SyncSender<String>,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn start(target: Target) -> io::Result<Self> {
        let out = open(&target)?;
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&reopen);
        std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || writer(target, out, rx, flag))?;
        Ok(Self { tx, reopen })
    }

    /// Queues one line (without its newline); never blocks.
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => ACCESS_LOG_DROPPED.inc(),
        }
    }

    /// Reopens the file before the next line (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

fn open(target: &Target) -> io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        Target::Stdout => Box::new(io::stdout()),
        Target::File(p) => {
            Box::new(OpenOptions::new().create(true).append(true).open(p)?) as Box<dyn Write + Send>
        }
    })
}

/// How long the writer sleeps once it has drained the queue. It polls
/// rather than blocks: a sleeping receiver costs every request a futex wake
/// and the writer a context switch and a `write` per line (measured in
/// `benches/README.md`); polling batches a period's lines into few writes.
pub const POLL: Duration = Duration::from_millis(20);

fn writer(
    target: Target,
    out: Box<dyn Write + Send>,
    rx: Receiver<String>,
    reopen: Arc<AtomicBool>,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        if reopen.swap(false, Ordering::Relaxed) {
            let _ = out.flush();
            match open(&target) {
                Ok(f) => out = BufWriter::with_capacity(64 * 1024, f),
                Err(e) => log::error!("access log: cannot reopen {target:?}: {e}"),
            }
        }
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
        std::thread::sleep(POLL);
    }
}
