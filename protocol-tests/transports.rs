//! Server-Sent Events and Long Polling at the byte level, over real sockets: SSE headers,
//! framing (multi-line payloads split into `data:` lines) and keep-alive comments; Long
//! Polling's immediate first poll, 204 after close, DELETE 202, a newer poll cancelling the
//! older one, the poll timeout and the disconnect timeout (OnDisconnected runs); ASP.NET's
//! status codes for unknown ids, transport mix-ups, sends, oversize bodies and disallowed
//! transports. Also measures one client's message rates over both transports.
//!
//! Requests are written by hand on a `TcpStream` (HTTP/1.1, one request per connection).

#[path = "support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use feedhub::backplane::memory::MemoryBus;
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::connection::outbound::OutboundLimits;
use feedhub::hub::{HubBuilder, HubContext, HubError, Transports};
use feedhub::ids::ConnectionId;
use feedhub::{ServerBuilder, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const RS: char = '\u{1e}';

// ---------------------------------------------------------------------------------------
// Test server
// ---------------------------------------------------------------------------------------

/// Connection ids whose OnDisconnected ran, with the error it got.
type Disconnects = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Fixture {
    server: TestServer,
    disconnects: Disconnects,
}

/// `/t` (all transports, short timeouts), `/wsonly` (WebSockets only).
async fn start() -> Fixture {
    start_node(&Net::Alone, Arc::default(), "t").await
}

/// The backplane of a test node.
enum Net {
    /// Its own (nothing to share).
    Alone,
    /// An in-process bus shared with other nodes.
    Memory(MemoryBus),
    /// The shared Redis, with this channel prefix.
    Redis(String),
}

/// [`start`] as one node of several on `net` (with one `disconnects` list).
async fn start_node(net: &Net, disconnects: Disconnects, name: &str) -> Fixture {
    let seen = disconnects.clone();
    let hub = HubBuilder::new("/t")
        .configure(|o| {
            o.disconnect_timeout = Duration::from_millis(800);
            o.long_poll_timeout = Duration::from_millis(1500);
            o.sse_keep_alive = Duration::from_millis(300);
            // Room for the 10,000-message flood of the rate measurement.
            o.outbound = OutboundLimits {
                max_messages: 32 * 1024,
                max_bytes: 8 * 1024 * 1024,
            };
        })
        .method(
            "Echo",
            |_c: HubContext, (m,): (serde_json::Value,)| async move { Ok::<_, HubError>(m) },
        )
        .method("Flood", |c: HubContext, (n,): (u32,)| async move {
            for i in 0..n {
                c.clients().caller().send("Item", (i,)).await?;
            }
            Ok::<_, HubError>(n)
        })
        .method("Transport", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.transport().name())
        })
        .method("Close", |c: HubContext, (): ()| async move {
            c.close(None, false);
            Ok::<_, HubError>(())
        })
        .on_disconnected(move |c: HubContext, err| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push((c.connection_id().to_string(), err));
            }
        })
        .build();
    let ws_only = HubBuilder::new("/wsonly")
        .configure(|o| {
            o.transports = Transports {
                websockets: true,
                server_sent_events: false,
                long_polling: false,
            }
        })
        .method("Echo", |_c: HubContext, (m,): (String,)| async move {
            Ok::<_, HubError>(m)
        })
        .build();
    let small = HubBuilder::new("/small")
        .configure(|o| {
            o.outbound = OutboundLimits {
                max_messages: 64,
                max_bytes: 64 * 1024,
            };
        })
        .method("Flood", |c: HubContext, (n,): (u32,)| async move {
            for i in 0..n {
                // A full queue closes the connection (slow-consumer policy); keep going.
                let _ = c.clients().caller().send("Item", (i,)).await;
            }
            Ok::<_, HubError>(n)
        })
        .build();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        node_id: unique_prefix(name),
        ..ServerConfig::default()
    };
    let mut config = config;
    let mut builder_redis = None;
    if let Net::Redis(prefix) = net {
        config.channel_prefix = Some(prefix.clone());
        builder_redis = Some(RedisConfig::from_url(&support::cluster::redis_url()).unwrap());
    }
    let mut builder = ServerBuilder::new(config).hub(hub).hub(ws_only).hub(small);
    if let Net::Memory(bus) = net {
        builder = builder.memory_bus(bus.clone());
    }
    let slot: Arc<Mutex<Option<Arc<RedisBackplane>>>> = Arc::default();
    if let Some(cfg) = builder_redis {
        let s = slot.clone();
        builder = builder.backplane(Box::new(move |c, inbox| {
            let bp = RedisBackplane::new(cfg, c.node_id.clone(), inbox);
            *s.lock().unwrap() = Some(bp.clone());
            bp
        }));
    }
    let server = builder.start().await.expect("server");
    let redis = slot.lock().unwrap().clone();
    if let Some(bp) = redis {
        assert!(
            bp.wait_ready(Duration::from_secs(10)).await,
            "Redis backplane did not connect"
        );
    }
    Fixture {
        server: TestServer {
            base_url: format!("http://{}", server.local_addr()),
            jwt_secret: TEST_SECRET.to_string(),
            api_key: TEST_API_KEY.to_string(),
            server: Some(server),
        },
        disconnects,
    }
}

impl Fixture {
    fn host(&self) -> String {
        self.server
            .base_url
            .trim_start_matches("http://")
            .to_string()
    }

