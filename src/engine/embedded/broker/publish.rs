//! The data path: a publish routed through its exchange to its queues (each once), the
//! message wrapped once for all of them, written to the store first when persistent in a
//! durable queue, then enqueued.

use super::*;

/// A channel's last route: the queues its last publish to one exchange with one routing key
/// went to. A publisher mostly publishes to one topic again and again, and looking the
/// exchange up and walking its bindings (a topic trie, a hash per word) were a tenth of a
/// QoS 0 message's instructions (callgrind). Remembered only for exchanges that route by key
/// alone (not headers), and held only while the exchange's count of changes stands: a binding
/// made or removed, a queue or the exchange deleted, and the next publish routes again.
pub(in crate::engine::embedded) struct LastRoute {
    exchange: Arc<Exchange>,
    changes: u64,
    key: Arc<str>,
    targets: Targets,
}

impl LastRoute {
    fn serves(&self, exchange: &str, key: &Arc<str>) -> bool {
        *self.exchange.name == *canonical_exchange(exchange) && self.serves_key(key)
    }

    /// [`Self::serves`] for a publish to the exchange this route is of.
    fn serves_key(&self, key: &Arc<str>) -> bool {
        (Arc::ptr_eq(&self.key, key) || *self.key == **key)
            && self.exchange.changes() == self.changes
    }
}

/// The exchange that routed by the key alone, with its count of changes read before routing:
/// what a [`LastRoute`] is made of.
type RoutedBy = Option<(Arc<Exchange>, u64)>;

/// Where a publish goes: a channel's remembered route, or one routed for it alone.
enum Route<'l> {
    Remembered(&'l LastRoute),
    Once(Targets, Arc<str>),
}

/// What a publish leaves its caller: the outcome, the store write to await (persistent in a
/// durable queue), and the buffers that pace the publisher.
pub(in crate::engine::embedded) type Published = (PublishOutcome, Option<StoreWrite>, Pace);

fn unrouted() -> Published {
    (PublishOutcome { routed: false }, None, Pace::default())
}

impl Broker {
    /// Routes and enqueues at the call; the returned write, when there is one, resolves once
    /// the message is durable in the store (only then may the publish be confirmed).
    pub fn publish<K>(
        &self,
        exchange: &str,
        key: K,
        message: Message,
    ) -> Result<Published, EngineError>
    where
        K: AsRef<str> + Into<Arc<str>>,
    {
        let routing_key = key.as_ref();
        self.check_message(&message)?;
        names::validate_key(routing_key)?;
        let mut targets = Targets::new();
        let (exchange_name, _) = self.route(
            exchange,
            routing_key,
            &message.properties.headers,
            false,
            &mut targets,
        )?;
        // The key is made an `Arc` (when it is not one) only if the message is routed.
        if targets.is_empty() {
            return Ok(unrouted());
        }
        self.enqueue_routed(&targets, exchange_name, key.into(), message)
    }

    /// [`Self::publish`] through the channel's `last` route, which is taken again and
    /// remembered when it does not serve this publish.
    pub fn publish_remembered(
        &self,
        exchange: &str,
        key: Arc<str>,
        message: Message,
        last: &mut Option<Box<LastRoute>>,
    ) -> Result<Published, EngineError> {
        self.check_message(&message)?;
        match self.route_remembered(exchange, &key, &message.properties.headers, last)? {
            Route::Remembered(route) => {
                self.enqueue_routed(&route.targets, route.exchange.name.clone(), key, message)
            }
            Route::Once(targets, name) => self.enqueue_routed(&targets, name, key, message),
        }
    }

