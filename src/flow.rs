//! Per-client flow control (DESIGN.md §7): publish rate limits per connection (messages and body
//! bytes) and per subject, as token buckets (governor); pacing of publishers whose messages
//! land in buffers above their high-water mark ([`Pressure`], [`Pace`]). Nothing here knows a protocol: adapters ask
//! [`Flow::admit_publish`] and turn a [`Throttled`] into their own answer (REST 429, WS
//! `rate_limited`, MQTT withheld acks).

mod admission;
mod pressure;

pub use self::admission::{Admission, Admitted, Full, Unauthenticated};
pub use self::pressure::{Bound, BufferKind, Pace, Pressure, Stall};

use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::LimitsConfig;

/// Which bucket ran dry; also the `reason` label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleReason {
    ConnectionRate,
    ConnectionBytes,
    SubjectRate,
    /// The engine is above its memory high watermark: not this client's doing, so adapters
    /// answer "overloaded" rather than "rate limited".
    MemoryWatermark,
    /// The data directory's disk is below `engine.disk_free_limit`: not the client's doing
    /// either.
    DiskAlarm,
    /// The upstream broker sent `connection.blocked` (its own memory or disk alarm).
    UpstreamBlocked,
}

impl ThrottleReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottleReason::ConnectionRate => "connection_rate",
            ThrottleReason::ConnectionBytes => "connection_bytes",
            ThrottleReason::SubjectRate => "subject_rate",
            ThrottleReason::MemoryWatermark => "memory_watermark",
            ThrottleReason::DiskAlarm => "disk_alarm",
            ThrottleReason::UpstreamBlocked => "upstream_blocked",
        }
    }
}

/// A publish that must wait: when it may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub reason: ThrottleReason,
    pub retry_after: Duration,
}

/// What the client is told, whatever the protocol.
impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            ThrottleReason::MemoryWatermark => f.write_str(
                "the engine is above its memory high watermark; publishes resume as consumers drain it",
            ),
            ThrottleReason::DiskAlarm => f.write_str(
                "the gateway's disk is below its free-space limit; publishes resume when space is freed",
            ),
            ThrottleReason::UpstreamBlocked => f.write_str(
                "the upstream broker blocked publishing (its memory or disk alarm); publishes resume when it unblocks",
            ),
            reason => write!(f, "publish rate limit ({}) reached", reason.as_str()),
        }
    }
}

impl Throttled {
    /// Above the memory watermark: try again shortly (consumers drain it at their own pace).
    pub fn memory() -> Throttled {
        Throttled {
            reason: ThrottleReason::MemoryWatermark,
            retry_after: Duration::from_millis(250),
        }
    }

    /// Below the disk's free-space limit: space returns as queues drain (checked every second).
    pub fn disk() -> Throttled {
        Throttled {
            reason: ThrottleReason::DiskAlarm,
            retry_after: Duration::from_secs(1),
        }
    }

    /// The upstream broker's alarm: it says when it is over (`connection.unblocked`).
    pub fn upstream() -> Throttled {
        Throttled {
            reason: ThrottleReason::UpstreamBlocked,
            retry_after: Duration::from_secs(1),
        }
    }

    /// The engine refused for its own reasons (memory, disk), not the client's rate.
    pub fn is_engine_alarm(&self) -> bool {
        matches!(
            self.reason,
            ThrottleReason::MemoryWatermark
                | ThrottleReason::DiskAlarm
                | ThrottleReason::UpstreamBlocked
        )
    }

    /// Whole seconds for an HTTP `Retry-After` header (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// governor's default clock (quanta's), one for the whole process: each `QuantaClock` is 40
/// bytes, and every connection had two buckets, each with its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedClock;

impl Clock for SharedClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        static QUANTA: LazyLock<quanta::Clock> = LazyLock::new(quanta::Clock::new);
        Nanos::new(QUANTA.delta_as_nanos(0, QUANTA.raw()))
    }
}

/// A connection's bucket.
type Bucket = RateLimiter<NotKeyed, InMemoryState, SharedClock, NoOpMiddleware<Nanos>>;

fn nz(n: u64) -> NonZeroU32 {
    NonZeroU32::new(n.clamp(1, u64::from(u32::MAX)) as u32).unwrap_or(NonZeroU32::MIN)
}

/// The buckets of one client connection, made at its first publish: a bucket starts full, so
/// one made then holds what one made at the accept would, and a subscriber that never
/// publishes — most idle devices — keeps 8 bytes here, not 64 (docs/bench.md). A `OnceBox`,
/// a pointer where a `OnceLock` is two words: two first publishes at once (streams of one
/// HTTP/2 connection) may both make buckets, and the one stored first stands.
#[derive(Default)]
pub struct ConnectionLimits(once_cell::race::OnceBox<Buckets>);

struct Buckets {
    messages: Bucket,
    bytes: Bucket,
    /// The bucket of the subject this connection first published as, kept so its next
    /// publishes check it without the map (see [`Flow::subjects`]).
    subject: std::sync::OnceLock<(Arc<str>, Arc<Bucket>)>,
}

