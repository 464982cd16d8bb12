//! How a session ends: the client's DISCONNECT (reason 0x04, a new Session Expiry Interval), a
//! takeover, the end of the connection (state stored or discarded, the place given back), and
//! the will.

use super::*;

impl Session {
    /// The client's DISCONNECT. Reason 0x04 asks for the will; an MQTT 5 Session Expiry
    /// Interval replaces the session's ([MQTT-3.14.2-2]: not after a CONNECT that asked for 0).
    pub(super) async fn disconnect(&mut self, r: u8, session_expiry: Option<u32>) -> Outcome {
        if let Some(secs) = session_expiry {
            if self.client.requested_expiry == 0 && secs != 0 {
                tracing::info!(client = %self.client.id, "DISCONNECT sets a session expiry after CONNECT asked for none");
                // Not a valid DISCONNECT: the connection ends as an unclean one, will and all.
                return Outcome::Close(CloseReason::ProtocolError);
            }
            self.change_expiry(secs).await;
        }
        if r == reason::DISCONNECT_WITH_WILL {
            // Closed by the client, but as if it had not said DISCONNECT: the will goes out.
            return Outcome::Close(CloseReason::ClientDisconnectWithWill);
        }
        Outcome::Close(CloseReason::ClientDisconnect)
    }

    /// A new Session Expiry Interval (capped like CONNECT's): 0 ends the session when the
    /// connection does; otherwise the session's queues take the new `x-expires` in place.
    async fn change_expiry(&mut self, secs: u32) {
        let cap = self.ctx.config.mqtt.max_session_expiry;
        let expiry = Duration::from_secs(u64::from(secs)).min(cap);
        if expiry == self.life.expiry() {
            return;
        }
        if expiry.is_zero() {
            self.life.expiry_ms = 0;
            self.client.clean = true;
            return;
        }
        if self.client.clean {
            // Clean queues are exclusive to this connection; they cannot outlive it.
            return;
        }
        let mut queues = vec![self.queue_name(0), self.queue_name(1)];
        queues.push(self.state_queue());
        for queue in queues {
            match self.channel().set_queue_expiry(&queue, Some(expiry)).await {
                Ok(()) | Err(EngineError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(client = %self.client.id, error = %e, "cannot change the session expiry; keeping the old one");
                    return;
                }
            }
        }
        self.life.set_expiry(expiry);
    }

    /// Another connection of the same subject and client id took the session over.
    pub fn taken_over(&mut self) -> Outcome {
        self.life.will = None;
        Outcome::Close(CloseReason::SessionTakenOver)
    }

    /// The connection ended: publish the will unless the client said DISCONNECT, release the
    /// session. Queues of a clean session go with the channel.
    pub async fn end(&mut self, graceful: bool) {
        self.flush_parked().await;
        if !graceful && let Some(will) = self.life.will.take() {
            self.publish_will(*will).await;
        }
        self.consumers = StreamMap::new();
        // Before the release: a connection taking over waits for it, then reads this state
        // and needs this connection's place.
        if self.client.clean {
            self.discard_stored().await;
        } else {
            self.save_stored().await;
        }
        self.life.admitted = None;
        self.ctx
            .engine
            .sessions()
            .release(&self.life.key, self.conn.id);
    }

    /// The will goes out now, or (MQTT 5) after min(will delay, session expiry) unless the
    /// session connects again first (DESIGN.md §3). Checked against the scopes like a publish.
    async fn publish_will(&mut self, will: Will) {
        let exchange = self.ctx.config.mqtt.exchange.clone();
        let Ok(key) = topic_to_key(&will.topic, self.ctx.config.mqtt.topic_mapping) else {
            return;
        };
        if !self.principal.permissions.can_write(&exchange, &key) {
            metrics::refusal(PROTOCOL, "forbidden");
            return;
        }
        let p = PublishIn {
            topic: will.topic.clone().into(),
            qos: will.qos,
            retain: will.retain,
            packet_id: None,
            payload: will.payload.clone(),
            props: will.props.clone().boxed(),
        };
        let mut message = self.message_of(&p);
        // Not through the publish gate: the will is the server's publish on the client's
        // behalf, checked against the scopes above and never rate limited (as in RabbitMQ).
        crate::context::stamp_subject(&mut message, &self.principal);
        let retained_copy = will.retain.then(|| message.clone());
        let delay = Duration::from_secs(u64::from(will.delay)).min(self.life.expiry());
        let engine = self.ctx.engine.clone();
        let retained = self.retained();
        let publish = async move {
            let Ok(channel) = engine
                .open_channel(&crate::engine::Owner::new(), "mqtt-will")
                .await
            else {
                return;
            };
            // Retained first: whoever sees the live copy and then subscribes finds the retained
            // one (at worst a subscriber in between gets both, never neither).
            if let Some(copy) = retained_copy {
                let _ = retained.set(&key, copy).await;
            }
            let _ = channel
                .publish(&exchange, &key, message, PublishOptions::default())
                .await;
        };
        if delay.is_zero() || self.client.version == Version::V3 {
            publish.await;
            return;
        }
        let sessions = self.ctx.engine.sessions();
        let session = self.life.key.clone();
        let cancelled = sessions.delay_will(&session);
        tokio::spawn(async move {
            tokio::select! {
                _ = cancelled.cancelled() => {}
                _ = tokio::time::sleep(delay) => {
                    sessions.will_done(&session);
                    publish.await;
                }
            }
        });
    }
}
