//! The store on disk, in `engine.data_dir`: fjall (an LSM tree with a journal) behind the
//! [`Store`] trait. The directory holds a `FORMAT` marker — a directory written by another
//! format is refused with a clear message rather than misread — and a `LOCK` held while the
//! gateway runs, so a second gateway on the same directory refuses to start.
//!
//! Topology writes are rare and small: each is persisted (`fsync`) before it returns unless
//! `engine.fsync = "never"`. Message writes go through group commit ([`Committer`]).
//!
//! Keyspaces: `exchanges`, `queues`, `bindings` (all key, prefixed by the queue), `retained`
//! (by routing key), `messages` (id → record, each body once) and `queued` (queue + id →
//! flags: one entry per queue holding the message).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::commit::{self, Committer, KeyFilter, Op};
use super::tables::{Current, Space, Tables, db_error as db};
use super::{
    BoxFuture, LoadedMessage, MessageWrite, Snapshot, Store, StoreError, StoreWrite,
    StoredMessages, record,
};
use crate::config::Fsync;
use crate::engine::{BindingInfo, Envelope, ExchangeSpec, Message, QueueSpec};

/// What `FORMAT` says for this version of the store.
const FORMAT: &str = "amqp-gateway store 1\n";

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} {}: {e}", path.display()))
}

pub struct DiskStore {
    /// The storage engine, reopened by the committer after a failed write.
    current: Arc<Current>,
    /// Messages stored now, and removed since the last [`Store::reclaim`] that compacted.
    live: AtomicU64,
    removed: AtomicU64,
    /// Group commit for message writes.
    committer: Committer,
    fsync: Fsync,
    /// Held (locked) until the store is closed.
    lock: parking_lot::Mutex<Option<File>>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore").finish_non_exhaustive()
    }
}

impl DiskStore {
    /// Opens (creating when empty) the store in `dir`; message writes are group-committed
    /// within `max_delay`.
    pub fn open(dir: &Path, fsync: Fsync, max_delay: Duration) -> Result<DiskStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let lock = lock(dir)?;
        check_format(dir)?;
        let path = dir.join("store");
        let tails = journal_tails(&path);
        let current = Current::new(Tables::open(&path)?);
        report_torn(&tails);
        Ok(DiskStore {
            committer: Committer::start(current.clone(), path, fsync, max_delay)?,
            current,
            live: Default::default(),
            removed: Default::default(),
            fsync,
            lock: parking_lot::Mutex::new(Some(lock)),
        })
    }

    /// Hands `ops` to the writer (its place in the order is taken now).
    fn submit(&self, ops: Result<Vec<Op>, StoreError>) -> StoreWrite {
        match ops {
            Ok(ops) => Box::pin(self.committer.write(ops)),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn op(&self, write: &MessageWrite<'_>) -> Result<Op, StoreError> {
        Ok(match *write {
            MessageWrite::Message {
                id,
                envelope,
                published_at_ms,
            } => {
                self.live.fetch_add(1, Ordering::Relaxed);
                Op::Put(
                    Space::Messages,
                    record::message_key(id).to_vec(),
                    record::message(envelope, published_at_ms)?,
                )
            }
            MessageWrite::Enqueue {
                queue,
                id,
                redelivered,
            } => Op::Put(
                Space::Queued,
                record::queued_key(queue, id)?,
                record::queued_value(redelivered),
            ),
            MessageWrite::Dequeue { queue, id } => {
                Op::Remove(Space::Queued, record::queued_key(queue, id)?)
            }
            MessageWrite::Forget { id } => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.removed.fetch_add(1, Ordering::Relaxed);
                Op::Remove(Space::Messages, record::message_key(id).to_vec())
            }
        })
    }
}

/// Where the written data of each journal ends (journals are preallocated with zeros), before
/// the storage engine opens them.
fn journal_tails(store: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(store) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .filter_map(|p| data_end(&p).ok().map(|end| (p, end)))
        .collect()
}

