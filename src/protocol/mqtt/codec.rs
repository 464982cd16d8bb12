//! MQTT framing: `rmqtt-codec` (3.1, 3.1.1, 5; version detected from CONNECT) behind one
//! version-neutral packet type, so the session handles each packet once whatever the version.
//! Pure: bytes in → [`Inbound`], [`Outbound`] → bytes out; "need more bytes" is `Ok(None)`.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::version::ProtocolVersion;
use rmqtt_codec::{MqttCodec, MqttPacket, v3, v5};
use tokio_util::codec::{Decoder, Encoder};

pub use rmqtt_codec::error::DecodeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V3,
    V5,
}

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval, seconds.
    pub delay: u32,
    /// MQTT 5 will properties: published with the will as a PUBLISH's would be.
    pub props: PublishProps,
}

#[derive(Debug, Clone)]
pub struct Connect {
    pub version: Version,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// v5: how many QoS 1/2 publishes the client takes in flight.
    pub receive_max: Option<u16>,
    pub session_expiry: u32,
    /// MQTT 5 enhanced authentication.
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<u32>,
    /// MQTT 5: how many topic aliases the client accepts from the server (0: none).
    pub topic_alias_max: u16,
}

/// MQTT 5 publish properties the gateway maps (DESIGN.md §3); empty for 3.1.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProps {
    pub content_type: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub response_topic: Option<String>,
    /// Seconds.
    pub message_expiry: Option<u32>,
    pub user_properties: Vec<(String, String)>,
    pub topic_alias: Option<u16>,
    /// Payload Format Indicator 1: the payload is UTF-8.
    pub payload_utf8: bool,
    /// Outbound: the identifiers of the subscriptions the message matched.
    pub subscription_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct PublishIn {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub packet_id: Option<u16>,
    pub payload: Bytes,
    pub props: PublishProps,
}

#[derive(Debug, Clone)]
pub struct Filter {
    pub filter: String,
    pub qos: u8,
    /// MQTT 5 subscription options (all off for 3.1.1).
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained at subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

#[derive(Debug)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(PublishIn),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        packet_id: u16,
        filters: Vec<Filter>,
    },
    Unsubscribe {
        packet_id: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `reason` 0x04 asks for the will; MQTT 5 may change the Session Expiry Interval.
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    /// MQTT 5 AUTH: reason (0x19 re-authenticate), method and data.
    Auth {
        reason: u8,
        method: Option<String>,
        data: Option<Bytes>,
    },
    /// Packets a client must not send (CONNACK, SUBACK, …) or does not use here.
    Unexpected(&'static str),
}

/// What the session sends. Reason codes are MQTT 5's; for 3.1.1 they are mapped.
#[derive(Debug)]
pub enum Outbound {
    ConnAck {
        code: u8,
        session_present: bool,
        /// MQTT 5: the granted Session Expiry Interval, when it differs from the requested one.
        session_expiry: Option<u32>,
        receive_max: u16,
        max_packet_size: u32,
        assigned_client_id: Option<String>,
        max_qos: u8,
        /// Echoed when the client authenticated with a method.
        auth_method: Option<String>,
        /// MQTT 5 Server Keep Alive: the client must use this instead of its own value.
        server_keep_alive: Option<u16>,
    },
    Publish {
        topic: String,
        qos: u8,
        retain: bool,
        dup: bool,
        packet_id: Option<u16>,
        payload: Bytes,
        props: PublishProps,
    },
    /// A QoS 0 PUBLISH already encoded for MQTT 3.1.1 ([`encode_shared_publish`]), the same
    /// bytes for every 3.1.1 subscriber of the message; `payload` is its payload's length, which
    /// the QoS 0 bound counts.
    Encoded {
        frame: Bytes,
        payload: u64,
    },
    PubAck {
        packet_id: u16,
        code: u8,
    },
    PubRec {
        packet_id: u16,
        code: u8,
    },
    PubRel {
        packet_id: u16,
    },
    PubComp {
        packet_id: u16,
    },
    SubAck {
        packet_id: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        packet_id: u16,
        count: usize,
    },
    PingResp,
    Disconnect {
        code: u8,
    },
    /// MQTT 5 AUTH answer (0x00 success).
    Auth {
        reason: u8,
        method: String,
    },
}

/// How many topic aliases a v5 client may set up (inbound).
pub const TOPIC_ALIAS_MAX: u16 = 32;

fn nz16(v: u16) -> NonZeroU16 {
    NonZeroU16::new(v).unwrap_or(NonZeroU16::MIN)
}

fn qos_of(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The largest Remaining Length of a packet whose whole size, fixed header included, is at most
/// `max_packet` — MQTT 5's Maximum Packet Size counts the whole packet, rmqtt-codec limits the
/// Remaining Length.
pub fn remaining_limit(max_packet: u32) -> u32 {
    // Each Variable Byte Integer length and the Remaining Lengths it can encode.
    const RANGES: [(u32, u32, u32); 4] = [
        (1, 0, 127),
        (2, 128, 16_383),
        (3, 16_384, 2_097_151),
        (4, 2_097_152, 268_435_455),
    ];
    RANGES
        .iter()
        .filter_map(|&(len, low, high)| {
            let fits = max_packet.checked_sub(1 + len)?.min(high);
            (fits >= low).then_some(fits)
        })
        .max()
        .unwrap_or(0)
}

/// Whether `buf` starts with a whole packet, as its fixed header (a type byte and a Remaining
/// Length of one to four bytes) says. A length that runs on past four bytes counts as whole:
/// decoding it is what tells the client it is malformed.
pub fn whole_packet(buf: &[u8]) -> bool {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return buf.len() >= 2 + i + remaining;
        }
    }
    buf.len() >= 5
}

