//! Bad input over real sockets: every kind of malformed handshake, message, frame and HTTP
//! request gets a clear error (ASP.NET's texts where ASP.NET has one) and never affects
//! other connections or the process. A raw WebSocket client written on a `TcpStream` lets
//! the tests send bytes no well-behaved library would (invalid UTF-8 in text frames,
//! protocol violations, huge length prefixes), and stop reading (slow consumer).
//!
//! Section numbers (§) refer to `/work/shared/docs/signalr-protocol.md`.

#[path = "support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use feedhub::protocol::{
    Completion, CompletionResult, HubMessage, Invocation, ProtocolKind, StreamItem, Value,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CLOSE_PREFIX: &str = "Connection closed with an error.";
const MAX_SIZE_TEXT: &str =
    "The maximum message size of 32768B was exceeded. The message size can be configured in AddHubOptions.";
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

// ---------------------------------------------------------------------------------------
// A raw WebSocket client
// ---------------------------------------------------------------------------------------

fn host_of(s: &TestServer) -> String {
    s.base_url.trim_start_matches("http://").to_string()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One client frame: FIN set unless `fin` is false, masked with a fixed key.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A WebSocket connection driven byte by byte.
struct RawWs {
    s: TcpStream,
    rbuf: Vec<u8>,
    /// A data message being reassembled from continuation frames.
    partial: Option<(u8, Vec<u8>)>,
}

/// What `read_message` saw.
#[derive(Debug, PartialEq)]
enum Incoming {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// A close frame (its payload).
    Close(Vec<u8>),
    /// The TCP connection ended (EOF or reset).
    Eof,
}

impl RawWs {
    async fn open(s: &TestServer, path: &str) -> RawWs {
        Self::open_with(s, path, None).await
    }

    /// Upgrades `path`; `recv_buf` shrinks the socket's receive buffer (slow consumers).
    async fn open_with(s: &TestServer, path: &str, recv_buf: Option<u32>) -> RawWs {
        let host = host_of(s);
        let sock = TcpSocket::new_v4().expect("socket");
        if let Some(n) = recv_buf {
            sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let mut stream = within("tcp connect", sock.connect(host.parse().expect("addr")))
            .await
            .expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        within("upgrade", stream.write_all(req.as_bytes()))
            .await
            .expect("write upgrade");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            let n = within("upgrade response", stream.read(&mut chunk))
                .await
                .expect("read upgrade response");
            assert!(n > 0, "server closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        RawWs {
            s: stream,
            rbuf: buf[end + 4..].to_vec(),
            partial: None,
        }
    }

    /// Writes raw bytes; errors (the server already closed) are returned, not panics.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(WAIT, self.s.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::other("write timed out")),
        }
    }

    async fn text(&mut self, payload: &[u8]) {
        self.write(&frame(true, OP_TEXT, payload))
            .await
            .expect("send text frame");
    }

    async fn binary(&mut self, payload: &[u8]) {
        self.write(&frame(true, OP_BINARY, payload))
            .await
            .expect("send binary frame");
    }

    /// Parses one frame off `rbuf` (server frames are unmasked).
    fn parse_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let b = &self.rbuf;
        if b.len() < 2 {
            return None;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(a) as usize, 10)
            }
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        let mut key = [0u8; 4];
        if masked {
            if b.len() < at + 4 {
                return None;
            }
            key.copy_from_slice(&b[at..at + 4]);
            at += 4;
        }
        if b.len() < at + len {
            return None;
        }
        let mut payload = b[at..at + len].to_vec();
        if masked {
            for (i, x) in payload.iter_mut().enumerate() {
                *x ^= key[i % 4];
            }
        }
        self.rbuf.drain(..at + len);
        Some((fin, opcode, payload))
    }

    /// The next data message or close; pings and pongs are skipped.
    async fn read_message_within(&mut self, limit: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Some((fin, opcode, payload)) = self.parse_frame() {
                match opcode {
                    OP_PING | OP_PONG => continue,
                    OP_CLOSE => return Some(Incoming::Close(payload)),
                    OP_CONT => {
                        let (op, mut data) =
                            self.partial.take().expect("continuation without start");
                        data.extend_from_slice(&payload);
                        if fin {
                            return Some(Self::data(op, data));
                        }
                        self.partial = Some((op, data));
                    }
                    op if fin => return Some(Self::data(op, payload)),
                    op => self.partial = Some((op, payload)),
                }
            }
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(Incoming::Eof),
                Ok(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn data(op: u8, data: Vec<u8>) -> Incoming {
        match op {
            OP_TEXT => Incoming::Text(data),
            _ => Incoming::Binary(data),
        }
    }

    async fn read_message(&mut self) -> Incoming {
        self.read_message_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("timed out after {WAIT:?} waiting for a frame"))
    }

    /// Reads until the server closes (close frame or EOF) within `WAIT`.
    async fn expect_closed(&mut self) {
        loop {
            match self.read_message().await {
                Incoming::Close(_) | Incoming::Eof => return,
                _ => continue,
            }
        }
    }
}

/// A hub connection on a [`RawWs`].
struct Conn {
    ws: RawWs,
    p: ProtocolKind,
    buf: BytesMut,
}

impl Conn {
    async fn connect(s: &TestServer, p: ProtocolKind) -> Conn {
        let mut ws = RawWs::open(s, "/testhub").await;
        ws.text(format!("{{\"protocol\":\"{}\",\"version\":1}}\x1e", p.name()).as_bytes())
            .await;
        let resp = ws.read_message().await;
        let ok = match p {
            ProtocolKind::Json => Incoming::Text(b"{}\x1e".to_vec()),
            ProtocolKind::MessagePack => Incoming::Binary(b"{}\x1e".to_vec()),
        };
        assert_eq!(resp, ok, "handshake");
        Conn {
            ws,
            p,
            buf: BytesMut::new(),
        }
    }

    fn encode(&self, msg: &HubMessage) -> Vec<u8> {
        let mut out = Vec::new();
        self.p.encode(msg, &mut out).expect("encode");
        out
    }

    /// Sends bytes in the protocol's frame type.
    async fn send_bytes(&mut self, bytes: &[u8]) {
        match self.p {
            ProtocolKind::Json => self.ws.text(bytes).await,
            ProtocolKind::MessagePack => self.ws.binary(bytes).await,
        }
    }

    async fn send(&mut self, msg: &HubMessage) {
        let bytes = self.encode(msg);
        self.send_bytes(&bytes).await;
    }

