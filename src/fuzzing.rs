//! Fuzz entry points: one function per parser that takes bytes from the network or from a
//! peer node, each running the real parser and checking its invariants.
//!
//! The cargo-fuzz targets in `fuzz/` call these functions (one target each, same name), and
//! `protocol-tests/fuzz_replay.rs` replays the committed corpora through them on every test
//! run, so an input that once failed stays a regression test. A function *panics* when an
//! invariant does not hold (that is what the fuzzer reports); on any input the parsers
//! themselves must return an error, never panic. Checked throughout:
//!
//! - no panic, whatever the input;
//! - round trips wherever the codec has an encoder (decode → encode → decode gives the same
//!   message, and encoding is then a fixpoint);
//! - bounded output (nothing larger than the configured limits comes out, and an encoding or
//!   transcoding is at most a small constant factor larger than its input);
//! - stream parsers give the same messages however the transport splits the bytes.
//!
//! Inputs that carry several fields (a routing key and a body, a token and a user) split them
//! at NUL bytes, first field first; see [`fields`]. Pure: no I/O, no tokio runtime (the RESP
//! reader runs over an in-memory reader, which never waits).

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;

use crate::backplane::envelope;
use crate::backplane::resp::{self, Frame, RespReader};
use crate::backplane::{BackplaneMessage, BackplanePayload, RelayFrame, RelayKind};
use crate::http::negotiate::{self, Tokens};
use crate::ids::{ConnectionId, UserId, MAX_ID_LEN};
use crate::ingest::event;
use crate::protocol::framing;
use crate::protocol::handshake::{self, HandshakeError};
use crate::protocol::transcode;
use crate::protocol::{
    HubMessage, ProtocolError, ProtocolKind, DEFAULT_MAX_MESSAGE_SIZE, RECORD_SEPARATOR,
};

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("handshake", handshake),
    ("json", json),
    ("msgpack", msgpack),
    ("transcode", transcode),
    ("negotiate", negotiate),
    ("token", token),
    ("envelope", envelope),
    ("resp", resp),
    ("feed_event", feed_event),
    ("relay", relay),
    ("aspnet", aspnet),
];

/// Splits `data` into at most `n` fields at NUL bytes (the last field keeps any further
/// NULs). Fields that are not there are `None`.
pub fn fields(data: &[u8], n: usize) -> Vec<Option<&[u8]>> {
    let mut out = Vec::with_capacity(n);
    let mut rest = Some(data);
    for i in 0..n {
        let Some(r) = rest else {
            out.push(None);
            continue;
        };
        if i + 1 == n {
            out.push(Some(r));
            rest = None;
            continue;
        }
        match r.iter().position(|&b| b == 0) {
            Some(p) => {
                out.push(r.get(..p));
                rest = r.get(p + 1..);
            }
            None => {
                out.push(Some(r));
                rest = None;
            }
        }
    }
    out
}

fn text(field: Option<&[u8]>) -> String {
    String::from_utf8_lossy(field.unwrap_or_default()).into_owned()
}

/// A small size limit derived from the input, to exercise the max-size guards.
fn small_limit(data: &[u8]) -> usize {
    data.len() / 2 + 1
}

// ---- handshake ----

