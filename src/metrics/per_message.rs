//! The series touched once per message — messages in, out and acked, publish latency — kept
//! where counting costs an atomic add on a cache line of the counting thread's own, and
//! rendered here. The `metrics` macros build and hash a key and look it up in the registry on
//! every call, and the exporter's histograms keep every sample (24 bytes, with a clock read)
//! until the next scrape or upkeep: together a sixth of the instructions of a delivered MQTT
//! message under callgrind (docs/bench.md, "Per-message cost").

use std::cell::Cell;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use super::{MESSAGES_ACKED, MESSAGES_IN, MESSAGES_OUT, PUBLISH_LATENCY};

/// Upper bounds of the latency buckets, seconds (the exporter's buckets for every histogram).
pub(super) const BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Every protocol that publishes or delivers; the last one takes any other name (none today).
const PROTOCOLS: [&str; 6] = ["mqtt", "ws", "rest", "amqp", "sse", "other"];

/// Copies of every per-message count, one per thread as far as they go: a worker thread
/// counts into its own, and the figures are their sums. Counted into one atomic shared by
/// every worker (the exporter's counters), each message moved the counters' cache lines
/// between the cores: 4 % of the gateway's CPU in a 50→1 fan-in (`perf`, docs/bench.md,
/// "per-message counters kept per thread").
const SHARDS: usize = 8;

/// One thread's counts, a whole number of cache-line pairs (the adjacent-line prefetcher
/// fetches two), so no two shards share a line.
#[repr(align(128))]
struct Shard {
    series: [Series; PROTOCOLS.len()],
    acked: AtomicU64,
}

/// One protocol's counts.
struct Series {
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    /// Latency per bucket (not cumulative), the last one above every bound (`+Inf`).
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_nanos: AtomicU64,
}

impl Series {
    const fn new() -> Self {
        Self {
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            latency: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            latency_sum_nanos: AtomicU64::new(0),
        }
    }
}

static COUNTS: [Shard; SHARDS] = [const {
    Shard {
        series: [const { Series::new() }; PROTOCOLS.len()],
        acked: AtomicU64::new(0),
    }
}; SHARDS];

/// This thread's shard, handed out in turn at its first count.
fn shard() -> &'static Shard {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: Cell<Option<&'static Shard>> = const { Cell::new(None) };
    }
    MINE.with(|mine| {
        mine.get().unwrap_or_else(|| {
            let shard = &COUNTS[NEXT.fetch_add(1, Relaxed) % SHARDS];
            mine.set(Some(shard));
            shard
        })
    })
}

fn index(protocol: &'static str) -> usize {
    // The adapters' names are the same literals as these, which the linker merges: the
    // address says it without a call to `memcmp` on every message.
    PROTOCOLS[..PROTOCOLS.len() - 1]
        .iter()
        .position(|p| std::ptr::eq(*p, protocol) || *p == protocol)
        .unwrap_or(PROTOCOLS.len() - 1)
}

/// The latency bucket a sample counts in.
fn bucket(latency: Duration) -> usize {
    let secs = latency.as_secs_f64();
    BUCKETS
        .iter()
        .position(|&bound| secs <= bound)
        .unwrap_or(BUCKETS.len())
}

