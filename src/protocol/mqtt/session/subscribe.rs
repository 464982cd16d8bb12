//! SUBSCRIBE and UNSUBSCRIBE: session queues, shared subscriptions, and a resumed session's
//! subscriptions read back from its bindings.

use super::*;

impl Session {
    // ---------- subscribe ----------

    pub(super) async fn subscribe(&mut self, filters: Vec<Filter>) -> Vec<u8> {
        let v5 = self.client.version == Version::V5;
        let fail = |code: u8| if v5 { code } else { 0x80 };
        let mut codes = Vec::with_capacity(filters.len());
        let max = self.ctx.config.limits.max_subscriptions;
        for f in filters {
            if !self.subs.contains_key(&f.filter) && self.subs.len() >= max {
                metrics::refusal(PROTOCOL, "max_subscriptions");
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            if let Some(rest) = f.filter.strip_prefix("$share/") {
                let code = self.subscribe_shared(&f, rest).await;
                codes.push(if code <= 2 { code } else { fail(code) });
                continue;
            }
            let binding = match filter_to_binding(&f.filter, self.ctx.config.mqtt.topic_mapping) {
                Ok(b) => b,
                Err(_) => {
                    codes.push(fail(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            let exchange = self.ctx.config.mqtt.exchange.clone();
            if !self.principal.permissions.can_read(&exchange, &binding) {
                metrics::refusal(PROTOCOL, "forbidden");
                codes.push(fail(reason::NOT_AUTHORIZED));
                continue;
            }
            let granted = f.qos.min(self.max_qos());
            let level = granted.min(1);
            if let Some(old) = self.subs.get(&f.filter).map(|o| o.granted.min(1))
                && old != level
            {
                let _ = self
                    .channel()
                    .unbind_queue(
                        &self.queue_name(old),
                        &exchange,
                        &binding,
                        &FieldTable::new(),
                    )
                    .await;
            }
            let bound = match self.open_queue(level).await {
                Ok(_) => {
                    self.channel()
                        .bind_queue(
                            &self.queue_name(level),
                            &exchange,
                            &binding,
                            &FieldTable::new(),
                        )
                        .await
                }
                Err(e) => Err(e),
            };
            match bound {
                Ok(()) => {
                    let opts = SubOpts {
                        granted,
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                        id: f.subscription_id.and_then(NonZeroU32::new),
                    };
                    self.subs.insert(f.filter, opts);
                    codes.push(granted);
                }
                Err(e) => {
                    tracing::warn!(client = %self.client.id, error = %e, "subscribe failed");
                    codes.push(fail(reason::IMPLEMENTATION_SPECIFIC));
                }
            }
        }
        codes
    }

    /// `$share/{group}/{filter}`: a durable queue per (group, filter) that every member
    /// consumes, competing (DESIGN.md §3). Returns the granted QoS or a v5 reason code.
    pub(super) async fn subscribe_shared(&mut self, f: &Filter, rest: &str) -> u8 {
        if f.no_local {
            // [MQTT-3.8.3-4]: no-local on a shared subscription is a protocol error.
            return reason::PROTOCOL_ERROR;
        }
        let Some((group, inner)) = rest.split_once('/') else {
            return reason::TOPIC_FILTER_INVALID;
        };
        if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
            return reason::TOPIC_FILTER_INVALID;
        }
        let Ok(binding) = filter_to_binding(inner, self.ctx.config.mqtt.topic_mapping) else {
            return reason::TOPIC_FILTER_INVALID;
        };
        let exchange = self.ctx.config.mqtt.exchange.clone();
        if !self.principal.permissions.can_read(&exchange, &binding) {
            metrics::refusal(PROTOCOL, "forbidden");
            return reason::NOT_AUTHORIZED;
        }
        let queue = topic::shared_queue(group, inner);
        let spec = durable_expiring(FieldTable::new(), self.ctx.config.mqtt.max_session_expiry);
        let granted = f.qos.min(self.max_qos());
        let result = async {
            self.channel().declare_queue(&queue, &spec).await?;
            self.channel()
                .bind_queue(&queue, &exchange, &binding, &FieldTable::new())
                .await?;
            if self.consumers.contains_key(f.filter.as_str()) {
                return Ok(());
            }
            let options = ConsumeOptions {
                consumer_tag: String::new(),
                ack: AckMode::Manual {
                    prefetch: self.outflow.inflight_max,
                },
                exclusive: false,
                arguments: FieldTable::new(),
                pressure: None,
            };
            let consumer = self.channel().consume(&queue, options).await?;
            self.consumers.insert(f.filter.as_str().into(), consumer);
            Ok::<(), EngineError>(())
        }
        .await;
        match result {
            Ok(()) => {
                let opts = SubOpts {
                    granted,
                    no_local: false,
                    retain_as_published: false,
                    id: f.subscription_id.and_then(NonZeroU32::new),
                };
                self.subs.insert(f.filter.clone(), opts);
                granted
            }
            Err(e) => {
                tracing::warn!(client = %self.client.id, error = %e, "shared subscribe failed");
                reason::IMPLEMENTATION_SPECIFIC
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, filter: &str) {
        if filter.starts_with("$share/") {
            // The group's queue stays for the other members; our unacked deliveries go back.
            self.consumers.remove(filter);
            self.subs.remove(filter);
            return;
        }
        let Ok(binding) = filter_to_binding(filter, self.ctx.config.mqtt.topic_mapping) else {
            return;
        };
        let exchange = self.ctx.config.mqtt.exchange.clone();
        self.subs.remove(filter);
        // A resumed session does not know the level: unbinding what is not bound is harmless.
        for level in [0u8, 1] {
            let _ = self
                .channel()
                .unbind_queue(
                    &self.queue_name(level),
                    &exchange,
                    &binding,
                    &FieldTable::new(),
                )
                .await;
        }
    }

    /// What operators see of this session's subscriptions (`/v1/connections`).
    /// Tells operators how many QoS 1/2 deliveries await this client's acks.
    pub(crate) fn note_in_flight(&self) {
        self.conn.stats.set_in_flight(self.outflow.inflight.len());
    }

    /// The name of the queue a subscription's deliveries come from: its consumer's
    /// (`consumed`), or worked out as the consumer would have it.
    fn consumed_queue(
        &self,
        consumed: &HashMap<&str, Arc<str>>,
        filter: &str,
        granted: u8,
    ) -> Arc<str> {
        let shared = filter
            .strip_prefix("$share/")
            .and_then(|r| r.split_once('/'));
        let key = match shared {
            Some(_) => filter,
            None => level_key(granted),
        };
        if let Some(name) = consumed.get(key) {
            return name.clone();
        }
        match shared {
            Some((group, inner)) => topic::shared_queue(group, inner).into(),
            None => self.queue_name(granted.min(1)).into(),
        }
    }

    pub(crate) fn show_subscriptions(&self) {
        let Some(registered) = &self.registered else {
            return;
        };
        let exchange = &self.ctx.config.mqtt.exchange;
        let consumed = crate::protocol::subscription::queue_names(&self.consumers);
        let views = self
            .subs
            .iter()
            .map(|(filter, o)| crate::context::SubscriptionView {
                queue: self.consumed_queue(&consumed, filter, o.granted),
                exchange: Some(exchange.as_str().into()),
                pattern: Some(filter.into()),
                ack: ["qos0", "qos1", "qos2"][usize::from(o.granted.min(2))],
                prefetch: None,
            })
            .collect();
        registered.set_subscriptions(views);
    }
}
