//! Where the embedded engine keeps durable state. Routing and queues call the [`Store`] trait
//! and never know what is behind it: [`MemoryStore`] (nothing survives a restart) or
//! [`disk::DiskStore`] (fjall in `engine.data_dir`).
//!
//! Called for durable exchanges, durable non-exclusive queues, and bindings between durable
//! ones. Messages are not yet written, and the engine does not yet open the disk store: see
//! `docs/engine.md` ("Durability").

mod commit;
pub mod disk;
mod record;

use crate::engine::{BindingInfo, EngineError, ExchangeSpec, Message, QueueSpec};

#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Internal(e.to_string())
    }
}

/// Durable topology as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub exchanges: Vec<(String, ExchangeSpec)>,
    pub queues: Vec<(String, QueueSpec)>,
    pub bindings: Vec<BindingInfo>,
}

pub trait Store: Send + Sync + 'static {
    fn put_exchange(&self, name: &str, spec: &ExchangeSpec) -> Result<(), StoreError>;
    fn delete_exchange(&self, name: &str) -> Result<(), StoreError>;
    fn put_queue(&self, name: &str, spec: &QueueSpec) -> Result<(), StoreError>;
    fn delete_queue(&self, name: &str) -> Result<(), StoreError>;
    fn put_binding(&self, binding: &BindingInfo) -> Result<(), StoreError>;
    fn delete_binding(&self, binding: &BindingInfo) -> Result<(), StoreError>;
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// Stores the retained message of `routing_key` (`None` deletes it), published at
    /// `published_at_ms` (wall clock, so its expiry counts across restarts). Ordered after
    /// every earlier call; resolves once durable as `engine.fsync` says.
    fn write_retained(
        &self,
        routing_key: &str,
        message: Option<(&Message, u64)>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;

    /// The retained messages stored: routing key, message, publish time.
    fn load_retained(&self) -> Result<Vec<(String, Message, u64)>, StoreError>;

    /// Group commits made so far (each one fsync; writes per commit say how well they group).
    fn commits(&self) -> u64 {
        0
    }
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Keeps nothing: every durable object lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryStore;

impl Store for MemoryStore {
    fn put_exchange(&self, _: &str, _: &ExchangeSpec) -> Result<(), StoreError> {
        Ok(())
    }
    fn delete_exchange(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_queue(&self, _: &str, _: &QueueSpec) -> Result<(), StoreError> {
        Ok(())
    }
    fn delete_queue(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
    fn put_binding(&self, _: &BindingInfo) -> Result<(), StoreError> {
        Ok(())
    }
    fn delete_binding(&self, _: &BindingInfo) -> Result<(), StoreError> {
        Ok(())
    }
    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }
    fn write_retained(
        &self,
        _: &str,
        _: Option<(&Message, u64)>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn load_retained(&self) -> Result<Vec<(String, Message, u64)>, StoreError> {
        Ok(Vec::new())
    }
}