    /// The next hub message (pings skipped); `None` when the socket closed.
    async fn next_within(&mut self, limit: Duration) -> Option<HubMessage> {
        let deadline = Instant::now() + limit;
        loop {
            match self.p.decode(&mut self.buf, usize::MAX) {
                Ok(Some(HubMessage::Ping)) => continue,
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => panic!("server sent undecodable bytes: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ws.read_message_within(left).await {
                None => panic!("timed out after {limit:?} waiting for a hub message"),
                Some(Incoming::Text(b) | Incoming::Binary(b)) => self.buf.extend_from_slice(&b),
                Some(Incoming::Close(_) | Incoming::Eof) => return None,
            }
        }
    }

    async fn next(&mut self) -> Option<HubMessage> {
        self.next_within(WAIT).await
    }

    async fn completion(&mut self) -> Completion {
        loop {
            match self.next().await {
                Some(HubMessage::Completion(c)) => return c,
                Some(_) => continue,
                None => panic!("socket closed while waiting for a completion"),
            }
        }
    }

    async fn call(&mut self, id: &str, target: &str, args: Vec<Value>) -> CompletionResult {
        self.send(&invoke(id, target, args)).await;
        let c = self.completion().await;
        assert_eq!(c.invocation_id, id);
        c.result
    }

    async fn assert_alive(&mut self, id: &str) {
        let r = self.call(id, "Echo", vec![json("\"alive\"")]).await;
        assert_eq!(
            r,
            CompletionResult::Value(json("\"alive\"")),
            "Echo after bad input"
        );
    }

    /// Expects the server's Close message (returns it) followed by the socket closing.
    async fn expect_close_message(&mut self, what: &str) -> feedhub::protocol::Close {
        let close = loop {
            match self.next().await {
                Some(HubMessage::Close(c)) => break c,
                Some(_) => continue,
                None => panic!("{what}: socket closed without a Close message"),
            }
        };
        self.ws.expect_closed().await;
        close
    }
}

fn invoke(id: &str, target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::Invocation(Invocation {
        invocation_id: Some(id.into()),
        ..Invocation::send(target, args)
    })
}

fn json(s: &str) -> Value {
    Value::json_checked(bytes::Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

/// Problems with a Close message from an error end (§7.3, §7.8): the error must start with
/// `Connection closed with an error.`, and `allowReconnect` must be true (ASP.NET's
/// `HubConnectionContext` starts with `_allowReconnect = true`; only Abort, a client Close or
/// a failing OnConnected clear it).
fn error_close_problems(close: &feedhub::protocol::Close, what: &str) -> Vec<String> {
    let mut out = Vec::new();
    let error = close.error.as_deref().unwrap_or("");
    if !error.starts_with(CLOSE_PREFIX) {
        out.push(format!(
            "{what}: Close error {:?} must start with {CLOSE_PREFIX:?}",
            close.error
        ));
    }
    if !close.allow_reconnect {
        out.push(format!(
            "{what}: an error Close must have allowReconnect true (ASP.NET), got {close:?}"
        ));
    }
    out
}

/// Runs `cases` (each on a fresh connection in protocol `p`; each frame sent as a binary
/// frame) and checks each ends with an error Close and then the socket closing; `extra` adds
/// per-case checks on the Close. Returns every problem found.
async fn error_close_cases(
    s: &TestServer,
    p: ProtocolKind,
    cases: Vec<(&str, Vec<Vec<u8>>)>,
    extra: impl Fn(&str, &feedhub::protocol::Close) -> Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (what, frames) in cases {
        let mut c = Conn::connect(s, p).await;
        for f in &frames {
            if c.ws.write(&frame(true, OP_BINARY, f)).await.is_err() {
                break;
            }
        }
        let close = loop {
            match c.next().await {
                Some(HubMessage::Close(cl)) => break Some(cl),
                Some(_) => continue,
                None => break None,
            }
        };
        match close {
            None => problems.push(format!("{what}: socket closed without a Close message")),
            Some(close) => {
                c.ws.expect_closed().await;
                problems.extend(error_close_problems(&close, what));
                problems.extend(extra(what, &close));
            }
        }
    }
    problems
}

async fn http_status(s: &TestServer, path: &str) -> u16 {
    let mut stream = within("connect", TcpStream::connect(host_of(s)))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    within("write", stream.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut out = Vec::new();
    within("read", stream.read_to_end(&mut out))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"))
}

/// Sends `handshake` bytes in a text frame and expects exactly `{"error":"<text>"}␞` in a
/// text frame (§4.2: ASP.NET answers in text before a protocol is chosen), then the close.
async fn expect_handshake_error(s: &TestServer, frames: &[&[u8]], text: &str) {
    let mut ws = RawWs::open(s, "/testhub").await;
    for f in frames {
        let _ = ws.write(&frame(true, OP_TEXT, f)).await;
    }
    let expected = format!("{{\"error\":\"{text}\"}}\x1e").into_bytes();
    let got = ws.read_message().await;
    assert_eq!(
        got,
        Incoming::Text(expected),
        "handshake {:?}: got {:?}",
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(f))
            .collect::<Vec<_>>(),
        match &got {
            Incoming::Text(b) | Incoming::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        }
    );
    ws.expect_closed().await;
}

// ---------------------------------------------------------------------------------------
// Handshake errors (§5.2)
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_handshake_json() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::Json).await;
    let text = "An unexpected error occurred during connection handshake.";
    for bad in [
        &b"{\"protocol\":}\x1e"[..],
        b"{\"protocol\":\"json\"}\x1e",
        b"{\"version\":1}\x1e",
        b"[]\x1e",
        b"\"json\"\x1e",
        b"\x1e",
        b"{}\x1e",
        b"{\"protocol\":1,\"version\":1}\x1e",
        b"{\"protocol\":\"json\",\"version\":\"1\"}\x1e",
        b"{\"protocol\":\"json\",\"version\":1.5}\x1e",
        b"{\"protocol\":\"json\",\"version\":null}\x1e",
        b"{\"protocol\":\"json\",\"version\":1\x1e",
        b"not json at all\x1e",
    ] {
        expect_handshake_error(&s, &[bad], text).await;
    }
    bystander.assert_alive("1").await;
}

#[tokio::test]
async fn unknown_protocol_and_unsupported_version() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::MessagePack).await;
    for (req, text) in [
        (
            &b"{\"protocol\":\"x\",\"version\":1}\x1e"[..],
            "The protocol 'x' is not supported.",
        ),
        (
            b"{\"protocol\":\"blazorpack\",\"version\":1}\x1e",
            "The protocol 'blazorpack' is not supported.",
        ),
        (
            b"{\"protocol\":\"json\",\"version\":3}\x1e",
            "The server does not support version 3 of the 'json' protocol.",
        ),
        (
            b"{\"protocol\":\"messagepack\",\"version\":3}\x1e",
            "The server does not support version 3 of the 'messagepack' protocol.",
        ),
    ] {
        expect_handshake_error(&s, &[req], text).await;
    }
    bystander.assert_alive("1").await;
}

