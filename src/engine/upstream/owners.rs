//! Which client connection owns which exclusive queue, and how many channels each owner has
//! open (DESIGN.md §1). Upstream the queues are not exclusive (the gateway's connections are
//! not its clients'), so the engine refuses other owners itself, with RabbitMQ's 405, and
//! deletes an owner's queues when its last channel closes. Each queue's declaration and
//! bindings are kept, so a new connection re-declares them ([`Owners::restore`]) when the
//! broker lost them.

use std::collections::HashMap;

use amq_protocol_types::ShortString;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use parking_lot::Mutex;

use super::convert::{self, About};
use super::link::Conns;
use crate::engine::EngineError;

#[derive(Default)]
pub(super) struct Owners {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, Owned>,
    channels: HashMap<u64, usize>,
}

/// An exclusive queue as declared upstream.
#[derive(Clone)]
pub(super) struct Owned {
    owner: u64,
    options: QueueDeclareOptions,
    arguments: FieldTable,
    bindings: Vec<Binding>,
}

#[derive(Clone, PartialEq)]
pub(super) struct Binding {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub arguments: FieldTable,
}

impl Owners {
    pub(super) fn opened(&self, owner: u64) {
        *self.inner.lock().channels.entry(owner).or_default() += 1;
    }

    /// One of `owner`'s channels closed; when it was the last, its queues (to delete).
    pub(super) fn closed(&self, owner: u64) -> Vec<String> {
        let mut inner = self.inner.lock();
        let last = match inner.channels.get_mut(&owner) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if !last {
            return Vec::new();
        }
        inner.channels.remove(&owner);
        let mine: Vec<String> = inner
            .queues
            .iter()
            .filter(|(_, o)| o.owner == owner)
            .map(|(q, _)| q.clone())
            .collect();
        for q in &mine {
            inner.queues.remove(q);
        }
        mine
    }

    /// `ResourceLocked` when another owner holds `queue`.
    pub(super) fn check(&self, queue: &str, owner: u64) -> Result<(), EngineError> {
        match self.inner.lock().queues.get(queue) {
            Some(o) if o.owner != owner => Err(EngineError::ResourceLocked(queue.to_owned())),
            _ => Ok(()),
        }
    }

    pub(super) fn owns(&self, queue: &str, owner: u64) -> bool {
        self.inner
            .lock()
            .queues
            .get(queue)
            .is_some_and(|o| o.owner == owner)
    }

    pub(super) fn is_owned(&self, queue: &str) -> bool {
        self.inner.lock().queues.contains_key(queue)
    }

    /// Records `owner`'s queue as it was declared (a re-declare keeps its bindings).
    pub(super) fn claim(
        &self,
        queue: &str,
        owner: u64,
        options: QueueDeclareOptions,
        arguments: FieldTable,
    ) {
        let mut inner = self.inner.lock();
        let bindings = inner
            .queues
            .remove(queue)
            .map(|o| o.bindings)
            .unwrap_or_default();
        let owned = Owned {
            owner,
            options,
            arguments,
            bindings,
        };
        inner.queues.insert(queue.to_owned(), owned);
    }

    pub(super) fn forget(&self, queue: &str) {
        self.inner.lock().queues.remove(queue);
    }

    /// A binding of an owned queue (others are not the engine's to restore).
    pub(super) fn bound(&self, queue: &str, binding: Binding) {
        if let Some(owned) = self.inner.lock().queues.get_mut(queue)
            && !owned.bindings.contains(&binding)
        {
            owned.bindings.push(binding);
        }
    }

    pub(super) fn unbound(&self, queue: &str, binding: &Binding) {
        if let Some(owned) = self.inner.lock().queues.get_mut(queue) {
            owned.bindings.retain(|b| b != binding);
        }
    }

    /// Declares every owned queue and its bindings again on a new connection: a short outage
    /// left them in place (`x-expires` outlives it), a broker restart did not. A queue that
    /// cannot come back is logged and its consumers see it deleted; only a lost connection
    /// fails the restore.
    pub(super) async fn restore(&self, conns: &Conns) -> Result<(), EngineError> {
        let owned: Vec<(String, Owned)> = {
            let inner = self.inner.lock();
            inner
                .queues
                .iter()
                .map(|(q, o)| (q.clone(), o.clone()))
                .collect()
        };
        let mut restored = 0usize;
        for (queue, owned) in owned {
            let failed = |e: lapin::Error| convert::engine_error(&e, About::Queue(&queue));
            let ch = conns.consuming_channel().await.map_err(failed)?;
            match redeclare(&ch, &queue, &owned).await {
                Ok(()) => restored += 1,
                Err(e) if !convert::is_channel_error(&e) => return Err(failed(e)),
                Err(e) => {
                    tracing::warn!(%queue, error = %e, "an exclusive queue could not be re-declared upstream");
                }
            }
            let _ = ch.close(200, "OK".into()).await;
        }
        if restored > 0 {
            tracing::info!(queues = restored, "exclusive queues re-declared upstream");
        }
        Ok(())
    }
}

async fn redeclare(ch: &lapin::Channel, queue: &str, owned: &Owned) -> lapin::Result<()> {
    // RabbitMQ refuses to declare a name under `amq.` (a server-named queue): it is either
    // still there, bindings and all, or gone for good.
    let options = QueueDeclareOptions {
        passive: queue.starts_with("amq."),
        ..owned.options
    };
    ch.queue_declare(queue.into(), options, owned.arguments.clone())
        .await?;
    if options.passive {
        return Ok(());
    }
    for b in &owned.bindings {
        ch.queue_bind(
            queue.into(),
            b.exchange.clone(),
            b.routing_key.clone(),
            QueueBindOptions::default(),
            b.arguments.clone(),
        )
        .await?;
    }
    Ok(())
}