/// The codec of one connection: detects the version on CONNECT, then decodes that version.
pub struct Codec {
    inner: MqttCodec,
    max_in: u32,
}

impl Codec {
    pub fn new(max_packet_size: u32) -> Self {
        Codec {
            inner: MqttCodec::Version(rmqtt_codec::version::VersionCodec),
            max_in: max_packet_size,
        }
    }

    /// An encoder for a connection whose version is known (the writer side).
    pub fn for_version(version: Version, max_packet_size: u32) -> Self {
        Codec {
            inner: match version {
                Version::V3 => MqttCodec::V3(v3::Codec::new(max_packet_size)),
                Version::V5 => MqttCodec::V5(v5::Codec::new(max_packet_size, max_packet_size)),
            },
            max_in: max_packet_size,
        }
    }

    pub fn version(&self) -> Option<Version> {
        match self.inner {
            MqttCodec::V3(_) => Some(Version::V3),
            MqttCodec::V5(_) => Some(Version::V5),
            MqttCodec::Version(_) => None,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, DecodeError> {
        loop {
            let Some((packet, _)) = self.inner.decode(buf)? else {
                return Ok(None);
            };
            return Ok(Some(match packet {
                MqttPacket::Version(ProtocolVersion::MQTT3) => {
                    self.inner = MqttCodec::V3(v3::Codec::new(remaining_limit(self.max_in)));
                    continue;
                }
                MqttPacket::Version(ProtocolVersion::MQTT5) => {
                    self.inner =
                        MqttCodec::V5(v5::Codec::new(remaining_limit(self.max_in), self.max_in));
                    continue;
                }
                MqttPacket::V3(p) => from_v3(p),
                MqttPacket::V5(p) => from_v5(p),
            }));
        }
    }

    pub fn encode(
        &mut self,
        packet: Outbound,
        buf: &mut BytesMut,
    ) -> Result<(), rmqtt_codec::error::EncodeError> {
        if let Outbound::Encoded { frame, .. } = packet {
            buf.extend_from_slice(&frame);
            return Ok(());
        }
        if let Outbound::Publish {
            topic,
            qos,
            retain,
            dup,
            packet_id,
            payload,
            props,
        } = &packet
            && let Some(version) = self.version()
            && (version == Version::V3 || *props == PublishProps::default())
            && plain_publish(
                buf,
                version,
                self.max_in,
                (topic, *qos, *retain, *dup, *packet_id),
                payload,
            )
        {
            return Ok(());
        }
        let packet = match self.version() {
            Some(Version::V5) => MqttPacket::V5(to_v5(packet)),
            _ => MqttPacket::V3(to_v3(packet)),
        };
        self.inner.encode(packet, buf)
    }
}

/// A 3.1.1 QoS 0 PUBLISH of `payload` to `topic` (not retained, no packet id), encoded once
/// for every 3.1.1 subscriber of a message: fan-out to fifty subscribers encoded the same
/// bytes fifty times (a sixth of a delivery's instructions under callgrind).
pub fn encode_shared_publish(topic: String, payload: Bytes) -> Bytes {
    let mut buf = BytesMut::new();
    if !plain_publish(
        &mut buf,
        Version::V3,
        0,
        (&topic, 0, false, false, None),
        &payload,
    ) {
        let packet = Outbound::Publish {
            topic,
            qos: 0,
            retain: false,
            dup: false,
            packet_id: None,
            payload,
            props: PublishProps::default(),
        };
        // Refused as the codec refuses it (a topic longer than a string can be).
        if let Err(e) = Codec::for_version(Version::V3, 0).encode(packet, &mut buf) {
            tracing::warn!(error = %e, "cannot encode an MQTT packet");
        }
    }
    buf.freeze()
}

/// The largest Remaining Length a fixed header can say (four bytes of it).
const MAX_REMAINING: usize = 268_435_455;

/// Writes a PUBLISH without properties (every 3.1.1 one; an MQTT 5 one whose properties are
/// empty): the packet of almost every delivery, written straight into `buf`. The codec's
/// encoder builds its own packet (the topic made a `ByteString`), sizes it, grows the buffer
/// and drops the packet again: about 940 instructions for a 64-byte QoS 0 PUBLISH under
/// callgrind, most of a delivery's encoding, for twenty bytes of header (docs/mqtt.md,
/// decisions). Anything this does not write as the codec would — a topic too long for a
/// string, a packet over `max` or over what a Remaining Length can say, a packet id
/// missing at QoS 1/2, present at QoS 0 or zero — is left to the codec (false), whose errors
/// and choices stand.
/// The two agree byte for byte (`codec/tests.rs`).
fn plain_publish(
    buf: &mut BytesMut,
    version: Version,
    max: u32,
    (topic, qos, retain, dup, packet_id): (&str, u8, bool, bool, Option<u16>),
    payload: &[u8],
) -> bool {
    use bytes::BufMut;
    let Ok(topic_len) = u16::try_from(topic.len()) else {
        return false;
    };
    if qos > 2 || (qos == 0) != packet_id.is_none() || packet_id == Some(0) {
        return false;
    }
    let props_len = usize::from(version == Version::V5);
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + props_len + payload.len();
    if remaining > MAX_REMAINING || (max != 0 && remaining > max as usize) {
        return false;
    }
    buf.reserve(1 + var_int_len(remaining) + remaining);
    buf.put_u8(0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain));
    let mut left = remaining;
    loop {
        let byte = (left % 128) as u8;
        left /= 128;
        if left == 0 {
            buf.put_u8(byte);
            break;
        }
        buf.put_u8(byte | 0x80);
    }
    buf.put_u16(topic_len);
    buf.put_slice(topic.as_bytes());
    if let Some(id) = packet_id {
        buf.put_u16(id);
    }
    if version == Version::V5 {
        // Property Length 0.
        buf.put_u8(0);
    }
    buf.put_slice(payload);
    true
}

/// User properties as the session keeps them, in the order they came.
fn user_properties(list: v5::UserProperties) -> Vec<(String, String)> {
    list.into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn publish_in(p: Publish) -> PublishIn {
    let props = p
        .properties
        .map(|pp| PublishProps {
            content_type: pp.content_type.map(|v| v.to_string()),
            correlation_data: pp.correlation_data,
            response_topic: pp.response_topic.map(|v| v.to_string()),
            message_expiry: pp.message_expiry_interval.map(std::num::NonZeroU32::get),
            user_properties: user_properties(pp.user_properties),
            topic_alias: pp.topic_alias.map(NonZeroU16::get),
            payload_utf8: pp.is_utf8_payload,
            subscription_ids: Vec::new(),
        })
        .unwrap_or_default();
    PublishIn {
        // Not `to_string()`: through `Display` that is a formatter per message.
        topic: String::from(&*p.topic),
        qos: qos_of(p.qos),
        retain: p.retain,
        packet_id: p.packet_id.map(NonZeroU16::get),
        payload: p.payload,
        props,
    }
}

fn from_v3(p: v3::Packet) -> Inbound {
    use v3::Packet as P;
    match p {
        P::Connect(c) => Inbound::Connect(Box::new(Connect {
            version: Version::V3,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            client_id: c.client_id.to_string(),
            password: c.password,
            will: c.last_will.map(|w| Will {
                topic: w.topic.to_string(),
                payload: w.message,
                qos: qos_of(w.qos),
                retain: w.retain,
                delay: 0,
                props: PublishProps::default(),
            }),
            receive_max: None,
            session_expiry: 0,
            auth_method: None,
            auth_data: None,
            max_packet_size: None,
            topic_alias_max: 0,
        })),
        P::Publish(p) => Inbound::Publish(publish_in(*p)),
        P::PublishAck { packet_id } => Inbound::PubAck(packet_id.get()),
        P::PublishReceived { packet_id } => Inbound::PubRec(packet_id.get()),
        P::PublishRelease { packet_id } => Inbound::PubRel(packet_id.get()),
        P::PublishComplete { packet_id } => Inbound::PubComp(packet_id.get()),
        P::Subscribe {
            packet_id,
            topic_filters,
        } => Inbound::Subscribe {
            packet_id: packet_id.get(),
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| Filter {
                    filter: f.to_string(),
                    qos: qos_of(q),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                    subscription_id: None,
                })
                .collect(),
        },
        P::Unsubscribe {
            packet_id,
            topic_filters,
        } => Inbound::Unsubscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        P::PingRequest => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        _ => Inbound::Unexpected("a server-to-client packet"),
    }
}

fn from_v5(p: v5::Packet) -> Inbound {
    use v5::Packet as P;
    match p {
        P::Connect(c) => Inbound::Connect(Box::new(Connect {
            version: Version::V5,
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: c.client_id.to_string(),
            password: c.password,
            will: c.last_will.map(|w| Will {
                topic: w.topic.to_string(),
                payload: w.message,
                qos: qos_of(w.qos),
                retain: w.retain,
                delay: w.will_delay_interval_sec.unwrap_or(0),
                props: PublishProps {
                    content_type: w.content_type.map(|v| v.to_string()),
                    correlation_data: w.correlation_data,
                    response_topic: w.response_topic.map(|v| v.to_string()),
                    message_expiry: w.message_expiry_interval.map(std::num::NonZeroU32::get),
                    user_properties: user_properties(w.user_properties),
                    payload_utf8: w.is_utf8_payload.unwrap_or(false),
                    ..PublishProps::default()
                },
            }),
            receive_max: c.receive_max.map(NonZeroU16::get),
            session_expiry: c.session_expiry_interval_secs,
            auth_method: c.auth_method.map(|m| m.to_string()),
            auth_data: c.auth_data,
            max_packet_size: c.max_packet_size.map(std::num::NonZeroU32::get),
            topic_alias_max: c.topic_alias_max,
        })),
        P::Publish(p) => Inbound::Publish(publish_in(*p)),
        P::PublishAck(a) => Inbound::PubAck(a.packet_id.get()),
        P::PublishReceived(a) => Inbound::PubRec(a.packet_id.get()),
        P::PublishRelease(a) => Inbound::PubRel(a.packet_id.get()),
        P::PublishComplete(a) => Inbound::PubComp(a.packet_id.get()),
        P::Subscribe(s) => {
            let id = s.id.map(std::num::NonZeroU32::get);
            Inbound::Subscribe {
                packet_id: s.packet_id.get(),
                filters: s
                    .topic_filters
                    .into_iter()
                    .map(|(f, o)| Filter {
                        filter: f.to_string(),
                        qos: qos_of(o.qos),
                        no_local: o.no_local,
                        retain_as_published: o.retain_as_published,
                        retain_handling: o.retain_handling as u8,
                        subscription_id: id,
                    })
                    .collect(),
            }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe {
            packet_id: u.packet_id.get(),
            filters: u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        P::PingRequest => Inbound::PingReq,
        P::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code.into(),
            session_expiry: d.session_expiry_interval_secs,
        },
        P::Auth(a) => Inbound::Auth {
            reason: a.reason_code as u8,
            method: a.auth_method.map(|m| m.to_string()),
            data: a.auth_data,
        },
        _ => Inbound::Unexpected("a server-to-client packet"),
    }
}

fn publish_out(
    topic: String,
    q: u8,
    retain: bool,
    dup: bool,
    packet_id: Option<u16>,
    payload: Bytes,
    props: Option<PublishProps>,
) -> Publish {
    let properties =
        props
            .filter(|p| *p != PublishProps::default())
            .map(|p| v5::PublishProperties {
                topic_alias: p.topic_alias.and_then(NonZeroU16::new),
                correlation_data: p.correlation_data,
                message_expiry_interval: p.message_expiry.and_then(std::num::NonZeroU32::new),
                content_type: p.content_type.map(ByteString::from),
                user_properties: p
                    .user_properties
                    .into_iter()
                    .map(|(k, v)| (ByteString::from(k), ByteString::from(v)))
                    .collect(),
                is_utf8_payload: p.payload_utf8,
                response_topic: p.response_topic.map(ByteString::from),
                subscription_ids: p
                    .subscription_ids
                    .into_iter()
                    .filter_map(std::num::NonZeroU32::new)
                    .collect(),
            });
    Publish {
        dup,
        retain,
        qos: qos(q),
        topic: ByteString::from(topic),
        packet_id: packet_id.map(nz16),
        payload,
        properties,
    }
}

/// Bytes of an MQTT Variable Byte Integer.
fn var_int_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The exact encoded size of an outbound PUBLISH, as [`Codec::encode`] writes it: what a
/// client's Maximum Packet Size is compared with ([MQTT-3.1.2-24]), so a packet that fits to
/// the byte is delivered.
pub fn publish_size(
    version: Version,
    topic: &str,
    qos: u8,
    payload: usize,
    props: &PublishProps,
) -> usize {
    let mut remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload;
    if version == Version::V5 {
        let string = |s: usize| 1 + 2 + s;
        let props_len = props.topic_alias.filter(|a| *a > 0).map_or(0, |_| 3)
            + props
                .correlation_data
                .as_ref()
                .map_or(0, |d| string(d.len()))
            + props.message_expiry.filter(|e| *e > 0).map_or(0, |_| 5)
            + props.content_type.as_ref().map_or(0, |c| string(c.len()))
            + if props.payload_utf8 { 2 } else { 0 }
            + props.response_topic.as_ref().map_or(0, |t| string(t.len()))
            + props
                .subscription_ids
                .iter()
                .filter(|id| **id > 0)
                .map(|id| 1 + var_int_len(*id as usize))
                .sum::<usize>()
            + props
                .user_properties
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum::<usize>();
        remaining += var_int_len(props_len) + props_len;
    }
    1 + var_int_len(remaining) + remaining
}

/// MQTT 5 reason codes as 3.1.1 CONNACK return codes.
fn v3_connack_code(code: u8) -> v3::ConnectAckReason {
    match code {
        0 => v3::ConnectAckReason::ConnectionAccepted,
        0x84 => v3::ConnectAckReason::UnacceptableProtocolVersion,
        0x85 => v3::ConnectAckReason::IdentifierRejected,
        0x86 => v3::ConnectAckReason::BadUserNameOrPassword,
        0x87 => v3::ConnectAckReason::NotAuthorized,
        _ => v3::ConnectAckReason::ServiceUnavailable,
    }
}

fn to_v3(p: Outbound) -> v3::Packet {
    use v3::Packet as P;
    match p {
        Outbound::ConnAck {
            code,
            session_present,
            ..
        } => P::ConnectAck(v3::ConnectAck {
            return_code: v3_connack_code(code),
            session_present,
        }),
        Outbound::Publish {
            topic,
            qos,
            retain,
            dup,
            packet_id,
            payload,
            ..
        } => P::Publish(Box::new(publish_out(
            topic, qos, retain, dup, packet_id, payload, None,
        ))),
        Outbound::PubAck { packet_id, .. } => P::PublishAck {
            packet_id: nz16(packet_id),
        },
        Outbound::PubRec { packet_id, .. } => P::PublishReceived {
            packet_id: nz16(packet_id),
        },
        Outbound::PubRel { packet_id } => P::PublishRelease {
            packet_id: nz16(packet_id),
        },
        Outbound::PubComp { packet_id } => P::PublishComplete {
            packet_id: nz16(packet_id),
        },
        Outbound::SubAck { packet_id, codes } => P::SubscribeAck {
            packet_id: nz16(packet_id),
            status: codes
                .into_iter()
                .map(|c| {
                    if c < 3 {
                        v3::SubscribeReturnCode::Success(qos(c))
                    } else {
                        v3::SubscribeReturnCode::Failure
                    }
                })
                .collect(),
        },
        Outbound::UnsubAck { packet_id, .. } => P::UnsubscribeAck {
            packet_id: nz16(packet_id),
        },
        Outbound::PingResp => P::PingResponse,
        // 3.1.1 has no server DISCONNECT nor AUTH: closing is the answer (the writer skips them).
        // Not in 3.1.1 (the writer drops a DISCONNECT before it gets here); an encoded
        // PUBLISH is written as it is by `Codec::encode`.
        Outbound::Disconnect { .. } | Outbound::Auth { .. } | Outbound::Encoded { .. } => {
            P::PingResponse
        }
    }
}

fn to_v5(p: Outbound) -> v5::Packet {
    use v5::Packet as P;
    match p {
        Outbound::ConnAck {
            code,
            session_present,
            session_expiry,
            receive_max,
            max_packet_size,
            assigned_client_id,
            max_qos,
            auth_method,
            server_keep_alive,
        } => P::ConnectAck(Box::new(v5::ConnectAck {
            session_present,
            session_expiry_interval_secs: session_expiry,
            reason_code: v5::ConnectAckReason::try_from(code)
                .unwrap_or(v5::ConnectAckReason::UnspecifiedError),
            receive_max: nz16(receive_max),
            max_qos: qos(max_qos),
            auth_method: auth_method.map(ByteString::from),
            max_packet_size: Some(max_packet_size),
            assigned_client_id: assigned_client_id.map(ByteString::from),
            retain_available: true,
            topic_alias_max: TOPIC_ALIAS_MAX,
            shared_subscription_available: true,
            subscription_identifiers_available: true,
            server_keepalive_sec: server_keep_alive,
            ..Default::default()
        })),
        Outbound::Publish {
            topic,
            qos,
            retain,
            dup,
            packet_id,
            payload,
            props,
        } => P::Publish(Box::new(publish_out(
            topic,
            qos,
            retain,
            dup,
            packet_id,
            payload,
            Some(props),
        ))),
        Outbound::PubAck { packet_id, code } => P::PublishAck(v5::PublishAck {
            packet_id: nz16(packet_id),
            reason_code: v5::PublishAckReason::try_from(code)
                .unwrap_or(v5::PublishAckReason::UnspecifiedError),
            ..Default::default()
        }),
        Outbound::PubRec { packet_id, code } => P::PublishReceived(v5::PublishAck {
            packet_id: nz16(packet_id),
            reason_code: v5::PublishAckReason::try_from(code)
                .unwrap_or(v5::PublishAckReason::UnspecifiedError),
            ..Default::default()
        }),
        Outbound::PubRel { packet_id } => P::PublishRelease(v5::PublishAck2 {
            packet_id: nz16(packet_id),
            ..Default::default()
        }),
        Outbound::PubComp { packet_id } => P::PublishComplete(v5::PublishAck2 {
            packet_id: nz16(packet_id),
            ..Default::default()
        }),
        Outbound::SubAck { packet_id, codes } => P::SubscribeAck(v5::SubscribeAck {
            packet_id: nz16(packet_id),
            properties: Default::default(),
            reason_string: None,
            status: codes
                .into_iter()
                .map(|c| {
                    v5::SubscribeAckReason::try_from(c)
                        .unwrap_or(v5::SubscribeAckReason::UnspecifiedError)
                })
                .collect(),
        }),
        Outbound::UnsubAck { packet_id, count } => P::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id: nz16(packet_id),
            properties: Default::default(),
            reason_string: None,
            status: vec![v5::UnsubscribeAckReason::Success; count],
        }),
        Outbound::PingResp => P::PingResponse,
        Outbound::Auth { reason, method } => P::Auth(v5::Auth {
            reason_code: v5::AuthReasonCode::try_from(reason)
                .unwrap_or(v5::AuthReasonCode::Success),
            auth_method: Some(ByteString::from(method)),
            ..Default::default()
        }),
        Outbound::Disconnect { code } => P::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::try_from(code)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError),
            ..Default::default()
        }),
        // Only 3.1.1 sessions share encoded packets, and `Codec::encode` writes them as they are.
        Outbound::Encoded { .. } => P::PingResponse,
    }
}

#[cfg(test)]
mod tests;
