//! Subscriptions: what a `subscribe` names (an exchange through a private or durable queue, or
//! a named queue), the consumer and its mode, durable takeover, and how subscriptions end
//! (unsubscribe, cancel, takeover, ack timeout).

use super::*;

fn valid_durable_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl WsSession {
    pub(super) async fn subscribe(
        &mut self,
        id: &Value,
        s: frames::Subscribe,
    ) -> Result<Outcome, RequestError> {
        let limits = &self.ctx.config.limits;
        if self.subs.len() >= limits.max_subscriptions {
            return Err(RequestError::new(
                Code::PreconditionFailed,
                format!(
                    "at most {} subscriptions per connection (limits.max_subscriptions)",
                    limits.max_subscriptions
                ),
            ));
        }
        let max_prefetch = u32::from(self.ctx.config.ws.max_prefetch);
        let prefetch = s.prefetch.unwrap_or(DEFAULT_PREFETCH);
        if !(1..=max_prefetch).contains(&prefetch) {
            return Err(RequestError::new(
                Code::BadRequest,
                format!("prefetch must be between 1 and {max_prefetch}"),
            ));
        }
        let (target, mode, exclusive) = self.target(&s).await?;
        let ack = match mode {
            Mode::Manual => AckMode::Manual {
                prefetch: prefetch.min(65_535) as u16,
            },
            Mode::Window => AckMode::Manual {
                prefetch: self.ctx.config.ws.auto_ack_window,
            },
            Mode::NoAck(_) => AckMode::Auto,
        };
        let options = ConsumeOptions {
            consumer_tag: String::new(),
            ack,
            exclusive,
            arguments: FieldTable::new(),
            // Only no-ack deliveries wait in the droppable part of the buffer; the other modes
            // are bounded by credit.
            pressure: matches!(mode, Mode::NoAck(_)).then(|| self.out.pressure().clone()),
        };
        let consumer = match self.consume(&target, options).await {
            Ok(c) => c,
            Err(e) => {
                if let Target::Private { queue, .. } = &target {
                    let _ = self
                        .channel
                        .delete_queue(queue, DeleteQueueOptions::default())
                        .await;
                }
                return Err(e.into());
            }
        };
        let sub: Arc<str> = format!("s{}", self.next_sub).into();
        self.next_sub += 1;
        if let Target::Durable { queue, .. } = &target {
            self.ctx
                .engine
                .sessions()
                .hold(queue, self.conn.id, self.takeover_tx.clone());
        }
        // `subscribed` is queued before the consumer is polled: it precedes every message.
        self.reply(frames::subscribed(id, &sub, target.queue()));
        self.subs.insert(
            sub.clone(),
            Sub {
                target,
                mode,
                next_tag: 1,
                unacked: BTreeMap::new(),
            },
        );
        self.consumers.insert(sub, consumer);
        Ok(Outcome::Continue)
    }

    /// What a subscribe names, checked against the scopes, with its queue declared (and bound)
    /// when it is the connection's own; the delivery mode; whether its consumer is exclusive.
    async fn target(&self, s: &frames::Subscribe) -> Result<(Target, Mode, bool), RequestError> {
        let manual = s.ack.unwrap_or(AckKind::Auto) == AckKind::Manual;
        let arguments = match &s.arguments {
            None => FieldTable::new(),
            Some(map) => table_from_json(&Value::Object(map.clone()))
                .map_err(|e| RequestError::new(Code::BadRequest, format!("arguments: {e}")))?,
        };
        let (exchange, durable) = match (&s.exchange, &s.queue, &s.durable) {
            (Some(_), Some(_), _) => {
                return Err(RequestError::new(
                    Code::BadRequest,
                    "give an exchange (with binding_key) or a queue, not both",
                ));
            }
            (None, Some(queue), None) => {
                if !self.principal.permissions.can_consume(queue) {
                    return Err(RequestError::new(
                        Code::Forbidden,
                        format!("no consume permission on queue '{queue}'"),
                    ));
                }
                let mode = if manual { Mode::Manual } else { Mode::Window };
                let queue = queue.clone();
                return Ok((Target::Named { queue }, mode, false));
            }
            (None, _, _) => {
                return Err(RequestError::new(
                    Code::BadRequest,
                    "subscribe needs an exchange (with binding_key) or a queue",
                ));
            }
            (Some(exchange), None, durable) => (exchange, durable),
        };
        let binding_key = s.binding_key.clone().unwrap_or_default();
        validate_key(&binding_key)?;
        let exchange = canonical_exchange(exchange).to_owned();
        if exchange.is_empty() {
            return Err(RequestError::new(
                Code::BadRequest,
                "the default exchange routes by queue name: subscribe to the queue instead",
            ));
        }
        if !self.principal.permissions.can_read(&exchange, &binding_key) {
            return Err(RequestError::new(
                Code::Forbidden,
                format!("no read permission on '{exchange}' with binding key '{binding_key}'"),
            ));
        }
        Ok(match durable {
            None => {
                let queue = self
                    .private_queue(&exchange, &binding_key, &arguments)
                    .await?;
                let overflow = match s.overflow.unwrap_or(OverflowKind::DropOldest) {
                    OverflowKind::DropOldest => Overflow::DropOldest,
                    OverflowKind::Disconnect => Overflow::Disconnect,
                };
                let mode = if manual {
                    Mode::Manual
                } else {
                    Mode::NoAck(overflow)
                };
                let target = Target::Private {
                    queue,
                    exchange,
                    binding_key,
                };
                (target, mode, true)
            }
            Some(name) => {
                let queue = self
                    .durable_queue(name, &exchange, &binding_key, &arguments)
                    .await?;
                let mode = if manual { Mode::Manual } else { Mode::Window };
                let target = Target::Durable {
                    queue,
                    exchange,
                    binding_key,
                };
                (target, mode, true)
            }
        })
    }

    pub(super) async fn private_queue(
        &self,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, RequestError> {
        let spec = QueueSpec {
            durable: false,
            exclusive: true,
            auto_delete: false,
            arguments: FieldTable::new(),
        };
        let queue = self.channel.declare_queue("", &spec).await?.name;
        if let Err(e) = self
            .channel
            .bind_queue(&queue, exchange, key, arguments)
            .await
        {
            let _ = self
                .channel
                .delete_queue(&queue, DeleteQueueOptions::default())
                .await;
            return Err(e.into());
        }
        Ok(queue)
    }

    pub(super) async fn durable_queue(
        &self,
        name: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, RequestError> {
        if self.principal.anonymous {
            return Err(RequestError::new(
                Code::Forbidden,
                "durable subscriptions need a token",
            ));
        }
        if !valid_durable_name(name) {
            return Err(RequestError::new(
                Code::BadRequest,
                "durable must be 1–64 characters of [A-Za-z0-9_-]",
            ));
        }
        let queue = format!("ws-{}.{name}", encode_subject(&self.principal.subject));
        if queue.len() > 255 {
            return Err(RequestError::new(
                Code::BadRequest,
                "the subject is too long for a durable subscription name",
            ));
        }
        let mut definition = FieldTable::new();
        definition.insert("exchange".into(), FieldValue::Str(exchange.into()));
        definition.insert("binding_key".into(), FieldValue::Str(key.into()));
        definition.insert("arguments".into(), FieldValue::Table(arguments.clone()));
        let definition = FieldValue::Table(definition);
        let mut args = FieldTable::new();
        args.insert(DURABLE_DEFINITION.into(), definition.clone());
        let expiry_ms = self
            .ctx
            .config
            .ws
            .durable_expiry
            .as_millis()
            .min(u128::from(u32::MAX)) as i64;
        args.insert("x-expires".into(), FieldValue::I64(expiry_ms.max(1)));
        let spec = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        };
        let other = || {
            RequestError::new(
                Code::PreconditionFailed,
                format!(
                    "durable subscription '{name}' exists with another exchange, binding key or arguments"
                ),
            )
        };
        match self.channel.declare_queue(&queue, &spec).await {
            Ok(d) if d.declared == crate::engine::Declared::Created => {}
            // Redeclare equivalence compares only the arguments a broker knows (as RabbitMQ),
            // so the definition is compared here.
            Ok(_) => {
                let info = self.channel.queue_info(&queue).await?;
                // An engine that cannot show arguments (upstream without the management
                // API) cannot have this checked: the subscription is taken as it is.
                if let Some(spec) = &info.spec
                    && spec.arguments.get(DURABLE_DEFINITION) != Some(&definition)
                {
                    return Err(other());
                }
            }
            Err(EngineError::PreconditionFailed(_)) => return Err(other()),
            Err(e) => return Err(e.into()),
        }
        self.channel
            .bind_queue(&queue, exchange, key, arguments)
            .await?;
        Ok(queue)
    }

    /// Consumes; a durable subscription held elsewhere is taken over.
    pub(super) async fn consume(
        &self,
        target: &Target,
        options: ConsumeOptions,
    ) -> Result<Consumer, EngineError> {
        let Target::Durable { queue, .. } = target else {
            return self.channel.consume(target.queue(), options).await;
        };
        // The holder is asked to let go until one answers to it.
        let asked = &std::sync::atomic::AtomicBool::new(false);
        let sessions = &self.ctx.engine.sessions();
        crate::engine::sessions::fenced(
            TAKEOVER_TIMEOUT,
            || self.channel.consume(queue, options.clone()),
            || async move {
                use std::sync::atomic::Ordering::Relaxed;
                if !asked.load(Relaxed) {
                    asked.store(sessions.take_over(queue).await, Relaxed);
                }
            },
        )
        .await
    }

    pub(super) async fn unsubscribe(
        &mut self,
        id: &Value,
        sub: &str,
        delete: bool,
    ) -> Result<Outcome, RequestError> {
        let Some((key, _)) = self.subs.get_key_value(sub) else {
            return Err(RequestError::new(
                Code::PreconditionFailed,
                format!("no subscription '{sub}'"),
            ));
        };
        let key = key.clone();
        self.end(&key, delete).await;
        if !id.is_null() {
            self.reply(frames::ok(id));
        }
        Ok(Outcome::Continue)
    }

    /// Ends a subscription: its consumer goes (unacked deliveries return to the queue), a
    /// private queue is deleted, a durable one only when asked.
    pub(super) async fn end(&mut self, sub: &Arc<str>, delete_durable: bool) {
        self.consumers.remove(sub);
        self.out.forget(sub);
        let Some(s) = self.subs.remove(sub) else {
            return;
        };
        match &s.target {
            Target::Private { queue, .. } => {
                let _ = self
                    .channel
                    .delete_queue(queue, DeleteQueueOptions::default())
                    .await;
            }
            Target::Durable { queue, .. } => {
                self.ctx.engine.sessions().release(queue, self.conn.id);
                if delete_durable {
                    let _ = self
                        .channel
                        .delete_queue(queue, DeleteQueueOptions::default())
                        .await;
                }
            }
            Target::Named { .. } => {}
        }
    }

    pub(super) async fn cancel(&mut self, sub: &Arc<str>, reason: &str) {
        self.end(sub, false).await;
        self.reply(frames::cancelled(sub, reason));
    }

    /// Another connection took a durable subscription over.
    pub async fn taken_over(&mut self, t: Takeover) {
        let subs: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| matches!(&s.target, Target::Durable { queue, .. } if *queue == t.key))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in subs {
            self.cancel(&sub, "taken_over").await;
        }
    }

    /// Cancels manual subscriptions with a delivery unacked for longer than `ws.ack_timeout`.
    pub async fn check_ack_timeouts(&mut self) {
        let limit = self.ctx.config.ws.ack_timeout;
        let late: Vec<Arc<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| s.unacked.values().any(|(_, at)| at.elapsed() >= limit))
            .map(|(k, _)| k.clone())
            .collect();
        for sub in late {
            self.cancel(&sub, "ack_timeout").await;
        }
    }
}
