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

mod decode;
mod encode;

use self::decode::{from_v3, from_v5, plain_puback_in, plain_publish_in};
pub use self::encode::{encode_shared_publish, publish_size};
use self::encode::{plain_puback, plain_publish, to_v3, to_v5};
use super::topic::TopicName;

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

impl PublishProps {
    /// On the heap, and only when there are any: inline they were 144 of an [`Outbound`]'s
    /// 208 bytes, and every queued packet is one (docs/bench.md).
    pub fn boxed(self) -> Option<Box<PublishProps>> {
        (self != PublishProps::default()).then(|| Box::new(self))
    }
}

#[derive(Debug, Clone)]
pub struct PublishIn {
    /// Shares the bytes it was read in, as the payload does: no allocation per publish.
    pub topic: ByteString,
    pub qos: u8,
    pub retain: bool,
    pub packet_id: Option<u16>,
    pub payload: Bytes,
    /// None when there are none ([`PublishProps::boxed`]): a 3.1.1 publish never has any,
    /// and inline they were 144 of its 216 bytes, moved on every step of its way in.
    pub props: Option<Box<PublishProps>>,
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
        topic: TopicName,
        qos: u8,
        retain: bool,
        dup: bool,
        packet_id: Option<u16>,
        payload: Bytes,
        /// None when there are none ([`PublishProps::boxed`]).
        props: Option<Box<PublishProps>>,
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

impl Outbound {
    /// About how many bytes the packet takes encoded (a PUBLISH's properties not counted), to
    /// size a buffer for a batch before encoding it.
    pub fn size_hint(&self) -> usize {
        match self {
            // Fixed header at most 5, topic length 2, packet id 2.
            Outbound::Publish { topic, payload, .. } => 9 + topic.len() + payload.len(),
            Outbound::Encoded { frame, .. } => frame.len(),
            _ => 8,
        }
    }
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
    match fixed_header(buf) {
        Some((header, remaining)) => buf.len() >= header + remaining,
        None => buf.len() >= 5,
    }
}

/// The fixed header's length and the Remaining Length it gives, when the buffer holds a whole
/// and well-formed one.
fn fixed_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((2 + i, remaining));
        }
    }
    None
}

/// The codec of one connection: detects the version on CONNECT, then decodes that version.
pub struct Codec {
    inner: MqttCodec,
    max_in: u32,
    /// The largest Remaining Length the inner decoder takes (0: any), worked out once: the
    /// hand-written PUBLISH decoder checks it on every packet.
    remaining_in: u32,
    /// rmqtt-codec took a fixed header and waits for the rest of its packet: the buffer no
    /// longer starts with a packet, so only the crate may decode next.
    mid_frame: bool,
    /// Set by the connection's reader: the codec stands between two packets, having just
    /// returned one, so the buffer starts with the next one's fixed header. (A read cut short
    /// may leave the codec past a header it took, where the buffer alone no longer says how
    /// long the packet is.) Here, in the bytes `mid_frame` leaves, not beside the codec: 8
    /// bytes of every connection.
    pub between: bool,
    /// Set by the connection's reader when bytes came from the socket, cleared by its loop when
    /// a packet is handed on: the keep-alive clock is read once per socket read, not once per
    /// packet of it. Here for the reason `between` is.
    pub heard: bool,
}

