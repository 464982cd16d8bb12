//! Outbound packets to bytes: [`Outbound`] into rmqtt-codec's packets of the connection's
//! version, a PUBLISH without properties written directly, and the exact size of a PUBLISH.

use super::*;

/// A 3.1.1 QoS 0 PUBLISH of `payload` to `topic` (not retained, no packet id), encoded once
/// for every 3.1.1 subscriber of a message: fan-out to fifty subscribers encoded the same
/// bytes fifty times (a sixth of a delivery's instructions under callgrind).
pub fn encode_shared_publish(topic: TopicName, payload: Bytes) -> Bytes {
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
            props: None,
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
pub(super) fn plain_publish(
    buf: &mut BytesMut,
    version: Version,
    max: u32,
    (topic, qos, retain, dup, packet_id): (&TopicName, u8, bool, bool, Option<u16>),
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
    topic.write_to(buf);
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

/// Writes a PUBACK as the codec writes it: `40 02 id` (3.1.1), `40 04 id code 00` (MQTT 5, the
/// codec always writes the reason code and an empty property length). One goes out per QoS 1
/// publish received, and the codec's way (its packet built, sized, then written) cost several
/// times these five bytes. False for what the codec writes otherwise or refuses (a zero id, a
/// code that is no PUBACK reason, a packet over `max`).
pub(super) fn plain_puback(
    buf: &mut BytesMut,
    version: Version,
    max: u32,
    id: u16,
    code: u8,
) -> bool {
    use bytes::BufMut;
    let remaining: u8 = match version {
        Version::V3 => 2,
        Version::V5 => 4,
    };
    if id == 0
        || (max != 0 && u32::from(remaining) > max)
        || (version == Version::V5 && v5::PublishAckReason::try_from(code).is_err())
    {
        return false;
    }
    buf.reserve(2 + usize::from(remaining));
    buf.put_u8(0x40);
    buf.put_u8(remaining);
    buf.put_u16(id);
    if version == Version::V5 {
        buf.put_u8(code);
        // Property Length 0.
        buf.put_u8(0);
    }
    true
}

fn publish_out(
    topic: TopicName,
    q: u8,
    retain: bool,
    dup: bool,
    packet_id: Option<u16>,
    payload: Bytes,
    props: Option<PublishProps>,
) -> Publish {
    let properties = props.map(|p| v5::PublishProperties {
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
        topic: ByteString::from(topic.into_string()),
        packet_id: packet_id.map(nz16),
        payload,
        properties,
    }
}

/// Bytes of an MQTT Variable Byte Integer.
pub(super) fn var_int_len(n: usize) -> usize {
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
    topic: &TopicName,
    qos: u8,
    payload: usize,
    props: Option<&PublishProps>,
) -> usize {
    let mut remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload;
    if version == Version::V5 {
        let Some(props) = props else {
            // A zero properties length.
            return 1 + var_int_len(remaining + 1) + remaining + 1;
        };
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

pub(super) fn to_v3(p: Outbound) -> v3::Packet {
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

pub(super) fn to_v5(p: Outbound) -> v5::Packet {
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
            props.map(|p| *p),
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
