//! Typed engine errors carrying AMQP 0-9-1 reply codes; adapters map them to HTTP statuses,
//! WebSocket error codes and MQTT reason codes at their edge.

/// What kind of object an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Exchange,
    Queue,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Exchange => "exchange",
            ObjectKind::Queue => "queue",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// 404 NOT_FOUND
    #[error("no {kind} '{name}'")]
    NotFound { kind: ObjectKind, name: String },
    /// 405 RESOURCE_LOCKED: an exclusive queue of another connection.
    #[error("queue '{0}' is exclusive to another connection")]
    ResourceLocked(String),
    /// 403 ACCESS_REFUSED: a queue with an exclusive consumer, or an exclusive consume on a queue
    /// that has consumers. Takeover logic retries on this one.
    #[error("queue '{0}' has an exclusive consumer")]
    InUse(String),
    /// 406 PRECONDITION_FAILED: redeclare with other flags or arguments, unknown delivery tag,
    /// `if_unused` / `if_empty` not met.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 406 as well on the wire (RabbitMQ answers invalid arguments with PRECONDITION_FAILED), but
    /// a separate variant so HTTP can answer 400 rather than 409.
    #[error("{0}")]
    InvalidArgument(String),
    /// 403 ACCESS_REFUSED: reserved names (`amq.*`), internal exchanges, the default exchange.
    #[error("{0}")]
    AccessRefused(String),
    /// 311 CONTENT_TOO_LARGE
    #[error("message body of {size} bytes exceeds the limit of {limit} bytes")]
    ContentTooLarge { size: usize, limit: usize },
    /// A queue refused the message (`x-overflow = reject-publish`): a publisher nack.
    #[error("queue '{0}' is full and rejects publishes")]
    Rejected(String),
    /// 506 RESOURCE_ERROR: the store could not write (disk full or failing); nothing of the
    /// refused operation is kept.
    #[error("store unavailable: {0}")]
    StoreFailed(String),
    /// 320 CONNECTION_FORCED / upstream unreachable or confirm lost.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// 504 CHANNEL_ERROR: the channel was closed.
    #[error("channel closed")]
    ChannelClosed,
    /// 540 NOT_IMPLEMENTED
    #[error("not supported: {0}")]
    NotSupported(String),
    /// 541 INTERNAL_ERROR
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    /// The AMQP 0-9-1 reply code of the error.
    pub fn reply_code(&self) -> u16 {
        match self {
            EngineError::NotFound { .. } => 404,
            EngineError::ResourceLocked(_) => 405,
            EngineError::InUse(_) | EngineError::AccessRefused(_) => 403,
            EngineError::PreconditionFailed(_) | EngineError::InvalidArgument(_) => 406,
            EngineError::ContentTooLarge { .. } => 311,
            EngineError::Rejected(_) => 406,
            EngineError::StoreFailed(_) => 506,
            EngineError::Unavailable(_) => 320,
            EngineError::ChannelClosed => 504,
            EngineError::NotSupported(_) => 540,
            EngineError::Internal(_) => 541,
        }
    }

    pub(crate) fn exchange_not_found(name: &str) -> Self {
        EngineError::NotFound {
            kind: ObjectKind::Exchange,
            name: name.to_owned(),
        }
    }

    pub(crate) fn queue_not_found(name: &str) -> Self {
        EngineError::NotFound {
            kind: ObjectKind::Queue,
            name: name.to_owned(),
        }
    }
}
