//! The state of a persistent session that outlives its connection (DESIGN.md §3):
//! subscriptions with their options, the granted expiry interval, and QoS 2 packet-id state.
//! It is the single message of queue `mqtt-session-{sub}.{client_id}` (`x-max-length` 1: each
//! save replaces the last), so it lives wherever the engine keeps messages and needs no store of
//! the adapter's own; upstream, any instance can resume it.
//!
//! When it is written: at CONNECT of a persistent session (which also makes Session Present
//! true for a session without subscriptions), after every SUBSCRIBE / UNSUBSCRIBE, and when the
//! connection ends — the QoS 2 packet ids only then, because a write per QoS 2 message would
//! double its cost while the only way to lose them between writes is the gateway dying, which
//! the engine's in-memory messages do not survive either.

use serde::{Deserialize, Serialize};

use super::*;

/// Bumped on an incompatible change; a stored state of another version is ignored (the
/// session then falls back to its queues' bindings).
const FORMAT: u8 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Stored {
    format: u8,
    /// The granted Session Expiry Interval: a resumed session keeps it.
    pub expiry_secs: u64,
    pub subscriptions: Vec<StoredSub>,
    /// Inbound QoS 2: PUBREC sent, PUBREL awaited. A resend of these is not published again.
    pub inbound_qos2: Vec<u16>,
    /// Outbound QoS 2: PUBREL sent, PUBCOMP awaited. Sent again after CONNACK
    /// ([MQTT-4.4.0-1]).
    pub released: Vec<u16>,
    /// Outbound QoS 2: PUBLISH sent, PUBREC not received, in the order sent, each with its
    /// message's fingerprint (`inflight::fingerprint`): a redelivery of that message goes
    /// under the same packet id ([MQTT-4.4.0-1]). Absent from states written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<(u16, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredSub {
    pub filter: String,
    pub qos: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_local: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retain_as_published: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

impl StoredSub {
    /// As a SUBSCRIBE filter; a resumed subscription is not new, so no retained messages.
    pub fn to_filter(&self) -> Filter {
        Filter {
            filter: self.filter.clone(),
            qos: self.qos,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            retain_handling: 2,
            subscription_id: self.id,
        }
    }
}

impl Session {
    pub(super) fn state_queue(&self) -> String {
        topic::state_queue(self.principal.shared_subject(), &self.client.id)
    }

    fn state_spec(&self) -> QueueSpec {
        let mut arguments = FieldTable::new();
        arguments.insert("x-max-length", FieldValue::I64(1));
        durable_expiring(arguments, self.life.expiry())
    }

    /// Reads the stored state without consuming it (get, then requeue). `None` when there is
    /// none or it cannot be read.
    pub(super) async fn load_stored(&self) -> Option<Stored> {
        let queue = self.state_queue();
        let delivery = self.channel().get(&queue, false).await.ok()??;
        let _ = self
            .channel()
            .nack(delivery.delivery_tag, false, true)
            .await;
        match serde_json::from_slice::<Stored>(delivery.body()) {
            Ok(stored) if stored.format == FORMAT => Some(stored),
            Ok(stored) => {
                tracing::warn!(client = %self.client.id, format = stored.format, "stored session of another format ignored");
                None
            }
            Err(e) => {
                tracing::warn!(client = %self.client.id, error = %e, "stored session unreadable; ignored");
                None
            }
        }
    }

    /// Writes the session's state (persistent sessions only). Failures are logged: the
    /// session goes on, and a later save or the bindings fallback covers it.
    pub(super) async fn save_stored(&self) {
        if self.client.clean {
            return;
        }
        let stored = Stored {
            format: FORMAT,
            expiry_secs: self.life.expiry().as_secs(),
            subscriptions: self
                .subs
                .iter()
                .map(|(filter, o)| StoredSub {
                    filter: filter.to_owned(),
                    qos: o.granted,
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    id: o.id.map(NonZeroU32::get),
                })
                .collect(),
            inbound_qos2: self
                .inflow
                .qos2
                .iter()
                .flat_map(|q| q.iter().copied())
                .collect(),
            released: self.released_ids(),
            sent: self.outflow.inflight.unreceived(),
        };
        let body = match serde_json::to_vec(&stored) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(client = %self.client.id, error = %e, "session state not serialisable");
                return;
            }
        };
        let queue = self.state_queue();
        let mut message = Message::new(body).persistent();
        message.properties_mut().content_type = Some("application/json".into());
        let result = async {
            self.channel()
                .declare_queue(&queue, &self.state_spec())
                .await?;
            self.channel()
                .publish("", &queue, message, PublishOptions::default())
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(client = %self.client.id, error = %e, "session state not saved");
        }
    }

    /// Whether a stored state queue exists (the session was there before this CONNECT).
    pub(super) async fn stored_exists(&self) -> bool {
        self.channel().queue_info(&self.state_queue()).await.is_ok()
    }

    pub(super) async fn discard_state(&self) {
        let _ = self
            .channel()
            .delete_queue(&self.state_queue(), Default::default())
            .await;
    }
}