impl Codec {
    pub fn new(max_packet_size: u32) -> Self {
        Codec {
            inner: MqttCodec::Version(rmqtt_codec::version::VersionCodec),
            max_in: max_packet_size,
            remaining_in: remaining_limit(max_packet_size),
            mid_frame: false,
            between: false,
            heard: false,
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
            remaining_in: max_packet_size,
            mid_frame: false,
            between: false,
            heard: false,
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
        // The common packets read by hand, when the buffer starts with a packet of a known
        // version; each reader takes only what it reads as the crate would.
        if !self.mid_frame
            && let Some(version) = self.version()
        {
            if let Some(p) = plain_publish_in(buf, version, self.remaining_in) {
                return Ok(Some(Inbound::Publish(p)));
            }
            if let Some(id) = plain_puback_in(buf, version) {
                return Ok(Some(Inbound::PubAck(id)));
            }
            // A packet not whole yet stays whole in the buffer until the rest is read. The
            // crate would take its fixed header and reserve the rest at once: a new buffer and
            // a copy while the packets before it still share this one (every read that ends
            // mid-PUBLISH), then the packet decoded by its general path.
            if self.missing(buf) > 0 {
                return Ok(None);
            }
        }
        loop {
            let before = buf.len();
            let Some((packet, _)) = self.inner.decode(buf)? else {
                self.mid_frame |= buf.len() != before;
                return Ok(None);
            };
            self.mid_frame = false;
            return Ok(Some(match packet {
                MqttPacket::Version(ProtocolVersion::MQTT3) => {
                    self.inner = MqttCodec::V3(v3::Codec::new(self.remaining_in));
                    continue;
                }
                MqttPacket::Version(ProtocolVersion::MQTT5) => {
                    self.inner = MqttCodec::V5(v5::Codec::new(self.remaining_in, self.max_in));
                    continue;
                }
                MqttPacket::V3(p) => from_v3(p),
                MqttPacket::V5(p) => from_v5(p),
            }));
        }
    }

    /// How many bytes the packet at the head of `buf` still lacks, when its fixed header is
    /// whole and gives a length the crate takes (a longer one is the crate's to refuse); 0
    /// otherwise. The reader makes room for them before it reads.
    pub fn missing(&self, buf: &[u8]) -> usize {
        if self.mid_frame || self.version().is_none() {
            return 0;
        }
        match fixed_header(buf) {
            Some((header, remaining))
                if self.remaining_in == 0 || remaining <= self.remaining_in as usize =>
            {
                (header + remaining).saturating_sub(buf.len())
            }
            _ => 0,
        }
    }

    /// A plain PUBACK at the head of `buf`, taken, where [`decode`](Self::decode) would give
    /// the same: between packets of a known version.
    pub fn puback_in(&mut self, buf: &mut BytesMut) -> Option<u16> {
        if self.mid_frame {
            return None;
        }
        plain_puback_in(buf, self.version()?)
    }

    pub fn encode(
        &mut self,
        packet: Outbound,
        buf: &mut BytesMut,
    ) -> Result<(), rmqtt_codec::error::EncodeError> {
        let version = self.version();
        encode_with(version, self.max_in, packet, buf, |packet, buf| {
            self.inner.encode(packet, buf)
        })
    }
}

/// Encodes `packet` for a connection of `version` without a codec kept for it: a writer's
/// (the encoder holds no state between packets). The crate's encoder, for the packets the
/// gateway does not write by hand, is made for the packet.
pub fn encode_as(
    version: Version,
    max: u32,
    packet: Outbound,
    buf: &mut BytesMut,
) -> Result<(), rmqtt_codec::error::EncodeError> {
    encode_with(Some(version), max, packet, buf, |packet, buf| {
        Codec::for_version(version, max).inner.encode(packet, buf)
    })
}

/// The common shapes by hand (docs/mqtt.md, decisions), the rest through `general`.
fn encode_with(
    version: Option<Version>,
    max: u32,
    packet: Outbound,
    buf: &mut BytesMut,
    general: impl FnOnce(MqttPacket, &mut BytesMut) -> Result<(), rmqtt_codec::error::EncodeError>,
) -> Result<(), rmqtt_codec::error::EncodeError> {
    if let Outbound::Encoded { frame, .. } = packet {
        buf.extend_from_slice(&frame);
        return Ok(());
    }
    if let Outbound::PubAck { packet_id, code } = packet
        && let Some(version) = version
        && plain_puback(buf, version, max, packet_id, code)
    {
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
        && let Some(version) = version
        && (version == Version::V3 || props.is_none())
        && plain_publish(
            buf,
            version,
            max,
            (topic, *qos, *retain, *dup, *packet_id),
            payload,
        )
    {
        return Ok(());
    }
    let packet = match version {
        Some(Version::V5) => MqttPacket::V5(to_v5(packet)),
        _ => MqttPacket::V3(to_v3(packet)),
    };
    general(packet, buf)
}

#[cfg(test)]
mod tests;