/// The handshake request (server side), the response (client side) and the error response.
pub fn handshake(data: &[u8]) {
    for limit in [DEFAULT_MAX_MESSAGE_SIZE, small_limit(data)] {
        let mut buf = BytesMut::from(data);
        let separator = data.iter().position(|&b| b == RECORD_SEPARATOR);
        match handshake::parse_request(&mut buf, limit) {
            Ok(Some(req)) => {
                let end = separator.expect("a handshake was parsed without its 0x1E");
                assert!(end < limit, "a handshake over the size limit was accepted");
                assert_eq!(
                    &buf[..],
                    data.get(end + 1..).unwrap_or_default(),
                    "the bytes after the handshake were not left for the hub protocol"
                );
                let mut again = Vec::new();
                handshake::write_request(&req.protocol, req.version, &mut again);
                let back = handshake::parse_request(&mut BytesMut::from(&again[..]), usize::MAX)
                    .expect("a written handshake request does not parse")
                    .expect("a written handshake request is incomplete");
                assert_eq!(back, req, "handshake request round trip");
            }
            Ok(None) => {
                assert_eq!(&buf[..], data, "an incomplete handshake consumed bytes");
                assert!(buf.len() < limit, "more than the limit buffered");
            }
            Err(HandshakeError::TooLarge { .. }) => {
                assert!(data.len() >= limit, "TooLarge below the limit");
            }
            Err(HandshakeError::Malformed(why)) => {
                assert!(!why.is_empty());
            }
        }
    }
    let _ = handshake::parse_response(&mut BytesMut::from(data));
    // Any text in an error response reaches the client intact (and ASCII: see
    // `error_response`).
    let error = String::from_utf8_lossy(data);
    let response = handshake::error_response(&error);
    assert!(response.is_ascii(), "an error response is not ASCII");
    assert_eq!(
        response.iter().filter(|&&b| b == RECORD_SEPARATOR).count(),
        1,
        "an error response holds a stray 0x1E"
    );
    if response.len() <= DEFAULT_MAX_MESSAGE_SIZE {
        let back = handshake::parse_response(&mut BytesMut::from(&response[..]))
            .expect("an error response does not parse")
            .expect("an error response is incomplete");
        assert_eq!(
            back.error.as_deref(),
            Some(&*error),
            "error text round trip"
        );
    }
}

// ---- hub protocols with framing ----

/// The JSON hub protocol with its 0x1E framing.
pub fn json(data: &[u8]) {
    hub_protocol(ProtocolKind::Json, data);
}

/// The MessagePack hub protocol with its VarInt length-prefix framing.
pub fn msgpack(data: &[u8]) {
    hub_protocol(ProtocolKind::MessagePack, data);
}

/// How decoding a whole buffer ended: `Ok(bytes left)` (waiting for more) or the error text.
type End = Result<usize, String>;

/// Decodes everything in `chunks`, fed one after another as a transport would deliver them.
fn decode_stream(kind: ProtocolKind, chunks: &[&[u8]], limit: usize) -> (Vec<HubMessage>, End) {
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match kind.decode(&mut buf, limit) {
                Ok(Some(m)) => {
                    assert!(buf.len() < before, "a decoded message consumed nothing");
                    messages.push(m);
                }
                Ok(None) => {
                    // (An incomplete VarInt prefix is at most 4 bytes, whatever the limit.)
                    let bound = limit.max(framing::MAX_VARINT_BYTES);
                    assert!(buf.len() < bound, "more than the limit buffered");
                    break;
                }
                Err(e) => return (messages, Err(e.to_string())),
            }
        }
    }
    (messages, Ok(buf.len()))
}

fn encode(kind: ProtocolKind, m: &HubMessage) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    kind.encode(m, &mut out).map(|()| out)
}

fn decode_one(kind: ProtocolKind, framed: &[u8]) -> HubMessage {
    let mut buf = BytesMut::from(framed);
    let m = kind
        .decode(&mut buf, usize::MAX)
        .unwrap_or_else(|e| panic!("{kind:?} cannot decode its own encoding: {e}"))
        .unwrap_or_else(|| panic!("{kind:?} encoding is incomplete or of an unknown type"));
    assert!(
        buf.is_empty(),
        "{kind:?}: bytes left after one encoded message"
    );
    m
}

/// Checks one encoded frame's framing: JSON ends with its only 0x1E and is UTF-8; a
/// MessagePack prefix gives the body's exact length.
fn check_frame(kind: ProtocolKind, framed: &[u8]) {
    match kind {
        ProtocolKind::Json => {
            assert_eq!(
                framed.last(),
                Some(&RECORD_SEPARATOR),
                "JSON frame without 0x1E"
            );
            assert_eq!(
                framed.iter().filter(|&&b| b == RECORD_SEPARATOR).count(),
                1,
                "a stray 0x1E inside an encoded JSON message"
            );
            assert!(std::str::from_utf8(framed).is_ok(), "JSON frame not UTF-8");
        }
        ProtocolKind::MessagePack => {
            let (len, prefix) = framing::read_varint(framed)
                .expect("bad VarInt prefix")
                .expect("incomplete VarInt prefix");
            assert_eq!(
                prefix + len,
                framed.len(),
                "VarInt prefix disagrees with the body"
            );
        }
    }
}

