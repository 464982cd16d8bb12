//! Pacing (DESIGN.md §7): a gauge on every buffer that would drop what it holds — a
//! connection's outbound buffer of auto-ack / QoS 0 deliveries, a bounded drop-head queue with
//! consumers — and the wait a publisher takes when its publish landed in one above its
//! high-water mark.
//!
//! ```text
//!  fill ▲
//! bound ┤━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  full: drop oldest (counted) — only a slow consumer gets here
//!  3/4  ┤─ ─ ─ ─ ╱╲─ ─ ─ ─ ─ ─ ─ ─ ─ ─  high: publishes landing here park their connection
//!  1/2  ┤─ ─ ─ ─╱─ ╲ ─ ─ ─ ─ ─ ─ ─ ─ ─  low: parked publishers are released
//!       ┤     ╱     ╲___
//!       └──────────────────────────▶ time
//! ```
//!
//! A gauge is *clear* until its fill reaches high, then *pacing* until it falls below low. A
//! publisher that waited [`Pace::released`]'s `deadline` (`limits.pace_max_wait`) for a gauge
//! still pacing marks it *slow*: a slow gauge paces nobody until it is below low again, so one
//! stalled consumer costs each publisher at most one bounded wait and then meets the drop
//! policy instead of holding publishers back.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

const CLEAR: u8 = 0;
const PACING: u8 = 1;
const SLOW: u8 = 2;

/// A buffer's bound, in messages and body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub messages: u64,
    pub bytes: u64,
}

struct Gauge {
    /// High is 3/4 of it and low 1/2 (in messages or bytes, whichever is reached first):
    /// worked out at each look, where storing them was 32 bytes of every connection's gauge.
    bound: Bound,
    messages: AtomicU64,
    bytes: AtomicU64,
    state: AtomicU8,
    /// Notified when the fill falls below low (or the gauge is marked slow). Made when the
    /// gauge first reaches high, before it starts pacing: only a pacing gauge is waited on or
    /// notified, and most buffers never get there (in place it was 16 bytes more of every
    /// connection's gauge, past a size class).
    drained: OnceLock<Box<Notify>>,
    /// Counts the pacing episodes that ended: a publisher waits for the episode it met to end,
    /// not for the buffer to be below low at the moment it looks (other publishers released
    /// with it may have filled it again).
    episodes: AtomicU64,
    /// When the current pacing episode began, as signed nanoseconds from [`EPOCH`].
    since: AtomicI64,
    /// Whose buffer this is (the `kind` label of the slow-consumer metric).
    kind: BufferKind,
    /// Messages dropped from (or refused by) this buffer because it was full.
    dropped: AtomicU64,
}

/// The instant episodes are counted from, one for the process (an instant in each gauge was
/// 16 bytes of every connection). Signed offsets: under a test's paused clock, `now` may be
/// before the moment this was first read.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn since_epoch(at: Instant) -> i64 {
    let nanos = |d: Duration| d.as_nanos().min(i64::MAX as u128) as i64;
    match at.checked_duration_since(*EPOCH) {
        Some(d) => nanos(d),
        None => -nanos(*EPOCH - at),
    }
}

fn from_epoch(nanos: i64) -> Instant {
    let d = Duration::from_nanos(nanos.unsigned_abs());
    if nanos >= 0 { *EPOCH + d } else { *EPOCH - d }
}

/// `n`'s high-water mark (3/4) and low-water mark (1/2), at least 1 each.
fn high(n: u64) -> u64 {
    ((u128::from(n) * 3) / 4).max(1) as u64
}

fn low(n: u64) -> u64 {
    (n / 2).max(1)
}

/// Whose buffer a gauge measures: the `kind` label of the slow-consumer metric. A byte, where
/// a `&'static str` was 16 bytes of every connection's gauge and took it past a size class
/// (128 bytes, where 112 is one; docs/bench.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    /// An MQTT connection's QoS 0 outbound buffer.
    Mqtt,
    /// A `/ws` connection's send queue.
    Ws,
    /// A Server-Sent Events stream's send queue.
    Sse,
    /// A bounded drop-head queue of the embedded engine.
    Queue,
}

impl BufferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BufferKind::Mqtt => "mqtt",
            BufferKind::Ws => "ws",
            BufferKind::Sse => "sse",
            BufferKind::Queue => "queue",
        }
    }
}

impl Gauge {
    /// Its `Notify`, made before the gauge first paced (in [`Pressure::add`]): whoever saw it
    /// pacing — a waiter, or the one ending the episode — finds it.
    fn drained(&self) -> &Notify {
        self.drained.get_or_init(Box::default)
    }
}

