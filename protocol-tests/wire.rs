//! Raw-frame tests: the server's exact bytes and behaviour for handshakes, invocations and bad
//! input, over a real WebSocket against the conformance hub; plus the golden fixtures in
//! `protocol-tests/fixtures/` (see its README for each file's spec section).
//!
//! Section numbers (§) refer to `/work/shared/docs/signalr-protocol.md`.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use feedhub::protocol::{
    Ack, CancelInvocation, Close, Completion, CompletionResult, HubMessage, Invocation,
    ProtocolKind, Sequence, StreamItem, Value,
};
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn invoke(id: &str, target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::Invocation(Invocation {
        invocation_id: Some(id.into()),
        ..Invocation::send(target, args)
    })
}

fn send_only(target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::Invocation(Invocation::send(target, args))
}

fn stream_invoke(id: &str, target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::StreamInvocation(Invocation {
        invocation_id: Some(id.into()),
        ..Invocation::send(target, args)
    })
}

fn json(s: &str) -> Value {
    Value::json_checked(bytes::Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

fn encode(p: ProtocolKind, msg: &HubMessage) -> Vec<u8> {
    let mut out = Vec::new();
    p.encode(msg, &mut out).expect("encode");
    out
}

fn ping_bytes(p: ProtocolKind) -> &'static [u8] {
    match p {
        ProtocolKind::Json => b"{\"type\":6}\x1e",
        ProtocolKind::MessagePack => &[0x02, 0x91, 0x06],
    }
}

fn hub_url(s: &TestServer) -> String {
    format!("{}/testhub", s.ws_url())
}

/// Splits one framed message (with its separator or prefix) off the front of `buf`.
fn split_one(p: ProtocolKind, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    match p {
        ProtocolKind::Json => {
            let end = buf.iter().position(|&b| b == 0x1e)?;
            Some(buf.drain(..=end).collect())
        }
        ProtocolKind::MessagePack => {
            let mut len = 0usize;
            let mut i = 0;
            loop {
                let b = *buf.get(i)?;
                len |= usize::from(b & 0x7f) << (7 * i);
                i += 1;
                if b & 0x80 == 0 {
                    break;
                }
                assert!(i < 5, "server sent a VarInt prefix longer than 5 bytes");
            }
            if buf.len() < i + len {
                return None;
            }
            Some(buf.drain(..i + len).collect())
        }
    }
}

/// A raw client that also keeps the exact bytes of every message the server sends.
struct Peer {
    c: RawClient,
    p: ProtocolKind,
    pending: Vec<u8>,
}

impl Peer {
    async fn connect(s: &TestServer, p: ProtocolKind) -> Peer {
        Peer {
            c: RawClient::connect(&hub_url(s), p).await,
            p,
            pending: Vec::new(),
        }
    }

    /// Wraps an already handshaken client; `rest` are bytes already received after `{}␞`.
    fn wrap(mut c: RawClient, p: ProtocolKind, rest: &[u8]) -> Peer {
        c.protocol = p;
        Peer {
            c,
            p,
            pending: rest.to_vec(),
        }
    }

    /// The next framed message's bytes (pings skipped); `None` when the socket closed.
    async fn next_raw_opt(&mut self) -> Option<Vec<u8>> {
        loop {
            while let Some(m) = split_one(self.p, &mut self.pending) {
                if m != ping_bytes(self.p) {
                    return Some(m);
                }
            }
            let bytes = self.c.recv_raw().await?;
            self.pending.extend_from_slice(&bytes);
        }
    }

    async fn next_raw(&mut self) -> Vec<u8> {
        self.next_raw_opt().await.expect("server closed the socket")
    }

    async fn next_opt(&mut self) -> Option<HubMessage> {
        let raw = self.next_raw_opt().await?;
        let mut buf = BytesMut::from(&raw[..]);
        Some(
            self.p
                .decode(&mut buf, usize::MAX)
                .unwrap_or_else(|e| panic!("server sent undecodable bytes {raw:02x?}: {e}"))
                .unwrap_or_else(|| panic!("server sent an unknown message {raw:02x?}")),
        )
    }

    async fn next(&mut self) -> HubMessage {
        self.next_opt().await.expect("server closed the socket")
    }

    /// The next Completion, skipping other messages.
    async fn completion(&mut self) -> Completion {
        loop {
            if let HubMessage::Completion(c) = self.next().await {
                return c;
            }
        }
    }

    async fn send(&mut self, msg: &HubMessage) {
        self.c.send(msg).await;
    }

    /// Sends bytes in the frame type of the protocol (text for JSON, binary for MessagePack).
    async fn send_bytes(&mut self, bytes: Vec<u8>) {
        match self.p {
            ProtocolKind::Json => {
                self.c
                    .send_text(String::from_utf8(bytes).expect("utf8"))
                    .await
            }
            ProtocolKind::MessagePack => self.c.send_binary(bytes).await,
        }
    }

    /// Invokes `target` with id `id` and returns the Completion's result.
    async fn call(&mut self, id: &str, target: &str, args: Vec<Value>) -> CompletionResult {
        self.send(&invoke(id, target, args)).await;
        let c = self.completion().await;
        assert_eq!(c.invocation_id, id, "completion for another invocation");
        c.result
    }

    /// Checks the connection still works (Echo round trip).
    async fn assert_alive(&mut self, id: &str) {
        let r = self.call(id, "Echo", vec![json("\"still here\"")]).await;
        assert_eq!(r, CompletionResult::Value(json("\"still here\"")));
    }
}

fn err(text: &str) -> CompletionResult {
    CompletionResult::Error(text.to_string())
}

// ---------------------------------------------------------------------------------------
// 1. Golden fixtures (protocol-tests/fixtures, README there; §6.2 and §6.3)
// ---------------------------------------------------------------------------------------

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/protocol-tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

fn with_headers(mut msg: HubMessage, headers: &[(&str, &str)]) -> HubMessage {
    if let HubMessage::Invocation(inv) = &mut msg {
        inv.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    msg
}

fn with_stream_ids(mut msg: HubMessage, ids: &[&str]) -> HubMessage {
    if let HubMessage::Invocation(inv) | HubMessage::StreamInvocation(inv) = &mut msg {
        inv.stream_ids = ids.iter().map(|s| s.to_string()).collect();
    }
    msg
}

fn item(id: &str, v: &str) -> HubMessage {
    HubMessage::StreamItem(StreamItem {
        headers: Vec::new(),
        invocation_id: id.into(),
        item: json(v),
    })
}

fn close(error: Option<&str>, allow_reconnect: bool) -> HubMessage {
    HubMessage::Close(Close {
        error: error.map(str::to_string),
        allow_reconnect,
    })
}

/// Fixtures in the layout the server writes (name without extension → message), identical
/// for both protocols.
fn server_layout_fixtures() -> Vec<(&'static str, HubMessage)> {
    vec![
        ("invocation", send_only("recv", vec![json("\"hi\"")])),
        (
            "invocation_with_id",
            invoke("s1", "ClientResult", vec![json("42")]),
        ),
        (
            "invocation_stream_ids",
            with_stream_ids(invoke("6", "Upload", vec![json("\"arg\"")]), &["5"]),
        ),
        (
            "invocation_headers",
            with_headers(
                send_only("Send", vec![]),
                &[("traceparent", "00-abc-def-01")],
            ),
        ),
        (
            "stream_invocation",
            stream_invoke("4", "Counter", vec![json("3")]),
        ),
        ("stream_item", item("4", "\"a\"")),
        ("stream_item_null", item("4", "null")),
        (
            "completion_result",
            HubMessage::Completion(Completion::with_result("0", json("42"))),
        ),
        (
            "completion_null",
            HubMessage::Completion(Completion::with_result("1", Value::null())),
        ),
        (
            "completion_void",
            HubMessage::Completion(Completion::empty("4")),
        ),
        (
            "completion_error",
            HubMessage::Completion(Completion::with_error("2", "boom")),
        ),
        (
            "cancel_invocation",
            HubMessage::CancelInvocation(CancelInvocation {
                headers: Vec::new(),
                invocation_id: "4".into(),
            }),
        ),
        ("ping", HubMessage::Ping),
        ("close", close(None, false)),
        (
            "close_error",
            close(Some("Connection closed with an error."), false),
        ),
        (
            "close_allow_reconnect",
            close(Some("server says bye"), true),
        ),
        ("ack", HubMessage::Ack(Ack { sequence_id: 1 })),
        (
            "sequence",
            HubMessage::Sequence(Sequence { sequence_id: 1 }),
        ),
    ]
}

fn ext(p: ProtocolKind) -> &'static str {
    match p {
        ProtocolKind::Json => "json.txt",
        ProtocolKind::MessagePack => "msgpack.bin",
    }
}

/// Every server-layout fixture decodes to its message, and encoding that message gives
/// exactly the fixture's bytes. All mismatches are reported together.
#[test]
fn fixtures_server_layout_decode_and_encode_exactly() {
    let mut failures = Vec::new();
    for p in ProtocolKind::ALL {
        let mut list = server_layout_fixtures();
        if p == ProtocolKind::MessagePack {
            let long = format!("\"{}\"", "x".repeat(200));
            list.push(("stream_item_long", item("4", &long)));
            list.push(("ack_large", HubMessage::Ack(Ack { sequence_id: 300 })));
        }
        for (name, expected) in list {
            let file = format!("{name}.{}", ext(p));
            let bytes = fixture(&file);
            let mut buf = BytesMut::from(&bytes[..]);
            match p.decode(&mut buf, 32 * 1024) {
                Ok(Some(m)) if m == expected && buf.is_empty() => {}
                other => failures.push(format!(
                    "{file}: decode gave {other:?} (left {} bytes), expected {expected:?}",
                    buf.len()
                )),
            }
            let mut out = Vec::new();
            match p.encode(&expected, &mut out) {
                Ok(()) if out == bytes => {}
                Ok(()) => failures.push(format!(
                    "{file}: encode gave {:02x?} ({:?}), expected {:02x?} ({:?})",
                    out,
                    String::from_utf8_lossy(&out),
                    bytes,
                    String::from_utf8_lossy(&bytes)
                )),
                Err(e) => failures.push(format!("{file}: encode failed: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What the JS client writes (`type` last, 5-element MessagePack invocations, `[7, nil]`,
/// wide ints) decodes to the expected messages (§0 rules 6 and 7, §6.3).
#[test]
fn fixtures_client_layout_decode() {
    let common = vec![
        (
            "client_invocation",
            invoke("0", "Add", vec![json("40"), json("2")]),
        ),
        ("client_send", send_only("NoReply", vec![json("\"x\"")])),
        (
            "client_stream_invocation",
            stream_invoke("4", "Counter", vec![json("3")]),
        ),
        ("client_upload_item", item("5", "1")),
        (
            "client_upload_end",
            HubMessage::Completion(Completion::empty("5")),
        ),
        (
            "client_result",
            HubMessage::Completion(Completion::with_result("s1", json("42"))),
        ),
    ];
    let mut failures = Vec::new();
    for p in ProtocolKind::ALL {
        let mut list = common.clone();
        match p {
            ProtocolKind::Json => {
                list.push((
                    "client_upload_invocation",
                    with_stream_ids(invoke("6", "Upload", vec![json("\"arg\"")]), &["5"]),
                ));
                list.push((
                    "client_cancel_invocation",
                    HubMessage::CancelInvocation(CancelInvocation {
                        headers: Vec::new(),
                        invocation_id: "4".into(),
                    }),
                ));
            }
            ProtocolKind::MessagePack => {
                list.push(("client_close", close(None, false)));
                list.push(("client_ack_uint64", HubMessage::Ack(Ack { sequence_id: 1 })));
                list.push((
                    "client_sequence_uint32",
                    HubMessage::Sequence(Sequence { sequence_id: 7 }),
                ));
            }
        }
        for (name, expected) in list {
            let file = format!("{name}.{}", ext(p));
            let bytes = fixture(&file);
            let mut buf = BytesMut::from(&bytes[..]);
            match p.decode(&mut buf, 32 * 1024) {
                Ok(Some(m)) if m == expected && buf.is_empty() => {}
                other => failures.push(format!(
                    "{file}: decode gave {other:?}, expected {expected:?}"
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// All server-layout fixtures concatenated into one buffer (a batched frame, §4.2) decode
/// in order, and so do they when the buffer is fed one byte at a time (§11.1).
#[test]
fn fixtures_batched_and_byte_by_byte_decode_in_order() {
    for p in ProtocolKind::ALL {
        let list = server_layout_fixtures();
        let mut all = Vec::new();
        for (name, _) in &list {
            all.extend(fixture(&format!("{name}.{}", ext(p))));
        }
        let mut buf = BytesMut::from(&all[..]);
        for (name, expected) in &list {
            let got = p
                .decode(&mut buf, 32 * 1024)
                .expect("decode")
                .expect("message");
            assert_eq!(&got, expected, "{p:?} batched: {name}");
        }
        assert!(buf.is_empty());

        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &all {
            buf.extend_from_slice(&[*b]);
            while let Some(m) = p.decode(&mut buf, 32 * 1024).expect("decode") {
                got.push(m);
            }
        }
        let expected: Vec<HubMessage> = list.into_iter().map(|(_, m)| m).collect();
        assert_eq!(got, expected, "{p:?} byte by byte");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Wire behaviour over real sockets
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn echo_in_both_protocols() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c.call("1", "echo", vec![json("\"hi\"")]).await;
        assert_eq!(r, CompletionResult::Value(json("\"hi\"")));
    }
}

/// §5.2: success is exactly `{}␞`; §4.2: in a text frame on JSON, a binary frame on
/// MessagePack. The handshake request itself is a text frame on both.
#[tokio::test]
async fn handshake_success_is_exact_bytes_in_the_protocol_frame_type() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = RawClient::open(&hub_url(&s)).await;
        c.send_text(format!(
            "{{\"protocol\":\"{}\",\"version\":1}}\x1e",
            p.name()
        ))
        .await;
        let frame = loop {
            match within("handshake response", c.ws.next()).await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => break other,
            }
        };
        match (p, frame) {
            (ProtocolKind::Json, Some(Ok(Message::Text(t)))) => {
                assert_eq!(t.as_bytes(), b"{}\x1e", "JSON handshake response")
            }
            (ProtocolKind::MessagePack, Some(Ok(Message::Binary(b)))) => {
                assert_eq!(&b[..], b"{}\x1e", "MessagePack handshake response")
            }
            (p, other) => panic!("{p:?}: handshake response in the wrong frame: {other:?}"),
        }
    }
}

/// §5.1: protocol names are matched case-insensitively; version 2 is accepted.
#[tokio::test]
async fn handshake_protocol_name_is_case_insensitive_and_version_2_accepted() {
    let s = start_conformance_server().await;
    for (req, p) in [
        (
            "{\"protocol\":\"JSON\",\"version\":1}\x1e",
            ProtocolKind::Json,
        ),
        (
            "{\"version\":2,\"protocol\":\"json\"}\x1e",
            ProtocolKind::Json,
        ),
        (
            "{\"protocol\":\"MessagePack\",\"version\":1,\"extra\":[1,{\"a\":2}]}\x1e",
            ProtocolKind::MessagePack,
        ),
    ] {
        let mut c = RawClient::open(&hub_url(&s)).await;
        c.send_text(req).await;
        let resp = c.recv_raw().await.expect("handshake response");
        assert_eq!(resp, b"{}\x1e", "for {req:?}");
        let mut c = Peer::wrap(c, p, &[]);
        c.assert_alive("1").await;
    }
}

/// §5.1 "Trailing data" and §11.2: bytes after the handshake's 0x1E in the same frame are
/// hub messages.
#[tokio::test]
async fn handshake_and_invocation_in_one_frame() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = RawClient::open(&hub_url(&s)).await;
        let mut frame = format!("{{\"protocol\":\"{}\",\"version\":1}}\x1e", p.name()).into_bytes();
        frame.extend(encode(p, &invoke("1", "Echo", vec![json("\"first\"")])));
        match p {
            ProtocolKind::Json => c.send_text(String::from_utf8(frame).unwrap()).await,
            ProtocolKind::MessagePack => c.send_binary(frame).await,
        }
        let first = c.recv_raw().await.expect("handshake response");
        assert!(
            first.starts_with(b"{}\x1e"),
            "{p:?}: first frame must start with the whole handshake response, got {:?}",
            String::from_utf8_lossy(&first)
        );
        let mut c = Peer::wrap(c, p, &first[3..]);
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "1");
        assert_eq!(done.result, CompletionResult::Value(json("\"first\"")));
    }
}

/// §11.1: the handshake itself may arrive split across frames.
#[tokio::test]
async fn handshake_split_across_frames() {
    let s = start_conformance_server().await;
    let mut c = RawClient::open(&hub_url(&s)).await;
    for part in ["{\"proto", "col\":\"json\",", "\"version\":1}", "\x1e"] {
        c.send_text(part).await;
    }
    assert_eq!(c.recv_raw().await.expect("response"), b"{}\x1e");
    let mut c = Peer::wrap(c, ProtocolKind::Json, &[]);
    c.assert_alive("1").await;
}

/// §4.2 "Batching": several hub messages in one frame are all processed, in order.
#[tokio::test]
async fn several_messages_in_one_frame() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let mut frame = encode(p, &HubMessage::Ping);
        for i in 1..=5 {
            frame.extend(encode(
                p,
                &invoke(&i.to_string(), "Echo", vec![json(&i.to_string())]),
            ));
        }
        c.send_bytes(frame).await;
        for i in 1..=5 {
            let done = c.completion().await;
            assert_eq!(done.invocation_id, i.to_string(), "{p:?}: order");
            assert_eq!(done.result, CompletionResult::Value(json(&i.to_string())));
        }
    }
}

/// §11.1: a message split across frames (here: one byte per frame, and an odd split that
/// puts the end of one message and the start of the next in one frame) is reassembled.
#[tokio::test]
async fn message_split_across_frames() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let one = encode(p, &invoke("1", "Echo", vec![json("\"split\"")]));
        for b in &one {
            c.send_bytes(vec![*b]).await;
        }
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "1");
        assert_eq!(done.result, CompletionResult::Value(json("\"split\"")));

        let mut two = encode(p, &invoke("2", "Echo", vec![json("2")]));
        two.extend(encode(p, &invoke("3", "Echo", vec![json("3")])));
        let cut = two.len() / 2 + 3;
        c.send_bytes(two[..cut].to_vec()).await;
        c.send_bytes(two[cut..].to_vec()).await;
        assert_eq!(c.completion().await.invocation_id, "2");
        assert_eq!(c.completion().await.invocation_id, "3");
    }
}

/// §0 rule 6, §11.3: JSON property order is free; `type` may come last, `arguments` before
/// `target`, `result` before `invocationId`.
#[tokio::test]
async fn json_property_order_is_free() {
    let s = start_conformance_server().await;
    let mut c = Peer::connect(&s, ProtocolKind::Json).await;
    let frames = [
        "{\"target\":\"Echo\",\"arguments\":[\"a\"],\"invocationId\":\"1\",\"type\":1}\x1e",
        "{\"arguments\":[\"b\"],\"invocationId\":\"2\",\"type\":1,\"target\":\"Echo\"}\x1e",
        "{\"invocationId\":\"3\",\"type\":1,\"arguments\":[\"c\"],\"target\":\"ECHO\"}\x1e",
    ];
    for (i, f) in frames.iter().enumerate() {
        c.c.send_text(*f).await;
        let done = c.completion().await;
        assert_eq!(done.invocation_id, (i + 1).to_string());
    }
    // A stream invocation with `type` last, then a cancel with `type` last.
    c.c.send_text("{\"target\":\"Stream\",\"arguments\":[],\"invocationId\":\"4\",\"type\":4}\x1e")
        .await;
    let mut items = Vec::new();
    loop {
        match c.next().await {
            HubMessage::StreamItem(i) => items.push(i.item),
            HubMessage::Completion(done) => {
                assert_eq!(done.invocation_id, "4");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(items, vec![json("\"a\""), json("\"b\""), json("\"c\"")]);
}

/// §0 rule 7, §6.3: the JS client's 5-element Invocation; the reply is byte-exact.
#[tokio::test]
async fn msgpack_five_element_invocation() {
    let s = start_conformance_server().await;
    let mut c = Peer::connect(&s, ProtocolKind::MessagePack).await;
    // [1, {}, "1", "Echo", ["hi"]]
    c.send_bytes(vec![
        0x0e, 0x95, 0x01, 0x80, 0xa1, 0x31, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xa2, b'h', b'i',
    ])
    .await;
    // [3, {}, "1", 3, "hi"]
    assert_eq!(
        c.next_raw().await,
        vec![0x09, 0x95, 0x03, 0x80, 0xa1, 0x31, 0x03, 0xa2, b'h', b'i']
    );
    // 5-element non-blocking send: no reply; then a 6-element invocation with empty streamIds.
    c.send_bytes(vec![
        0x0d, 0x95, 0x01, 0x80, 0xc0, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xa2, b'n', b'o',
    ])
    .await;
    c.send_bytes(vec![
        0x0f, 0x96, 0x01, 0x80, 0xa1, 0x32, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xa2, b'h', b'i',
        0x90,
    ])
    .await;
    assert_eq!(
        c.next_raw().await,
        vec![0x09, 0x95, 0x03, 0x80, 0xa1, 0x32, 0x03, 0xa2, b'h', b'i']
    );
}

/// §0 rule 9, §6.2, §6.3: a void hub method completes with `result: null` (kind 3 + nil).
#[tokio::test]
async fn void_method_completes_with_null_result() {
    let s = start_conformance_server().await;
    let mut c = Peer::connect(&s, ProtocolKind::Json).await;
    c.send(&invoke("1", "JoinGroup", vec![json("\"g\"")])).await;
    assert_eq!(
        c.next_raw().await,
        b"{\"type\":3,\"invocationId\":\"1\",\"result\":null}\x1e"
    );
    let mut c = Peer::connect(&s, ProtocolKind::MessagePack).await;
    c.send(&invoke("1", "JoinGroup", vec![json("\"g\"")])).await;
    assert_eq!(
        c.next_raw().await,
        vec![0x07, 0x95, 0x03, 0x80, 0xa1, 0x31, 0x03, 0xc0]
    );
}

/// §7.5: a stream sends its items, then a Completion with no result (kind 2). Byte-exact.
#[tokio::test]
async fn stream_sends_items_then_empty_completion() {
    let s = start_conformance_server().await;
    let mut c = Peer::connect(&s, ProtocolKind::Json).await;
    c.send(&stream_invoke("7", "Stream", vec![])).await;
    for expected in [
        &b"{\"type\":2,\"invocationId\":\"7\",\"item\":\"a\"}\x1e"[..],
        b"{\"type\":2,\"invocationId\":\"7\",\"item\":\"b\"}\x1e",
        b"{\"type\":2,\"invocationId\":\"7\",\"item\":\"c\"}\x1e",
        b"{\"type\":3,\"invocationId\":\"7\"}\x1e",
    ] {
        assert_eq!(
            String::from_utf8_lossy(&c.next_raw().await),
            String::from_utf8_lossy(expected)
        );
    }
    let mut c = Peer::connect(&s, ProtocolKind::MessagePack).await;
    c.send(&stream_invoke("7", "Stream", vec![])).await;
    for expected in [
        vec![0x07, 0x94, 0x02, 0x80, 0xa1, 0x37, 0xa1, b'a'],
        vec![0x07, 0x94, 0x02, 0x80, 0xa1, 0x37, 0xa1, b'b'],
        vec![0x07, 0x94, 0x02, 0x80, 0xa1, 0x37, 0xa1, b'c'],
        vec![0x06, 0x94, 0x03, 0x80, 0xa1, 0x37, 0x02],
    ] {
        assert_eq!(c.next_raw().await, expected);
    }
    // An empty stream is just the empty completion.
    c.send(&stream_invoke("8", "EmptyStream", vec![])).await;
    assert_eq!(
        c.next_raw().await,
        vec![0x06, 0x94, 0x03, 0x80, 0xa1, 0x38, 0x02]
    );
}

/// §7.5 Cancellation: CancelInvocation stops InfiniteStream; the server still sends an empty
/// Completion, and the hub's cancellation callback sends `StreamCanceled` to the client.
#[tokio::test]
async fn cancel_invocation_stops_infinite_stream() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&stream_invoke("1", "InfiniteStream", vec![])).await;
        // Cancelling an unknown id is ignored.
        c.send(&HubMessage::CancelInvocation(CancelInvocation {
            headers: Vec::new(),
            invocation_id: "nope".into(),
        }))
        .await;
        c.send(&HubMessage::CancelInvocation(CancelInvocation {
            headers: Vec::new(),
            invocation_id: "1".into(),
        }))
        .await;
        let (mut completed, mut canceled) = (false, false);
        while !(completed && canceled) {
            match c.next().await {
                HubMessage::Completion(done) => {
                    assert_eq!(done.invocation_id, "1");
                    assert_eq!(
                        done.result,
                        CompletionResult::Void,
                        "{p:?}: cancelled stream completion must be empty"
                    );
                    completed = true;
                }
                HubMessage::Invocation(inv) => {
                    assert!(inv.target.eq_ignore_ascii_case("StreamCanceled"), "{inv:?}");
                    assert_eq!(inv.invocation_id, None);
                    canceled = true;
                }
                HubMessage::StreamItem(_) => {}
                other => panic!("{p:?}: unexpected {other:?}"),
            }
        }
        c.assert_alive("2").await;
    }
}

/// §7.4: a second stream invocation with an id already streaming is refused.
#[tokio::test]
async fn duplicate_stream_invocation_id_is_refused() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&stream_invoke("1", "InfiniteStream", vec![])).await;
        c.send(&stream_invoke("1", "InfiniteStream", vec![])).await;
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "1");
        assert_eq!(
            done.result,
            err("Invocation ID '1' is already in use."),
            "{p:?}"
        );
    }
}

