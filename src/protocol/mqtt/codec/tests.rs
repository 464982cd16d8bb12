//! Decoding never panics, whatever the bytes: valid packets of both versions, mutated many
//! thousand ways (bit flips, random bytes, truncation, insertion, bad lengths) and fed in
//! random chunks, after a valid CONNECT or without one. Deterministic (a fixed-seed
//! xorshift), so a failure reproduces; `fuzz/` runs the same harness under libFuzzer.

use super::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend(body);
    out
}

/// A CONNECT with a will, username and password; v5 with properties.
fn connect(level: u8) -> Vec<u8> {
    let mut b = string(b"MQTT");
    b.push(level);
    b.push(0xC0 | 0x04 | 0x08 | 0x20 | 0x02); // user, password, will QoS 1 retained, clean
    b.extend_from_slice(&30u16.to_be_bytes());
    if level == 5 {
        // Session Expiry Interval 60, Receive Maximum 10.
        b.extend_from_slice(&[8, 0x11, 0, 0, 0, 60, 0x21, 0, 10]);
    }
    b.extend(string(b"client-1"));
    if level == 5 {
        b.extend_from_slice(&[5, 0x18, 0, 0, 0, 5]); // will delay
    }
    b.extend(string(b"will/topic"));
    b.extend(string(b"bye"));
    b.extend(string(b"user"));
    b.extend(string(b"token"));
    packet(0x10, b)
}

fn seeds(v5: bool) -> Vec<Vec<u8>> {
    let props = |p: &[u8]| {
        if v5 {
            let mut out = vec![p.len() as u8];
            out.extend_from_slice(p);
            out
        } else {
            Vec::new()
        }
    };
    let mut publish = string(b"a/b/c");
    publish.extend_from_slice(&7u16.to_be_bytes());
    publish.extend(props(&[0x23, 0, 1, 0x26, 0, 1, b'k', 0, 1, b'v']));
    publish.extend_from_slice(b"payload");
    let mut subscribe = 9u16.to_be_bytes().to_vec();
    subscribe.extend(props(&[0x0B, 5]));
    subscribe.extend(string(b"a/+/#"));
    subscribe.push(if v5 { 0x2E } else { 2 });
    subscribe.extend(string(b"$share/g/x"));
    subscribe.push(1);
    let mut unsubscribe = 10u16.to_be_bytes().to_vec();
    unsubscribe.extend(props(&[]));
    unsubscribe.extend(string(b"a/+/#"));
    let mut out = vec![
        packet(0x34, publish.clone()),
        packet(0x30, {
            let mut p = string(b"t");
            p.extend(props(&[]));
            p.extend_from_slice(b"x");
            p
        }),
        packet(0x82, subscribe),
        packet(0xA2, unsubscribe),
        vec![0x40, 2, 0, 7],
        vec![0x50, 2, 0, 7],
        vec![0x62, 2, 0, 7],
        vec![0x70, 2, 0, 7],
        vec![0xC0, 0],
        vec![0xE0, 0],
    ];
    if v5 {
        out.push(packet(0xF0, vec![0x19, 4, 0x15, 0, 1, b'm']));
        out.push(vec![0xE0, 2, 0x04, 0]);
    }
    out
}

fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                let i = rng.below(b.len() + 1);
                b.insert(i, rng.next() as u8);
            }
            4 if b.len() > 1 => b[1] = rng.next() as u8, // remaining length
            _ => {
                let n = rng.below(8);
                b.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
    b
}

/// Feeds `bytes` in random chunks; stops at the first error, as a connection would.
fn feed(rng: &mut Rng, codec: &mut Codec, bytes: &[u8]) {
    let mut buf = BytesMut::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = 1 + rng.below(bytes.len() - at);
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

#[test]
fn decoding_mutated_packets_never_panics() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..40_000 {
        let v5 = round % 2 == 0;
        let level = if v5 { 5 } else { 4 };
        let mut codec = Codec::new(4096);
        let seeds = seeds(v5);
        let mut input = Vec::new();
        // Mostly after a valid CONNECT (the version known), sometimes a mutated CONNECT.
        match rng.below(4) {
            0 => input.extend(mutate(&mut rng, connect(level))),
            _ => input.extend(connect(level)),
        }
        for _ in 0..=rng.below(3) {
            let seed = seeds[rng.below(seeds.len())].clone();
            input.extend(mutate(&mut rng, seed));
        }
        feed(&mut rng, &mut codec, &input);
    }
}