fn hub_protocol(kind: ProtocolKind, data: &[u8]) {
    let limit = DEFAULT_MAX_MESSAGE_SIZE;
    let (messages, end) = decode_stream(kind, &[data], limit);
    // The same messages and the same end however the transport splits the bytes.
    let (a, b) = (data.len() / 3, data.len() * 2 / 3);
    let chunks = [
        data.get(..a).unwrap_or_default(),
        data.get(a..b).unwrap_or_default(),
        data.get(b..).unwrap_or_default(),
    ];
    let (chunked, chunked_end) = decode_stream(kind, &chunks, limit);
    // (Compared by their encodings: cheaper than `Debug`, which transcodes every value.)
    let encodings = |ms: &[HubMessage]| -> Vec<Result<Vec<u8>, String>> {
        ms.iter()
            .map(|m| encode(kind, m).map_err(|e| e.to_string()))
            .collect()
    };
    assert_eq!(
        encodings(&chunked),
        encodings(&messages),
        "messages depend on how the bytes were split"
    );
    assert_eq!(
        chunked_end, end,
        "the end depends on how the bytes were split"
    );
    // A small limit: nothing larger comes out (checked in decode_stream).
    let _ = decode_stream(kind, &[data], small_limit(data));

    let other = match kind {
        ProtocolKind::Json => ProtocolKind::MessagePack,
        ProtocolKind::MessagePack => ProtocolKind::Json,
    };
    let mut encoded_total = 0usize;
    for m in &messages {
        // Same protocol: a decoded message re-encodes, decodes to itself, and the encoding
        // is a fixpoint.
        let framed = encode(kind, m)
            .unwrap_or_else(|e| panic!("a decoded {kind:?} message does not re-encode: {e}"));
        check_frame(kind, &framed);
        encoded_total += framed.len();
        // decode(encode(m)) encodes exactly as m does: the round trip keeps every field the
        // protocol carries (the encoder is a function of the message).
        let back = decode_one(kind, &framed);
        let again = encode(kind, &back).expect("re-encoding a round-tripped message");
        assert_eq!(again, framed, "{kind:?} encoding is not a fixpoint");

        // The other protocol (a recipient speaking it): an error is allowed (a value with
        // no rendering there), a panic or an undecodable encoding is not.
        if let Ok(cross) = encode(other, m) {
            check_frame(other, &cross);
            assert!(
                cross.len() <= 8 * framed.len() + 64,
                "{kind:?} → {other:?} blew up: {} → {} bytes",
                framed.len(),
                cross.len()
            );
            let back = decode_one(other, &cross);
            let again = encode(other, &back).expect("re-encoding a transcoded message");
            assert_eq!(again, cross, "{other:?} encoding of a transcoded message");
        }
    }
    assert!(
        encoded_total <= 2 * data.len() + 16 * messages.len(),
        "re-encoding grew the messages: {} → {encoded_total} bytes",
        data.len()
    );
}

// ---- value transcoding ----

fn to_json(mp: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    transcode::msgpack_to_json(mp, &mut out).ok().map(|()| out)
}

fn to_msgpack(json: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    transcode::json_to_msgpack(json, &mut out)
        .ok()
        .map(|()| out)
}

