//! Will messages: published when a client goes without DISCONNECT (3.1.1 at once; MQTT 5 after
//! min(will delay, session expiry)), not published when the session comes back in time.

mod common;

use std::time::Duration;

use common::{TestGateway, WAIT, start_gateway, token, unique};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{LastWill as LastWill5, LastWillProperties, Packet as Packet5};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const SCOPE: &str = "gateway.read:amq.topic/status.# gateway.write:amq.topic/status.#";

/// An observer of `status/#`; returns the topics and payloads it receives.
async fn observer(gw: &TestGateway) -> mpsc::UnboundedReceiver<(String, String)> {
    let mut o =
        rumqttc::MqttOptions::new(unique("obs"), "127.0.0.1", gw.gateway.addrs().mqtt.port());
    o.set_credentials("u", token("watcher", SCOPE));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client.clone();
        client
            .subscribe("status/#", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    let _ = subscribed_tx.send(());
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let _ = tx.send((p.topic, String::from_utf8_lossy(&p.payload).into_owned()));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed.recv())
        .await
        .expect("observer subscribed");
    rx
}

/// A v5 client with a will; abort the returned task to drop its connection without DISCONNECT.
async fn v5_with_will(gw: &TestGateway, id: &str, delay: u32, expiry: u32) -> JoinHandle<()> {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", gw.gateway.addrs().mqtt.port());
    o.set_credentials("u", token("dev", SCOPE));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry));
    let props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    o.set_last_will(LastWill5::new(
        "status/dev",
        "offline",
        QoS5::AtLeastOnce,
        false,
        Some(props),
    ));
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 10);
    let (connected_tx, mut connected) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let _keep = _client;
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::v5::Event::Incoming(Packet5::ConnAck(_)) = ev {
                let _ = connected_tx.send(());
            }
        }
    });
    tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("CONNACK");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_will_is_published_at_once() {
    let gw = start_gateway(|_| {}).await;
    let mut seen = observer(&gw).await;
    let mut o =
        rumqttc::MqttOptions::new(unique("w4"), "127.0.0.1", gw.gateway.addrs().mqtt.port());
    o.set_credentials("u", token("dev", SCOPE));
    o.set_last_will(rumqttc::LastWill::new(
        "status/dev4",
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(o, 10);
    let task = tokio::spawn(async move {
        let _keep = _client;
        while eventloop.poll().await.is_ok() {}
    });
    tokio::time::sleep(Duration::from_millis(200)).await; // connected
    task.abort(); // the socket goes without DISCONNECT
    let got = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("will in time")
        .unwrap();
    assert_eq!(got, ("status/dev4".to_owned(), "gone".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_will_waits_for_its_delay() {
    let gw = start_gateway(|_| {}).await;
    let mut seen = observer(&gw).await;
    let task = v5_with_will(&gw, &unique("w5"), 1, 60).await;
    let gone = std::time::Instant::now();
    task.abort();
    let got = tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("will in time")
        .unwrap();
    assert_eq!(got, ("status/dev".to_owned(), "offline".to_owned()));
    assert!(
        gone.elapsed() >= Duration::from_millis(900),
        "published after the delay: {:?}",
        gone.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_will_is_cancelled_when_the_session_returns() {
    let gw = start_gateway(|_| {}).await;
    let mut seen = observer(&gw).await;
    let id = unique("w5back");
    let task = v5_with_will(&gw, &id, 2, 60).await;
    task.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = v5_with_will(&gw, &id, 2, 60).await; // back before the delay ran out
    assert!(
        tokio::time::timeout(Duration::from_secs(3), seen.recv())
            .await
            .is_err(),
        "no will: the session came back"
    );
    again.abort();
}