/// §7.6: an upload stream (`streamIds`, items, then a Completion on the stream id) feeds the
/// hub method; the invocation completes with the method's result.
#[tokio::test]
async fn upload_stream_streaming_concat() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&with_stream_ids(
            invoke("1", "StreamingConcat", vec![]),
            &["2"],
        ))
        .await;
        for v in ["\"a\"", "\"b\"", "\"c\""] {
            c.send(&item("2", v)).await;
        }
        c.send(&HubMessage::Completion(Completion::empty("2")))
            .await;
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "1");
        assert_eq!(
            done.result,
            CompletionResult::Value(json("\"abc\"")),
            "{p:?}"
        );

        // Items and completions for unknown streams are ignored.
        c.send(&item("99", "\"x\"")).await;
        c.send(&HubMessage::Completion(Completion::empty("99")))
            .await;
        c.assert_alive("3").await;
    }
}

/// §7.4 stream-id count mismatch text.
#[tokio::test]
async fn upload_stream_count_mismatch() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c.call("1", "StreamingConcat", vec![]).await;
        assert_eq!(
            r,
            err("An unexpected error occurred invoking 'StreamingConcat' on the server. HubException: Client sent 0 stream(s), Hub method expects 1."),
            "{p:?}"
        );
    }
}

/// §11.6: an invocation without an id is never answered, not even with an error.
#[tokio::test]
async fn non_blocking_invocations_get_no_reply_even_on_error() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&send_only("DoesNotExist", vec![])).await;
        c.send(&send_only("ThrowException", vec![json("\"boom\"")]))
            .await;
        c.send(&send_only("Echo", vec![])).await;
        c.send(&send_only("JoinGroup", vec![json("{\"a\":1}")]))
            .await;
        c.send(&send_only("Stream", vec![])).await;
        c.send(&send_only("Echo", vec![json("\"ok\"")])).await;
        if p == ProtocolKind::Json {
            // An empty invocationId also means non-blocking (§6.2).
            c.c.send_text(
                "{\"type\":1,\"invocationId\":\"\",\"target\":\"DoesNotExist\",\"arguments\":[]}\x1e",
            )
            .await;
        }
        c.send(&invoke("9", "Echo", vec![json("\"after\"")])).await;
        let first = c.next().await;
        match first {
            HubMessage::Completion(done) if done.invocation_id == "9" => {
                assert_eq!(done.result, CompletionResult::Value(json("\"after\"")))
            }
            other => panic!("{p:?}: a non-blocking invocation was answered: {other:?}"),
        }
    }
}

