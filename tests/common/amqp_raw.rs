//! A raw AMQP 0-9-1 client for the bad inputs no real client sends: frames built with
//! amq-protocol (or by hand), the gateway's frames read back with its own decoder.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, confirm, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amqp_gateway::protocol::amqp::frame::{self, Frame, PROTOCOL_HEADER};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TestGateway, WAIT};

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn encode(f: &AMQPFrame) -> Vec<u8> {
    gen_frame(f)(WriteContext::from(Vec::new()))
        .expect("encodes")
        .into_inner()
        .0
}

pub fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel, class))
}

pub fn header(channel: u16, body_size: u64) -> Vec<u8> {
    encode(&AMQPFrame::Header(
        channel,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: BasicProperties::default(),
        },
    ))
}

pub fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    encode(&AMQPFrame::Body(channel, data.to_vec()))
}

pub fn publish(channel: u16, exchange: &str, key: &str) -> Vec<u8> {
    method(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: exchange.into(),
            routing_key: key.into(),
            mandatory: false,
            immediate: false,
        })),
    )
}

pub fn channel_open(channel: u16) -> Vec<u8> {
    method(
        channel,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

impl Raw {
    pub async fn tcp(gw: &TestGateway) -> Raw {
        let stream = TcpStream::connect(gw.gateway.addrs().amqp.expect("AMQP listener"))
            .await
            .unwrap();
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// A connection opened with `token`, frame-max `frame_max`, heartbeat `heartbeat`, and
    /// the client capabilities `connection.blocked` and `consumer_cancel_notify`.
    pub async fn open(gw: &TestGateway, token: &str, frame_max: u32, heartbeat: u16) -> Raw {
        let mut raw = Raw::tcp(gw).await;
        raw.send(&PROTOCOL_HEADER).await;
        let start = raw.method().await;
        assert!(
            matches!(
                start,
                AMQPClass::Connection(connection::AMQPMethod::Start(_))
            ),
            "{start:?}"
        );
        let mut caps = FieldTable::default();
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: "PLAIN".into(),
                response: LongString::from(format!("\0any\0{token}")),
                locale: "en_US".into(),
            })),
        ))
        .await;
        let tune = raw.method().await;
        assert!(
            matches!(tune, AMQPClass::Connection(connection::AMQPMethod::Tune(_))),
            "{tune:?}"
        );
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max,
                heartbeat,
            })),
        ))
        .await;
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        ))
        .await;
        let ok = raw.method().await;
        assert!(
            matches!(ok, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))),
            "{ok:?}"
        );
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame but heartbeats; `None` when the gateway closed the socket.
    pub async fn frame(&mut self) -> Option<Frame> {
        tokio::time::timeout(WAIT, async {
            loop {
                match frame::decode(&mut self.buf, 1 << 20).expect("a well-formed frame") {
                    Some(Frame::Heartbeat) => continue,
                    Some(f) => return Some(f),
                    None => {}
                }
                if self.stream.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("a frame or the close in time")
    }

    pub async fn method(&mut self) -> AMQPClass {
        match self.frame().await {
            Some(Frame::Method(_, class)) => *class,
            other => panic!("expected a method, got {other:?}"),
        }
    }

    /// Waits for `connection.close`, answers close-ok, and returns its reply code; the
    /// gateway then closes the socket.
    pub async fn connection_closed(&mut self) -> u16 {
        let code = match self.method().await {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => c.reply_code,
            other => panic!("expected connection.close, got {other:?}"),
        };
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ))
        .await;
        assert!(
            self.frame().await.is_none(),
            "the socket closes after close-ok"
        );
        code
    }

    /// Waits for `channel.close` on `channel`, answers close-ok, and returns its reply code.
    pub async fn channel_closed(&mut self, channel: u16) -> u16 {
        let code = match self.frame().await {
            Some(Frame::Method(c, class)) if c == channel => match *class {
                AMQPClass::Channel(channel::AMQPMethod::Close(close)) => close.reply_code,
                other => panic!("expected channel.close, got {other:?}"),
            },
            other => panic!("expected channel.close on {channel}, got {other:?}"),
        };
        self.send(&method(
            channel,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        ))
        .await;
        code
    }

    /// Puts `channel` in confirm mode and waits for select-ok.
    pub async fn confirm_select(&mut self, channel: u16) {
        self.send(&method(
            channel,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        ))
        .await;
        let ok = self.method().await;
        assert!(
            matches!(ok, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))),
            "{ok:?}"
        );
    }

    /// A whole publish: the method, a content header announcing `data`, and `data` in one
    /// body frame.
    pub async fn publish_body(&mut self, channel: u16, exchange: &str, key: &str, data: &[u8]) {
        self.send(&publish(channel, exchange, key)).await;
        self.send(&header(channel, data.len() as u64)).await;
        self.send(&body(channel, data)).await;
    }

    /// Opens `channel` and waits for open-ok.
    pub async fn open_channel(&mut self, channel: u16) {
        self.send(&channel_open(channel)).await;
        let ok = self.method().await;
        assert!(
            matches!(ok, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))),
            "{ok:?}"
        );
    }
}