/// The sum over the shards of one count.
fn total(count: impl Fn(&'static Shard) -> &'static AtomicU64) -> u64 {
    COUNTS.iter().map(|s| count(s).load(Relaxed)).sum()
}

pub fn message_in(protocol: &'static str, latency: Duration) {
    let series = &shard().series[index(protocol)];
    series.messages_in.fetch_add(1, Relaxed);
    // A fixed-bucket histogram of atomics: bounded memory however many samples, no clock read.
    series.latency[bucket(latency)].fetch_add(1, Relaxed);
    // A confirm known at the call is counted as 0: an atomic add of nothing is not made.
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    if nanos > 0 {
        series.latency_sum_nanos.fetch_add(nanos, Relaxed);
    }
}

pub fn messages_out(protocol: &'static str, n: u64) {
    shard().series[index(protocol)]
        .messages_out
        .fetch_add(n, Relaxed);
}

/// Deliveries a client acknowledged (MQTT PUBACK/PUBCOMP, WebSocket and SSE acks, AMQP
/// `basic.ack`, REST pulls), counted where the engine settles them.
pub fn acked(n: u64) {
    shard().acked.fetch_add(n, Relaxed);
}

/// The counters and the latency histogram in Prometheus text. As the exporter rendered them:
/// a protocol's series appear once it has counted something, `acked` from the start.
pub(super) fn render(out: &mut String) {
    counter(
        out,
        MESSAGES_IN,
        "Messages accepted from clients, by protocol",
        |s| &s.messages_in,
    );
    counter(
        out,
        MESSAGES_OUT,
        "Messages delivered to clients, by protocol",
        |s| &s.messages_out,
    );
    let _ = writeln!(
        out,
        "# HELP {MESSAGES_ACKED} Deliveries clients acknowledged (every protocol; auto-ack deliveries are not counted)\n# TYPE {MESSAGES_ACKED} counter\n{MESSAGES_ACKED} {}",
        total(|s| &s.acked)
    );
    let _ = writeln!(
        out,
        "# HELP {PUBLISH_LATENCY} Time from a publish's arrival to the engine's confirm, by protocol (0 for a confirm the engine gave within the publish call)\n# TYPE {PUBLISH_LATENCY} histogram"
    );
    for (i, protocol) in PROTOCOLS.iter().enumerate() {
        let counts: Vec<u64> = (0..=BUCKETS.len())
            .map(|b| total(|s| &s.series[i].latency[b]))
            .collect();
        let sum = total(|s| &s.series[i].latency_sum_nanos);
        latency(out, protocol, &counts, sum);
    }
}

fn counter(out: &mut String, name: &str, help: &str, count: fn(&Series) -> &AtomicU64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (i, protocol) in PROTOCOLS.iter().enumerate() {
        let n = total(|s| count(&s.series[i]));
        if n > 0 {
            let _ = writeln!(out, "{name}{{protocol=\"{protocol}\"}} {n}");
        }
    }
}

/// Prometheus histogram lines (cumulative buckets, `_sum`, `_count`) from per-bucket counts;
/// nothing before the first sample, as the exporter did.
fn latency(out: &mut String, protocol: &str, counts: &[u64], sum_nanos: u64) {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return;
    }
    let mut cumulative = 0;
    for (bound, count) in BUCKETS.iter().zip(counts) {
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
    let sum = sum_nanos as f64 / 1e9;
    let _ = writeln!(
        out,
        "{PUBLISH_LATENCY}_sum{{protocol=\"{protocol}\"}} {sum}"
    );
    let _ = writeln!(
        out,
        "{PUBLISH_LATENCY}_count{{protocol=\"{protocol}\"}} {total}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_with_sum_and_count() {
        let samples = [
            Duration::from_micros(40),
            Duration::from_micros(300),
            Duration::from_secs(3),
        ];
        let mut counts = [0; BUCKETS.len() + 1];
        for sample in samples {
            counts[bucket(sample)] += 1;
        }
        let sum: Duration = samples.iter().sum();
        let mut out = String::new();
        latency(&mut out, "mqtt", &counts, sum.as_nanos() as u64);
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
        latency(&mut out, "ws", &[0; BUCKETS.len() + 1], 0);
        assert!(out.is_empty());
    }

    /// The rendered `gateway_messages_out_total` of the catch-all protocol.
    fn rendered_other_out() -> u64 {
        let mut out = String::new();
        render(&mut out);
        out.lines()
            .find_map(|l| l.strip_prefix("gateway_messages_out_total{protocol=\"other\"} "))
            .map_or(0, |n| n.parse().unwrap_or(0))
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let before = rendered_other_out();
        // More threads than shards: some share one, and every count still lands.
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|_| std::thread::spawn(|| (0..1000).for_each(|_| messages_out("unit-test", 1))))
            .collect();
        for t in threads {
            t.join().expect("a counting thread panicked");
        }
        assert_eq!(rendered_other_out() - before, (SHARDS as u64 + 3) * 1000);
    }
}
