//! The json hub protocol. Pure.
//!
//! Each message is one UTF-8 JSON object followed by the record separator 0x1E (see
//! [`super::framing::split_text`]). Inbound bytes come from the session's receive buffer;
//! encoded bytes go to the connection's outbound queue (usually through
//! [`super::PreparedMessage`]).
//!
//! Decoding accepts properties in any order (the JS client writes `type` last and
//! `arguments` before `target`), ignores unknown properties, and skips records whose `type`
//! is unknown. Arguments, stream items and results are not parsed into a tree: each stays
//! the exact JSON text of that value, as a [`Value::Json`] that shares the receive buffer's
//! allocation (no copy). Their syntax is checked while the envelope is parsed.
//!
//! Encoding writes ASP.NET's layout: `type` first, then `headers` only if non-empty, then
//! the message's fields; optional fields are omitted when absent.

use bytes::{Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::message::message_type as mt;
use super::{
    framing, Ack, CancelInvocation, Close, Completion, CompletionResult, Headers, HubMessage,
    Invocation, ProtocolError, Sequence, StreamItem, Value, RECORD_SEPARATOR,
};

/// ASP.NET's text when a Completion has both `result` and `error`.
pub const MUTUALLY_EXCLUSIVE_ERROR: &str =
    "The 'error' and 'result' properties are mutually exclusive.";

/// Decodes the next message; see [`super::ProtocolKind::decode`].
pub fn decode(
    buf: &mut BytesMut,
    max_message_size: usize,
) -> Result<Option<HubMessage>, ProtocolError> {
    loop {
        let Some(record) = framing::split_text(buf, max_message_size)? else {
            return Ok(None);
        };
        if let Some(msg) = decode_record(&record)? {
            return Ok(Some(msg));
        }
        // Unknown message type: skipped, try the next record.
    }
}

/// Decodes one record (a JSON object without its 0x1E). `Ok(None)`: a message of an
/// unknown type, to be skipped. Values in the result are slices of `record`.
pub fn decode_record(record: &Bytes) -> Result<Option<HubMessage>, ProtocolError> {
    let text = std::str::from_utf8(record).map_err(|_| ProtocolError::InvalidUtf8)?;
    // serde_json skips raw values without a depth limit, so bound nesting here: a value
    // that could not be decoded or transcoded later is refused now, with the message.
    // The bound is per value, as the MessagePack protocol counts it: an argument sits two
    // levels down (the envelope object, the `arguments` array), an item or a result one; so
    // the whole record may nest two deeper, and items and results are checked below.
    if nesting_exceeds(record, MAX_DEPTH + 2) {
        return Err(too_deep());
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(json_error)?;

    let Some(ty) = env.ty else {
        return Err(ProtocolError::MissingField("type"));
    };
    let ty: i64 = serde_json::from_str(ty.get())
        .map_err(|_| invalid("Expected 'type' to be of type Integer."))?;
    let ty = match u8::try_from(ty) {
        Ok(t @ mt::INVOCATION..=mt::SEQUENCE) => t,
        _ => return Ok(None),
    };

    let msg = match ty {
        mt::INVOCATION | mt::STREAM_INVOCATION => {
            let invocation_id =
                optional_string(env.invocation_id, "invocationId")?.filter(|id| !id.is_empty());
            if ty == mt::STREAM_INVOCATION && invocation_id.is_none() {
                return Err(ProtocolError::MissingField("invocationId"));
            }
            let target = optional_string(env.target, "target")?
                .ok_or(ProtocolError::MissingField("target"))?;
            if target.is_empty() {
                return Err(invalid("Expected 'target' to be a non-empty string."));
            }
            let arguments = env
                .arguments
                .ok_or(ProtocolError::MissingField("arguments"))?
                .into_iter()
                .map(|raw| Value::Json(sub_bytes(record, raw.get())))
                .collect();
            let stream_ids = match env.stream_ids {
                Some(raw) if !is_null(raw) => serde_json::from_str::<Vec<String>>(raw.get())
                    .map_err(|_| invalid("Expected 'streamIds' to be of type Array of String."))?,
                _ => Vec::new(),
            };
            let inv = Invocation {
                headers: headers(env.headers)?,
                invocation_id,
                target,
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
            let invocation_id = required_id(env.invocation_id)?;
            let item = env.item.ok_or(ProtocolError::MissingField("item"))?;
            if nesting_exceeds(item.get().as_bytes(), MAX_DEPTH) {
                return Err(too_deep());
            }
            HubMessage::StreamItem(StreamItem {
                headers: headers(env.headers)?,
                invocation_id,
                item: Value::Json(sub_bytes(record, item.get())),
            })
        }
        mt::COMPLETION => {
            let invocation_id = required_id(env.invocation_id)?;
            let error = optional_string(env.error, "error")?;
            // As ASP.NET: an `error` of null counts as absent.
            let result = match (error, env.result) {
                (Some(_), Some(_)) => return Err(invalid(MUTUALLY_EXCLUSIVE_ERROR)),
                (Some(e), None) => CompletionResult::Error(e),
                (None, Some(raw)) if nesting_exceeds(raw.get().as_bytes(), MAX_DEPTH) => {
                    return Err(too_deep())
                }
                (None, Some(raw)) => {
                    CompletionResult::Value(Value::Json(sub_bytes(record, raw.get())))
                }
                (None, None) => CompletionResult::Void,
            };
            HubMessage::Completion(Completion {
                headers: headers(env.headers)?,
                invocation_id,
                result,
            })
        }
        mt::CANCEL_INVOCATION => HubMessage::CancelInvocation(CancelInvocation {
            headers: headers(env.headers)?,
            invocation_id: required_id(env.invocation_id)?,
        }),
        mt::PING => HubMessage::Ping,
        mt::CLOSE => {
            let allow_reconnect = match env.allow_reconnect {
                Some(raw) if !is_null(raw) => serde_json::from_str::<bool>(raw.get())
                    .map_err(|_| invalid("Expected 'allowReconnect' to be of type Boolean."))?,
                _ => false,
            };
            HubMessage::Close(Close {
                error: optional_string(env.error, "error")?,
                allow_reconnect,
            })
        }
        mt::ACK => HubMessage::Ack(Ack {
            sequence_id: sequence_id(env.sequence_id)?,
        }),
        _ => HubMessage::Sequence(Sequence {
            sequence_id: sequence_id(env.sequence_id)?,
        }),
    };
    Ok(Some(msg))
}

/// Deepest nesting of one value (an argument, an item, a result), the same bound as the
/// transcoder's and the MessagePack protocol's, so a value one protocol accepts the other
/// accepts too (and every recipient can be sent it).
pub const MAX_DEPTH: usize = super::transcode::MAX_DEPTH;

fn too_deep() -> ProtocolError {
    ProtocolError::Json(format!(
        "The message is nested deeper than {MAX_DEPTH} levels."
    ))
}

/// Whether arrays/objects in `text` nest deeper than `max` (brackets inside strings are
/// skipped). One linear pass; malformed text is left for the parser to report.
pub fn nesting_exceeds(text: &[u8], max: usize) -> bool {
    // Fast path: with no more than `max` opening brackets anywhere (strings included), the
    // nesting cannot exceed `max`. This count vectorizes; the state machine below does not.
    let openings = text.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if openings <= max {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn invalid(msg: &str) -> ProtocolError {
    ProtocolError::InvalidField(msg.to_owned())
}

/// Syntax errors are [`ProtocolError::Json`]; shape errors (wrong type of a value, found
/// while the envelope is parsed) are [`ProtocolError::InvalidField`].
fn json_error(e: serde_json::Error) -> ProtocolError {
    match e.classify() {
        serde_json::error::Category::Data => ProtocolError::InvalidField(e.to_string()),
        _ => ProtocolError::Json(e.to_string()),
    }
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// The part of `record` that `part` (borrowed from it by serde_json) covers, without
/// copying. Falls back to a copy if `part` is somehow not inside `record`, rather than
/// panicking as `Bytes::slice_ref` would.
fn sub_bytes(record: &Bytes, part: &str) -> Bytes {
    let base = record.as_ptr() as usize;
    let offset = (part.as_ptr() as usize).wrapping_sub(base);
    match offset.checked_add(part.len()) {
        Some(end) if offset <= record.len() && end <= record.len() => record.slice(offset..end),
        _ => Bytes::copy_from_slice(part.as_bytes()),
    }
}

fn optional_string(raw: Option<&RawValue>, name: &str) -> Result<Option<String>, ProtocolError> {
    match raw {
        None => Ok(None),
        Some(raw) => serde_json::from_str::<Option<String>>(raw.get()).map_err(|_| {
            ProtocolError::InvalidField(format!("Expected '{name}' to be of type String."))
        }),
    }
}

/// A required, non-empty `invocationId` (ASP.NET treats empty as missing).
fn required_id(raw: Option<&RawValue>) -> Result<String, ProtocolError> {
    optional_string(raw, "invocationId")?
        .filter(|id| !id.is_empty())
        .ok_or(ProtocolError::MissingField("invocationId"))
}

fn sequence_id(raw: Option<&RawValue>) -> Result<u64, ProtocolError> {
    let raw = raw.ok_or(ProtocolError::MissingField("sequenceId"))?;
    serde_json::from_str::<u64>(raw.get())
        .map_err(|_| invalid("Expected 'sequenceId' to be of type Integer."))
}

fn headers(raw: Option<&RawValue>) -> Result<Headers, ProtocolError> {
    match raw {
        Some(raw) if !is_null(raw) => serde_json::from_str::<HeadersDe>(raw.get())
            .map(|h| h.0)
            .map_err(|_| invalid("Expected 'headers' to be an object of String values.")),
        _ => Ok(Vec::new()),
    }
}

/// The envelope's properties, each kept as raw JSON text until the type is known.
#[derive(Default)]
struct Envelope<'a> {
    ty: Option<&'a RawValue>,
    headers: Option<&'a RawValue>,
    invocation_id: Option<&'a RawValue>,
    target: Option<&'a RawValue>,
    /// Split into raw elements while parsing, so the array is scanned only once.
    arguments: Option<Vec<&'a RawValue>>,
    stream_ids: Option<&'a RawValue>,
    item: Option<&'a RawValue>,
    result: Option<&'a RawValue>,
    error: Option<&'a RawValue>,
    allow_reconnect: Option<&'a RawValue>,
    sequence_id: Option<&'a RawValue>,
}

enum Key {
    Type,
    Headers,
    InvocationId,
    Target,
    Arguments,
    StreamIds,
    Item,
    Result,
    Error,
    AllowReconnect,
    SequenceId,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a property name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                // Property names are case-sensitive, as in ASP.NET.
                Ok(match v {
                    "type" => Key::Type,
                    "headers" => Key::Headers,
                    "invocationId" => Key::InvocationId,
                    "target" => Key::Target,
                    "arguments" => Key::Arguments,
                    "streamIds" => Key::StreamIds,
                    "item" => Key::Item,
                    "result" => Key::Result,
                    "error" => Key::Error,
                    "allowReconnect" => Key::AllowReconnect,
                    "sequenceId" => Key::SequenceId,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor(std::marker::PhantomData))
    }
}

struct EnvelopeVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for EnvelopeVisitor<'a> {
    type Value = Envelope<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Envelope<'a>, M::Error> {
        let mut env = Envelope::default();
        // Duplicate properties: the last one wins, as with ASP.NET's reader.
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Type => &mut env.ty,
                Key::Headers => &mut env.headers,
                Key::InvocationId => &mut env.invocation_id,
                Key::Target => &mut env.target,
                Key::StreamIds => &mut env.stream_ids,
                Key::Item => &mut env.item,
                Key::Result => &mut env.result,
                Key::Error => &mut env.error,
                Key::AllowReconnect => &mut env.allow_reconnect,
                Key::SequenceId => &mut env.sequence_id,
                Key::Arguments => {
                    env.arguments =
                        Some(map.next_value_seed(ArgumentsSeed(std::marker::PhantomData))?);
                    continue;
                }
                Key::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<&'a RawValue>()?);
        }
        Ok(env)
    }
}

/// Splits the `arguments` array into the raw text of each element.
struct ArgumentsSeed<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> DeserializeSeed<'de> for ArgumentsSeed<'a> {
    type Value = Vec<&'a RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ArgumentsSeed<'a> {
    type Value = Vec<&'a RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("'arguments' to be an array")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        // Bounded by the message size: every element is at least one byte of the record.
        let mut args = Vec::new();
        while let Some(raw) = seq.next_element::<&'a RawValue>()? {
            args.push(raw);
        }
        Ok(args)
    }
}

/// A JSON object of string values, in received order (duplicates kept).
struct HeadersDe(Headers);

impl<'de> Deserialize<'de> for HeadersDe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;
        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = HeadersDe;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<HeadersDe, M::Error> {
                let mut headers = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    headers.push((k, v));
                }
                Ok(HeadersDe(headers))
            }
        }
        deserializer.deserialize_map(HeadersVisitor)
    }
}