/// A shared handle on one buffer's gauge: the buffer's owner counts into it, publishers whose
/// messages land in the buffer read it.
#[derive(Clone)]
pub struct Pressure(Arc<Gauge>);

impl Pressure {
    /// A gauge for a buffer of `bound`: high at 3/4 of it, low at 1/2 (in messages or bytes,
    /// whichever is reached first).
    pub fn new(bound: Bound, kind: BufferKind) -> Pressure {
        Pressure(Arc::new(Gauge {
            bound,
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state: AtomicU8::new(CLEAR),
            drained: OnceLock::new(),
            episodes: AtomicU64::new(0),
            since: AtomicI64::new(0),
            kind,
            dropped: AtomicU64::new(0),
        }))
    }

    /// [`Pressure::new`] for a buffer that already holds `messages` of `bytes` (a queue's
    /// backlog, gauged from the first time it grows large).
    pub fn holding(bound: Bound, kind: BufferKind, messages: u64, bytes: u64) -> Pressure {
        let p = Pressure::new(bound, kind);
        p.0.messages.store(messages, Ordering::Release);
        p.0.bytes.store(bytes, Ordering::Release);
        p.reached(messages, bytes);
        p
    }

    /// Whose buffer this is.
    pub fn kind(&self) -> BufferKind {
        self.0.kind
    }

    /// A message was dropped because this buffer was full (operators see the count).
    pub fn count_drop(&self) {
        self.0.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    /// One message of `bytes` entered the buffer.
    pub fn add(&self, bytes: u64) {
        let g = &*self.0;
        let m = g.messages.fetch_add(1, Ordering::AcqRel) + 1;
        let b = g.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.reached(m, b);
    }

    /// Starts pacing when `m` messages or `b` bytes reach high.
    fn reached(&self, m: u64, b: u64) {
        let g = &*self.0;
        if m >= high(g.bound.messages) || b >= high(g.bound.bytes) {
            // Made before the switch, so whoever sees it pacing finds it.
            g.drained();
            if g.state
                .compare_exchange(CLEAR, PACING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                g.since
                    .store(since_epoch(Instant::now()), Ordering::Release);
                // A concurrent `sub` may have taken it below low between our count and the
                // switch: look again, or waiters would sit out their whole deadline.
                self.check_drained();
            }
        }
    }

    /// One message of `bytes` left the buffer (written or dropped).
    pub fn sub(&self, bytes: u64) {
        let g = &*self.0;
        g.messages.fetch_sub(1, Ordering::AcqRel);
        g.bytes.fetch_sub(bytes, Ordering::AcqRel);
        if g.state.load(Ordering::Acquire) != CLEAR {
            self.check_drained();
        }
    }

    fn check_drained(&self) {
        let g = &*self.0;
        if g.messages.load(Ordering::Acquire) < low(g.bound.messages)
            && g.bytes.load(Ordering::Acquire) < low(g.bound.bytes)
            && g.state.swap(CLEAR, Ordering::AcqRel) != CLEAR
        {
            g.episodes.fetch_add(1, Ordering::AcqRel);
            g.drained().notify_waiters();
        }
    }

    /// Above high and not given up on: publishes landing here wait.
    pub fn paces(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == PACING
    }

    /// Resolves once the gauge does not pace, or once `episode` is over.
    async fn episode_over(&self, episode: u64) {
        loop {
            let notified = self.0.drained().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.paces() || episode != self.episode() {
                return;
            }
            notified.await;
        }
    }

    /// For the consumer that stopped taking deliveries while this gauge paces: resolves when
    /// it may take them again — the episode ended, or it has lasted `max_wait`, when the
    /// consumer is marked slow itself (its publishers may never wait for it: they published
    /// before it filled, or they are not paced, as the engine's own dead letters).
    /// Cancel-safe, and the same deadline however often it is called.
    pub async fn resume(&self, max_wait: Duration) {
        let episode = self.episode();
        let deadline = from_epoch(self.0.since.load(Ordering::Acquire)) + max_wait;
        let over = self.episode_over(episode);
        if tokio::time::timeout_at(deadline, over).await.is_err() {
            self.mark_slow(episode);
        }
    }

    fn episode(&self) -> u64 {
        self.0.episodes.load(Ordering::Acquire)
    }

    /// Marked slow and not yet drained below low.
    pub fn is_slow(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == SLOW
    }

    /// Whether one more message of `bytes` would pass the bound (an empty buffer always takes
    /// one, however large).
    pub fn is_full(&self, bytes: u64) -> bool {
        let g = &*self.0;
        let m = g.messages.load(Ordering::Acquire);
        m >= g.bound.messages || (m > 0 && g.bytes.load(Ordering::Acquire) + bytes > g.bound.bytes)
    }

    pub fn bound(&self) -> Bound {
        self.0.bound
    }

    /// (messages, bytes) in the buffer now.
    pub fn fill(&self) -> (u64, u64) {
        (
            self.0.messages.load(Ordering::Acquire),
            self.0.bytes.load(Ordering::Acquire),
        )
    }

    /// A publisher waited its deadline for `episode` of this gauge: unless that one ended
    /// meanwhile, it paces nobody until below low.
    fn mark_slow(&self, episode: u64) {
        if self.episode() == episode
            && self
                .0
                .state
                .compare_exchange(PACING, SLOW, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            crate::metrics::slow_consumer_marked(self.0.kind.as_str());
            // Its consumer, if it paused, takes deliveries again (and drops the oldest).
            self.0.drained().notify_waiters();
        }
    }

    fn same(&self, other: &Pressure) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Two handles are equal when they are the same gauge.
impl PartialEq for Pressure {
    fn eq(&self, other: &Self) -> bool {
        self.same(other)
    }
}

impl std::fmt::Debug for Pressure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (m, b) = self.fill();
        f.debug_struct("Pressure")
            .field("kind", &self.0.kind.as_str())
            .field("messages", &m)
            .field("bytes", &b)
            .field("state", &self.0.state.load(Ordering::Relaxed))
            .finish()
    }
}

