//! The msgpack hub protocol. Pure.
//!
//! Each message is a VarInt length prefix (see [`super::framing::split_binary`]) and a
//! MessagePack array whose first element is the message type. Inbound bytes come from the
//! session's receive buffer; encoded bytes go to the connection's outbound queue (usually
//! through [`super::PreparedMessage`]).
//!
//! Decoding accepts what the JS client and ASP.NET send: Invocation and StreamInvocation
//! with 5 or 6 elements, Close with 2 or 3, integers of any width, `nil` or `str`
//! invocation ids. Extra trailing array elements are ignored (forward compatibility) and
//! unknown message types are skipped. Arguments, stream items and results are not decoded:
//! each is the byte range of exactly one MessagePack value, sliced out of the frozen message
//! [`Bytes`] without copying ([`Value::MsgPack`]). Every read is bounds-checked; malformed
//! input is a [`ProtocolError`], never a panic.
//!
//! Encoding writes ASP.NET's layout: Invocation always with 6 elements, headers as a map
//! (empty `0x80`), `nil` for a missing invocation id, Completion kinds 1/2/3, Close always
//! with 3 elements, integers in their most compact format.

use bytes::{Bytes, BytesMut};

use super::framing::{self, MAX_VARINT_LENGTH};
use super::message::message_type as mt;
use super::mp::{self, Item, MpError, Reader};
use super::{
    Ack, CancelInvocation, Close, Completion, CompletionResult, Headers, HubMessage, Invocation,
    ProtocolError, Sequence, StreamItem, Value,
};

/// Completion result kinds.
pub mod result_kind {
    /// The fifth element is an error text.
    pub const ERROR: u64 = 1;
    /// No fifth element.
    pub const VOID: u64 = 2;
    /// The fifth element is the result (`nil` allowed).
    pub const NON_VOID: u64 = 3;
}

