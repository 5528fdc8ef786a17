//! JSON ⇄ MessagePack transcoding of single values. Pure.
//!
//! Used by [`super::Value::write_json`] / [`super::Value::write_msgpack`] when a value that
//! arrived in one protocol goes to a recipient of the other one (a broadcast from a JSON
//! client to MessagePack clients, or the reverse), and by nothing else. The mapping follows
//! what ASP.NET puts on the wire for the same .NET value:
//!
//! | MessagePack             | JSON                                                       |
//! |-------------------------|------------------------------------------------------------|
//! | `bin`                   | standard base64 string with padding (`byte[]`)             |
//! | timestamp (ext −1)      | ISO-8601 UTC string, `2000-01-01T00:00:00Z` (`DateTime`)   |
//! | other ext               | base64 string of the ext data                              |
//! | float NaN / ±inf        | `null` (JSON has no such numbers)                          |
//! | map with non-str keys   | object whose keys are the keys' JSON text as strings       |
//! | str with invalid UTF-8  | error                                                      |
//!
//! JSON → MessagePack writes integers in the smallest format, other numbers as float64,
//! strings as `str`, arrays and objects as arrays and maps.
//!
//! Both directions are bounded: nesting deeper than [`MAX_DEPTH`] is an error, and on any
//! error `out` is left as it was.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{self, Deserializer as _, MapAccess, SeqAccess, Visitor};

use super::mp::{self, Item, MpError, Reader};
use super::value::{Timestamp, TIMESTAMP_EXT_TYPE};
use super::ValueError;

/// Deepest nesting of arrays and maps accepted: 128, the ingest limit (issue 14), in both
/// directions, so that what one direction writes the other accepts. serde_json's own
/// recursion limit (127 levels) is disabled where this bound applies instead.
pub const MAX_DEPTH: usize = 128;

/// Appends the JSON rendering of one MessagePack value (bin → base64, timestamp → ISO-8601).
///
/// `input` must hold exactly one value; trailing bytes are an error.
pub fn msgpack_to_json(input: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let start = out.len();
    let mut reader = Reader::new(input);
    let result = write_json_value(&mut reader, out, 0, false).and_then(|()| {
        if reader.remaining() == 0 {
            Ok(())
        } else {
            Err(MpError::new("trailing bytes after the value"))
        }
    });
    result.map_err(|e| {
        out.truncate(start);
        ValueError::Decode(format!("Invalid MessagePack value: {}", e.0))
    })
}

fn json_scalar<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Result<(), MpError> {
    // Writing to a Vec cannot fail; serde_json escapes strings and formats numbers.
    serde_json::to_writer(out, v).map_err(|e| MpError::new(e.to_string()))
}

fn utf8(bytes: &[u8]) -> Result<&str, MpError> {
    std::str::from_utf8(bytes).map_err(|_| MpError::new("invalid UTF-8 in str"))
}

