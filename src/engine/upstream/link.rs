//! The engine's two AMQP connections to its broker and the supervisor that keeps them
//! (DESIGN.md §5 failure table): when either is lost, both are dropped, the engine reports
//! itself not ready, and the supervisor reconnects with jittered exponential backoff,
//! re-declares what the gateway owns (the restore hook) and only then announces the new
//! generation, on which consumers and publishers resume by themselves. Our own supervisor
//! rather than lapin's recovery: lapin recovers channels one by one, but what must come back
//! (exclusive queues as this engine fakes them, consumers in the right order, the blocked
//! state) is the engine's to know.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream, StreamExt};
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use rand::RngExt;
use tokio::sync::watch;

use crate::engine::EngineError;
use crate::metrics;

/// First reconnect delay; doubled per failed attempt up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// How often a lost connection is looked for when lapin reports nothing (a broker's
/// `connection.close` ends a connection without an error event).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// How often the round trip to the broker is measured.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// One generation of the two connections; a reconnect makes a new one.
pub(super) struct Conns {
    pub generation: u64,
    pub publishing: Connection,
    pub consuming: Connection,
    /// Every AMQP channel opened on these connections, for the channels-in-use gauge.
    opened: Mutex<Vec<lapin::Channel>>,
}

impl Conns {
    pub(super) fn alive(&self) -> bool {
        self.publishing.status().connected() && self.consuming.status().connected()
    }

    /// Opens a channel on the consuming connection (consumers, gets, topology).
    pub(super) async fn consuming_channel(&self) -> lapin::Result<lapin::Channel> {
        let ch = self.consuming.create_channel().await?;
        self.opened(&ch);
        Ok(ch)
    }

    /// Opens a channel on the publishing connection.
    pub(super) async fn publishing_channel(&self) -> lapin::Result<lapin::Channel> {
        let ch = self.publishing.create_channel().await?;
        self.opened(&ch);
        Ok(ch)
    }

    fn opened(&self, ch: &lapin::Channel) {
        let mut opened = self.opened.lock();
        if opened.len() >= 64 && opened.len().is_power_of_two() {
            opened.retain(|c| c.status().connected());
        }
        opened.push(ch.clone());
    }

    fn channels_in_use(&self) -> usize {
        let mut opened = self.opened.lock();
        opened.retain(|c| c.status().connected());
        opened.len()
    }

    async fn close(&self, why: &str) {
        for conn in [&self.publishing, &self.consuming] {
            if conn.status().connected() {
                let closing = conn.close(200, why.into());
                let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
            }
        }
    }
}

#[derive(Clone)]
enum State {
    Up(Arc<Conns>),
    Down(Arc<str>),
    Shut,
}

/// Re-declares what the gateway owns on a new generation, before it is announced.
pub(super) type Restore =
    Box<dyn Fn(Arc<Conns>) -> BoxFuture<'static, Result<(), EngineError>> + Send + Sync>;

/// Where and how to connect.
pub(super) struct Target {
    pub uri: AMQPUri,
    pub instance: String,
    /// PEM certificates trusted besides the system's, for `amqps://` (`engine.upstream.tls_ca`).
    pub tls_ca: Option<String>,
}

type Events = Pin<Box<dyn Stream<Item = lapin::Event> + Send>>;

pub(super) struct Link {
    target: Target,
    state: watch::Sender<State>,
    blocked: watch::Sender<bool>,
    restore: OnceLock<Restore>,
}

impl Link {
    /// Connects the first generation (failing when the broker cannot be reached: a gateway
    /// that never reached its broker is misconfigured) and starts the supervisor.
    pub(super) async fn connect(target: Target) -> Result<Arc<Link>, EngineError> {
        let (conns, events) = target.open(1).await?;
        let link = Arc::new(Link {
            target,
            state: watch::Sender::new(State::Up(conns.clone())),
            blocked: watch::Sender::new(false),
            restore: OnceLock::new(),
        });
        ::metrics::gauge!(metrics::UPSTREAM_CONNECTED).set(1.0);
        // At zero from the start: a dashboard's increase() reads "none", not "no data".
        ::metrics::counter!(metrics::UPSTREAM_RECONNECTS).increment(0);
        tokio::spawn(probe(Arc::downgrade(&conns)));
        tokio::spawn(supervise(Arc::downgrade(&link), conns, events));
        Ok(link)
    }

