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

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

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
        let a = self
            .to_json_string()
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        let b = other
            .to_json_string()
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
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

// ---- Binary: base64 string (human-readable formats) or `bin` ----

impl Serialize for Binary {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&BASE64.encode(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Binary {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            // Not deserialize_bytes: serde_json would hand over the base64 text undecoded.
            deserializer.deserialize_any(BinaryVisitor)
        } else {
            deserializer.deserialize_byte_buf(BinaryVisitor)
        }
    }
}

struct BinaryVisitor;

impl<'de> Visitor<'de> for BinaryVisitor {
    type Value = Binary;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a base64 string, a byte array or an array of bytes")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Binary, E> {
        BASE64
            .decode(v)
            .map(Binary)
            .map_err(|e| E::custom(format!("invalid base64: {e}")))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Binary, E> {
        Ok(Binary(v.to_vec()))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Binary, E> {
        Ok(Binary(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Binary, A::Error> {
        // The size hint comes from the peer: cap the pre-allocation.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Binary(out))
    }
}

// ---- Timestamp: ISO-8601 string (human-readable formats) or MessagePack ext −1 ----

/// The MessagePack extension type of timestamps.
pub const TIMESTAMP_EXT_TYPE: i8 = -1;

const NANOS_PER_SECOND: u32 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

impl Timestamp {
    /// The Unix epoch, `1970-01-01T00:00:00Z`.
    pub const UNIX_EPOCH: Timestamp = Timestamp {
        seconds: 0,
        nanos: 0,
    };

    /// A timestamp, or `None` when `nanos` is not below one second.
    pub fn new(seconds: i64, nanos: u32) -> Option<Timestamp> {
        (nanos < NANOS_PER_SECOND).then_some(Timestamp { seconds, nanos })
    }

    /// Carries out-of-range `nanos` (the fields are public) into `seconds`, saturating.
    fn normalized(self) -> Timestamp {
        if self.nanos < NANOS_PER_SECOND {
            return self;
        }
        Timestamp {
            seconds: self
                .seconds
                .saturating_add(i64::from(self.nanos / NANOS_PER_SECOND)),
            nanos: self.nanos % NANOS_PER_SECOND,
        }
    }

    /// Reads the data of a MessagePack timestamp extension (type −1): 4 bytes (seconds as
    /// u32), 8 bytes (30-bit nanos and 34-bit seconds) or 12 bytes (u32 nanos, i64 seconds).
    /// `None` for any other length or for nanos ≥ 10^9.
    pub fn from_msgpack_ext(data: &[u8]) -> Option<Timestamp> {
        match data.len() {
            4 => {
                let secs = u32::from_be_bytes(data.try_into().ok()?);
                Some(Timestamp {
                    seconds: i64::from(secs),
                    nanos: 0,
                })
            }
            8 => {
                let v = u64::from_be_bytes(data.try_into().ok()?);
                let nanos = u32::try_from(v >> 34).ok()?;
                let seconds = i64::try_from(v & 0x3_ffff_ffff).ok()?;
                Timestamp::new(seconds, nanos)
            }
            12 => {
                let nanos = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
                let seconds = i64::from_be_bytes(data.get(4..)?.try_into().ok()?);
                Timestamp::new(seconds, nanos)
            }
            _ => None,
        }
    }

    /// The data of the MessagePack timestamp extension (type −1), in the smallest of the
    /// three forms, as the MessagePack spec, ASP.NET and the JS client choose it:
    /// timestamp32 when nanos are 0 and seconds fit u32, timestamp64 when seconds fit 34
    /// bits, timestamp96 otherwise.
    pub fn to_msgpack_ext(&self) -> Vec<u8> {
        let t = self.normalized();
        if t.seconds >> 34 == 0 {
            if t.nanos == 0 && t.seconds >> 32 == 0 {
                return (t.seconds as u32).to_be_bytes().to_vec();
            }
            let v = (u64::from(t.nanos) << 34) | (t.seconds as u64);
            return v.to_be_bytes().to_vec();
        }
        let mut out = Vec::with_capacity(12);
        out.extend_from_slice(&t.nanos.to_be_bytes());
        out.extend_from_slice(&t.seconds.to_be_bytes());
        out
    }

    /// ISO-8601 in UTC: `2000-01-01T00:00:00Z`, with a fraction (trailing zeros trimmed)
    /// only when nanos ≠ 0, as System.Text.Json writes a UTC `DateTime`. Years outside
    /// 0000–9999 use the expanded form `+YYYYYY` / `-YYYYYY` (as JavaScript does).
    pub fn to_iso8601(&self) -> String {
        let t = self.normalized();
        let days = t.seconds.div_euclid(SECONDS_PER_DAY);
        let secs_of_day = t.seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let (h, m, s) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
        let mut out = if (0..=9999).contains(&year) {
            format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}")
        } else {
            format!("{year:+07}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}")
        };
        if t.nanos != 0 {
            let frac = format!("{:09}", t.nanos);
            out.push('.');
            out.push_str(frac.trim_end_matches('0'));
        }
        out.push('Z');
        out
    }

    /// Parses ISO-8601 / RFC 3339 date-times: `YYYY-MM-DD`, optionally followed by
    /// `THH:MM[:SS[.fraction]]` and `Z` or `±HH:MM` / `±HHMM` / `±HH`. Without an offset the
    /// time is taken as UTC. Fractions beyond nanoseconds are truncated. Expanded years
    /// (`+YYYYYY`) are accepted.
    pub fn parse_iso8601(s: &str) -> Option<Timestamp> {
        let mut p = IsoParser {
            b: s.as_bytes(),
            i: 0,
        };
        let year = match p.peek() {
            Some(sign @ (b'+' | b'-')) => {
                p.i += 1;
                let digits = p.digits_run(4, 9)?;
                if sign == b'-' {
                    -digits
                } else {
                    digits
                }
            }
            _ => p.fixed(4)?,
        };
        p.expect(b'-')?;
        let month = p.fixed(2)?;
        p.expect(b'-')?;
        let day = p.fixed(2)?;
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return None;
        }
        let (mut hour, mut minute, mut second, mut nanos) = (0, 0, 0, 0u32);
        let mut offset_secs = 0i64;
        if p.peek().is_some() {
            match p.next()? {
                b'T' | b't' | b' ' => {}
                _ => return None,
            }
            hour = p.fixed(2)?;
            p.expect(b':')?;
            minute = p.fixed(2)?;
            if p.peek() == Some(b':') {
                p.i += 1;
                second = p.fixed(2)?;
                if matches!(p.peek(), Some(b'.' | b',')) {
                    p.i += 1;
                    nanos = p.fraction()?;
                }
            }
            if hour > 23 || minute > 59 || second > 59 {
                return None;
            }
            match p.next() {
                None => {}
                Some(b'Z' | b'z') => {}
                Some(sign @ (b'+' | b'-')) => {
                    let oh = p.fixed(2)?;
                    let om = match p.peek() {
                        None => 0,
                        Some(b':') => {
                            p.i += 1;
                            p.fixed(2)?
                        }
                        Some(_) => p.fixed(2)?,
                    };
                    if oh > 23 || om > 59 {
                        return None;
                    }
                    let off = oh * 3600 + om * 60;
                    offset_secs = if sign == b'-' { -off } else { off };
                }
                Some(_) => return None,
            }
            if p.peek().is_some() {
                return None;
            }
        }
        let days = days_from_civil(year, month, day);
        let seconds = days
            .checked_mul(SECONDS_PER_DAY)?
            .checked_add(hour * 3600 + minute * 60 + second)?
            .checked_sub(offset_secs)?;
        Timestamp::new(seconds, nanos)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_iso8601())
    }
}

/// A cursor over ASCII date-time text; every step is bounds-checked.
struct IsoParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl IsoParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn digit(&mut self) -> Option<i64> {
        let c = self.peek()?;
        if !c.is_ascii_digit() {
            return None;
        }
        self.i += 1;
        Some(i64::from(c - b'0'))
    }

