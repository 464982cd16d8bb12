//! MQTT packets as raw bytes, for tests that must send what no client library would (bad
//! input, a packet cut short, one far over the limit) or read exactly what went over the wire.

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
