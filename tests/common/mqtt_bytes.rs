//! MQTT packets as raw bytes, for tests that must send what no client library would (bad
//! input, a packet cut short, one far over the limit) or read exactly what went over the wire.

use tokio::io::AsyncReadExt;

/// MQTT's Variable Byte Integer.
pub fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A QoS 1 PUBLISH of `payload` to `topic` (packet id 1; MQTT 5 with no properties).
pub fn publish_qos1(topic: &[u8], payload: &[u8], v5: bool) -> Vec<u8> {
    let mut body = string(topic);
    body.extend(1u16.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x32, body)
}

pub fn packet(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(remaining_length(body.len()));
    out.extend(body);
    out
}

/// A CONNECT with `name`, `level` and `flags` (username + password = token when given).
pub fn connect_ka(
    name: &[u8],
    level: u8,
    extra_flags: u8,
    client: &str,
    password: Option<&str>,
    keep_alive: u16,
) -> Vec<u8> {
    let mut flags = 0x02 | extra_flags; // clean session
    if password.is_some() {
        flags |= 0xC0; // username and password
    }
    let mut body = string(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(string(client.as_bytes()));
    if let Some(p) = password {
        body.extend(string(b"u"));
        body.extend(string(p.as_bytes()));
    }
    packet(0x10, body)
}

pub fn connect(
    name: &[u8],
    level: u8,
    extra_flags: u8,
    client: &str,
    password: Option<&str>,
) -> Vec<u8> {
    connect_ka(name, level, extra_flags, client, password, 60)
}

/// MQTT 5 properties: Authentication Method (0x15) and Authentication Data (0x16).
pub fn auth_props(token: &str) -> Vec<u8> {
    let mut props = vec![0x15];
    props.extend(string(b"amqp-gateway.jwt"));
    props.push(0x16);
    props.extend(string(token.as_bytes()));
    let mut out = remaining_length(props.len());
    out.extend(props);
    out
}

pub fn connect_v5_enhanced(client: &str, token: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(5);
    body.push(0x02); // clean start, no user name or password
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend(auth_props(token));
    body.extend(string(client.as_bytes()));
    packet(0x10, body)
}

pub fn reauth(token: &str) -> Vec<u8> {
    let mut body = vec![0x19]; // re-authenticate
    body.extend(auth_props(token));
    packet(0xF0, body)
}

/// Reads one packet: (first byte, body).
pub async fn read_packet(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    tokio::time::timeout(super::WAIT, s.read_exact(&mut first))
        .await
        .expect("a packet")
        .unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        len |= usize::from(b[0] & 0x7F) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    (first[0], body)
}

/// SUBSCRIBE one filter with `options` (QoS in the low bits); v5 may carry a subscription id.
pub fn subscribe_packet(
    packet_id: u16,
    filter: &str,
    options: u8,
    v5: bool,
    id: Option<u8>,
) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v5 {
        match id {
            Some(id) => body.extend_from_slice(&[2, 0x0B, id]),
            None => body.push(0),
        }
    }
    body.extend(string(filter.as_bytes()));
    body.push(options);
    packet(0x82, body)
}

/// A CONNECT without clean session; MQTT 5 asks for Session Expiry Interval `expiry`.
pub fn connect_persistent(level: u8, client: &str, password: &str, expiry: u32) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(level);
    body.push(0xC0); // username and password, no clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.extend_from_slice(&[5, 0x11]);
        body.extend_from_slice(&expiry.to_be_bytes());
    }
    body.extend(string(client.as_bytes()));
    body.extend(string(b"u"));
    body.extend(string(password.as_bytes()));
    packet(0x10, body)
}

/// An accepted CONNACK: (Session Present, the rest of the packet — v5 properties).
pub async fn connack(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> (bool, Vec<u8>) {
    let (first, body) = read_packet(s).await;
    assert_eq!(first, 0x20, "CONNACK");
    assert_eq!(body[1], 0, "accepted");
    (body[0] & 1 == 1, body[2..].to_vec())
}

pub fn publish_qos(
    topic: &str,
    qos: u8,
    packet_id: u16,
    dup: bool,
    payload: &[u8],
    v5: bool,
) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, body)
}

/// A PUBLISH the gateway sent: (QoS, topic, packet id, v5 properties).
pub fn parse_publish(first: u8, body: &[u8], v5: bool) -> (u8, String, u16, Vec<u8>) {
    assert_eq!(first & 0xF0, 0x30, "PUBLISH, got {first:#x}");
    let qos = (first >> 1) & 3;
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
    let mut at = 2 + len;
    let mut id = 0;
    if qos > 0 {
        id = u16::from_be_bytes([body[at], body[at + 1]]);
        at += 2;
    }
    let props = if v5 {
        let n = usize::from(body[at]); // short properties in these tests: one length byte
        body[at + 1..at + 1 + n].to_vec()
    } else {
        Vec::new()
    };
    (qos, topic, id, props)
}

/// Everything the gateway sends until it closes the connection.
pub async fn until_closed(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(super::WAIT, s.read_to_end(&mut got)).await {
        Ok(_) => got,
        Err(_) => panic!(
            "connection not closed within {:?}; got {got:?}",
            super::WAIT
        ),
    }
}
