//! AMQP field tables and their JSON form (DESIGN.md §2): integer within i64 → `l`, other
//! numbers → `d`, string → `S`, bool → `t`, null → `V`, array → `A`, object → `F`,
//! `{"$bytes":"<base64>"}` → `x`. The reverse maps back; a timestamp becomes integer seconds and
//! a decimal a string.

mod map;
pub mod wire;

pub use map::{FieldTable, Headers, Key};

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Number, Value};

/// One AMQP 0-9-1 field value (RabbitMQ's dialect of the type tags).
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    /// `scale` decimal digits after the point: value × 10^-scale.
    Decimal {
        scale: u8,
        value: u32,
    },
    /// `S`, when the bytes are UTF-8. Shared: the gateway stamps every publish with its
    /// publisher's subject and session (`x-gateway-sub`, `x-mqtt-origin`), strings each
    /// connection holds for its whole life, and a copy per message was two allocations.
    Str(Arc<str>),
    /// `x`, and `S` values that are not UTF-8.
    Bytes(Vec<u8>),
    Array(Vec<FieldValue>),
    /// Seconds since the epoch.
    Timestamp(u64),
    /// Boxed: a table may hold entries in line ([`Headers`]), which it could not if a value
    /// held a table in line. Nested tables are rare (`x-death`, a subscription's definition).
    Table(Box<FieldTable>),
    Void,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("a table must be a JSON object")]
    NotAnObject,
    #[error("\"$bytes\" must hold a base64 string: {0}")]
    BadBytes(String),
    #[error("table key '{0}…' is longer than 255 bytes")]
    KeyTooLong(String),
    #[error("tables nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Deep enough for any real header, shallow enough that a hostile document cannot overflow the
/// stack while converting.
const MAX_DEPTH: usize = 32;

impl FieldValue {
    /// The value as an integer, whatever its integer width.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            FieldValue::I8(v) => v.into(),
            FieldValue::U8(v) => v.into(),
            FieldValue::I16(v) => v.into(),
            FieldValue::U16(v) => v.into(),
            FieldValue::I32(v) => v.into(),
            FieldValue::U32(v) => v.into(),
            FieldValue::I64(v) => v.into(),
            FieldValue::Timestamp(v) => v.into(),
            _ => return None,
        })
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::Str(s) => Some(s),
            FieldValue::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Equality across integer widths and string encodings: a header `l 5` equals a binding
    /// argument `I 5` (the headers exchange compares this way).
    pub fn loosely_equals(&self, other: &FieldValue) -> bool {
        if let (Some(a), Some(b)) = (self.as_i128(), other.as_i128()) {
            return a == b;
        }
        if let (Some(a), Some(b)) = (self.as_str(), other.as_str()) {
            return a == b;
        }
        self == other
    }

    pub fn from_json(value: &Value) -> Result<FieldValue, TableError> {
        from_json(value, 0)
    }

    pub fn to_json(&self) -> Value {
        match self {
            FieldValue::Bool(b) => Value::Bool(*b),
            FieldValue::F32(f) => float(f64::from(*f)),
            FieldValue::F64(f) => float(*f),
            FieldValue::Decimal { scale, value } => Value::String(decimal(*scale, *value)),
            FieldValue::Str(s) => Value::String(s.to_string()),
            FieldValue::Bytes(b) => {
                let mut map = Map::new();
                map.insert("$bytes".into(), Value::String(BASE64.encode(b)));
                Value::Object(map)
            }
            FieldValue::Array(items) => {
                Value::Array(items.iter().map(FieldValue::to_json).collect())
            }
            FieldValue::Table(t) => table_to_json(t),
            FieldValue::Void => Value::Null,
            FieldValue::Timestamp(t) => Value::Number((*t).into()),
            int => match int.as_i128().and_then(|v| i64::try_from(v).ok()) {
                Some(v) => Value::Number(v.into()),
                None => Value::Null,
            },
        }
    }
}

