//! Prometheus metrics: one process-wide recorder (the `metrics` facade), rendered as text on
//! `metrics.listen` and on `/metrics` for monitoring tokens. Names and labels are defined here so
//! every adapter counts the same way.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;

mod per_message;

pub use per_message::{acked, message_in, messages_out};

pub const CONNECTIONS_TOTAL: &str = "gateway_connections_total";
pub const CONNECTIONS_OPEN: &str = "gateway_connections_open";
pub const CONNECTIONS_CLOSED: &str = "gateway_connections_closed_total";
pub const MESSAGES_IN: &str = "gateway_messages_in_total";
pub const MESSAGES_OUT: &str = "gateway_messages_out_total";
pub const MESSAGES_ACKED: &str = "gateway_messages_acked_total";
pub const PUBLISH_LATENCY: &str = "gateway_publish_latency_seconds";
pub const REFUSALS: &str = "gateway_refusals_total";
pub const QUEUED_MESSAGES: &str = "gateway_queued_messages";
pub const QUEUED_BYTES: &str = "gateway_queued_bytes";
pub const QUEUES: &str = "gateway_queues";
pub const HELD_BYTES: &str = "gateway_engine_held_bytes";
pub const DROPPED: &str = "gateway_engine_dropped_total";
pub const PUBLISH_BLOCKED: &str = "gateway_publish_blocked";
/// Free bytes on the embedded engine's data directory, as the disk alarm last read them.
pub const DISK_FREE: &str = "gateway_disk_free_bytes";
pub const STORE_COMMITS: &str = "gateway_store_commits_total";
/// 1 from a failed store write until the store is reopened.
pub const STORE_FAILED: &str = "gateway_store_failed";
pub const PACED_SECONDS: &str = "gateway_publish_paced_seconds_total";
pub const SLOW_CONSUMERS: &str = "gateway_slow_consumers_marked_total";
pub const DELIVERIES_DROPPED: &str = "gateway_deliveries_dropped_total";
/// 1 while the upstream engine's connections to its broker are up.
pub const UPSTREAM_CONNECTED: &str = "gateway_upstream_connected";
pub const UPSTREAM_RECONNECTS: &str = "gateway_upstream_reconnects_total";
pub const UPSTREAM_ROUND_TRIP: &str = "gateway_upstream_round_trip_seconds";
pub const UPSTREAM_CHANNELS: &str = "gateway_upstream_channels";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder once per process (several in-process gateways share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&per_message::BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    describe_upstream();
    zero_series();
    metrics::describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted, by protocol"
    );
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Client connections open, by protocol");
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Client connections closed, by protocol and reason (who closed and why)"
    );
    metrics::describe_counter!(REFUSALS, "Requests refused, by protocol and reason");
    metrics::describe_gauge!(
        QUEUED_MESSAGES,
        "Ready messages held in queues (embedded engine)"
    );
    metrics::describe_gauge!(QUEUED_BYTES, "Body bytes of ready messages held in queues");
    metrics::describe_gauge!(QUEUES, "Queues that exist");
    metrics::describe_gauge!(
        HELD_BYTES,
        "Body bytes the engine holds (a message in many queues counts once)"
    );
    metrics::describe_counter!(
        DROPPED,
        "Messages a queue dropped with nowhere to dead-letter them, by reason (maxlen, expired, rejected)"
    );
    metrics::describe_counter!(
        SLOW_CONSUMERS,
        "Buffers marked slow after a publisher's whole pacing wait, by kind (mqtt, ws: a connection's outbound buffer; queue: a bounded queue)"
    );
    metrics::describe_counter!(
        DELIVERIES_DROPPED,
        "Deliveries dropped before reaching a client, by protocol and reason (slow_consumer: its buffer was full; packet_too_large; unmappable_topic)"
    );
    metrics::describe_counter!(
        STORE_COMMITS,
        "Group commits of the embedded engine's store (each one batch and one fsync)"
    );
    metrics::describe_gauge!(
        PUBLISH_BLOCKED,
        "1 while publishes are throttled for the memory high watermark or the disk alarm"
    );
    metrics::describe_gauge!(
        DISK_FREE,
        "Free bytes on the embedded engine's data directory (below engine.disk_free_limit: the disk alarm)"
    );
    metrics::describe_gauge!(
        STORE_FAILED,
        "1 from a failed write of the embedded engine's store (a full disk, an I/O error) until it is reopened: persistent publishes are refused meanwhile"
    );
}

