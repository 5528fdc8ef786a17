//! The message bodies of the REST API's sends. Pure: bytes in, target and arguments out.
//!
//! - **JSON** (`application/json`, and any other content type): an object with `target` (a
//!   non-empty string) and `arguments` (an array, `null` or absent). The names are matched
//!   without regard to case: the .NET SDK writes `Target` and `Arguments`. Each argument is
//!   kept as its raw JSON text (validated, nesting bounded as the hub protocol bounds it).
//! - **MessagePack** (`application/octet-stream`, sent by the SDK when the app configured
//!   its own hub protocols): a map of hub-protocol name to `bin`, each holding one complete,
//!   framed Invocation as it would go on the socket (the ASP.NET Redis backplane's
//!   serializations). The `json` entry is decoded if present, else `messagepack`; other
//!   protocols are ignored. The invocation is then sent like a JSON one, so clients of the
//!   other protocol get it transcoded (structurally: MessagePack property names stay as
//!   the publisher wrote them).

use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::protocol::json::{nesting_exceeds, MAX_DEPTH};
use crate::protocol::mp::{self, Reader};
use crate::protocol::{HubMessage, ProtocolKind, Value};

/// A decoded send.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// The client method.
    pub target: String,
    /// Its arguments.
    pub arguments: Vec<Value>,
}

/// Why a body is refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

fn bad(msg: impl Into<String>) -> PayloadError {
    PayloadError(msg.into())
}

/// Decodes a JSON body.
pub fn decode_json(body: &[u8]) -> Result<Payload, PayloadError> {
    // The object, `arguments`, then each argument: two levels above an argument's own.
    if nesting_exceeds(body, MAX_DEPTH + 2) {
        return Err(bad("The message nests too deeply."));
    }
    let fields: Vec<(String, &RawValue)> =
        serde_json::from_slice::<std::collections::BTreeMap<String, &RawValue>>(body)
            .map_err(|e| bad(format!("The body is not a JSON object: {e}")))?
            .into_iter()
            .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let target = match field("target").map(|t| serde_json::from_str::<String>(t.get())) {
        Some(Ok(t)) if !t.is_empty() => t,
        _ => return Err(bad("The message needs a 'target': a non-empty string.")),
    };
    let arguments = match field("arguments") {
        None => Vec::new(),
        Some(raw) if raw.get().trim() == "null" => Vec::new(),
        Some(raw) => serde_json::from_str::<Vec<&RawValue>>(raw.get())
            .map_err(|_| bad("'arguments' must be an array."))?
            .into_iter()
            .map(|a| Value::json_unchecked(Bytes::copy_from_slice(a.get().as_bytes())))
            .collect(),
    };
    Ok(Payload { target, arguments })
}