/// §5.1 size limit: more than 32 KiB without a 0x1E → `Handshake was canceled.`
#[tokio::test]
async fn oversize_handshake() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::Json).await;
    let mut big = b"{\"protocol\":\"json\",\"version\":1,\"pad\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'a', 40 * 1024));
    let parts: Vec<&[u8]> = big.chunks(8 * 1024).collect();
    expect_handshake_error(&s, &parts, "Handshake was canceled.").await;
    bystander.assert_alive("1").await;
}

/// §5.1: no (complete) handshake within 15 s → `Handshake was canceled.`, then close.
#[tokio::test]
async fn handshake_timeout() {
    let s = start_conformance_server().await;
    let check = |partial: &'static [u8]| {
        let s = &s;
        async move {
            let mut ws = RawWs::open(s, "/testhub").await;
            if !partial.is_empty() {
                ws.text(partial).await;
            }
            let start = Instant::now();
            let got = ws
                .read_message_within(Duration::from_millis(16_500))
                .await
                .unwrap_or_else(|| panic!("no answer within 16.5 s (partial {partial:?})"));
            let elapsed = start.elapsed();
            assert_eq!(
                got,
                Incoming::Text(b"{\"error\":\"Handshake was canceled.\"}\x1e".to_vec()),
                "partial {partial:?}"
            );
            assert!(
                elapsed >= Duration::from_secs(13),
                "handshake timed out after only {elapsed:?}; ASP.NET's default is 15 s"
            );
            ws.expect_closed().await;
        }
    };
    tokio::join!(check(b""), check(b"{\"protocol\":\"json\""));
    let mut c = Conn::connect(&s, ProtocolKind::Json).await;
    c.assert_alive("1").await;
}

// ---------------------------------------------------------------------------------------
// Bad hub messages
// ---------------------------------------------------------------------------------------

/// Malformed JSON after the handshake: Close whose error starts with `Connection closed with
/// an error.`, then the socket closes. Other connections are unaffected.
#[tokio::test]
async fn bad_json_after_handshake() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::Json).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated object", b"{\"type\":1,\x1e".to_vec()),
        ("not json", b"not json\x1e".to_vec()),
        ("array", b"[1,2]\x1e".to_vec()),
        (
            "type as string",
            b"{\"type\":\"1\",\"target\":\"Echo\",\"arguments\":[]}\x1e".to_vec(),
        ),
        (
            "missing type",
            b"{\"target\":\"Echo\",\"arguments\":[]}\x1e".to_vec(),
        ),
        (
            "missing target",
            b"{\"type\":1,\"invocationId\":\"1\",\"arguments\":[]}\x1e".to_vec(),
        ),
        (
            "empty target",
            b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"\",\"arguments\":[]}\x1e".to_vec(),
        ),
        (
            "arguments object",
            b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"Echo\",\"arguments\":{}}\x1e"
                .to_vec(),
        ),
        (
            "missing arguments",
            b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"Echo\"}\x1e".to_vec(),
        ),
        ("completion without id", b"{\"type\":3}\x1e".to_vec()),
        (
            "stream item without item",
            b"{\"type\":2,\"invocationId\":\"1\"}\x1e".to_vec(),
        ),
        (
            "result and error",
            b"{\"type\":3,\"invocationId\":\"1\",\"result\":1,\"error\":\"x\"}\x1e".to_vec(),
        ),
        (
            "stream invocation without id",
            b"{\"type\":4,\"target\":\"Stream\",\"arguments\":[]}\x1e".to_vec(),
        ),
        (
            "invocationId number",
            b"{\"type\":1,\"invocationId\":1,\"target\":\"Echo\",\"arguments\":[1]}\x1e".to_vec(),
        ),
        (
            "headers not strings",
            b"{\"type\":1,\"headers\":{\"a\":1},\"target\":\"Echo\",\"arguments\":[1]}\x1e"
                .to_vec(),
        ),
        (
            "invalid utf-8 in a string",
            b"{\"type\":1,\"target\":\"Ech\xff\",\"arguments\":[]}\x1e".to_vec(),
        ),
        ("deep nesting", {
            let mut v = b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[".to_vec();
            v.extend(std::iter::repeat_n(b'[', 10_000));
            v.extend(std::iter::repeat_n(b']', 10_000));
            v.extend_from_slice(b"]}\x1e");
            v
        }),
    ];
    // Binary frames: text frames must be UTF-8, and frame types do not matter (§4.2).
    let cases = cases.into_iter().map(|(w, b)| (w, vec![b])).collect();
    let problems = error_close_cases(&s, ProtocolKind::Json, cases, |_, _| None).await;
    bystander.assert_alive("1").await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// §6.1: messages of an unknown type are ignored; the connection keeps working.
#[tokio::test]
async fn unknown_message_types_are_ignored() {
    let s = start_conformance_server().await;
    let mut c = Conn::connect(&s, ProtocolKind::Json).await;
    for m in [
        &b"{\"type\":99}\x1e"[..],
        b"{\"type\":99,\"x\":[1,{\"y\":2}],\"invocationId\":\"1\"}\x1e",
        b"{\"type\":0}\x1e",
        b"{\"type\":10,\"target\":\"Echo\",\"arguments\":[1],\"invocationId\":\"1\"}\x1e",
        b"{\"arguments\":[],\"type\":12345}\x1e",
    ] {
        c.send_bytes(m).await;
    }
    c.assert_alive("1").await;
    // Unknown type batched in front of a real message in one frame.
    let mut frame = b"{\"type\":42}\x1e".to_vec();
    frame.extend(c.encode(&invoke("2", "Echo", vec![json("2")])));
    c.send_bytes(&frame).await;
    assert_eq!(c.completion().await.invocation_id, "2");

    let mut c = Conn::connect(&s, ProtocolKind::MessagePack).await;
    for m in [
        &[0x02, 0x91, 0x63][..],               // [99]
        &[0x05, 0x93, 0x63, 0x80, 0xa1, 0x31], // [99, {}, "1"]
        &[0x02, 0x91, 0x00],                   // [0]
        &[0x04, 0x91, 0xcd, 0x30, 0x39],       // [12345]
    ] {
        c.send_bytes(m).await;
    }
    c.assert_alive("1").await;
}

