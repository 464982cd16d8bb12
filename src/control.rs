//! Cross-connection control: who holds an exclusive consumer that another connection of the
//! same owner may take over (durable WebSocket subscriptions now; MQTT sessions next).
//!
//! In-process today: a registry from queue name to the holder's takeover signal. With the
//! upstream engine the same signal is announced on the fanout exchange `amqp-gateway.control`
//! so a holder on another instance lets go too (DESIGN.md §3/§4).

use dashmap::DashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A holder is told to let go of the consumer on `queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub queue: String,
}

#[derive(Default)]
pub struct Control {
    holders: DashMap<String, (u64, mpsc::UnboundedSender<Takeover>)>,
    /// Delayed wills (MQTT 5), cancelled when their session connects again.
    wills: DashMap<String, CancellationToken>,
}

impl Control {
    /// Registers `holder` (a connection id) as the consumer of `queue`.
    pub fn hold(&self, queue: &str, holder: u64, signal: mpsc::UnboundedSender<Takeover>) {
        self.holders.insert(queue.to_owned(), (holder, signal));
    }

    /// Forgets `holder`'s hold on `queue` (and nobody else's).
    pub fn release(&self, queue: &str, holder: u64) {
        self.holders.remove_if(queue, |_, (h, _)| *h == holder);
    }

    /// Registers a delayed will for `session`; the token is cancelled if it reconnects first.
    pub fn delay_will(&self, session: &str) -> CancellationToken {
        let token = CancellationToken::new();
        if let Some(old) = self.wills.insert(session.to_owned(), token.clone()) {
            old.cancel();
        }
        token
    }

    /// A CONNECT for `session` arrived: its pending will is not published.
    pub fn cancel_will(&self, session: &str) {
        if let Some((_, token)) = self.wills.remove(session) {
            token.cancel();
        }
    }

    /// The delayed will of `session` fired; forget it.
    pub fn will_done(&self, session: &str) {
        self.wills.remove(session);
    }

    pub fn is_held(&self, queue: &str) -> bool {
        self.holders.contains_key(queue)
    }

    /// Asks the current holder of `queue` to let go; false when nobody here holds it.
    pub fn take_over(&self, queue: &str) -> bool {
        match self.holders.get(queue) {
            Some(entry) => entry
                .1
                .send(Takeover {
                    queue: queue.to_owned(),
                })
                .is_ok(),
            None => false,
        }
    }
}
