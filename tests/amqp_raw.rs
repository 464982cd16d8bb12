//! The AMQP listener against bad input, frame by frame: each answered with the reply code
//! AMQP 0-9-1 gives it (a channel error closes that channel only), nothing accepted lost, and
//! other connections untouched. Also heartbeats, the handshake timeout and
//! `connection.blocked` above the memory watermark.

mod common;

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, connection, queue};
use amqp_gateway::protocol::amqp::frame::{Frame, PROTOCOL_HEADER};
use common::amqp::{channel, connect, publish_confirmed};
use common::amqp_raw::{Raw, body, header, method, publish};
use common::{TestGateway, admin, start_gateway, unique};
use lapin::options::ConfirmSelectOptions;
use tokio::io::AsyncReadExt;

/// A gateway and a lapin connection opened before the bad input, checked after it.
async fn with_bystander(
    tweak: impl FnOnce(&mut amqp_gateway::Config),
) -> (TestGateway, lapin::Connection, lapin::Channel, String) {
    let gw = start_gateway(tweak).await;
    let conn = connect(&gw, &admin()).await;
    let ch = channel(&conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let q = unique("bystander");
    common::amqp::declare(&ch, &q).await;
    publish_confirmed(&ch, "", &q, b"before").await;
    (gw, conn, ch, q)
}

async fn bystander_unharmed(gw: &TestGateway, ch: &lapin::Channel, q: &str) {
    publish_confirmed(ch, "", q, b"after").await;
    assert_eq!(gw.depth(q).await, 2, "nothing accepted was lost");
}

#[tokio::test]
async fn a_wrong_protocol_header_gets_ours_back() {
    let gw = start_gateway(|_| {}).await;
    for wrong in [&b"AMQP\x00\x00\x08\x00"[..], b"GET / HTTP/1.1\r\n"] {
        let mut raw = Raw::tcp(&gw).await;
        raw.send(wrong).await;
        let mut back = Vec::new();
        tokio::time::timeout(common::WAIT, raw.stream.read_to_end(&mut back))
            .await
            .expect("closed in time")
            .unwrap();
        assert_eq!(back, PROTOCOL_HEADER);
    }
}

#[tokio::test]
async fn frame_errors_close_the_connection_with_501_or_502() {
    let (gw, _conn, ch, q) = with_bystander(|_| {}).await;
    // Over the negotiated frame-max (4096).
    let mut raw = Raw::open(&gw, &admin(), 4096, 0).await;
    raw.open_channel(1).await;
    raw.send(&publish(1, "", &q)).await;
    raw.send(&header(1, 5000)).await;
    raw.send(&body(1, &[b'x'; 5000])).await;
    assert_eq!(raw.connection_closed().await, 501);
    // A frame that does not end with 0xCE.
    let mut raw = Raw::open(&gw, &admin(), 4096, 0).await;
    let mut bad = body(1, b"x");
    *bad.last_mut().unwrap() = 0;
    raw.send(&bad).await;
    assert_eq!(raw.connection_closed().await, 501);
    // A method frame whose arguments are cut short.
    let mut raw = Raw::open(&gw, &admin(), 4096, 0).await;
    raw.send(&[1, 0, 1, 0, 0, 0, 5, 0, 50, 0, 10, 0, 0xCE])
        .await;
    assert_eq!(raw.connection_closed().await, 502);
    // An unknown frame type.
    let mut raw = Raw::open(&gw, &admin(), 4096, 0).await;
    raw.send(&[7, 0, 1, 0, 0, 0, 0, 0xCE]).await;
    assert_eq!(raw.connection_closed().await, 501);
    bystander_unharmed(&gw, &ch, &q).await;
}

#[tokio::test]
async fn content_out_of_place_is_505_and_an_overlong_body_501() {
    let (gw, _conn, ch, q) = with_bystander(|_| {}).await;
    // A body with no publish before it.
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.send(&body(1, b"stray")).await;
    assert_eq!(raw.connection_closed().await, 505);
    // A method where the publish's content header belongs.
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.send(&publish(1, "", &q)).await;
    raw.send(&publish(1, "", &q)).await;
    assert_eq!(raw.connection_closed().await, 505);
    // More body than the header announced: nothing of it is published.
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.send(&publish(1, "", &q)).await;
    raw.send(&header(1, 3)).await;
    raw.send(&body(1, b"four")).await;
    assert_eq!(raw.connection_closed().await, 501);
    bystander_unharmed(&gw, &ch, &q).await;
}

#[tokio::test]
async fn channels_not_open_or_reopened_are_504_and_a_second_channel_survives_a_channel_error() {
    let (gw, _conn, ch, q) = with_bystander(|_| {}).await;
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.send(&publish(3, "", &q)).await;
    assert_eq!(raw.connection_closed().await, 504);
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.send(&common::amqp_raw::channel_open(1)).await;
    assert_eq!(raw.connection_closed().await, 504);

    // A channel error (declaring a queue passively that does not exist) closes channel 1
    // only; channel 2 goes on, and frames for channel 1 before its close-ok are dropped.
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send(&method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "missing".into(),
            passive: true,
            ..Default::default()
        })),
    ))
    .await;
    assert_eq!(raw.channel_closed(1).await, 404);
    raw.confirm_select(2).await;
    let other = gw.queue("raw").await;
    raw.publish_body(2, "", &other, b"raw").await;
    assert!(
        matches!(raw.method().await, AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == 1),
        "the publish on channel 2 is confirmed"
    );
    assert_eq!(gw.depth(&other).await, 1);
    bystander_unharmed(&gw, &ch, &q).await;
}