/// §7.3: a message over 32 KiB → Close with the max-size text, then close; the frame-level
/// limit (a WebSocket message far larger) ends the same way. Other connections unaffected.
#[tokio::test]
async fn oversize_messages() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::Json).await;

    let big_json = |n: usize| {
        let mut v =
            b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"Echo\",\"arguments\":[\"".to_vec();
        v.extend(std::iter::repeat_n(b'x', n));
        v.extend_from_slice(b"\"]}\x1e");
        v
    };
    // (what, protocol, frames)
    let mut cases: Vec<(&str, ProtocolKind, Vec<Vec<u8>>)> = vec![
        (
            "40 KiB JSON message in one frame",
            ProtocolKind::Json,
            vec![big_json(40 * 1024)],
        ),
        (
            "40 KiB JSON without separator over several frames",
            ProtocolKind::Json,
            big_json(40 * 1024)[..40 * 1024]
                .chunks(4096)
                .map(<[u8]>::to_vec)
                .collect(),
        ),
        (
            "200 KiB JSON frame",
            ProtocolKind::Json,
            vec![big_json(200 * 1024)],
        ),
        (
            "MessagePack prefix declaring 40000 bytes",
            ProtocolKind::MessagePack,
            vec![vec![0xc0, 0xb8, 0x02, 0x95, 0x01]],
        ),
    ];
    let mut mp = vec![0x80, 0x80, 0x04]; // 65536
    mp.extend(std::iter::repeat_n(0u8, 65536));
    cases.push((
        "64 KiB MessagePack message",
        ProtocolKind::MessagePack,
        vec![mp],
    ));

    let mut problems = Vec::new();
    for p in ProtocolKind::ALL {
        let mine = cases
            .iter()
            .filter(|c| c.1 == p)
            .map(|(w, _, f)| (*w, f.clone()))
            .collect();
        problems.extend(
            error_close_cases(&s, p, mine, |what, close| {
                let e = close.error.as_deref().unwrap_or("");
                (!e.contains(MAX_SIZE_TEXT))
                    .then(|| format!("{what}: Close error {e:?} should carry the max-size text"))
            })
            .await,
        );
    }
    bystander.assert_alive("1").await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// §7.3: ASP.NET parses within a window of `MaximumReceiveMessageSize` bytes of input, so the
/// limit counts the whole framed message (JSON with its 0x1E, MessagePack with its VarInt
/// prefix): 32768 framed bytes pass, 32769 do not.
#[tokio::test]
async fn max_message_size_boundary_counts_framing_bytes() {
    let s = start_conformance_server().await;
    let mut problems = Vec::new();
    for p in ProtocolKind::ALL {
        for total in [32_768usize, 32_769] {
            let msg = match p {
                ProtocolKind::Json => {
                    let head =
                        b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"Echo\",\"arguments\":[\"";
                    let tail = b"\"]}\x1e";
                    let mut v = head.to_vec();
                    v.extend(std::iter::repeat_n(b'x', total - head.len() - tail.len()));
                    v.extend_from_slice(tail);
                    v
                }
                ProtocolKind::MessagePack => {
                    // [1, {}, "1", "Echo", [str16]] with a 3-byte VarInt prefix.
                    let fixed = [
                        0x95, 0x01, 0x80, 0xa1, b'1', 0xa4, b'E', b'c', b'h', b'o', 0x91,
                    ];
                    let n = total - 3 - fixed.len() - 3;
                    let body_len = fixed.len() + 3 + n;
                    let mut v = vec![
                        (body_len & 0x7f) as u8 | 0x80,
                        ((body_len >> 7) & 0x7f) as u8 | 0x80,
                        (body_len >> 14) as u8,
                    ];
                    v.extend_from_slice(&fixed);
                    v.push(0xda);
                    v.extend_from_slice(&(n as u16).to_be_bytes());
                    v.extend(std::iter::repeat_n(b'x', n));
                    v
                }
            };
            assert_eq!(msg.len(), total);
            let mut c = Conn::connect(&s, p).await;
            c.send_bytes(&msg).await;
            let first = c.next().await;
            let seen = match &first {
                Some(HubMessage::Completion(c)) => format!(
                    "a Completion ({})",
                    match c.result {
                        CompletionResult::Value(_) => "value",
                        CompletionResult::Error(_) => "error",
                        CompletionResult::Void => "void",
                    }
                ),
                Some(HubMessage::Close(c)) => format!("Close {:?}", c.error),
                Some(m) => format!("message type {}", m.message_type()),
                None => "the socket closing".to_string(),
            };
            let ok = if total <= 32_768 {
                matches!(&first, Some(HubMessage::Completion(c)) if matches!(c.result, CompletionResult::Value(_)))
            } else {
                matches!(&first, Some(HubMessage::Close(c)) if c.error.as_deref().unwrap_or("").starts_with(CLOSE_PREFIX))
            };
            if !ok {
                problems.push(format!(
                    "{p:?}: a {total}-byte framed message must be {}, got {seen}",
                    if total <= 32_768 {
                        "accepted"
                    } else {
                        "refused with an error Close (it exceeds ASP.NET's 32768-byte parse window)"
                    }
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Errors that do not end the connection: unknown method, wrong argument types and counts,
/// stray completions, stream items and cancels for unknown ids.
#[tokio::test]
async fn invocation_errors_do_not_end_the_connection() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = Conn::connect(&s, p).await;
        let r = c.call("1", "NoSuchMethod", vec![]).await;
        assert_eq!(
            r,
            CompletionResult::Error(
                "Failed to invoke 'NoSuchMethod' due to an error on the server. HubException: Method does not exist.".into()
            )
        );
        let r = c.call("2", "GetCookie", vec![json("[1,2,3]")]).await;
        assert_eq!(
            r,
            CompletionResult::Error(
                "Failed to invoke 'GetCookie' due to an error on the server.".into()
            )
        );
        let r = c
            .call("3", "SendToGroups", vec![json("\"not-a-list\""), json("1")])
            .await;
        assert_eq!(
            r,
            CompletionResult::Error(
                "Failed to invoke 'SendToGroups' due to an error on the server.".into()
            )
        );
        c.send(&HubMessage::Completion(Completion::with_result(
            "s999",
            json("1"),
        )))
        .await;
        c.send(&HubMessage::Completion(Completion::with_error("nope", "x")))
            .await;
        c.send(&HubMessage::StreamItem(StreamItem {
            headers: Vec::new(),
            invocation_id: "77".into(),
            item: json("1"),
        }))
        .await;
        c.assert_alive("4").await;
    }
}

/// §4.2: ASP.NET ignores WebSocket frame types: a binary frame with valid JSON on a JSON
/// connection is processed like a text frame.
#[tokio::test]
async fn binary_frame_on_json_connection_is_processed() {
    let s = start_conformance_server().await;
    let mut c = Conn::connect(&s, ProtocolKind::Json).await;
    c.ws.binary(
        b"{\"type\":1,\"invocationId\":\"1\",\"target\":\"Echo\",\"arguments\":[\"bin\"]}\x1e",
    )
    .await;
    let done = c.completion().await;
    assert_eq!(done.invocation_id, "1");
    assert_eq!(done.result, CompletionResult::Value(json("\"bin\"")));
    // And the handshake itself in a binary frame.
    let mut ws = RawWs::open(&s, "/testhub").await;
    ws.binary(b"{\"protocol\":\"json\",\"version\":1}\x1e")
        .await;
    assert_eq!(ws.read_message().await, Incoming::Text(b"{}\x1e".to_vec()));
}

/// MessagePack garbage on a MessagePack connection → Close with an error, then close.
#[tokio::test]
async fn msgpack_garbage_closes_with_error() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::MessagePack).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("never-used byte 0xc1", vec![0x03, 0xc1, 0xc1, 0xc1]),
        ("type 0xc1", vec![0x02, 0x91, 0xc1]),
        ("empty array", vec![0x01, 0x90]),
        ("not an array", vec![0x01, 0x2a]),
        ("type as string", vec![0x03, 0x91, 0xa1, b'1']),
        ("invocation too short", vec![0x03, 0x92, 0x01, 0x80]),
        (
            "truncated inside the declared length",
            vec![0x05, 0x95, 0x01, 0x80, 0xa1, 0x31],
        ),
        (
            "target nil",
            vec![0x07, 0x96, 0x01, 0x80, 0xc0, 0xc0, 0x90, 0x90],
        ),
        ("target int", vec![0x06, 0x95, 0x01, 0x80, 0xc0, 0x07, 0x90]),
        (
            "arguments not an array",
            vec![
                0x0a, 0x95, 0x01, 0x80, 0xc0, 0xa4, b'E', b'c', b'h', b'o', 0x07,
            ],
        ),
        (
            "invocationId as bin",
            vec![
                0x0c, 0x95, 0x01, 0x80, 0xc4, 0x01, b'1', 0xa4, b'E', b'c', b'h', b'o', 0x90,
            ],
        ),
        (
            "completion kind 9",
            vec![0x06, 0x94, 0x03, 0x80, 0xa1, 0x31, 0x09],
        ),
        (
            "completion kind 3 without result",
            vec![0x06, 0x94, 0x03, 0x80, 0xa1, 0x31, 0x03],
        ),
        (
            "headers not a map",
            vec![0x05, 0x93, 0x05, 0x90, 0xa1, 0x31],
        ),
        (
            "VarInt over 31 bits",
            vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x00],
        ),
        (
            "VarInt continue bit on byte 5",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "array32 claiming 4G elements",
            vec![0x06, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "str32 claiming 4 GiB",
            vec![
                0x0a, 0x94, 0x02, 0x80, 0xdb, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
            ],
        ),
    ];
    // Binary frames: text frames must be UTF-8, and frame types do not matter (§4.2).
    let cases = cases.into_iter().map(|(w, b)| (w, vec![b])).collect();
    let problems = error_close_cases(&s, ProtocolKind::MessagePack, cases, |_, _| None).await;
    bystander.assert_alive("1").await;
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Not HTTP at all on the listening port: the connection is closed (after at most an HTTP
/// error), and the server keeps serving.
#[tokio::test]
async fn http_garbage_on_the_listening_port() {
    let s = start_conformance_server().await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut inputs: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), // a TLS ClientHello start
        b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET /testhub HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"GET /testhub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(),
        b"GET /testhub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 8\r\n\r\n".to_vec(),
        {
            let mut v = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
            v.extend(std::iter::repeat_n(b'a', 1024 * 1024));
            v.extend_from_slice(b"\r\n\r\n");
            v
        },
    ];
    for _ in 0..10 {
        inputs.push(rng.bytes(4096));
    }
    for input in inputs {
        let mut stream = within("connect", TcpStream::connect(host_of(&s)))
            .await
            .expect("connect");
        let _ = tokio::time::timeout(WAIT, stream.write_all(&input)).await;
        let mut sink = Vec::new();
        let mut chunk = [0u8; 4096];
        // Either the connection is closed, or (for input that parses as an HTTP request)
        // an error response arrives; a well-formed request may keep the connection alive.
        let ended = tokio::time::timeout(WAIT, async {
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => sink.extend_from_slice(&chunk[..n]),
                }
                if find(&sink, b"\r\n\r\n").is_some() {
                    return;
                }
            }
        })
        .await;
        let shown = String::from_utf8_lossy(&input[..input.len().min(40)]).into_owned();
        assert!(
            ended.is_ok(),
            "server kept a garbage connection open without answering ({shown:?}…), having sent {:?}",
            String::from_utf8_lossy(&sink)
        );
        if !sink.is_empty() {
            let text = String::from_utf8_lossy(&sink);
            assert!(
                text.starts_with("HTTP/1."),
                "non-HTTP answer to {shown:?}: {text:?}"
            );
            let status = text.split(' ').nth(1).unwrap_or("");
            assert!(
                status.starts_with('4') || status.starts_with('5'),
                "garbage {shown:?} accepted: {text:?}"
            );
        }
    }
    assert_eq!(http_status(&s, "/healthz").await, 200);
    let mut c = Conn::connect(&s, ProtocolKind::Json).await;
    c.assert_alive("1").await;
}

