//! The SignalR handshake: always JSON, 0x1E-terminated, whatever hub protocol follows. Pure.
//!
//! The session feeds the first inbound bytes of a connection to [`parse_request`] (they
//! arrive as text even on MessagePack connections) and answers with [`OK_RESPONSE`] or
//! [`error_response`]. Bytes after the handshake's 0x1E stay in the buffer: they are the
//! first hub messages. [`write_request`] and [`parse_response`] are the client side, for
//! tests and tools.
//!
//! Parsing follows ASP.NET's `HandshakeProtocol`: properties in any order, unknown ones
//! ignored, `protocol` (string) and `version` (integer) required.

use bytes::BytesMut;
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{framing, ProtocolError, DEFAULT_MAX_MESSAGE_SIZE, RECORD_SEPARATOR};

/// The exact success response, `{}` + 0x1E.
pub const OK_RESPONSE: &[u8] = b"{}\x1e";

/// `{"protocol":"…","version":N}` from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRequest {
    /// Protocol name as sent (matched case-insensitively by the caller).
    pub protocol: String,
    /// Protocol version as sent.
    pub version: u32,
}

/// `{}` or `{"error":"…"}` from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The server's error, if the handshake failed.
    pub error: Option<String>,
}

/// Why a handshake could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// More than the size limit arrived without a complete handshake.
    #[error("handshake exceeds the maximum message size of {limit}B")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Not a JSON object with the required fields.
    #[error("{0}")]
    Malformed(String),
}

fn malformed(msg: &str) -> HandshakeError {
    HandshakeError::Malformed(msg.to_owned())
}

/// Takes the next 0x1E record off `buf`, mapping framing errors to handshake errors.
fn split(buf: &mut BytesMut, max_size: usize) -> Result<Option<bytes::Bytes>, HandshakeError> {
    framing::split_text(buf, max_size).map_err(|e| match e {
        ProtocolError::TooLarge { limit } => HandshakeError::TooLarge { limit },
        other => HandshakeError::Malformed(other.to_string()),
    })
}

/// The top-level properties of a handshake object, kept raw until checked.
#[derive(Default)]
struct Fields<'a> {
    protocol: Option<&'a RawValue>,
    version: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
    has_type: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'a>, M::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let raw = map.next_value::<&'a RawValue>()?;
                    match key.as_ref() {
                        "protocol" => fields.protocol = Some(raw),
                        "version" => fields.version = Some(raw),
                        "error" => fields.error = Some(raw),
                        "type" => fields.has_type = true,
                        _ => {}
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

fn parse_fields(record: &[u8]) -> Result<Fields<'_>, HandshakeError> {
    let text = std::str::from_utf8(record).map_err(|_| malformed("Invalid UTF-8 in handshake."))?;
    serde_json::from_str::<Fields<'_>>(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            malformed("Unexpected JSON Token Type. Expected a JSON Object.")
        }
        _ => HandshakeError::Malformed(format!("Invalid JSON in handshake: {e}")),
    })
}

/// Parses the client's handshake request off the front of `buf`. `Ok(None)`: incomplete.
/// Bytes after the 0x1E stay in `buf` (they are hub messages).
///
/// [`HandshakeError::TooLarge`] as soon as more than `max_size` bytes are buffered without
/// a 0x1E. On [`HandshakeError::Malformed`] the bad record has been consumed; the caller
/// answers with [`error_response`] and closes.
pub fn parse_request(
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<HandshakeRequest>, HandshakeError> {
    let Some(record) = split(buf, max_size)? else {
        return Ok(None);
    };
    let fields = parse_fields(&record)?;
    let protocol = fields
        .protocol
        .ok_or_else(|| malformed("Missing required property 'protocol'."))?;
    let protocol = serde_json::from_str::<String>(protocol.get())
        .map_err(|_| malformed("Expected 'protocol' to be of type String."))?;
    let version = fields
        .version
        .ok_or_else(|| malformed("Missing required property 'version'."))?;
    let version = serde_json::from_str::<u32>(version.get())
        .map_err(|_| malformed("Expected 'version' to be of type Integer."))?;
    Ok(Some(HandshakeRequest { protocol, version }))
}

/// Appends a handshake request (what a client sends).
pub fn write_request(protocol: &str, version: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"protocol\":");
    write_ascii_json_str(protocol, out);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(version.to_string().as_bytes());
    out.push(b'}');
    out.push(RECORD_SEPARATOR);
}