    fn disconnected(&self, id: &str) -> Option<Option<String>> {
        self.disconnects
            .lock()
            .unwrap()
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, e)| e.clone())
    }

    /// Negotiates v1 on `hub`: (connectionId, connectionToken).
    async fn negotiate(&self, hub: &str, auth: Option<&str>) -> (String, String) {
        let mut headers = vec![];
        let bearer;
        if let Some(t) = auth {
            bearer = format!("Bearer {t}");
            headers.push(("Authorization", bearer.as_str()));
        }
        let r = http(
            &self.host(),
            "POST",
            &format!("{hub}/negotiate?negotiateVersion=1"),
            &headers,
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "negotiate: {}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        (
            v["connectionId"].as_str().unwrap().to_string(),
            v["connectionToken"].as_str().unwrap().to_string(),
        )
    }

    async fn get(&self, path: &str) -> HttpResponse {
        http(&self.host(), "GET", path, &[], b"").await
    }

    async fn post(&self, path: &str, body: &[u8]) -> HttpResponse {
        http(&self.host(), "POST", path, &[], body).await
    }

    async fn delete(&self, path: &str) -> HttpResponse {
        http(&self.host(), "DELETE", path, &[], b"").await
    }

    /// A Long Polling JSON connection after its handshake: (id, token).
    async fn long_polling(&self) -> (String, String) {
        let (id, token) = self.negotiate("/t", None).await;
        let first = self.get(&format!("/t?id={token}")).await;
        assert_eq!(first.status, 200);
        let r = self
            .post(
                &format!("/t?id={token}"),
                format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let hs = self.get(&format!("/t?id={token}")).await;
        assert_eq!(hs.text(), format!("{{}}{RS}"));
        (id, token)
    }
}