impl std::fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionLimits")
    }
}

/// The gateway-wide flow-control state: quotas, the per-subject buckets, connection admission.
pub struct Flow {
    pub admission: Admission,
    message_quota: Quota,
    byte_quota: Quota,
    /// One bucket per subject, shared by its connections. A connection keeps its subject's
    /// after its first publish: looked up on every publish, the map (a hash, a shard lock
    /// and a key comparison, on a map every publisher shares) was a quarter of the gate's
    /// cost, and in the 50→1 bench all fifty publishers took the one shard's lock each time.
    /// foldhash, not SipHash: a connection's first publish and REST's other subjects look up.
    subjects: dashmap::DashMap<Arc<str>, Arc<Bucket>, foldhash::fast::RandomState>,
    subject_quota: Quota,
}

impl Flow {
    pub fn new(limits: &LimitsConfig) -> Flow {
        let message_quota = Quota::per_second(nz(u64::from(limits.publish_rate)))
            .allow_burst(nz(u64::from(limits.publish_burst)));
        let byte_quota = Quota::per_second(nz(limits.publish_bytes_rate.as_u64()));
        let subject_quota = Quota::per_second(nz(u64::from(limits.subject_publish_rate)));
        Flow {
            admission: Admission::new(limits),
            message_quota,
            byte_quota,
            subjects: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
            subject_quota,
        }
    }

    /// Fresh buckets for a new connection (made full at its first publish).
    pub fn connection(&self) -> ConnectionLimits {
        ConnectionLimits::default()
    }

