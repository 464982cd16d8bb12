//! A pipelining MQTT 3.1.1 client, the load generator of the `-pipelined` throughput scenarios:
//! a publisher writes every PUBLISH it has ready (its whole window, 100 messages) in one system
//! call, and a subscriber acknowledges everything one read brought in one write.
//!
//! rumqttc, the other scenarios' client, writes each packet with a system call of its own. On
//! two cores that made the load generator the bound of the QoS 1 scenario, not the brokers: with
//! a core each, the generator's core was the full one (docs/bench.md, "what bounds QoS 1"). The
//! same scenarios through this client measure the brokers with less of the machine spent on
//! the load. Packets are framed by rumqttc's own codec (`rumqttc::mqttbytes::v4`), so both
//! clients put the same bytes on the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Publish,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::{Error as FrameError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::{Seen, Target, count};

/// Messages a publisher has in flight at QoS 1, and writes at once at QoS 0: the window the
/// rumqttc scenarios set (`set_inflight(100)`) and the brokers are configured with.
const WINDOW: u16 = 100;
const MAX_PACKET: usize = 1 << 20;
const KEEP_ALIVE: Duration = Duration::from_secs(30);

struct Conn {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    /// Bytes read and not yet framed.
    input: BytesMut,
}

impl Conn {
    /// Connected, with the CONNACK read; `TCP_NODELAY`, since every write is already a batch.
    async fn open(t: &Target) -> Result<Conn, String> {
        let stream = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", t.host, t.port))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (read, write) = stream.into_split();
        let mut conn = Conn {
            read,
            write,
            input: BytesMut::with_capacity(64 * 1024),
        };
        let mut connect = Connect::new(format!(
            "bench-p-{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        connect.keep_alive = KEEP_ALIVE.as_secs() as u16;
        if let Some(p) = &t.password {
            connect.set_login("bench", p.clone());
        }
        conn.send(|out| connect.write(out)).await?;
        match conn.next().await? {
            Packet::ConnAck(ConnAck {
                code: ConnectReturnCode::Success,
                ..
            }) => Ok(conn),
            other => Err(format!("expected a successful CONNACK, got {other:?}")),
        }
    }

    async fn send(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> Result<usize, FrameError>,
    ) -> Result<(), String> {
        let mut out = BytesMut::new();
        encode(&mut out).map_err(|e| e.to_string())?;
        self.write.write_all(&out).await.map_err(|e| e.to_string())
    }

    /// The next packet, reading when none is whole yet.
    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(packet) = self.framed()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// A packet already read, if one is whole.
    fn framed(&mut self) -> Result<Option<Packet>, String> {
        match Packet::read(&mut self.input, MAX_PACKET) {
            Ok(packet) => Ok(Some(packet)),
            Err(FrameError::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One read, whatever it brings.
    async fn fill(&mut self) -> Result<(), String> {
        self.input.reserve(64 * 1024);
        match self.read.read_buf(&mut self.input).await {
            Ok(0) => Err("the broker closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A subscriber running in its own task until [`Subscriber::close`].
pub struct Subscriber {
    close: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Sends DISCONNECT and waits for the task to end (at most a second).
    pub async fn close(self) {
        let _ = self.close.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.task).await;
    }
}

/// Subscribed to `topic` (SUBACK granted): counts deliveries into `seen` and `numbered`, and at
/// QoS 1 acknowledges each read's deliveries in one write.
pub async fn subscriber(
    t: &Target,
    topic: &str,
    qos: QoS,
    seen: Arc<Seen>,
    numbered: Arc<count::Received>,
) -> Result<Subscriber, String> {
    let mut conn = Conn::open(t).await?;
    let mut subscribe = rumqttc::mqttbytes::v4::Subscribe::new(topic, qos);
    subscribe.pkid = 1;
    conn.send(|out| subscribe.write(out)).await?;
    match conn.next().await? {
        Packet::SubAck(ack) if ack.return_codes.first() != Some(&SubscribeReasonCode::Failure) => {}
        other => return Err(format!("expected a granting SUBACK, got {other:?}")),
    }
    let (close, closed) = oneshot::channel();
    let task = tokio::spawn(async move {
        // It ends when the broker closes or sends what cannot be framed: what it missed then
        // counts as lost.
        let _ = receive(conn, seen, numbered, closed).await;
    });
    Ok(Subscriber { close, task })
}

/// Counts deliveries and acknowledges each read's QoS 1 ones in one write, pinging the broker
/// while it waits, until `closed` (then DISCONNECT) or an error.
async fn receive(
    mut conn: Conn,
    seen: Arc<Seen>,
    numbered: Arc<count::Received>,
    mut closed: oneshot::Receiver<()>,
) -> Result<(), String> {
    let mut acks = BytesMut::new();
    let mut ping = tokio::time::interval(KEEP_ALIVE / 2);
    loop {
        tokio::select! {
            read = conn.fill() => read?,
            _ = ping.tick() => {
                conn.send(|out| PingReq.write(out)).await?;
                continue;
            }
            _ = &mut closed => return conn.send(|out| Disconnect.write(out)).await,
        }
        while let Some(packet) = conn.framed()? {
            if let Packet::Publish(p) = packet {
                seen.count.fetch_add(1, Ordering::Relaxed);
                numbered.record(&p.payload);
                // As the broker sent it: a broker may deliver below the subscription's QoS.
                if p.qos == QoS::AtLeastOnce {
                    PubAck::new(p.pkid)
                        .write(&mut acks)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        if !acks.is_empty() {
            conn.write
                .write_all(&acks)
                .await
                .map_err(|e| e.to_string())?;
            acks.clear();
        }
    }
}

/// Publishes numbered payloads to `topic` flat out until `stop`: at QoS 0 a window's worth per
/// write, at QoS 1 every free slot of the window per write, as PUBACKs free them. Then waits for
/// what is in flight (at most ten seconds) and disconnects.
pub async fn publisher(
    t: &Target,
    topic: String,
    qos: QoS,
    index: u32,
    size: usize,
    tally: Arc<count::Sent>,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let conn = Conn::open(t).await?;
    Ok(tokio::spawn(async move {
        // It ends at `stop`, or early when the broker closes: the tally says what it sent.
        let _ = send(conn, topic, qos, index, size, tally, stop).await;
    }))
}

/// The publisher's loop ([`publisher`]).
async fn send(
    mut conn: Conn,
    topic: String,
    qos: QoS,
    index: u32,
    size: usize,
    tally: Arc<count::Sent>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut publish = Publish::from_bytes(topic, qos, Bytes::new());
    let mut free: Vec<u16> = (1..=WINDOW).rev().collect();
    let mut out = BytesMut::with_capacity(WINDOW as usize * (size + 64));
    while !stop.load(Ordering::Relaxed) {
        let batch = if qos == QoS::AtMostOnce {
            WINDOW as usize
        } else {
            free.len()
        };
        for _ in 0..batch {
            publish.payload = count::payload(index, tally.count(), size).into();
            if qos == QoS::AtLeastOnce {
                publish.pkid = free.pop().unwrap_or(0);
            }
            publish.write(&mut out).map_err(|e| e.to_string())?;
            tally.next();
        }
        conn.write
            .write_all(&out)
            .await
            .map_err(|e| e.to_string())?;
        out.clear();
        if qos == QoS::AtLeastOnce {
            acked(&mut conn, &mut free).await?;
        }
    }
    if qos == QoS::AtLeastOnce {
        let drained = async {
            while free.len() < WINDOW as usize {
                acked(&mut conn, &mut free).await?;
            }
            Ok::<_, String>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
    }
    conn.send(|out| Disconnect.write(out)).await
}

/// Waits for PUBACKs and puts their packet ids back in `free`: every ack one read brought, and
/// at least one.
async fn acked(conn: &mut Conn, free: &mut Vec<u16>) -> Result<(), String> {
    let before = free.len();
    loop {
        while let Some(packet) = conn.framed()? {
            if let Packet::PubAck(ack) = packet {
                free.push(ack.pkid);
            }
        }
        if free.len() > before {
            return Ok(());
        }
        conn.fill().await?;
    }
}