/// One argument value, transcoded both ways (as when a JSON client's argument reaches a
/// MessagePack recipient and the reverse).
pub fn transcode(data: &[u8]) {
    // The input as MessagePack.
    if let Some(json) = to_json(data) {
        assert!(
            json.len() <= 8 * data.len() + 32,
            "MessagePack → JSON blew up: {} → {} bytes",
            data.len(),
            json.len()
        );
        assert!(
            !json.contains(&RECORD_SEPARATOR),
            "a raw 0x1E in JSON output"
        );
        let parsed = parse_json::<serde::de::IgnoredAny>(&json);
        assert!(parsed.is_ok(), "MessagePack → JSON gave invalid JSON");
        // After one transcoding the value is representable in both: the round trip keeps
        // it (compared parsed: a float32 and the float64 it becomes print differently).
        let mp = to_msgpack(&json).expect("JSON from the transcoder does not transcode back");
        let json2 = to_json(&mp).expect("MessagePack from the transcoder does not transcode");
        let parse = |j: &[u8]| parse_json::<serde_json::Value>(j).ok();
        assert_eq!(
            parse(&json2),
            parse(&json),
            "JSON → MessagePack → JSON changed the value"
        );
        // And from then on it is exact.
        let mp2 = to_msgpack(&json2).expect("JSON from the transcoder does not transcode back");
        assert_eq!(to_json(&mp2).as_deref(), Some(&json2[..]), "not a fixpoint");
    }
    // The input as JSON.
    if let Some(mp) = to_msgpack(data) {
        assert!(
            mp.len() <= 2 * data.len() + 16,
            "JSON → MessagePack blew up: {} → {} bytes",
            data.len(),
            mp.len()
        );
        let json = to_json(&mp).expect("MessagePack from the transcoder does not transcode");
        let original = parse_json::<serde_json::Value>(data);
        let back = parse_json::<serde_json::Value>(&json);
        if let Ok(original) = original {
            assert_eq!(back.ok(), Some(original), "JSON → MessagePack → JSON");
        }
    }
}

// ---- negotiate ----

/// The negotiate query (version, stateful reconnect, `id`, `access_token`), the
/// `Authorization` header, and the response body built from them.
///
/// Fields: query, `Authorization` value, user id.
pub fn negotiate(data: &[u8]) {
    let f = fields(data, 3);
    let query = text(f[0]);
    let authorization = f[1].map(|a| String::from_utf8_lossy(a).into_owned());
    let user = text(f[2]);

    let version = negotiate::requested_version(&query);
    if let Ok(v) = version {
        assert!(v <= 1, "negotiate version {v} above 1");
    }
    let _ = negotiate::wants_stateful_reconnect(&query);
    if let Some(id) = crate::http::id_param_of(&query) {
        assert!(!id.is_empty());
    }
    if let Some(t) = crate::auth::token_from_request(Some(&query), authorization.as_deref()) {
        assert!(!t.is_empty(), "an empty bearer token was taken");
    }

    let tokens = Tokens::for_node(b"fuzz key", "node-a");
    for allow_stateful in [false, true] {
        let transports = crate::hub::Transports::default();
        let body = negotiate::response_body(&tokens, &user, &query, allow_stateful, &transports);
        let v: serde_json::Value =
            serde_json::from_slice(&body).expect("negotiate body is not JSON");
        let Ok(version) = version.as_ref() else {
            assert!(v.get("error").and_then(|e| e.as_str()).is_some());
            continue;
        };
        assert_eq!(v["negotiateVersion"], u64::from(*version));
        let id = v["connectionId"].as_str().expect("connectionId");
        let stateful = v.get("useStatefulReconnect").is_some();
        assert!(!stateful || (allow_stateful && *version >= 1));
        if *version >= 1 {
            let token = v["connectionToken"].as_str().expect("connectionToken");
            let info = tokens.inspect(token, &user).expect("own token refused");
            assert_eq!(info.id.as_str(), id);
            assert_eq!(info.stateful, stateful);
        } else {
            assert!(v.get("connectionToken").is_none());
            assert_eq!(
                tokens.check(id, "").map(|c| c.to_string()).ok().as_deref(),
                Some(id)
            );
        }
        assert!(v["availableTransports"]
            .as_array()
            .is_some_and(|t| t.len() == 3));
    }
}

// ---- connection tokens ----