#[tokio::test]
async fn a_body_over_the_message_limit_closes_the_channel_with_311() {
    let (gw, _conn, ch, q) = with_bystander(|c| {
        c.limits.max_message_bytes = bytesize::ByteSize::kib(64);
    })
    .await;
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.send(&publish(1, "", &q)).await;
    raw.send(&header(1, 65 * 1024)).await;
    // Its body frames still arrive; the closing channel drops them.
    raw.send(&body(1, &vec![b'x'; 65 * 1024])).await;
    assert_eq!(raw.channel_closed(1).await, 311);
    raw.open_channel(1).await;
    bystander_unharmed(&gw, &ch, &q).await;
}

#[tokio::test]
async fn silence_past_two_heartbeats_closes_and_the_gateway_beats() {
    let gw = start_gateway(|_| {}).await;
    let mut raw = Raw::open(&gw, &admin(), 131072, 1).await;
    let mut buf = Vec::new();
    let started = tokio::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), raw.stream.read_to_end(&mut buf))
        .await
        .expect("closed after missed heartbeats");
    assert!(read.is_ok());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "not before two intervals"
    );
    // Heartbeat frames came while the client said nothing.
    assert!(
        buf.windows(8).any(|w| w == [8, 0, 0, 0, 0, 0, 0, 0xCE]),
        "{buf:?}"
    );
}

#[tokio::test]
async fn no_handshake_within_the_timeout_closes() {
    let gw = start_gateway(|c| c.amqp.handshake_timeout = Duration::from_millis(300)).await;
    let mut raw = Raw::tcp(&gw).await;
    raw.send(&PROTOCOL_HEADER).await;
    let mut buf = Vec::new();
    tokio::time::timeout(common::WAIT, raw.stream.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    // connection.start came, then nothing but the close.
    assert_eq!(buf[0], 1);
}

#[tokio::test]
async fn above_the_watermark_publishes_park_and_clients_hear_blocked() {
    let gw = start_gateway(common::low_watermark).await;
    let mut raw = Raw::open(&gw, &admin(), 131072, 0).await;
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    let q = gw.queue("held").await;
    // One 100 KiB message held in a queue puts the engine above its 64 KiB watermark.
    let big = vec![b'x'; 100 * 1024];
    raw.publish_body(1, "", &q, &big).await;
    // Its confirm and connection.blocked, in either order.
    let (mut blocked, mut acked) = (false, false);
    while !(blocked && acked) {
        match raw.frame().await.expect("open") {
            Frame::Method(0, class) => {
                blocked |= matches!(
                    *class,
                    AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
                );
            }
            Frame::Method(1, class) => {
                acked |= matches!(*class, AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == 1);
            }
            other => panic!("{other:?}"),
        }
    }
    // This one waits: no confirm while blocked.
    raw.publish_body(1, "", &q, b"later").await;
    let quiet = tokio::time::timeout(Duration::from_millis(400), raw.frame()).await;
    assert!(quiet.is_err(), "nothing while blocked: {quiet:?}");
    // Draining the queue lifts the block; the parked publish goes through.
    assert_eq!(gw.take(&q, 1).await.len(), 1);
    let mut unblocked = false;
    let mut acked = false;
    while !(unblocked && acked) {
        match raw.frame().await.expect("open") {
            Frame::Method(0, class) => {
                unblocked |= matches!(
                    *class,
                    AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))
                );
            }
            Frame::Method(1, class) => {
                acked |= matches!(*class, AMQPClass::Basic(basic::AMQPMethod::Ack(a)) if a.delivery_tag == 2);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(gw.depth(&q).await, 1, "the parked publish arrived");
}