/// §7.4, §11.12: the exact unknown-method text.
#[tokio::test]
async fn unknown_method_error_text() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c.call("1", "DoesNotExist", vec![json("1")]).await;
        assert_eq!(
            r,
            err("Failed to invoke 'DoesNotExist' due to an error on the server. HubException: Method does not exist."),
            "{p:?}"
        );
        c.assert_alive("2").await;
    }
}

/// §7.4: a HubException's text always reaches the client.
#[tokio::test]
async fn hub_exception_text() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c
            .call("1", "ThrowException", vec![json("\"An error occurred.\"")])
            .await;
        assert_eq!(
            r,
            err("An unexpected error occurred invoking 'ThrowException' on the server. HubException: An error occurred."),
            "{p:?}"
        );
        c.assert_alive("2").await;
    }
}

/// §7.4: streaming / non-streaming mismatch texts.
#[tokio::test]
async fn streaming_mismatch_texts() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c.call("1", "Stream", vec![]).await;
        assert_eq!(
            r,
            err("The client attempted to invoke the streaming 'Stream' method with a non-streaming invocation."),
            "{p:?}"
        );
        c.send(&stream_invoke("2", "Echo", vec![json("1")])).await;
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "2");
        assert_eq!(
            done.result,
            err("The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation."),
            "{p:?}"
        );
        c.assert_alive("3").await;
    }
}