// ---- encoding ----

/// Appends one framed message.
///
/// On error (a value that cannot be rendered as JSON) `out` is left as it was.
pub fn encode(msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    match encode_body(msg, out) {
        Ok(()) => {
            out.push(RECORD_SEPARATOR);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends a JSON string literal (escaped as serde_json does: quotes, backslashes and
/// control characters; non-ASCII stays UTF-8, like ASP.NET's relaxed escaping).
fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), ProtocolError> {
    serde_json::to_writer(out, s).map_err(|e| ProtocolError::Json(e.to_string()))
}

fn write_headers(out: &mut Vec<u8>, headers: &Headers) -> Result<(), ProtocolError> {
    if headers.is_empty() {
        return Ok(());
    }
    out.extend_from_slice(b",\"headers\":{");
    for (i, (k, v)) in headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, k)?;
        out.push(b':');
        write_str(out, v)?;
    }
    out.push(b'}');
    Ok(())
}

fn write_type(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(b"{\"type\":");
    // Types are 1..=9: one digit.
    out.push(b'0' + ty % 10);
}

fn write_invocation_id(out: &mut Vec<u8>, id: &str) -> Result<(), ProtocolError> {
    out.extend_from_slice(b",\"invocationId\":");
    write_str(out, id)
}

fn encode_body(msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    write_type(out, msg.message_type());
    match msg {
        HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) => {
            write_headers(out, &inv.headers)?;
            if let Some(id) = &inv.invocation_id {
                write_invocation_id(out, id)?;
            }
            out.extend_from_slice(b",\"target\":");
            write_str(out, &inv.target)?;
            out.extend_from_slice(b",\"arguments\":[");
            for (i, arg) in inv.arguments.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                arg.write_json(out)?;
            }
            out.push(b']');
            if !inv.stream_ids.is_empty() {
                out.extend_from_slice(b",\"streamIds\":[");
                for (i, id) in inv.stream_ids.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, id)?;
                }
                out.push(b']');
            }
        }
        HubMessage::StreamItem(item) => {
            write_headers(out, &item.headers)?;
            write_invocation_id(out, &item.invocation_id)?;
            out.extend_from_slice(b",\"item\":");
            item.item.write_json(out)?;
        }
        HubMessage::Completion(c) => {
            write_headers(out, &c.headers)?;
            write_invocation_id(out, &c.invocation_id)?;
            match &c.result {
                CompletionResult::Void => {}
                CompletionResult::Value(v) => {
                    out.extend_from_slice(b",\"result\":");
                    v.write_json(out)?;
                }
                CompletionResult::Error(e) => {
                    out.extend_from_slice(b",\"error\":");
                    write_str(out, e)?;
                }
            }
        }
        HubMessage::CancelInvocation(c) => {
            write_headers(out, &c.headers)?;
            write_invocation_id(out, &c.invocation_id)?;
        }
        HubMessage::Ping => {}
        HubMessage::Close(c) => {
            if let Some(e) = &c.error {
                out.extend_from_slice(b",\"error\":");
                write_str(out, e)?;
            }
            if c.allow_reconnect {
                out.extend_from_slice(b",\"allowReconnect\":true");
            }
        }
        HubMessage::Ack(Ack { sequence_id }) | HubMessage::Sequence(Sequence { sequence_id }) => {
            out.extend_from_slice(b",\"sequenceId\":");
            out.extend_from_slice(sequence_id.to_string().as_bytes());
        }
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::test_support::hub_message;
    use crate::protocol::{ProtocolKind, DEFAULT_MAX_MESSAGE_SIZE};
    use proptest::prelude::*;

    fn j(text: &str) -> Value {
        Value::Json(Bytes::copy_from_slice(text.as_bytes()))
    }

    fn dec(input: &[u8]) -> Result<Option<HubMessage>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        decode(&mut buf, DEFAULT_MAX_MESSAGE_SIZE)
    }

    fn dec_ok(input: &str) -> HubMessage {
        dec(input.as_bytes()).unwrap().unwrap()
    }

    fn enc(msg: &HubMessage) -> String {
        let mut out = Vec::new();
        encode(msg, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn raw_arg(msg: &HubMessage, i: usize) -> &[u8] {
        match msg {
            HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) => {
                match &inv.arguments[i] {
                    Value::Json(b) => b,
                    other => panic!("not JSON: {other:?}"),
                }
            }
            other => panic!("not an invocation: {other:?}"),
        }
    }

    #[test]
    fn observed_client_transcript() {
        // Appendix A, client → server, as the 10.0.11 JS client writes it (type last).
        let input = concat!(
            "{\"type\":6}\x1e",
            "{\"target\":\"Add\",\"arguments\":[40,2],\"invocationId\":\"0\",\"type\":1}\x1e",
            "{\"target\":\"NoReply\",\"arguments\":[\"x\"],\"type\":1}\x1e",
            "{\"target\":\"Counter\",\"arguments\":[3],\"invocationId\":\"4\",\"type\":4}\x1e",
            "{\"target\":\"Upload\",\"arguments\":[\"arg\"],\"invocationId\":\"6\",\"streamIds\":[\"5\"],\"type\":1}\x1e",
            "{\"invocationId\":\"5\",\"item\":1,\"type\":2}\x1e",
            "{\"invocationId\":\"5\",\"type\":3}\x1e",
            "{\"invocationId\":\"s1\",\"result\":42,\"type\":3}\x1e",
            "{\"type\":8,\"sequenceId\":1}\x1e",
            "{\"type\":9,\"sequenceId\":1}\x1e",
            "{\"type\":7}\x1e",
        );
        let mut buf = BytesMut::from(input.as_bytes());
        let mut msgs = Vec::new();
        while let Some(m) = decode(&mut buf, DEFAULT_MAX_MESSAGE_SIZE).unwrap() {
            msgs.push(m);
        }
        assert!(buf.is_empty());
        let expected = vec![
            HubMessage::Ping,
            HubMessage::Invocation(Invocation {
                invocation_id: Some("0".into()),
                target: "Add".into(),
                arguments: vec![j("40"), j("2")],
                ..Default::default()
            }),
            HubMessage::Invocation(Invocation::send("NoReply", vec![j("\"x\"")])),
            HubMessage::StreamInvocation(Invocation {
                invocation_id: Some("4".into()),
                target: "Counter".into(),
                arguments: vec![j("3")],
                ..Default::default()
            }),
            HubMessage::Invocation(Invocation {
                invocation_id: Some("6".into()),
                target: "Upload".into(),
                arguments: vec![j("\"arg\"")],
                stream_ids: vec!["5".into()],
                ..Default::default()
            }),
            HubMessage::StreamItem(StreamItem {
                headers: vec![],
                invocation_id: "5".into(),
                item: j("1"),
            }),
            HubMessage::Completion(Completion::empty("5")),
            HubMessage::Completion(Completion::with_result("s1", j("42"))),
            HubMessage::Ack(Ack { sequence_id: 1 }),
            HubMessage::Sequence(Sequence { sequence_id: 1 }),
            HubMessage::Close(Close::default()),
        ];
        assert_eq!(msgs, expected);
        // Arguments are the exact text, sliced from the record.
        assert_eq!(raw_arg(&msgs[1], 0), b"40");
        assert_eq!(raw_arg(&msgs[2], 0), b"\"x\"");
    }

    #[test]
    fn server_messages_in_aspnet_layout() {
        let cases: Vec<(HubMessage, &str)> = vec![
            (
                HubMessage::Completion(Completion::with_result("0", j("42"))),
                r#"{"type":3,"invocationId":"0","result":42}"#,
            ),
            (
                HubMessage::Completion(Completion::with_result("1", Value::null())),
                r#"{"type":3,"invocationId":"1","result":null}"#,
            ),
            (
                HubMessage::Completion(Completion::with_error("2", "boom")),
                r#"{"type":3,"invocationId":"2","error":"boom"}"#,
            ),
            (
                HubMessage::StreamItem(StreamItem {
                    headers: vec![],
                    invocation_id: "4".into(),
                    item: j("0"),
                }),
                r#"{"type":2,"invocationId":"4","item":0}"#,
            ),
            (
                HubMessage::Completion(Completion::empty("4")),
                r#"{"type":3,"invocationId":"4"}"#,
            ),
            (
                HubMessage::Invocation(Invocation {
                    invocation_id: Some("s1".into()),
                    target: "GetAnswer".into(),
                    arguments: vec![j("41")],
                    ..Default::default()
                }),
                r#"{"type":1,"invocationId":"s1","target":"GetAnswer","arguments":[41]}"#,
            ),
            (
                HubMessage::Invocation(Invocation::send("recv", vec![j("\"hi\"")])),
                r#"{"type":1,"target":"recv","arguments":["hi"]}"#,
            ),
            (
                HubMessage::Invocation(Invocation {
                    headers: vec![("traceparent".into(), "00-ab".into())],
                    invocation_id: Some("7".into()),
                    target: "Up".into(),
                    arguments: vec![],
                    stream_ids: vec!["1".into(), "2".into()],
                }),
                r#"{"type":1,"headers":{"traceparent":"00-ab"},"invocationId":"7","target":"Up","arguments":[],"streamIds":["1","2"]}"#,
            ),
            (
                HubMessage::CancelInvocation(CancelInvocation {
                    headers: vec![],
                    invocation_id: "9".into(),
                }),
                r#"{"type":5,"invocationId":"9"}"#,
            ),
            (
                HubMessage::Close(Close {
                    error: Some("server says bye".into()),
                    allow_reconnect: true,
                }),
                r#"{"type":7,"error":"server says bye","allowReconnect":true}"#,
            ),
            (HubMessage::Close(Close::default()), r#"{"type":7}"#),
            (HubMessage::Ping, r#"{"type":6}"#),
            (
                HubMessage::Ack(Ack { sequence_id: 12 }),
                r#"{"type":8,"sequenceId":12}"#,
            ),
            (
                HubMessage::Sequence(Sequence {
                    sequence_id: u64::MAX,
                }),
                r#"{"type":9,"sequenceId":18446744073709551615}"#,
            ),
        ];
        for (msg, text) in cases {
            assert_eq!(enc(&msg), format!("{text}\x1e"));
            assert_eq!(dec_ok(&format!("{text}\x1e")), msg);
        }
        assert_eq!(enc(&HubMessage::Ping).as_bytes(), b"{\"type\":6}\x1e");
    }

    #[test]
    fn strings_are_escaped_and_values_transcoded() {
        let msg = HubMessage::Invocation(Invocation::send(
            "t\"x\n",
            vec![
                Value::MsgPack(Bytes::from_static(&[0xc4, 2, 0xff, 0x00])),
                Value::from_serialize(vec![1, 2]),
            ],
        ));
        assert_eq!(
            enc(&msg),
            "{\"type\":1,\"target\":\"t\\\"x\\n\",\"arguments\":[\"/wA=\",[1,2]]}\x1e"
        );
        assert_eq!(dec_ok(&enc(&msg)), msg);
    }

    #[test]
    fn odd_orders_and_unknown_properties() {
        let m = dec_ok("{\"arguments\":[{\"a\":[1,2]}, \"s\" ,null],\"extra\":{\"x\":[1]},\"type\":1,\"target\":\"T\",\"invocationId\":\"\"}\x1e");
        let HubMessage::Invocation(inv) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(inv.invocation_id, None, "empty id means non-blocking");
        assert_eq!(raw_arg(&m, 0), b"{\"a\":[1,2]}");
        assert_eq!(raw_arg(&m, 1), b"\"s\"");
        assert_eq!(raw_arg(&m, 2), b"null");
        let m = dec_ok("{\"result\":{\"k\":\"v\"},\"headers\":{\"b\":\"2\",\"a\":\"1\"},\"invocationId\":\"1\",\"type\":3}\x1e");
        let HubMessage::Completion(c) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(
            c.headers,
            vec![("b".into(), "2".into()), ("a".into(), "1".into())]
        );
        assert_eq!(c.result, CompletionResult::Value(j("{\"k\":\"v\"}")));
        // Whitespace around the object and inside is fine.
        assert_eq!(dec_ok(" {\n\"type\" : 6 } \x1e"), HubMessage::Ping);
        // Escaped key names are still recognised.
        assert_eq!(dec_ok("{\"typ\\u0065\":6}\x1e"), HubMessage::Ping);
        // result: null is a value; error: null with a result is allowed (ASP.NET).
        let m = dec_ok("{\"type\":3,\"invocationId\":\"1\",\"result\":null,\"error\":null}\x1e");
        assert_eq!(
            m,
            HubMessage::Completion(Completion::with_result("1", Value::null()))
        );
        // Close with error null and allowReconnect false.
        let m = dec_ok("{\"type\":7,\"error\":null,\"allowReconnect\":false}\x1e");
        assert_eq!(m, HubMessage::Close(Close::default()));
    }

    #[test]
    fn unknown_types_are_skipped() {
        let mut buf = BytesMut::from(
            &b"{\"type\":42,\"x\":1}\x1e{\"type\":-1}\x1e{\"type\":6}\x1e{\"type\":0}\x1e"[..],
        );
        assert_eq!(decode(&mut buf, 1024).unwrap(), Some(HubMessage::Ping));
        assert_eq!(decode(&mut buf, 1024).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn errors() {
        let err = |s: &str| dec(s.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            err("{\"type\":3,\"invocationId\":\"1\",\"result\":1,\"error\":\"e\"}\x1e"),
            "The 'error' and 'result' properties are mutually exclusive."
        );
        assert_eq!(
            err("{\"target\":\"x\",\"arguments\":[]}\x1e"),
            "Missing required property 'type'."
        );
        assert_eq!(
            err("{\"type\":\"1\"}\x1e"),
            "Expected 'type' to be of type Integer."
        );
        assert_eq!(
            err("{\"type\":1,\"arguments\":[]}\x1e"),
            "Missing required property 'target'."
        );
        assert_eq!(
            err("{\"type\":1,\"target\":\"x\"}\x1e"),
            "Missing required property 'arguments'."
        );
        assert_eq!(
            err("{\"type\":1,\"target\":\"\",\"arguments\":[]}\x1e"),
            "Expected 'target' to be a non-empty string."
        );
        assert_eq!(
            err("{\"type\":1,\"target\":5,\"arguments\":[]}\x1e"),
            "Expected 'target' to be of type String."
        );
        assert!(err("{\"type\":1,\"target\":\"x\",\"arguments\":5}\x1e")
            .contains("'arguments' to be an array"));
        assert_eq!(
            err("{\"type\":4,\"target\":\"x\",\"arguments\":[]}\x1e"),
            "Missing required property 'invocationId'."
        );
        assert_eq!(
            err("{\"type\":2,\"invocationId\":\"1\"}\x1e"),
            "Missing required property 'item'."
        );
        assert_eq!(
            err("{\"type\":2,\"item\":1}\x1e"),
            "Missing required property 'invocationId'."
        );
        assert_eq!(
            err("{\"type\":3,\"invocationId\":\"\"}\x1e"),
            "Missing required property 'invocationId'."
        );
        assert_eq!(
            err("{\"type\":5}\x1e"),
            "Missing required property 'invocationId'."
        );
        assert_eq!(
            err("{\"type\":8}\x1e"),
            "Missing required property 'sequenceId'."
        );
        assert_eq!(
            err("{\"type\":9,\"sequenceId\":-1}\x1e"),
            "Expected 'sequenceId' to be of type Integer."
        );
        assert_eq!(
            err("{\"type\":7,\"allowReconnect\":\"yes\"}\x1e"),
            "Expected 'allowReconnect' to be of type Boolean."
        );
        assert_eq!(
            err("{\"type\":1,\"target\":\"x\",\"arguments\":[],\"headers\":{\"a\":1}}\x1e"),
            "Expected 'headers' to be an object of String values."
        );
        assert_eq!(
            err("{\"type\":1,\"target\":\"x\",\"arguments\":[],\"streamIds\":[1]}\x1e"),
            "Expected 'streamIds' to be of type Array of String."
        );
        assert!(matches!(
            dec(b"{\"type\":6\xff}\x1e"),
            Err(ProtocolError::InvalidUtf8)
        ));
        assert!(matches!(
            dec(b"{\"type\":6\x1e"),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(dec(b"\x1e"), Err(ProtocolError::Json(_))));
        assert!(matches!(
            dec(b"[1]\x1e"),
            Err(ProtocolError::InvalidField(_))
        ));
        assert!(matches!(
            dec(b"{\"type\":6} x\x1e"),
            Err(ProtocolError::Json(_))
        ));
        assert!(matches!(
            dec(b"{\"type\":1,\"target\":\"x\",\"arguments\":[1,]}\x1e"),
            Err(ProtocolError::Json(_))
        ));
    }

    #[test]
    fn too_large() {
        let mut buf = BytesMut::from(&b"{\"type\":6}\x1e"[..]);
        assert!(matches!(
            decode(&mut buf, 10),
            Err(ProtocolError::TooLarge { limit: 10 })
        ));
        // The separator counts toward the limit, as in ASP.NET.
        let mut buf = BytesMut::from(&b"{\"type\":6}\x1e"[..]);
        assert_eq!(decode(&mut buf, 11).unwrap(), Some(HubMessage::Ping));
        let mut buf =
            BytesMut::from(&b"{\"type\":1,\"target\":\"x\",\"arguments\":[\"aaaaaaaa"[..]);
        assert!(matches!(
            decode(&mut buf, 16),
            Err(ProtocolError::TooLarge { limit: 16 })
        ));
    }

    #[test]
    fn encode_error_leaves_output_untouched() {
        let msg = HubMessage::Invocation(Invocation::send(
            "x",
            vec![Value::MsgPack(Bytes::from_static(&[0xa2, 0xff, 0xfe]))],
        ));
        let mut out = b"prev".to_vec();
        assert!(matches!(
            encode(&msg, &mut out),
            Err(ProtocolError::Value(_))
        ));
        assert_eq!(out, b"prev");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        // Up to the limit: the value is accepted and can be transcoded.
        let depth = MAX_DEPTH;
        let ok = format!(
            "{{\"type\":2,\"invocationId\":\"[\",\"item\":{}1{}}}\x1e",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let HubMessage::StreamItem(item) = dec_ok(&ok) else {
            panic!()
        };
        let mut mp = Vec::new();
        item.item.write_msgpack(&mut mp).unwrap();
        let mut back = Vec::new();
        crate::protocol::transcode::msgpack_to_json(&mp, &mut back).unwrap();
        // Many brackets inside strings do not count as nesting.
        let flat = format!(
            "{{\"type\":2,\"invocationId\":\"1\",\"item\":\"{}\"}}\x1e",
            "[{".repeat(300)
        );
        assert!(dec(flat.as_bytes()).unwrap().is_some());
        let wide = format!(
            "{{\"type\":2,\"invocationId\":\"1\",\"item\":[{}[]]}}\x1e",
            "[],".repeat(300)
        );
        assert!(dec(wide.as_bytes()).unwrap().is_some());
        let deep = format!(
            "{{\"type\":2,\"invocationId\":\"1\",\"item\":{}1{}}}\x1e",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(dec(deep.as_bytes()).is_err());
        // The bound is per value, as in MessagePack: an argument, an item and a result may
        // each nest MAX_DEPTH deep (the record two levels more), one more is refused.
        let nest = |d: usize| format!("{}1{}", "[".repeat(d), "]".repeat(d));
        for (value, fine) in [(nest(MAX_DEPTH), true), (nest(MAX_DEPTH + 1), false)] {
            for record in [
                format!("{{\"type\":1,\"target\":\"t\",\"arguments\":[{value}]}}\x1e"),
                format!("{{\"type\":2,\"invocationId\":\"1\",\"item\":{value}}}\x1e"),
                format!("{{\"type\":3,\"invocationId\":\"1\",\"result\":{value}}}\x1e"),
            ] {
                assert_eq!(dec(record.as_bytes()).is_ok(), fine, "{record:.60}");
            }
        }
        // What the MessagePack protocol accepts, re-encoded as JSON, decodes again (the
        // fuzzer found the two bounds 2 levels apart).
        let mut mp = Vec::new();
        let mut arg = vec![0x91; MAX_DEPTH];
        arg.push(0xc0);
        crate::protocol::transcode::msgpack_to_json(&arg, &mut mp).unwrap();
        let record = format!(
            "{{\"type\":1,\"target\":\"t\",\"arguments\":[{}]}}\x1e",
            String::from_utf8(mp).unwrap()
        );
        assert!(dec(record.as_bytes()).is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(msg in hub_message()) {
            let framed = enc(&msg);
            let mut buf = BytesMut::from(framed.as_bytes());
            let back = decode(&mut buf, usize::MAX).unwrap().unwrap();
            prop_assert_eq!(&back, &msg);
            prop_assert!(buf.is_empty());
            // Re-encoding the decoded message reproduces the same bytes.
            prop_assert_eq!(enc(&back), framed);
        }

        #[test]
        fn prefixes_are_incomplete(msg in hub_message()) {
            let framed = enc(&msg);
            for cut in 0..framed.len() {
                let mut buf = BytesMut::from(&framed.as_bytes()[..cut]);
                prop_assert!(decode(&mut buf, usize::MAX).unwrap().is_none());
                prop_assert_eq!(&buf[..], &framed.as_bytes()[..cut]);
            }
        }

        #[test]
        fn batches_decode_in_order(msgs in proptest::collection::vec(hub_message(), 1..5)) {
            let mut wire = Vec::new();
            for m in &msgs {
                ProtocolKind::Json.encode(m, &mut wire).unwrap();
            }
            let mut buf = BytesMut::from(&wire[..]);
            for m in &msgs {
                let decoded = ProtocolKind::Json.decode(&mut buf, usize::MAX).unwrap();
                prop_assert_eq!(decoded.as_ref(), Some(m));
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn oversize_rejected(msg in hub_message()) {
            let framed = enc(&msg);
            let limit = framed.len() - 2; // the record without 0x1E is one byte too long
            let mut buf = BytesMut::from(framed.as_bytes());
            let rejected = matches!(decode(&mut buf, limit), Err(ProtocolError::TooLarge { .. }));
            prop_assert!(rejected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode(&mut buf, 128) {}
        }

        #[test]
        fn arbitrary_text_records_never_panic(s in "[{}\\[\\]\":,a-z0-9 \\x1e]{0,80}") {
            let mut buf = BytesMut::from(s.as_bytes());
            while let Ok(Some(_)) = decode(&mut buf, 128) {}
        }
    }
}