const BASE64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Connection tokens (the `id=` of every transport request) and ids.
///
/// Fields: token, user, node, key.
pub fn token(data: &[u8]) {
    let f = fields(data, 4);
    let token = text(f[0]);
    let user = text(f[1]);
    let node = text(f[2]);
    let key = f[3].unwrap_or(&b"fuzz key"[..]);
    let tokens = Tokens::for_node(key, &node);

    // A token from the network: never a panic, and never accepted (it would need the MAC).
    assert!(
        tokens.check(&token, &user).is_err(),
        "a forged token was accepted"
    );
    assert!(tokens.inspect(&token, &user).is_err());
    assert!(tokens.id_of(&token, &user).is_none());
    assert!(tokens.remote_owner(&token, &user).is_none());

    // Ids from the network are validated once.
    for raw in [&token, &user, &node] {
        let valid =
            !raw.is_empty() && raw.len() <= MAX_ID_LEN && !raw.chars().any(char::is_control);
        assert_eq!(UserId::new(raw).is_ok(), valid);
        assert_eq!(ConnectionId::new(raw).is_ok(), valid);
    }

    // Tokens this node issues check back for their user only, with their flag and owner.
    let stateful = data.len() % 2 == 0;
    let (id, issued) = tokens.issue_with(&user, stateful);
    assert!(issued.len() <= (40 + negotiate::MAX_NODE_ID) * 4 / 3 + 4);
    assert!(
        issued.bytes().all(|b| BASE64URL.contains(&b)),
        "token not URL-safe"
    );
    let info = tokens
        .inspect(&issued, &user)
        .expect("an issued token was refused");
    assert_eq!((info.id, info.stateful), (id.clone(), stateful));
    assert_eq!(tokens.check(&issued, &user), Ok(id.clone()));
    assert!(
        tokens.check(&issued, &format!("{user}.")).is_err(),
        "token of another user"
    );
    assert!(
        tokens.remote_owner(&issued, &user).is_none(),
        "own token is remote"
    );
    let elsewhere = Tokens::for_node(key, "fuzz-other-node");
    let expected_owner =
        (!node.is_empty() && node.len() <= negotiate::MAX_NODE_ID && node != "fuzz-other-node")
            .then(|| node.clone());
    assert_eq!(elsewhere.remote_owner(&issued, &user), expected_owner);

    // One changed character: refused.
    if !issued.is_empty() {
        let at = usize::from(data.first().copied().unwrap_or(0)) % issued.len();
        let mut tampered = issued.clone().into_bytes();
        let pos = BASE64URL
            .iter()
            .position(|&b| b == tampered[at])
            .unwrap_or(0);
        let step = 1 + usize::from(data.last().copied().unwrap_or(0)) % (BASE64URL.len() - 1);
        tampered[at] = BASE64URL[(pos + step) % BASE64URL.len()];
        let tampered = String::from_utf8(tampered).expect("base64url is ASCII");
        assert!(
            tokens.check(&tampered, &user).is_err(),
            "a tampered token was accepted"
        );
    }

    // A negotiate v0 id is its own token, bound to no user.
    let v0 = tokens.issue_v0();
    assert_eq!(tokens.check(v0.as_str(), &user), Ok(v0.clone()));
}

// ---- backplane envelope ----

/// Decodes, re-encodes and decodes again: the same message, and a fixpoint encoding.
fn envelope_round_trip(msg: &BackplaneMessage, max_len: usize) {
    let Ok(bytes) = envelope::encode(msg) else {
        // Only foreign payloads that are not UTF-8 have no envelope form.
        assert!(
            matches!(&msg.payload, BackplanePayload::RawJson(b) if std::str::from_utf8(b).is_err()),
            "a decoded envelope does not re-encode: {msg:?}"
        );
        return;
    };
    assert!(
        bytes.len() <= max_len,
        "envelope encoding over {max_len} bytes: {}",
        bytes.len()
    );
    let back = envelope::decode(Bytes::from(bytes.clone()))
        .unwrap_or_else(|e| panic!("an encoded envelope does not decode: {e}"));
    assert_eq!(
        format!("{back:?}"),
        format!("{msg:?}"),
        "envelope round trip"
    );
    let again = envelope::encode(&back).expect("re-encoding a round-tripped envelope");
    assert_eq!(again, bytes, "envelope encoding is not a fixpoint");
}

