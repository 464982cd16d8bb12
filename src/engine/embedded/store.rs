//! Where the embedded engine keeps durable state. Routing and queues call the [`Store`] trait
//! and never know what is behind it: [`MemoryStore`] (nothing survives a restart) or
//! [`disk::DiskStore`] (fjall in `engine.data_dir`).
//!
//! Called for durable exchanges, durable non-exclusive queues, bindings between durable ones,
//! retained messages, and persistent messages (delivery mode 2) in durable queues: each body
//! once, under a stable id, and one index entry per queue holding it. See `docs/engine.md`
//! ("Durability").

mod commit;
pub mod disk;
mod record;
mod tables;

use std::collections::HashMap;

use crate::engine::{BindingInfo, EngineError, Envelope, ExchangeSpec, Message, QueueSpec};

#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// Decodes `value` (and `key`) as the record kind `kind` picks — exchange, queue, binding, queue
/// entry, message — and, when it decodes, encodes it again and checks the round trip. For the
/// fuzz target `store_record`: after a disk fault a store may hold any bytes, and reading them
/// must refuse, never panic.
#[doc(hidden)]
pub fn fuzz_record(kind: u8, key: &[u8], value: &[u8]) {
    match kind % 5 {
        0 => {
            // Compared as bytes: a NaN argument is not equal to itself.
            if let Ok(spec) = record::exchange_from(value) {
                let again = record::exchange(&spec).expect("a decoded exchange encodes");
                let decoded = record::exchange_from(&again).expect("re-encoded decodes");
                assert_eq!(record::exchange(&decoded).ok(), Some(again));
            }
        }
        1 => {
            if let Ok(spec) = record::queue_from(value) {
                let again = record::queue(&spec).expect("a decoded queue encodes");
                let decoded = record::queue_from(&again).expect("re-encoded decodes");
                assert_eq!(record::queue(&decoded).ok(), Some(again));
            }
        }
        2 => {
            let _ = record::binding_from(key);
        }
        3 => {
            let _ = record::queued_from(key, value);
        }
        _ => {
            if let Ok((envelope, at)) = record::message_from(value) {
                let again = record::message(&envelope, at).expect("a decoded message encodes");
                let (decoded, at) = record::message_from(&again).expect("re-encoded decodes");
                assert_eq!(record::message(&decoded, at).ok(), Some(again));
            }
        }
    }
}

/// Bytes available to the gateway on the file system holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::StoreFailed(e.0)
    }
}

/// Durable topology as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub exchanges: Vec<(String, ExchangeSpec)>,
    pub queues: Vec<(String, QueueSpec)>,
    pub bindings: Vec<BindingInfo>,
}

/// One change to the stored messages. Applied in call order, after every earlier write.
#[derive(Debug)]
pub enum MessageWrite<'a> {
    /// The body and properties of message `id`, published at `published_at_ms` (wall clock).
    Message {
        id: u64,
        envelope: &'a Envelope,
        published_at_ms: u64,
    },
    /// Message `id` is in `queue`; `redelivered` once a client may have seen it.
    Enqueue {
        queue: &'a str,
        id: u64,
        redelivered: bool,
    },
    /// Message `id` left `queue` (acked, expired, dropped, dead-lettered, purged).
    Dequeue { queue: &'a str, id: u64 },
    /// No queue holds message `id` any more.
    Forget { id: u64 },
}

/// A stored message as loaded at start: its body kept only while the load's memory budget
/// lasts (the rest stays on disk, paged out).
#[derive(Debug)]
pub struct LoadedMessage {
    /// Wall-clock milliseconds.
    pub published_at_ms: u64,
    pub size: u64,
    /// The per-message TTL, needed for its deadline even when the body stays on disk.
    pub expiration: Option<String>,
    pub envelope: Option<Envelope>,
}

/// The stored messages as loaded at start.
#[derive(Debug, Default)]
pub struct StoredMessages {
    pub messages: HashMap<u64, LoadedMessage>,
    /// (queue, id, redelivered), each queue's entries in the order they were enqueued.
    pub queued: Vec<(String, u64, bool)>,
    /// Records that could not be read (a torn or corrupt write): skipped and removed.
    pub unreadable: usize,
}

/// A write the store has taken its place in the order for; resolves once durable. Dropping it
/// does not withdraw the write (a failure nobody awaits is logged by the store).
pub type StoreWrite = BoxFuture<'static, Result<(), StoreError>>;

