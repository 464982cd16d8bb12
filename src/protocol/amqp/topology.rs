//! The `exchange` and `queue` classes, authorized by the same scopes as REST and WebSocket
//! (DESIGN.md §6): `configure` to declare, delete and purge by name; `read` on the exchange
//! and binding key to bind; a connection's own server-named and exclusive queues need no
//! scope.

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use amq_protocol::types::ShortString;

use super::error::{Fault, NOT_IMPLEMENTED};
use super::session::Session;
use crate::engine::table::wire::from_amqp;
use crate::engine::{DeleteQueueOptions, ExchangeSpec, QueueSpec};

impl Session {
    pub(super) async fn exchange_method(
        &mut self,
        c: u16,
        m: exchange::AMQPMethod,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        let engine = self.chan(c)?.engine.clone();
        let engine_err = |e: crate::engine::EngineError| Fault::engine(&e, method);
        let ok = match m {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                if d.passive {
                    if !self.principal.permissions.can_see_exchange(name) {
                        return Err(Fault::forbidden(format!("exchange '{name}'"), method));
                    }
                    engine.exchange_info(name).await.map_err(engine_err)?;
                } else {
                    if !self.principal.permissions.can_configure(name) {
                        return Err(Fault::forbidden(
                            format!("configure exchange '{name}'"),
                            method,
                        ));
                    }
                    let spec = ExchangeSpec {
                        kind: d.kind.as_str().parse().map_err(|e| {
                            Fault::connection(super::error::COMMAND_INVALID, format!("{e}"), method)
                        })?,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: from_amqp(&d.arguments),
                    };
                    engine
                        .declare_exchange(name, &spec)
                        .await
                        .map_err(engine_err)?;
                }
                (!d.nowait).then_some(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}))
            }
            exchange::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str();
                if !self.principal.permissions.can_configure(name) {
                    return Err(Fault::forbidden(
                        format!("configure exchange '{name}'"),
                        method,
                    ));
                }
                engine
                    .delete_exchange(name, d.if_unused)
                    .await
                    .map_err(engine_err)?;
                (!d.nowait).then_some(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {}))
            }
            exchange::AMQPMethod::Bind(_) | exchange::AMQPMethod::Unbind(_) => {
                return Err(Fault::connection(
                    NOT_IMPLEMENTED,
                    "exchange-to-exchange bindings are not supported",
                    method,
                ));
            }
            _ => {
                return Err(Fault::connection(
                    super::error::COMMAND_INVALID,
                    "an exchange method the server does not accept from clients",
                    method,
                ));
            }
        };
        if let Some(ok) = ok {
            self.method_frame(c, AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    pub(super) async fn queue_method(
        &mut self,
        c: u16,
        m: queue::AMQPMethod,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        let ok = match m {
            queue::AMQPMethod::Declare(d) => self.declare_queue(c, d, method).await?,
            queue::AMQPMethod::Bind(b) => {
                let binding = (b.exchange.as_str(), b.routing_key.as_str(), &b.arguments);
                self.binding(c, true, b.queue.as_str(), binding, method)
                    .await?;
                (!b.nowait).then_some(queue::AMQPMethod::BindOk(queue::BindOk {}))
            }
            queue::AMQPMethod::Unbind(u) => {
                let binding = (u.exchange.as_str(), u.routing_key.as_str(), &u.arguments);
                self.binding(c, false, u.queue.as_str(), binding, method)
                    .await?;
                Some(queue::AMQPMethod::UnbindOk(queue::UnbindOk {}))
            }
            queue::AMQPMethod::Purge(p) => {
                let queue = self.queue_name(c, p.queue.as_str(), method)?;
                self.may_configure_queue(&queue, method)?;
                let engine = self.chan(c)?.engine.clone();
                let n = engine
                    .purge_queue(&queue)
                    .await
                    .map_err(|e| Fault::engine(&e, method))?;
                (!p.nowait).then_some(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                    message_count: n.min(u64::from(u32::MAX)) as u32,
                }))
            }
            queue::AMQPMethod::Delete(d) => {
                let queue = self.queue_name(c, d.queue.as_str(), method)?;
                self.may_configure_queue(&queue, method)?;
                let engine = self.chan(c)?.engine.clone();
                let options = DeleteQueueOptions {
                    if_unused: d.if_unused,
                    if_empty: d.if_empty,
                };
                let n = engine
                    .delete_queue(&queue, options)
                    .await
                    .map_err(|e| Fault::engine(&e, method))?;
                self.owned.remove(&queue);
                (!d.nowait).then_some(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                    message_count: n.min(u64::from(u32::MAX)) as u32,
                }))
            }
            _ => {
                return Err(Fault::connection(
                    super::error::COMMAND_INVALID,
                    "a queue method the server does not accept from clients",
                    method,
                ));
            }
        };
        if let Some(ok) = ok {
            self.method_frame(c, AMQPClass::Queue(ok));
        }
        Ok(())
    }

    async fn declare_queue(
        &mut self,
        c: u16,
        d: queue::Declare,
        method: (u16, u16),
    ) -> Result<Option<queue::AMQPMethod>, Fault> {
        let name = d.queue.as_str();
        let engine = self.chan(c)?.engine.clone();
        let declared = if d.passive {
            let name = self.queue_name(c, name, method)?;
            let p = &self.principal.permissions;
            if !(self.owned.contains(&name) || p.can_configure(&name) || p.can_consume(&name)) {
                return Err(Fault::forbidden(format!("queue '{name}'"), method));
            }
            engine.declare_queue_passive(&name).await
        } else {
            // A server-named queue belongs to the connection; a named one needs the scope.
            if !name.is_empty() && !self.owned.contains(name) {
                self.may_configure_queue(name, method)?;
            }
            let spec = QueueSpec {
                durable: d.durable,
                exclusive: d.exclusive,
                auto_delete: d.auto_delete,
                arguments: from_amqp(&d.arguments),
            };
            engine.declare_queue(name, &spec).await
        }
        .map_err(|e| Fault::engine(&e, method))?;
        if !d.passive && (name.is_empty() || d.exclusive) {
            self.owned.insert(declared.name.clone());
        }
        self.chan(c)?.last_queue = Some(declared.name.clone());
        Ok((!d.nowait).then(|| {
            queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: ShortString::from(declared.name),
                message_count: declared.messages.min(u64::from(u32::MAX)) as u32,
                consumer_count: declared.consumers,
            })
        }))
    }

    /// `queue.bind` (`bind`) or `queue.unbind` of `queue` to (exchange, key, arguments): the
    /// same names, the same check.
    async fn binding(
        &mut self,
        c: u16,
        bind: bool,
        queue: &str,
        (exchange, key, arguments): (&str, &str, &amq_protocol::types::FieldTable),
        method: (u16, u16),
    ) -> Result<(), Fault> {
        let queue = self.queue_name(c, queue, method)?;
        self.may_bind(&queue, exchange, key, method)?;
        let engine = self.chan(c)?.engine.clone();
        let arguments = from_amqp(arguments);
        let done = if bind {
            engine.bind_queue(&queue, exchange, key, &arguments).await
        } else {
            engine.unbind_queue(&queue, exchange, key, &arguments).await
        };
        done.map_err(|e| Fault::engine(&e, method))
    }

    fn may_configure_queue(&self, queue: &str, method: (u16, u16)) -> Result<(), Fault> {
        if self.owned.contains(queue) || self.principal.permissions.can_configure(queue) {
            Ok(())
        } else {
            Err(Fault::forbidden(
                format!("configure queue '{queue}'"),
                method,
            ))
        }
    }

    /// Binding moves messages from an exchange into a queue: the queue must be this client's
    /// to configure and the exchange's messages under that key its to read.
    fn may_bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        method: (u16, u16),
    ) -> Result<(), Fault> {
        self.may_configure_queue(queue, method)?;
        if self.principal.permissions.can_read(exchange, key) {
            Ok(())
        } else {
            Err(Fault::forbidden(
                format!("read from exchange '{exchange}' with binding key '{key}'"),
                method,
            ))
        }
    }
}