/// A payload received on a backplane channel: a feedhub envelope or foreign JSON.
pub fn envelope(data: &[u8]) {
    let Ok(msg) = envelope::decode(Bytes::copy_from_slice(data)) else {
        assert!(data.starts_with(&envelope::MAGIC), "foreign text refused");
        return;
    };
    if envelope::is_aspnet(data) {
        assert!(matches!(&msg.payload, BackplanePayload::AspNet(b) if b[..] == *data));
    } else if !data.starts_with(&envelope::MAGIC) {
        assert!(matches!(&msg.payload, BackplanePayload::RawJson(b) if b[..] == *data));
    }
    if let BackplanePayload::RawJson(b) = &msg.payload {
        // What the hub does with it: validated before it becomes `FeedUpdated(<json>)`.
        let _ = crate::protocol::Value::json_checked(b.clone());
    }
    envelope_round_trip(&msg, data.len() + 64);
}

// ---- RESP ----

/// Replies on the Redis pub/sub connection.
pub fn resp(data: &[u8]) {
    let max_bulk = 64;
    let mut reader = RespReader::new(data, max_bulk);
    let mut frames = 0usize;
    loop {
        let next = reader
            .read_frame()
            .now_or_never()
            .expect("the RESP reader waited on an in-memory input");
        let Ok(frame) = next else { break };
        frames += 1;
        assert!(frames <= data.len(), "more frames than bytes");
        check_resp(&frame, max_bulk, true);
        // A command of those bulk strings reads back as the same array.
        if let Frame::Array(items) = &frame {
            let args: Option<Vec<&[u8]>> = items
                .iter()
                .map(|f| match f {
                    Frame::Bulk(b) => Some(&b[..]),
                    _ => None,
                })
                .collect();
            if let Some(args) = args {
                let mut out = Vec::new();
                resp::write_command(&mut out, args.iter().copied());
                let back = RespReader::new(&out[..], max_bulk)
                    .read_frame()
                    .now_or_never()
                    .expect("waited")
                    .expect("a written command does not read back");
                assert_eq!(back, frame, "RESP command round trip");
            }
        }
    }
}

fn check_resp(frame: &Frame, max_bulk: usize, top: bool) {
    match frame {
        Frame::Bulk(b) => assert!(b.len() <= max_bulk, "bulk over the limit kept"),
        Frame::Oversize(n) => assert!(*n > max_bulk),
        Frame::Array(items) => {
            assert!(top, "nested array");
            assert!(items.len() as i64 <= resp::MAX_ARRAY);
            for i in items {
                check_resp(i, max_bulk, false);
            }
        }
        Frame::Simple(s) | Frame::Error(s) => {
            // (Lossy UTF-8: an invalid byte becomes a 3-byte U+FFFD.)
            assert!(s.len() as u64 <= 3 * resp::MAX_LINE && !s.contains("\r\n"));
        }
        Frame::Int(_) | Frame::Null => {}
    }
}

// ---- feed events ----

/// A feed event from `POST /api/feed` or RabbitMQ.
///
/// Fields: body, routing key, message id.
pub fn feed_event(data: &[u8]) {
    let f = fields(data, 3);
    let body = f[0].unwrap_or_default();
    let key = text(f[1]);
    let message_id = f[2].map(|m| String::from_utf8_lossy(m).into_owned());
    for result in [
        event::decode_recipients_body(body),
        event::decode_message(&key, body, message_id.as_deref()),
    ] {
        let Ok(e) = result else { continue };
        assert!(!e.recipients.is_empty() && e.recipients.len() <= event::MAX_RECIPIENTS);
        for (i, r) in e.recipients.iter().enumerate() {
            assert!(!e.recipients[..i].contains(r), "duplicate recipient");
        }
        let payload = serde_json::from_slice::<serde::de::IgnoredAny>(&e.payload);
        assert!(payload.is_ok(), "an event payload is not JSON");
        let with_id = e.payload_with_id();
        let parsed = serde_json::from_slice::<serde_json::Value>(&with_id);
        match (
            &e.id,
            serde_json::from_slice::<serde_json::Value>(&e.payload),
        ) {
            (Some(id), Ok(serde_json::Value::Object(original))) => {
                let Ok(serde_json::Value::Object(obj)) = parsed else {
                    panic!("the id made the payload invalid: {with_id:?}");
                };
                match original.get("id") {
                    Some(kept) => assert_eq!(obj.get("id"), Some(kept), "id overwritten"),
                    None => assert_eq!(obj.get("id"), Some(&serde_json::json!(id))),
                }
                assert!(with_id.len() <= e.payload.len() + 6 * id.len() + 16);
            }
            (_, Ok(_)) => assert_eq!(with_id, e.payload, "a non-object payload changed"),
            (_, Err(_)) => {}
        }
    }
}

