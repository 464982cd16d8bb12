//! Takeover and delayed wills across gateway instances (DESIGN.md §1, §3): the in-process
//! registry ([`LocalSessions`]) for this instance's holders, and announcements on the fanout
//! exchange `amqp-gateway.control` for everyone else's. A takeover of a key nobody here holds
//! is announced (at most every 100 ms per key) and answered `false`: the new connection then
//! waits on the engine's fence — the session's exclusive consume succeeds once the holder on
//! the other instance, told by the announcement, stored its state and let go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol_types::ShortString;
use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::convert;
use super::link::{Conns, Link};
use super::publisher::{Publisher, Request};
use crate::engine::EngineError;
use crate::engine::sessions::local::LocalSessions;
use crate::engine::sessions::{SessionRegistry, TakeoverSender};

pub(super) const EXCHANGE: &str = "amqp-gateway.control";
/// How often one key's takeover is announced while a new connection retries its fence.
const ANNOUNCE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Announcement {
    Takeover { key: String, origin: String },
    CancelWill { session: String, origin: String },
}

pub(super) struct ControlSessions {
    local: LocalSessions,
    publisher: Publisher,
    origin: String,
    announced: Mutex<HashMap<String, Instant>>,
}

impl ControlSessions {
    /// Declares the exchange and this instance's queue on it, and starts following it.
    pub(super) async fn start(
        shared: &super::Shared,
        origin: &str,
    ) -> Result<Arc<ControlSessions>, EngineError> {
        let (ch, consumer) = subscribe(shared.link.current()?).await?;
        let control = Arc::new(ControlSessions {
            local: LocalSessions::default(),
            publisher: Publisher::spawn(shared.link.clone()),
            origin: origin.to_owned(),
            announced: Mutex::default(),
        });
        let link = shared.link.clone();
        tokio::spawn(follow(Arc::downgrade(&control), link, ch, consumer));
        Ok(control)
    }

    async fn announce(&self, announcement: &Announcement) {
        let Ok(body) = serde_json::to_vec(announcement) else {
            return;
        };
        let (request, confirm) = Request::new(
            ShortString::from(EXCHANGE),
            ShortString::from(""),
            body.into(),
            lapin::BasicProperties::default(),
        );
        self.publisher.send(request);
        if let Err(e) = confirm.await {
            tracing::warn!(error = %e, "control announcement not confirmed upstream");
        }
    }

    async fn heard(&self, announcement: Announcement) {
        match announcement {
            Announcement::Takeover { key, origin } if origin != self.origin => {
                self.local.take_over(&key).await;
            }
            Announcement::CancelWill { session, origin } if origin != self.origin => {
                self.local.cancel_will(&session).await;
            }
            _ => {}
        }
    }
}

/// Declares the exchange and a queue exclusive to the consuming connection (it goes with this
/// instance, and with each lost connection: every generation declares its own) and consumes it.
async fn subscribe(conns: Arc<Conns>) -> Result<(lapin::Channel, lapin::Consumer), EngineError> {
    let err = |e: lapin::Error| convert::engine_error(&e, convert::About::Exchange(EXCHANGE));
    let ch = conns.consuming_channel().await.map_err(err)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    ch.exchange_declare(
        EXCHANGE.into(),
        lapin::ExchangeKind::Fanout,
        durable,
        Default::default(),
    )
    .await
    .map_err(err)?;
    let mine = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = ch
        .queue_declare("".into(), mine, Default::default())
        .await
        .map_err(err)?;
    let name = queue.name().clone();
    ch.queue_bind(
        name.clone(),
        EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .map_err(err)?;
    ch.basic_qos(100, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let consumer = ch
        .basic_consume(
            name,
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .map_err(err)?;
    Ok((ch, consumer))
}

/// Hears announcements for as long as the registry lives, subscribing again after each lost
/// connection (announcements sent meanwhile are missed; takeovers repeat theirs).
async fn follow(
    control: std::sync::Weak<ControlSessions>,
    link: Arc<Link>,
    mut ch: lapin::Channel,
    mut consumer: lapin::Consumer,
) {
    loop {
        while let Some(Ok(delivery)) = consumer.next().await {
            let Some(control) = control.upgrade() else {
                return;
            };
            match serde_json::from_slice::<Announcement>(&delivery.data) {
                Ok(a) => control.heard(a).await,
                Err(e) => tracing::debug!(error = %e, "unreadable control announcement ignored"),
            }
            let ack = BasicAckOptions { multiple: true };
            if ch.basic_ack(delivery.delivery_tag, ack).await.is_err() {
                break;
            }
        }
        let wanted = || control.strong_count() > 0;
        let Some((c, k)) = link.retry(wanted, subscribe).await else {
            return;
        };
        (ch, consumer) = (c, k);
    }
}

#[async_trait]
impl SessionRegistry for ControlSessions {
    fn hold(&self, key: Arc<str>, holder: u64, signal: TakeoverSender) {
        self.local.hold(key, holder, signal);
    }

    fn release(&self, key: &str, holder: u64) {
        self.local.release(key, holder);
    }

    fn is_held(&self, key: &str) -> bool {
        self.local.is_held(key)
    }

    async fn take_over(&self, key: &str) -> bool {
        if self.local.take_over(key).await {
            return true;
        }
        let due = {
            let mut announced = self.announced.lock();
            let now = Instant::now();
            announced.retain(|_, at| now.duration_since(*at) < ANNOUNCE_EVERY);
            announced.insert(key.to_owned(), now).is_none()
        };
        if due {
            let takeover = Announcement::Takeover {
                key: key.to_owned(),
                origin: self.origin.clone(),
            };
            self.announce(&takeover).await;
        }
        false
    }

    async fn wait_released(&self, key: &str, timeout: Duration) -> bool {
        self.local.wait_released(key, timeout).await
    }

    fn delay_will(&self, session: &str) -> CancellationToken {
        self.local.delay_will(session)
    }

    async fn cancel_will(&self, session: &str) {
        self.local.cancel_will(session).await;
        let cancel = Announcement::CancelWill {
            session: session.to_owned(),
            origin: self.origin.clone(),
        };
        self.announce(&cancel).await;
    }

    fn will_done(&self, session: &str) {
        self.local.will_done(session);
    }
}