// ---------------------------------------------------------------------------------------
// The garbage series
// ---------------------------------------------------------------------------------------

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One garbage input.
#[derive(Debug, Clone)]
enum Case {
    /// WebSocket frames (opcode, payload) before any handshake.
    PreHandshake(Vec<(u8, Vec<u8>)>),
    /// Frames after a successful handshake in `protocol`.
    AfterHandshake(ProtocolKind, Vec<(u8, Vec<u8>)>),
    /// Raw bytes on an upgraded WebSocket (frame-level violations), after a JSON handshake.
    RawFrames(Vec<u8>),
    /// Raw bytes on a fresh TCP connection (not even HTTP).
    RawTcp(Vec<u8>),
}

fn json_garbage(rng: &mut Rng) -> Vec<u8> {
    let templates: &[&[u8]] = &[
        b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[",
        b"{\"type\":",
        b"{\"type\":1,\"invocationId\":\"",
        b"{\"type\":3,\"invocationId\":\"1\",\"result\":",
        b"{\"type\":2,\"invocationId\":\"1\",\"item\":{\"a\":",
        b"{\"type\":7,\"error\":",
        b"{\"type\":1e999,",
        b"{\"type\":1,\"target\":\"\\ud800\",\"arguments\":[]}",
        b"{\"type\":1,\"target\":\"\\uZZZZ\",\"arguments\":[]}",
        b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[1e99999999]}",
        b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[\"\x00\x01\"]}",
        b"{\"type\":1,\"type\":2,\"type\":3}",
        b"{\"type\":18446744073709551617}",
        b"{\"type\":-1}",
        b"\xef\xbb\xbf{\"type\":6}",
        b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[],\"streamIds\":[1,2]}",
        b"{\"type\":1,\"target\":\"Echo\",\"arguments\":[],\"headers\":[]}",
        b"{\"type\":8,\"sequenceId\":-5}",
        b"{\"type\":9,\"sequenceId\":\"x\"}",
    ];
    let mut v = rng.pick(templates).to_vec();
    match rng.below(6) {
        0 => v.extend({
            let n = rng.below(64);
            rng.bytes(n)
        }),
        1 => {
            let depth = 1 + rng.below(20_000);
            v.extend(std::iter::repeat_n(b'[', depth));
        }
        2 => {
            let depth = 1 + rng.below(5_000);
            for _ in 0..depth {
                v.extend_from_slice(b"{\"a\":");
            }
        }
        3 => v.truncate(rng.below(v.len() + 1)),
        _ => {}
    }
    if rng.below(4) != 0 {
        v.push(0x1e);
    }
    v
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn msgpack_garbage(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        // Huge or malformed length prefixes.
        0 => rng
            .pick(&[
                vec![0xff, 0xff, 0xff, 0xff, 0x07],
                vec![0xff, 0xff, 0xff, 0xff, 0x0f],
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                vec![0x80, 0x80, 0x80, 0x80, 0x01],
                vec![0xff, 0xff, 0x7f],
            ])
            .clone(),
        // Random body behind a correct prefix.
        1 => {
            let body = {
                let n = 1 + rng.below(200);
                rng.bytes(n)
            };
            let mut v = varint(body.len());
            v.extend(body);
            v
        }
        // Deeply nested arrays / maps inside a correct prefix.
        2 => {
            let depth = 1 + rng.below(30_000);
            let marker = *rng.pick(&[0x91u8, 0x81, 0xdc]);
            let mut body = vec![0x95, 0x01, 0x80, 0xc0, 0xa4, b'E', b'c', b'h', b'o', 0x91];
            for _ in 0..depth {
                body.push(marker);
                if marker == 0xdc {
                    body.extend_from_slice(&[0x00, 0x01]);
                }
            }
            body.push(0xc0);
            let mut v = varint(body.len());
            v.extend(body);
            v
        }
        // Containers and strings claiming absurd sizes.
        3 => {
            let body = rng
                .pick(&[
                    vec![0xdd, 0xff, 0xff, 0xff, 0xff],
                    vec![0xdf, 0xff, 0xff, 0xff, 0xff],
                    vec![0x95, 0x01, 0x80, 0xc0, 0xdb, 0xff, 0xff, 0xff, 0xff],
                    vec![
                        0x95, 0x01, 0x80, 0xc0, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xc6, 0xff,
                        0xff, 0xff, 0xff,
                    ],
                    vec![
                        0x95, 0x01, 0x80, 0xc0, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xc9, 0xff,
                        0xff, 0xff, 0xff, 0x01,
                    ],
                    vec![0x95, 0x01, 0xdf, 0xff, 0xff, 0xff, 0xff],
                ])
                .clone();
            let mut v = varint(body.len());
            v.extend(body);
            v
        }
        // A valid message truncated (the prefix promises more than follows).
        4 => {
            let mut v = vec![
                0x0e, 0x95, 0x01, 0x80, 0xa1, 0x31, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xa2, b'h',
                b'i',
            ];
            v.truncate(1 + rng.below(v.len() - 1));
            v
        }
        // A valid message with one byte flipped.
        5 => {
            let mut v = vec![
                0x0e, 0x95, 0x01, 0x80, 0xa1, 0x31, 0xa4, b'E', b'c', b'h', b'o', 0x91, 0xa2, b'h',
                b'i',
            ];
            let i = rng.below(v.len());
            v[i] = rng.next() as u8;
            v
        }
        // Invalid UTF-8 in strings.
        6 => vec![
            0x0e, 0x95, 0x01, 0x80, 0xa1, 0x31, 0xa4, 0xff, 0xfe, 0xfd, 0xfc, 0x91, 0xa2, 0xc3,
            0x28,
        ],
        // Wrong types in every position.
        7 => {
            let body = vec![
                0x96,
                rng.next() as u8,
                rng.next() as u8,
                rng.next() as u8,
                rng.next() as u8,
                rng.next() as u8,
                rng.next() as u8,
            ];
            let mut v = varint(body.len());
            v.extend(body);
            v
        }
        // Pure noise.
        _ => {
            let n = 1 + rng.below(300);
            rng.bytes(n)
        }
    }
}

/// Frame-level WebSocket violations.
fn ws_violation(rng: &mut Rng) -> Vec<u8> {
    let good = frame(true, OP_TEXT, b"{\"type\":6}\x1e");
    match rng.below(12) {
        0 => vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], // unmasked client frame
        1 => frame(true, 0x3, b"reserved opcode"),
        2 => {
            let mut f = good.clone();
            f[0] |= 0x40; // RSV1 without an extension
            f
        }
        3 => frame(true, OP_PING, &[0u8; 200]), // control frame > 125 bytes
        4 => frame(false, OP_PING, b"x"),       // fragmented control frame
        5 => frame(true, OP_CONT, b"no start"), // continuation without a start
        6 => {
            let mut f = vec![0x82, 0xff]; // 64-bit length with the MSB set
            f.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[1, 2, 3, 4]);
            f
        }
        7 => {
            let mut f = vec![0x82, 0xff]; // claims 1 TiB
            f.extend_from_slice(&(1u64 << 40).to_be_bytes());
            f.extend_from_slice(&[1, 2, 3, 4]);
            f.extend(rng.bytes(100));
            f
        }
        8 => frame(true, OP_CLOSE, &[0x03]), // 1-byte close payload
        9 => frame(true, OP_CLOSE, &[0x00, 0x05, b'x']), // invalid close code
        10 => frame(true, OP_TEXT, &[0x7b, 0xff, 0xfe, 0x1e]), // invalid UTF-8 in a text frame
        _ => {
            // A text message started, then a new text frame before it ends.
            let mut v = frame(false, OP_TEXT, b"{\"ty");
            v.extend(frame(true, OP_TEXT, b"pe\":6}\x1e"));
            v
        }
    }
}

