//! The series touched once per message — messages in, out and acked, publish latency — kept
//! where counting costs an atomic add. The `metrics` macros build and hash a key and look it
//! up in the registry on every call, and the exporter's histograms keep every sample (24
//! bytes, with a clock read) until the next scrape or upkeep: together a sixth of the
//! instructions of a delivered MQTT message under callgrind (docs/bench.md, "Per-message
//! cost").

use std::fmt::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use metrics::Counter;

use super::{MESSAGES_ACKED, MESSAGES_IN, MESSAGES_OUT, PUBLISH_LATENCY};

/// Upper bounds of the latency buckets, seconds (the exporter's buckets for every histogram).
pub(super) const BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// One protocol's per-message series. The counters are the exporter's (rendered by it); the
/// latency histogram is rendered by [`render_latency`].
struct Series {
    protocol: &'static str,
    messages_in: OnceLock<Counter>,
    messages_out: OnceLock<Counter>,
    latency: Latency,
}

impl Series {
    const fn new(protocol: &'static str) -> Self {
        Self {
            protocol,
            messages_in: OnceLock::new(),
            messages_out: OnceLock::new(),
            latency: Latency::new(),
        }
    }

    fn messages_in(&self) -> &Counter {
        registered(
            &self.messages_in,
            || metrics::counter!(MESSAGES_IN, "protocol" => self.protocol),
        )
    }

    fn messages_out(&self) -> &Counter {
        registered(
            &self.messages_out,
            || metrics::counter!(MESSAGES_OUT, "protocol" => self.protocol),
        )
    }
}

/// The counter in `slot`, looked up once the recorder is installed (a handle taken before it
/// would count into nothing).
fn registered(slot: &OnceLock<Counter>, lookup: impl FnOnce() -> Counter) -> &Counter {
    slot.get_or_init(|| {
        super::handle();
        lookup()
    })
}

/// Every protocol that publishes or delivers; the last one takes any other name (none today).
static SERIES: [Series; 6] = [
    Series::new("mqtt"),
    Series::new("ws"),
    Series::new("rest"),
    Series::new("amqp"),
    Series::new("sse"),
    Series::new("other"),
];

fn series(protocol: &'static str) -> &'static Series {
    let (known, other) = SERIES.split_at(SERIES.len() - 1);
    // The adapters' names are the same literals as these, which the linker merges: the
    // address says it without a call to `memcmp` on every message.
    known
        .iter()
        .find(|s| std::ptr::eq(s.protocol, protocol) || s.protocol == protocol)
        .unwrap_or(&other[0])
}

/// A fixed-bucket histogram of atomics: bounded memory however many samples, no clock read.
struct Latency {
    /// Per bucket (not cumulative), the last one above every bound (`+Inf`).
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, latency: Duration) {
        let secs = latency.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Prometheus histogram lines (cumulative buckets, `_sum`, `_count`); nothing before the
    /// first sample, as the exporter did.
    fn render(&self, protocol: &str, out: &mut String) {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{PUBLISH_LATENCY}_bucket{{protocol=\"{protocol}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{PUBLISH_LATENCY}_bucket{{protocol=\"{protocol}\",le=\"+Inf\"}} {total}"
        );
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{PUBLISH_LATENCY}_sum{{protocol=\"{protocol}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "{PUBLISH_LATENCY}_count{{protocol=\"{protocol}\"}} {total}"
        );
    }
}

pub fn message_in(protocol: &'static str, latency: Duration) {
    let series = series(protocol);
    series.messages_in().increment(1);
    series.latency.record(latency);
}

pub fn messages_out(protocol: &'static str, n: u64) {
    series(protocol).messages_out().increment(n);
}

/// Deliveries a client acknowledged (MQTT PUBACK/PUBCOMP, WebSocket and SSE acks, AMQP
/// `basic.ack`, REST pulls), counted where the engine settles them.
pub fn acked(n: u64) {
    static ACKED: OnceLock<Counter> = OnceLock::new();
    registered(&ACKED, || metrics::counter!(MESSAGES_ACKED)).increment(n);
}

pub(super) fn render_latency(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP {PUBLISH_LATENCY} Time from a publish's arrival to the engine's confirm, by protocol (0 for a confirm the engine gave within the publish call)\n# TYPE {PUBLISH_LATENCY} histogram"
    );
    for series in &SERIES {
        series.latency.render(series.protocol, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_with_sum_and_count() {
        let latency = Latency::new();
        latency.record(Duration::from_micros(40));
        latency.record(Duration::from_micros(300));
        latency.record(Duration::from_secs(3));
        let mut out = String::new();
        latency.render("mqtt", &mut out);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {out}"))
                .rsplit(' ')
                .next()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        let bucket = |le: &str| {
            line(&format!(
                "{PUBLISH_LATENCY}_bucket{{protocol=\"mqtt\",le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.00005"), "1");
        assert_eq!(bucket("0.00025"), "1");
        assert_eq!(bucket("0.0005"), "2");
        assert_eq!(bucket("2.5"), "2");
        assert_eq!(bucket("+Inf"), "3");
        assert_eq!(line(&format!("{PUBLISH_LATENCY}_count")), "3");
        let sum: f64 = line(&format!("{PUBLISH_LATENCY}_sum"))
            .parse()
            .unwrap_or(0.0);
        assert!((sum - 3.00034).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn an_unused_histogram_renders_nothing() {
        let mut out = String::new();
        Latency::new().render("ws", &mut out);
        assert!(out.is_empty());
    }
}
