//! The daemon's output on a thread of its own, behind a bounded queue: a reader that stops
//! reading (a stalled pipe, a terminal on hold, a slow disk) blocks only that thread. The
//! trace loop never waits on it: a record the queue has no room for is dropped and counted,
//! and the count is reported as lost (reason `output`). At the end the loop gives the
//! thread a deadline to write what is queued; what it could not write by then is counted
//! too, and the daemon exits regardless (exit ends a thread blocked in `write`).
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};

/// Where the thread writes (the output's stdout or file): what it is, for errors.
pub(super) trait Destination: Send + 'static {
    fn what(&self) -> String;
    fn write_all(&mut self, b: &[u8]) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    /// Closes an output file and opens it again by name (SIGHUP).
    fn reopen(&mut self) -> Result<()>;
}

/// Records that can wait: at a few hundred bytes each, a few MiB. A reader that is behind by
/// more than this is stalled, not slow.
const CAPACITY: usize = 8192;

/// What the loop and the writer thread share besides the queue.
#[derive(Default)]
struct Shared {
    /// Flush once the queue is empty (the once-a-second tick; files are not flushed per record).
    flush: AtomicBool,
    /// Close the output file and open it again by name (SIGHUP) before the next write.
    reopen: AtomicBool,
    /// The writer's first error; it writes nothing after it.
    error: Mutex<Option<anyhow::Error>>,
    failed: AtomicBool,
    /// Records the thread took from the queue.
    taken: AtomicU64,
}

pub(super) struct Queue {
    /// `None` once closed by `finish`.
    tx: Option<SyncSender<Vec<u8>>>,
    shared: Arc<Shared>,
    /// Told when the thread has written and flushed everything it was given.
    done: Receiver<()>,
    /// What the destination is, for errors ("writing to stdout").
    what: String,
    /// Records queued, and dropped for want of room.
    sent: u64,
    dropped: u64,
}

impl Queue {
    /// Moves `dest` to a new thread. `live`: flush whenever the queue runs empty (a terminal or
    /// a pipe: someone is watching).
    pub(super) fn spawn(dest: impl Destination, live: bool) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let what = dest.what();
        let theirs = Arc::clone(&shared);
        thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                write_all(dest, &rx, &theirs, live);
                let _ = done_tx.send(());
            })?;
        Ok(Self {
            tx: Some(tx),
            shared,
            done,
            what,
            sent: 0,
            dropped: 0,
        })
    }

    pub(super) fn what(&self) -> &str {
        &self.what
    }

    /// Queues one whole record; dropped (and counted) when the queue is full. Errs with the
    /// writer's error once it failed.
    pub(super) fn send(&mut self, record: &[u8]) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.take_error());
        }
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        match tx.try_send(record.to_vec()) {
            Ok(()) => {
                self.sent += 1;
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                Ok(())
            }
            // The thread ended: it failed (its error says how).
            Err(TrySendError::Disconnected(_)) => Err(self.take_error()),
        }
    }

    /// Whether the thread failed (its error is taken with `take_error`): the loop stops even
    /// when nothing more is sent (a ready record that never reached a full disk).
    pub(super) fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    pub(super) fn flush(&self) {
        self.shared.flush.store(true, Ordering::Release);
    }

    pub(super) fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Closes the queue and waits until `by` for the thread to write the rest. Returns the
    /// records it had not written by then (a stalled reader), or its error.
    pub(super) fn finish(&mut self, by: Instant) -> Result<u64> {
        let Some(tx) = self.tx.take() else {
            return Ok(0);
        };
        drop(tx);
        let wait = by.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if self.shared.failed.load(Ordering::Acquire) {
                    return Err(self.take_error());
                }
                Ok(0)
            }
            // The records still queued (the one being written is not counted: it may be).
            Err(RecvTimeoutError::Timeout) => Ok(self.pending()),
        }
    }

    /// Records queued and not yet taken by the thread.
    fn pending(&self) -> u64 {
        (self.sent).saturating_sub(self.shared.taken.load(Ordering::Acquire))
    }

    pub(super) fn take_error(&self) -> anyhow::Error {
        let mut slot = self.shared.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.take()
            .unwrap_or_else(|| anyhow!("{}: the output thread ended", self.what))
    }
}

/// The thread: writes records as they come; flushes when the queue runs empty and someone
/// watches (or the tick asked); stops at the first error.
fn write_all(mut dest: impl Destination, rx: &Receiver<Vec<u8>>, shared: &Shared, live: bool) {
    let fail = |e: anyhow::Error| {
        *shared.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        shared.failed.store(true, Ordering::Release);
    };
    loop {
        let record = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if live || shared.flush.swap(false, Ordering::AcqRel) {
                    if let Err(e) = dest.flush() {
                        return fail(e);
                    }
                }
                // Wakes up now and then for a flush or reopen asked while nothing is written.
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(r) => Some(r),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        if shared.reopen.swap(false, Ordering::AcqRel) {
            if let Err(e) = dest.reopen() {
                return fail(e);
            }
        }
        if let Some(r) = record {
            shared.taken.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = dest.write_all(&r) {
                return fail(e);
            }
        }
    }
    if let Err(e) = dest.flush() {
        fail(e);
    }
}