fn make_cases(rng: &mut Rng) -> Vec<Case> {
    let mut cases = Vec::new();
    // Before the handshake.
    for i in 0..60 {
        let frames = match i % 6 {
            0 => vec![(OP_TEXT, {
                let n = 1 + rng.below(100);
                rng.bytes(n)
            })],
            1 => vec![(OP_BINARY, {
                let n = 1 + rng.below(5000);
                rng.bytes(n)
            })],
            2 => vec![(OP_TEXT, json_garbage(rng))],
            3 => {
                let mut v = b"{\"protocol\":\"json\",\"version\":".to_vec();
                let choice: &[u8] = rng.pick::<&[u8]>(&[
                    &b"99999999999999999999999"[..],
                    b"-1",
                    b"1e10",
                    b"[1]",
                    b"{\"a\":1}",
                    b"true",
                ]);
                v.extend_from_slice(choice);
                v.extend_from_slice(b"}\x1e");
                vec![(OP_TEXT, v)]
            }
            4 => {
                let mut v = b"{\"protocol\":".to_vec();
                let depth = 1 + rng.below(50_000);
                v.extend(std::iter::repeat_n(b'[', depth));
                v.push(0x1e);
                vec![(OP_BINARY, v)]
            }
            _ => vec![(
                OP_BINARY,
                [
                    b"{\"protocol\":\"".as_slice(),
                    &rng.bytes(20),
                    b"\",\"version\":1}\x1e",
                ]
                .concat(),
            )],
        };
        cases.push(Case::PreHandshake(frames));
    }
    // After a JSON handshake.
    for _ in 0..80 {
        let n = 1 + rng.below(3);
        let frames = (0..n).map(|_| (OP_BINARY, json_garbage(rng))).collect();
        cases.push(Case::AfterHandshake(ProtocolKind::Json, frames));
    }
    // After a MessagePack handshake.
    for _ in 0..80 {
        let n = 1 + rng.below(3);
        let frames = (0..n).map(|_| (OP_BINARY, msgpack_garbage(rng))).collect();
        cases.push(Case::AfterHandshake(ProtocolKind::MessagePack, frames));
    }
    // Frame-level violations.
    for _ in 0..40 {
        cases.push(Case::RawFrames(ws_violation(rng)));
    }
    // Not HTTP at all.
    for _ in 0..30 {
        cases.push(Case::RawTcp({
            let n = 1 + rng.below(2000);
            rng.bytes(n)
        }));
    }
    cases
}

