//! Opening an AMQP connection: protocol header, `connection.start` / `start-ok` (PLAIN or
//! AMQPLAIN, the password being a JWT), `tune` / `tune-ok`, `open` / `open-ok`. What comes out
//! is an authenticated, admitted principal and the negotiated limits.

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ACCESS_REFUSED, COMMAND_INVALID, Fault, NOT_ALLOWED, ids};
use super::frame::{self, Frame, PROTOCOL_HEADER, Wire};
use crate::auth::{AuthError, Principal};
use crate::context::Context;
use crate::flow::Admitted;

/// The largest frame the gateway accepts and proposes (RabbitMQ's default).
pub const FRAME_MAX: u32 = 131_072;
/// The smallest a client may ask for (AMQP's frame-min-size).
const FRAME_MIN: u32 = 4096;
pub const CHANNEL_MAX: u16 = 2047;

/// What the handshake settled.
pub struct Negotiated {
    pub principal: Principal,
    pub admitted: Admitted,
    pub frame_max: u32,
    pub channel_max: u16,
    /// Zero: no heartbeats.
    pub heartbeat: u16,
    pub capabilities: Capabilities,
    /// The client's `connection_name`, if it gave one (shown to operators).
    pub name: Option<String>,
}

/// What the client said it understands (`client-properties.capabilities`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Capabilities {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
}

/// Why the handshake did not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not an AMQP 0-9-1 protocol header")]
    BadHeader,
    #[error("the peer closed during the handshake")]
    Closed,
    #[error("{0}")]
    Fault(Fault),
    #[error("{0}")]
    Read(#[from] frame::ReadError),
}

/// Runs the handshake; on a refusal the client has been told why (a protocol header back, or
/// `connection.close` with a reply code) where AMQP has a way to say it.
pub async fn negotiate<R, W>(
    ctx: &Context,
    wire: &mut Wire<R>,
    writer: &mut W,
) -> Result<Negotiated, Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut header = [0u8; 8];
    match wire.reader.read_exact(&mut header).await {
        Ok(_) if header == PROTOCOL_HEADER => {}
        Ok(_) => {
            // The spec's answer to a header it does not speak: the one it does, then close.
            let _ = writer.write_all(&PROTOCOL_HEADER).await;
            return Err(Refused::BadHeader);
        }
        Err(_) => return Err(Refused::Closed),
    }
    let mut out = BytesMut::new();
    frame::method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(start())),
    );
    send(writer, &mut out).await?;

    let start_ok = match expect(wire).await? {
        connection::AMQPMethod::StartOk(ok) => ok,
        other => return Err(unexpected(other)),
    };
    let capabilities = capabilities(&start_ok.client_properties);
    let name = match start_ok.client_properties.inner().get("connection_name") {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    };
    let method = (10, 11);
    let principal = match credentials(start_ok.mechanism.as_str(), start_ok.response.as_bytes()) {
        Ok(token) => authenticate(ctx, token.as_deref()).await,
        Err(why) => Err(AuthError::Invalid(why)),
    }
    .map_err(|e| {
        Fault::connection(
            ACCESS_REFUSED,
            format!(
                "Login was refused using authentication mechanism {}: {e}",
                start_ok.mechanism
            ),
            method,
        )
    });
    let principal = match principal {
        Ok(p) => p,
        Err(fault) => return Err(close_with(writer, fault).await),
    };
    let admitted = match ctx.flow.admission.admit(principal.shared_subject()) {
        Ok(a) => a,
        Err(full) => {
            let fault = Fault::connection(NOT_ALLOWED, full.to_string(), method);
            return Err(close_with(writer, fault).await);
        }
    };

    let (frame_max, channel_max, heartbeat) = tune_and_open(ctx, wire, writer, &mut out).await?;
    Ok(Negotiated {
        principal,
        admitted,
        frame_max,
        channel_max,
        heartbeat,
        capabilities,
        name,
    })
}