// ---- forwarded and relayed frames ----

/// A relay frame built from fields: selector byte, then by kind.
fn relay_from_fields(data: &[u8]) -> Option<BackplaneMessage> {
    let (&selector, rest) = data.split_first()?;
    let f = fields(rest, 5);
    let number = |i: usize| -> u64 {
        f[i].unwrap_or_default()
            .iter()
            .take(8)
            .fold(0u64, |n, &b| (n << 8) | u64::from(b))
    };
    let headers = |i: usize| -> Vec<(String, Bytes)> {
        f[i].unwrap_or_default()
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                Some((
                    String::from_utf8_lossy(line.get(..colon)?).into_owned(),
                    Bytes::copy_from_slice(line.get(colon + 1..)?),
                ))
            })
            .collect()
    };
    let body = |i: usize| Bytes::copy_from_slice(f[i].unwrap_or_default());
    let kind = match selector % 7 {
        0 => RelayKind::Open {
            connection: ConnectionId::new(&text(f[0])).ok()?,
            reply_node: text(f[1]),
        },
        1 => RelayKind::Opened { owner: text(f[0]) },
        2 => RelayKind::Data {
            seq: number(0),
            data: body(1),
            binary: selector & 0x80 != 0,
        },
        3 => RelayKind::Close,
        4 => RelayKind::Request {
            reply_node: text(f[0]),
            method: text(f[1]),
            uri: text(f[2]),
            headers: headers(3),
            body: body(4),
        },
        5 => RelayKind::Head {
            status: number(0) as u16,
            headers: headers(1),
            body: body(2),
            end: selector & 0x80 != 0,
        },
        _ => RelayKind::Claim {
            connection: ConnectionId::new(&text(f[0])).ok()?,
            reply_node: text(f[1]),
        },
    };
    Some(BackplaneMessage {
        origin: "fuzz".to_string(),
        payload: BackplanePayload::Relay(RelayFrame {
            relay: u64::from(selector),
            kind,
        }),
    })
}

/// Relay frames between nodes: forwarded Server-Sent Events and Long Polling requests and
/// their responses, relayed WebSocket bytes, claims. An envelope (starting with its magic),
/// or fields that build one (so the fuzzer reaches the relay handling without having to
/// find a valid envelope first).
pub fn relay(data: &[u8]) {
    let msg = if data.starts_with(&envelope::MAGIC) {
        let Ok(msg) = envelope::decode(Bytes::copy_from_slice(data)) else {
            return;
        };
        msg
    } else {
        let Some(msg) = relay_from_fields(data) else {
            return;
        };
        msg
    };
    // (Fields are read as lossy UTF-8: an invalid byte becomes a 3-byte U+FFFD.)
    envelope_round_trip(&msg, 4 * data.len() + 64);
    let BackplanePayload::Relay(frame) = &msg.payload else {
        return;
    };
    match &frame.kind {
        RelayKind::Request {
            method,
            uri,
            headers,
            ..
        } => {
            // The owner rebuilds the request: hop-by-hop headers never pass, nothing else
            // is invented, and what it would forward again is what it kept.
            if let Some(parts) = crate::http::forward::build_parts(method, uri, headers.clone()) {
                check_forwarded_headers(&parts.headers, headers);
            }
        }
        RelayKind::Head {
            status, headers, ..
        } => {
            let _ = http::StatusCode::from_u16(*status);
            let map = crate::http::forward::header_map(headers.clone());
            check_forwarded_headers(&map, headers);
        }
        RelayKind::Data { data, binary, .. } => {
            if !binary {
                // A relayed text frame becomes a WebSocket text frame only if it is UTF-8.
                let _ = tokio_tungstenite::tungstenite::Utf8Bytes::try_from(data.clone());
            }
        }
        RelayKind::Open { .. }
        | RelayKind::Opened { .. }
        | RelayKind::Close
        | RelayKind::Claim { .. } => {}
    }
}

