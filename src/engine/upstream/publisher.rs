//! One engine channel's publishes: a task that owns one AMQP channel in confirm mode on the
//! publishing connection and sends every publish in call order, always `mandatory`, answering
//! each caller only once the broker confirmed (DESIGN.md §2).
//!
//! RabbitMQ closes the channel on a refused publish (a missing or internal exchange): every
//! publish after it on that channel was discarded unseen, and those before it whose confirm had
//! not come are in doubt. So on a channel error the task stops taking new publishes until the
//! old channel's publishes are all settled: the refused one gets its error (found by the name
//! in the broker's reply), the ones in doubt `Unavailable` (the client still owns them, §5), and
//! the discarded ones are sent again, first, on a fresh channel — order kept, nothing lost.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use amq_protocol_types::ShortString;
use bytes::Bytes;
use lapin::BasicProperties;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use tokio::sync::{mpsc, oneshot};

use super::convert::{self, About};
use super::link::Link;
use super::returns::Confirms;
use crate::engine::{EngineError, PublishConfirm, PublishOutcome};

/// Publishes awaiting their confirm at once, per engine channel.
const WINDOW: usize = 1024;
/// Sends of one publish (the first and two after a channel error) before it is answered
/// `Unavailable`.
const ATTEMPTS: u8 = 3;

type Answer = Result<PublishOutcome, EngineError>;

pub(super) struct Request {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub body: Bytes,
    pub properties: BasicProperties,
    pub reply: oneshot::Sender<Answer>,
    attempts: u8,
}

impl Request {
    pub(super) fn new(
        exchange: ShortString,
        routing_key: ShortString,
        body: Bytes,
        properties: BasicProperties,
    ) -> (Request, PublishConfirm) {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            exchange,
            routing_key,
            body,
            properties,
            reply,
            attempts: 0,
        };
        let confirm = PublishConfirm::pending(async move {
            answer.await.unwrap_or_else(|_| {
                Err(EngineError::Unavailable(
                    "upstream publisher stopped before the confirm".into(),
                ))
            })
        });
        (request, confirm)
    }

    fn answer(self, answer: Answer) {
        // The caller may have dropped its confirm; the message stands either way.
        let _ = self.reply.send(answer);
    }
}

/// The sending side; dropping it lets the task settle what is in flight and close its channel.
pub(super) struct Publisher {
    tx: mpsc::UnboundedSender<Request>,
}

impl Publisher {
    pub(super) fn spawn(link: Arc<Link>) -> Publisher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(link, rx));
        Publisher { tx }
    }

    pub(super) fn send(&self, request: Request) {
        if let Err(mpsc::error::SendError(request)) = self.tx.send(request) {
            request.answer(Err(EngineError::ChannelClosed));
        }
    }
}

pub(super) type Settled = (Request, u64, lapin::Result<Confirmation>);
pub(super) type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = Settled> + Send>>;

/// The refusal that closed a channel, while that channel's publishes are being settled.
struct Failure {
    generation: u64,
    code: Option<u16>,
    text: String,
    /// Its publish was found; later ones were discarded by the broker.
    culprit_found: bool,
    error: lapin::Error,
}

struct Pipe {
    link: Arc<Link>,
    channel: Option<lapin::Channel>,
    generation: u64,
    /// Sent again before anything new.
    retry: VecDeque<Request>,
    failure: Option<Failure>,
}

async fn run(link: Arc<Link>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut pipe = Pipe {
        link,
        channel: None,
        generation: 0,
        retry: VecDeque::new(),
        failure: None,
    };
    let mut in_flight = Confirms::default();
    let mut open = true;
    loop {
        if pipe.failure.is_some() && in_flight.is_empty() {
            pipe.failure = None;
        }
        if pipe.failure.is_none() {
            while let Some(request) = pipe.retry.pop_front() {
                if let Some(sent) = pipe.send(request).await {
                    in_flight.push_back(sent);
                }
                if pipe.failure.is_some() {
                    break;
                }
            }
        }
        if !open && in_flight.is_empty() && pipe.retry.is_empty() {
            break;
        }
        let take_new = open && pipe.failure.is_none() && pipe.retry.is_empty();
        tokio::select! {
            biased;
            Some((request, generation, result)) = in_flight.next() => {
                pipe.settle(request, generation, result);
            }
            request = rx.recv(), if take_new && in_flight.len() < WINDOW => match request {
                Some(request) => {
                    if let Some(sent) = pipe.send(request).await {
                        in_flight.push_back(sent);
                    }
                }
                None => open = false,
            },
            else => {
                if pipe.retry.is_empty() && in_flight.is_empty() && !open {
                    break;
                }
            }
        }
    }
    if let Some(channel) = pipe.channel.take() {
        let _ = channel.close(200, "OK".into()).await;
    }
}