    /// [`Self::publish_remembered`] of a run of publishes to one exchange, in order: those
    /// in a row that one route serves are enqueued together, each queue's lock taken once
    /// for them ([`Queue::enqueue_run`]). `each` hears every publish's result, in order. The
    /// run stops after the first publish that paces (its result carries the pace); the rest
    /// stay in `run`.
    pub fn publish_run(
        &self,
        exchange: &str,
        run: &mut Vec<(Arc<str>, Message)>,
        last: &mut Option<Box<LastRoute>>,
        mut each: impl FnMut(Result<Published, EngineError>),
    ) {
        // Drained, not taken apart: the caller's vector keeps its room for the next run.
        let mut all = std::mem::take(run);
        let mut rest = all.drain(..).peekable();
        let mut together = Vec::with_capacity(rest.len());
        let mut untaken = Vec::new();
        while let Some((key, message)) = rest.next() {
            if let Err(e) = self.check_message(&message) {
                each(Err(e));
                continue;
            }
            let route =
                match self.route_remembered(exchange, &key, &message.properties.headers, last) {
                    Ok(Route::Remembered(route)) => route,
                    Ok(Route::Once(targets, name)) => {
                        if self.publish_alone(&targets, name, key, message, &mut each) {
                            break;
                        }
                        continue;
                    }
                    Err(e) => {
                        each(Err(e));
                        continue;
                    }
                };
            if route.targets.iter().any(|q| q.is_durable()) {
                // A durable queue's messages may be written to the store, which is not done
                // under a queue's lock: one by one, as alone.
                let name = route.exchange.name.clone();
                if self.publish_alone(&route.targets, name, key, message, &mut each) {
                    break;
                }
                continue;
            }
            together.push((key, message));
            // The route is of the run's exchange: only the key and the changes are told.
            while let Some(next) = rest.next_if(|(key, message)| {
                route.serves_key(key) && self.check_message(message).is_ok()
            }) {
                together.push(next);
            }
            if self.enqueue_run(
                &route.targets,
                &route.exchange.name,
                &mut together,
                &mut each,
            ) {
                // Paced part-way: what it did not take goes back first.
                untaken.append(&mut together);
                break;
            }
        }
        untaken.extend(rest);
        all.append(&mut untaken);
        *run = all;
    }

    /// A publish of a run enqueued on its own ([`Self::enqueue_routed`]); whether it paced.
    fn publish_alone(
        &self,
        targets: &Targets,
        exchange: Arc<str>,
        key: Arc<str>,
        message: Message,
        each: &mut impl FnMut(Result<Published, EngineError>),
    ) -> bool {
        let published = self.enqueue_routed(targets, exchange, key, message);
        let paced = matches!(&published, Ok((_, _, pace)) if !pace.is_empty());
        each(published);
        paced
    }

