//! The JSON form of messages that REST and WebSocket share (DESIGN.md §4 "Bodies", §2 tables):
//! body encodings in and out, and AMQP properties as JSON. Protocol-neutral: errors are
//! [`JsonError`]s each adapter maps to its own answer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::engine::table::{table_from_json, table_to_json};
use crate::engine::{Message, Properties};

/// Header stamped on every publish with the authenticated subject (clients cannot set it).
pub const SUBJECT_HEADER: &str = "x-gateway-sub";
/// Properties and headers together may take this much beside the body (DESIGN.md §7).
pub const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The body is a string of UTF-8 text.
    Utf8,
    /// The body is a base64 string of arbitrary bytes.
    Base64,
    /// The body is any JSON value, stored as compact JSON.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
}

/// AMQP basic properties as JSON. Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PropertiesJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// An AMQP table: integers → `l`, other numbers → `d`, strings → `S`, booleans → `t`,
    /// null → `V`, arrays → `A`, objects → `F`, `{"$bytes":"<base64>"}` → `x`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub headers: Option<serde_json::Map<String, Value>>,
    /// 1 transient, 2 persistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds (a string of digits, as AMQP; an integer is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub expiration: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// Only ever shown on messages from AMQP peers; a client may not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// `application/json` or `*/*+json`, parameters ignored.
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || (essence.contains('/') && essence.ends_with("+json"))
}

/// Decodes a body as the client says; without `encoding`, strings are UTF-8 and other values
/// JSON. Returns the bytes and whether they are JSON (content type implied).
pub fn body_in(body: &Value, encoding: Option<Encoding>) -> Result<(Bytes, bool), JsonError> {
    match (encoding, body) {
        (None | Some(Encoding::Utf8), Value::String(s)) => Ok((Bytes::from(s.clone()), false)),
        (Some(Encoding::Utf8), _) => Err(JsonError::BadRequest(
            "encoding \"utf8\" needs a string body".into(),
        )),
        (Some(Encoding::Base64), Value::String(s)) => BASE64
            .decode(s)
            .map(|b| (Bytes::from(b), false))
            .map_err(|e| JsonError::BadRequest(format!("body is not valid base64: {e}"))),
        (Some(Encoding::Base64), _) => Err(JsonError::BadRequest(
            "encoding \"base64\" needs a string body".into(),
        )),
        (None | Some(Encoding::Json), value) => serde_json::to_vec(value)
            .map(|b| (Bytes::from(b), true))
            .map_err(|e| JsonError::BadRequest(e.to_string())),
    }
}

fn expiration_in(value: &Value) -> Result<String, JsonError> {
    let digits = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => String::new(),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 10 {
        return Err(JsonError::BadRequest(
            "properties.expiration must be a non-negative number of milliseconds".into(),
        ));
    }
    Ok(digits)
}

/// Properties from JSON, checked. `json_body` sets content type `application/json` when none
/// was given. (The publish gate stamps [`SUBJECT_HEADER`].)
pub fn properties_in(
    json: Option<PropertiesJson>,
    json_body: bool,
) -> Result<Properties, JsonError> {
    let json = json.unwrap_or_default();
    if json.user_id.is_some() {
        return Err(JsonError::BadRequest(
            "properties.user_id may not be set by clients".into(),
        ));
    }
    if let Some(mode) = json.delivery_mode
        && mode != 1
        && mode != 2
    {
        return Err(JsonError::BadRequest(
            "properties.delivery_mode must be 1 (transient) or 2 (persistent)".into(),
        ));
    }
    let headers = match &json.headers {
        Some(map) => table_from_json(&Value::Object(map.clone()))
            .map_err(|e| JsonError::BadRequest(format!("properties.headers: {e}")))?,
        None => Default::default(),
    };
    let size = json.headers.as_ref().map_or(0, |h| {
        serde_json::to_vec(h).map(|v| v.len()).unwrap_or(usize::MAX)
    }) + [
        &json.content_type,
        &json.content_encoding,
        &json.correlation_id,
        &json.reply_to,
        &json.message_id,
        &json.kind,
        &json.app_id,
    ]
    .iter()
    .map(|s| s.as_ref().map_or(0, String::len))
    .sum::<usize>();
    if size > MAX_PROPERTIES_BYTES {
        return Err(JsonError::TooLarge(format!(
            "properties and headers take {size} bytes, the limit is {MAX_PROPERTIES_BYTES}"
        )));
    }
    for (name, value) in [
        ("content_type", &json.content_type),
        ("content_encoding", &json.content_encoding),
        ("correlation_id", &json.correlation_id),
        ("reply_to", &json.reply_to),
        ("message_id", &json.message_id),
        ("type", &json.kind),
        ("app_id", &json.app_id),
    ] {
        if value.as_ref().is_some_and(|v| v.len() > 255) {
            return Err(JsonError::BadRequest(format!(
                "properties.{name} is longer than 255 bytes"
            )));
        }
    }
    Ok(Properties {
        content_type: json
            .content_type
            .or_else(|| json_body.then(|| "application/json".to_owned())),
        content_encoding: json.content_encoding,
        headers,
        delivery_mode: json.delivery_mode,
        priority: json.priority,
        correlation_id: json.correlation_id,
        reply_to: json.reply_to,
        expiration: json.expiration.as_ref().map(expiration_in).transpose()?,
        message_id: json.message_id,
        timestamp: json.timestamp,
        kind: json.kind,
        user_id: None,
        app_id: json.app_id,
    })
}