#[test]
fn publish_size_is_exact() {
    let full = PublishProps {
        content_type: Some("text/plain".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        response_topic: Some("reply/here".into()),
        message_expiry: Some(60),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "é".into())],
        topic_alias: Some(3),
        payload_utf8: true,
        subscription_ids: vec![1, 200, 70_000],
    };
    for version in [Version::V3, Version::V5] {
        for props in [PublishProps::default(), full.clone()] {
            for (qos, payload) in [(0u8, 0usize), (1, 10), (2, 300), (1, 20_000)] {
                let mut codec = Codec::for_version(version, 1 << 20);
                let mut buf = BytesMut::new();
                let packet = Outbound::Publish {
                    topic: "a/b".into(),
                    qos,
                    retain: false,
                    dup: false,
                    packet_id: (qos > 0).then_some(7),
                    payload: Bytes::from(vec![b'x'; payload]),
                    props: props.clone().boxed(),
                };
                codec.encode(packet, &mut buf).unwrap();
                assert_eq!(
                    publish_size(version, &"a/b".into(), qos, payload, Some(&props)),
                    buf.len(),
                    "{version:?} qos {qos} payload {payload} {props:?}"
                );
                if props == PublishProps::default() {
                    let none = publish_size(version, &"a/b".into(), qos, payload, None);
                    assert_eq!(none, buf.len(), "{version:?} qos {qos} payload {payload}");
                }
            }
        }
    }
}

/// What rmqtt-codec itself writes for `packet`, bypassing [`plain_publish`].
fn codec_bytes(version: Version, max: u32, packet: Outbound) -> Result<BytesMut, String> {
    let mut codec = Codec::for_version(version, max);
    let packet = match version {
        Version::V5 => MqttPacket::V5(to_v5(packet)),
        Version::V3 => MqttPacket::V3(to_v3(packet)),
    };
    let mut buf = BytesMut::new();
    codec
        .inner
        .encode(packet, &mut buf)
        .map(|()| buf)
        .map_err(|e| e.to_string())
}