    /// The channel's `last` route for a publish with `key`: the one remembered when it
    /// serves, else routed again and remembered, or routed once when the exchange's routes
    /// cannot be remembered.
    fn route_remembered<'l>(
        &self,
        exchange: &str,
        key: &Arc<str>,
        headers: &Headers,
        last: &'l mut Option<Box<LastRoute>>,
    ) -> Result<Route<'l>, EngineError> {
        if last
            .as_deref()
            .is_some_and(|route| route.serves(exchange, key))
        {
            // Taken again here, not from the test: a borrow returned from the test would be
            // held on the path that routes anew as well (NLL's "problem case #3").
            let route = last.as_deref().expect("tested just above");
            return Ok(Route::Remembered(route));
        }
        names::validate_key(key)?;
        let mut targets = Targets::new();
        let (name, routed_by) = self.route(exchange, key, headers, false, &mut targets)?;
        let Some((exchange, changes)) = routed_by else {
            // The default exchange (a map lookup already) or a headers exchange.
            *last = None;
            return Ok(Route::Once(targets, name));
        };
        Ok(Route::Remembered(last.insert(Box::new(LastRoute {
            exchange,
            changes,
            key: key.clone(),
            targets,
        }))))
    }

    /// What every publish is checked for, whatever its route.
    fn check_message(&self, message: &Message) -> Result<(), EngineError> {
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
        Ok(())
    }

    fn enqueue_routed(
        &self,
        targets: &Targets,
        exchange_name: Arc<str>,
        key: Arc<str>,
        message: Message,
    ) -> Result<Published, EngineError> {
        if targets.is_empty() {
            return Ok(unrouted());
        }
        let mut fx = Effects::default();
        let (routed, rejected, write) =
            self.enqueue_all(targets, exchange_name, key, message, &mut fx);
        let pace = std::mem::take(&mut fx.paced);
        self.apply(fx);
        match rejected {
            Some(queue) => Err(EngineError::Rejected(queue.to_string())),
            None => Ok((PublishOutcome { routed }, write, pace)),
        }
    }

    /// The one routing step of publishes and dead letters: the queues `exchange` sends
    /// `routing_key` (and `headers`) to, each once, into `targets`; returns the exchange's
    /// canonical name, and the exchange when the route may be remembered for the key.
    /// Client publishes may not use an internal exchange.
    pub(super) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &Headers,
        internal_ok: bool,
        targets: &mut Targets,
    ) -> Result<(Arc<str>, RoutedBy), EngineError> {
        let exchange = canonical_exchange(exchange);
        let routed = if exchange.is_empty() {
            if let Some(q) = self.queues.get(routing_key) {
                targets.push(q.value().clone());
            }
            (self.default_exchange.clone(), None)
        } else {
            let ex = self.exchange(exchange)?;
            if ex.spec.internal && !internal_ok {
                return Err(EngineError::AccessRefused(format!(
                    "cannot publish to internal exchange '{exchange}'"
                )));
            }
            // Read before the bindings are: a change made meanwhile shows as a later count.
            let changes = ex.changes();
            ex.route(routing_key, headers, targets);
            let name = ex.name.clone();
            (name, ex.routes_by_key().then_some((ex, changes)))
        };
        dedup(targets);
        Ok(routed)
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

    /// [`Self::enqueue_all`] of a run of messages that go to the same `targets`, none of them
    /// durable, taken from the front of `run`: each wrapped as alone, and each queue takes
    /// them under one taking of its lock. The first queue stops after a message that
    /// paces, and the others take what it took; the rest stay in `run`, unwrapped. `each`
    /// hears every message taken, in order, the pace with the last. Returns whether it paced.
    fn enqueue_run(
        &self,
        targets: &Targets,
        exchange: &Arc<str>,
        run: &mut Vec<(Arc<str>, Message)>,
        each: &mut impl FnMut(Result<Published, EngineError>),
    ) -> bool {
        let Some((first, others)) = targets.split_first() else {
            for _ in run.drain(..) {
                each(Ok(unrouted()));
            }
            return false;
        };
        let now = Now::default();
        let mut fx = Effects::default();
        let mut messages = std::mem::take(run).into_iter();
        let mut wrapped: Vec<Wrapped> = Vec::with_capacity(messages.len());
        let mut taken = Vec::with_capacity(messages.len());
        {
            // Wrapped as the first queue takes them: one it does not take is not wrapped.
            let wrapping = messages.by_ref().map(|(routing_key, message)| {
                let envelope = Arc::new(Stored::new(
                    Envelope {
                        exchange: exchange.clone(),
                        routing_key,
                        message,
                    },
                    &self.held,
                    None,
                ));
                wrapped.push(Wrapped {
                    envelope: envelope.clone(),
                    routed: false,
                    rejected: None,
                });
                (envelope, false)
            });
            first.enqueue_run(wrapping, true, &now, &mut fx, |enqueued| {
                taken.push(enqueued)
            });
        }
        run.extend(messages);
        Self::note_enqueued(first, &mut wrapped, taken);
        for queue in others {
            let mut taken = Vec::with_capacity(wrapped.len());
            queue.enqueue_run(
                wrapped.iter().map(|w| (&w.envelope, false)),
                false,
                &now,
                &mut fx,
                |enqueued| taken.push(enqueued),
            );
            Self::note_enqueued(queue, &mut wrapped, taken);
        }
        let mut pace = std::mem::take(&mut fx.paced);
        let paced = !pace.is_empty();
        self.apply(fx);
        let last = wrapped.len().saturating_sub(1);
        for (i, w) in wrapped.into_iter().enumerate() {
            each(match w.rejected {
                Some(queue) => Err(EngineError::Rejected(queue.to_string())),
                None => {
                    let pace = if i == last {
                        std::mem::take(&mut pace)
                    } else {
                        Pace::default()
                    };
                    Ok((PublishOutcome { routed: w.routed }, None, pace))
                }
            });
        }
        paced
    }

    /// What `queue` made of each message of a run, noted on it.
    fn note_enqueued(queue: &Queue, wrapped: &mut [Wrapped], taken: Vec<Enqueued>) {
        for (w, enqueued) in wrapped.iter_mut().zip(taken) {
            match enqueued {
                Enqueued::Taken => w.routed = true,
                Enqueued::Refused => w.rejected = Some(queue.name.clone()),
                Enqueued::Gone => {}
            }
        }
    }
}

/// A message of a run, wrapped for its queues, and what they made of it.
struct Wrapped {
    envelope: Arc<Stored>,
    routed: bool,
    rejected: Option<Arc<str>>,
}