    /// Takes one publish of `bytes` body bytes from the connection's and the subject's buckets,
    /// or says when to try again.
    pub fn admit_publish(
        &self,
        conn: &ConnectionLimits,
        subject: &Arc<str>,
        bytes: usize,
    ) -> Result<(), Throttled> {
        let wait = |nu: governor::NotUntil<_>, reason| Throttled {
            reason,
            retry_after: nu.wait_time_from(SharedClock.now()),
        };
        let conn = conn.0.get_or_init(|| {
            Box::new(Buckets {
                messages: RateLimiter::direct_with_clock(self.message_quota, SharedClock),
                bytes: RateLimiter::direct_with_clock(self.byte_quota, SharedClock),
                subject: std::sync::OnceLock::new(),
            })
        });
        conn.messages
            .check()
            .map_err(|nu| wait(nu, ThrottleReason::ConnectionRate))?;
        if let Some(n) = NonZeroU32::new(bytes.min(u32::MAX as usize) as u32) {
            match conn.bytes.check_n(n) {
                Ok(Ok(())) => {}
                Ok(Err(nu)) => return Err(wait(nu, ThrottleReason::ConnectionBytes)),
                // More than the bucket ever holds: configuration keeps this from happening
                // (publish_bytes_rate ≥ max_message_bytes), but never let it through.
                Err(_) => {
                    return Err(Throttled {
                        reason: ThrottleReason::ConnectionBytes,
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
        let checked = match conn.subject.get() {
            // `Arc`'s equality looks at the address before the bytes.
            Some((kept, bucket)) if kept == subject => bucket.check(),
            // The first publish, or one as another subject (REST: a token per request).
            _ => {
                let bucket = self.subject_bucket(subject);
                let checked = bucket.check();
                let _ = conn.subject.set((subject.clone(), bucket));
                checked
            }
        };
        checked.map_err(|nu| wait(nu, ThrottleReason::SubjectRate))
    }

    /// `subject`'s bucket, made full if it has none.
    fn subject_bucket(&self, subject: &Arc<str>) -> Arc<Bucket> {
        if let Some(bucket) = self.subjects.get(subject) {
            return bucket.clone();
        }
        let quota = self.subject_quota;
        self.subjects
            .entry(subject.clone())
            .or_insert_with(|| Arc::new(RateLimiter::direct_with_clock(quota, SharedClock)))
            .clone()
    }

    /// Forgets subjects whose buckets no connection holds and are full again (bounded
    /// memory); run periodically. Full is told by taking the whole burst, which only a full
    /// bucket gives: one forgotten is made full again when its subject next publishes.
    pub fn housekeeping(&self) {
        let burst = self.subject_quota.burst_size();
        self.subjects.retain(|_, bucket| {
            // Under the shard's lock: a bucket only the map holds cannot be taken meanwhile.
            Arc::strong_count(bucket) > 1 || !matches!(bucket.check_n(burst), Ok(Ok(())))
        });
        self.subjects.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;

    fn limits(rate: u32, burst: u32, subject: u32, bytes: u64) -> LimitsConfig {
        LimitsConfig {
            publish_rate: rate,
            publish_burst: burst,
            subject_publish_rate: subject,
            publish_bytes_rate: ByteSize::b(bytes),
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn a_connection_that_never_publishes_holds_no_buckets() {
        let flow = Flow::new(&limits(1, 3, 1000, 1 << 20));
        let conn = flow.connection();
        assert!(conn.0.get().is_none(), "made at the first publish");
        assert!(std::mem::size_of::<ConnectionLimits>() <= 8);
        // Made then, they start full: the whole burst, then the rate.
        for _ in 0..3 {
            assert!(flow.admit_publish(&conn, &"s".into(), 1).is_ok());
        }
        assert!(conn.0.get().is_some());
        let t = flow.admit_publish(&conn, &"s".into(), 1).unwrap_err();
        assert_eq!(t.reason, ThrottleReason::ConnectionRate);
    }

    #[test]
    fn connection_burst_then_throttle() {
        let flow = Flow::new(&limits(1, 3, 1000, 1 << 20));
        let conn = flow.connection();
        for _ in 0..3 {
            assert!(flow.admit_publish(&conn, &"s".into(), 1).is_ok());
        }
        let t = flow.admit_publish(&conn, &"s".into(), 1).unwrap_err();
        assert_eq!(t.reason, ThrottleReason::ConnectionRate);
        assert!(t.retry_after > Duration::ZERO && t.retry_after <= Duration::from_secs(1));
        assert_eq!(t.retry_after_secs(), 1);
        // Another connection has its own bucket.
        assert!(
            flow.admit_publish(&flow.connection(), &"s".into(), 1)
                .is_ok()
        );
    }

    #[test]
    fn subject_bucket_spans_connections() {
        let flow = Flow::new(&limits(1000, 1000, 2, 1 << 20));
        assert!(
            flow.admit_publish(&flow.connection(), &"alice".into(), 1)
                .is_ok()
        );
        assert!(
            flow.admit_publish(&flow.connection(), &"alice".into(), 1)
                .is_ok()
        );
        let t = flow
            .admit_publish(&flow.connection(), &"alice".into(), 1)
            .unwrap_err();
        assert_eq!(t.reason, ThrottleReason::SubjectRate);
        assert!(
            flow.admit_publish(&flow.connection(), &"bob".into(), 1)
                .is_ok()
        );
    }

    #[test]
    fn a_connection_publishing_as_two_subjects_draws_on_each_ones_bucket() {
        let flow = Flow::new(&limits(1000, 1000, 2, 1 << 20));
        let conn = flow.connection();
        let (alice, bob): (Arc<str>, Arc<str>) = ("alice".into(), "bob".into());
        for _ in 0..2 {
            assert!(flow.admit_publish(&conn, &alice, 1).is_ok());
        }
        // The connection keeps alice's bucket; bob's publishes on it still take bob's.
        for _ in 0..2 {
            assert!(flow.admit_publish(&conn, &bob, 1).is_ok());
        }
        for subject in [&bob, &alice] {
            let t = flow.admit_publish(&conn, subject, 1).unwrap_err();
            assert_eq!(t.reason, ThrottleReason::SubjectRate, "{subject}");
        }
        // An equal name in another allocation is the same subject.
        let t = flow
            .admit_publish(&flow.connection(), &"alice".into(), 1)
            .unwrap_err();
        assert_eq!(t.reason, ThrottleReason::SubjectRate);
    }

    #[test]
    fn housekeeping_forgets_only_full_buckets_no_connection_holds() {
        let flow = Flow::new(&limits(1000, 1000, 2, 1 << 20));
        // alice's bucket is full, and held (as a connection's kept bucket is).
        let held = flow.subject_bucket(&"alice".into());
        // bob's connection is gone, with one of his two tokens taken.
        assert!(
            flow.admit_publish(&flow.connection(), &"bob".into(), 1)
                .is_ok()
        );
        // carol's bucket was made and never drawn on.
        drop(flow.subject_bucket(&"carol".into()));
        flow.housekeeping();
        assert!(flow.subjects.contains_key("alice"), "held");
        drop(held);
        assert!(flow.subjects.contains_key("bob"), "not full again");
        assert!(!flow.subjects.contains_key("carol"), "full and unheld");
        // Looking at bob's took nothing: one token left, not a fresh two.
        let conn = flow.connection();
        assert!(flow.admit_publish(&conn, &"bob".into(), 1).is_ok());
        let t = flow.admit_publish(&conn, &"bob".into(), 1).unwrap_err();
        assert_eq!(t.reason, ThrottleReason::SubjectRate);
    }

    #[test]
    fn byte_bucket() {
        let flow = Flow::new(&limits(1000, 1000, 1000, 100));
        let conn = flow.connection();
        assert!(flow.admit_publish(&conn, &"s".into(), 80).is_ok());
        let t = flow.admit_publish(&conn, &"s".into(), 80).unwrap_err();
        assert_eq!(t.reason, ThrottleReason::ConnectionBytes);
        assert!(
            flow.admit_publish(&conn, &"s".into(), 1000).is_err(),
            "over the bucket size"
        );
    }
}
