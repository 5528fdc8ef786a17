//! [`Value`]: one argument, result or stream item, kept in the encoding it arrived in.
//!
//! Pure: no I/O, no logging. A value from a JSON client stays raw JSON text, a value from a
//! MessagePack client stays raw MessagePack bytes, and a value produced by Rust code stays a
//! `Serialize` object until a protocol asks for it. Encoding into the *other* protocol
//! transcodes once (see `write_json` / `write_msgpack`); decoding into a hub method's typed
//! parameter goes straight from the raw form through serde.
//!
//! Type mapping follows ASP.NET SignalR where it matters to clients:
//! - MessagePack `bin` becomes a base64 string in JSON (ASP.NET writes `byte[]` that way);
//! - MessagePack timestamps (ext −1) become ISO-8601 UTC strings in JSON;
//! - Rust structs become MessagePack *maps* keyed by field name (ASP.NET's contractless
//!   resolver), never positional arrays.
//!
//! Use [`Binary`] and [`Timestamp`] in Rust types to get `bin`/ext −1 on MessagePack and
//! base64/ISO strings on JSON, as ASP.NET does for `byte[]` and `DateTime`.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A value that can be written to either protocol and decoded into any `Deserialize` type.
#[derive(Clone)]
pub enum Value {
    /// Exactly one valid JSON value, as UTF-8 text.
    Json(Bytes),
    /// Exactly one valid MessagePack value.
    MsgPack(Bytes),
    /// A Rust value, serialized on demand.
    Native(Arc<dyn erased_serde::Serialize + Send + Sync>),
}

/// Errors converting a [`Value`].
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// The value could not be decoded into the requested type.
    #[error("{0}")]
    Decode(String),
    /// The value could not be encoded.
    #[error("{0}")]
    Encode(String),
}

impl Value {
    /// JSON `null` / MessagePack `nil`.
    pub fn null() -> Value {
        Value::Json(Bytes::from_static(b"null"))
    }

    /// Wraps a Rust value; it is serialized when a protocol needs it.
    pub fn from_serialize<T: Serialize + Send + Sync + 'static>(value: T) -> Value {
        Value::Native(Arc::new(value))
    }

    /// Raw JSON text of one value. The caller guarantees it is valid JSON
    /// (use [`Value::json_checked`] for untrusted text).
    pub fn json_unchecked(raw: Bytes) -> Value {
        Value::Json(raw)
    }

    /// Raw JSON text of one value, validated.
    pub fn json_checked(raw: Bytes) -> Result<Value, ValueError> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&raw)
            .map_err(|e| ValueError::Decode(e.to_string()))?;
        Ok(Value::Json(raw))
    }

    /// Whether this is JSON `null` / MessagePack `nil`.
    pub fn is_null(&self) -> bool {
        match self {
            Value::Json(b) => b.as_ref().trim_ascii() == b"null",
            Value::MsgPack(b) => b.as_ref() == [0xc0],
            Value::Native(_) => false,
        }
    }

    /// Decodes into `T` (a hub method's parameter type).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ValueError> {
        match self {
            Value::Json(b) => {
                serde_json::from_slice(b).map_err(|e| ValueError::Decode(e.to_string()))
            }
            Value::MsgPack(b) => {
                rmp_serde::from_slice(b).map_err(|e| ValueError::Decode(e.to_string()))
            }
            Value::Native(_) => {
                let mut out = Vec::new();
                self.write_json(&mut out)?;
                serde_json::from_slice(&out).map_err(|e| ValueError::Decode(e.to_string()))
            }
        }
    }

    /// Appends this value as JSON text.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), ValueError> {
        match self {
            Value::Json(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
            Value::MsgPack(b) => super::transcode::msgpack_to_json(b, out),
            Value::Native(v) => {
                let mut ser = serde_json::Serializer::new(out);
                erased_serde::serialize(v.as_ref(), &mut ser)
                    .map_err(|e| ValueError::Encode(e.to_string()))
            }
        }
    }

    /// Appends this value as MessagePack.
    pub fn write_msgpack(&self, out: &mut Vec<u8>) -> Result<(), ValueError> {
        match self {
            Value::MsgPack(b) => {
                out.extend_from_slice(b);
                Ok(())
            }
            Value::Json(b) => super::transcode::json_to_msgpack(b, out),
            Value::Native(v) => {
                let mut ser = rmp_serde::Serializer::new(out).with_struct_map();
                erased_serde::serialize(v.as_ref(), &mut ser)
                    .map_err(|e| ValueError::Encode(e.to_string()))
            }
        }
    }

    /// This value as JSON text (transcoding if needed). Convenient in tests and logs.
    pub fn to_json_string(&self) -> Result<String, ValueError> {
        let mut out = Vec::new();
        self.write_json(&mut out)?;
        String::from_utf8(out).map_err(|e| ValueError::Encode(e.to_string()))
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_json_string() {
            Ok(s) => write!(f, "Value({s})"),
            Err(e) => write!(f, "Value(<{e}>)"),
        }
    }
}

/// Values compare by their JSON rendering with whitespace outside strings ignored; good
/// enough for tests and for deduplication, not a canonical form.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        let a = self.to_json_string().ok().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        let b = other.to_json_string().ok().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        a.is_some() && a == b
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::Json(Bytes::from(v.to_string()))
    }
}

/// A byte array: MessagePack `bin` on MessagePack connections, a base64 string on JSON ones
/// (ASP.NET's `byte[]`). Decodes from either form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Binary(pub Vec<u8>);

/// A UTC instant: MessagePack timestamp (ext −1) on MessagePack connections, an ISO-8601
/// string such as `2000-01-01T00:00:00Z` on JSON ones (ASP.NET's `DateTime` in UTC).
/// Decodes from either form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nanos: u32,
}
