//! AMQP clients of the gateway's own AMQP listener: lapin connections with a JWT as the
//! password, and the reply code of a broker's close.

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::{TestGateway, WAIT};

/// `amqp://any:{token}@…/%2f`: the user name is free, the password is the token.
pub fn url(gw: &TestGateway, token: &str) -> String {
    let addr = gw
        .gateway
        .addrs()
        .amqp
        .expect("the AMQP listener runs (embedded engine)");
    format!("amqp://any:{token}@{addr}/%2f")
}

pub async fn connect(gw: &TestGateway, token: &str) -> Connection {
    tokio::time::timeout(
        WAIT,
        Connection::connect(&url(gw, token), ConnectionProperties::default()),
    )
    .await
    .expect("AMQP connect in time")
    .expect("AMQP connection opens")
}

pub async fn channel(conn: &Connection) -> Channel {
    conn.create_channel().await.expect("a channel opens")
}

/// The reply code the gateway closed a channel or connection with.
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => Some(err.get_id()),
        _ => None,
    }
}

pub fn text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => err.get_message().to_string(),
        other => format!("{other:?}"),
    }
}

/// Publishes `body` and waits for the publisher confirm (the channel must be in confirm mode).
pub async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish sent");
    let confirmation = tokio::time::timeout(WAIT, confirm)
        .await
        .expect("confirm in time")
        .expect("confirm");
    assert!(confirmation.is_ack(), "the gateway acked the publish");
}

/// What lapin reports about a connection: a channel or the connection itself closed by the
/// gateway arrives as an `Event::Error` with its reply code.
pub type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = lapin::Event> + Send>>;

pub fn events(conn: &Connection) -> Events {
    Box::pin(conn.events_listener())
}

/// The next error on `events`, within [`WAIT`]: the answer to something that has no reply of
/// its own (a refused publish, an unknown ack), whichever call the client makes next.
pub async fn next_error(events: &mut Events) -> lapin::Error {
    use futures_util::StreamExt;
    tokio::time::timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(lapin::Event::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("the connection's events ended without an error"),
            }
        }
    })
    .await
    .expect("an error reported in time")
}

/// Declares `queue` with default flags and no arguments.
pub async fn declare(ch: &Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions::default(),
        no_args(),
    )
    .await
    .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

/// `basic.get` on `queue`; `None` when it is empty.
pub async fn get(
    ch: &Channel,
    queue: &str,
    no_ack: bool,
) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack })
        .await
        .unwrap_or_else(|e| panic!("get from {queue}: {e}"))
}

/// A consumer of `queue` tagged `tag` whose deliveries need no ack.
pub async fn consume_no_ack(ch: &Channel, queue: &str, tag: &str) -> lapin::Consumer {
    let options = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    ch.basic_consume(queue.into(), tag.into(), options, no_args())
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"))
}

pub fn no_args() -> FieldTable {
    FieldTable::default()
}