#[test]
fn a_plain_publish_is_written_as_the_codec_writes_it() {
    let big = Bytes::from(vec![b'x'; 2_097_200]);
    let long = "t".repeat(300);
    let mut checked = 0;
    for version in [Version::V3, Version::V5] {
        for topic in ["a/b", "", "é/x", long.as_str()] {
            for (qos, packet_id) in [(0u8, None), (1, Some(7u16)), (2, Some(u16::MAX))] {
                let overhead = 2
                    + topic.len()
                    + if qos > 0 { 2 } else { 0 }
                    + usize::from(version == Version::V5);
                // Remaining Lengths either side of each of its byte boundaries.
                let sizes = [0, 64, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152]
                    .into_iter()
                    .map(|r: usize| r.saturating_sub(overhead));
                for payload in sizes {
                    for (retain, dup) in [(false, false), (true, false), (false, true)] {
                        let packet = Outbound::Publish {
                            topic: topic.into(),
                            qos,
                            retain,
                            dup,
                            packet_id,
                            payload: big.slice(..payload),
                            props: None,
                        };
                        let want = codec_bytes(version, 0, packet).unwrap();
                        let mut got = BytesMut::new();
                        let name = TopicName::from(topic);
                        let flags = (&name, qos, retain, dup, packet_id);
                        assert!(plain_publish(&mut got, version, 0, flags, &big[..payload]));
                        assert!(
                            got[..] == want[..],
                            "{version:?} topic {} qos {qos} payload {payload} retain {retain} dup {dup}",
                            topic.len()
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 2 * 4 * 3 * 8 * 3);
}

#[test]
fn what_a_plain_publish_does_not_write_is_left_to_the_codec() {
    let long = "t".repeat(usize::from(u16::MAX) + 1);
    let mut buf = BytesMut::new();
    for (version, max, (topic, qos, retain, dup, id), payload) in [
        // Too long for an MQTT string.
        (Version::V3, 0, (long.as_str(), 0, false, false, None), 0),
        // Over the client's Maximum Packet Size: the codec refuses it.
        (Version::V5, 100, ("a", 0, false, false, None), 200),
        // A packet id at QoS 0, none at QoS 1, a zero one.
        (Version::V3, 0, ("a", 0, false, false, Some(1)), 0),
        (Version::V5, 0, ("a", 1, false, false, None), 0),
        (Version::V3, 0, ("a", 1, false, false, Some(0)), 0),
    ] {
        let flags = (&TopicName::from(topic), qos, retain, dup, id);
        assert!(!plain_publish(
            &mut buf,
            version,
            max,
            flags,
            &vec![0; payload]
        ));
        assert!(buf.is_empty());
    }
    // And the codec's answer stands.
    let packet = Outbound::Publish {
        topic: "a".into(),
        qos: 0,
        retain: false,
        dup: false,
        packet_id: None,
        payload: Bytes::from(vec![0; 200]),
        props: None,
    };
    let mut codec = Codec::for_version(Version::V5, 100);
    assert!(codec.encode(packet, &mut buf).is_err());
}

#[test]
fn a_shared_publish_is_the_one_a_v3_session_would_encode() {
    for payload in [0usize, 64, 200, 20_000] {
        let body = Bytes::from(vec![b'x'; payload]);
        let mut codec = Codec::for_version(Version::V3, 1 << 20);
        let mut own = BytesMut::new();
        let packet = Outbound::Publish {
            topic: "a/b.c/é".into(),
            qos: 0,
            retain: false,
            dup: false,
            packet_id: None,
            payload: body.clone(),
            props: None,
        };
        codec.encode(packet, &mut own).unwrap();
        let shared = encode_shared_publish("a/b.c/é".into(), body.clone());
        assert_eq!(&shared[..], &own[..], "payload {payload}");
        // And written as it is.
        let mut written = BytesMut::new();
        let encoded = Outbound::Encoded {
            frame: shared,
            payload: payload as u64,
        };
        codec.encode(encoded, &mut written).unwrap();
        assert_eq!(&written[..], &own[..]);
    }
}

#[test]
fn valid_seeds_decode() {
    for (v5, level) in [(false, 4u8), (true, 5)] {
        let mut codec = Codec::new(4096);
        let mut buf = BytesMut::from(&connect(level)[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Ok(Some(Inbound::Connect(_)))
        ));
        for seed in seeds(v5) {
            let mut buf = BytesMut::from(&seed[..]);
            let decoded = codec.decode(&mut buf);
            assert!(
                matches!(decoded, Ok(Some(_))),
                "v5={v5} {seed:x?}: {decoded:?}"
            );
        }
    }
}

#[test]
fn the_remaining_length_limit_keeps_whole_packets_within_the_maximum_packet_size() {
    fn whole(remaining: u32) -> u32 {
        let len = match remaining {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        };
        1 + len + remaining
    }
    for max in [
        2,
        129,
        130,
        131,
        16_386,
        16_387,
        16_388,
        69_632,
        1_114_112,
        268_435_460,
    ] {
        let limit = remaining_limit(max);
        assert!(whole(limit) <= max, "{max}: {limit} makes {}", whole(limit));
        assert!(whole(limit + 1) > max, "{max}: {} would fit too", limit + 1);
    }
}

#[test]
fn a_whole_packet_is_told_from_its_fixed_header() {
    // PINGREQ: type byte and a zero length.
    assert!(whole_packet(&[0xC0, 0x00]));
    assert!(!whole_packet(&[0xC0]));
    assert!(!whole_packet(&[]));
    // PUBLISH of 3 bytes, then another packet's first byte: whole.
    assert!(whole_packet(&[0x30, 0x03, 0, 1, b'a', 0xC0]));
    assert!(!whole_packet(&[0x30, 0x03, 0, 1]));
    // A two-byte length: 200 = 0xC8 0x01.
    let mut buf = vec![0x30, 0xC8, 0x01];
    buf.resize(3 + 199, 0);
    assert!(!whole_packet(&buf));
    buf.push(0);
    assert!(whole_packet(&buf));
    // The length's second byte not read yet.
    assert!(!whole_packet(&[0x30, 0xC8]));
    // Every packet the codec writes is whole exactly when all its bytes are there.
    for version in [Version::V3, Version::V5] {
        let mut codec = Codec::for_version(version, 1 << 20);
        let mut bytes = BytesMut::new();
        let publish = Outbound::Publish {
            topic: "a/b".into(),
            qos: 1,
            retain: false,
            dup: false,
            packet_id: Some(7),
            payload: Bytes::from(vec![7u8; 300]),
            props: None,
        };
        codec.encode(publish, &mut bytes).expect("encodes");
        assert!(whole_packet(&bytes));
        assert!(!whole_packet(&bytes[..bytes.len() - 1]));
    }
}

/// PUBLISH packets of every shape the hand-written decoder takes or must leave to the crate:
/// both versions' bodies, every QoS (3 included), zero and non-zero packet ids, empty, long,
/// multi-byte and non-UTF-8 topics, MQTT 5 with and without properties, payloads either side
/// of the Remaining Length's first byte boundary.
fn publishes(v5: bool) -> Vec<Vec<u8>> {
    let long = vec![b't'; 300];
    let mut out = Vec::new();
    for topic in [&b"a/b"[..], b"", "é/x".as_bytes(), &long, b"\xFF/x"] {
        for qos in 0..4u8 {
            for id in [0u16, 7] {
                for props in [&[][..], &[0x23, 0, 1][..]] {
                    if !v5 && !props.is_empty() {
                        continue;
                    }
                    for payload in [0usize, 100, 200] {
                        let mut b = string(topic);
                        if qos > 0 {
                            b.extend_from_slice(&id.to_be_bytes());
                        }
                        if v5 {
                            b.push(props.len() as u8);
                            b.extend_from_slice(props);
                        }
                        b.extend(std::iter::repeat_n(b'p', payload));
                        out.push(packet(0x30 | qos << 1 | u8::from(payload == 100), b));
                    }
                }
            }
        }
    }
    out
}

/// PUBACK packets of the shapes the hand-written decoder takes and others near them: every
/// Remaining Length up to 5, zero and non-zero ids, reason codes and property lengths zero or
/// not, a flag bit set.
fn pubacks() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for first in [0x40u8, 0x42] {
        for id in [0u16, 7, u16::MAX] {
            for tail in [
                &[][..],
                &[0],
                &[0x10],
                &[0, 0],
                &[0x80, 0],
                &[0, 1],
                &[0, 0, 0],
            ] {
                let mut b = id.to_be_bytes().to_vec();
                b.extend_from_slice(tail);
                out.push(packet(first, b));
            }
        }
    }
    out
}

/// Every packet `decode` makes of `bytes` fed in `chunks`, in order, then its error, if any.
fn decode_all(
    bytes: &[u8],
    chunks: &[usize],
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<String>, DecodeError>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    for piece in split(bytes, chunks) {
        buf.extend_from_slice(piece);
        loop {
            match decode(&mut buf) {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e:?}"));
                    return out;
                }
            }
        }
    }
    out
}

/// What rmqtt-codec alone makes of `bytes`.
fn crate_decodes(v5: bool, limit: u32, bytes: &[u8], chunks: &[usize]) -> Vec<String> {
    let mut inner = if v5 {
        MqttCodec::V5(v5::Codec::new(limit, limit))
    } else {
        MqttCodec::V3(v3::Codec::new(limit))
    };
    decode_all(bytes, chunks, |buf| {
        Ok(inner.decode(buf)?.map(|(p, _)| match p {
            MqttPacket::V3(p) => format!("{:?}", from_v3(p)),
            MqttPacket::V5(p) => format!("{:?}", from_v5(p)),
            MqttPacket::Version(_) => unreachable!("a version codec only at CONNECT"),
        }))
    })
}

/// What [`Codec`] makes of the same, once its version is known.
fn codec_decodes(v5: bool, max: u32, bytes: &[u8], chunks: &[usize]) -> Vec<String> {
    let mut codec = Codec::new(max);
    let mut hello = BytesMut::from(&connect(if v5 { 5 } else { 4 })[..]);
    assert!(matches!(codec.decode(&mut hello), Ok(Some(_))));
    decode_all(bytes, chunks, |buf| {
        Ok(codec.decode(buf)?.map(|p| format!("{p:?}")))
    })
}

fn split<'a>(bytes: &'a [u8], chunks: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    for &n in chunks.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(n.clamp(1, rest.len()));
        out.push(piece);
        rest = tail;
    }
    out
}