/// Decodes a MessagePack body (protocol name → framed invocation).
pub fn decode_binary(body: &[u8]) -> Result<Payload, PayloadError> {
    let mut r = Reader::new(body);
    let n = r
        .map_len("serializations")
        .map_err(|e| bad(format!("The body is not a MessagePack map: {}", e.0)))?;
    let mut json = None;
    let mut msgpack = None;
    for _ in 0..n {
        let name = r
            .str("protocol name")
            .map_err(|e| bad(format!("Bad protocol name: {}", e.0)))?;
        let frame = match r.item() {
            Ok(mp::Item::Bin(b)) => b,
            _ => return Err(bad(format!("The '{name}' entry is not bin."))),
        };
        match ProtocolKind::from_name(name) {
            Some(ProtocolKind::Json) if json.is_none() => json = Some(frame),
            Some(ProtocolKind::MessagePack) if msgpack.is_none() => msgpack = Some(frame),
            _ => {}
        }
    }
    if r.remaining() != 0 {
        return Err(bad("Trailing bytes after the serializations map."));
    }
    let (kind, frame) = match (json, msgpack) {
        (Some(f), _) => (ProtocolKind::Json, f),
        (None, Some(f)) => (ProtocolKind::MessagePack, f),
        (None, None) => {
            return Err(bad(
                "The body has neither a 'json' nor a 'messagepack' serialization.",
            ))
        }
    };
    let mut buf = BytesMut::from(frame);
    let msg = kind
        .decode(&mut buf, usize::MAX)
        .map_err(|e| bad(format!("The '{}' frame: {e}", kind.name())))?;
    match msg {
        Some(HubMessage::Invocation(inv)) if buf.is_empty() && inv.stream_ids.is_empty() => {
            Ok(Payload {
                target: inv.target,
                arguments: inv.arguments,
            })
        }
        _ => Err(bad(format!(
            "The '{}' entry must hold exactly one framed Invocation.",
            kind.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_json(p: &Payload) -> Vec<String> {
        p.arguments
            .iter()
            .map(|a| a.to_json_string().unwrap())
            .collect()
    }

    #[test]
    fn json_bodies() {
        let p = decode_json(br#"{"Target":"Msg","Arguments":["a",{"b":[1,2]},null]}"#).unwrap();
        assert_eq!(p.target, "Msg");
        assert_eq!(args_json(&p), [r#""a""#, r#"{"b":[1,2]}"#, "null"]);
        let p = decode_json(br#"{"target":"Ping"}"#).unwrap();
        assert!(p.arguments.is_empty());
        let p = decode_json(br#"{"target":"Ping","arguments":null}"#).unwrap();
        assert!(p.arguments.is_empty());
        for bad_body in [
            &b"not json"[..],
            br#"[1]"#,
            br#"{"arguments":[]}"#,
            br#"{"target":""}"#,
            br#"{"target":3}"#,
            br#"{"target":"x","arguments":{}}"#,
        ] {
            assert!(
                decode_json(bad_body).is_err(),
                "{}",
                String::from_utf8_lossy(bad_body)
            );
        }
        let deep = format!(
            r#"{{"target":"x","arguments":[{}1{}]}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(decode_json(deep.as_bytes()).is_err());
    }

    /// aspnet-interop.md C.2's serializations map (both protocols).
    fn c2_serializations() -> Vec<u8> {
        let json = br#"{"type":1,"target":"FeedUpdated","arguments":[{"text":"hi"}]}"#;
        let mut out = vec![0x82, 0xA4];
        out.extend_from_slice(b"json");
        out.push(0xC4);
        out.push((json.len() + 1) as u8);
        out.extend_from_slice(json);
        out.push(0x1E);
        out.push(0xAB);
        out.extend_from_slice(b"messagepack");
        let frame: &[u8] = &[
            0x1B, 0x96, 0x01, 0x80, 0xC0, 0xAB, b'F', b'e', b'e', b'd', b'U', b'p', b'd', b'a',
            b't', b'e', b'd', 0x91, 0x81, 0xA4, b't', b'e', b'x', b't', 0xA2, b'h', b'i', 0x90,
        ];
        out.push(0xC4);
        out.push(frame.len() as u8);
        out.extend_from_slice(frame);
        out
    }

    #[test]
    fn binary_bodies() {
        let body = c2_serializations();
        let p = decode_binary(&body).unwrap();
        assert_eq!(p.target, "FeedUpdated");
        assert_eq!(args_json(&p), [r#"{"text":"hi"}"#]);
        assert!(
            matches!(p.arguments[0], Value::Json(_)),
            "json entry preferred"
        );
        // messagepack only: the args stay MessagePack.
        let mp_only = {
            let mut b = vec![0x81];
            let pos = body.windows(11).position(|w| w == b"messagepack").unwrap() - 1;
            b.extend_from_slice(&body[pos..]);
            b
        };
        let p = decode_binary(&mp_only).unwrap();
        assert_eq!(p.target, "FeedUpdated");
        assert!(matches!(p.arguments[0], Value::MsgPack(_)));
        assert_eq!(args_json(&p), [r#"{"text":"hi"}"#]);
        for bad_body in [
            &[0x80][..],                                                   // no protocol
            &[0x91, 0x01],                                                 // not a map
            &[0x81, 0xA4, b'j', b's', b'o', b'n', 0x01],                   // not bin
            &[0x81, 0xA4, b'j', b's', b'o', b'n', 0xC4, 0x02, b'{', 0x1E], // bad frame
        ] {
            assert!(decode_binary(bad_body).is_err(), "{bad_body:02x?}");
        }
        let mut trailing = body.clone();
        trailing.push(0);
        assert!(decode_binary(&trailing).is_err());
    }
}