/// A body for a client: `json` when the content type is JSON and the body parses, else `utf8`
/// when it is valid UTF-8, else `base64`.
pub fn body_out(message: &Message) -> (Value, Encoding) {
    let body = &message.body;
    if message
        .properties
        .content_type
        .as_deref()
        .is_some_and(is_json_content_type)
        && let Ok(v) = serde_json::from_slice::<Value>(body)
    {
        return (v, Encoding::Json);
    }
    match std::str::from_utf8(body) {
        Ok(s) => (Value::String(s.to_owned()), Encoding::Utf8),
        Err(_) => (Value::String(BASE64.encode(body)), Encoding::Base64),
    }
}

pub fn properties_out(p: &Properties) -> PropertiesJson {
    let headers = match table_to_json(&p.headers) {
        Value::Object(map) if !map.is_empty() => Some(map),
        _ => None,
    };
    PropertiesJson {
        content_type: p.content_type.clone(),
        content_encoding: p.content_encoding.clone(),
        headers,
        delivery_mode: p.delivery_mode,
        priority: p.priority,
        correlation_id: p.correlation_id.clone(),
        reply_to: p.reply_to.clone(),
        expiration: p.expiration.clone().map(Value::String),
        message_id: p.message_id.clone(),
        timestamp: p.timestamp,
        kind: p.kind.clone(),
        app_id: p.app_id.clone(),
        user_id: p.user_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_in() {
        assert_eq!(
            body_in(&json!("hi"), None).unwrap(),
            (Bytes::from("hi"), false)
        );
        assert_eq!(
            body_in(&json!({"a": 1}), None).unwrap(),
            (Bytes::from(r#"{"a":1}"#), true)
        );
        assert_eq!(
            body_in(&json!("hi"), Some(Encoding::Json)).unwrap(),
            (Bytes::from(r#""hi""#), true)
        );
        assert_eq!(
            body_in(&json!("AAE="), Some(Encoding::Base64)).unwrap().0,
            Bytes::from(vec![0, 1])
        );
        assert!(body_in(&json!("!!"), Some(Encoding::Base64)).is_err());
        assert!(body_in(&json!(5), Some(Encoding::Utf8)).is_err());
    }

    #[test]
    fn bodies_out() {
        let mut m = Message::new(r#"{"a":1}"#);
        m.properties_mut().content_type = Some("application/vnd.x+json; charset=utf-8".into());
        assert_eq!(body_out(&m), (json!({"a": 1}), Encoding::Json));
        m.properties_mut().content_type = Some("text/plain".into());
        assert_eq!(body_out(&m), (json!(r#"{"a":1}"#), Encoding::Utf8));
        assert_eq!(
            body_out(&Message::new(vec![0xff, 0])),
            (json!("/wA="), Encoding::Base64)
        );
    }

    #[test]
    fn properties_are_checked() {
        let p = properties_in(None, true).unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        for bad in [
            PropertiesJson {
                user_id: Some("x".into()),
                ..Default::default()
            },
            PropertiesJson {
                delivery_mode: Some(3),
                ..Default::default()
            },
            PropertiesJson {
                expiration: Some(json!("soon")),
                ..Default::default()
            },
            PropertiesJson {
                expiration: Some(json!(-5)),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                properties_in(Some(bad), false),
                Err(JsonError::BadRequest(_))
            ));
        }
        let ok = PropertiesJson {
            expiration: Some(json!(1500)),
            ..Default::default()
        };
        assert_eq!(
            properties_in(Some(ok), false)
                .unwrap()
                .expiration
                .as_deref(),
            Some("1500")
        );
    }
}