/// `in_key`: the value is (part of) a map key, rendered as text and then escaped into a
/// JSON string; keys of maps inside it must then be strings (see [`write_json_key`]).
fn write_json_value(
    r: &mut Reader<'_>,
    out: &mut Vec<u8>,
    depth: usize,
    in_key: bool,
) -> Result<(), MpError> {
    match r.item()? {
        Item::Nil => out.extend_from_slice(b"null"),
        Item::Bool(true) => out.extend_from_slice(b"true"),
        Item::Bool(false) => out.extend_from_slice(b"false"),
        Item::Uint(n) => json_scalar(out, &n)?,
        Item::Int(n) => json_scalar(out, &n)?,
        Item::F32(f) if f.is_finite() => json_scalar(out, &f)?,
        Item::F64(f) if f.is_finite() => json_scalar(out, &f)?,
        Item::F32(_) | Item::F64(_) => out.extend_from_slice(b"null"),
        Item::Str(s) => json_scalar(out, utf8(s)?)?,
        Item::Bin(b) => write_base64(out, b),
        Item::Ext(TIMESTAMP_EXT_TYPE, data) => {
            let ts = Timestamp::from_msgpack_ext(data)
                .ok_or_else(|| MpError::new("invalid timestamp extension"))?;
            out.push(b'"');
            out.extend_from_slice(ts.to_iso8601().as_bytes());
            out.push(b'"');
        }
        Item::Ext(_, data) => write_base64(out, data),
        Item::Array(n) => {
            let depth = enter(depth)?;
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_json_value(r, out, depth, in_key)?;
            }
            out.push(b']');
        }
        Item::Map(n) => {
            let depth = enter(depth)?;
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                write_json_key(r, out, depth, in_key)?;
                out.push(b':');
                write_json_value(r, out, depth, in_key)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn enter(depth: usize) -> Result<usize, MpError> {
    if depth >= MAX_DEPTH {
        return Err(MpError::new(format!("nesting deeper than {MAX_DEPTH}")));
    }
    Ok(depth + 1)
}

/// JSON object keys must be strings: a `str` key is written as is, anything else as its
/// JSON text in a string (`1` → `"1"`, `null` → `"null"`; bin and timestamps are already
/// strings).
///
/// Inside such a key (`in_key`), a map's keys must be strings: each level of non-string
/// keys would escape the text of the level inside it once more, doubling its backslashes,
/// so a few hundred bytes of nested maps-as-keys would render as gigabytes (found by the
/// `transcode` and `msgpack` fuzz targets: a peer-controlled out-of-memory).
fn write_json_key(
    r: &mut Reader<'_>,
    out: &mut Vec<u8>,
    depth: usize,
    in_key: bool,
) -> Result<(), MpError> {
    let key_start = out.len();
    write_json_value(r, out, depth, true)?;
    if out.get(key_start) == Some(&b'"') {
        return Ok(());
    }
    if in_key {
        return Err(MpError::new(
            "a map key inside a non-string map key must be a string",
        ));
    }
    let text = out.split_off(key_start);
    // `text` is JSON we just wrote, hence UTF-8.
    json_scalar(out, utf8(&text)?)
}

fn write_base64(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'"');
    let len = out.len();
    out.resize(len + base64::encoded_len(data.len(), true).unwrap_or(0), 0);
    let written = out
        .get_mut(len..)
        .and_then(|dst| BASE64.encode_slice(data, dst).ok())
        .unwrap_or(0);
    out.truncate(len + written);
    out.push(b'"');
}

/// Appends the MessagePack rendering of one JSON value.
///
/// `input` must hold exactly one JSON value (whitespace around it is fine).
pub fn json_to_msgpack(input: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    let start = out.len();
    let mut de = serde_json::Deserializer::from_slice(input);
    // serde_json's own limit stops at 127 levels; the writer bounds nesting at MAX_DEPTH
    // (128) instead, the same bound as everywhere else (ingest, the JSON decoder).
    de.disable_recursion_limit();
    let result = de
        .deserialize_any(MsgPackWriter {
            out: &mut *out,
            depth: 0,
        })
        .and_then(|()| de.end());
    result.map_err(|e| {
        out.truncate(start);
        ValueError::Decode(format!("Invalid JSON value: {e}"))
    })
}

/// A serde visitor that writes each visited JSON value straight into MessagePack.
/// It bounds the recursion: arrays and objects nested deeper than [`MAX_DEPTH`] are an
/// error (serde_json's limit is off, see [`json_to_msgpack`]).
struct MsgPackWriter<'o> {
    out: &'o mut Vec<u8>,
    /// Arrays and objects around the value being written.
    depth: usize,
}

impl MsgPackWriter<'_> {
    /// The depth of a container visited now, or an error past [`MAX_DEPTH`].
    fn enter<E: de::Error>(&self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!("nesting deeper than {MAX_DEPTH}")));
        }
        Ok(self.depth + 1)
    }
}