/// Runs one case; returns once the server closed the connection or after a short wait.
async fn run_case(s: &TestServer, case: Case) {
    let linger = Duration::from_millis(800);
    match case {
        Case::PreHandshake(frames) => {
            let mut ws = RawWs::open(s, "/testhub").await;
            for (op, payload) in frames {
                if ws.write(&frame(true, op, &payload)).await.is_err() {
                    return;
                }
            }
            while let Some(m) = ws.read_message_within(linger).await {
                if matches!(m, Incoming::Close(_) | Incoming::Eof) {
                    return;
                }
            }
        }
        Case::AfterHandshake(p, frames) => {
            let mut c = Conn::connect(s, p).await;
            for (op, payload) in frames {
                if c.ws.write(&frame(true, op, &payload)).await.is_err() {
                    return;
                }
            }
            while let Some(m) = c.ws.read_message_within(linger).await {
                if matches!(m, Incoming::Close(_) | Incoming::Eof) {
                    return;
                }
            }
        }
        Case::RawFrames(bytes) => {
            let mut c = Conn::connect(s, ProtocolKind::Json).await;
            if c.ws.write(&bytes).await.is_err() {
                return;
            }
            while let Some(m) = c.ws.read_message_within(linger).await {
                if matches!(m, Incoming::Close(_) | Incoming::Eof) {
                    return;
                }
            }
        }
        Case::RawTcp(bytes) => {
            let mut stream = within("connect", TcpStream::connect(host_of(s)))
                .await
                .expect("connect");
            let _ = tokio::time::timeout(WAIT, stream.write_all(&bytes)).await;
            let mut chunk = [0u8; 4096];
            let _ = tokio::time::timeout(linger, async {
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

/// Hundreds of garbage inputs, each on its own connection (a few at a time), plus tolerable
/// garbage interleaved with valid traffic on single connections. Meanwhile a bystander keeps
/// echoing. Afterwards: no server code panicked, a well-behaved client connects and Echo
/// works in both protocols, and `/healthz` answers 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_series_never_hurts_the_server() {
    // Count panics raised in server code (paths under `src/`), in any thread.
    let server_panics = Arc::new(AtomicUsize::new(0));
    {
        let counter = server_panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().starts_with("src/") || l.file().contains("/src/"))
                && !info
                    .location()
                    .is_some_and(|l| l.file().contains("protocol-tests"))
            {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    }

    let s = Arc::new(start_conformance_server().await);
    let mut rng = Rng(0x5eed_1234_abcd_ef01);

    // The bystander echoes throughout.
    let stop = Arc::new(tokio::sync::Notify::new());
    let bystander = {
        let s = s.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = Conn::connect(&s, ProtocolKind::MessagePack).await;
            let mut n = 0u32;
            loop {
                n += 1;
                let r = c
                    .call(&n.to_string(), "Echo", vec![json(&n.to_string())])
                    .await;
                assert_eq!(
                    r,
                    CompletionResult::Value(json(&n.to_string())),
                    "bystander echo {n}"
                );
                tokio::select! {
                    _ = stop.notified() => return n,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };

    // Each case on its own connection, 16 at a time.
    let cases = make_cases(&mut rng);
    let total = cases.len();
    assert!(total >= 250, "{total} cases");
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut handles = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let s = s.clone();
        let desc = format!("case {i}: {:.200}", format!("{case:?}"));
        handles.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(20), run_case(&s, case)).await;
            drop(permit);
            r.map_err(|_| desc)
        }));
    }
    let mut stuck = Vec::new();
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(desc)) => stuck.push(desc),
            Err(e) => stuck.push(format!("case task failed: {e}")),
        }
    }
    assert!(
        stuck.is_empty(),
        "cases that hung or failed:\n{}",
        stuck.join("\n")
    );

    // Interleaved on one connection: valid calls with tolerable garbage in the same frames.
    for p in ProtocolKind::ALL {
        let mut c = Conn::connect(&s, p).await;
        for round in 0..60u32 {
            let id = round.to_string();
            let mut frame_bytes = Vec::new();
            let junk: Vec<u8> = match (p, round % 6) {
                (ProtocolKind::Json, 0) => {
                    b"{\"type\":99,\"junk\":[1,2,{\"x\":null}]}\x1e".to_vec()
                }
                (ProtocolKind::Json, 1) => b"{\"type\":6}\x1e".to_vec(),
                (ProtocolKind::Json, 2) => {
                    b"{\"type\":3,\"invocationId\":\"nobody\",\"result\":1}\x1e".to_vec()
                }
                (ProtocolKind::Json, 3) => {
                    b"{\"type\":2,\"invocationId\":\"nostream\",\"item\":1}\x1e".to_vec()
                }
                (ProtocolKind::Json, 4) => {
                    b"{\"type\":5,\"invocationId\":\"nothing\"}\x1e".to_vec()
                }
                (ProtocolKind::Json, _) => {
                    b"{\"type\":1,\"target\":\"NoSuchMethod\",\"arguments\":[]}\x1e".to_vec()
                }
                (ProtocolKind::MessagePack, 0) => vec![0x04, 0x93, 0x63, 0x80, 0xc0],
                (ProtocolKind::MessagePack, 1) => vec![0x02, 0x91, 0x06],
                (ProtocolKind::MessagePack, 2) => vec![
                    0x0a, 0x95, 0x03, 0x80, 0xa4, b'n', b'o', b'n', b'e', 0x03, 0x01,
                ],
                (ProtocolKind::MessagePack, 3) => vec![0x06, 0x94, 0x02, 0x80, 0xa1, b'z', 0x01],
                (ProtocolKind::MessagePack, 4) => vec![0x05, 0x93, 0x05, 0x80, 0xa1, b'z'],
                (ProtocolKind::MessagePack, _) => vec![
                    0x0a, 0x95, 0x01, 0x80, 0xc0, 0xa4, b'N', b'o', b'p', b'e', 0x90,
                ],
            };
            if round % 2 == 0 {
                frame_bytes.extend_from_slice(&junk);
                frame_bytes.extend(c.encode(&invoke(&id, "Echo", vec![json(&id)])));
            } else {
                frame_bytes.extend(c.encode(&invoke(&id, "Echo", vec![json(&id)])));
                frame_bytes.extend_from_slice(&junk);
            }
            // Split the frame at a random point to also exercise reassembly.
            let cut = rng.below(frame_bytes.len() + 1);
            c.send_bytes(&frame_bytes[..cut]).await;
            if cut < frame_bytes.len() {
                c.send_bytes(&frame_bytes[cut..]).await;
            }
            let done = c.completion().await;
            assert_eq!(done.invocation_id, id, "{p:?} round {round}");
            assert_eq!(
                done.result,
                CompletionResult::Value(json(&id)),
                "{p:?} round {round}"
            );
        }
        // Finally, fatal garbage right behind a valid call in one frame: Close with an error.
        let mut last = c.encode(&invoke("last", "Echo", vec![json("1")]));
        last.extend(match p {
            ProtocolKind::Json => b"{\"type\":1,\"target\":\x1e".to_vec(),
            ProtocolKind::MessagePack => vec![0x03, 0xc1, 0xc1, 0xc1],
        });
        c.send_bytes(&last).await;
        let close = c
            .expect_close_message("fatal garbage after a valid call")
            .await;
        // Only the text here; allowReconnect is checked by the dedicated tests.
        let e = close.error.as_deref().unwrap_or("");
        assert!(
            e.starts_with(CLOSE_PREFIX),
            "interleaved fatal garbage: {close:?}"
        );
    }

    stop.notify_one();
    let echoes = within("bystander", bystander)
        .await
        .expect("bystander task");
    assert!(echoes >= 5, "bystander only echoed {echoes} times");

    // The server is fine.
    assert_eq!(http_status(&s, "/healthz").await, 200);
    for p in ProtocolKind::ALL {
        let mut c = Conn::connect(&s, p).await;
        c.assert_alive("final").await;
    }
    assert_eq!(
        server_panics.load(Ordering::SeqCst),
        0,
        "server code panicked while handling garbage (see the panic messages above)"
    );
}

