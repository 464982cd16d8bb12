//! A raw MQTT byte stream to the gateway, over TCP or over WebSocket (`/mqtt`, binary frames),
//! for tests that write packets themselves and read exactly what came back.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{TestGateway, WAIT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub enum Io {
    Tcp(TcpStream),
    Ws(Box<Ws>),
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// TCP end of stream, or a WebSocket Close frame: everything sent before it was read.
    Clean,
    /// A reset or another error: what was sent before it may be lost.
    Error(String),
}

impl Io {
    pub async fn open(gw: &TestGateway, t: Transport) -> Io {
        match t {
            Transport::Tcp => Io::Tcp(
                TcpStream::connect(gw.gateway.addrs().mqtt)
                    .await
                    .expect("MQTT TCP connect"),
            ),
            Transport::Ws => {
                let mut req = format!("ws://{}/mqtt", gw.gateway.addrs().http)
                    .into_client_request()
                    .unwrap();
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
                let (ws, _) = tokio_tungstenite::connect_async(req)
                    .await
                    .expect("MQTT WebSocket connect");
                Io::Ws(Box::new(ws))
            }
        }
    }

    /// `bytes` as they are (one binary frame over WebSocket).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match self {
            Io::Tcp(s) => s.write_all(bytes).await.expect("write"),
            Io::Ws(ws) => ws
                .send(WsMessage::Binary(bytes.to_vec().into()))
                .await
                .expect("send frame"),
        }
    }

    /// More bytes from the gateway into `buf`; `Err` when the connection ended.
    pub async fn fill(&mut self, buf: &mut BytesMut) -> Result<(), End> {
        match self {
            Io::Tcp(s) => match s.read_buf(buf).await {
                Ok(0) => Err(End::Clean),
                Ok(_) => Ok(()),
                Err(e) => Err(End::Error(e.to_string())),
            },
            Io::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(());
                    }
                    Some(Ok(WsMessage::Close(_))) | None => return Err(End::Clean),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(End::Error(e.to_string())),
                }
            },
        }
    }
}

/// Raw packets both ways: what a test writes goes as it is; what comes back is split into
/// packets by the fixed header only.
pub struct RawWire {
    pub io: Io,
    buf: BytesMut,
}

impl RawWire {
    /// MQTT over TCP to `addr` (a gateway in another process).
    pub async fn tcp(addr: std::net::SocketAddr) -> RawWire {
        RawWire {
            io: Io::Tcp(TcpStream::connect(addr).await.expect("MQTT TCP connect")),
            buf: BytesMut::new(),
        }
    }

    pub async fn open(gw: &TestGateway, t: Transport) -> RawWire {
        RawWire {
            io: Io::open(gw, t).await,
            buf: BytesMut::new(),
        }
    }

    /// A connection of MQTT `level` (4: 3.1.1, 5) with `token` as the password, once CONNACK
    /// accepted it.
    pub async fn connected(
        gw: &TestGateway,
        t: Transport,
        level: u8,
        client: &str,
        token: &str,
    ) -> RawWire {
        let mut wire = RawWire::open(gw, t).await;
        let connect = super::mqtt_bytes::connect(b"MQTT", level, 0, client, Some(token));
        wire.send_raw(&connect).await;
        let (first, body) = wire.packet().await.expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0), "connected");
        wire
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.send_raw(bytes).await;
    }

    /// The next packet as (first byte, body), or how the connection ended; within [`WAIT`].
    pub async fn packet(&mut self) -> Result<(u8, Vec<u8>), End> {
        let read = async {
            loop {
                if let Some((header, len)) = fixed_header(&self.buf)
                    && self.buf.len() >= header + len
                {
                    let packet = self.buf.split_to(header + len);
                    return Ok((packet[0], packet[header..].to_vec()));
                }
                self.io.fill(&mut self.buf).await?;
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a packet or the end of the connection in time")
    }

    /// What the gateway answered a PUBLISH: `Ok(reason)` from PUBACK (0 on 3.1.1), `Err(first
    /// byte and reason)` of what came instead (DISCONNECT), `Err(None)` for a plain close.
    pub async fn puback(&mut self) -> Result<u8, Option<(u8, u8)>> {
        match self.packet().await {
            Ok((0x40, body)) => Ok(body.get(2).copied().unwrap_or(0)),
            Ok((first, body)) => Err(Some((first, body.first().copied().unwrap_or(0)))),
            Err(_) => Err(None),
        }
    }

    /// Whether anything arrives within `quiet` (absence is only seen over a window).
    pub async fn quiet_for(&mut self, quiet: std::time::Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        tokio::time::timeout(quiet, self.io.fill(&mut self.buf))
            .await
            .is_err()
    }
}

/// The fixed header's length and the remaining length, once the buffer holds them.
pub fn fixed_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, b) in buf.iter().enumerate().skip(1).take(4) {
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((i + 1, len));
        }
    }
    None
}

/// Each case (an `async fn(Transport)` of the test file) once over TCP (`tcp::…`) and once
/// over WebSocket (`ws::…`).
#[allow(unused_macros)]
macro_rules! over_both_transports {
    ($($case:ident),* $(,)?) => {
        mod tcp {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Transport::Tcp).await;
            })*
        }
        mod ws {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::Transport::Ws).await;
            })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use over_both_transports;