    pub(super) fn set_restore(&self, restore: Restore) {
        let _ = self.restore.set(restore);
    }

    /// The connections, or `Unavailable` while they are being re-established.
    pub(super) fn current(&self) -> Result<Arc<Conns>, EngineError> {
        match &*self.state.borrow() {
            State::Up(conns) if conns.alive() => Ok(conns.clone()),
            State::Up(_) => Err(EngineError::Unavailable(
                "upstream broker connection lost; reconnecting".into(),
            )),
            State::Down(why) => Err(EngineError::Unavailable(format!(
                "upstream broker connection lost ({why}); reconnecting"
            ))),
            State::Shut => Err(EngineError::Unavailable("engine is shutting down".into())),
        }
    }

    /// Waits for live connections; `None` once the engine shut down.
    pub(super) async fn up(&self) -> Option<Arc<Conns>> {
        let mut state = self.state.subscribe();
        let found = state
            .wait_for(|s| match s {
                State::Up(c) => c.alive(),
                State::Down(_) => false,
                State::Shut => true,
            })
            .await;
        match found.as_deref() {
            Ok(State::Up(conns)) => Some(conns.clone()),
            _ => None,
        }
    }

    /// Runs `attempt` on live connections until it succeeds, waiting out outages and pausing
    /// a second after a failure; `None` once the engine shut down or `wanted` turned false.
    pub(super) async fn retry<T, F, Fut>(&self, wanted: impl Fn() -> bool, attempt: F) -> Option<T>
    where
        F: Fn(Arc<Conns>) -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        loop {
            let conns = self.up().await?;
            if !wanted() {
                return None;
            }
            match attempt(conns).await {
                Ok(t) => return Some(t),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream resubscription failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Whether `generation` is the current one and still connected.
    pub(super) fn is_live(&self, generation: u64) -> bool {
        matches!(&*self.state.borrow(), State::Up(c) if c.generation == generation && c.alive())
    }

    /// Why the engine is not ready, if it is not.
    pub(super) fn not_ready(&self) -> Option<String> {
        self.current().err().map(|e| match e {
            EngineError::Unavailable(why) => why,
            e => e.to_string(),
        })
    }

    pub(super) fn blocked(&self) -> watch::Receiver<bool> {
        self.blocked.subscribe()
    }

    pub(super) fn channels_in_use(&self) -> usize {
        match &*self.state.borrow() {
            State::Up(conns) => conns.channels_in_use(),
            _ => 0,
        }
    }

    pub(super) async fn shutdown(&self) {
        let previous = self.state.send_replace(State::Shut);
        if let State::Up(conns) = previous {
            conns.close("gateway shutting down").await;
        }
        ::metrics::gauge!(metrics::UPSTREAM_CONNECTED).set(0.0);
    }

    fn is_shut(&self) -> bool {
        matches!(*self.state.borrow(), State::Shut)
    }
}

impl Target {
    async fn open(&self, generation: u64) -> Result<(Arc<Conns>, [Events; 2]), EngineError> {
        let publishing = self.connect("publish").await?;
        let consuming = match self.connect("consume").await {
            Ok(c) => c,
            Err(e) => {
                let _ = publishing.close(200, "OK".into()).await;
                return Err(e);
            }
        };
        let events = [
            Box::pin(publishing.events_listener()) as Events,
            Box::pin(consuming.events_listener()) as Events,
        ];
        let conns = Arc::new(Conns {
            generation,
            publishing,
            consuming,
            opened: Mutex::default(),
        });
        Ok((conns, events))
    }

    async fn connect(&self, role: &str) -> Result<Connection, EngineError> {
        let name = format!("amqp-gateway {} {role}", self.instance);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.tls_ca.clone(),
        };
        let runtime = lapin::runtime::default_runtime()
            .map_err(|e| EngineError::Internal(format!("no runtime for lapin: {e}")))?;
        Connection::connect_uri_with_config(self.uri.clone(), properties, tls, runtime)
            .await
            .map_err(|e| {
                let tls = match self.uri.scheme {
                    AMQPScheme::AMQPS => " (TLS: is the broker's certificate signed by a CA the \
                                          system or engine.upstream.tls_ca trusts, for this host name?)",
                    AMQPScheme::AMQP => "",
                };
                EngineError::Unavailable(format!(
                    "cannot connect to the upstream broker at {}:{}: {e}{tls}",
                    self.uri.authority.host, self.uri.authority.port
                ))
            })
    }
}

/// Waits for the generation to be lost, forwarding `connection.blocked` meanwhile.
async fn lost(link: &Weak<Link>, conns: &Conns, events: &mut [Events; 2]) -> Option<String> {
    let [publishing, consuming] = events;
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        let event = tokio::select! {
            e = publishing.next() => e.map(|e| (true, e)),
            e = consuming.next() => e.map(|e| (false, e)),
            _ = check.tick() => {
                let link = link.upgrade()?;
                if link.is_shut() {
                    return None;
                }
                if !conns.alive() {
                    return Some(pending_error(publishing, consuming));
                }
                continue;
            }
        };
        let link = link.upgrade()?;
        match event {
            None => return Some("connection ended".into()),
            // Channel errors come as events too; a connection's error has ended it first.
            Some((_, lapin::Event::Error(e))) if !conns.alive() => return Some(e.to_string()),
            Some((true, lapin::Event::ConnectionBlocked(reason))) => {
                tracing::warn!(%reason, "upstream broker blocked publishing");
                link.blocked.send_replace(true);
            }
            Some((true, lapin::Event::ConnectionUnblocked)) => {
                tracing::info!("upstream broker unblocked publishing");
                link.blocked.send_replace(false);
            }
            Some(_) => {}
        }
    }
}