fn check_forwarded_headers(map: &http::HeaderMap, pairs: &[(String, Bytes)]) {
    assert!(map.len() <= pairs.len(), "headers invented");
    for (name, value) in map {
        assert!(
            !crate::http::forward::hop_by_hop(name),
            "hop-by-hop header {name} passed"
        );
        assert!(
            pairs
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name.as_str()) && v[..] == *value.as_bytes()),
            "header {name} not from the input"
        );
    }
    let again = crate::http::forward::header_map(crate::http::forward::end_to_end(map));
    assert_eq!(&again, map, "forwarded headers are not a fixpoint");
}

/// Parses JSON as the transcoder does: serde_json's own recursion limit (127 levels) off,
/// since the transcoder bounds nesting at `transcode::MAX_DEPTH` (128) itself.
fn parse_json<T: serde::de::DeserializeOwned>(json: &[u8]) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

// ---- ASP.NET backplane payloads ----

/// A payload on an ASP.NET backplane channel (`backplane::aspnet`), read as each of the four
/// message kinds: whatever decodes re-encodes, decodes to the same message, and that
/// encoding is a fixpoint no more than 64 bytes longer than the input (extra items and
/// non-minimal forms are dropped, nothing is added but feedhub's origin tag).
pub fn aspnet(data: &[u8]) {
    use crate::backplane::aspnet as a;
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(inv) = a::decode_invocation(&bytes) {
        let enc = a::encode_invocation(&inv);
        assert!(
            enc.len() <= data.len() + 64,
            "invocation grew: {}",
            enc.len()
        );
        let back = a::decode_invocation(&Bytes::from(enc.clone())).expect("re-decode");
        assert_eq!(back, inv, "invocation round trip");
        assert_eq!(a::encode_invocation(&back), enc, "invocation fixpoint");
    }
    if let Ok(cmd) = a::decode_group_command(data) {
        let enc = a::encode_group_command(&cmd);
        assert!(enc.len() <= data.len() + 64);
        assert_eq!(a::decode_group_command(&enc).expect("re-decode"), cmd);
    }
    if let Ok(id) = a::decode_ack(data) {
        assert_eq!(a::decode_ack(&a::encode_ack(id)).expect("re-decode"), id);
    }
    if let Ok(c) = a::decode_completion(&bytes) {
        let enc = a::encode_completion(&c.protocol, &c.frame);
        assert!(enc.len() <= data.len() + 64);
        assert_eq!(
            a::decode_completion(&Bytes::from(enc)).expect("re-decode"),
            c
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_at_nul() {
        let a: &[u8] = b"a";
        let b: &[u8] = b"b";
        let rest: &[u8] = b"c\0d";
        assert_eq!(fields(b"a\0b\0c\0d", 3), [Some(a), Some(b), Some(rest)]);
        let body: &[u8] = b"body";
        assert_eq!(fields(b"body", 3), [Some(body), None, None]);
        let empty: &[u8] = b"";
        assert_eq!(fields(b"", 2), [Some(empty), None]);
    }

    #[test]
    fn targets_accept_empty_and_trivial_input() {
        for (name, target) in TARGETS {
            for input in [&b""[..], b"\0", b"\x1e", b"\xff\xff\xff\xff\xff"] {
                let r = std::panic::catch_unwind(|| target(input));
                assert!(r.is_ok(), "target {name} on {input:?}");
            }
        }
    }
}