#[test]
fn a_plain_publish_is_read_as_the_codec_reads_it() {
    let max = 4096;
    let limit = remaining_limit(max);
    let mut taken = 0;
    for v5 in [false, true] {
        let version = if v5 { Version::V5 } else { Version::V3 };
        for seed in publishes(v5) {
            let mut buf = BytesMut::from(&seed[..]);
            let ours = plain_publish_in(&mut buf, version, limit);
            let theirs = crate_decodes(v5, limit, &seed, &[seed.len()]);
            match ours {
                Some(p) => {
                    taken += 1;
                    assert!(buf.is_empty(), "{seed:x?} left {buf:x?}");
                    assert_eq!(vec![format!("{:?}", Inbound::Publish(p))], theirs);
                }
                None => assert_eq!(&buf[..], &seed[..], "nothing consumed when declined"),
            }
        }
    }
    // 3.1.1: 3 topics × QoS 0 × 2 ids + QoS 1–2 × id 7, × 3 payloads; MQTT 5 the same
    // without properties.
    assert_eq!(taken, 2 * 3 * 4 * 3);
}

#[test]
fn a_plain_puback_is_read_as_the_codec_reads_it() {
    let mut taken = 0;
    for v5 in [false, true] {
        let version = if v5 { Version::V5 } else { Version::V3 };
        for seed in pubacks() {
            let mut buf = BytesMut::from(&seed[..]);
            let ours = plain_puback_in(&mut buf, version);
            let theirs = crate_decodes(v5, 4096, &seed, &[seed.len()]);
            match ours {
                Some(id) => {
                    taken += 1;
                    assert!(buf.is_empty(), "{seed:x?} left {buf:x?}");
                    assert_eq!(vec![format!("{:?}", Inbound::PubAck(id))], theirs);
                }
                None => assert_eq!(&buf[..], &seed[..], "nothing consumed when declined"),
            }
            // Cut short, it waits for the rest.
            let mut part = BytesMut::from(&seed[..seed.len() - 1]);
            assert_eq!(plain_puback_in(&mut part, version), None);
            assert_eq!(part.len(), seed.len() - 1);
        }
    }
    // Two non-zero ids: 3.1.1 the bare id; MQTT 5 that, `00` and `00 00` after it.
    assert_eq!(taken, 2 + 2 * 3);
}