    fn fixed(&mut self, n: usize) -> Option<i64> {
        let mut v = 0;
        for _ in 0..n {
            v = v * 10 + self.digit()?;
        }
        Some(v)
    }

    /// Between `min` and `max` digits (bounded, so no overflow).
    fn digits_run(&mut self, min: usize, max: usize) -> Option<i64> {
        let mut v = 0;
        let mut n = 0;
        while n < max {
            match self.digit() {
                Some(d) => v = v * 10 + d,
                None => break,
            }
            n += 1;
        }
        (n >= min).then_some(v)
    }

    /// One or more digits of a decimal fraction, as nanoseconds (extra digits truncated).
    fn fraction(&mut self) -> Option<u32> {
        let mut nanos: u32 = 0;
        let mut n = 0;
        while let Some(d) = self.digit() {
            if n < 9 {
                nanos = nanos * 10 + d as u32;
            }
            n += 1;
        }
        if n == 0 {
            return None;
        }
        for _ in n..9 {
            nanos *= 10;
        }
        Some(nanos)
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01. Total for every day count
/// derived from an `i64` of seconds (|days| < 2^47, far from overflow).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Bytes serialized with `serialize_bytes` (what `serde_bytes` does), for the ext payload.
struct ExtData<'a>(&'a [u8]);

impl Serialize for ExtData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&self.to_iso8601())
        } else {
            // rmp-serde's extension convention: a newtype struct with this magic name
            // wrapping the tuple (type tag, data bytes).
            let data = self.to_msgpack_ext();
            serializer.serialize_newtype_struct(
                rmp_serde::MSGPACK_EXT_STRUCT_NAME,
                &(TIMESTAMP_EXT_TYPE, ExtData(&data)),
            )
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(TimestampVisitor)
        } else {
            // rmp-serde reports an ext value as `visit_newtype_struct` from deserialize_any
            // and a str as `visit_str`, so both forms are accepted.
            deserializer.deserialize_any(TimestampVisitor)
        }
    }
}