/// Topology writes are ordered with every other write at the call and made durable by the same
/// group commit: callers issue them under the topology lock (no I/O: the write is handed to
/// the writer) and await them after releasing it.
pub trait Store: Send + Sync + 'static {
    fn put_exchange(&self, name: &str, spec: &ExchangeSpec) -> StoreWrite;
    /// The exchange and every binding from it.
    fn delete_exchange(&self, name: &str) -> StoreWrite;
    fn put_queue(&self, name: &str, spec: &QueueSpec) -> StoreWrite;
    /// The queue, every binding to it and its message entries.
    fn delete_queue(&self, name: &str) -> StoreWrite;
    fn put_binding(&self, binding: &BindingInfo) -> StoreWrite;
    fn delete_binding(&self, binding: &BindingInfo) -> StoreWrite;
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Stores the retained message of `routing_key` (`None` deletes it), published at
    /// `published_at_ms` (wall clock, so its expiry counts across restarts). Ordered after
    /// every earlier call; resolves once durable as `engine.fsync` says.
    fn write_retained(&self, routing_key: &str, message: Option<(&Message, u64)>) -> StoreWrite;

    /// The retained messages stored: routing key, message, publish time.
    fn load_retained(&self) -> Result<Vec<(String, Message, u64)>, StoreError>;

    /// Whether persistent messages are kept at all (callers skip the work when not).
    fn keeps_messages(&self) -> bool {
        false
    }

    /// Applies `writes` in order, after every earlier call; resolves once durable as
    /// `engine.fsync` says. The order is fixed at the call: a caller that drops the future
    /// still has them applied (a failure is then logged by the store).
    fn write_messages(&self, writes: &[MessageWrite<'_>]) -> StoreWrite;

    /// As [`Store::write_messages`] with nobody awaiting the outcome (acks, expiries,
    /// redelivery marks): writes the store cannot make now, after a failed write, are made
    /// once it is reopened (see `commit.rs`).
    fn write_messages_detached(&self, writes: &[MessageWrite<'_>]) {
        drop(self.write_messages(writes));
    }

    /// Every stored message and queue entry; bodies are kept (in id order, so the oldest,
    /// first to be delivered) up to `keep_bytes`.
    fn load_messages(&self, keep_bytes: u64) -> Result<StoredMessages, StoreError>;

    /// Message `id` as stored (a paged-out body read back); `None` when it is not there.
    fn read_message(&self, _id: u64) -> Result<Option<Envelope>, StoreError> {
        Ok(None)
    }

    /// Gives back disk space that removed messages still hold: when `urgent` (the disk alarm
    /// is up) whenever some were removed since the last time, else once most of what was
    /// stored has been removed (a queue drained). Blocking: called off the runtime's workers,
    /// about once a second.
    fn reclaim(&self, _urgent: bool) {}

    /// Ends the store for good: writes sent before are applied, later ones fail, and its files
    /// are let go of once this resolves.
    fn close(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Group commits made so far (each one fsync; writes per commit say how well they group).
    fn commits(&self) -> u64 {
        0
    }
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Keeps nothing: every durable object lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryStore;

fn done() -> StoreWrite {
    Box::pin(std::future::ready(Ok(())))
}

impl Store for MemoryStore {
    fn put_exchange(&self, _: &str, _: &ExchangeSpec) -> StoreWrite {
        done()
    }
    fn delete_exchange(&self, _: &str) -> StoreWrite {
        done()
    }
    fn put_queue(&self, _: &str, _: &QueueSpec) -> StoreWrite {
        done()
    }
    fn delete_queue(&self, _: &str) -> StoreWrite {
        done()
    }
    fn put_binding(&self, _: &BindingInfo) -> StoreWrite {
        done()
    }
    fn delete_binding(&self, _: &BindingInfo) -> StoreWrite {
        done()
    }
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }
    fn write_retained(&self, _: &str, _: Option<(&Message, u64)>) -> StoreWrite {
        done()
    }
    fn load_retained(&self) -> Result<Vec<(String, Message, u64)>, StoreError> {
        Ok(Vec::new())
    }
    fn write_messages(&self, _: &[MessageWrite<'_>]) -> StoreWrite {
        done()
    }
    fn load_messages(&self, _: u64) -> Result<StoredMessages, StoreError> {
        Ok(StoredMessages::default())
    }
}
