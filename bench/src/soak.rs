//! The soak (issue "Reliability"): mixed protocols at a moderate, steady load for `--duration`
//! (5 minutes is the figure's run) — MQTT QoS 1 publishers, REST publishes and an AMQP publisher
//! in confirm mode, all numbered, into one MQTT QoS 1 subscriber on `soak/#`, plus an MQTT client
//! connecting, subscribing and leaving every second — with the gateway's resident memory sampled
//! every 10 s. Reports the samples, the slope after a minute of warm-up (least squares), and what
//! was lost or duplicated.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::Mutex;

use super::{Target, options, rss_kib, until_connected};

const MQTT_PUBLISHERS: usize = 4;
/// Messages per second of each publisher (MQTT ones, REST, AMQP): about 600/s in all.
const RATE: u64 = 100;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(60);

pub struct Soak {
    pub target: Target,
    pub http: String,
    pub amqp: String,
    pub duration: Duration,
}

/// Published and answered as accepted, by source.
#[derive(Default)]
struct Sent(AtomicU64);

/// `RATE` sequence numbers a second until `stop`.
struct Pacer {
    tick: tokio::time::Interval,
    seq: u64,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            tick: tokio::time::interval(Duration::from_millis(1000 / RATE)),
            seq: 0,
        }
    }

    async fn next(&mut self, stop: &AtomicBool) -> Option<u64> {
        self.tick.tick().await;
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        self.seq += 1;
        Some(self.seq)
    }
}

async fn mqtt_publisher(
    t: Target,
    n: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<Sent>,
) -> Result<(), String> {
    let (client, mut ev) = AsyncClient::new(options(&t), 200);
    until_connected(&mut ev).await?;
    let acks = tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = e {
                sent.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut pacer = Pacer::new();
    while let Some(seq) = pacer.next(&stop).await {
        let body = format!("m{n}-{seq}");
        let topic = format!("soak/m/{n}");
        if client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = client.disconnect().await;
    acks.abort();
    Ok(())
}

async fn rest_publisher(s: &Soak, stop: Arc<AtomicBool>, sent: Arc<Sent>) {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/exchanges/amq.topic/publish", s.http);
    let token = s.target.password.clone().unwrap_or_default();
    let mut pacer = Pacer::new();
    while let Some(seq) = pacer.next(&stop).await {
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .json(&serde_json::json!({"routing_key": "soak.r", "body": format!("r-{seq}")}))
            .send()
            .await;
        if matches!(&r, Ok(r) if r.status() == 200) {
            sent.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn amqp_publisher(url: String, stop: Arc<AtomicBool>, sent: Arc<Sent>) -> Result<(), String> {
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut pacer = Pacer::new();
    while let Some(seq) = pacer.next(&stop).await {
        let body = format!("a-{seq}");
        let Ok(confirm) = ch
            .basic_publish(
                "amq.topic".into(),
                "soak.a".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
        else {
            break;
        };
        if matches!(confirm.await, Ok(c) if c.is_ack()) {
            sent.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = conn.close(200, "soak done".into()).await;
    Ok(())
}

/// An MQTT client arriving, subscribing and leaving every second: leaks show as growth.
async fn churn(t: Target, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let (client, mut ev) = AsyncClient::new(options(&t), 10);
        if until_connected(&mut ev).await.is_err() {
            continue;
        }
        let _ = client.subscribe("soak/churn/#", QoS::AtLeastOnce).await;
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while ev.poll().await.is_ok() {}
        })
        .await;
    }
}

/// Least-squares slope of `(seconds, KiB)`, in KiB per minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

pub async fn report(s: &Soak) -> Result<(), String> {
    let pid = s.target.pid.ok_or("the soak needs --pid gateway=PID")?;
    // The subscriber first, so everything published reaches it.
    let (sub, mut sub_ev) = AsyncClient::new(options(&s.target), 1000);
    until_connected(&mut sub_ev).await?;
    sub.subscribe("soak/#", QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    let seen: Arc<Mutex<(HashSet<Vec<u8>>, u64)>> = Arc::default();
    let receiving = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(e) = sub_ev.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = e {
                    let mut seen = seen.lock().await;
                    if !seen.0.insert(p.payload.to_vec()) {
                        seen.1 += 1;
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Vec<Arc<Sent>> = (0..MQTT_PUBLISHERS + 2).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (n, sent) in sent.iter().take(MQTT_PUBLISHERS).enumerate() {
        let (t, stop, sent) = (s.target.clone(), stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let _ = mqtt_publisher(t, n, stop, sent).await;
        }));
    }
    let amqp = tokio::spawn(amqp_publisher(
        s.amqp.clone(),
        stop.clone(),
        sent[MQTT_PUBLISHERS + 1].clone(),
    ));
    tasks.push(tokio::spawn(churn(s.target.clone(), stop.clone())));
    let started = Instant::now();
    let rest = rest_publisher(s, stop.clone(), sent[MQTT_PUBLISHERS].clone());
    let sampling = async {
        let mut samples = Vec::new();
        while started.elapsed() < s.duration {
            samples.push((started.elapsed().as_secs_f64(), rss_kib(pid)? as f64));
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        samples.push((started.elapsed().as_secs_f64(), rss_kib(pid)? as f64));
        stop.store(true, Ordering::Relaxed);
        Ok::<_, String>(samples)
    };
    let (_, samples) = tokio::join!(rest, sampling);
    let samples = samples?;
    for t in tasks {
        let _ = t.await;
    }
    amqp.await.map_err(|e| e.to_string())??;
    // Let the last deliveries arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    receiving.abort();
    let answered: u64 = sent.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    let (unique, dups) = {
        let seen = seen.lock().await;
        (seen.0.len() as u64, seen.1)
    };
    let after: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= WARM_UP.as_secs_f64())
        .collect();
    println!(
        "\nSoak: {:?} of MQTT QoS 1 ({MQTT_PUBLISHERS} × {RATE}/s), REST ({RATE}/s) and AMQP confirms ({RATE}/s) into one MQTT QoS 1 subscriber, one MQTT client connecting and leaving each second\n",
        s.duration
    );
    println!("| t (s) | gateway RSS (MiB) |\n|---|---|");
    for (t, kib) in &samples {
        println!("| {t:.0} | {:.1} |", kib / 1024.0);
    }
    println!(
        "\nRSS slope after {}s of warm-up: {:+.1} KiB/min; answered {answered}, received {unique}, lost {}, duplicated {dups}",
        WARM_UP.as_secs(),
        slope(&after),
        answered.saturating_sub(unique)
    );
    Ok(())
}