/// Decodes the next message; see [`super::ProtocolKind::decode`].
pub fn decode(
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<Option<HubMessage>, ProtocolError> {
    loop {
        let Some(body) = framing::split_binary(buf, max_message_size)? else {
            return Ok(None);
        };
        if let Some(msg) = decode_record(&body)? {
            return Ok(Some(msg));
        }
        // Unknown message type: skipped, try the next one.
    }
}

impl From<MpError> for ProtocolError {
    fn from(e: MpError) -> Self {
        ProtocolError::MessagePack(e.0)
    }
}

/// Decodes one message body (without its length prefix). `Ok(None)`: a message of an
/// unknown type, to be skipped. Values in the result are slices of `body`.
pub fn decode_record(body: &Bytes) -> Result<Option<HubMessage>, ProtocolError> {
    let mut r = Reader::new(body);
    let len = r.array_len("message")?;
    if len == 0 {
        return Err(mp_error(
            "Reading 'messageType' failed: empty message array.",
        ));
    }
    let ty = match r.item()? {
        Item::Uint(n) => n,
        // A negative type is no type we know: skip it like any other unknown type.
        Item::Int(_) => return Ok(None),
        _ => return Err(mp_error("Reading 'messageType' as Int32 failed.")),
    };
    let ty = match u8::try_from(ty) {
        Ok(t @ mt::INVOCATION..=mt::SEQUENCE) => t,
        _ => return Ok(None),
    };

    let msg = match ty {
        mt::INVOCATION | mt::STREAM_INVOCATION => {
            need(len, 5, ty)?;
            let headers = read_headers(&mut r)?;
            let invocation_id = r
                .str_or_nil("invocationId")?
                .filter(|id| !id.is_empty())
                .map(str::to_owned);
            if ty == mt::STREAM_INVOCATION && invocation_id.is_none() {
                return Err(ProtocolError::MissingField("invocationId"));
            }
            let target = r.str("target")?;
            if target.is_empty() {
                return Err(ProtocolError::InvalidField(
                    "Expected 'target' to be a non-empty string.".to_owned(),
                ));
            }
            let argc = r.array_len("arguments")?;
            let mut arguments = Vec::with_capacity(bounded(argc, &r));
            for _ in 0..argc {
                arguments.push(read_value(&mut r, body)?);
            }
            // ASP.NET reads StreamIds only when the array has more than 5 elements; the JS
            // client omits it unless upload streams are used.
            let mut stream_ids = Vec::new();
            if len > 5 {
                let n = r.array_len("streamIds")?;
                stream_ids.reserve(bounded(n, &r));
                for _ in 0..n {
                    stream_ids.push(r.str("streamId")?.to_owned());
                }
            }
            let inv = Invocation {
                headers,
                invocation_id,
                target: target.to_owned(),
                arguments,
                stream_ids,
            };
            if ty == mt::INVOCATION {
                HubMessage::Invocation(inv)
            } else {
                HubMessage::StreamInvocation(inv)
            }
        }
        mt::STREAM_ITEM => {
            need(len, 4, ty)?;
            HubMessage::StreamItem(StreamItem {
                headers: read_headers(&mut r)?,
                invocation_id: required_id(&mut r)?,
                item: read_value(&mut r, body)?,
            })
        }
        mt::COMPLETION => {
            need(len, 4, ty)?;
            let headers = read_headers(&mut r)?;
            let invocation_id = required_id(&mut r)?;
            let kind = r.uint("resultKind")?;
            let result = match kind {
                result_kind::ERROR => {
                    need(len, 5, ty)?;
                    CompletionResult::Error(r.str("error")?.to_owned())
                }
                result_kind::VOID => CompletionResult::Void,
                result_kind::NON_VOID => {
                    need(len, 5, ty)?;
                    CompletionResult::Value(read_value(&mut r, body)?)
                }
                _ => return Err(mp_error("Invalid invocation result kind.")),
            };
            HubMessage::Completion(Completion {
                headers,
                invocation_id,
                result,
            })
        }
        mt::CANCEL_INVOCATION => {
            need(len, 3, ty)?;
            HubMessage::CancelInvocation(CancelInvocation {
                headers: read_headers(&mut r)?,
                invocation_id: required_id(&mut r)?,
            })
        }
        mt::PING => HubMessage::Ping,
        mt::CLOSE => {
            need(len, 2, ty)?;
            // ASP.NET writes nil for a null or empty error; read both as "no error".
            let error = r
                .str_or_nil("error")?
                .filter(|e| !e.is_empty())
                .map(str::to_owned);
            // The JS client writes [7, nil]; AllowReconnect is read only when present.
            let allow_reconnect = if len > 2 {
                r.bool("allowReconnect")?
            } else {
                false
            };
            HubMessage::Close(Close {
                error,
                allow_reconnect,
            })
        }
        mt::ACK => {
            need(len, 2, ty)?;
            HubMessage::Ack(Ack {
                sequence_id: r.uint("sequenceId")?,
            })
        }
        _ => {
            need(len, 2, ty)?;
            HubMessage::Sequence(Sequence {
                sequence_id: r.uint("sequenceId")?,
            })
        }
    };
    Ok(Some(msg))
}

fn mp_error(msg: &str) -> ProtocolError {
    ProtocolError::MessagePack(msg.to_owned())
}

fn need(len: u32, min: u32, ty: u8) -> Result<(), ProtocolError> {
    if len < min {
        return Err(ProtocolError::MessagePack(format!(
            "Message of type {ty} has {len} element(s), expected at least {min}."
        )));
    }
    Ok(())
}

/// A pre-allocation size for `n` declared elements that the remaining bytes can back (each
/// element takes at least one byte), so a hostile count cannot force a huge allocation.
fn bounded(n: u32, r: &Reader<'_>) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).min(r.remaining())
}

fn read_headers(r: &mut Reader<'_>) -> Result<Headers, ProtocolError> {
    let n = r.map_len("headers")?;
    let mut headers = Vec::with_capacity(bounded(n, r) / 2);
    for _ in 0..n {
        let key = r.str("header key")?;
        let value = r.str("header value")?;
        headers.push((key.to_owned(), value.to_owned()));
    }
    Ok(headers)
}

/// A required, non-empty `str` invocation id.
fn required_id(r: &mut Reader<'_>) -> Result<String, ProtocolError> {
    match r.str_or_nil("invocationId")? {
        Some(id) if !id.is_empty() => Ok(id.to_owned()),
        _ => Err(ProtocolError::MissingField("invocationId")),
    }
}

/// One complete value, as a zero-copy slice of the message body.
fn read_value(r: &mut Reader<'_>, body: &Bytes) -> Result<Value, ProtocolError> {
    let (start, end) = r.skip_value()?;
    // The reader only moves within `body`, so the range is always valid; checked anyway
    // because `Bytes::slice` panics otherwise.
    if start > end || end > body.len() {
        return Err(mp_error("value out of bounds"));
    }
    Ok(Value::MsgPack(body.slice(start..end)))
}

// ---- encoding ----

/// Appends one framed message.
///
/// On error (a value that cannot be rendered as MessagePack, or a body of 2 GiB or more)
/// `out` is left as it was.
pub fn encode(msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    // One placeholder byte for the length prefix: enough for bodies under 128 bytes, the
    // common case; longer bodies get the prefix spliced in (one memmove).
    out.push(0);
    if let Err(e) = encode_body(msg, out) {
        out.truncate(start);
        return Err(e);
    }
    let body_len = out.len() - start - 1;
    if body_len > MAX_VARINT_LENGTH {
        out.truncate(start);
        return Err(ProtocolError::LengthPrefixOverflow);
    }
    if body_len < 0x80 {
        if let Some(b) = out.get_mut(start) {
            *b = body_len as u8;
        }
    } else {
        let mut prefix = Vec::with_capacity(framing::MAX_VARINT_BYTES);
        framing::write_varint(body_len, &mut prefix);
        out.splice(start..start + 1, prefix);
    }
    Ok(())
}

fn write_headers(out: &mut Vec<u8>, headers: &Headers) {
    mp::write_map_len(out, headers.len());
    for (k, v) in headers {
        mp::write_str(out, k);
        mp::write_str(out, v);
    }
}

fn encode_body(msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let ty = u64::from(msg.message_type());
    match msg {
        HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) => {
            mp::write_array_len(out, 6);
            mp::write_uint(out, ty);
            write_headers(out, &inv.headers);
            match &inv.invocation_id {
                Some(id) => mp::write_str(out, id),
                None => mp::write_nil(out),
            }
            mp::write_str(out, &inv.target);
            mp::write_array_len(out, inv.arguments.len());
            for arg in &inv.arguments {
                arg.write_msgpack(out)?;
            }
            mp::write_array_len(out, inv.stream_ids.len());
            for id in &inv.stream_ids {
                mp::write_str(out, id);
            }
        }
        HubMessage::StreamItem(item) => {
            mp::write_array_len(out, 4);
            mp::write_uint(out, ty);
            write_headers(out, &item.headers);
            mp::write_str(out, &item.invocation_id);
            item.item.write_msgpack(out)?;
        }
        HubMessage::Completion(c) => {
            let len = if matches!(c.result, CompletionResult::Void) {
                4
            } else {
                5
            };
            mp::write_array_len(out, len);
            mp::write_uint(out, ty);
            write_headers(out, &c.headers);
            mp::write_str(out, &c.invocation_id);
            match &c.result {
                CompletionResult::Void => mp::write_uint(out, result_kind::VOID),
                CompletionResult::Value(v) => {
                    mp::write_uint(out, result_kind::NON_VOID);
                    v.write_msgpack(out)?;
                }
                CompletionResult::Error(e) => {
                    mp::write_uint(out, result_kind::ERROR);
                    mp::write_str(out, e);
                }
            }
        }
        HubMessage::CancelInvocation(c) => {
            mp::write_array_len(out, 3);
            mp::write_uint(out, ty);
            write_headers(out, &c.headers);
            mp::write_str(out, &c.invocation_id);
        }
        HubMessage::Ping => {
            mp::write_array_len(out, 1);
            mp::write_uint(out, ty);
        }
        HubMessage::Close(c) => {
            // Always 3 elements, as ASP.NET writes it; an empty error is written as nil.
            mp::write_array_len(out, 3);
            mp::write_uint(out, ty);
            match c.error.as_deref() {
                Some(e) if !e.is_empty() => mp::write_str(out, e),
                _ => mp::write_nil(out),
            }
            mp::write_bool(out, c.allow_reconnect);
        }
        HubMessage::Ack(Ack { sequence_id }) | HubMessage::Sequence(Sequence { sequence_id }) => {
            mp::write_array_len(out, 2);
            mp::write_uint(out, ty);
            mp::write_uint(out, *sequence_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::hub_message;
    use crate::protocol::{ProtocolKind, DEFAULT_MAX_MESSAGE_SIZE};
    use proptest::prelude::*;

    fn m(bytes: &'static [u8]) -> Value {
        Value::MsgPack(Bytes::from_static(bytes))
    }

    fn j(text: &str) -> Value {
        Value::Json(Bytes::copy_from_slice(text.as_bytes()))
    }

    fn dec(input: &[u8]) -> Result<Option<HubMessage>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        decode(&mut buf, DEFAULT_MAX_MESSAGE_SIZE)
    }

    fn dec_ok(input: &[u8]) -> HubMessage {
        dec(input).unwrap().unwrap()
    }

    fn enc(msg: &HubMessage) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out).unwrap();
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect()
    }

    /// Frames a hex body with its VarInt prefix.
    fn fr(body: &str) -> Vec<u8> {
        let body = hex(body);
        let mut out = Vec::new();
        framing::write_varint(body.len(), &mut out);
        out.extend_from_slice(&body);
        out
    }

    fn raw(v: &Value) -> &[u8] {
        match v {
            Value::MsgPack(b) => b,
            other => panic!("not MessagePack: {other:?}"),
        }
    }

    #[test]
    fn observed_client_bytes() {
        // §6.3, the 10.0.11 JS client.
        assert_eq!(dec_ok(&hex("02 91 06")), HubMessage::Ping);
        let add = dec_ok(&hex("0c 95 01 80 a1 30 a3 41 64 64 92 28 02"));
        assert_eq!(
            add,
            HubMessage::Invocation(Invocation {
                invocation_id: Some("0".into()),
                target: "Add".into(),
                arguments: vec![m(&[0x28]), m(&[0x02])],
                ..Default::default()
            })
        );
        let HubMessage::Invocation(inv) = &add else {
            panic!()
        };
        assert_eq!(raw(&inv.arguments[0]), [0x28]);
        assert_eq!(
            dec_ok(&hex("0f 95 01 80 c0 a7 4e 6f 52 65 70 6c 79 91 a1 78")),
            HubMessage::Invocation(Invocation::send("NoReply", vec![j("\"x\"")]))
        );
        assert_eq!(
            dec_ok(&hex("0f 95 04 80 a1 34 a7 43 6f 75 6e 74 65 72 91 03")),
            HubMessage::StreamInvocation(Invocation {
                invocation_id: Some("4".into()),
                target: "Counter".into(),
                arguments: vec![j("3")],
                ..Default::default()
            })
        );
        assert_eq!(
            dec_ok(&hex(
                "14 96 01 80 a1 36 a6 55 70 6c 6f 61 64 91 a3 61 72 67 91 a1 35"
            )),
            HubMessage::Invocation(Invocation {
                invocation_id: Some("6".into()),
                target: "Upload".into(),
                arguments: vec![j("\"arg\"")],
                stream_ids: vec!["5".into()],
                ..Default::default()
            })
        );
        assert_eq!(
            dec_ok(&hex("06 94 02 80 a1 35 01")),
            HubMessage::StreamItem(StreamItem {
                headers: vec![],
                invocation_id: "5".into(),
                item: j("1"),
            })
        );
        assert_eq!(
            dec_ok(&hex("06 94 03 80 a1 35 02")),
            HubMessage::Completion(Completion::empty("5"))
        );
        assert_eq!(
            dec_ok(&hex("08 95 03 80 a2 73 31 03 2a")),
            HubMessage::Completion(Completion::with_result("s1", j("42")))
        );
        // JS stop(): [7, nil].
        assert_eq!(
            dec_ok(&hex("03 92 07 c0")),
            HubMessage::Close(Close::default())
        );
    }

    #[test]
    fn aspnet_layout_bytes() {
        let cases: Vec<(HubMessage, &str)> = vec![
            (
                HubMessage::Invocation(Invocation::send("recv", vec![j("\"hi\"")])),
                "0e 96 01 80 c0 a4 72 65 63 76 91 a2 68 69 90",
            ),
            (HubMessage::Ping, "02 91 06"),
            (
                HubMessage::Completion(Completion::with_result("1", Value::null())),
                "07 95 03 80 a1 31 03 c0",
            ),
            (
                HubMessage::Completion(Completion::empty("4")),
                "06 94 03 80 a1 34 02",
            ),
            (
                HubMessage::Completion(Completion::with_error("2", "boom")),
                "0b 95 03 80 a1 32 01 a4 62 6f 6f 6d",
            ),
            (
                HubMessage::StreamItem(StreamItem {
                    headers: vec![],
                    invocation_id: "4".into(),
                    item: j("0"),
                }),
                "06 94 02 80 a1 34 00",
            ),
            (
                HubMessage::CancelInvocation(CancelInvocation {
                    headers: vec![("a".into(), "b".into())],
                    invocation_id: "4".into(),
                }),
                "09 93 05 81 a1 61 a1 62 a1 34",
            ),
            (HubMessage::Close(Close::default()), "04 93 07 c0 c2"),
            (
                HubMessage::Close(Close {
                    error: Some("bye".into()),
                    allow_reconnect: true,
                }),
                "07 93 07 a3 62 79 65 c3",
            ),
            (HubMessage::Ack(Ack { sequence_id: 1 }), "03 92 08 01"),
            (
                HubMessage::Sequence(Sequence { sequence_id: 300 }),
                "05 92 09 cd 01 2c",
            ),
            (
                HubMessage::Ack(Ack {
                    sequence_id: 1 << 40,
                }),
                "0b 92 08 cf 00 00 01 00 00 00 00 00",
            ),
        ];
        for (msg, bytes) in cases {
            let bytes = hex(bytes);
            assert_eq!(enc(&msg), bytes, "{msg:?}");
            assert_eq!(dec_ok(&bytes), msg);
        }
        // An empty Close error is written as nil.
        assert_eq!(
            enc(&HubMessage::Close(Close {
                error: Some(String::new()),
                allow_reconnect: false
            })),
            hex("04 93 07 c0 c2")
        );
    }

    #[test]
    fn arities_and_widths() {
        // Close with 3 elements from a server, with a str error.
        assert_eq!(
            dec_ok(&fr("93 07 a1 78 c3")),
            HubMessage::Close(Close {
                error: Some("x".into()),
                allow_reconnect: true
            })
        );
        // Close with 2 elements and an error.
        assert_eq!(
            dec_ok(&fr("92 07 a1 78")),
            HubMessage::Close(Close {
                error: Some("x".into()),
                allow_reconnect: false
            })
        );
        // Ack/Sequence in any unsigned width.
        for (bytes, id) in [
            ("03 92 08 05", 5),
            ("04 92 08 cc 05", 5),
            ("05 92 08 cd 00 05", 5),
            ("07 92 08 ce 00 00 00 05", 5),
            ("04 92 09 d0 05", 5),
        ] {
            let msg = dec_ok(&hex(bytes));
            assert!(
                msg == HubMessage::Ack(Ack { sequence_id: id })
                    || msg == HubMessage::Sequence(Sequence { sequence_id: id }),
                "{bytes}"
            );
        }
        // Invocation id as an empty string means non-blocking.
        let HubMessage::Invocation(inv) = dec_ok(&fr("95 01 80 a0 a1 78 90")) else {
            panic!()
        };
        assert_eq!(inv.invocation_id, None);
        // Extra trailing elements are ignored (forward compatibility).
        assert_eq!(dec_ok(&fr("93 06 01 02")), HubMessage::Ping);
        assert_eq!(
            dec_ok(&fr("97 01 80 c0 a1 78 90 90 c3")),
            HubMessage::Invocation(Invocation::send("x", vec![]))
        );
        assert_eq!(
            dec_ok(&fr("95 03 80 a1 35 02 c0")),
            HubMessage::Completion(Completion::empty("5"))
        );
        // Headers are read in order.
        let HubMessage::StreamItem(item) = dec_ok(&fr("94 02 82 a1 62 a1 32 a1 61 a1 31 a1 35 c0"))
        else {
            panic!()
        };
        assert_eq!(
            item.headers,
            vec![("b".into(), "2".into()), ("a".into(), "1".into())]
        );
        assert!(item.item.is_null());
    }

    #[test]
    fn argument_extents_are_exact_slices() {
        // Arguments: a map {"a":[1,2]}, a bin, a timestamp, a nested array, then streamIds.
        let body = hex("96 01 80 c0 a1 74 94 81 a1 61 92 01 02 c4 02 ff 00 d6 ff 38 6d 43 80 92 91 c0 a0 91 a1 31");
        let mut framed = Vec::new();
        framing::write_varint(body.len(), &mut framed);
        framed.extend_from_slice(&body);
        let HubMessage::Invocation(inv) = dec_ok(&framed) else {
            panic!()
        };
        let raws: Vec<&[u8]> = inv.arguments.iter().map(raw).collect();
        assert_eq!(
            raws,
            vec![
                &hex("81 a1 61 92 01 02")[..],
                &hex("c4 02 ff 00")[..],
                &hex("d6 ff 38 6d 43 80")[..],
                &hex("92 91 c0 a0")[..]
            ]
        );
        assert_eq!(inv.stream_ids, vec!["1".to_string()]);
        assert_eq!(
            Value::MsgPack(Bytes::from(hex("92 91 c0 a0")))
                .to_json_string()
                .unwrap(),
            "[[null],\"\"]"
        );
        assert_eq!(
            inv.arguments[2].to_json_string().unwrap(),
            "\"2000-01-01T00:00:00Z\""
        );
        assert_eq!(inv.arguments[1].to_json_string().unwrap(), "\"/wA=\"");
    }

    #[test]
    fn unknown_types_are_skipped() {
        // [99, "x"], [-1], [6] then an incomplete frame.
        let mut buf = BytesMut::from(&hex("04 92 63 a1 78 02 91 ff 02 91 06 02 91")[..]);
        assert_eq!(decode(&mut buf, 100).unwrap(), Some(HubMessage::Ping));
        assert_eq!(decode(&mut buf, 100).unwrap(), None);
        assert_eq!(&buf[..], &[0x02, 0x91]);
    }

    #[test]
    fn errors() {
        let err = |s: &str| dec(&fr(s)).unwrap_err().to_string();
        assert_eq!(
            err("95 03 80 a1 35 04"),
            "Invalid MessagePack: Invalid invocation result kind."
        );
        assert!(err("06").contains("array"));
        assert!(err("90").contains("empty"));
        assert!(err("91 a1 78").contains("messageType"));
        assert!(err("94 01 80 c0 a1").contains("at least 5"));
        assert!(err("94 03 80 a1 35 01").contains("at least 5"));
        assert!(err("94 03 80 a1 35 03").contains("at least 5"));
        assert_eq!(
            err("95 01 80 c0 a0 90"),
            "Expected 'target' to be a non-empty string."
        );
        assert!(err("95 01 80 c4 00 a1 78 90").contains("invocationId"));
        assert_eq!(
            err("95 04 80 c0 a1 78 90"),
            "Missing required property 'invocationId'."
        );
        assert_eq!(
            err("94 02 80 c0 01"),
            "Missing required property 'invocationId'."
        );
        assert!(err("95 01 c0 c0 a1 78 90").contains("headers"));
        assert!(err("95 01 81 a1 61 01 c0 a1 78 90").contains("header value"));
        assert!(err("95 01 80 c0 a1 78 01").contains("arguments"));
        assert!(err("96 01 80 c0 a1 78 90 91 01").contains("streamId"));
        assert!(err("95 01 80 c0 a1 78 91").contains("end of data"));
        assert!(err("92 07 01").contains("error"));
        assert!(err("93 07 c0 c0").contains("allowReconnect"));
        assert!(err("92 08 ff").contains("sequenceId"));
        assert!(err("92 08 c1").contains("reserved"));
        assert!(err("93 07 a2 ff fe").contains("UTF-8"));
        // A huge declared argument count with few bytes fails fast, without allocating.
        assert!(err("95 01 80 c0 a1 78 dd ff ff ff ff").contains("end of data"));
        assert!(matches!(
            dec(&hex("ff ff ff ff 08")),
            Err(ProtocolError::LengthPrefixOverflow)
        ));
        // An argument nested deeper than the transcoder could render is refused up front.
        let deep = format!(
            "95 01 80 c0 a1 78 91{} c0",
            " 91".repeat(crate::protocol::transcode::MAX_DEPTH + 1)
        );
        assert!(err(&deep).contains("nesting deeper than"));
    }

    #[test]
    fn too_large_and_incomplete() {
        let framed = enc(&HubMessage::Invocation(Invocation::send(
            "x",
            vec![j("\"aaaaaaaaaaaaaaaa\"")],
        )));
        let mut buf = BytesMut::from(&framed[..3]);
        assert!(matches!(
            decode(&mut buf, 10),
            Err(ProtocolError::TooLarge { limit: 10 })
        ));
        let mut buf = BytesMut::from(&framed[..]);
        // The length prefix counts toward the limit, as in ASP.NET.
        assert!(decode(&mut buf.clone(), framed.len() - 1).is_err());
        assert!(decode(&mut buf, framed.len()).unwrap().is_some());
    }

    #[test]
    fn long_bodies_get_multi_byte_prefixes() {
        let arg = format!("\"{}\"", "x".repeat(300));
        let msg = HubMessage::Invocation(Invocation::send("x", vec![j(&arg)]));
        let mut out = b"prev".to_vec();
        encode(&msg, &mut out).unwrap();
        assert_eq!(&out[..4], b"prev");
        let (len, prefix) = framing::read_varint(&out[4..]).unwrap().unwrap();
        assert_eq!(prefix, 2);
        assert_eq!(len, out.len() - 6);
        let mut buf = BytesMut::from(&out[4..]);
        assert_eq!(decode(&mut buf, usize::MAX).unwrap(), Some(msg));
    }

    #[test]
    fn encode_error_leaves_output_untouched() {
        let msg = HubMessage::Invocation(Invocation::send("x", vec![j("[1,")]));
        let mut out = b"prev".to_vec();
        assert!(matches!(
            encode(&msg, &mut out),
            Err(ProtocolError::Value(_))
        ));
        assert_eq!(out, b"prev");
    }

    proptest! {
        #[test]
        fn round_trip(msg in hub_message()) {
            let framed = enc(&msg);
            let mut buf = BytesMut::from(&framed[..]);
            let back = decode(&mut buf, usize::MAX).unwrap().unwrap();
            prop_assert_eq!(&back, &msg);
            prop_assert!(buf.is_empty());
            // Re-encoding the decoded (raw MessagePack) message reproduces the same bytes.
            prop_assert_eq!(enc(&back), framed);
        }

        #[test]
        fn cross_protocol_round_trip(msg in hub_message()) {
            // JSON in, MessagePack out, and back: values survive transcoding both ways.
            let mut json = Vec::new();
            ProtocolKind::Json.encode(&msg, &mut json).unwrap();
            let from_json = ProtocolKind::Json.decode(&mut BytesMut::from(&json[..]), usize::MAX).unwrap().unwrap();
            let framed = enc(&from_json);
            let from_mp = decode(&mut BytesMut::from(&framed[..]), usize::MAX).unwrap().unwrap();
            let mut json_again = Vec::new();
            ProtocolKind::Json.encode(&from_mp, &mut json_again).unwrap();
            let back = ProtocolKind::Json.decode(&mut BytesMut::from(&json_again[..]), usize::MAX).unwrap().unwrap();
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn prefixes_are_incomplete(msg in hub_message()) {
            let framed = enc(&msg);
            for cut in 0..framed.len() {
                let mut buf = BytesMut::from(&framed[..cut]);
                prop_assert!(decode(&mut buf, usize::MAX).unwrap().is_none());
                prop_assert_eq!(&buf[..], &framed[..cut]);
            }
        }

        #[test]
        fn batches_decode_in_order(msgs in proptest::collection::vec(hub_message(), 1..5)) {
            let mut wire = Vec::new();
            for m in &msgs {
                ProtocolKind::MessagePack.encode(m, &mut wire).unwrap();
            }
            let mut buf = BytesMut::from(&wire[..]);
            for m in &msgs {
                let decoded = ProtocolKind::MessagePack.decode(&mut buf, usize::MAX).unwrap();
                prop_assert_eq!(decoded.as_ref(), Some(m));
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn oversize_rejected(msg in hub_message()) {
            let framed = enc(&msg);
            let (len, prefix) = framing::read_varint(&framed).unwrap().unwrap();
            prop_assert_eq!(prefix + len, framed.len());
            // Only the prefix is needed to reject.
            let mut buf = BytesMut::from(&framed[..prefix]);
            let rejected = matches!(decode(&mut buf, len - 1), Err(ProtocolError::TooLarge { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut buf, 128) {}
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..120), ty in 0u8..12) {
            // Well-framed arrays that start with a plausible type reach the field readers.
            let mut framed = Vec::new();
            let mut inner = vec![0x96, ty];
            inner.extend_from_slice(&body);
            framing::write_varint(inner.len(), &mut framed);
            framed.extend_from_slice(&inner);
            let mut buf = BytesMut::from(&framed[..]);
            if let Ok(Some(msg)) = decode(&mut buf, usize::MAX) {
                // Whatever decoded must re-encode and transcode without panicking.
                let _ = ProtocolKind::Json.encode(&msg, &mut Vec::new());
                let _ = ProtocolKind::MessagePack.encode(&msg, &mut Vec::new());
            }
        }
    }
}