/// The error lapin reported for a connection found lost, if its event is already queued.
fn pending_error(publishing: &mut Events, consuming: &mut Events) -> String {
    for events in [publishing, consuming] {
        while let Some(Some(event)) = events.next().now_or_never() {
            if let lapin::Event::Error(e) = event {
                return e.to_string();
            }
        }
    }
    "closed by the broker".into()
}

async fn supervise(link: Weak<Link>, mut conns: Arc<Conns>, mut events: [Events; 2]) {
    loop {
        let Some(why) = lost(&link, &conns, &mut events).await else {
            return;
        };
        let Some(strong) = link.upgrade() else { return };
        if strong.is_shut() {
            return;
        }
        tracing::warn!(error = %why, "upstream broker connection lost; reconnecting");
        strong.state.send_replace(State::Down(why.into()));
        // While down, publishes are refused as unavailable, not blocked (DESIGN.md §5).
        let was_blocked = strong.blocked.send_replace(false);
        ::metrics::gauge!(metrics::UPSTREAM_CONNECTED).set(0.0);
        conns.close("connection lost").await;
        drop(strong);
        let next = reconnect(&link, conns.generation + 1, was_blocked).await;
        let Some((next, next_events)) = next else {
            return;
        };
        (conns, events) = (next, next_events);
    }
}

