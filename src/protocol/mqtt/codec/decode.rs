//! rmqtt-codec's packets of either version into the version-neutral [`Inbound`], and the
//! common PUBLISH decoded without the crate.

use bytes::Buf;

use super::*;

/// A PUBLISH in its common shape — 3.1.1, or MQTT 5 with no properties — decoded straight from
/// the buffer, as rmqtt-codec would decode it: the crate boxes each PUBLISH and makes its topic
/// a `ByteString` on the way, a quarter of what receiving one costs (docs/mqtt.md, decisions).
/// `None`, with nothing consumed, for every other packet, for a packet not whole yet, and for
/// anything the crate would refuse or read differently (a topic empty or not UTF-8, QoS 3, a
/// zero packet id, a Remaining Length over `limit`): the crate decodes those and its errors
/// stand. `limit` is the Remaining Length the crate's decoder allows (0: any).
pub(super) fn plain_publish_in(
    buf: &mut BytesMut,
    version: Version,
    limit: u32,
) -> Option<PublishIn> {
    let first = *buf.first()?;
    let qos = (first >> 1) & 0b11;
    if first >> 4 != 3 || qos == 3 {
        return None;
    }
    let (header, remaining) = fixed_header(buf)?;
    if limit != 0 && remaining > limit as usize {
        return None;
    }
    let body = buf.get(header..header + remaining)?;
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    if topic_len == 0 {
        return None;
    }
    // The `ByteString` below checks again; this one only keeps an invalid topic for the
    // crate. Most topics are ASCII, which a word at a time tells, where `from_utf8` walks a
    // topic shorter than 16 bytes a byte at a time (about 100 instructions a publish).
    let topic_bytes = body.get(2..2 + topic_len)?;
    if !topic_bytes.is_ascii() {
        std::str::from_utf8(topic_bytes).ok()?;
    }
    let mut at = 2 + topic_len;
    let packet_id = if qos > 0 {
        let id = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        Some(NonZeroU16::new(id)?.get())
    } else {
        None
    };
    if version == Version::V5 {
        if *body.get(at)? != 0 {
            return None;
        }
        at += 1;
    }
    buf.advance(header);
    let mut payload = buf.split_to(remaining).freeze();
    // UTF-8, checked above (before anything was taken from `buf`).
    let topic = ByteString::try_from(payload.slice(2..2 + topic_len)).unwrap_or_default();
    payload.advance(at);
    Some(PublishIn {
        topic,
        qos,
        retain: first & 1 == 1,
        packet_id,
        payload,
        props: None,
    })
}

/// A PUBACK in its common shapes, read without the crate: `40 02 id` (3.1.1, and MQTT 5's
/// success with nothing after the id) and MQTT 5's success written out (`40 03 id 00`,
/// `40 04 id 00 00`). One comes in per QoS 1 delivery, and the crate's general path took
/// several hundred instructions to read these four bytes. `None`, nothing consumed, for every
/// other packet and shape, and for one not whole yet: the crate decodes those.
pub(super) fn plain_puback_in(buf: &mut BytesMut, version: Version) -> Option<u16> {
    if *buf.first()? != 0x40 {
        return None;
    }
    let remaining = *buf.get(1)?;
    let tail_ok = match (version, remaining) {
        (_, 2) => true,
        (Version::V5, 3) => *buf.get(4)? == 0,
        (Version::V5, 4) => buf.get(4..6)? == [0, 0],
        _ => false,
    };
    if !tail_ok {
        return None;
    }
    let id = NonZeroU16::new(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]))?;
    buf.advance(2 + usize::from(remaining));
    Some(id.get())
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
        .and_then(PublishProps::boxed);
    PublishIn {
        topic: p.topic,
        qos: qos_of(p.qos),
        retain: p.retain,
        packet_id: p.packet_id.map(NonZeroU16::get),
        payload: p.payload,
        props,
    }
}

pub(super) fn from_v3(p: v3::Packet) -> Inbound {
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

pub(super) fn from_v5(p: v5::Packet) -> Inbound {
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
