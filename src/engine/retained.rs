//! Retained messages behind the engine (DESIGN.md §1, §3): the last retained message per
//! routing key, kept whole — body and every property — with its expiry honoured; found by AMQP
//! topic pattern. State that every gateway instance must share lives here, never in an
//! adapter: the embedded engine keeps it in-process (on disk with the durability work), an
//! upstream engine in the stream `amqp-gateway.retained`. Protocol-neutral: the MQTT adapter
//! maps topics and filters to keys and patterns, and reads the publish QoS from the message's
//! own header.

use std::time::Duration;

use async_trait::async_trait;

use super::{EngineError, Message};

/// One retained message as a new subscription receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct RetainedMessage {
    pub routing_key: String,
    /// As it was published, properties and all.
    pub message: Message,
    /// Time left before its expiration, `None` when it has none.
    pub expires_in: Option<Duration>,
}

/// What a `set` replaced, to put back if the publish it belongs to is refused: opaque, each
/// engine keeps in it what its own store needs (the trait's types carry no engine bookkeeping).
pub struct RetainedUndo(Box<dyn std::any::Any + Send>);

impl RetainedUndo {
    pub fn new<T: Send + 'static>(engine_state: T) -> RetainedUndo {
        RetainedUndo(Box::new(engine_state))
    }

    /// The engine's own state back; `None` if another engine made it.
    pub fn into_inner<T: 'static>(self) -> Option<T> {
        self.0.downcast().ok().map(|b| *b)
    }
}

impl std::fmt::Debug for RetainedUndo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetainedUndo")
    }
}

#[async_trait]
pub trait RetainedStore: Send + Sync {
    /// Stores the retained message of `routing_key` (an empty body deletes it). Called before
    /// the message itself is published, so whoever sees the live copy and then subscribes
    /// finds the retained one. `ResourceLimit`-like refusals come back as
    /// [`EngineError::Rejected`] (the store is full).
    async fn set(&self, routing_key: &str, message: Message) -> Result<RetainedUndo, EngineError>;

    /// Puts back what a `set` replaced, unless another `set` of the key came since.
    async fn undo(&self, routing_key: &str, undo: RetainedUndo);

    /// The live retained messages whose key `pattern` (an AMQP topic binding key) matches, in
    /// key order; expired ones are dropped on the way.
    fn matching(&self, pattern: &str) -> Vec<RetainedMessage>;
}