/// §7.4: wrong argument count or types → the generic text (no details without
/// EnableDetailedErrors).
#[tokio::test]
async fn wrong_argument_count_and_type() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        let r = c.call("1", "Echo", vec![]).await;
        assert_eq!(
            r,
            err("Failed to invoke 'Echo' due to an error on the server."),
            "{p:?}"
        );
        let r = c.call("2", "Echo", vec![json("1"), json("2")]).await;
        assert_eq!(
            r,
            err("Failed to invoke 'Echo' due to an error on the server."),
            "{p:?}"
        );
        let r = c.call("3", "JoinGroup", vec![json("{\"a\":[1,2]}")]).await;
        assert_eq!(
            r,
            err("Failed to invoke 'JoinGroup' due to an error on the server."),
            "{p:?}"
        );
        let r = c.call("4", "Disconnect", vec![json("\"yes\"")]).await;
        assert_eq!(
            r,
            err("Failed to invoke 'Disconnect' due to an error on the server."),
            "{p:?}"
        );
        c.assert_alive("5").await;
    }
}

/// §7.7: the server sends an Invocation with id `s1` (then `s2`…); the client's Completion
/// resolves InvokeClientResult; an error reply becomes a HubException in the method.
#[tokio::test]
async fn client_results() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&invoke("1", "InvokeClientResult", vec![json("42")]))
            .await;
        // Byte-exact: the golden fixture of the server's client-result request.
        let raw = c.next_raw().await;
        assert_eq!(
            raw,
            fixture(&format!("invocation_with_id.{}", ext(p))),
            "{p:?}: client-result request {:?}",
            String::from_utf8_lossy(&raw)
        );
        // The JS client's reply puts `result` first (JSON) / kind 3 (MessagePack).
        match p {
            ProtocolKind::Json => {
                c.c.send_text("{\"result\":43,\"invocationId\":\"s1\",\"type\":3}\x1e")
                    .await
            }
            ProtocolKind::MessagePack => {
                c.send(&HubMessage::Completion(Completion::with_result(
                    "s1",
                    json("43"),
                )))
                .await
            }
        }
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "1");
        assert_eq!(done.result, CompletionResult::Value(json("43")), "{p:?}");

        c.send(&invoke("2", "InvokeClientResult", vec![json("1")]))
            .await;
        let request = match c.next().await {
            HubMessage::Invocation(inv) => inv,
            other => panic!("expected the client-result request, got {other:?}"),
        };
        assert_eq!(request.invocation_id.as_deref(), Some("s2"));
        c.send(&HubMessage::Completion(Completion::with_error(
            "s2", "nope",
        )))
        .await;
        let done = c.completion().await;
        assert_eq!(done.invocation_id, "2");
        assert_eq!(
            done.result,
            err("An unexpected error occurred invoking 'InvokeClientResult' on the server. HubException: nope"),
            "{p:?}"
        );
    }
}

