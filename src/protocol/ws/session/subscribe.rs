//! Subscriptions: a `subscribe` resolved to its target (`protocol::subscription`, shared with
//! SSE), its delivery mode, and how subscriptions end (unsubscribe, cancel, takeover, ack
//! timeout).

use super::*;

impl WsSession {
    fn subscriber(&self) -> Subscriber<'_> {
        Subscriber {
            ctx: &self.ctx,
            channel: self.channel.as_ref(),
            principal: &self.principal,
            conn: self.conn.id,
        }
    }

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
        let spec = Spec {
            exchange: s.exchange.as_deref(),
            binding_key: s.binding_key.as_deref(),
            queue: s.queue.as_deref(),
            durable: s.durable.as_deref(),
            arguments: s.arguments.as_ref(),
        };
        let target = self.subscriber().target(&spec).await?;
        let manual = s.ack.unwrap_or(AckKind::Auto) == AckKind::Manual;
        let mode = match &target {
            _ if manual => Mode::Manual,
            Target::Private { .. } => Mode::NoAck(match s.overflow {
                None | Some(OverflowKind::DropOldest) => Overflow::DropOldest,
                Some(OverflowKind::Disconnect) => Overflow::Disconnect,
            }),
            Target::Named { .. } | Target::Durable { .. } => Mode::Window,
        };
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
            exclusive: target.exclusive(),
            arguments: FieldTable::new(),
            // Only no-ack deliveries wait in the droppable part of the buffer; the other modes
            // are bounded by credit.
            pressure: matches!(mode, Mode::NoAck(_)).then(|| self.out.pressure().clone()),
        };
        let consumer = self
            .subscriber()
            .consume(&target, options, &self.takeover_tx)
            .await?;
        let sub: Arc<str> = format!("s{}", self.next_sub).into();
        self.next_sub += 1;
        // `subscribed` is queued before the consumer is polled: it precedes every message.
        self.reply(frames::subscribed(id, &sub, target.queue()));
        self.subs.insert(
            sub.clone(),
            Box::new(Sub {
                target,
                mode,
                prefetch: (mode == Mode::Manual).then_some(prefetch),
                next_tag: 1,
                unacked: BTreeMap::new(),
            }),
        );
        if self.consumers.is_empty() {
            // Most browsers hold one subscription: room for exactly one, where the `Vec`
            // underneath would grow to four on its first push.
            self.consumers = StreamMap::with_capacity(1);
        }
        self.consumers.insert(sub, consumer);
        self.show_subscriptions();
        Ok(Outcome::Continue)
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
        if let Some(consumer) = self.consumers.remove(sub) {
            self.subscriber().cancel(consumer).await;
        }
        self.out.forget(sub);
        if let Some(s) = self.subs.remove(sub) {
            self.subscriber().end(&s.target, delete_durable).await;
            self.show_subscriptions();
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
            .filter(|(_, s)| {
                let oldest = s.unacked.first_key_value();
                oldest.is_some_and(|(_, (_, at))| at.elapsed() >= limit)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for sub in late {
            self.cancel(&sub, "ack_timeout").await;
        }
    }
}