#[test]
fn a_plain_puback_is_written_as_the_codec_writes_it() {
    let mut written = 0;
    for version in [Version::V3, Version::V5] {
        for id in [0u16, 1, 7, u16::MAX] {
            for code in [0u8, 0x10, 0x80, 0x87, 0x97, 0x05] {
                for max in [0u32, 3, 100] {
                    let mut got = BytesMut::new();
                    if plain_puback(&mut got, version, max, id, code) {
                        let packet = Outbound::PubAck {
                            packet_id: id,
                            code,
                        };
                        let want = codec_bytes(version, max, packet).unwrap();
                        assert_eq!(
                            got[..],
                            want[..],
                            "{version:?} id {id} code {code} max {max}"
                        );
                        written += 1;
                    } else {
                        assert!(got.is_empty());
                    }
                }
            }
        }
    }
    // 3.1.1: three ids, any code, every maximum (its Remaining Length is 2); MQTT 5: three
    // ids, five valid codes, max 0 or 100 (its Remaining Length of 4 is over 3).
    assert_eq!(written, 3 * 6 * 3 + 3 * 5 * 2);
}

#[test]
fn publishes_decode_as_the_codec_alone_decodes_them_in_any_chunks() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for round in 0..20_000 {
        let v5 = round % 2 == 0;
        let mut seeds = publishes(v5);
        seeds.extend(pubacks());
        let mut input = Vec::new();
        for _ in 0..=rng.below(4) {
            let seed = seeds[rng.below(seeds.len())].clone();
            if rng.below(3) == 0 {
                input.extend(mutate(&mut rng, seed));
            } else {
                input.extend(seed);
            }
        }
        let chunks: Vec<usize> = (0..4).map(|_| 1 + rng.below(input.len())).collect();
        // A small maximum too, so the limit is crossed.
        let max = if rng.below(4) == 0 { 150 } else { 4096 };
        assert_eq!(
            codec_decodes(v5, max, &input, &chunks),
            crate_decodes(v5, remaining_limit(max), &input, &chunks),
            "v5={v5} max {max} chunks {chunks:?} {input:x?}"
        );
    }
}

