//! Confirmed persistent publishes (issue 13): N publishers, each with one publish in flight
//! (send, wait for its confirm, send the next), into one durable queue — through the gateway's
//! MQTT (QoS 1, PUBACK after the group commit) and REST (200 after it), and into RabbitMQ with
//! publisher confirms over AMQP (lapin, one connection per publisher). One in flight per
//! publisher makes N the number of writes a store can group into one fsync.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use super::{Target, options, until_connected};

/// Where the durable scenario publishes.
pub struct Durable {
    /// The gateway's REST base (`http://HOST:PORT`) and an administrator token.
    pub http: String,
    pub token: String,
    /// RabbitMQ's AMQP URL.
    pub amqp: Option<String>,
}

const KEY: &str = "bench.durable";

/// The durable queue on the gateway, bound to `amq.topic` for the MQTT publishers.
pub async fn gateway_queue(d: &Durable) -> Result<String, String> {
    let queue = format!("bench-durable-{}", std::process::id());
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{}/v1/queues/{queue}", d.http))
        .bearer_auth(&d.token)
        .json(&serde_json::json!({"durable": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !put.status().is_success() {
        return Err(format!("declare {queue}: {}", put.status()));
    }
    let bind = http
        .post(format!("{}/v1/queues/{queue}/bindings", d.http))
        .bearer_auth(&d.token)
        .json(&serde_json::json!({"exchange": "amq.topic", "routing_key": KEY}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !bind.status().is_success() {
        return Err(format!("bind {queue}: {}", bind.status()));
    }
    Ok(queue)
}

/// Empties the gateway's queue between runs.
pub async fn purge_gateway(d: &Durable, queue: &str) {
    let _ = reqwest::Client::new()
        .delete(format!("{}/v1/queues/{queue}/contents", d.http))
        .bearer_auth(&d.token)
        .send()
        .await;
}

/// Counts confirms; publishers stop at `stop`.
#[derive(Default)]
pub struct Tally {
    pub confirmed: AtomicU64,
    pub stop: AtomicBool,
}

/// Runs the publishers `start` starts for `duration` after a one-second warm-up.
pub async fn rate(tally: &Tally, duration: Duration) -> f64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tally.confirmed.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let n = tally.confirmed.load(Ordering::Relaxed) - before;
    tally.stop.store(true, Ordering::Relaxed);
    n as f64 / started.elapsed().as_secs_f64()
}

/// One MQTT publisher: QoS 1, the next PUBLISH after the PUBACK.
pub async fn mqtt_publisher(t: &Target, payload: Vec<u8>, tally: Arc<Tally>) -> Result<(), String> {
    let (client, mut ev) = AsyncClient::new(options(t), 10);
    until_connected(&mut ev).await?;
    tokio::spawn(async move {
        let topic = KEY.replace('.', "/");
        while !tally.stop.load(Ordering::Relaxed) {
            if client
                .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                return;
            }
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => break,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
            tally.confirmed.fetch_add(1, Ordering::Relaxed);
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), ev.poll()).await;
    });
    Ok(())
}

/// One REST publisher on its own keep-alive connection.
pub fn rest_publisher(d: &Durable, queue: &str, payload: &[u8], tally: Arc<Tally>) {
    let url = format!("{}/v1/exchanges/amq.default/publish", d.http);
    let body = serde_json::json!({
        "routing_key": queue,
        "body": String::from_utf8_lossy(payload),
        "properties": {"delivery_mode": 2},
    });
    let token = d.token.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap_or_default();
        while !tally.stop.load(Ordering::Relaxed) {
            match http.post(&url).bearer_auth(&token).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    tally.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                _ => return,
            }
        }
    });
}