struct TimestampVisitor;

impl<'de> Visitor<'de> for TimestampVisitor {
    type Value = Timestamp;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an ISO-8601 date-time string or a MessagePack timestamp")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
        Timestamp::parse_iso8601(v)
            .ok_or_else(|| E::custom(format!("invalid ISO-8601 date-time: {v:?}")))
    }

    fn visit_newtype_struct<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Timestamp, D::Error> {
        deserializer.deserialize_tuple(2, ExtVisitor)
    }
}

/// Reads rmp-serde's `(tag, data)` extension tuple.
struct ExtVisitor;

impl<'de> Visitor<'de> for ExtVisitor {
    type Value = Timestamp;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a MessagePack timestamp extension (type -1)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Timestamp, A::Error> {
        let tag: i8 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        if tag != TIMESTAMP_EXT_TYPE {
            return Err(de::Error::custom(format!(
                "expected a timestamp (ext type -1), found ext type {tag}"
            )));
        }
        let data: Binary = seq
            .next_element_seed(ExtBytesSeed)?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?;
        Timestamp::from_msgpack_ext(&data.0)
            .ok_or_else(|| de::Error::custom("invalid MessagePack timestamp"))
    }
}

/// The ext payload: raw bytes, never base64 (so not `Binary`'s own `Deserialize`).
struct ExtBytesSeed;

impl<'de> de::DeserializeSeed<'de> for ExtBytesSeed {
    type Value = Binary;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Binary, D::Error> {
        deserializer.deserialize_byte_buf(BinaryVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Upload {
        file_name: String,
        data: Binary,
        taken_at: Timestamp,
    }

    fn sample() -> Upload {
        Upload {
            file_name: "a.bin".into(),
            data: Binary(vec![1, 2, 3]),
            taken_at: Timestamp::new(946_684_800, 0).unwrap(),
        }
    }

    fn msgpack_of<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        v.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())
            .unwrap();
        out
    }

