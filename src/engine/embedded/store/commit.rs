//! Group commit (`engine.fsync = "batch"`): writes from every connection go to one writer
//! thread, which gathers what arrives within `engine.fsync_max_delay` of the first, applies it
//! as one fjall batch, makes it durable with one fsync, and then answers every writer. Callers
//! await their answer; nothing blocks a tokio worker on the disk. `"always"` writes and syncs
//! each request alone; `"never"` leaves syncing to the OS.
//!
//! A failed write (a full disk, an I/O error) leaves the storage engine refusing every later
//! one: fjall poisons its database, since it no longer knows what reached the disk. The writer
//! then answers every write with that failure — persistent publishes are refused, nothing is
//! confirmed — and keeps the writes nobody awaits (acks, expiries, redelivery marks), which
//! must not be lost with it. Once the disk has room again it reopens the database (recovery
//! reads back everything synced and cuts the failed write's torn tail), applies what it kept,
//! and carries on.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use fjall::PersistMode;
use tokio::sync::oneshot;

use super::StoreError;
use super::tables::{Current, Space, Tables, db_error};
use crate::config::Fsync;

/// One change.
pub enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Remove(Space, Vec<u8>),
    /// Every key (under the prefix, if any) the predicate picks, as the keyspace stands when
    /// this op applies — after every earlier write, so nothing written before it is missed.
    RemoveWhere(Space, Option<Vec<u8>>, KeyFilter),
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Put(_, k, v) => k.len() + v.len(),
            Op::Remove(_, k) => k.len(),
            Op::RemoveWhere(_, p, _) => p.as_ref().map_or(0, Vec::len),
        }
    }
}

/// Which keys a [`Op::RemoveWhere`] removes.
pub type KeyFilter = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

enum Request {
    Write(Write),
    /// Apply everything sent before, then end; answered once the writer has let go of the
    /// tables.
    Stop(oneshot::Sender<()>),
}

struct Write {
    ops: Vec<Op>,
    /// `None`: nobody awaits this write. A failed write nobody hears of (this, or an awaited
    /// one whose caller went away) is applied once the store is reopened.
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// At most this many requests in one batch, so one batch's latency stays bounded under load.
const MAX_BATCH: usize = 4096;

/// After a failure, how long before reopening is tried first, and at most between tries.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(16);

/// Free space below which reopening is not tried (it would only fail again, and every
/// reopening makes reads wait), besides what the kept writes take.
const ROOM: u64 = 4 * 1024 * 1024;

/// Kept writes beyond this are given up (logged): a removal lost this way brings an acked
/// message back after the next restart, never loses one.
const MAX_OWED_BYTES: usize = 64 * 1024 * 1024;

pub struct Committer {
    tx: mpsc::Sender<Request>,
    batches: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the writer thread over the tables of `current`, which are in `path`; it ends when
    /// the committer is dropped.
    pub fn start(
        current: Arc<Current>,
        path: PathBuf,
        fsync: Fsync,
        max_delay: Duration,
    ) -> Result<Committer, StoreError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        let writer = Writer {
            current,
            path,
            fsync,
            failed: None,
        };
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || {
                // `run` consumes the writer: its tables are let go of before the stop is
                // answered.
                if let Some(stopped) = writer.run(max_delay, &rx, &counted) {
                    let _ = stopped.send(());
                }
            })
            .map_err(|e| StoreError(format!("cannot start the store's writer: {e}")))?;
        Ok(Committer { tx, batches })
    }

    /// Applies `ops` (in order, after every request submitted before) and resolves once they
    /// are durable as `engine.fsync` says. The place in the order is taken at the call.
    pub fn write(
        &self,
        ops: Vec<Op>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, answer) = oneshot::channel();
        let sent = self.tx.send(Request::Write(Write {
            ops,
            done: Some(done),
        }));
        async move {
            sent.map_err(|_| StoreError("the store's writer has stopped".into()))?;
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError("the store's writer has stopped".into())))
        }
    }

    /// Applies `ops` in order, after every request submitted before, with nobody waiting: a
    /// write the store cannot make now (after a failure) is made once it is reopened.
    pub fn detach(&self, ops: Vec<Op>) {
        if self
            .tx
            .send(Request::Write(Write { ops, done: None }))
            .is_err()
        {
            tracing::error!("store write lost: the store's writer has stopped");
        }
    }

    /// Applies every request sent before, then stops the writer; resolves once it has let go
    /// of the tables. Later writes fail.
    pub fn stop(&self) -> impl Future<Output = ()> + Send + 'static {
        let (stopped, heard) = oneshot::channel();
        let sent = self.tx.send(Request::Stop(stopped)).is_ok();
        async move {
            if sent {
                let _ = heard.await;
            }
        }
    }

    /// Batches committed so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

/// Puts a write into `requests`, or hands back a stop.
fn take(requests: &mut Vec<Write>, request: Request) -> Option<oneshot::Sender<()>> {
    match request {
        Request::Write(w) => {
            requests.push(w);
            None
        }
        Request::Stop(stopped) => Some(stopped),
    }
}