/// JSON has no NaN or infinity; they become `null` rather than failing a whole message.
fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn decimal(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

fn from_json(value: &Value, depth: usize) -> Result<FieldValue, TableError> {
    if depth > MAX_DEPTH {
        return Err(TableError::TooDeep);
    }
    Ok(match value {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => FieldValue::Str(s.as_str().into()),
        Value::Array(items) => FieldValue::Array(
            items
                .iter()
                .map(|v| from_json(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            if map.len() == 1
                && let Some(bytes) = map.get("$bytes")
            {
                let Value::String(b64) = bytes else {
                    return Err(TableError::BadBytes("not a string".into()));
                };
                return BASE64
                    .decode(b64)
                    .map(FieldValue::Bytes)
                    .map_err(|e| TableError::BadBytes(e.to_string()));
            }
            FieldValue::Table(Box::new(object_to_table(map, depth + 1)?))
        }
    })
}

fn object_to_table<const N: usize>(
    map: &Map<String, Value>,
    depth: usize,
) -> Result<FieldTable<N>, TableError> {
    let mut table = FieldTable::new();
    for (key, value) in map {
        if key.len() > 255 {
            let cut = key
                .char_indices()
                .take(16)
                .last()
                .map_or(0, |(i, c)| i + c.len_utf8());
            return Err(TableError::KeyTooLong(key[..cut].to_owned()));
        }
        table.insert(key.clone(), from_json(value, depth)?);
    }
    Ok(table)
}

/// A JSON object → field table (arguments, or a message's headers); anything else is an error.
pub fn table_from_json<const N: usize>(value: &Value) -> Result<FieldTable<N>, TableError> {
    match value {
        Value::Object(map) => object_to_table(map, 0),
        _ => Err(TableError::NotAnObject),
    }
}

pub fn table_to_json<const N: usize>(table: &FieldTable<N>) -> Value {
    Value::Object(
        table
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_json()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_maps_to_amqp_types() {
        let t = table_from_json::<0>(&json!({
            "i": 5, "big": 18446744073709551615u64, "f": 1.5, "s": "x", "b": true,
            "n": null, "a": [1, "two"], "o": {"k": 1}, "raw": {"$bytes": "AAEC"}
        }))
        .unwrap();
        assert_eq!(t["i"], FieldValue::I64(5));
        assert!(matches!(t["big"], FieldValue::F64(_)));
        assert_eq!(t["f"], FieldValue::F64(1.5));
        assert_eq!(t["s"], FieldValue::Str("x".into()));
        assert_eq!(t["b"], FieldValue::Bool(true));
        assert_eq!(t["n"], FieldValue::Void);
        assert_eq!(
            t["a"],
            FieldValue::Array(vec![FieldValue::I64(1), FieldValue::Str("two".into())])
        );
        assert!(matches!(&t["o"], FieldValue::Table(o) if o["k"] == FieldValue::I64(1)));
        assert_eq!(t["raw"], FieldValue::Bytes(vec![0, 1, 2]));
    }

    #[test]
    fn amqp_maps_back_to_json() {
        let mut t: FieldTable = FieldTable::new();
        t.insert("ts", FieldValue::Timestamp(1_700_000_000));
        t.insert("dec", FieldValue::Decimal { scale: 2, value: 5 });
        t.insert("u", FieldValue::U32(7));
        t.insert("nan", FieldValue::F64(f64::NAN));
        t.insert("x", FieldValue::Bytes(vec![255]));
        assert_eq!(
            table_to_json(&t),
            json!({"ts": 1_700_000_000u64, "dec": "0.05", "u": 7, "nan": null, "x": {"$bytes": "/w=="}})
        );
    }

    #[test]
    fn round_trip_keeps_json_values() {
        let v = json!({"a": [1, 2.5, "s", false, null, {"$bytes": "aGk="}], "t": {"n": -3}});
        assert_eq!(table_to_json(&table_from_json::<0>(&v).unwrap()), v);
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            table_from_json::<0>(&json!([1])),
            Err(TableError::NotAnObject)
        );
        assert!(matches!(
            table_from_json::<0>(&json!({"x": {"$bytes": "!!"}})),
            Err(TableError::BadBytes(_))
        ));
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        assert_eq!(
            table_from_json::<0>(&json!({ "d": deep })),
            Err(TableError::TooDeep)
        );
        let long = "k".repeat(256);
        assert!(matches!(
            table_from_json::<0>(&json!({ long: 1 })),
            Err(TableError::KeyTooLong(_))
        ));
    }

    #[test]
    fn integers_compare_across_widths() {
        assert!(FieldValue::I64(5).loosely_equals(&FieldValue::U8(5)));
        assert!(!FieldValue::I64(5).loosely_equals(&FieldValue::Str("5".into())));
    }
}