    #[test]
    fn binary_forms() {
        assert_eq!(
            serde_json::to_string(&Binary(vec![1, 2, 3])).unwrap(),
            r#""AQID""#
        );
        assert_eq!(msgpack_of(&Binary(vec![1, 2, 3])), [0xc4, 3, 1, 2, 3]);
        let from_b64: Binary = serde_json::from_str(r#""AQID""#).unwrap();
        let from_array: Binary = serde_json::from_str("[1,2,3]").unwrap();
        let from_bin: Binary = rmp_serde::from_slice(&[0xc4, 3, 1, 2, 3]).unwrap();
        let from_mp_str: Binary = rmp_serde::from_slice(&[0xa4, b'A', b'Q', b'I', b'D']).unwrap();
        let from_mp_array: Binary = rmp_serde::from_slice(&[0x93, 1, 2, 3]).unwrap();
        for b in [from_b64, from_array, from_bin, from_mp_str, from_mp_array] {
            assert_eq!(b, Binary(vec![1, 2, 3]));
        }
        assert!(serde_json::from_str::<Binary>(r#""not base64!""#).is_err());
        assert!(serde_json::from_str::<Binary>("[256]").is_err());
    }

    #[test]
    fn timestamp_msgpack_forms() {
        // timestamp32: 2000-01-01T00:00:00Z = 946684800 = 0x386D4380.
        let t = Timestamp::new(946_684_800, 0).unwrap();
        assert_eq!(msgpack_of(&t), [0xd6, 0xff, 0x38, 0x6d, 0x43, 0x80]);
        // Observed from the JS client: Date.UTC(2024,0,1) → d6 ff 65 92 00 80.
        let t: Timestamp = rmp_serde::from_slice(&[0xd6, 0xff, 0x65, 0x92, 0x00, 0x80]).unwrap();
        assert_eq!(t.to_iso8601(), "2024-01-01T00:00:00Z");
        // timestamp64 when nanos ≠ 0.
        let t = Timestamp::new(946_684_800, 500_000_000).unwrap();
        let bytes = msgpack_of(&t);
        assert_eq!(&bytes[..2], &[0xd7, 0xff]);
        assert_eq!(rmp_serde::from_slice::<Timestamp>(&bytes).unwrap(), t);
        // timestamp64 when seconds need more than 32 bits.
        let t = Timestamp::new(1 << 33, 0).unwrap();
        assert_eq!(&msgpack_of(&t)[..2], &[0xd7, 0xff]);
        // timestamp96 before the epoch and beyond 34 bits.
        for t in [
            Timestamp::new(-1, 5).unwrap(),
            Timestamp::new(1 << 34, 0).unwrap(),
        ] {
            let bytes = msgpack_of(&t);
            assert_eq!(&bytes[..3], &[0xc7, 12, 0xff]);
            assert_eq!(rmp_serde::from_slice::<Timestamp>(&bytes).unwrap(), t);
        }
        // Another ext type is refused.
        assert!(rmp_serde::from_slice::<Timestamp>(&[0xd6, 0x01, 0, 0, 0, 0]).is_err());
        // An ISO string inside MessagePack is accepted too.
        let mut s = vec![0xb4];
        s.extend_from_slice(b"2000-01-01T00:00:00Z");
        assert_eq!(
            rmp_serde::from_slice::<Timestamp>(&s).unwrap().seconds,
            946_684_800
        );
    }

    #[test]
    fn timestamp_iso_forms() {
        let t = |s: &str| Timestamp::parse_iso8601(s);
        assert_eq!(Timestamp::UNIX_EPOCH.to_iso8601(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp::new(946_684_800, 0).unwrap().to_iso8601(),
            "2000-01-01T00:00:00Z"
        );
        assert_eq!(
            Timestamp::new(946_684_800, 120_000_000)
                .unwrap()
                .to_iso8601(),
            "2000-01-01T00:00:00.12Z"
        );
        assert_eq!(
            Timestamp::new(-1, 0).unwrap().to_iso8601(),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            Timestamp::new(253_402_300_800, 0).unwrap().to_iso8601(),
            "+010000-01-01T00:00:00Z"
        );
        assert_eq!(t("2000-01-01T00:00:00Z").unwrap().seconds, 946_684_800);
        assert_eq!(t("2000-01-01T01:00:00+01:00").unwrap().seconds, 946_684_800);
        assert_eq!(t("1999-12-31T23:00:00-0100").unwrap().seconds, 946_684_800);
        assert_eq!(t("2000-01-01T00:00:00").unwrap().seconds, 946_684_800);
        assert_eq!(t("2000-01-01").unwrap().seconds, 946_684_800);
        assert_eq!(t("2000-01-01t00:00z").unwrap().seconds, 946_684_800);
        assert_eq!(
            t("2000-01-01T00:00:00.1234567Z").unwrap(),
            Timestamp::new(946_684_800, 123_456_700).unwrap()
        );
        assert_eq!(
            t("2000-01-01T00:00:00.1234567891Z").unwrap().nanos,
            123_456_789
        );
        assert_eq!(
            t("2024-02-29T00:00:00Z").unwrap().to_iso8601(),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(
            t("+010000-01-01T00:00:00Z").unwrap().seconds,
            253_402_300_800
        );
        assert_eq!(
            t("-000001-01-01T00:00:00Z").unwrap().to_iso8601(),
            "-000001-01-01T00:00:00Z"
        );
        for bad in [
            "",
            "2000",
            "2000-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2000-01-01T24:00:00Z",
            "2000-01-01T00:60:00Z",
            "2000-01-01T00:00:00.Z",
            "2000-01-01T00:00:00Zjunk",
            "2000-01-01T00:00:00+25:00",
            "2000-01-01X00:00:00Z",
            "２０００-01-01",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&Timestamp::new(946_684_800, 0).unwrap()).unwrap(),
            r#""2000-01-01T00:00:00Z""#
        );
        assert!(serde_json::from_str::<Timestamp>("946684800").is_err());
    }

    #[test]
    fn native_struct_in_both_protocols() {
        let v = Value::from_serialize(sample());
        let mut mp = Vec::new();
        v.write_msgpack(&mut mp).unwrap();
        // A map keyed by field name, with bin and ext −1 inside.
        assert_eq!(mp[0], 0x83);
        let mut expected_tail = vec![0xa7];
        expected_tail.extend_from_slice(b"takenAt");
        expected_tail.extend_from_slice(&[0xd6, 0xff, 0x38, 0x6d, 0x43, 0x80]);
        assert!(mp.ends_with(&expected_tail));
        assert!(mp.windows(5).any(|w| w == [0xc4, 3, 1, 2, 3]));
        let back: Upload = Value::MsgPack(Bytes::from(mp.clone())).decode().unwrap();
        assert_eq!(back, sample());

        let json = v.to_json_string().unwrap();
        assert_eq!(
            json,
            r#"{"fileName":"a.bin","data":"AQID","takenAt":"2000-01-01T00:00:00Z"}"#
        );
        let back: Upload = Value::Json(Bytes::from(json.clone())).decode().unwrap();
        assert_eq!(back, sample());
        let back: Upload = v.decode().unwrap();
        assert_eq!(back, sample());
        // The transcoder renders the MessagePack form exactly as the native JSON form.
        assert_eq!(
            Value::MsgPack(Bytes::from(mp)).to_json_string().unwrap(),
            json
        );
    }

    #[test]
    fn value_helpers() {
        assert!(Value::null().is_null());
        assert!(Value::MsgPack(Bytes::from_static(&[0xc0])).is_null());
        assert!(Value::json_checked(Bytes::from_static(b"[1,")).is_err());
        assert_eq!(
            Value::Json(Bytes::from_static(b" [1, 2] ")),
            Value::MsgPack(Bytes::from_static(&[0x92, 1, 2]))
        );
    }

    proptest! {
        #[test]
        fn timestamp_round_trips(seconds in any::<i64>(), nanos in 0u32..1_000_000_000) {
            let t = Timestamp::new(seconds, nanos).unwrap();
            let back: Timestamp = rmp_serde::from_slice(&msgpack_of(&t)).unwrap();
            prop_assert_eq!(back, t);
            prop_assert_eq!(Timestamp::from_msgpack_ext(&t.to_msgpack_ext()), Some(t));
            // ISO text covers ±999,999,999 years, i.e. |seconds| < ~3.1e16.
            if seconds.unsigned_abs() < 31_000_000_000_000_000 {
                prop_assert_eq!(Timestamp::parse_iso8601(&t.to_iso8601()), Some(t));
            }
        }

        #[test]
        fn iso_parser_never_panics(s in ".{0,40}") {
            let _ = Timestamp::parse_iso8601(&s);
        }
    }
}