impl<'de> de::DeserializeSeed<'de> for MsgPackWriter<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// Rewrites the 1-byte container header at `pos` once the element count is known; counts
/// of 16 and more need a longer header, inserted in place.
fn patch_header(out: &mut Vec<u8>, pos: usize, count: usize, is_map: bool) {
    let mut header = Vec::with_capacity(5);
    if is_map {
        mp::write_map_len(&mut header, count);
    } else {
        mp::write_array_len(&mut header, count);
    }
    let end = (pos + 1).min(out.len());
    out.splice(pos.min(end)..end, header);
}

impl<'de> Visitor<'de> for MsgPackWriter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        mp::write_bool(self.out, v);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        mp::write_int(self.out, v);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        mp::write_uint(self.out, v);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        mp::write_f64(self.out, v);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        mp::write_str(self.out, v);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        mp::write_nil(self.out);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.enter()?;
        let pos = self.out.len();
        self.out.push(0x90);
        let mut count = 0usize;
        while seq
            .next_element_seed(MsgPackWriter {
                out: &mut *self.out,
                depth,
            })?
            .is_some()
        {
            count += 1;
        }
        patch_header(self.out, pos, count, false);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.enter()?;
        let pos = self.out.len();
        self.out.push(0x80);
        let mut count = 0usize;
        while map
            .next_key_seed(MsgPackWriter {
                out: &mut *self.out,
                depth,
            })?
            .is_some()
        {
            map.next_value_seed(MsgPackWriter {
                out: &mut *self.out,
                depth,
            })?;
            count += 1;
        }
        patch_header(self.out, pos, count, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::json_value;
    use proptest::prelude::*;

    fn to_json(mp: &[u8]) -> String {
        let mut out = Vec::new();
        msgpack_to_json(mp, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn to_mp(json: &str) -> Vec<u8> {
        let mut out = Vec::new();
        json_to_msgpack(json.as_bytes(), &mut out).unwrap();
        out
    }

    #[test]
    fn scalars_to_json() {
        assert_eq!(to_json(&[0xc0]), "null");
        assert_eq!(to_json(&[0xc3]), "true");
        assert_eq!(to_json(&[0x2a]), "42");
        assert_eq!(to_json(&[0xff]), "-1");
        assert_eq!(
            to_json(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            i64::MIN.to_string()
        );
        assert_eq!(
            to_json(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            u64::MAX.to_string()
        );
        assert_eq!(to_json(&[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]), "1.5");
        assert_eq!(to_json(&[0xca, 0x3f, 0xc0, 0, 0]), "1.5");
        assert_eq!(to_json(&[0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]), "null"); // NaN
        assert_eq!(to_json(&[0xcb, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0]), "null"); // +inf
        assert_eq!(to_json(&[0xca, 0xff, 0x80, 0, 0]), "null"); // -inf
        assert_eq!(to_json(&[0xa3, b'a', b'"', b'\n']), r#""a\"\n""#);
    }

    #[test]
    fn bin_is_base64() {
        assert_eq!(to_json(&[0xc4, 3, 1, 2, 3]), r#""AQID""#);
        assert_eq!(to_json(&[0xc4, 0]), r#""""#);
        assert_eq!(to_json(&[0xc4, 1, 0xff]), r#""/w==""#);
    }

    #[test]
    fn timestamps_are_iso() {
        // 2000-01-01T00:00:00Z = 946684800 = 0x386D4380 (timestamp32).
        assert_eq!(
            to_json(&[0xd6, 0xff, 0x38, 0x6d, 0x43, 0x80]),
            r#""2000-01-01T00:00:00Z""#
        );
        // JS client: new Date(Date.UTC(2024,0,1)) → d6 ff 65 92 00 80.
        assert_eq!(
            to_json(&[0xd6, 0xff, 0x65, 0x92, 0x00, 0x80]),
            r#""2024-01-01T00:00:00Z""#
        );
        // timestamp64 with 500 ms.
        let v: u64 = (500_000_000u64 << 34) | 946_684_800;
        let mut mp = vec![0xd7, 0xff];
        mp.extend_from_slice(&v.to_be_bytes());
        assert_eq!(to_json(&mp), r#""2000-01-01T00:00:00.5Z""#);
        // timestamp96, before the epoch.
        let mut mp = vec![0xc7, 12, 0xff];
        mp.extend_from_slice(&1u32.to_be_bytes());
        mp.extend_from_slice(&(-1i64).to_be_bytes());
        assert_eq!(to_json(&mp), r#""1969-12-31T23:59:59.000000001Z""#);
        // Invalid nanos.
        let mut mp = vec![0xc7, 12, 0xff];
        mp.extend_from_slice(&1_000_000_000u32.to_be_bytes());
        mp.extend_from_slice(&0i64.to_be_bytes());
        assert!(msgpack_to_json(&mp, &mut Vec::new()).is_err());
        // Other ext types: base64 of the data.
        assert_eq!(to_json(&[0xd4, 0x05, 0x01]), r#""AQ==""#);
    }

    #[test]
    fn containers_and_keys() {
        // {"a": [1, nil], 1: true, nil: 2, bin: 3}
        let mp = [
            0x84, 0xa1, b'a', 0x92, 0x01, 0xc0, 0x01, 0xc3, 0xc0, 0x02, 0xc4, 0x01, 0x01, 0x03,
        ];
        assert_eq!(to_json(&mp), r#"{"a":[1,null],"1":true,"null":2,"AQ==":3}"#);
        // A map key that is itself an array.
        assert_eq!(
            to_json(&[0x81, 0x92, 0x01, 0xa1, b'x', 0xc0]),
            r#"{"[1,\"x\"]":null}"#
        );
    }

    #[test]
    fn nested_non_string_keys_are_refused_not_escaped_again_and_again() {
        // Regression (fuzz targets `transcode`, `msgpack`): {{{…nil: nil}: nil}: nil}, maps
        // as keys 40 levels deep, 82 bytes. Each level escaped the level inside it once
        // more, so the JSON doubled per level (2^40 bytes here): an out-of-memory from one
        // small argument sent to a JSON recipient.
        let levels = 40;
        let mut mp = vec![0x81; levels];
        mp.extend(std::iter::repeat_n(0xc0, levels + 1));
        let mut out = Vec::new();
        let err = msgpack_to_json(&mp, &mut out).unwrap_err();
        assert!(err.to_string().contains("map key inside"), "{err}");
        assert!(out.is_empty());
        // One level of non-string keys is still rendered (escaped once).
        assert_eq!(
            to_json(&[0x81, 0x81, 0xa1, b'a', 0x01, 0xc0]),
            r#"{"{\"a\":1}":null}"#
        );
        assert_eq!(
            to_json(&[0x81, 0x91, 0x81, 0xa1, b'k', 0xc0, 0x02]),
            r#"{"[{\"k\":null}]":2}"#
        );
        // An array key holding a map with a non-string key: refused as well.
        assert!(msgpack_to_json(&[0x81, 0x91, 0x81, 0x01, 0xc0, 0x02], &mut out).is_err());
    }

    #[test]
    fn the_deepest_value_transcodes_both_ways() {
        // Regression (fuzz target `transcode`): the deepest value one direction writes, the
        // other reads back (128 levels, the ingest limit; serde_json's default stops at 127,
        // so every parse on this path disables it and bounds nesting at MAX_DEPTH itself).
        let mut deep = vec![0x91; MAX_DEPTH];
        deep.push(0xc0);
        let json = to_json(&deep);
        assert_eq!(to_mp(&json), deep);
        let mut de = serde_json::Deserializer::from_str(&json);
        de.disable_recursion_limit();
        assert!(serde::Deserialize::deserialize(&mut de)
            .map(|_: serde_json::Value| ())
            .is_ok());
        let mut deeper = vec![0x91; MAX_DEPTH + 1];
        deeper.push(0xc0);
        assert!(msgpack_to_json(&deeper, &mut Vec::new()).is_err());
        let json = format!(
            "{}null{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(json_to_msgpack(json.as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn msgpack_errors_leave_out_untouched() {
        let mut out = b"keep".to_vec();
        for bad in [
            &[0xa2, 0xff, 0xfe][..], // invalid UTF-8
            &[0x92, 0x01][..],       // truncated
            &[0xc1][..],             // reserved
            &[0x01, 0x02][..],       // trailing bytes
            &[][..],                 // empty
        ] {
            assert!(msgpack_to_json(bad, &mut out).is_err(), "{bad:?}");
            assert_eq!(out, b"keep");
        }
        let mut deep = vec![0x91; MAX_DEPTH + 1];
        deep.push(0xc0);
        assert!(msgpack_to_json(&deep, &mut out).is_err());
        let mut ok = vec![0x91; MAX_DEPTH];
        ok.push(0xc0);
        assert!(msgpack_to_json(&ok, &mut Vec::new()).is_ok());
    }

    #[test]
    fn json_nesting_is_bounded_at_max_depth_in_both_shapes() {
        let arrays = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        let objects = |d: usize| format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d));
        for (ok, deep) in [
            (arrays(MAX_DEPTH), arrays(MAX_DEPTH + 1)),
            (objects(MAX_DEPTH), objects(MAX_DEPTH + 1)),
        ] {
            let mut out = b"keep".to_vec();
            assert!(json_to_msgpack(deep.as_bytes(), &mut out).is_err());
            assert_eq!(out, b"keep");
            json_to_msgpack(ok.as_bytes(), &mut out).unwrap();
        }
        // Far deeper input fails cleanly (no stack overflow).
        assert!(json_to_msgpack(arrays(100_000).as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn json_to_msgpack_formats() {
        assert_eq!(to_mp("null"), [0xc0]);
        assert_eq!(to_mp(" true "), [0xc3]);
        assert_eq!(to_mp("42"), [0x2a]);
        assert_eq!(to_mp("200"), [0xcc, 200]);
        assert_eq!(to_mp("-1"), [0xff]);
        assert_eq!(to_mp("-200"), [0xd1, 0xff, 0x38]);
        assert_eq!(to_mp("1.5"), [0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(to_mp(r#""hi""#), [0xa2, b'h', b'i']);
        assert_eq!(to_mp(r#""\u00e9""#), [0xa2, 0xc3, 0xa9]);
        assert_eq!(to_mp("[40,2]"), [0x92, 0x28, 0x02]);
        assert_eq!(to_mp(r#"{"a":1}"#), [0x81, 0xa1, b'a', 0x01]);
        assert_eq!(to_mp("[]"), [0x90]);
        assert_eq!(to_mp("{}"), [0x80]);
        let big: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        let mp = to_mp(&format!("[{}]", big.join(",")));
        assert_eq!(&mp[..3], &[0xdc, 0x00, 20]);
        assert_eq!(mp.len(), 3 + 20);
        // Nested containers with long headers patch correctly.
        let inner = format!("[{}]", big.join(","));
        let outer = format!("[{inner},{{\"k\":{inner}}},1]");
        let mp = to_mp(&outer);
        assert_eq!(to_json(&mp), outer);
    }

    #[test]
    fn json_errors_leave_out_untouched() {
        let mut out = b"keep".to_vec();
        for bad in ["", "[1,", "{\"a\"}", "1 2", "nul", "[1]]"] {
            assert!(json_to_msgpack(bad.as_bytes(), &mut out).is_err(), "{bad}");
            assert_eq!(out, b"keep");
        }
    }

    proptest! {
        #[test]
        fn json_msgpack_json_round_trip(v in json_value()) {
            let text = serde_json::to_string(&v).unwrap();
            let mp = to_mp(&text);
            let back: serde_json::Value = serde_json::from_str(&to_json(&mp)).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn msgpack_to_json_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            if msgpack_to_json(&data, &mut out).is_ok() {
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
            } else {
                prop_assert!(out.is_empty());
            }
        }
    }
}