/// `tune` / `tune-ok` then `open` / `open-ok`: frame-max, channel-max and heartbeat.
async fn tune_and_open<R, W>(
    ctx: &Context,
    wire: &mut Wire<R>,
    writer: &mut W,
    out: &mut BytesMut,
) -> Result<(u32, u16, u16), Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    frame::method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: CHANNEL_MAX,
            frame_max: FRAME_MAX,
            heartbeat: heartbeat_secs(ctx),
        })),
    );
    send(writer, out).await?;
    let tune = match expect(wire).await? {
        connection::AMQPMethod::TuneOk(t) => t,
        other => return Err(unexpected(other)),
    };
    // Zero means "no limit" to the client: ours then.
    let frame_max = if tune.frame_max == 0 {
        FRAME_MAX
    } else {
        tune.frame_max
    };
    if !(FRAME_MIN..=FRAME_MAX).contains(&frame_max) {
        let fault = Fault::connection(
            NOT_ALLOWED,
            format!("frame-max {frame_max} outside {FRAME_MIN}..={FRAME_MAX}"),
            (10, 31),
        );
        return Err(close_with(writer, fault).await);
    }
    let channel_max = match tune.channel_max {
        0 => CHANNEL_MAX,
        n => n.min(CHANNEL_MAX),
    };
    wire.frame_max = frame_max as usize;

    match expect(wire).await? {
        connection::AMQPMethod::Open(open) if is_default_vhost(open.virtual_host.as_str()) => {}
        connection::AMQPMethod::Open(open) => {
            // The gateway has one namespace; a client expecting another would silently share it.
            let fault = Fault::connection(
                NOT_ALLOWED,
                format!(
                    "vhost '{}' not found (the gateway has only '/')",
                    open.virtual_host
                ),
                (10, 40),
            );
            return Err(close_with(writer, fault).await);
        }
        other => return Err(unexpected(other)),
    }
    frame::method(
        out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    send(writer, out).await?;
    Ok((frame_max, channel_max, tune.heartbeat))
}

fn heartbeat_secs(ctx: &Context) -> u16 {
    ctx.config.amqp.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16
}

fn is_default_vhost(vhost: &str) -> bool {
    vhost == "/" || vhost.is_empty()
}

/// Server properties as RabbitMQ advertises them; clients switch features on from these.
fn start() -> connection::Start {
    let mut caps = FieldTable::default();
    for (name, on) in [
        ("publisher_confirms", true),
        ("exchange_exchange_bindings", false),
        ("basic.nack", true),
        ("consumer_cancel_notify", true),
        ("connection.blocked", true),
        ("authentication_failure_close", true),
        ("per_consumer_qos", true),
        ("consumer_priorities", false),
        ("direct_reply_to", false),
    ] {
        caps.insert(ShortString::from(name), AMQPValue::Boolean(on));
    }
    let mut props = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    props.insert("product".into(), text("amqp-gateway"));
    props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    props.insert("platform".into(), text("Rust"));
    props.insert(
        "information".into(),
        text("AMQP 0-9-1 on the gateway's embedded engine; the password is a JWT"),
    );
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: props,
        mechanisms: LongString::from("PLAIN AMQPLAIN"),
        locales: LongString::from("en_US"),
    }
}

fn capabilities(client: &FieldTable) -> Capabilities {
    let Some(AMQPValue::FieldTable(caps)) = client.inner().get("capabilities") else {
        return Capabilities::default();
    };
    let on = |name: &str| matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)));
    Capabilities {
        consumer_cancel_notify: on("consumer_cancel_notify"),
        connection_blocked: on("connection.blocked"),
    }
}