fn invocation(id: &str, target: &str, args: &str) -> Vec<u8> {
    format!(
        "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"{target}\",\"arguments\":{args}}}{RS}"
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    elapsed: Duration,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn request_bytes(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Response headers as (name, value) pairs.
type Headers = Vec<(String, String)>;

/// Status, headers and where the body starts.
fn parse_head(raw: &[u8]) -> Option<(u16, Headers, usize)> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((status, headers, end + 4))
}

/// Decodes the complete chunks at the front of `data`; returns (payload, bytes consumed,
/// whether the terminating chunk was seen).
fn dechunk(data: &[u8]) -> (Vec<u8>, usize, bool) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = find(&data[pos..], b"\r\n") else {
            return (out, pos, false);
        };
        let size_text = String::from_utf8_lossy(&data[pos..pos + eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return (out, pos, true);
        }
        let start = pos + eol + 2;
        if data.len() < start + size + 2 {
            return (out, pos, false);
        }
        out.extend_from_slice(&data[start..start + size]);
        pos = start + size + 2;
    }
}

/// Sends one request and reads the whole response (until the server closes).
async fn http(
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let started = Instant::now();
    let mut stream = within("tcp connect", TcpStream::connect(host))
        .await
        .expect("connect");
    // The server may answer (e.g. 413) and close before reading everything we send.
    let _ = within(
        "send request",
        stream.write_all(&request_bytes(host, method, path, headers, body)),
    )
    .await;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match within("response", stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    let elapsed = started.elapsed();
    let (status, headers, start) = parse_head(&raw)
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let rest = &raw[start..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest).0
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
        elapsed,
    }
}

/// An open SSE response, read incrementally.
struct Sse {
    stream: TcpStream,
    status: u16,
    headers: Vec<(String, String)>,
    /// Raw (chunked) bytes not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet consumed.
    body: Vec<u8>,
    ended: bool,
}

impl Sse {
    async fn open(host: &str, path: &str) -> Sse {
        let mut stream = within("tcp connect", TcpStream::connect(host))
            .await
            .expect("connect");
        within(
            "send request",
            stream.write_all(&request_bytes(
                host,
                "GET",
                path,
                &[("Accept", "text/event-stream")],
                b"",
            )),
        )
        .await
        .expect("write");
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let (status, headers, start) = loop {
            if let Some(h) = parse_head(&raw) {
                break h;
            }
            let n = within("SSE response head", stream.read(&mut chunk))
                .await
                .expect("read");
            assert!(n > 0, "closed before the response head");
            raw.extend_from_slice(&chunk[..n]);
        };
        let raw = raw[start..].to_vec();
        let mut sse = Sse {
            stream,
            status,
            headers,
            raw,
            body: Vec::new(),
            ended: false,
        };
        sse.decode();
        sse
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn decode(&mut self) {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"));
        if !chunked {
            self.body.append(&mut self.raw);
            return;
        }
        let (data, used, end) = dechunk(&self.raw);
        self.body.extend_from_slice(&data);
        self.raw.drain(..used);
        self.ended |= end;
    }

    /// Reads until the decoded body holds `n` bytes... or `pred` holds; returns what is
    /// buffered when `pred` becomes true.
    async fn read_until(&mut self, what: &str, pred: impl Fn(&[u8]) -> bool) {
        let mut chunk = [0u8; 64 * 1024];
        while !pred(&self.body) {
            if self.ended {
                panic!(
                    "SSE stream ended before {what}; got {:?}",
                    String::from_utf8_lossy(&self.body)
                );
            }
            let n = within(what, self.stream.read(&mut chunk))
                .await
                .expect("read");
            if n == 0 {
                self.ended = true;
                continue;
            }
            self.raw.extend_from_slice(&chunk[..n]);
            self.decode();
        }
    }

    /// The next complete event (or comment block) up to and including its blank line.
    async fn next_block(&mut self) -> String {
        self.read_until("an SSE block", |b| {
            find(b, b"\r\n\r\n").is_some() || b.starts_with(b":\r\n")
        })
        .await;
        if self.body.starts_with(b":\r\n") {
            self.body.drain(..3);
            return ":\r\n".to_string();
        }
        let end = find(&self.body, b"\r\n\r\n").unwrap() + 4;
        let block: Vec<u8> = self.body.drain(..end).collect();
        String::from_utf8(block).expect("utf-8 event")
    }

    /// The next event, skipping keep-alive comments.
    async fn next_event(&mut self) -> String {
        loop {
            let b = self.next_block().await;
            if b != ":\r\n" {
                return b;
            }
        }
    }

    /// Waits for the stream to end (the server finished the response).
    async fn expect_end(&mut self) {
        let mut chunk = [0u8; 4096];
        while !self.ended {
            let n = within("the end of the SSE stream", self.stream.read(&mut chunk))
                .await
                .expect("read");
            if n == 0 {
                self.ended = true;
            } else {
                self.raw.extend_from_slice(&chunk[..n]);
                self.decode();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------------------

/// §4.3: headers, the `:` comment written first, `data:` events ending in a blank line, and
/// a multi-line payload split into one `data:` line per line (CR before LF dropped).
#[tokio::test]
async fn sse_headers_first_comment_and_framing() {
    let f = start().await;
    let (id, token) = f.negotiate("/t", None).await;
    let mut sse = Sse::open(&f.host(), &format!("/t?id={token}")).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("cache-control"), Some("no-cache, no-store"));
    assert_eq!(sse.header("pragma"), Some("no-cache"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    assert_eq!(sse.header("content-encoding"), Some("identity"));
    assert_eq!(
        sse.next_block().await,
        ":\r\n",
        "a comment is flushed first"
    );

    let r = f
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(sse.next_event().await, format!("data: {{}}{RS}\r\n\r\n"));

    let r = f
        .post(
            &format!("/t?id={token}"),
            &invocation("1", "Transport", "[]"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sse.next_event().await,
        format!("data: {{\"type\":3,\"invocationId\":\"1\",\"result\":\"ServerSentEvents\"}}{RS}\r\n\r\n")
    );

    // A payload with line breaks (JSON never has raw ones; raw bytes pushed to the
    // connection's queue do) becomes several data lines of one event.
    let hub = f.server.server().hub("/t").unwrap();
    let conn = hub
        .registry()
        .get(&ConnectionId::new(&id).unwrap())
        .expect("registered");
    conn.send_bytes(Bytes::from_static(b"line one\r\nline two\nline three\x1e"))
        .unwrap();
    assert_eq!(
        sse.next_event().await,
        "data: line one\r\ndata: line two\r\ndata: line three\u{1e}\r\n\r\n"
    );
}

/// An idle SSE stream gets `:` comment lines (here every 300 ms), so proxies keep it open.
#[tokio::test]
async fn sse_keep_alive_comments() {
    let f = start().await;
    let (_, token) = f.negotiate("/t", None).await;
    let mut sse = Sse::open(&f.host(), &format!("/t?id={token}")).await;
    assert_eq!(sse.next_block().await, ":\r\n");
    let t0 = Instant::now();
    assert_eq!(sse.next_block().await, ":\r\n");
    assert_eq!(sse.next_block().await, ":\r\n");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "two keep-alives took only {waited:?}"
    );
}

/// MessagePack needs Binary; SSE is Text only: the handshake fails with ASP.NET's text and
/// the stream ends.
#[tokio::test]
async fn messagepack_over_sse_is_refused() {
    let f = start().await;
    let (id, token) = f.negotiate("/t", None).await;
    let mut sse = Sse::open(&f.host(), &format!("/t?id={token}")).await;
    let r = f
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"messagepack\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    let ev = sse.next_event().await;
    assert_eq!(
        ev,
        format!("data: {{\"error\":\"Cannot use the 'messagepack' protocol on the current transport. The transport does not support 'Binary' transfer format.\"}}{RS}\r\n\r\n")
    );
    sse.expect_end().await;
    assert!(
        f.disconnected(&id).is_none(),
        "no OnDisconnected without OnConnected"
    );
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 404);
}

/// The SSE stream going away ends the connection (OnDisconnected runs); a second stream
/// for a live SSE connection is 409; DELETE is not for SSE (400).
#[tokio::test]
async fn sse_second_stream_409_delete_400_and_client_close_ends_connection() {
    let f = start().await;
    let (id, token) = f.negotiate("/t", None).await;
    let mut sse = Sse::open(&f.host(), &format!("/t?id={token}")).await;
    f.post(
        &format!("/t?id={token}"),
        format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
    )
    .await;
    assert_eq!(sse.next_event().await, format!("data: {{}}{RS}\r\n\r\n"));
    let second = Sse::open(&f.host(), &format!("/t?id={token}")).await;
    assert_eq!(second.status, 409);
    let del = f.delete(&format!("/t?id={token}")).await;
    assert_eq!(del.status, 400);
    assert_eq!(
        del.text(),
        "Cannot terminate this connection using the DELETE endpoint."
    );
    drop(sse);
    within("OnDisconnected after the SSE stream closed", async {
        while f.disconnected(&id).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(f.post(&format!("/t?id={token}"), b"x").await.status, 404);
}

// ---------------------------------------------------------------------------------------
// Long Polling
// ---------------------------------------------------------------------------------------

/// §4.4: the first poll answers 200 at once with no body; later polls carry the queued
/// messages as `application/octet-stream`; every poll response is uncacheable.
#[tokio::test]
async fn long_polling_first_poll_is_immediate_then_polls_carry_messages() {
    let f = start().await;
    let (_, token) = f.negotiate("/t", None).await;
    let first = f.get(&format!("/t?id={token}&_=1")).await;
    assert_eq!(first.status, 200);
    assert!(first.body.is_empty());
    assert!(
        first.elapsed < Duration::from_millis(500),
        "first poll took {:?}",
        first.elapsed
    );
    assert_eq!(
        first.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(first.header("cache-control"), Some("no-cache, no-store"));
    assert_eq!(first.header("pragma"), Some("no-cache"));
    assert_eq!(
        first.header("expires"),
        Some("Thu, 01 Jan 1970 00:00:00 GMT")
    );

    let hs = f
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(hs.status, 200);
    let poll = f.get(&format!("/t?id={token}&_=2")).await;
    assert_eq!(poll.status, 200);
    assert_eq!(poll.text(), format!("{{}}{RS}"));
    assert_eq!(
        poll.header("content-type"),
        Some("application/octet-stream")
    );

    // Two invocations in one POST (clients batch); both answers in one poll, in order.
    let mut body = invocation("1", "Transport", "[]");
    body.extend(invocation("2", "Echo", "[\"hi\"]"));
    assert_eq!(f.post(&format!("/t?id={token}"), &body).await.status, 200);
    let mut got = String::new();
    while !got.contains("\"invocationId\":\"2\"") {
        let p = f.get(&format!("/t?id={token}")).await;
        assert_eq!(p.status, 200);
        got.push_str(&p.text());
    }
    assert_eq!(
        got,
        format!("{{\"type\":3,\"invocationId\":\"1\",\"result\":\"LongPolling\"}}{RS}{{\"type\":3,\"invocationId\":\"2\",\"result\":\"hi\"}}{RS}")
    );
}

/// A poll with nothing to say answers an empty 200 after the poll timeout (1.5 s here,
/// 90 s by default); no pings are sent on Long Polling.
#[tokio::test]
async fn long_poll_times_out_with_empty_200_and_no_pings() {
    let f = start().await;
    let (_, token) = f.long_polling().await;
    let p = f.get(&format!("/t?id={token}")).await;
    assert_eq!(p.status, 200);
    assert!(p.body.is_empty(), "no ping on Long Polling: {:?}", p.text());
    assert!(
        p.elapsed >= Duration::from_millis(1400),
        "answered after {:?}",
        p.elapsed
    );
    assert_eq!(p.header("content-type"), Some("text/plain; charset=utf-8"));
}

/// After the server closes the connection, the next poll carries the Close message and the
/// one after that gets 204; then the token is unknown (404).
#[tokio::test]
async fn poll_after_close_is_204() {
    let f = start().await;
    let (id, token) = f.long_polling().await;
    assert_eq!(
        f.post(&format!("/t?id={token}"), &invocation("1", "Close", "[]"))
            .await
            .status,
        200
    );
    let mut got = String::new();
    let status = loop {
        let p = f.get(&format!("/t?id={token}")).await;
        if p.status != 200 {
            break p.status;
        }
        got.push_str(&p.text());
    };
    assert_eq!(status, 204);
    assert!(
        got.contains(&format!("{{\"type\":7}}{RS}")),
        "Close message: {got:?}"
    );
    assert!(f.disconnected(&id).is_some());
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 404);
    assert_eq!(f.post(&format!("/t?id={token}"), b"{}").await.status, 404);
}

/// DELETE ends a Long Polling connection: 202, the waiting poll answers 204, OnDisconnected
/// runs without an error, later requests get 404.
#[tokio::test]
async fn delete_is_202_and_ends_the_waiting_poll_with_204() {
    let f = start().await;
    let (id, token) = f.long_polling().await;
    let host = f.host();
    let path = format!("/t?id={token}");
    let waiting = tokio::spawn(async move { http(&host, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let del = f.delete(&format!("/t?id={token}")).await;
    assert_eq!(del.status, 202);
    let p = within("the waiting poll", waiting).await.unwrap();
    assert_eq!(p.status, 204);
    within("OnDisconnected after DELETE", async {
        while f.disconnected(&id).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(f.disconnected(&id), Some(None), "a DELETE is a clean end");
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 404);
    assert_eq!(f.delete(&format!("/t?id={token}")).await.status, 404);
}

/// A second poll for the same connection ends the first with 204 and takes over.
#[tokio::test]
async fn second_poll_cancels_the_first_with_204() {
    let f = start().await;
    let (_, token) = f.long_polling().await;
    let (host, path) = (f.host(), format!("/t?id={token}"));
    let first = tokio::spawn(async move { http(&host, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (host, path) = (f.host(), format!("/t?id={token}"));
    let second = tokio::spawn(async move { http(&host, "GET", &path, &[], b"").await });
    let p1 = within("the first poll", first).await.unwrap();
    assert_eq!(p1.status, 204);
    assert!(
        p1.elapsed < Duration::from_millis(1000),
        "first poll ended by the second, not by its timeout"
    );
    assert_eq!(
        f.post(
            &format!("/t?id={token}"),
            &invocation("9", "Echo", "[\"x\"]")
        )
        .await
        .status,
        200
    );
    let p2 = within("the second poll", second).await.unwrap();
    assert_eq!(p2.status, 200);
    assert_eq!(
        p2.text(),
        format!("{{\"type\":3,\"invocationId\":\"9\",\"result\":\"x\"}}{RS}")
    );
}

/// No poll within the disconnect timeout (0.8 s here, 15 s by default): the connection is
/// removed and OnDisconnected runs.
#[tokio::test]
async fn disconnect_timeout_removes_an_unpolled_connection() {
    let f = start().await;
    let (id, token) = f.long_polling().await;
    let t0 = Instant::now();
    within("OnDisconnected after the disconnect timeout", async {
        while f.disconnected(&id).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "removed after only {took:?}"
    );
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 404);
}

/// Concurrent sends are queued in arrival order (ASP.NET's WriteLock), not refused with 409.
#[tokio::test]
async fn concurrent_sends_are_queued_not_409() {
    let f = start().await;
    let (_, token) = f.long_polling().await;
    let mut sends = Vec::new();
    for i in 0..8 {
        let (host, path) = (f.host(), format!("/t?id={token}"));
        sends.push(tokio::spawn(async move {
            http(
                &host,
                "POST",
                &path,
                &[],
                &invocation(&i.to_string(), "Echo", &format!("[{i}]")),
            )
            .await
        }));
    }
    for s in sends {
        assert_eq!(within("a send", s).await.unwrap().status, 200);
    }
    let mut got = String::new();
    while (0..8).any(|i| !got.contains(&format!("\"invocationId\":\"{i}\""))) {
        let p = f.get(&format!("/t?id={token}")).await;
        assert_eq!(p.status, 200);
        got.push_str(&p.text());
    }
}

/// A POST body over the limit (4 × the 32 KiB message limit) gets 413 with the limit named;
/// the connection carries on.
#[tokio::test]
async fn oversize_post_is_413_and_the_connection_survives() {
    let f = start().await;
    let (_, token) = f.long_polling().await;
    let big = vec![b'x'; 200 * 1024];
    let r = f.post(&format!("/t?id={token}"), &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.text(),
        "The request body exceeds the limit of 131072 bytes."
    );
    assert_eq!(
        f.post(
            &format!("/t?id={token}"),
            &invocation("1", "Echo", "[\"still here\"]")
        )
        .await
        .status,
        200
    );
    let p = f.get(&format!("/t?id={token}")).await;
    assert_eq!(
        p.text(),
        format!("{{\"type\":3,\"invocationId\":\"1\",\"result\":\"still here\"}}{RS}")
    );
}

/// A single hub message over 32 KiB inside an accepted body closes the connection with the
/// size error, as on WebSockets.
#[tokio::test]
async fn oversize_message_in_a_post_closes_with_the_limit() {
    let f = start().await;
    let (_, token) = f.long_polling().await;
    let big = "y".repeat(40 * 1024);
    let r = f
        .post(
            &format!("/t?id={token}"),
            &invocation("1", "Echo", &format!("[\"{big}\"]")),
        )
        .await;
    assert_eq!(r.status, 200);
    let p = f.get(&format!("/t?id={token}")).await;
    assert!(
        p.text()
            .contains("The maximum message size of 32768B was exceeded"),
        "{}",
        p.text()
    );
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 204);
}

/// The outbound queue bound and slow-consumer policy hold on Long Polling: a client that
/// does not poll while the server floods it (64-message queue here, 128 KiB wire) is closed
/// with the slow-consumer reason; its next polls get what was queued, the Close, then 204.
#[tokio::test]
async fn long_polling_slow_consumer_is_closed() {
    let f = start().await;
    let (_, token) = f.negotiate("/small", None).await;
    assert_eq!(f.get(&format!("/small?id={token}")).await.status, 200);
    f.post(
        &format!("/small?id={token}"),
        format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
    )
    .await;
    assert_eq!(
        f.post(
            &format!("/small?id={token}"),
            &invocation("f", "Flood", "[20000]")
        )
        .await
        .status,
        200
    );
    // Let the flood fill the wire and the queue with no poll draining them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = String::new();
    let status = loop {
        let p = f.get(&format!("/small?id={token}")).await;
        if p.status != 200 {
            break p.status;
        }
        got.push_str(&p.text());
    };
    assert_eq!(status, 204);
    let items = count(&got, "\"target\":\"Item\"");
    assert!(items < 20000, "the queue is bounded: {items} items arrived");
    assert!(
        got.contains("Slow consumer: outbound queue full."),
        "Close with the slow-consumer reason: {}",
        &got[got.len().saturating_sub(300)..]
    );
}

// ---------------------------------------------------------------------------------------
// Status codes shared by the HTTP transports
// ---------------------------------------------------------------------------------------

/// Unknown ids: 404 "No Connection with that ID" for polls, SSE, sends and deletes; a
/// missing id: 400 "Connection ID required".
#[tokio::test]
async fn unknown_id_is_404_and_missing_id_is_400() {
    let f = start().await;
    for r in [
        f.get("/t?id=nope").await,
        f.post("/t?id=nope", b"{}").await,
        f.delete("/t?id=nope").await,
    ] {
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "No Connection with that ID");
    }
    let sse = Sse::open(&f.host(), "/t?id=nope").await;
    assert_eq!(sse.status, 404);
    for r in [
        f.get("/t").await,
        f.post("/t", b"{}").await,
        f.delete("/t").await,
    ] {
        assert_eq!(r.status, 400);
        assert_eq!(r.text(), "Connection ID required");
    }
}

/// A token is bound to its transport once used: a poll on a WebSocket connection is 400
/// "Cannot change transports mid-connection", a POST 405, a DELETE 400; SSE on a Long
/// Polling connection is 400 too.
#[tokio::test]
async fn other_transport_on_a_bound_token_is_refused() {
    let f = start().await;
    transport_mixups(&f, &f, &f).await;
}

/// [`other_transport_on_a_bound_token_is_refused`] across two nodes: negotiate on A, the
/// WebSocket on B (B claims the connection from A, the token's node), the other transports
/// tried on A and on B (forwarded to A): the same answers, never a second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_transport_on_a_token_bound_on_another_node_is_refused() {
    let (a, b) = two_nodes().await;
    transport_mixups(&a, &b, &a).await;
    transport_mixups(&a, &b, &b).await;
}

async fn ws_connect(
    f: &Fixture,
    token: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    within(
        "ws connect",
        tokio_tungstenite::connect_async(format!("{}/t?id={token}", f.server.ws_url())),
    )
    .await
    .map(|(ws, _)| ws)
}

fn refused_status(r: Result<impl Sized, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the WebSocket was accepted"),
    }
}

/// Negotiates on `neg`, starts a WebSocket on `ws_at`, then tries the other transports (and
/// a second WebSocket) on `probe`; then a Long Polling connection's token on a WebSocket
/// and an event stream.
async fn transport_mixups(neg: &Fixture, ws_at: &Fixture, probe: &Fixture) {
    let (_, token) = neg.negotiate("/t", None).await;
    let mut ws = ws_connect(ws_at, &token).await.expect("ws");
    ws.send(Message::text(format!(
        "{{\"protocol\":\"json\",\"version\":1}}{RS}"
    )))
    .await
    .unwrap();
    let hs = within("handshake", ws.next()).await.unwrap().unwrap();
    assert_eq!(hs.into_text().unwrap().as_str(), format!("{{}}{RS}"));
    let poll = probe.get(&format!("/t?id={token}")).await;
    assert_eq!(poll.status, 400);
    assert_eq!(poll.text(), "Cannot change transports mid-connection");
    let post = probe.post(&format!("/t?id={token}"), b"{}").await;
    assert_eq!(post.status, 405);
    assert_eq!(
        post.text(),
        "POST requests are not allowed for WebSocket connections."
    );
    assert_eq!(probe.delete(&format!("/t?id={token}")).await.status, 400);
    let sse = Sse::open(&probe.host(), &format!("/t?id={token}")).await;
    assert_eq!(sse.status, 400);
    assert_eq!(refused_status(ws_connect(probe, &token).await), 409);
    // The WebSocket is unaffected.
    ws.send(Message::text(
        String::from_utf8(invocation("1", "Transport", "[]")).unwrap(),
    ))
    .await
    .unwrap();
    let reply = within("completion", ws.next()).await.unwrap().unwrap();
    assert!(reply
        .into_text()
        .unwrap()
        .contains("\"result\":\"WebSockets\""));

    let (_, lp_token) = neg.long_polling().await;
    let sse = Sse::open(&probe.host(), &format!("/t?id={lp_token}")).await;
    assert_eq!(sse.status, 400);
    assert_eq!(refused_status(ws_connect(ws_at, &lp_token).await), 400);
}

/// Negotiate lists only the hub's transports; requests on the others get ASP.NET's 404.
#[tokio::test]
async fn disallowed_transports_are_not_offered_and_refused() {
    let f = start().await;
    let r = http(
        &f.host(),
        "POST",
        "/wsonly/negotiate?negotiateVersion=1",
        &[],
        b"",
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["availableTransports"],
        serde_json::json!([{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}])
    );
    let all = http(
        &f.host(),
        "POST",
        "/t/negotiate?negotiateVersion=1",
        &[],
        b"",
    )
    .await;
    let v2: serde_json::Value = serde_json::from_slice(&all.body).unwrap();
    assert_eq!(
        v2["availableTransports"],
        serde_json::json!([
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
            {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
            {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
        ])
    );
    let token = v["connectionToken"].as_str().unwrap();
    let poll = f.get(&format!("/wsonly?id={token}")).await;
    assert_eq!(poll.status, 404);
    assert_eq!(
        poll.text(),
        "LongPolling transport not supported by this end point type"
    );
    let mut sse = Sse::open(&f.host(), &format!("/wsonly?id={token}")).await;
    assert_eq!(sse.status, 404);
    sse.expect_end().await;
    assert_eq!(
        String::from_utf8_lossy(&sse.body),
        "ServerSentEvents transport not supported by this end point type"
    );
}

/// Every request is authenticated, and only the token's user can use it: a poll by another
/// user (or anonymously) is 404, a bad JWT 401.
#[tokio::test]
async fn polls_and_sends_must_come_from_the_tokens_user() {
    let f = start().await;
    let alice = f.server.token(&unique_prefix("alice"));
    let bob = f.server.token(&unique_prefix("bob"));
    let (_, token) = f.negotiate("/t", Some(&alice)).await;
    let a = format!("Bearer {alice}");
    let b = format!("Bearer {bob}");
    let host = f.host();
    let first = http(
        &host,
        "GET",
        &format!("/t?id={token}"),
        &[("Authorization", &a)],
        b"",
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        http(
            &host,
            "GET",
            &format!("/t?id={token}"),
            &[("Authorization", &b)],
            b""
        )
        .await
        .status,
        404
    );
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 404);
    assert_eq!(
        http(
            &host,
            "POST",
            &format!("/t?id={token}"),
            &[("Authorization", &b)],
            b"{}"
        )
        .await
        .status,
        404
    );
    let bad = http(
        &host,
        "GET",
        &format!("/t?id={token}"),
        &[("Authorization", "Bearer not.a.jwt")],
        b"",
    )
    .await;
    assert_eq!(bad.status, 401);
    // The owner, with the token in the query this time, is served.
    let q = format!("/t?id={token}&access_token={alice}");
    let hs = f
        .post(
            &q,
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(hs.status, 200);
    assert_eq!(f.get(&q).await.text(), format!("{{}}{RS}"));
}

/// signalrcore sends its handshake before its first poll: a POST on a negotiated token
/// with no transport yet is buffered and the first poll binds the transport.
#[tokio::test]
async fn send_before_the_first_poll_is_buffered() {
    let f = start().await;
    let (_, token) = f.negotiate("/t", None).await;
    let hs = f
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(hs.status, 200);
    assert_eq!(f.get(&format!("/t?id={token}")).await.status, 200);
    assert_eq!(
        f.get(&format!("/t?id={token}")).await.text(),
        format!("{{}}{RS}")
    );
}

// ---------------------------------------------------------------------------------------
// No sticky sessions: two nodes, requests alternating between them
// ---------------------------------------------------------------------------------------

/// Two nodes sharing a memory backplane (as two instances share Redis) and one list of
/// OnDisconnected runs.
async fn two_nodes() -> (Fixture, Fixture) {
    two_nodes_on(Net::Memory(MemoryBus::new())).await
}

/// Two nodes on the shared Redis (unique channel prefix); `None` when Redis is unavailable
/// outside CI (under `CI=true` that panics).
async fn two_nodes_on_redis() -> Option<(Fixture, Fixture)> {
    support::cluster::redis().await?;
    Some(two_nodes_on(Net::Redis(unique_prefix("fwd"))).await)
}

async fn two_nodes_on(net: Net) -> (Fixture, Fixture) {
    let disconnects: Disconnects = Arc::default();
    let a = start_node(&net, disconnects.clone(), "a").await;
    let b = start_node(&net, disconnects, "b").await;
    (a, b)
}

fn forwarded(a: &Fixture, b: &Fixture) -> u64 {
    a.server.server().forwarded_requests() + b.server.server().forwarded_requests()
}

/// Negotiate on A, then every Long Polling request alternates between B and A: the
/// connection lives on A (the token names it) and B forwards. The first poll, the handshake,
/// invocations, 300 server messages, a poll ended by DELETE on the other node (204), and
/// OnDisconnected once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_across_two_nodes_without_sticky_sessions() {
    let (a, b) = two_nodes().await;
    long_polling_across(a, b).await;
}

/// [`long_polling_across_two_nodes_without_sticky_sessions`] with the nodes on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_across_two_nodes_on_redis() {
    if let Some((a, b)) = two_nodes_on_redis().await {
        long_polling_across(a, b).await;
    }
}

async fn long_polling_across(a: Fixture, b: Fixture) {
    let (id, token) = a.negotiate("/t", None).await;
    let at = |i: usize| if i % 2 == 0 { &b } else { &a };
    let first = b.get(&format!("/t?id={token}")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        first.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(first.header("cache-control"), Some("no-cache, no-store"));
    let hs = b
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(hs.status, 200);
    assert_eq!(
        a.get(&format!("/t?id={token}")).await.text(),
        format!("{{}}{RS}")
    );
    for i in 0..20 {
        let r = at(i)
            .post(
                &format!("/t?id={token}"),
                &invocation(&i.to_string(), "Echo", &format!("[{i}]")),
            )
            .await;
        assert_eq!(r.status, 200);
        let p = at(i + 1).get(&format!("/t?id={token}")).await;
        assert_eq!(
            p.text(),
            format!("{{\"type\":3,\"invocationId\":\"{i}\",\"result\":{i}}}{RS}")
        );
    }
    let flood = b
        .post(
            &format!("/t?id={token}"),
            &invocation("f", "Flood", "[300]"),
        )
        .await;
    assert_eq!(flood.status, 200);
    let mut got = String::new();
    let mut i = 0;
    while !got.contains("\"invocationId\":\"f\"") {
        let p = at(i).get(&format!("/t?id={token}")).await;
        assert_eq!(p.status, 200);
        got.push_str(&p.text());
        i += 1;
    }
    let items: Vec<String> = (0..300)
        .map(|n| format!("{{\"type\":1,\"target\":\"Item\",\"arguments\":[{n}]}}{RS}"))
        .collect();
    assert!(got.starts_with(&items.concat()), "300 items in order");

    // A waiting poll forwarded by B ends with 204 when a newer poll arrives at A, and the
    // newer one carries the next message.
    let host_b = b.host();
    let path = format!("/t?id={token}");
    let older = tokio::spawn(async move { http(&host_b, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let host_a = a.host();
    let path = format!("/t?id={token}");
    let newer = tokio::spawn(async move { http(&host_a, "GET", &path, &[], b"").await });
    let older = within("the older, forwarded poll", older).await.unwrap();
    assert_eq!(older.status, 204);
    let r = b
        .post(&format!("/t?id={token}"), &invocation("n", "Echo", "[1]"))
        .await;
    assert_eq!(r.status, 200);
    let newer = within("the newer poll", newer).await.unwrap();
    assert_eq!(
        newer.text(),
        format!("{{\"type\":3,\"invocationId\":\"n\",\"result\":1}}{RS}")
    );

    // A waiting poll forwarded by B ends with 204 when A is told to DELETE.
    let host_b = b.host();
    let path = format!("/t?id={token}");
    let waiting = tokio::spawn(async move { http(&host_b, "GET", &path, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.delete(&format!("/t?id={token}")).await.status, 202);
    let ended = within("the forwarded poll", waiting).await.unwrap();
    assert_eq!(ended.status, 204);
    within("OnDisconnected", async {
        while a.disconnected(&id).is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(b.get(&format!("/t?id={token}")).await.status, 404);
    assert_eq!(b.post(&format!("/t?id={token}"), b"x").await.status, 404);
    assert!(
        forwarded(&a, &b) >= 25,
        "B forwarded {} requests",
        forwarded(&a, &b)
    );
    assert_eq!(a.server.server().forwarded_requests(), 0, "A owns it");
}

/// Negotiate on A, the event stream through B, sends on both: every event arrives once and
/// in order through B's relay of A's stream (1,000 of them), with the SSE headers; the
/// client closing its stream on B ends the connection on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_across_two_nodes_without_sticky_sessions() {
    let (a, b) = two_nodes().await;
    sse_across(a, b).await;
}

/// [`sse_across_two_nodes_without_sticky_sessions`] with the nodes on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_across_two_nodes_on_redis() {
    if let Some((a, b)) = two_nodes_on_redis().await {
        sse_across(a, b).await;
    }
}

async fn sse_across(a: Fixture, b: Fixture) {
    let (id, token) = a.negotiate("/t", None).await;
    let mut sse = Sse::open(&b.host(), &format!("/t?id={token}")).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    assert_eq!(sse.next_block().await, ":\r\n");
    let r = a
        .post(
            &format!("/t?id={token}"),
            format!("{{\"protocol\":\"json\",\"version\":1}}{RS}").as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(sse.next_event().await, format!("data: {{}}{RS}\r\n\r\n"));
    let r = b
        .post(
            &format!("/t?id={token}"),
            &invocation("1", "Transport", "[]"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sse.next_event().await,
        format!("data: {{\"type\":3,\"invocationId\":\"1\",\"result\":\"ServerSentEvents\"}}{RS}\r\n\r\n")
    );
    let r = b
        .post(
            &format!("/t?id={token}"),
            &invocation("f", "Flood", "[1000]"),
        )
        .await;
    assert_eq!(r.status, 200);
    // Events carry whatever was queued at once (several records per event, as locally).
    let mut records = String::new();
    while !records.contains("\"invocationId\":\"f\"") {
        let ev = sse.next_event().await;
        let data = ev
            .strip_prefix("data: ")
            .and_then(|d| d.strip_suffix("\r\n\r\n"))
            .expect("one data line");
        records.push_str(data);
    }
    let expected: String = (0..1000)
        .map(|n| format!("{{\"type\":1,\"target\":\"Item\",\"arguments\":[{n}]}}{RS}"))
        .collect();
    assert!(
        records.starts_with(&expected),
        "1,000 items once each, in order"
    );
    // A second stream is refused by the owner, whichever node it lands on.
    let second = Sse::open(&b.host(), &format!("/t?id={token}")).await;
    assert_eq!(second.status, 409);
    drop(sse);
    within(
        "OnDisconnected after the relayed SSE stream closed",
        async {
            while a.disconnected(&id).is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert_eq!(b.post(&format!("/t?id={token}"), b"x").await.status, 404);
    assert!(b.server.server().forwarded_requests() >= 3);
}

/// When the node that negotiated a connection is gone, its requests landing elsewhere get
/// 404 (the connection is gone with it; clients start over) within the open timeout, and a
/// token for another user is never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_requests_to_a_dead_owner_get_404() {
    let (mut a, b) = two_nodes().await;
    let (_, token) = a.negotiate("/t", None).await;
    assert_eq!(b.get(&format!("/t?id={token}")).await.status, 200);
    let server_a = a.server.server.take().unwrap();
    server_a.shutdown().await;
    let t0 = Instant::now();
    let r = b.get(&format!("/t?id={token}")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "No Connection with that ID");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let before = b.server.server().forwarded_requests();
    let alice = b.server.token(&unique_prefix("alice"));
    let r = http(
        &b.host(),
        "GET",
        &format!("/t?id={token}"),
        &[("Authorization", &format!("Bearer {alice}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(b.server.server().forwarded_requests(), before);
}

// ---------------------------------------------------------------------------------------
// Rates (printed; run with --nocapture to see them)
// ---------------------------------------------------------------------------------------

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// One client's figures: server → client messages per second, echo round trips.
struct Rates {
    per_second: f64,
    rtt: Vec<Duration>,
}

impl Rates {
    fn line(&self) -> String {
        let mut v = self.rtt.clone();
        v.sort();
        let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
        format!(
            "{:.0} msg/s server->client; echo RTT p50 {:.2} ms p99 {:.2} ms ({} round trips)",
            self.per_second,
            q(0.5),
            q(0.99),
            v.len()
        )
    }
}

const RATE_MESSAGES: usize = 10_000;
const RATE_ECHOES: usize = 300;

/// A Long Polling client of a connection negotiated on `owner` whose requests all go to
/// `via` (the owner itself: direct; another node: every request forwarded).
async fn long_polling_rates(owner: &Fixture, via: &Fixture) -> Rates {
    let (_, token) = owner.negotiate("/t", None).await;
    let path = format!("/t?id={token}");
    assert_eq!(via.get(&path).await.status, 200);
    let hs = format!("{{\"protocol\":\"json\",\"version\":1}}{RS}");
    assert_eq!(via.post(&path, hs.as_bytes()).await.status, 200);
    assert_eq!(via.get(&path).await.text(), format!("{{}}{RS}"));
    let t0 = Instant::now();
    let flood = invocation("f", "Flood", &format!("[{RATE_MESSAGES}]"));
    via.post(&path, &flood).await;
    let mut items = 0;
    let mut done = false;
    while !done {
        let p = via.get(&path).await;
        assert_eq!(p.status, 200);
        let text = p.text();
        items += count(&text, "\"target\":\"Item\"");
        done = text.contains("\"invocationId\":\"f\"");
    }
    let per_second = RATE_MESSAGES as f64 / t0.elapsed().as_secs_f64();
    assert_eq!(items, RATE_MESSAGES, "every item arrives");
    let mut rtt = Vec::with_capacity(RATE_ECHOES);
    for i in 0..RATE_ECHOES {
        let t = Instant::now();
        via.post(&path, &invocation(&i.to_string(), "Echo", "[\"e\"]"))
            .await;
        let want = format!("\"invocationId\":\"{i}\"");
        while !via.get(&path).await.text().contains(&want) {}
        rtt.push(t.elapsed());
    }
    Rates { per_second, rtt }
}

/// [`long_polling_rates`] for Server-Sent Events: the stream and the sends go to `via`.
async fn sse_rates(owner: &Fixture, via: &Fixture) -> Rates {
    let (_, token) = owner.negotiate("/t", None).await;
    let path = format!("/t?id={token}");
    let mut sse = Sse::open(&via.host(), &path).await;
    let hs = format!("{{\"protocol\":\"json\",\"version\":1}}{RS}");
    via.post(&path, hs.as_bytes()).await;
    assert_eq!(sse.next_event().await, format!("data: {{}}{RS}\r\n\r\n"));
    let t0 = Instant::now();
    let flood = invocation("f", "Flood", &format!("[{RATE_MESSAGES}]"));
    via.post(&path, &flood).await;
    sse.read_until("the flood", |b| {
        find(b, b"\"invocationId\":\"f\"").is_some()
    })
    .await;
    let per_second = RATE_MESSAGES as f64 / t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&sse.body).into_owned();
    assert_eq!(
        count(&text, "\"target\":\"Item\""),
        RATE_MESSAGES,
        "every item arrives"
    );
    sse.body.clear();
    let mut rtt = Vec::with_capacity(RATE_ECHOES);
    for i in 0..RATE_ECHOES {
        let t = Instant::now();
        via.post(&path, &invocation(&i.to_string(), "Echo", "[\"e\"]"))
            .await;
        let want = format!("\"invocationId\":\"{i}\"");
        while !sse.next_event().await.contains(&want) {}
        rtt.push(t.elapsed());
    }
    Rates { per_second, rtt }
}

/// The transport of a rate run.
#[derive(Clone, Copy, Debug)]
enum Kind {
    LongPolling,
    ServerSentEvents,
}

async fn rates(kind: Kind, owner: &Fixture, via: &Fixture) -> Rates {
    match kind {
        Kind::LongPolling => long_polling_rates(owner, via).await,
        Kind::ServerSentEvents => sse_rates(owner, via).await,
    }
}

/// Prints one client's rates direct, forwarded over the memory bus, and forwarded over
/// Redis (when there is one; under `CI=true` there must be).
async fn report_rates(kind: Kind) {
    let (a, b) = two_nodes().await;
    let direct = rates(kind, &a, &a).await;
    let memory = rates(kind, &a, &b).await;
    println!("RATE {kind:?}, direct:                 {}", direct.line());
    println!("RATE {kind:?}, forwarded (memory bus): {}", memory.line());
    if let Some((a, b)) = two_nodes_on_redis().await {
        let redis = rates(kind, &a, &b).await;
        println!("RATE {kind:?}, forwarded (Redis):      {}", redis.line());
    }
}

/// One Long Polling client, direct and with every request forwarded by another node:
/// 10,000 server → client messages, then 300 sequential echo round trips (POST + poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_long_polling_one_client() {
    report_rates(Kind::LongPolling).await;
}

/// One Server-Sent Events client, direct and relayed by another node: 10,000 server →
/// client messages, then 300 sequential echo round trips (POST + event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_server_sent_events_one_client() {
    report_rates(Kind::ServerSentEvents).await;
}
