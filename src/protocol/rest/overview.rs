//! `GET /v1/overview`: the operator's first look — engine, version, uptime, listeners,
//! connections per protocol, message totals and their rates over the last 5 s, memory held.
//! Totals are the Prometheus counters (`/metrics`) summed over their labels; a sampler takes
//! them every second so the rates need no client-side history.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use parking_lot::Mutex;
use serde::Serialize;
use utoipa::ToSchema;

use super::RestState;
use super::extract::Caller;
use super::problem::{ApiError, Problem};
use crate::context::Context;
use crate::metrics;

/// The window the rates are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(5);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Message counts since start (totals) or per second (rates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct Counts {
    /// Messages accepted from clients, every protocol.
    pub published: f64,
    /// Messages written to clients.
    pub delivered: f64,
    /// Deliveries clients acknowledged (auto-ack ones are not counted).
    pub acked: f64,
    /// Deliveries dropped (slow consumers, full buffers) and messages the engine dropped
    /// (queue length limits).
    pub dropped: f64,
    /// Requests and publishes refused (every code).
    pub refused: f64,
    /// Seconds publishers spent paced.
    pub paced_seconds: f64,
}

impl Counts {
    fn per_second(self, earlier: Counts, over: Duration) -> Counts {
        let s = over.as_secs_f64().max(f64::EPSILON);
        Counts {
            published: (self.published - earlier.published) / s,
            delivered: (self.delivered - earlier.delivered) / s,
            acked: (self.acked - earlier.acked) / s,
            dropped: (self.dropped - earlier.dropped) / s,
            refused: (self.refused - earlier.refused) / s,
            paced_seconds: (self.paced_seconds - earlier.paced_seconds) / s,
        }
    }
}

/// The sum over labels of every sample of `name` in a Prometheus text.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

fn totals(text: &str) -> Counts {
    Counts {
        published: sum(text, metrics::MESSAGES_IN),
        delivered: sum(text, metrics::MESSAGES_OUT),
        acked: sum(text, metrics::MESSAGES_ACKED),
        dropped: sum(text, metrics::DELIVERIES_DROPPED) + sum(text, metrics::DROPPED),
        refused: sum(text, metrics::REFUSALS),
        paced_seconds: sum(text, metrics::PACED_SECONDS),
    }
}

/// The last few seconds of totals.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, Counts)>>,
}

impl Sampler {
    /// Samples every second until shutdown.
    pub fn spawn(ctx: &Context) -> Arc<Sampler> {
        let sampler = Arc::new(Sampler::default());
        let (weak, ctx) = (Arc::downgrade(&sampler), ctx.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = ctx.shutdown.wait() => return,
                    _ = tick.tick() => {}
                }
                let Some(sampler) = weak.upgrade() else {
                    return;
                };
                let now = totals(&metrics::render(ctx.engine.as_ref()));
                sampler.record(Instant::now(), now);
            }
        });
        sampler
    }

    fn record(&self, at: Instant, counts: Counts) {
        let mut samples = self.samples.lock();
        samples.push_back((at, counts));
        while samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Rates from the oldest sample in the window to `now`.
    fn rates(&self, now: Counts) -> Counts {
        match self.samples.lock().front() {
            Some((at, earlier)) => now.per_second(*earlier, at.elapsed()),
            None => Counts::default(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Listeners {
    pub http: String,
    pub mqtt: String,
    pub metrics: String,
    /// The AMQP 0-9-1 listener (absent upstream: AMQP clients use the broker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Memory {
    /// Bytes of messages the embedded engine holds, bodies and what holding each costs besides
    /// (absent upstream: RabbitMQ holds them).
    pub held_bytes: Option<u64>,
    /// `engine.memory_high_watermark` as configured (bytes, or a share of memory).
    #[schema(value_type = Object)]
    pub high_watermark: serde_json::Value,
    /// Publishes are throttled now (memory or disk alarm, or the upstream broker's).
    pub publish_blocked: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    /// `embedded` or `upstream`.
    pub engine: String,
    pub version: String,
    pub uptime_seconds: u64,
    /// The configured listen addresses.
    pub listeners: Listeners,
    /// Open client connections of this instance per protocol (`mqtt`, `ws`, `sse`, `amqp`).
    pub connections: BTreeMap<String, u64>,
    pub totals: Counts,
    /// Per second, over the last 5 s.
    pub rates: Counts,
    pub memory: Memory,
}

/// The gateway at a glance.
#[utoipa::path(get, path = "/v1/overview", tag = "operations",
    responses((status = 200, body = Overview),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Needs gateway.tag:monitoring or administrator", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn overview(
    State(st): State<RestState>,
    Caller(principal): Caller,
) -> Result<axum::Json<Overview>, ApiError> {
    if !principal.permissions.can_monitor() {
        return Err(ApiError::forbidden(
            "the overview needs gateway.tag:monitoring or administrator",
        ));
    }
    Ok(axum::Json(snapshot(&st)))
}

/// The overview now (also what the operator feed sends every second).
pub fn snapshot(st: &RestState) -> Overview {
    let ctx = &st.ctx;
    let text = metrics::render(ctx.engine.as_ref());
    let now = totals(&text);
    let held = text
        .lines()
        .any(|l| l.starts_with(metrics::HELD_BYTES))
        .then(|| sum(&text, metrics::HELD_BYTES) as u64);
    let mut connections: BTreeMap<String, u64> = ["mqtt", "ws", "sse", "amqp"]
        .into_iter()
        .map(|p| (p.to_owned(), 0))
        .collect();
    for (protocol, n) in ctx.registry.counts() {
        connections.insert(protocol.to_owned(), n);
    }
    let config = &ctx.config;
    Overview {
        engine: format!("{:?}", ctx.engine.kind()).to_lowercase(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: ctx.started.elapsed().as_secs(),
        listeners: Listeners {
            http: config.http.listen.to_string(),
            mqtt: config.mqtt.listen.to_string(),
            metrics: config.metrics.listen.to_string(),
            amqp: ctx
                .engine
                .capabilities()
                .amqp_listener
                .then(|| config.amqp.listen.to_string()),
        },
        connections,
        totals: now,
        rates: st.sampler.rates(now),
        memory: Memory {
            held_bytes: held,
            high_watermark: serde_json::to_value(config.engine.memory_high_watermark)
                .unwrap_or_default(),
            publish_blocked: ctx.engine.publish_blocked(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_their_labels() {
        let text = "# HELP x\n\
            gateway_messages_in_total{protocol=\"mqtt\"} 3\n\
            gateway_messages_in_total{protocol=\"rest\"} 4\n\
            gateway_messages_in_totalish 100\n\
            gateway_refusals_total 2\n";
        let t = totals(text);
        assert_eq!((t.published, t.refused, t.delivered), (7.0, 2.0, 0.0));
    }

    #[test]
    fn rates_span_the_oldest_sample_in_the_window() {
        let s = Sampler::default();
        let t0 = Instant::now();
        let c = |n: f64| Counts {
            published: n,
            ..Counts::default()
        };
        s.record(t0, c(0.0));
        s.record(t0 + Duration::from_secs(2), c(10.0));
        s.record(t0 + Duration::from_secs(8), c(50.0));
        // The first two left the window; rates start at the newest sample.
        assert_eq!(s.samples.lock().len(), 1);
    }
}
