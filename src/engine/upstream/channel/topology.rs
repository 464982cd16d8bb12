//! What an engine channel asks the broker on pooled channels before or instead of the real
//! operation (existence, exact counts), how a client's queue declaration looks upstream, and
//! the small conversions the channel's topology methods share.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions, QueueDeleteOptions};

use super::Inner;
use crate::engine::upstream::convert::{self, About, short};
use crate::engine::{EngineError, ExchangeKind, FieldTable, FieldValue, QueueSpec};

/// `x-expires` of a queue exclusive to a client: upstream it is a shared queue, so this is
/// how long it outlives a gateway that died without deleting it.
const EXCLUSIVE_EXPIRES_MS: i64 = 60_000;

pub(super) fn lapin_kind(kind: ExchangeKind) -> lapin::ExchangeKind {
    match kind {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
    }
}

pub(super) fn is_not_found(e: &EngineError) -> bool {
    matches!(e, EngineError::NotFound { .. })
}

impl Inner {
    /// Whether the exchange exists, on a pooled channel (a 404 closes only that one).
    pub(super) async fn exchange_exists(&self, name: &str) -> Result<bool, EngineError> {
        let ch = self.shared.pool.take().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match ch
            .exchange_declare(
                short("exchange", name)?,
                lapin::ExchangeKind::Direct,
                options,
                Default::default(),
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => match convert::engine_error(&e, About::Exchange(name)) {
                e if is_not_found(&e) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Passive queue declare on a pooled channel: its ready messages and consumers.
    pub(super) async fn queue_counts(&self, name: &str) -> Result<(u64, u32), EngineError> {
        let ch = self.shared.pool.take().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = ch
            .queue_declare(short("queue", name)?, options, Default::default())
            .await
            .map_err(|e| convert::engine_error(&e, About::Queue(name)))?;
        Ok((q.message_count().into(), q.consumer_count()))
    }

    pub(super) fn upstream_queue_spec(spec: &QueueSpec) -> (QueueDeclareOptions, FieldTable) {
        let mut arguments = spec.arguments.clone();
        if spec.exclusive {
            let asked = arguments
                .get("x-expires")
                .and_then(FieldValue::as_i128)
                .map_or(EXCLUSIVE_EXPIRES_MS, |v| {
                    v.clamp(1, EXCLUSIVE_EXPIRES_MS.into()) as i64
                });
            arguments.insert("x-expires", FieldValue::I64(asked));
        }
        let options = QueueDeclareOptions {
            passive: false,
            durable: spec.durable,
            exclusive: false,
            auto_delete: spec.auto_delete,
            nowait: false,
        };
        (options, arguments)
    }

    pub(super) async fn delete_owned(&self, queues: Vec<String>) {
        for q in queues {
            let Ok(ch) = self.shared.pool.take().await else {
                return;
            };
            let Ok(name) = short("queue", &q) else {
                continue;
            };
            if let Err(e) = ch.queue_delete(name, QueueDeleteOptions::default()).await {
                tracing::debug!(queue = %q, error = %e, "exclusive queue not deleted upstream");
            }
        }
    }
}

/// The `limit` items after `after`, from a list sorted by name.
pub(super) fn page<T>(
    all: Vec<T>,
    after: Option<&str>,
    limit: usize,
    name: impl Fn(&T) -> &String,
) -> Vec<T> {
    all.into_iter()
        .filter(|item| after.is_none_or(|a| name(item).as_str() > a))
        .take(limit)
        .collect()
}
