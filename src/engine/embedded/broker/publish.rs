//! The data path: a publish routed through its exchange to its queues (each once), the
//! message wrapped once for all of them, written to the store first when persistent in a
//! durable queue, then enqueued.

use super::*;

impl Broker {
    /// Routes and enqueues at the call; the returned write, when there is one, resolves once
    /// the message is durable in the store (only then may the publish be confirmed).
    pub fn publish<K>(
        &self,
        exchange: &str,
        key: K,
        message: Message,
    ) -> Result<(PublishOutcome, Option<StoreWrite>, Pace), EngineError>
    where
        K: AsRef<str> + Into<Arc<str>>,
    {
        let routing_key = key.as_ref();
        if message.body.len() > self.max_message_bytes {
            return Err(EngineError::ContentTooLarge {
                size: message.body.len(),
                limit: self.max_message_bytes,
            });
        }
        if let Some(exp) = &message.properties.expiration
            && exp.parse::<u64>().is_err()
        {
            return Err(EngineError::InvalidArgument(format!(
                "expiration must be a non-negative integer of milliseconds, not '{exp}'"
            )));
        }
        names::validate_key(routing_key)?;
        let mut targets = Targets::new();
        let exchange_name = self.route(
            exchange,
            routing_key,
            &message.properties.headers,
            false,
            &mut targets,
        )?;
        if targets.is_empty() {
            return Ok((PublishOutcome { routed: false }, None, Pace::default()));
        }
        let mut fx = Effects::default();
        let (routed, rejected, write) =
            self.enqueue_all(&targets, exchange_name, key.into(), message, &mut fx);
        let pace = std::mem::take(&mut fx.paced);
        self.apply(fx);
        match rejected {
            Some(queue) => Err(EngineError::Rejected(queue.to_string())),
            None => Ok((PublishOutcome { routed }, write, pace)),
        }
    }

    /// The one routing step of publishes and dead letters: the queues `exchange` sends
    /// `routing_key` (and `headers`) to, each once, into `targets`; returns the exchange's
    /// canonical name. Client publishes may not use an internal exchange.
    pub(super) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &FieldTable,
        internal_ok: bool,
        targets: &mut Targets,
    ) -> Result<Arc<str>, EngineError> {
        let exchange = canonical_exchange(exchange);
        let name = if exchange.is_empty() {
            if let Some(q) = self.queues.get(routing_key) {
                targets.push(q.value().clone());
            }
            self.default_exchange.clone()
        } else {
            let ex = self.exchange(exchange)?;
            if ex.spec.internal && !internal_ok {
                return Err(EngineError::AccessRefused(format!(
                    "cannot publish to internal exchange '{exchange}'"
                )));
            }
            ex.route(routing_key, headers, targets);
            ex.name.clone()
        };
        dedup(targets);
        Ok(name)
    }

    /// Wraps the message once (one body and one memory charge for every queue), writes it to
    /// the store when persistent and any target is durable, and enqueues it in each target.
    /// Returns whether any queue took it, which one refused it, if any, and the write.
    pub(super) fn enqueue_all(
        &self,
        targets: &Targets,
        exchange: Arc<str>,
        routing_key: Arc<str>,
        message: Message,
        fx: &mut Effects,
    ) -> (bool, Option<Arc<str>>, Option<StoreWrite>) {
        let disk = self.disk_for(&message, targets);
        let envelope = Arc::new(Stored::new(
            Envelope {
                exchange,
                routing_key,
                message,
            },
            &self.held,
            disk,
        ));
        // Before any consumer can see it: whatever ends an entry writes after this.
        let write = self.write_enqueued(&envelope, targets);
        let keep = write.is_some();
        if keep {
            self.maybe_page();
        }
        let now = Now::default();
        let mut routed = false;
        let mut rejected = None;
        for queue in targets {
            let on_disk = keep && queue.is_durable();
            match queue.enqueue(&envelope, &now, on_disk, fx) {
                Enqueued::Taken => {
                    routed = true;
                    continue;
                }
                Enqueued::Refused => rejected = Some(queue.name.clone()),
                Enqueued::Gone => {}
            }
            if on_disk && let Some(disk) = &envelope.disk {
                fx.more().dequeued.push((queue.name.clone(), disk.clone()));
            }
        }
        (routed, rejected, write)
    }
}
