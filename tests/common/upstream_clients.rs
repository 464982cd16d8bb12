//! Clients the upstream fault tests share: an MQTT 5 publisher that reports each PUBACK's
//! reason, and the gateway's readiness.

use rumqttc::v5::mqttbytes::v5::PubAckReason;
use tokio::sync::mpsc;

use super::{TestGateway, admin};

/// PUBACK reasons in order; `None` once the connection ended.
pub type Acks = mpsc::UnboundedReceiver<Option<PubAckReason>>;

/// An MQTT 5 client and its PUBACK reasons in order (`None`: the connection ended).
pub async fn mqtt5(
    port: u16,
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<Option<PubAckReason>>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(super::unique("pub5"), "127.0.0.1", port);
    o.set_credentials("u", admin());
    let (client, mut eventloop) = AsyncClient::new(o, 10);
    let (acks, acked) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if acks.send(Some(ack.reason)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("the MQTT 5 client lost its connection: {e}");
                    let _ = acks.send(None);
                    return;
                }
            }
        }
    });
    (client, acked)
}

/// The next PUBACK's reason, within `limit`.
pub async fn next_ack(acks: &mut Acks, limit: std::time::Duration) -> PubAckReason {
    tokio::time::timeout(limit, acks.recv())
        .await
        .expect("a PUBACK in time")
        .flatten()
        .expect("the MQTT 5 client is connected")
}

/// `/readyz`'s status (0 when it does not answer).
pub async fn ready(gw: &TestGateway) -> u16 {
    gw.http
        .get(gw.url("/readyz"))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}