/// §7.8: Disconnect(true) → Close with `allowReconnect: true` and no error, then the socket
/// closes; Disconnect(false) → plain Close. Byte-exact.
#[tokio::test]
async fn disconnect_sends_close_then_closes_socket() {
    let s = start_conformance_server().await;
    for (p, allow, expected) in [
        (
            ProtocolKind::Json,
            true,
            b"{\"type\":7,\"allowReconnect\":true}\x1e".to_vec(),
        ),
        (ProtocolKind::Json, false, b"{\"type\":7}\x1e".to_vec()),
        (
            ProtocolKind::MessagePack,
            true,
            vec![0x04, 0x93, 0x07, 0xc0, 0xc3],
        ),
        (
            ProtocolKind::MessagePack,
            false,
            vec![0x04, 0x93, 0x07, 0xc0, 0xc2],
        ),
    ] {
        let mut c = Peer::connect(&s, p).await;
        c.send(&invoke("1", "Disconnect", vec![json(&allow.to_string())]))
            .await;
        let close = loop {
            let raw = c.next_raw_opt().await.unwrap_or_else(|| {
                panic!("{p:?} allow={allow}: socket closed without a Close message")
            });
            let mut buf = BytesMut::from(&raw[..]);
            if let Ok(Some(HubMessage::Close(_))) = p.decode(&mut buf, usize::MAX) {
                break raw;
            }
        };
        assert_eq!(close, expected, "{p:?} allow={allow}");
        c.c.expect_closed().await;
    }
}