/// Reconnects until it succeeds (restore included) or the engine shuts down.
async fn reconnect(
    link: &Weak<Link>,
    generation: u64,
    was_blocked: bool,
) -> Option<(Arc<Conns>, [Events; 2])> {
    let since = Instant::now();
    for attempt in 1u32.. {
        tokio::time::sleep(backoff(attempt)).await;
        let link = link.upgrade()?;
        if link.is_shut() {
            return None;
        }
        let opened = match link.target.open(generation).await {
            Ok(opened) => opened,
            Err(e) => {
                if attempt == 1 || attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt, "upstream broker still unreachable");
                }
                continue;
            }
        };
        let (conns, events) = opened;
        if let Some(restore) = link.restore.get()
            && let Err(e) = restore(conns.clone()).await
        {
            tracing::warn!(error = %e, "re-declaring the gateway's queues upstream failed; retrying");
            conns.close("restore failed").await;
            continue;
        }
        if link.is_shut() {
            conns.close("gateway shutting down").await;
            return None;
        }
        if was_blocked {
            // Still blocked until the broker says otherwise: see `unblock_probe`.
            link.blocked.send_replace(true);
            tokio::spawn(unblock_probe(Arc::downgrade(&link), conns.clone()));
        }
        link.state.send_replace(State::Up(conns.clone()));
        ::metrics::counter!(metrics::UPSTREAM_RECONNECTS).increment(1);
        ::metrics::gauge!(metrics::UPSTREAM_CONNECTED).set(1.0);
        tokio::spawn(probe(Arc::downgrade(&conns)));
        tracing::info!(
            attempts = attempt,
            down_ms = since.elapsed().as_millis() as u64,
            generation,
            "reconnected to the upstream broker"
        );
        return Some((conns, events));
    }
    None
}

/// After a reconnect while the broker was blocking publishers: RabbitMQ tells a connection it
/// is blocked only once it publishes, so until then the gateway would take publishes that then
/// hang in a blocked socket. Publishing stays blocked and probes (unroutable empty messages,
/// confirm mode) find out. Two, so that however RabbitMQ orders the confirm of the publish
/// that makes it block a connection and its `connection.blocked`, the one after it is held
/// until the alarm is over. While held, RabbitMQ's `connection.blocked` and `unblocked` reach
/// [`lost`], which forwards them.
async fn unblock_probe(link: Weak<Link>, conns: Arc<Conns>) {
    let probed = async {
        let ch = conns.publishing_channel().await?;
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        for _ in 0..2 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    "amqp-gateway.unblock-probe".into(),
                    lapin::options::BasicPublishOptions::default(),
                    b"",
                    lapin::BasicProperties::default(),
                )
                .await?;
            confirm.await?;
        }
        let _ = ch.close(200, "OK".into()).await;
        Ok::<_, lapin::Error>(())
    };
    match probed.await {
        Ok(()) => {
            if let Some(link) = link.upgrade()
                && link.is_live(conns.generation)
                && !conns.publishing.status().blocked()
            {
                tracing::info!("upstream broker no longer blocks publishing");
                link.blocked.send_replace(false);
            }
        }
        Err(e) => tracing::debug!(error = %e, "unblock probe failed with its connection"),
    }
}

/// Doubling from [`FIRST_DELAY`] up to [`MAX_DELAY`], each delay drawn from its upper half so
/// that gateways cut off together do not come back in step.
fn backoff(attempt: u32) -> Duration {
    let ceiling = FIRST_DELAY
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_DELAY);
    let half = ceiling / 2;
    let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(jitter)
}

/// Measures the round trip to the broker (a passive declare of `amq.direct`) while the
/// generation lives.
async fn probe(conns: Weak<Conns>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    let mut channel: Option<lapin::Channel> = None;
    loop {
        every.tick().await;
        let Some(conns) = conns.upgrade() else { return };
        if !conns.alive() {
            return;
        }
        let ch = match &channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => match conns.consuming_channel().await {
                Ok(ch) => {
                    channel = Some(ch.clone());
                    ch
                }
                Err(_) => continue,
            },
        };
        drop(conns);
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let started = Instant::now();
        let answered = ch
            .exchange_declare(
                "amq.direct".into(),
                lapin::ExchangeKind::Direct,
                passive,
                Default::default(),
            )
            .await;
        if answered.is_ok() {
            ::metrics::histogram!(metrics::UPSTREAM_ROUND_TRIP).record(started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_its_jitter_and_stops_at_the_ceiling() {
        for attempt in 1..40 {
            let ceiling = (FIRST_DELAY * 2u32.pow((attempt - 1).min(16))).min(MAX_DELAY);
            let d = backoff(attempt);
            assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
        }
    }
}