/// The gauges a publish landed in above their high-water mark: the publisher's connection
/// parks its further publishes until they drained or the deadline passed. Empty (and without
/// an allocation) for almost every publish.
///
/// Boxed, a null pointer when empty: a publish makes and drops several (its confirm, the
/// queues' effects), and an empty `Vec`'s drop was an outlined call of some 20 instructions
/// each, 110 per QoS 1 message (docs/bench.md); a null check is inlined.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pace {
    /// Each gauge with the episode the publish met; `None` rather than an empty list.
    #[allow(
        clippy::box_collection,
        reason = "a null check where an empty Vec's drop was a call (see above)"
    )]
    gauges: Option<Box<Vec<(Pressure, u64)>>>,
}

impl Pace {
    /// Adds a gauge that paces (once).
    pub fn push(&mut self, p: &Pressure) {
        self.push_episode(p, p.episode());
    }

    fn push_episode(&mut self, p: &Pressure, episode: u64) {
        let gauges = self.gauges.get_or_insert_default();
        if !gauges.iter().any(|(g, _)| g.same(p)) {
            gauges.push((p.clone(), episode));
        }
    }

    fn gauges(&self) -> &[(Pressure, u64)] {
        self.gauges.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Everything `other` waits for too (a gauge already waited for keeps its episode).
    pub fn merge(&mut self, other: Pace) {
        for (g, episode) in other.gauges() {
            self.push_episode(g, *episode);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.gauges().is_empty()
    }

    /// Nothing left to wait for.
    pub fn is_over(&self) -> bool {
        self.gauges()
            .iter()
            .all(|(g, e)| !g.paces() || g.episode() != *e)
    }

    /// Waits until the pacing episode of every gauge met is over (each was below its low-water
    /// mark at some point, or was given up on), or until `deadline`; then marks those still in
    /// the episode met slow. Cancel-safe: nothing changes until it returns.
    pub async fn released(&self, deadline: Instant) {
        let drained = async {
            for (g, episode) in self.gauges() {
                g.episode_over(*episode).await;
            }
        };
        if tokio::time::timeout_at(deadline, drained).await.is_err() {
            for (g, episode) in self.gauges() {
                g.mark_slow(*episode);
            }
        }
    }

    /// [`Pace::released`] within `max` from now; returns how long it waited.
    pub async fn wait(&self, max: Duration) -> Duration {
        let started = Instant::now();
        self.released(started + max).await;
        started.elapsed()
    }
}

/// One connection's stall: what its publishes wait for, and until when. A publish that paces
/// again during the stall adds its gauges but not time: a stall lasts at most
/// `limits.pace_max_wait`. Boxed: a session holds an `Option<Stall>` for its whole life and is
/// paced now and then, if ever (inline it was 48 bytes of every idle connection).
#[derive(Debug)]
pub struct Stall(Box<Stalled>);

#[derive(Debug)]
struct Stalled {
    pace: Pace,
    started: Instant,
    deadline: Instant,
}

impl Stall {
    pub fn new(pace: Pace, max_wait: Duration) -> Stall {
        let started = Instant::now();
        Stall(Box::new(Stalled {
            pace,
            started,
            deadline: started + max_wait,
        }))
    }

    /// Starts a stall for `pace`, or adds it to the one under way.
    pub fn begin(stall: &mut Option<Stall>, pace: Pace, max_wait: Duration) {
        if pace.is_empty() {
            return;
        }
        match stall {
            Some(s) => s.0.pace.merge(pace),
            None => *stall = Some(Stall::new(pace, max_wait)),
        }
    }

    /// Resolves when the stall is over (see [`Pace::released`]). Cancel-safe.
    pub async fn released(&self) {
        self.0.pace.released(self.0.deadline).await
    }

    /// How long it has lasted.
    pub fn elapsed(&self) -> Duration {
        self.0.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_stays_in_its_size_class() {
        // Every MQTT connection and `/ws` send queue has one: 80 bytes and the `Arc`'s counts
        // fill mimalloc's 96-byte class; 8 more take it to 112 (docs/bench.md).
        let size = std::mem::size_of::<Gauge>();
        assert!(size <= 80, "{size}");
    }

    fn gauge(messages: u64) -> Pressure {
        Pressure::new(
            Bound {
                messages,
                bytes: 1 << 20,
            },
            BufferKind::Queue,
        )
    }

    #[test]
    fn an_instant_survives_its_trip_through_the_epoch_on_either_side() {
        let epoch = *EPOCH;
        for at in [
            epoch,
            epoch + Duration::from_millis(1500),
            epoch - Duration::from_nanos(7),
        ] {
            assert_eq!(from_epoch(since_epoch(at)), at);
        }
    }

    #[test]
    fn watermarks_with_hysteresis() {
        let g = gauge(8);
        for _ in 0..5 {
            g.add(1);
        }
        assert!(!g.paces(), "5 of 8 is below high (6)");
        g.add(1);
        assert!(g.paces(), "6 of 8 is high");
        g.sub(1);
        g.sub(1);
        assert!(g.paces(), "4 is not below low (4)");
        g.sub(1);
        assert!(!g.paces(), "3 is below low");
        assert!(!g.is_full(1));
        for _ in 0..5 {
            g.add(1);
        }
        assert!(g.is_full(1), "8 of 8");
    }

    #[test]
    fn bytes_count_too() {
        let g = Pressure::new(
            Bound {
                messages: 1000,
                bytes: 100,
            },
            BufferKind::Queue,
        );
        g.add(80);
        assert!(g.paces(), "80 of 100 bytes is above high (75)");
        assert!(g.is_full(30));
        g.sub(80);
        assert!(!g.paces());
        assert!(!g.is_full(500), "an empty buffer takes one of any size");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_when_the_buffer_drains() {
        let g = gauge(4);
        for _ in 0..3 {
            g.add(1);
        }
        let mut pace = Pace::default();
        pace.push(&g);
        pace.push(&g);
        assert_eq!(pace.gauges().len(), 1, "one gauge once");
        let drainer = {
            let g = g.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                g.sub(1);
                g.sub(1);
            })
        };
        let waited = pace.wait(Duration::from_millis(100)).await;
        assert_eq!(waited, Duration::from_millis(10));
        assert!(!g.is_slow());
        drainer.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_buffer_is_waited_for_at_most_the_deadline_then_marked_slow() {
        let stalled = gauge(4);
        for _ in 0..3 {
            stalled.add(1);
        }
        let mut pace = Pace::default();
        pace.push(&stalled);
        let waited = pace.wait(Duration::from_millis(100)).await;
        assert_eq!(waited, Duration::from_millis(100));
        assert!(stalled.is_slow());
        assert!(!stalled.paces(), "a slow buffer paces nobody");
        stalled.add(1);
        assert!(!stalled.paces(), "not even when it grows");
        assert!(pace.is_over());
        for _ in 0..3 {
            stalled.sub(1);
        }
        assert!(!stalled.is_slow(), "below low it is clear again");
        stalled.add(1);
        stalled.add(1);
        assert!(stalled.paces(), "and paces again from high");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_consumer_resumes_after_the_wait_however_often_it_asks() {
        let g = gauge(4);
        for _ in 0..3 {
            g.add(1);
        }
        let started = Instant::now();
        // A connection loop re-creates the future on every other event.
        for _ in 0..3 {
            let _ = tokio::time::timeout(
                Duration::from_millis(30),
                g.resume(Duration::from_millis(100)),
            )
            .await;
        }
        g.resume(Duration::from_millis(100)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100),
            "one deadline"
        );
        assert!(g.is_slow(), "it marked itself slow");
    }
}