/// §7.2 and §0 rule 8: the server pings at least every 15 s (default interval) with exactly
/// `{"type":6}␞` (text) / `02 91 06` (binary), even when the client says nothing.
#[tokio::test]
async fn server_pings_within_keep_alive_interval() {
    let s = start_conformance_server().await;
    let check = |p: ProtocolKind| {
        let url = hub_url(&s);
        async move {
            let mut c = RawClient::connect(&url, p).await;
            let start = Instant::now();
            let frame = tokio::time::timeout(Duration::from_millis(16_500), async {
                loop {
                    match c.ws.next().await {
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        other => return other,
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{p:?}: no Ping within 16.5 s of the handshake"));
            let elapsed = start.elapsed();
            match (p, frame) {
                (ProtocolKind::Json, Some(Ok(Message::Text(t)))) => {
                    assert_eq!(t.as_bytes(), b"{\"type\":6}\x1e")
                }
                (ProtocolKind::MessagePack, Some(Ok(Message::Binary(b)))) => {
                    assert_eq!(&b[..], &[0x02, 0x91, 0x06])
                }
                (p, other) => panic!("{p:?}: expected a Ping frame, got {other:?}"),
            }
            // Not a burst of pings right after the handshake either.
            assert!(
                elapsed >= Duration::from_secs(5),
                "{p:?}: first ping after only {elapsed:?}"
            );
            let _ = c.ws.close(None).await;
        }
    };
    tokio::join!(check(ProtocolKind::Json), check(ProtocolKind::MessagePack));
}

/// The client's Ping, Ack and Sequence (stateful reconnect off) and its Close are handled:
/// pings and acks are ignored, Close ends the connection without an error Close back.
#[tokio::test]
async fn client_ping_ack_and_close() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Peer::connect(&s, p).await;
        c.send(&HubMessage::Ping).await;
        c.send(&HubMessage::Ack(Ack { sequence_id: 1 })).await;
        c.send(&HubMessage::Sequence(Sequence { sequence_id: 1 }))
            .await;
        c.assert_alive("1").await;
        match p {
            ProtocolKind::Json => c.c.send_text("{\"type\":7}\x1e").await,
            ProtocolKind::MessagePack => c.c.send_binary(vec![0x03, 0x92, 0x07, 0xc0]).await,
        }
        // After the client's Close the server sends nothing but (at most) a plain Close.
        while let Some(m) = c.next_opt().await {
            match m {
                HubMessage::Close(cl) => assert_eq!(cl.error, None, "{p:?}"),
                other => panic!("{p:?}: unexpected {other:?} after the client's Close"),
            }
        }
    }
}

/// A Close frame from the client ends things cleanly and the hub keeps serving.
#[tokio::test]
async fn websocket_close_frame_from_client() {
    let s = start_conformance_server().await;
    let mut c = RawClient::connect(&hub_url(&s), ProtocolKind::Json).await;
    within("close", c.ws.close(None)).await.expect("close");
    c.expect_closed().await;
    let mut c = Peer::connect(&s, ProtocolKind::Json).await;
    c.assert_alive("1").await;
    let _ = c.c.ws.send(Message::Close(None)).await;
}