/// The token in a SASL response: PLAIN is `authzid NUL authcid NUL password`, AMQPLAIN a field
/// table without its length prefix. The user name is free; an empty password is no token.
fn credentials(mechanism: &str, response: &[u8]) -> Result<Option<String>, String> {
    let password: Vec<u8> = match mechanism {
        "PLAIN" => {
            let mut parts = response.splitn(3, |b| *b == 0);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(_), Some(_), Some(password)) => password.to_vec(),
                _ => return Err("malformed PLAIN response".into()),
            }
        }
        "AMQPLAIN" => {
            let mut table = Vec::with_capacity(response.len() + 4);
            table.extend_from_slice(&(response.len() as u32).to_be_bytes());
            table.extend_from_slice(response);
            let parsed = amq_protocol::types::parsing::parse_field_table(&table[..])
                .map_err(|_| "malformed AMQPLAIN response".to_owned())?
                .1;
            match parsed.inner().get("PASSWORD") {
                Some(AMQPValue::LongString(s)) => s.as_bytes().to_vec(),
                Some(AMQPValue::ShortString(s)) => s.as_str().as_bytes().to_vec(),
                _ => Vec::new(),
            }
        }
        other => {
            return Err(format!(
                "mechanism {other} is not offered (PLAIN, AMQPLAIN)"
            ));
        }
    };
    if password.is_empty() {
        return Ok(None);
    }
    String::from_utf8(password)
        .map(Some)
        .map_err(|_| "the password is not UTF-8".into())
}

async fn authenticate(ctx: &Context, token: Option<&str>) -> Result<Principal, AuthError> {
    match token {
        Some(token) => ctx.auth.authenticate(token).await,
        None => ctx.auth.anonymous(),
    }
}

/// The next method on channel 0; heartbeats are allowed, anything else is a protocol error.
async fn expect<R: AsyncRead + Unpin>(
    wire: &mut Wire<R>,
) -> Result<connection::AMQPMethod, Refused> {
    loop {
        match wire.next().await? {
            None => return Err(Refused::Closed),
            Some(Frame::Heartbeat) => continue,
            Some(Frame::Method(0, class)) => match *class {
                AMQPClass::Connection(m) => return Ok(m),
                other => {
                    return Err(Refused::Fault(Fault::connection(
                        COMMAND_INVALID,
                        "expected a connection method during the handshake",
                        ids(&other),
                    )));
                }
            },
            Some(_) => {
                return Err(Refused::Fault(Fault::connection(
                    COMMAND_INVALID,
                    "expected a connection method on channel 0 during the handshake",
                    (0, 0),
                )));
            }
        }
    }
}

fn unexpected(method: connection::AMQPMethod) -> Refused {
    if let connection::AMQPMethod::Close(_) = method {
        return Refused::Closed;
    }
    Refused::Fault(Fault::connection(
        COMMAND_INVALID,
        "unexpected method during the handshake",
        ids(&AMQPClass::Connection(method)),
    ))
}

async fn send<W: AsyncWrite + Unpin>(writer: &mut W, out: &mut BytesMut) -> Result<(), Refused> {
    let result = writer.write_all(out).await;
    out.clear();
    result.map_err(|_| Refused::Closed)
}

/// Sends `connection.close` for `fault` (the caller then closes the socket: a refused client
/// gets no time to answer with close-ok).
pub async fn close_with<W: AsyncWrite + Unpin>(writer: &mut W, fault: Fault) -> Refused {
    let mut out = BytesMut::new();
    let reply = fault.reply();
    frame::method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: reply.code,
            reply_text: ShortString::from(reply.text.as_str()),
            class_id: reply.class_id,
            method_id: reply.method_id,
        })),
    );
    let _ = writer.write_all(&out).await;
    Refused::Fault(fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_responses() {
        assert_eq!(
            credentials("PLAIN", b"\0any\0tok").unwrap(),
            Some("tok".into())
        );
        assert_eq!(credentials("PLAIN", b"\0any\0").unwrap(), None);
        assert!(credentials("PLAIN", b"nonul").is_err());
        assert!(credentials("EXTERNAL", b"").is_err());
        let amqplain = amq_protocol::auth::Credentials::new("u".into(), "secret".into())
            .sasl_auth_string(amq_protocol::auth::SASLMechanism::AMQPlain);
        assert_eq!(
            credentials("AMQPLAIN", amqplain.as_bytes()).unwrap(),
            Some("secret".into())
        );
    }
}