/// The writer thread's state.
struct Writer {
    current: Arc<Current>,
    path: PathBuf,
    fsync: Fsync,
    failed: Option<Failed>,
}

/// Since a write failed, until the store is reopened.
struct Failed {
    cause: StoreError,
    /// Writes nobody awaited, in order: applied first once reopened.
    owed: Vec<Op>,
    owed_bytes: usize,
    /// Kept writes given up past `MAX_OWED_BYTES`.
    given_up: usize,
    next_try: Instant,
    backoff: Duration,
}

impl Failed {
    fn owe(&mut self, ops: impl IntoIterator<Item = Op>) {
        for op in ops {
            if self.owed_bytes + op.bytes() > MAX_OWED_BYTES {
                self.given_up += 1;
                continue;
            }
            self.owed_bytes += op.bytes();
            self.owed.push(op);
        }
    }
}

impl Writer {
    /// Commits until every committer is gone (`None`) or one asks to stop (its answer, to be
    /// sent once the writer is dropped).
    fn run(
        mut self,
        max_delay: Duration,
        rx: &mpsc::Receiver<Request>,
        batches: &AtomicU64,
    ) -> Option<oneshot::Sender<()>> {
        // How many requests the last batch held: the writers likely to come back together.
        let mut expected = 1;
        loop {
            let first = match &self.failed {
                None => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => return None,
                },
                // While failed, wake up to try reopening even when nothing is written.
                Some(f) => {
                    match rx.recv_timeout(f.next_try.saturating_duration_since(Instant::now())) {
                        Ok(r) => Some(r),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return None,
                    }
                }
            };
            self.reopen_when_due();
            let Some(first) = first else { continue };
            let mut requests = Vec::with_capacity(1);
            // A stop ends the batch: nothing after it is taken.
            let mut stop = take(&mut requests, first);
            // Whatever queued while the last batch was syncing joins this one, at no wait.
            while stop.is_none() && requests.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => stop = take(&mut requests, r),
                    Err(_) => break,
                }
            }
            // Writers answered together come back together: wait for as many as the last batch
            // held, never longer than `max_delay`. A lone writer never waits.
            if stop.is_none() && self.fsync == Fsync::Batch && requests.len() < expected {
                let deadline = Instant::now() + max_delay;
                while stop.is_none() && requests.len() < expected.min(MAX_BATCH) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(r) => stop = take(&mut requests, r),
                        Err(_) => break,
                    }
                }
            }
            if !requests.is_empty() {
                expected = requests.len();
                let result = self.commit(&requests);
                batches.fetch_add(1, Ordering::Relaxed);
                for r in requests {
                    let heard = r.done.is_some_and(|done| done.send(result.clone()).is_ok());
                    if !heard && let Some(failed) = &mut self.failed {
                        failed.owe(r.ops);
                    }
                }
            }
            if stop.is_some() {
                if let Some(failed) = &self.failed
                    && !failed.owed.is_empty()
                {
                    tracing::error!(
                        writes = failed.owed.len(),
                        "store stopped while failed: writes nobody awaited (acks, expiries, \
                         redelivery marks) are lost; acked messages may come back"
                    );
                }
                return stop;
            }
        }
    }

    /// Applies every request's ops as one batch (the failure at once while failed).
    fn commit(&mut self, requests: &[Write]) -> Result<(), StoreError> {
        if let Some(failed) = &self.failed {
            return Err(failed.cause.clone());
        }
        let result = self.current.read().and_then(|tables| {
            apply(
                &tables,
                self.fsync,
                requests.iter().flat_map(|r| r.ops.iter()),
            )
        });
        if let Err(e) = &result {
            tracing::error!(error = %e, "store write failed: persistent publishes and durable topology changes are refused until the store is reopened, which is tried once the disk has room");
            metrics::gauge!(crate::metrics::STORE_FAILED).set(1.0);
            self.failed = Some(Failed {
                cause: e.clone(),
                owed: Vec::new(),
                owed_bytes: 0,
                given_up: 0,
                next_try: Instant::now() + RETRY_FIRST,
                backoff: RETRY_FIRST,
            });
        }
        result
    }

    fn reopen_when_due(&mut self) {
        let Some(failed) = &mut self.failed else {
            return;
        };
        if Instant::now() < failed.next_try {
            return;
        }
        match reopen(&self.current, &self.path, failed) {
            Ok(()) => {
                tracing::info!(
                    kept_writes = failed.owed.len(),
                    given_up = failed.given_up,
                    "store reopened after its write failure; writes accepted again"
                );
                metrics::gauge!(crate::metrics::STORE_FAILED).set(0.0);
                self.failed = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "store not reopened yet");
                failed.backoff = (failed.backoff * 2).min(RETRY_MAX);
                failed.next_try = Instant::now() + failed.backoff;
            }
        }
    }
}

