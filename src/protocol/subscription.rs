//! What a browser subscription names (DESIGN.md §4), for the WebSocket and SSE adapters alike:
//! an exchange through a private server-named queue, an exchange through the durable queue
//! `ws-{sub}.{name}`, or a named queue — checked against the caller's scopes, its queue
//! declared and bound, its consumer started (a durable one taken over from its holder, on any
//! instance) and ended. One implementation, so a browser can switch a durable subscription
//! between the two protocols; and the `message` JSON both send.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::auth::Principal;
use crate::auth::scopes::encode_subject;
use crate::codes::Code;
use crate::context::Context;
use crate::engine::names::{DEFAULT_EXCHANGE_ALIAS, canonical_exchange, validate_key};
use crate::engine::sessions::{TakeoverSender, fenced};
use crate::engine::table::{FieldTable, FieldValue, table_from_json};
use crate::engine::{
    Channel, ConsumeOptions, Consumer, Declared, DeleteQueueOptions, Delivery, EngineError,
    OnCancel, QueueSpec,
};
use crate::json::{self, Encoding, PropertiesJson};

/// How long a durable subscribe keeps trying to take the consumer over from its holder.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Records a durable subscription's definition in its queue's arguments; a resume compares it
/// (`precondition_failed` when it differs). Engines compare only the arguments they know on
/// redeclare, as RabbitMQ does, so the adapter checks this one itself.
const DURABLE_DEFINITION: &str = "x-gateway-ws-subscription";

/// What a subscribe request says, whatever its protocol.
#[derive(Debug, Default, Clone, Copy)]
pub struct Spec<'a> {
    pub exchange: Option<&'a str>,
    pub binding_key: Option<&'a str>,
    pub queue: Option<&'a str>,
    pub durable: Option<&'a str>,
    pub arguments: Option<&'a serde_json::Map<String, Value>>,
}

/// What a subscription consumes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A server-named queue of this connection, bound to an exchange.
    Private {
        queue: String,
        exchange: String,
        binding_key: String,
    },
    /// A named queue.
    Named { queue: String },
    /// `ws-{sub}.{name}`, bound to an exchange, resumable.
    Durable {
        queue: String,
        exchange: String,
        binding_key: String,
    },
}

impl Target {
    pub fn queue(&self) -> &str {
        match self {
            Target::Private { queue, .. }
            | Target::Named { queue }
            | Target::Durable { queue, .. } => queue,
        }
    }

    /// Whether its consumer is the queue's only one.
    pub fn exclusive(&self) -> bool {
        !matches!(self, Target::Named { .. })
    }

    /// The exchange and binding key of a private or durable subscription.
    pub fn binding(&self) -> Option<(&str, &str)> {
        match self {
            Target::Private {
                exchange,
                binding_key,
                ..
            }
            | Target::Durable {
                exchange,
                binding_key,
                ..
            } => Some((exchange, binding_key)),
            Target::Named { .. } => None,
        }
    }

    /// Whether `principal`'s scopes (still) allow it.
    pub fn allowed(&self, principal: &Principal) -> bool {
        let p = &principal.permissions;
        match self.binding() {
            Some((exchange, binding_key)) => p.can_read(exchange, binding_key),
            None => p.can_consume(self.queue()),
        }
    }
}

/// A subscribe refused: the shared code (each adapter answers it its way) and why.
#[derive(Debug)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        Refusal::new(Code::from(&e), e.to_string())
    }
}

/// A connection subscribing: what it needs to declare, consume and hold.
pub struct Subscriber<'a> {
    pub ctx: &'a Context,
    pub channel: &'a dyn Channel,
    pub principal: &'a Principal,
    /// The connection's id (the holder of its durable subscriptions).
    pub conn: u64,
}