impl Pipe {
    /// The confirm-mode channel, opened on the current connection when there is none: while
    /// the upstream is down that fails at once with `Unavailable` (DESIGN.md §5).
    async fn channel(&mut self) -> Result<lapin::Channel, EngineError> {
        if let Some(ch) = &self.channel
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let failed = |e: lapin::Error| convert::engine_error(&e, About::Other);
        let ch = self
            .link
            .current()?
            .publishing_channel()
            .await
            .map_err(failed)?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed)?;
        self.generation += 1;
        self.channel = Some(ch.clone());
        Ok(ch)
    }

    /// Sends one publish; its confirm future comes back to be awaited in order.
    async fn send(&mut self, mut request: Request) -> Option<InFlight> {
        request.attempts += 1;
        let channel = match self.channel().await {
            Ok(ch) => ch,
            Err(e) => {
                request.answer(Err(e));
                return None;
            }
        };
        let (exchange, key, body, properties) = (
            request.exchange.clone(),
            request.routing_key.clone(),
            request.body.clone(),
            request.properties.clone(),
        );
        let mut sending = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            channel
                .basic_publish(exchange, key, options, &body, properties)
                .await
        });
        // lapin queues a publish's frames (and registers its confirm) in the first poll and
        // then waits for the socket write: polled once here, publishes keep call order
        // without each waiting for the previous one's write (that wait capped a publisher at
        // a few thousand messages per second).
        let first = std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await;
        let generation = self.generation;
        match first {
            Poll::Pending => Some(Box::pin(async move {
                match sending.await {
                    Ok(confirm) => (request, generation, confirm.await),
                    Err(e) => (request, generation, Err(e)),
                }
            })),
            Poll::Ready(Ok(confirm)) => {
                Some(Box::pin(
                    async move { (request, generation, confirm.await) },
                ))
            }
            Poll::Ready(Err(e)) if request.attempts < ATTEMPTS && !e.is_io_error() => {
                // The channel closed under us: this publish never left; send it again first.
                self.channel = None;
                self.retry.push_back(request);
                None
            }
            Poll::Ready(Err(e)) => {
                self.channel = None;
                request.answer(Err(convert::engine_error(&e, About::Other)));
                None
            }
        }
    }

    fn settle(&mut self, request: Request, generation: u64, result: lapin::Result<Confirmation>) {
        match result {
            Ok(Confirmation::Ack(returned)) => request.answer(Ok(PublishOutcome {
                routed: returned.is_none(),
            })),
            Ok(Confirmation::Nack(_)) => {
                let refused = format!(
                    "exchange '{}' (the broker nacked the publish)",
                    request.exchange
                );
                request.answer(Err(EngineError::Rejected(refused)))
            }
            Ok(Confirmation::NotRequested) => request.answer(Err(EngineError::Internal(
                "publisher confirms are off on the upstream channel".into(),
            ))),
            Err(e) => self.failed(request, generation, e),
        }
    }

    fn failed(&mut self, request: Request, generation: u64, error: lapin::Error) {
        if !convert::is_channel_error(&error) {
            // The connection is gone: nobody can say whether the broker kept it.
            self.channel = None;
            return request.answer(Err(EngineError::Unavailable(format!(
                "upstream connection lost before the confirm: {error}"
            ))));
        }
        if self
            .failure
            .as_ref()
            .is_none_or(|f| f.generation != generation)
        {
            let (code, text) =
                convert::reply(&error).map_or((None, String::new()), |(c, t)| (Some(c), t));
            self.channel = None;
            self.failure = Some(Failure {
                generation,
                code,
                text,
                culprit_found: false,
                error,
            });
        }
        let failure = self.failure.as_mut().expect("set above");
        if failure.culprit_found {
            if request.attempts < ATTEMPTS {
                return self.retry.push_back(request);
            }
            return request.answer(Err(EngineError::Unavailable(
                "upstream channel kept closing; publish not confirmed".into(),
            )));
        }
        let names_exchange = failure.text.contains("exchange '");
        let quoted = format!("exchange '{}'", request.exchange);
        if !names_exchange || failure.text.contains(&quoted) {
            failure.culprit_found = true;
            let exchange = request.exchange.to_string();
            let _ = failure.code;
            return request.answer(Err(convert::engine_error(
                &failure.error,
                About::Exchange(&exchange),
            )));
        }
        request.answer(Err(EngineError::Unavailable(
            "upstream channel closed before the confirm".into(),
        )));
    }
}