pub fn refusal(protocol: &'static str, reason: &'static str) {
    metrics::counter!(REFUSALS, "protocol" => protocol, "reason" => reason).increment(1);
}

/// A publisher connection waited for pacing (DESIGN.md §7). Kept as nanoseconds here and
/// rendered as seconds by [`render`]: the exporter's counters are integers.
pub fn paced(protocol: &'static str, waited: Duration) {
    let nanos = waited.as_nanos().min(u128::from(u64::MAX)) as u64;
    let slot = PACED
        .iter()
        .find(|(p, _)| *p == protocol)
        .map_or(&PACED_OTHER, |(_, n)| n);
    slot.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
}

static PACED: [(&str, std::sync::atomic::AtomicU64); 4] = [
    ("mqtt", std::sync::atomic::AtomicU64::new(0)),
    ("ws", std::sync::atomic::AtomicU64::new(0)),
    ("rest", std::sync::atomic::AtomicU64::new(0)),
    ("amqp", std::sync::atomic::AtomicU64::new(0)),
];
static PACED_OTHER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn render_paced(out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {PACED_SECONDS} Seconds publisher connections spent parked because their messages landed in a buffer above its high-water mark, by protocol\n# TYPE {PACED_SECONDS} counter"
    );
    for (protocol, nanos) in &PACED {
        let secs = nanos.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{PACED_SECONDS}{{protocol=\"{protocol}\"}} {secs}");
    }
}

/// A buffer stayed above its high-water mark for a publisher's whole pacing wait: it paces
/// nobody until it drains below low, and meanwhile drops its oldest (DESIGN.md §7).
pub fn slow_consumer_marked(kind: &'static str) {
    metrics::counter!(SLOW_CONSUMERS, "kind" => kind).increment(1);
}

/// A delivery a client will never see, by protocol and why.
pub fn delivery_dropped(protocol: &'static str, reason: &'static str) {
    metrics::counter!(DELIVERIES_DROPPED, "protocol" => protocol, "reason" => reason).increment(1);
}

pub fn connection_opened(protocol: &'static str) {
    metrics::counter!(CONNECTIONS_TOTAL, "protocol" => protocol).increment(1);
    metrics::gauge!(CONNECTIONS_OPEN, "protocol" => protocol).increment(1.0);
}

pub fn connection_closed(protocol: &'static str, reason: &'static str) {
    metrics::gauge!(CONNECTIONS_OPEN, "protocol" => protocol).decrement(1.0);
    metrics::counter!(CONNECTIONS_CLOSED, "protocol" => protocol, "reason" => reason).increment(1);
}

/// The series a dashboard plots from the start, at zero until something happens: a counter
/// that has never been incremented is absent, and `rate()` of an absent series shows "no data"
/// where an operator should read "none".
fn zero_series() {
    for kind in ["mqtt", "ws", "sse", "queue"] {
        metrics::counter!(SLOW_CONSUMERS, "kind" => kind).increment(0);
    }
    for protocol in ["mqtt", "ws", "sse", "amqp"] {
        metrics::counter!(DELIVERIES_DROPPED, "protocol" => protocol, "reason" => "slow_consumer")
            .increment(0);
    }
    for reason in ["maxlen", "expired", "rejected"] {
        metrics::counter!(DROPPED, "reason" => reason).increment(0);
    }
}

/// The Prometheus text, with the engine's gauges read now.
pub fn render(engine: &dyn Engine) -> String {
    engine.record_metrics();
    let handle = handle();
    handle.run_upkeep();
    let mut out = handle.render();
    per_message::render(&mut out);
    render_paced(&mut out);
    out
}

/// Folds the exporter's histogram samples into their buckets: it keeps every sample until
/// then, so an unscraped gateway would grow by each one.
pub fn upkeep() {
    handle().run_upkeep();
}

fn describe_upstream() {
    metrics::describe_gauge!(
        UPSTREAM_CONNECTED,
        "1 while the upstream engine is connected to its broker, 0 while it reconnects"
    );
    metrics::describe_counter!(
        UPSTREAM_RECONNECTS,
        "Times the upstream engine re-established its broker connections"
    );
    metrics::describe_histogram!(
        UPSTREAM_ROUND_TRIP,
        metrics::Unit::Seconds,
        "Round trip of a passive declare to the upstream broker, measured every 5 s"
    );
    metrics::describe_gauge!(
        UPSTREAM_CHANNELS,
        "AMQP channels the upstream engine holds open on its broker"
    );
}
