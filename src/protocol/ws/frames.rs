//! The JSON frames of `amqp-gateway.v1.json` (DESIGN.md §4): requests parsed with a precise
//! error for each way they can be wrong, and the frames the gateway sends.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::codes::Code;
use crate::json::{Encoding, PropertiesJson};

pub const SUBPROTOCOL: &str = "amqp-gateway.v1.json";

/// Close codes of DESIGN.md §4.
pub mod close {
    pub const UNAUTHENTICATED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const CLOSED_BY_ADMIN: u16 = 4010;
    pub const TOO_BIG: u16 = 1009;
    pub const SHUTDOWN: u16 = 1001;
    /// RFC 6455 "Try Again Later": a connection limit of DESIGN.md §7 is reached.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckKind {
    Auto,
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowKind {
    DropOldest,
    Disconnect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
    pub exchange: Option<String>,
    pub binding_key: Option<String>,
    pub queue: Option<String>,
    pub durable: Option<String>,
    pub arguments: Option<Map<String, Value>>,
    pub ack: Option<AckKind>,
    pub prefetch: Option<u32>,
    pub overflow: Option<OverflowKind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
    pub sub: String,
    #[serde(default)]
    pub delete: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
    pub body: Value,
    #[serde(default)]
    pub encoding: Option<Encoding>,
    #[serde(default)]
    pub properties: Option<PropertiesJson>,
    #[serde(default)]
    pub mandatory: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settle {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
    pub sub: String,
    pub delivery_tag: u64,
    #[serde(default)]
    pub multiple: bool,
    #[serde(default = "yes")]
    pub requeue: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    #[serde(default, rename = "op")]
    _op: Value,
    #[serde(default, rename = "id")]
    _id: Value,
}

fn yes() -> bool {
    true
}

#[derive(Debug)]
pub enum Request {
    Auth(Auth),
    Subscribe(Box<Subscribe>),
    Unsubscribe(Unsubscribe),
    Publish(Box<Publish>),
    Ack(Settle),
    Nack(Settle),
    Ping,
}

/// A request that could not be understood: answered with an `error` frame.
#[derive(Debug)]
pub struct Malformed {
    pub id: Value,
    pub op: Value,
    pub message: String,
}

/// A parsed request with its `id` (null when absent) and its `op`.
pub struct Envelope {
    pub id: Value,
    pub op: &'static str,
    pub request: Request,
}

fn fields<T: DeserializeOwned>(value: Value, id: &Value, op: &str) -> Result<T, Malformed> {
    serde_json::from_value(value).map_err(|e| Malformed {
        id: id.clone(),
        op: Value::String(op.to_owned()),
        message: format!("invalid {op}: {e}"),
    })
}

pub fn parse(text: &str) -> Result<Envelope, Malformed> {
    let value: Value = serde_json::from_str(text).map_err(|e| Malformed {
        id: Value::Null,
        op: Value::Null,
        message: format!("not a JSON frame: {e}"),
    })?;
    let Value::Object(map) = &value else {
        return Err(Malformed {
            id: Value::Null,
            op: Value::Null,
            message: "a frame must be a JSON object".into(),
        });
    };
    let id = map.get("id").cloned().unwrap_or(Value::Null);
    if !(id.is_null() || id.is_string() || id.is_number()) {
        return Err(Malformed {
            id: Value::Null,
            op: map.get("op").cloned().unwrap_or(Value::Null),
            message: "id must be a string or a number".into(),
        });
    }
    let op = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(_) => {
            return Err(Malformed {
                id,
                op: Value::Null,
                message: "op must be a string".into(),
            });
        }
        None => {
            return Err(Malformed {
                id,
                op: Value::Null,
                message: "a frame needs an op".into(),
            });
        }
    };
    let needs_body = op == "publish" && !map.contains_key("body");
    let (op, request): (&'static str, Request) = match op.as_str() {
        "auth" => ("auth", Request::Auth(fields(value, &id, "auth")?)),
        "subscribe" => (
            "subscribe",
            Request::Subscribe(Box::new(fields(value, &id, "subscribe")?)),
        ),
        "unsubscribe" => (
            "unsubscribe",
            Request::Unsubscribe(fields(value, &id, "unsubscribe")?),
        ),
        "publish" if needs_body => {
            return Err(Malformed {
                id,
                op: Value::String(op),
                message: "a publish needs a \"body\"".into(),
            });
        }
        "publish" => (
            "publish",
            Request::Publish(Box::new(fields(value, &id, "publish")?)),
        ),
        "ack" => ("ack", Request::Ack(fields(value, &id, "ack")?)),
        "nack" => ("nack", Request::Nack(fields(value, &id, "nack")?)),
        "ping" => {
            let _: Ping = fields(value, &id, "ping")?;
            ("ping", Request::Ping)
        }
        _ => {
            return Err(Malformed {
                message: format!("unknown op '{op}'"),
                id,
                op: Value::String(op),
            });
        }
    };
    Ok(Envelope { id, op, request })
}

// ---------- frames the gateway sends ----------

pub fn error(
    id: &Value,
    op_of: &Value,
    code: Code,
    message: &str,
    retry_after_ms: Option<u64>,
) -> String {
    let mut v =
        json!({"op": "error", "id": id, "op_of": op_of, "code": code.as_str(), "message": message});
    if let Some(ms) = retry_after_ms {
        v["retry_after_ms"] = json!(ms);
    }
    v.to_string()
}

pub fn ok(id: &Value) -> String {
    json!({"op": "ok", "id": id}).to_string()
}

pub fn auth_ok(id: &Value, subject: &str, expires_at: Option<u64>) -> String {
    json!({"op": "ok", "id": id, "subject": subject, "expires_at": expires_at}).to_string()
}

pub fn subscribed(id: &Value, sub: &str, queue: &str) -> String {
    json!({"op": "subscribed", "id": id, "sub": sub, "queue": queue}).to_string()
}

pub fn published(id: &Value, routed: bool) -> String {
    json!({"op": "published", "id": id, "routed": routed}).to_string()
}

pub fn pong(id: &Value) -> String {
    json!({"op": "pong", "id": id}).to_string()
}

pub fn lagged(sub: &str, dropped: u64) -> String {
    json!({"op": "lagged", "sub": sub, "dropped": dropped}).to_string()
}

pub fn cancelled(sub: &str, reason: &str) -> String {
    json!({"op": "cancelled", "sub": sub, "reason": reason}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_ids() {
        let e = parse(r#"{"op":"ping","id":9}"#)
            .map_err(|m| m.message)
            .unwrap();
        assert_eq!((e.op, e.id), ("ping", json!(9)));
        let e = parse(r#"{"op":"nack","sub":"s1","delivery_tag":3}"#)
            .map_err(|m| m.message)
            .unwrap();
        assert!(matches!(
            e.request,
            Request::Nack(Settle {
                requeue: true,
                multiple: false,
                ..
            })
        ));
    }

    #[test]
    fn bad_frames_say_what_is_wrong() {
        for (text, op) in [
            ("nope", Value::Null),
            ("[1]", Value::Null),
            (r#"{"id":1}"#, Value::Null),
            (r#"{"op":"dance","id":1}"#, json!("dance")),
            (r#"{"op":"ack","sub":"s1"}"#, json!("ack")),
            (
                r#"{"op":"ack","sub":"s1","delivery_tag":"x"}"#,
                json!("ack"),
            ),
            (
                r#"{"op":"publish","exchange":"amq.topic"}"#,
                json!("publish"),
            ),
            (r#"{"op":"ping","id":{"a":1}}"#, json!("ping")),
            (
                r#"{"op":"subscribe","queue":"q","colour":"red"}"#,
                json!("subscribe"),
            ),
        ] {
            let m = parse(text).err().unwrap_or_else(|| panic!("{text} parsed"));
            assert_eq!(m.op, op, "{text}: {}", m.message);
        }
    }
}