#[test]
fn a_packet_not_whole_yet_is_left_whole_and_what_it_lacks_is_told() {
    for v5 in [false, true] {
        let mut codec = Codec::new(4096);
        let mut hello = BytesMut::from(&connect(if v5 { 5 } else { 4 })[..]);
        assert!(matches!(codec.decode(&mut hello), Ok(Some(_))));
        let mut body = string(b"a/b");
        if v5 {
            body.push(0);
        }
        body.extend(std::iter::repeat_n(b'p', 200));
        let whole = packet(0x30, body);
        // A Remaining Length of 205 or 206 takes two bytes.
        let header = 3;
        for cut in 1..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(matches!(codec.decode(&mut buf), Ok(None)), "cut at {cut}");
            assert_eq!(&buf[..], &whole[..cut], "nothing taken, cut at {cut}");
            let lacks = if cut < header { 0 } else { whole.len() - cut };
            assert_eq!(codec.missing(&buf), lacks, "cut at {cut}");
            buf.extend_from_slice(&whole[cut..]);
            let Ok(Some(Inbound::Publish(p))) = codec.decode(&mut buf) else {
                panic!("the publish, once whole (cut at {cut})");
            };
            assert_eq!((&*p.topic, p.payload.len()), ("a/b", 200));
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn a_queued_packet_stays_small() {
    // Every packet a session queues is one of these: 208 bytes with the properties inline.
    assert!(
        std::mem::size_of::<Outbound>() <= 80,
        "{}",
        std::mem::size_of::<Outbound>()
    );
}

#[test]
fn a_routing_key_as_topic_is_encoded_as_the_name_made_from_it() {
    use crate::config::TopicMapping;
    let props = PublishProps {
        message_expiry: Some(9),
        ..PublishProps::default()
    };
    for version in [Version::V3, Version::V5] {
        // Written by hand (no properties) and by the codec (properties).
        for props in [None, props.clone().boxed()] {
            let packet = |topic: TopicName| Outbound::Publish {
                topic,
                qos: 1,
                retain: false,
                dup: false,
                packet_id: Some(3),
                payload: Bytes::from_static(b"body"),
                props: props.clone(),
            };
            let made = super::super::topic::map_key("a/b.c", TopicMapping::Swap);
            let key = TopicName::of_key("a/b.c".into(), TopicMapping::Swap);
            let (mut want, mut got) = (BytesMut::new(), BytesMut::new());
            encode_as(version, 0, packet(made.into()), &mut want).unwrap();
            encode_as(version, 0, packet(key), &mut got).unwrap();
            assert_eq!(got, want, "{version:?} {props:?}");
        }
    }
}
