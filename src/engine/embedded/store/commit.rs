//! Group commit (`engine.fsync = "batch"`): writes from every connection go to one writer
//! thread, which gathers what arrives within `engine.fsync_max_delay` of the first, applies it
//! as one fjall batch, makes it durable with one fsync, and then answers every writer. Callers
//! await their answer; nothing blocks a tokio worker on the disk. `"always"` writes and syncs
//! each request alone; `"never"` leaves syncing to the OS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, PersistMode};
use tokio::sync::oneshot;

use super::StoreError;
use crate::config::Fsync;

/// One change.
pub enum Op {
    Put(Keyspace, Vec<u8>, Vec<u8>),
    Remove(Keyspace, Vec<u8>),
    /// Every key (under the prefix, if any) the predicate picks, as the keyspace stands when
    /// this op applies — after every earlier write, so nothing written before it is missed.
    RemoveWhere(Keyspace, Option<Vec<u8>>, KeyFilter),
}

/// Which keys a [`Op::RemoveWhere`] removes.
pub type KeyFilter = Box<dyn Fn(&[u8]) -> bool + Send>;

struct Request {
    ops: Vec<Op>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// At most this many requests in one batch, so one batch's latency stays bounded under load.
const MAX_BATCH: usize = 4096;

pub struct Committer {
    tx: mpsc::Sender<Request>,
    batches: Arc<AtomicU64>,
}

impl Committer {
    /// Starts the writer thread; it ends when the committer is dropped.
    pub fn start(db: Database, fsync: Fsync, max_delay: Duration) -> Result<Committer, StoreError> {
        let (tx, rx) = mpsc::channel::<Request>();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || write_loop(&db, fsync, max_delay, &rx, &counted))
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
        let sent = self.tx.send(Request { ops, done });
        async move {
            sent.map_err(|_| StoreError("the store's writer has stopped".into()))?;
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError("the store's writer has stopped".into())))
        }
    }

    /// Batches committed so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

fn write_loop(
    db: &Database,
    fsync: Fsync,
    max_delay: Duration,
    rx: &mpsc::Receiver<Request>,
    batches: &AtomicU64,
) {
    // How many requests the last batch held: the writers likely to come back together.
    let mut expected = 1;
    while let Ok(first) = rx.recv() {
        let mut requests = vec![first];
        // Whatever queued while the last batch was syncing joins this one, at no wait.
        while requests.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => requests.push(r),
                Err(_) => break,
            }
        }
        // Writers answered together come back together: wait for as many as the last batch
        // held, never longer than `max_delay`. A lone writer never waits.
        if fsync == Fsync::Batch && requests.len() < expected {
            let deadline = Instant::now() + max_delay;
            while requests.len() < expected.min(MAX_BATCH) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
        }
        expected = requests.len();
        let result = commit(db, fsync, &mut requests);
        batches.fetch_add(1, Ordering::Relaxed);
        let mut unheard = 0;
        for r in requests {
            if r.done.send(result.clone()).is_err() {
                unheard += 1;
            }
        }
        // Writes nobody waits for (acks, expiries) must not fail silently.
        if let Err(e) = &result
            && unheard > 0
        {
            tracing::error!(error = %e, writes = unheard, "store write failed");
        }
    }
}

fn commit(db: &Database, fsync: Fsync, requests: &mut [Request]) -> Result<(), StoreError> {
    apply(db, fsync, requests.iter_mut().flat_map(|r| r.ops.drain(..)))
}

/// Applies `ops` as one batch, then syncs as `fsync` says (outside the writer too: recovery's
/// clean-up runs before any client writes).
pub fn apply(
    db: &Database,
    fsync: Fsync,
    ops: impl IntoIterator<Item = Op>,
) -> Result<(), StoreError> {
    let fail = |e: fjall::Error| StoreError(format!("storage engine: {e}"));
    let mut batch = db.batch();
    for op in ops {
        match op {
            Op::Put(ks, k, v) => batch.insert(&ks, k, v),
            Op::Remove(ks, k) => batch.remove(&ks, k),
            Op::RemoveWhere(ks, prefix, pick) => {
                // What is batched so far must be visible to the scan.
                std::mem::replace(&mut batch, db.batch())
                    .commit()
                    .map_err(fail)?;
                let keys = match &prefix {
                    Some(p) => ks.prefix(p),
                    None => ks.iter(),
                };
                for item in keys {
                    let key = item.key().map_err(fail)?;
                    if pick(&key) {
                        batch.remove(&ks, key);
                    }
                }
            }
        }
    }
    batch
        .commit()
        .map_err(|e| StoreError(format!("storage engine: {e}")))?;
    sync(db, fsync)
}

/// Makes what was written durable as `engine.fsync` says (for every write of the store).
pub fn sync(db: &Database, fsync: Fsync) -> Result<(), StoreError> {
    match fsync {
        Fsync::Never => Ok(()),
        Fsync::Batch | Fsync::Always => db
            .persist(PersistMode::SyncAll)
            .map_err(|e| StoreError(format!("storage engine: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::KeyspaceCreateOptions;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_fsyncs_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = db.keyspace("t", KeyspaceCreateOptions::default).unwrap();
        let committer =
            Arc::new(Committer::start(db.clone(), Fsync::Batch, Duration::from_millis(5)).unwrap());
        let writes: Vec<_> = (0..200u32)
            .map(|i| {
                let op = Op::Put(ks.clone(), i.to_be_bytes().to_vec(), b"v".to_vec());
                tokio::spawn(committer.write(vec![op]))
            })
            .collect();
        for w in writes {
            w.await.unwrap().unwrap();
        }
        assert_eq!(ks.len().unwrap(), 200);
        let batches = committer.batches();
        assert!(batches < 200, "200 writes took {batches} fsyncs");
        // Later requests apply after earlier ones: put then remove leaves nothing.
        let put = committer.write(vec![Op::Put(ks.clone(), b"k".to_vec(), b"1".to_vec())]);
        let remove = committer.write(vec![Op::Remove(ks.clone(), b"k".to_vec())]);
        put.await.unwrap();
        remove.await.unwrap();
        assert!(ks.get(b"k").unwrap().is_none());
    }
}
