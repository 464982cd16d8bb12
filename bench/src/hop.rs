//! The cost of the hop (issue 16): 1→1 at-least-once through the gateway's MQTT (QoS 1, 100
//! in flight, the subscriber acking each) against the same through RabbitMQ directly with
//! lapin — a publisher in confirm mode with 100 publishes awaiting their confirm, a consumer
//! with prefetch 100 acking each. With `ENGINE=upstream` both land on the same broker, so the
//! ratio is what the gateway's translation costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::count;

/// Publishes awaiting their confirm, as the MQTT publisher's in-flight window.
const WINDOW: usize = 100;

fn err(e: lapin::Error) -> String {
    e.to_string()
}

/// How the consumer of [`one_to_one`] acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// `no_ack`: settled when sent.
    Auto,
    /// Prefetch [`WINDOW`], each delivery acked.
    Manual,
}

/// Deliveries per second, 1→1, through the AMQP 0-9-1 broker at `url` (RabbitMQ directly, or
/// the gateway's own AMQP listener), and what the run lost (numbered payloads, counted after
/// a drain as for the gateway's MQTT).
pub async fn one_to_one(
    url: &str,
    payload: usize,
    duration: Duration,
    ack: Ack,
) -> Result<(f64, count::Loss), String> {
    let props = ConnectionProperties::default();
    let consuming = Connection::connect(url, props.clone()).await.map_err(err)?;
    let publishing = Connection::connect(url, props).await.map_err(err)?;
    let sub = consuming.create_channel().await.map_err(err)?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = sub
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .map_err(err)?;
    sub.basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await
        .map_err(err)?;
    let no_ack = ack == Ack::Auto;
    let mut consumer = sub
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err)?;
    let delivered = Arc::new(AtomicU64::new(0));
    let received = Arc::new(count::Received::default());
    let (counted, recorded) = (delivered.clone(), received.clone());
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            counted.fetch_add(1, Ordering::Relaxed);
            recorded.record(&d.data);
            // As the gateway does: the ack frame is queued in the first poll; not waiting
            // for lapin's I/O thread to write it keeps the comparison about the hop.
            if !no_ack && let Some(Err(_)) = d.ack(BasicAckOptions::default()).now_or_never() {
                return;
            }
        }
    });
    let publisher = publishing.create_channel().await.map_err(err)?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(err)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let key = queue.name().clone();
    let sent = Arc::new(count::Sent::default());
    let tally = sent.clone();
    tokio::spawn(async move {
        let mut in_flight = FuturesUnordered::new();
        while !stopped.load(Ordering::Relaxed) {
            while in_flight.len() >= WINDOW {
                if in_flight.next().await.is_none() {
                    break;
                }
            }
            let body = count::payload(0, tally.count(), payload);
            let published = publisher
                .basic_publish(
                    "".into(),
                    key.clone(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await;
            match published {
                Ok(confirm) => in_flight.push(confirm),
                Err(_) => return,
            }
            tally.next();
        }
    });
    let rate = super::rate_over(&delivered, duration).await;
    stop.store(true, Ordering::Relaxed);
    super::drain(&delivered).await;
    let loss = count::Loss::of(&[sent], &[received]);
    let _ = publishing.close(200, "bench done".into()).await;
    let _ = consuming.close(200, "bench done".into()).await;
    Ok((rate, loss))
}