/// The error response `{"error":"…"}` + 0x1E.
///
/// Non-ASCII characters are written as `\uXXXX` escapes: the JS client reads the handshake
/// response of a binary connection one byte per character, so raw UTF-8 would arrive
/// garbled, while escapes decode correctly in both modes.
pub fn error_response(error: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(error.len() + 13);
    out.extend_from_slice(b"{\"error\":");
    write_ascii_json_str(error, &mut out);
    out.push(b'}');
    out.push(RECORD_SEPARATOR);
    out
}

/// A JSON string literal in pure ASCII: `"`, `\` and control characters escaped, every
/// non-ASCII character as `\uXXXX` (UTF-16 surrogate pairs above the BMP).
fn write_ascii_json_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

/// Parses the server's handshake response off the front of `buf` (client side).
///
/// `Ok(None)`: incomplete (the JS client itself would fail here, as it needs the whole
/// response in the first chunk). Buffering is bounded by [`DEFAULT_MAX_MESSAGE_SIZE`].
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<HandshakeResponse>, HandshakeError> {
    let Some(record) = split(buf, DEFAULT_MAX_MESSAGE_SIZE)? else {
        return Ok(None);
    };
    let fields = parse_fields(&record)?;
    if fields.has_type {
        return Err(malformed("Expected a handshake response from the server."));
    }
    let error = match fields.error {
        None => None,
        Some(raw) => serde_json::from_str::<Option<String>>(raw.get())
            .map_err(|_| malformed("Expected 'error' to be of type String."))?,
    };
    Ok(Some(HandshakeResponse { error }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HubMessage, ProtocolKind};
    use proptest::prelude::*;

    fn req(input: &[u8]) -> Result<Option<HandshakeRequest>, HandshakeError> {
        parse_request(&mut BytesMut::from(input), DEFAULT_MAX_MESSAGE_SIZE)
    }

    fn malformed_text(input: &[u8]) -> String {
        match req(input) {
            Err(HandshakeError::Malformed(m)) => m,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn observed_requests() {
        assert_eq!(
            req(b"{\"protocol\":\"json\",\"version\":1}\x1e").unwrap(),
            Some(HandshakeRequest {
                protocol: "json".into(),
                version: 1
            })
        );
        assert_eq!(
            req(b"{\"protocol\":\"messagepack\",\"version\":1}\x1e")
                .unwrap()
                .unwrap()
                .protocol,
            "messagepack"
        );
        // Any order, unknown properties, whitespace.
        assert_eq!(
            req(b" {\"x\":[1,{}], \"version\" : 2, \"protocol\":\"MessagePack\"}\x1e").unwrap(),
            Some(HandshakeRequest {
                protocol: "MessagePack".into(),
                version: 2
            })
        );
    }

    #[test]
    fn trailing_hub_messages_stay_in_buffer() {
        let mut buf =
            BytesMut::from(&b"{\"protocol\":\"json\",\"version\":1}\x1e{\"type\":6}\x1e"[..]);
        let r = parse_request(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(r.protocol, "json");
        assert_eq!(&buf[..], b"{\"type\":6}\x1e");
        assert_eq!(
            ProtocolKind::Json.decode(&mut buf, 1024).unwrap(),
            Some(HubMessage::Ping)
        );

        let mut buf =
            BytesMut::from(&b"{\"protocol\":\"messagepack\",\"version\":1}\x1e\x02\x91\x06"[..]);
        parse_request(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(&buf[..], &[0x02, 0x91, 0x06]);
        assert_eq!(
            ProtocolKind::MessagePack.decode(&mut buf, 1024).unwrap(),
            Some(HubMessage::Ping)
        );
    }

    #[test]
    fn incomplete_and_too_large() {
        let full = b"{\"protocol\":\"json\",\"version\":1}\x1e";
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(parse_request(&mut buf, 1024).unwrap().is_none());
            assert_eq!(&buf[..], &full[..cut]);
        }
        let mut buf = BytesMut::from(&full[..]);
        assert!(matches!(
            parse_request(&mut buf, 10),
            Err(HandshakeError::TooLarge { limit: 10 })
        ));
        let mut buf = BytesMut::from(&b"{\"protocol\":\"json\""[..]);
        assert!(matches!(
            parse_request(&mut buf, 10),
            Err(HandshakeError::TooLarge { limit: 10 })
        ));
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(
            malformed_text(b"{\"version\":1}\x1e"),
            "Missing required property 'protocol'."
        );
        assert_eq!(
            malformed_text(b"{\"protocol\":\"json\"}\x1e"),
            "Missing required property 'version'."
        );
        assert_eq!(
            malformed_text(b"{\"protocol\":\"json\",\"version\":\"1\"}\x1e"),
            "Expected 'version' to be of type Integer."
        );
        assert_eq!(
            malformed_text(b"{\"protocol\":\"json\",\"version\":1.5}\x1e"),
            "Expected 'version' to be of type Integer."
        );
        assert_eq!(
            malformed_text(b"{\"protocol\":\"json\",\"version\":-1}\x1e"),
            "Expected 'version' to be of type Integer."
        );
        assert_eq!(
            malformed_text(b"{\"protocol\":1,\"version\":1}\x1e"),
            "Expected 'protocol' to be of type String."
        );
        assert!(malformed_text(b"[1]\x1e").contains("Expected a JSON Object"));
        assert!(malformed_text(b"{\"protocol\":\x1e").contains("Invalid JSON"));
        assert!(malformed_text(b"\xff\x1e").contains("UTF-8"));
        assert!(malformed_text(b"\x1e").contains("Invalid JSON"));
    }

    #[test]
    fn writes_requests_and_responses() {
        let mut out = Vec::new();
        write_request("json", 1, &mut out);
        assert_eq!(out, b"{\"protocol\":\"json\",\"version\":1}\x1e");
        assert_eq!(out.len(), 32, "the JS client's handshake is 32 bytes");
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(
            parse_request(&mut buf, 1024).unwrap().unwrap(),
            HandshakeRequest {
                protocol: "json".into(),
                version: 1
            }
        );

        assert_eq!(
            error_response("The protocol 'foo' is not supported."),
            b"{\"error\":\"The protocol 'foo' is not supported.\"}\x1e"
        );
        let tricky = "quote\" back\\ nl\n tab\t bell\x07 é 😀";
        let resp = error_response(tricky);
        assert!(
            resp.is_ascii(),
            "binary clients read the response byte by byte"
        );
        assert_eq!(
            resp,
            b"{\"error\":\"quote\\\" back\\\\ nl\\n tab\\t bell\\u0007 \\u00e9 \\ud83d\\ude00\"}\x1e"
        );
        let parsed = parse_response(&mut BytesMut::from(&resp[..]))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.error.as_deref(), Some(tricky));
    }

    #[test]
    fn responses() {
        let mut buf = BytesMut::from(&b"{}\x1e{\"type\":6}\x1e"[..]);
        assert_eq!(
            parse_response(&mut buf).unwrap(),
            Some(HandshakeResponse { error: None })
        );
        assert_eq!(&buf[..], b"{\"type\":6}\x1e");
        assert_eq!(
            parse_response(&mut BytesMut::from(OK_RESPONSE)).unwrap(),
            Some(HandshakeResponse { error: None })
        );
        assert_eq!(
            parse_response(&mut BytesMut::from(
                &b"{\"error\":\"nope\",\"x\":1}\x1e"[..]
            ))
            .unwrap(),
            Some(HandshakeResponse {
                error: Some("nope".into())
            })
        );
        assert_eq!(
            parse_response(&mut BytesMut::from(&b"{}"[..])).unwrap(),
            None
        );
        match parse_response(&mut BytesMut::from(&b"{\"type\":6}\x1e"[..])) {
            Err(HandshakeError::Malformed(m)) => {
                assert_eq!(m, "Expected a handshake response from the server.")
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_response(&mut BytesMut::from(&b"{\"error\":5}\x1e"[..])).is_err());
    }

    proptest! {
        #[test]
        fn request_round_trip(protocol in ".{0,20}", version in any::<u32>()) {
            let mut out = Vec::new();
            write_request(&protocol, version, &mut out);
            out.extend_from_slice(b"rest");
            let mut buf = BytesMut::from(&out[..]);
            let parsed = parse_request(&mut buf, usize::MAX).unwrap().unwrap();
            prop_assert_eq!(parsed, HandshakeRequest { protocol, version });
            prop_assert_eq!(&buf[..], b"rest");
        }

        #[test]
        fn error_response_round_trip(error in ".{0,40}") {
            let resp = error_response(&error);
            prop_assert!(resp.is_ascii());
            let parsed = parse_response(&mut BytesMut::from(&resp[..])).unwrap().unwrap();
            prop_assert_eq!(parsed.error, Some(error));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_request(&mut BytesMut::from(&data[..]), 64);
            let _ = parse_response(&mut BytesMut::from(&data[..]));
        }
    }
}