/// Reopens the store once its disk has room and applies `failed`'s kept writes; a write that
/// fails again leaves it to the next try.
fn reopen(current: &Current, path: &std::path::Path, failed: &Failed) -> Result<(), StoreError> {
    let free = super::free_bytes(path).map_err(|e| StoreError(format!("free space: {e}")))?;
    if free < ROOM + failed.owed_bytes as u64 {
        return Err(StoreError(format!("{free} bytes free")));
    }
    current.reopen(path)?;
    let tables = current.read()?;
    let stamp = crate::engine::embedded::now_ms().to_be_bytes().to_vec();
    let probe = Op::Put(Space::Maintenance, b"reopened".to_vec(), stamp);
    // Synced whatever `engine.fsync` says: the reopened store must show it can write.
    apply(&tables, Fsync::Always, failed.owed.iter().chain([&probe]))
}

/// Applies `ops` as one batch, then syncs as `fsync` says (outside the writer too: recovery's
/// clean-up runs before any client writes). The storage engine copies what it is given, so the
/// ops stay with their requests: a failed one can be applied again.
pub fn apply<'a>(
    tables: &Tables,
    fsync: Fsync,
    ops: impl IntoIterator<Item = &'a Op>,
) -> Result<(), StoreError> {
    let db = &tables.db;
    let mut batch = db.batch();
    for op in ops {
        match op {
            Op::Put(space, k, v) => batch.insert(tables.get(*space), k.as_slice(), v.as_slice()),
            Op::Remove(space, k) => batch.remove(tables.get(*space), k.as_slice()),
            Op::RemoveWhere(space, prefix, pick) => {
                let ks = tables.get(*space);
                // What is batched so far must be visible to the scan.
                std::mem::replace(&mut batch, db.batch())
                    .commit()
                    .map_err(db_error)?;
                let keys = match &prefix {
                    Some(p) => ks.prefix(p),
                    None => ks.iter(),
                };
                for item in keys {
                    let key = item.key().map_err(db_error)?;
                    if pick(&key) {
                        batch.remove(ks, key);
                    }
                }
            }
        }
    }
    batch.commit().map_err(db_error)?;
    sync(tables, fsync)
}

/// Makes what was written durable as `engine.fsync` says (for every write of the store).
pub fn sync(tables: &Tables, fsync: Fsync) -> Result<(), StoreError> {
    match fsync {
        Fsync::Never => Ok(()),
        Fsync::Batch | Fsync::Always => tables.db.persist(PersistMode::SyncAll).map_err(db_error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_fsyncs_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let current = Current::new(Tables::open(dir.path()).unwrap());
        let committer = Arc::new(
            Committer::start(
                current.clone(),
                dir.path().into(),
                Fsync::Batch,
                Duration::from_millis(5),
            )
            .unwrap(),
        );
        let t = Space::Messages;
        let writes: Vec<_> = (0..200u32)
            .map(|i| {
                let op = Op::Put(t, i.to_be_bytes().to_vec(), b"v".to_vec());
                tokio::spawn(committer.write(vec![op]))
            })
            .collect();
        for w in writes {
            w.await.unwrap().unwrap();
        }
        assert_eq!(current.read().unwrap().get(t).len().unwrap(), 200);
        let batches = committer.batches();
        assert!(batches < 200, "200 writes took {batches} fsyncs");
        // Later requests apply after earlier ones: put then remove leaves nothing.
        let put = committer.write(vec![Op::Put(t, b"k".to_vec(), b"1".to_vec())]);
        let remove = committer.write(vec![Op::Remove(t, b"k".to_vec())]);
        put.await.unwrap();
        remove.await.unwrap();
        assert!(current.read().unwrap().get(t).get(b"k").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_stop_applies_what_came_before_and_refuses_what_comes_after() {
        let dir = tempfile::tempdir().unwrap();
        let current = Current::new(Tables::open(dir.path()).unwrap());
        let committer = Committer::start(
            current.clone(),
            dir.path().into(),
            Fsync::Batch,
            Duration::ZERO,
        )
        .unwrap();
        let t = Space::Messages;
        committer.detach(vec![Op::Put(t, b"before".to_vec(), b"1".to_vec())]);
        let awaited = committer.write(vec![Op::Put(t, b"awaited".to_vec(), b"1".to_vec())]);
        let stopped = committer.stop();
        let after = committer.write(vec![Op::Put(t, b"after".to_vec(), b"1".to_vec())]);
        stopped.await;
        awaited.await.unwrap();
        assert!(after.await.is_err(), "written after the stop");
        let tables = current.read().unwrap();
        let keys = [&b"before"[..], b"awaited", b"after"];
        let found = keys.map(|k| tables.get(t).get(k).unwrap().is_some());
        assert_eq!(found, [true, true, false]);
        drop(tables);
        current.close();
        let closed = current.read().err().map(|e| e.to_string());
        assert!(
            closed.is_some_and(|e| e.contains("stopping")),
            "closed for good"
        );
        // fjall let go of its directory: it opens again.
        Tables::open(dir.path()).unwrap();
    }
}