// ---------------------------------------------------------------------------------------
// Slow consumer
// ---------------------------------------------------------------------------------------

/// A client that stops reading while the server pushes to it (SendToConnection from another
/// client) is closed once its outbound queue passes the bound (4096 messages / 1 MiB), with
/// the slow-consumer Close reason (or, if it still does not read, by the socket closing). The
/// pushing client and a bystander are unaffected throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_others_unaffected() {
    let s = start_conformance_server().await;
    let mut bystander = Conn::connect(&s, ProtocolKind::Json).await;

    // The victim: a small receive buffer, and it stops reading after learning its id.
    let mut victim = {
        let mut ws = RawWs::open_with(&s, "/testhub", Some(4096)).await;
        ws.text(b"{\"protocol\":\"json\",\"version\":1}\x1e").await;
        assert_eq!(ws.read_message().await, Incoming::Text(b"{}\x1e".to_vec()));
        Conn {
            ws,
            p: ProtocolKind::Json,
            buf: BytesMut::new(),
        }
    };
    let victim_id = match victim.call("id", "GetCallerConnectionId", vec![]).await {
        CompletionResult::Value(v) => v.decode::<String>().expect("id"),
        other => panic!("{other:?}"),
    };

    // The producer pushes 16 KiB messages to the victim: 600 of them = 9.6 MB, far beyond
    // the 1 MiB queue bound plus the kernel's socket buffers.
    let payload = format!("\"{}\"", "p".repeat(16 * 1024));
    let mut producer = Conn::connect(&s, ProtocolKind::Json).await;
    let pushed = 600usize;
    let start = Instant::now();
    for batch in 0..pushed / 4 {
        let mut frame_bytes = Vec::new();
        for k in 0..4 {
            let id = (batch * 4 + k).to_string();
            frame_bytes.extend(producer.encode(&invoke(
                &id,
                "SendToConnection",
                vec![json(&format!("\"{victim_id}\"")), json(&payload)],
            )));
        }
        producer.send_bytes(&frame_bytes).await;
        for _ in 0..4 {
            let done = producer.completion().await;
            assert!(
                !matches!(done.result, CompletionResult::Error(_)),
                "producer call failed: {:?}",
                done.result
            );
        }
        if batch % 25 == 0 {
            bystander.assert_alive(&format!("b{batch}")).await;
        }
    }
    let push_time = start.elapsed();
    assert!(
        push_time < Duration::from_secs(8),
        "pushing to a slow consumer stalled the producer: {push_time:?}"
    );
    bystander.assert_alive("after-push").await;

    // The victim reads again: it must see the slow-consumer Close (or the socket close)
    // before having received everything.
    let mut received = 0usize;
    let mut close = None;
    loop {
        match victim.next_within(Duration::from_secs(15)).await {
            Some(HubMessage::Invocation(inv)) => {
                assert!(inv.target.eq_ignore_ascii_case("Send"));
                received += 1;
            }
            Some(HubMessage::Close(c)) => {
                close = Some(c);
                victim.ws.expect_closed().await;
                break;
            }
            Some(other) => panic!("victim got {other:?}"),
            None => break,
        }
    }
    assert!(
        received < pushed,
        "the slow consumer received all {pushed} messages and was never closed"
    );
    if let Some(c) = &close {
        let e = c.error.as_deref().unwrap_or("");
        assert!(e.starts_with(CLOSE_PREFIX), "slow-consumer Close {c:?}");
        assert!(
            e.contains("Slow consumer"),
            "slow-consumer Close reason {c:?}"
        );
        assert!(
            c.allow_reconnect,
            "slow-consumer Close must allow reconnect: {c:?}"
        );
    }
    eprintln!(
        "slow consumer: received {received}/{pushed}, close = {close:?}, push took {push_time:?}"
    );

    // Everyone else is fine.
    bystander.assert_alive("end").await;
    producer.assert_alive("end").await;
}