fn valid_durable_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Subscriber<'_> {
    /// What `spec` names, checked against the scopes, with its queue declared (and bound) when
    /// it is the connection's own.
    pub async fn target(&self, spec: &Spec<'_>) -> Result<Target, Refusal> {
        let arguments = match spec.arguments {
            None => FieldTable::new(),
            Some(map) => table_from_json(&Value::Object(map.clone()))
                .map_err(|e| Refusal::new(Code::BadRequest, format!("arguments: {e}")))?,
        };
        let (exchange, durable) = match (spec.exchange, spec.queue, spec.durable) {
            (Some(_), Some(_), _) => {
                return Err(Refusal::new(
                    Code::BadRequest,
                    "give an exchange (with binding_key) or a queue, not both",
                ));
            }
            (None, Some(queue), None) => {
                if !self.principal.permissions.can_consume(queue) {
                    return Err(Refusal::new(
                        Code::Forbidden,
                        format!("no consume permission on queue '{queue}'"),
                    ));
                }
                let queue = queue.to_owned();
                return Ok(Target::Named { queue });
            }
            (None, _, _) => {
                return Err(Refusal::new(
                    Code::BadRequest,
                    "subscribe needs an exchange (with binding_key) or a queue",
                ));
            }
            (Some(exchange), None, durable) => (exchange, durable),
        };
        let binding_key = spec.binding_key.unwrap_or_default().to_owned();
        validate_key(&binding_key)?;
        let exchange = canonical_exchange(exchange).to_owned();
        if exchange.is_empty() {
            return Err(Refusal::new(
                Code::BadRequest,
                "the default exchange routes by queue name: subscribe to the queue instead",
            ));
        }
        if !self.principal.permissions.can_read(&exchange, &binding_key) {
            return Err(Refusal::new(
                Code::Forbidden,
                format!("no read permission on '{exchange}' with binding key '{binding_key}'"),
            ));
        }
        Ok(match durable {
            None => Target::Private {
                queue: self
                    .private_queue(&exchange, &binding_key, &arguments)
                    .await?,
                exchange,
                binding_key,
            },
            Some(name) => Target::Durable {
                queue: self
                    .durable_queue(name, &exchange, &binding_key, &arguments)
                    .await?,
                exchange,
                binding_key,
            },
        })
    }

    async fn private_queue(
        &self,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, Refusal> {
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

    async fn durable_queue(
        &self,
        name: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> Result<String, Refusal> {
        if self.principal.anonymous {
            return Err(Refusal::new(
                Code::Forbidden,
                "durable subscriptions need a token",
            ));
        }
        if !valid_durable_name(name) {
            return Err(Refusal::new(
                Code::BadRequest,
                "durable must be 1–64 characters of [A-Za-z0-9_-]",
            ));
        }
        let queue = format!("ws-{}.{name}", encode_subject(&self.principal.subject));
        if queue.len() > 255 {
            return Err(Refusal::new(
                Code::BadRequest,
                "the subject is too long for a durable subscription name",
            ));
        }
        let mut definition = FieldTable::new();
        definition.insert("exchange", FieldValue::Str(exchange.into()));
        definition.insert("binding_key", FieldValue::Str(key.into()));
        definition.insert("arguments", FieldValue::Table(Box::new(arguments.clone())));
        let definition = FieldValue::Table(Box::new(definition));
        let mut args = FieldTable::new();
        args.insert(DURABLE_DEFINITION, definition.clone());
        let expiry_ms = self
            .ctx
            .config
            .ws
            .durable_expiry
            .as_millis()
            .min(u128::from(u32::MAX)) as i64;
        args.insert("x-expires", FieldValue::I64(expiry_ms.max(1)));
        let spec = QueueSpec {
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: args,
        };
        let other = || {
            Refusal::new(
                Code::PreconditionFailed,
                format!(
                    "durable subscription '{name}' exists with another exchange, binding key or arguments"
                ),
            )
        };
        match self.channel.declare_queue(&queue, &spec).await {
            Ok(d) if d.declared == Declared::Created => {}
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

    /// Consumes `target`; a durable subscription held elsewhere is taken over, and is held by
    /// this connection from then on (`takeovers` hears when another takes it). A private
    /// queue that cannot be consumed is deleted.
    pub async fn consume(
        &self,
        target: &Target,
        options: ConsumeOptions,
        takeovers: &TakeoverSender,
    ) -> Result<Consumer, EngineError> {
        let consumed = match target {
            Target::Durable { queue, .. } => {
                // The holder is asked to let go until one answers to it.
                let asked = &AtomicBool::new(false);
                let sessions = &self.ctx.engine.sessions();
                fenced(
                    TAKEOVER_TIMEOUT,
                    || self.channel.consume(queue, options.clone()),
                    || async move {
                        if !asked.load(Ordering::Relaxed) {
                            asked.store(sessions.take_over(queue).await, Ordering::Relaxed);
                        }
                    },
                )
                .await
            }
            _ => self.channel.consume(target.queue(), options).await,
        };
        match (&consumed, target) {
            (Ok(_), Target::Durable { queue, .. }) => {
                self.ctx.engine.sessions().hold(
                    queue.as_str().into(),
                    self.conn,
                    takeovers.clone(),
                );
            }
            (Err(_), Target::Private { queue, .. }) => {
                let _ = self
                    .channel
                    .delete_queue(queue, DeleteQueueOptions::default())
                    .await;
            }
            _ => {}
        }
        consumed
    }

    /// Cancels `consumer`, its unacked deliveries back in the queue before this returns (a
    /// dropped consumer requeues too, but later: a client told "unsubscribed" could look
    /// before they are back, and the upstream engine would close the consumer's AMQP channel
    /// from a task of its own, racing the channel's own close).
    pub async fn cancel(&self, consumer: Consumer) {
        let _ = self.channel.cancel(consumer.tag(), OnCancel::Requeue).await;
        drop(consumer);
    }

    /// A subscription's consumer is gone (cancelled: unacked deliveries returned to the
    /// queue): a private queue is deleted, a durable one released, and deleted only when asked.
    pub async fn end(&self, target: &Target, delete_durable: bool) {
        match target {
            Target::Private { queue, .. } => {
                let _ = self
                    .channel
                    .delete_queue(queue, DeleteQueueOptions::default())
                    .await;
            }
            Target::Durable { queue, .. } => {
                self.ctx.engine.sessions().release(queue, self.conn);
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
}

/// The part of the `message` JSON that is the same in every delivery of a message.
#[derive(Serialize)]
struct MessageJson<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    body: Value,
    encoding: Encoding,
    properties: PropertiesJson,
}

/// `{"exchange":…,"properties":{…}}`: parsing a JSON body and escaping it cost more than the
/// rest of a delivery, so fan-out does it once per message (the engine keeps it beside the
/// envelope where deliveries share one).
fn message_tail(d: &Delivery) -> Result<Box<str>, serde_json::Error> {
    let (body, encoding) = json::body_out(d.message());
    let exchange = if d.exchange().is_empty() {
        DEFAULT_EXCHANGE_ALIAS
    } else {
        d.exchange()
    };
    serde_json::to_string(&MessageJson {
        exchange,
        routing_key: d.routing_key(),
        body,
        encoding,
        properties: json::properties_out(d.properties()),
    })
    .map(String::into_boxed_str)
}

/// A delivery as the `message` JSON (DESIGN.md §4) of subscription `sub` with its tag there.
pub fn message_json(sub: &str, tag: u64, d: &Delivery) -> Result<String, serde_json::Error> {
    let owned;
    let tail: &str = match d.envelope.rendering() {
        // A delivery racing the first one waits for its rendering (OnceLock runs one init).
        Some(cache) => cache
            .json
            .get_or_init(|| message_tail(d).unwrap_or_default()),
        None => {
            owned = message_tail(d)?;
            &owned
        }
    };
    let Some(fields) = tail.strip_prefix('{') else {
        return Err(serde::ser::Error::custom(
            "the message could not be rendered",
        ));
    };
    let mut out = String::with_capacity(tail.len() + sub.len() + 64);
    let sub = serde_json::to_string(sub)?;
    let redelivered = d.redelivered;
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"op":"message","sub":{sub},"delivery_tag":{tag},"redelivered":{redelivered},"#
    );
    out.push_str(fields);
    Ok(out)
}

/// The queue each consumer of `consumers` takes from, by the adapter's key: shared names for
/// what operators see of the subscriptions (one view per subscriber, kept while connected).
pub fn queue_names(
    consumers: &tokio_stream::StreamMap<Arc<str>, Consumer>,
) -> HashMap<&str, Arc<str>> {
    consumers
        .iter()
        .map(|(key, consumer)| (&**key, consumer.queue_name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::engine::{Envelope, EnvelopeRef, Message, Rendering};

    /// An envelope that shares its rendering, as the embedded engine's do.
    #[derive(Debug)]
    struct Shared(Envelope, Rendering);

    impl EnvelopeRef for Shared {
        fn envelope(&self) -> &Envelope {
            &self.0
        }
        fn rendering(&self) -> Option<&Rendering> {
            Some(&self.1)
        }
    }

    fn delivery(envelope: Arc<dyn EnvelopeRef>, redelivered: bool) -> Delivery {
        Delivery {
            delivery_tag: 1,
            redelivered,
            consumer_tag: None,
            envelope,
            expires_in: None,
            message_count: None,
        }
    }

    #[test]
    fn the_message_json_is_the_same_rendered_once_or_each_time() {
        let mut message = Message::new(r#"{"t":21.5}"#);
        message.properties_mut().content_type = Some("application/json".into());
        let envelope = Envelope {
            exchange: "".into(),
            routing_key: "sensors.\"1\"".into(),
            message,
        };
        let shared: Arc<dyn EnvelopeRef> = Arc::new(Shared(envelope.clone(), Rendering::new()));
        let each: Arc<dyn EnvelopeRef> = Arc::new(envelope);
        let expected = |sub: &str, tag: u64, redelivered: bool| {
            json!({"op": "message", "sub": sub, "delivery_tag": tag, "exchange": "amq.default",
                "routing_key": "sensors.\"1\"", "redelivered": redelivered, "body": {"t": 21.5},
                "encoding": "json", "properties": {"content_type": "application/json"}})
        };
        for (sub, tag, redelivered) in [("a", 1, false), ("b\"\\", 7, true)] {
            for envelope in [&shared, &each] {
                let text =
                    message_json(sub, tag, &delivery(envelope.clone(), redelivered)).unwrap();
                let got: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(got, expected(sub, tag, redelivered), "{text}");
            }
        }
        assert!(
            shared.rendering().unwrap().json.get().is_some(),
            "rendered once, kept"
        );
    }
}