/// The offset after the last non-zero byte of `path`.
fn data_end(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    const CHUNK: u64 = 1 << 20;
    let mut f = File::open(path)?;
    let mut end = f.metadata()?.len();
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let len = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..len])?;
        if let Some(last) = buf[..len].iter().rposition(|&b| b != 0) {
            return Ok(start + last as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// The storage engine cuts a journal's torn or corrupt last batch when it opens it (atomic
/// batches: all of one or nothing). It does so quietly; the operator hears it here. A batch is
/// acknowledged to clients only after its fsync, so a torn one was never confirmed — unless the
/// disk itself lost synced data.
fn report_torn(tails: &[(PathBuf, u64)]) {
    for (path, end) in tails {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        if meta.len() < *end {
            tracing::warn!(
                journal = %path.display(),
                bytes = end - meta.len(),
                "the store's journal ended in a torn or corrupt write; it was cut (its writes \
                 were not applied: messages in it had not been confirmed unless the disk lost \
                 synced data)"
            );
        }
    }
}

/// Takes the directory's lock, or says who cannot have it.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io("cannot open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError(format!(
            "data directory {} is in use by another gateway (engine.data_dir must differ per \
             instance)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io("cannot lock", &path, e)),
    }
}

/// Writes `FORMAT` into a new directory; refuses one written by another format.
fn check_format(dir: &Path) -> Result<(), StoreError> {
    let path: PathBuf = dir.join("FORMAT");
    match File::open(&path) {
        Ok(mut f) => {
            let mut found = String::new();
            f.read_to_string(&mut found)
                .map_err(|e| io("cannot read", &path, e))?;
            if found != FORMAT {
                return Err(StoreError(format!(
                    "data directory {} holds '{}', this gateway reads '{}': use the gateway \
                     that wrote it, or another engine.data_dir",
                    dir.display(),
                    found.trim(),
                    FORMAT.trim()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("store").exists() {
                return Err(StoreError(format!(
                    "data directory {} has a store but no FORMAT marker: refusing to guess",
                    dir.display()
                )));
            }
            let mut f = File::create(&path).map_err(|e| io("cannot create", &path, e))?;
            f.write_all(FORMAT.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| io("cannot write", &path, e))
        }
        Err(e) => Err(io("cannot open", &path, e)),
    }
}

impl Store for DiskStore {
    fn put_exchange(&self, name: &str, spec: &ExchangeSpec) -> StoreWrite {
        let op = record::exchange(spec).map(|r| Op::Put(Space::Exchanges, name.into(), r));
        self.submit(op.map(|op| vec![op]))
    }

    fn delete_exchange(&self, name: &str) -> StoreWrite {
        let exchange = name.to_owned();
        let from_it: KeyFilter =
            Arc::new(move |key| record::binding_from(key).is_ok_and(|b| b.exchange == exchange));
        self.submit(Ok(vec![
            Op::Remove(Space::Exchanges, name.into()),
            Op::RemoveWhere(Space::Bindings, None, from_it),
        ]))
    }

    fn put_queue(&self, name: &str, spec: &QueueSpec) -> StoreWrite {
        let op = record::queue(spec).map(|r| Op::Put(Space::Queues, name.into(), r));
        self.submit(op.map(|op| vec![op]))
    }

    /// The messages themselves go as their entries are dequeued, or at the next start when
    /// nothing refers to them.
    fn delete_queue(&self, name: &str) -> StoreWrite {
        let ops = record::queue_prefix(name).map(|prefix| {
            let all: KeyFilter = Arc::new(|_| true);
            vec![
                Op::Remove(Space::Queues, name.into()),
                Op::RemoveWhere(Space::Bindings, Some(prefix.clone()), all.clone()),
                Op::RemoveWhere(Space::Queued, Some(prefix), all),
            ]
        });
        self.submit(ops)
    }

    fn put_binding(&self, binding: &BindingInfo) -> StoreWrite {
        let op = record::binding_key(binding).map(|k| Op::Put(Space::Bindings, k, vec![]));
        self.submit(op.map(|op| vec![op]))
    }

    fn delete_binding(&self, binding: &BindingInfo) -> StoreWrite {
        let op = record::binding_key(binding).map(|k| Op::Remove(Space::Bindings, k));
        self.submit(op.map(|op| vec![op]))
    }

    fn write_retained(&self, routing_key: &str, message: Option<(&Message, u64)>) -> StoreWrite {
        let key = routing_key.as_bytes().to_vec();
        let op = match message {
            None => Ok(Op::Remove(Space::Retained, key)),
            Some((message, at)) => {
                let envelope = Envelope {
                    exchange: "".into(),
                    routing_key: routing_key.into(),
                    message: message.clone(),
                };
                record::message(&envelope, at).map(|v| Op::Put(Space::Retained, key, v))
            }
        };
        self.submit(op.map(|op| vec![op]))
    }

    fn keeps_messages(&self) -> bool {
        true
    }

    fn write_messages(&self, writes: &[MessageWrite<'_>]) -> StoreWrite {
        self.submit(writes.iter().map(|w| self.op(w)).collect())
    }

    fn write_messages_detached(&self, writes: &[MessageWrite<'_>]) {
        match writes.iter().map(|w| self.op(w)).collect() {
            Ok(ops) => self.committer.detach(ops),
            Err(e) => tracing::error!(error = %e, "store write refused"),
        }
    }

    /// Unreadable records are counted, logged and removed, never fatal: a torn last write is
    /// one the gateway never confirmed.
    fn load_messages(&self, keep_bytes: u64) -> Result<StoredMessages, StoreError> {
        let mut out = StoredMessages::default();
        let mut budget = keep_bytes;
        let mut bad = Vec::new();
        let tables = self.current.read()?;
        for item in tables.get(Space::Messages).iter() {
            let (k, v) = item.into_inner().map_err(db)?;
            match record::message_id(&k).and_then(|id| Ok((id, record::message_from(&v)?))) {
                Ok((id, (envelope, published_at_ms))) => {
                    let size = envelope.message.body.len() as u64;
                    let keep = size <= budget;
                    budget = budget.saturating_sub(size);
                    let loaded = LoadedMessage {
                        published_at_ms,
                        size,
                        expiration: envelope.message.properties.expiration.clone(),
                        envelope: keep.then_some(envelope),
                    };
                    out.messages.insert(id, loaded);
                }
                Err(e) => {
                    tracing::error!(error = %e, "stored message skipped and removed");
                    bad.push(Op::Remove(Space::Messages, k.to_vec()));
                }
            }
        }
        for item in tables.get(Space::Queued).iter() {
            let (k, v) = item.into_inner().map_err(db)?;
            match record::queued_from(&k, &v) {
                Ok(entry) => out.queued.push(entry),
                Err(e) => {
                    tracing::error!(error = %e, "stored queue entry skipped and removed");
                    bad.push(Op::Remove(Space::Queued, k.to_vec()));
                }
            }
        }
        out.unreadable = bad.len();
        self.live
            .store(out.messages.len() as u64, Ordering::Relaxed);
        if !bad.is_empty() {
            commit::apply(&tables, self.fsync, &bad)?;
        }
        Ok(out)
    }

    /// Flushes the message keyspaces' memtables (so the journal holding removed records can
    /// be dropped once it rotates) and compacts them (so removed records leave the tables).
    fn reclaim(&self, urgent: bool) {
        /// Below this many removals a compaction costs more than it gives back.
        const WORTH_IT: u64 = 1_000;
        let removed = self.removed.load(Ordering::Relaxed);
        let live = self.live.load(Ordering::Relaxed);
        // Compaction rewrites what is still stored before it frees anything: only worth it
        // (and, on a nearly full disk, only safe) once as much was removed as is left — on
        // the disk alarm — or most of it otherwise; always once everything was removed.
        let due = if live == 0 {
            removed > 0
        } else if urgent {
            removed >= live
        } else {
            removed >= WORTH_IT && removed >= live.saturating_mul(4)
        };
        if !due {
            return;
        }
        // While the store is closed after a failure there is nothing to compact.
        let Ok(tables) = self.current.read() else {
            return;
        };
        self.removed.fetch_sub(removed, Ordering::Relaxed);
        // Every keyspace's memtable is flushed, so no journal is kept for a few small records
        // of another keyspace (the maintenance stamp below flushes its own); then the message
        // keyspaces drop what was removed.
        for space in Space::ALL.into_iter().filter(|&s| s != Space::Maintenance) {
            if let Err(e) = tables.get(space).rotate_memtable_and_wait() {
                tracing::warn!(error = %e, "store space not reclaimed");
            }
        }
        for space in [Space::Messages, Space::Queued] {
            if let Err(e) = tables.get(space).major_compact() {
                tracing::warn!(error = %e, "store space not reclaimed");
            }
        }
        let stamp = crate::engine::embedded::now_ms().to_be_bytes();
        let maintenance = tables.get(Space::Maintenance);
        if let Err(e) = maintenance
            .insert("reclaimed", stamp)
            .and_then(|()| maintenance.rotate_memtable_and_wait())
        {
            tracing::warn!(error = %e, "store space not reclaimed");
        }
    }

    fn read_message(&self, id: u64) -> Result<Option<Envelope>, StoreError> {
        let tables = self.current.read()?;
        match tables
            .get(Space::Messages)
            .get(record::message_key(id))
            .map_err(db)?
        {
            Some(bytes) => Ok(Some(record::message_from(&bytes)?.0)),
            None => Ok(None),
        }
    }

    fn commits(&self) -> u64 {
        self.committer.batches()
    }

    /// Applies what was sent before, closes the database and unlocks the directory, whoever
    /// still holds this store: another gateway may open it as soon as this resolves.
    fn close(&self) -> BoxFuture<'static, ()> {
        let stopped = self.committer.stop();
        let current = self.current.clone();
        let lock = self.lock.lock().take();
        Box::pin(async move {
            stopped.await;
            current.close();
            drop(lock);
        })
    }

    fn load_retained(&self) -> Result<Vec<(String, Message, u64)>, StoreError> {
        let mut out = Vec::new();
        let tables = self.current.read()?;
        for item in tables.get(Space::Retained).iter() {
            let (k, v) = item.into_inner().map_err(db)?;
            let (envelope, at) = record::message_from(&v)?;
            out.push((utf8(&k, "retained message")?, envelope.message, at));
        }
        Ok(out)
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        let tables = self.current.read()?;
        for item in tables.get(Space::Exchanges).iter() {
            let (k, v) = item.into_inner().map_err(db)?;
            snapshot
                .exchanges
                .push((utf8(&k, "exchange")?, record::exchange_from(&v)?));
        }
        for item in tables.get(Space::Queues).iter() {
            let (k, v) = item.into_inner().map_err(db)?;
            snapshot
                .queues
                .push((utf8(&k, "queue")?, record::queue_from(&v)?));
        }
        for item in tables.get(Space::Bindings).iter() {
            snapshot
                .bindings
                .push(record::binding_from(&item.key().map_err(db)?)?);
        }
        Ok(snapshot)
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| StoreError(format!("a stored {what} name is not UTF-8: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ExchangeKind, FieldValue};

    fn binding(queue: &str, exchange: &str, key: &str) -> BindingInfo {
        BindingInfo {
            exchange: exchange.into(),
            queue: queue.into(),
            routing_key: key.into(),
            arguments: Default::default(),
        }
    }

    #[tokio::test]
    async fn topology_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = crate::engine::FieldTable::new();
        args.insert("x-message-ttl", FieldValue::I32(1000));
        let q = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        };
        {
            let store = DiskStore::open(dir.path(), Fsync::Always, Duration::ZERO).unwrap();
            store
                .put_exchange("ex", &ExchangeSpec::new(ExchangeKind::Topic))
                .await
                .unwrap();
            store
                .put_exchange("gone", &ExchangeSpec::new(ExchangeKind::Fanout))
                .await
                .unwrap();
            store.put_queue("q1", &q).await.unwrap();
            store.put_queue("q2", &q).await.unwrap();
            store
                .put_binding(&binding("q1", "ex", "a.#"))
                .await
                .unwrap();
            store
                .put_binding(&binding("q1", "ex", "a.#"))
                .await
                .unwrap();
            store.put_binding(&binding("q2", "ex", "b")).await.unwrap();
            store.put_binding(&binding("q1", "gone", "")).await.unwrap();
            store
                .put_binding(&binding("q2", "amq.topic", "c"))
                .await
                .unwrap();
            store.delete_exchange("gone").await.unwrap();
            store.delete_queue("q2").await.unwrap();
        }
        let store = DiskStore::open(dir.path(), Fsync::Always, Duration::ZERO).unwrap();
        let s = store.load().unwrap();
        assert_eq!(
            s.exchanges,
            [("ex".to_owned(), ExchangeSpec::new(ExchangeKind::Topic))]
        );
        assert_eq!(s.queues, [("q1".to_owned(), q)]);
        assert_eq!(
            s.bindings,
            [binding("q1", "ex", "a.#")],
            "one binding, none of a deleted exchange or queue"
        );
    }

    #[test]
    fn one_gateway_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = DiskStore::open(dir.path(), Fsync::Never, Duration::ZERO).unwrap();
        let second = DiskStore::open(dir.path(), Fsync::Never, Duration::ZERO).unwrap_err();
        assert!(second.0.contains("in use by another gateway"), "{second}");
        drop(first);
        assert!(DiskStore::open(dir.path(), Fsync::Never, Duration::ZERO).is_ok());
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("FORMAT"), "amqp-gateway store 99\n").unwrap();
        let e = DiskStore::open(dir.path(), Fsync::Never, Duration::ZERO).unwrap_err();
        assert!(e.0.contains("store 99"), "{e}");
    }
}

#[cfg(test)]
mod reclaim_tests {
    use super::*;
    use crate::engine::Message;
    use std::os::unix::fs::MetadataExt;

    fn used(dir: &Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
            let p = e.path();
            total += if p.is_dir() {
                used(&p)
            } else {
                e.metadata().map_or(0, |m| m.blocks() * 512)
            };
        }
        total
    }

    /// Bodies no compression shrinks (xorshift).
    fn noise(len: usize, x: &mut u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drained_store_gives_its_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            std::sync::Arc::new(DiskStore::open(dir.path(), Fsync::Never, Duration::ZERO).unwrap());
        let mut x = 88_172_645_463_325_252u64;
        for id in 0..2048u64 {
            let envelope = Envelope {
                exchange: "".into(),
                routing_key: "q".into(),
                message: Message::new(noise(64 * 1024, &mut x)),
            };
            let writes = [
                MessageWrite::Message {
                    id,
                    envelope: &envelope,
                    published_at_ms: 0,
                },
                MessageWrite::Enqueue {
                    queue: "q",
                    id,
                    redelivered: false,
                },
            ];
            store.write_messages(&writes).await.unwrap();
        }
        let full = used(dir.path());
        for id in 0..2048u64 {
            let writes = [
                MessageWrite::Dequeue { queue: "q", id },
                MessageWrite::Forget { id },
            ];
            store.write_messages(&writes).await.unwrap();
        }
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.reclaim(false))
            .await
            .unwrap();
        let after = used(dir.path());
        assert!(
            after < full / 4,
            "{} MiB stored, {} MiB after the drain",
            full >> 20,
            after >> 20
        );
    }
}
