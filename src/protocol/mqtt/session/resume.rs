//! Clean Start 0: the stored session taken up again — its state, its queues, its
//! subscriptions checked against the current scopes — or, for a clean start, what a previous
//! session left discarded. Also PUBREL again for released QoS 2 deliveries after CONNACK.

use super::*;

impl Session {
    /// Clean Start 0: takes up the session stored under (subject, client id), if there is one,
    /// and returns Session Present. Its subscriptions are checked again against the current
    /// read scopes; what they no longer allow is unbound and counted (DESIGN.md §3).
    pub(super) async fn resume(&mut self) -> Result<bool, EngineError> {
        let mut queues = Vec::new();
        for level in [0u8, 1] {
            if let Ok(info) = self.channel().queue_info(&self.queue_name(level)).await {
                queues.push((level, info));
            }
        }
        let stored = self.load_stored().await;
        if stored.is_none() && queues.is_empty() && !self.stored_exists().await {
            return Ok(false);
        }
        // A resumed session keeps its interval: its queues' `x-expires` cannot change.
        let kept = match &stored {
            Some(s) => Some(s.expiry_secs.saturating_mul(1000)),
            None => queues.iter().find_map(|(_, info)| {
                info.spec
                    .as_ref()?
                    .arguments
                    .get("x-expires")
                    .and_then(FieldValue::as_i128)
                    .and_then(|ms| u64::try_from(ms).ok())
            }),
        };
        if let Some(ms) = kept.filter(|ms| *ms > 0) {
            self.life.expiry_ms = ms;
            self.client.clean = false;
        }
        if self.client.clean {
            // Only a state queue of an unknown format was left: start afresh.
            self.discard_stored().await;
            return Ok(false);
        }
        match stored {
            Some(stored) => {
                self.inflow.qos2 = (!stored.inbound_qos2.is_empty())
                    .then(|| Box::new(stored.inbound_qos2.into_iter().collect()));
                for id in stored.released {
                    self.outflow.inflight.insert(id, Inflight::Released);
                }
                for (id, print) in stored.sent {
                    self.outflow.inflight.reserve(id, print);
                }
                for sub in stored.subscriptions {
                    self.resume_subscription(sub).await;
                }
            }
            // The state was lost (a gateway that died before writing it): the bindings say
            // which filters there were, at their queue's level and without options.
            None => {
                for (level, _) in &queues {
                    self.resume_from_bindings(*level).await;
                }
            }
        }
        // Consumed again even when no subscription uses a queue any more: what it holds for
        // filters the session no longer has is acked and counted at delivery, not left behind.
        for (level, _) in queues {
            self.open_queue(level).await?;
        }
        Ok(true)
    }

    /// Whether `permissions` let this session read what `filter` (possibly shared) selects.
    pub(super) fn may_read(&self, permissions: &crate::auth::Permissions, filter: &str) -> bool {
        let inner = filter
            .strip_prefix("$share/")
            .and_then(|rest| rest.split_once('/').map(|(_, f)| f))
            .unwrap_or(filter);
        filter_to_binding(inner, self.ctx.config.mqtt.topic_mapping)
            .is_ok_and(|b| permissions.can_read(&self.ctx.config.mqtt.exchange, &b))
    }

    /// One stored subscription taken up again (bound and consumed as at SUBSCRIBE, which is
    /// idempotent), or unbound when the scopes no longer allow it.
    pub(super) async fn resume_subscription(&mut self, sub: stored::StoredSub) {
        if !self.may_read(&self.principal.permissions, &sub.filter) {
            tracing::info!(client = %self.client.id, filter = %sub.filter, "stored subscription no longer allowed; removed");
            metrics::refusal(PROTOCOL, "forbidden");
            if !sub.filter.starts_with("$share/")
                && let Ok(binding) =
                    filter_to_binding(&sub.filter, self.ctx.config.mqtt.topic_mapping)
            {
                let _ = self
                    .channel()
                    .unbind_queue(
                        &self.queue_name(sub.qos.min(1)),
                        &self.ctx.config.mqtt.exchange,
                        &binding,
                        &FieldTable::new(),
                    )
                    .await;
            }
            return;
        }
        let code = self.subscribe(vec![sub.to_filter()]).await;
        if code.first().is_none_or(|c| *c > 2) {
            tracing::warn!(client = %self.client.id, filter = %sub.filter, "stored subscription could not be resumed");
        }
    }

    /// Sent right after CONNACK: PUBREL again for outbound QoS 2 messages released before the
    /// last connection ended ([MQTT-4.4.0-1]).
    pub fn after_connack(&mut self) {
        let mut released = self.released_ids();
        released.sort_unstable();
        for packet_id in released {
            self.send(Outbound::PubRel { packet_id });
        }
    }

    /// Outbound QoS 2 packet ids whose PUBREL was sent and whose PUBCOMP has not come.
    pub(super) fn released_ids(&self) -> Vec<u16> {
        self.outflow
            .inflight
            .iter()
            .filter(|(_, s)| matches!(s, Inflight::Released))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The fallback when no stored state exists: filters read back from a queue's bindings,
    /// at that queue's level, without options. What the scopes no longer allow is unbound.
    pub(super) async fn resume_from_bindings(&mut self, level: u8) {
        let queue = self.queue_name(level);
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let mapping = self.ctx.config.mqtt.topic_mapping;
        let Ok(bindings) = self.channel().list_bindings(&queue).await else {
            return;
        };
        for b in bindings.into_iter().filter(|b| b.exchange == exchange) {
            if self
                .principal
                .permissions
                .can_read(&exchange, &b.routing_key)
            {
                let filter = topic::binding_to_filter(&b.routing_key, mapping);
                let opts = SubOpts {
                    granted: level,
                    no_local: false,
                    retain_as_published: false,
                    id: None,
                };
                self.subs.insert(filter, opts);
            } else {
                tracing::info!(client = %self.client.id, binding = %b.routing_key, "stored subscription no longer allowed; removed");
                metrics::refusal(PROTOCOL, "forbidden");
                let _ = self
                    .channel()
                    .unbind_queue(&queue, &exchange, &b.routing_key, &b.arguments)
                    .await;
            }
        }
    }

    /// Clean start: whatever a previous session left goes.
    pub(super) async fn discard_stored(&self) {
        for level in [0u8, 1] {
            let _ = self
                .channel()
                .delete_queue(&self.queue_name(level), Default::default())
                .await;
        }
        self.discard_state().await;
    }
}
