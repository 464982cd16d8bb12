//! The embedded engine's memory accounting: the bytes it holds against
//! `engine.memory_high_watermark` (bodies and what holding each message costs besides, see
//! [`held_size`]), one charge per published message kept beside its envelope
//! ([`Stored`]) — engine bookkeeping that never shows in the trait's message types.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use crate::engine::{Envelope, EnvelopeRef, Rendering};

/// The bytes an engine holds ([`held_size`] of each message), against its memory high
/// watermark: crossing it either way flips a `watch`, so adapters (and an AMQP listener's
/// `connection.blocked`) follow the state without polling. Only crossings touch the watch; every other change is one atomic add.
pub(super) struct Held {
    /// On cache lines of its own: it changes with every message published and every message
    /// settled, on whichever worker, and would drag the fields read beside it (the watermark,
    /// the alarm) from core to core with it.
    bytes: CachePadded<AtomicU64>,
    watermark: u64,
    /// The disk alarm (`engine.disk_free_limit`): blocks publishes as the watermark does.
    disk_low: AtomicBool,
    blocked: tokio::sync::watch::Sender<bool>,
    /// What `blocked` holds, set with it: every client publish asks, from every worker, and
    /// the watch's read lock made each ask a write to one cache line that all of them share
    /// (5 % of a 50→1 fan-in's time when publishers ran on both workers).
    blocked_now: AtomicBool,
}

impl Held {
    /// `watermark` of `u64::MAX`: never blocked.
    pub fn new(watermark: u64) -> Held {
        Held {
            bytes: CachePadded::new(AtomicU64::new(0)),
            watermark,
            disk_low: AtomicBool::new(false),
            blocked: tokio::sync::watch::Sender::new(false),
            blocked_now: AtomicBool::new(false),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Above this, the broker pages bodies of durable queues out: half the watermark.
    pub fn paging_threshold(&self) -> u64 {
        self.watermark / 2
    }

    /// What paging brings the bytes held down to.
    pub fn paging_target(&self) -> u64 {
        self.watermark / 5 * 2
    }

    pub fn disk_low(&self) -> bool {
        self.disk_low.load(Ordering::Acquire)
    }

    /// Raises or clears the disk alarm; true when that changed it.
    pub fn set_disk_low(&self, low: bool) -> bool {
        let changed = self.disk_low.swap(low, Ordering::AcqRel) != low;
        if changed {
            self.recheck();
        }
        changed
    }

    pub fn blocked(&self) -> bool {
        self.blocked_now.load(Ordering::Relaxed)
    }

    pub fn watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.blocked.subscribe()
    }

    fn add(&self, n: u64) {
        let before = self.bytes.fetch_add(n, Ordering::Relaxed);
        if before < self.watermark && before.saturating_add(n) >= self.watermark {
            self.recheck();
        }
    }

    fn sub(&self, n: u64) {
        let before = self.bytes.fetch_sub(n, Ordering::Relaxed);
        if before >= self.watermark && before - n < self.watermark {
            self.recheck();
        }
    }

    /// Sets the state from the current count, under the watch's lock: whichever crossing
    /// rechecks last sees the latest count, so concurrent crossings cannot leave it stale.
    fn recheck(&self) {
        self.blocked.send_if_modified(|blocked| {
            let now = self.bytes.load(Ordering::Relaxed) >= self.watermark || self.disk_low();
            let changed = *blocked != now;
            *blocked = now;
            self.blocked_now.store(now, Ordering::Relaxed);
            changed
        });
    }
}

/// Bytes added to [`Held`] while the value holding this lives, taken off when it drops:
/// an envelope shared by many queues (one `Arc`) is counted once, for as long as any queue or
/// unsettled delivery holds it.
pub(super) struct Charge(Option<(Arc<Held>, u64)>);

impl Charge {
    pub fn new(held: &Arc<Held>, bytes: u64) -> Charge {
        held.add(bytes);
        Charge(Some((held.clone(), bytes)))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((held, bytes)) = &self.0 {
            held.sub(*bytes);
        }
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((_, bytes)) => write!(f, "Charge({bytes})"),
            None => f.write_str("Charge(-)"),
        }
    }
}

/// A published message as the embedded engine holds it: the envelope, and its charge in the
/// same allocation, so fan-out to many queues shares one of each and the bytes are released
/// when the last queue entry, unsettled delivery or handed-out [`crate::engine::Delivery`] goes.
#[derive(Debug)]
pub(super) struct Stored {
    envelope: Envelope,
    _charge: Charge,
    /// Not charged to the watermark: made when a text client is first handed the message (a
    /// fraction of the body's size more), gone with it.
    rendering: Rendering,
    /// Set when the message is written to the store (persistent, in a durable queue); shared
    /// with the queue entries that paged it out.
    pub disk: Option<Arc<OnDisk>>,
}

/// A stored message's id and how many queue entries on disk still refer to it: the last one
/// to go removes the message record.
#[derive(Debug)]
pub(super) struct OnDisk {
    pub id: u64,
    refs: AtomicU64,
    /// Its write is durable: the store can give it back, so its body may leave memory.
    written: std::sync::atomic::AtomicBool,
}

impl OnDisk {
    pub fn new(id: u64, refs: u64, written: bool) -> Arc<OnDisk> {
        Arc::new(OnDisk {
            id,
            refs: AtomicU64::new(refs),
            written: std::sync::atomic::AtomicBool::new(written),
        })
    }

    pub fn mark_written(&self) {
        self.written.store(true, Ordering::Release);
    }

    pub fn is_written(&self) -> bool {
        self.written.load(Ordering::Acquire)
    }

    /// One entry went; true when it was the last.
    pub fn release(&self) -> bool {
        self.refs.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// What a message costs the engine's memory besides its body and headers: its envelope with
/// the properties and this accounting (one 448-byte allocation), its queue entry, its routing
/// key, rounded up.
const MESSAGE_OVERHEAD: u64 = 512;
/// What each header entry costs: its slot in the table and, often, a string value.
const HEADER_OVERHEAD: u64 = 128;

/// The bytes a message is charged against the watermark: its body, plus what holding it costs
/// besides. Bodies alone undercounted small messages sixteenfold — a queued MQTT message with a
/// 64-byte body and three headers takes 1,049 bytes of memory (docs/bench.md, 2026-12-03), and
/// is charged 960 — so a backlog of them could outgrow memory long before the watermark saw it.
pub fn held_size(envelope: &Envelope) -> u64 {
    let message = &envelope.message;
    message.body.len() as u64
        + MESSAGE_OVERHEAD
        + HEADER_OVERHEAD * message.properties.headers.len() as u64
}

impl Stored {
    pub fn new(envelope: Envelope, held: &Arc<Held>, disk: Option<Arc<OnDisk>>) -> Stored {
        let charge = Charge::new(held, held_size(&envelope));
        Stored {
            envelope,
            _charge: charge,
            rendering: Rendering::new(),
            disk,
        }
    }
}

impl std::ops::Deref for Stored {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

impl EnvelopeRef for Stored {
    fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    fn rendering(&self) -> Option<&Rendering> {
        Some(&self.rendering)
    }
}