/// One AMQP publisher on its own connection: persistent, the next after the confirm.
pub async fn amqp_publisher(
    url: &str,
    queue: &str,
    payload: Vec<u8>,
    tally: Arc<Tally>,
) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let queue = queue.to_owned();
    tokio::spawn(async move {
        let properties = BasicProperties::default().with_delivery_mode(2);
        while !tally.stop.load(Ordering::Relaxed) {
            let sent = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    properties.clone(),
                )
                .await;
            let Ok(confirm) = sent else { return };
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    tally.confirmed.fetch_add(1, Ordering::Relaxed);
                }
                _ => return,
            }
        }
        let _ = conn.close(200, "bench done".into()).await;
    });
    Ok(())
}

/// RabbitMQ's durable queue, declared and emptied.
pub async fn rabbitmq_queue(url: &str) -> Result<String, String> {
    let queue = format!("bench-durable-{}", std::process::id());
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(queue)
}

/// One run of `n` publishers of `kind` (`mqtt`, `rest`, `amqp`): confirms per second.
async fn run(
    kind: &str,
    n: usize,
    d: &Durable,
    t: &Target,
    queues: &Queues,
    args: &super::Args,
) -> Result<f64, String> {
    let tally = Arc::new(Tally::default());
    let payload = vec![b'x'; args.payload];
    for _ in 0..n {
        match kind {
            "mqtt" => mqtt_publisher(t, payload.clone(), tally.clone()).await?,
            "rest" => rest_publisher(d, &queues.gateway, &payload, tally.clone()),
            _ => {
                let (url, queue) = match (&d.amqp, &queues.rabbitmq) {
                    (Some(u), Some(q)) => (u, q),
                    _ => return Err("no --amqp".into()),
                };
                amqp_publisher(url, queue, payload.clone(), tally.clone()).await?;
            }
        }
    }
    let r = rate(&tally, args.duration).await;
    // Let the publishers see the stop and their last confirms land before the purge.
    tokio::time::sleep(Duration::from_millis(300)).await;
    purge_gateway(d, &queues.gateway).await;
    if let (Some(url), Some(_)) = (&d.amqp, &queues.rabbitmq) {
        rabbitmq_queue(url).await?;
    }
    Ok(r)
}

struct Queues {
    gateway: String,
    rabbitmq: Option<String>,
}

/// The durable table: for each publisher count, the median rate of each kind and the ratios
/// against RabbitMQ.
pub async fn report(d: &Durable, t: &Target, args: &super::Args) -> Result<(), String> {
    let queues = Queues {
        gateway: gateway_queue(d).await?,
        rabbitmq: match &d.amqp {
            Some(url) => Some(rabbitmq_queue(url).await?),
            None => None,
        },
    };
    println!(
        "\nConfirmed persistent publishes into one durable queue, {} B payloads, one in flight per publisher; median of {} runs of {:?}\n",
        args.payload, args.runs, args.duration
    );
    println!(
        "| publishers | gateway MQTT QoS 1 | gateway REST | RabbitMQ AMQP confirms | MQTT vs RabbitMQ | REST vs RabbitMQ |"
    );
    println!("|---|---|---|---|---|---|");
    for &n in &args.publishers {
        let mut cells = Vec::new();
        for kind in ["mqtt", "rest", "amqp"] {
            if kind == "amqp" && d.amqp.is_none() {
                cells.push(None);
                continue;
            }
            let mut rates = Vec::new();
            for _ in 0..args.runs {
                rates.push(run(kind, n, d, t, &queues, args).await?);
            }
            cells.push(Some(super::median(rates)));
        }
        let show =
            |c: &Option<f64>| c.map_or("–".to_owned(), |r| format!("{:.1}k/s", r / 1000.0));
        let ratio = |a: &Option<f64>| match (a, &cells[2]) {
            (Some(a), Some(b)) if *b > 0.0 => format!("{:.2}", a / b),
            _ => "–".to_owned(),
        };
        println!(
            "| {n} | {} | {} | {} | {} | {} |",
            show(&cells[0]),
            show(&cells[1]),
            show(&cells[2]),
            ratio(&cells[0]),
            ratio(&cells[1])
        );
    }
    Ok(())
}
