//! Limits against the attacks of issue 14, with exact statuses: slowloris headers and
//! bodies, idle keep-alive connections, the per-address and total connection caps, the
//! per-address negotiate/connect rate, the per-user cap (negotiate 429, handshake error and
//! Close 1008), the Origin of WebSocket and SSE requests, the start refusals (`*`, `null`,
//! public development mode), the payload nesting limit at ingest, and the client timeout
//! running from the handshake.
//!
//! Timers are set short (about a second) so the tests stay quick; each server is its own,
//! on port 0. Run just these: `cargo test --release --test limits`.

#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use feedhub::http::limits::LimitsConfig;
use feedhub::protocol::{handshake, ProtocolKind};
use feedhub::{feed, ServerBuilder, ServerConfig};
use futures_util::StreamExt;
use support::{start_feed_server_with, within, RawClient, TestServer, TEST_API_KEY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn addr(s: &TestServer) -> SocketAddr {
    s.server().local_addr()
}

async fn server(limits: LimitsConfig) -> TestServer {
    start_feed_server_with(|c| ServerConfig { limits, ..c }).await
}

/// A parsed HTTP response: status, lower-cased header lines, body.
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Reads one response (until the peer closes or `Content-Length` bytes of body arrived).
async fn read_response(s: &mut TcpStream) -> Resp {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = within("response", s.read(&mut chunk)).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(usize::MAX);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Resp {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Sends `raw` on a new connection and reads the response.
async fn request(a: SocketAddr, raw: &str) -> Resp {
    let mut s = within("connect", TcpStream::connect(a)).await.unwrap();
    within("send", s.write_all(raw.as_bytes())).await.unwrap();
    read_response(&mut s).await
}

async fn get(a: SocketAddr, path: &str) -> Resp {
    request(
        a,
        &format!("GET {path} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Waits for the server to close `s` without sending anything; the time it took.
async fn closed_silently(s: &mut TcpStream, started: Instant) -> Duration {
    let mut chunk = [0u8; 256];
    let n = within("server close", s.read(&mut chunk))
        .await
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "expected a close without a response, got {:?}",
        String::from_utf8_lossy(&chunk[..n])
    );
    started.elapsed()
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {line_start} missing"))
}

#[tokio::test]
async fn a_slowloris_header_is_dropped_after_the_header_read_timeout() {
    let s = server(LimitsConfig {
        header_read_timeout: Duration::from_secs(1),
        ..LimitsConfig::default()
    })
    .await;
    // Half a request head, then one more header byte every 200 ms: still cut at ~1 s.
    let mut slow = TcpStream::connect(addr(&s)).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
        .await
        .unwrap();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"a").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), trickle).await;
    let took = closed_silently(&mut slow, started).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    // A connection that sends nothing at all: the same limit.
    let mut silent = TcpStream::connect(addr(&s)).await.unwrap();
    let started = Instant::now();
    let took = closed_silently(&mut silent, started).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let m = get(addr(&s), "/metrics").await.body;
    assert!(metric(&m, "feedhub_http_timeouts_total{kind=\"header_read\"}") >= 2);
    assert_eq!(get(addr(&s), "/healthz").await.status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_but_a_waiting_response_is_not() {
    let s = server(LimitsConfig {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    let mut c = TcpStream::connect(a).await.unwrap();
    c.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut c).await;
    assert_eq!(r.status, 200);
    let started = Instant::now();
    let took = closed_silently(&mut c, started).await;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );

    // A Server-Sent Events stream is a request in progress: it outlives both timeouts.
    let token = s.token("sse-user");
    let neg = request(
        a,
        &format!("POST /hubs/feed/negotiate?negotiateVersion=1 HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(neg.status, 200, "{}", neg.body);
    let v: serde_json::Value = serde_json::from_str(&neg.body).unwrap();
    let id = v["connectionToken"].as_str().unwrap().to_string();
    let mut sse = TcpStream::connect(a).await.unwrap();
    sse.write_all(
        format!("GET /hubs/feed?id={id} HTTP/1.1\r\nHost: {a}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains(":\r\n") {
        let n = within("sse start", sse.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "SSE stream closed");
        got.extend_from_slice(&chunk[..n]);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hs = request(
        a,
        &format!("POST /hubs/feed?id={id} HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 32\r\nConnection: close\r\n\r\n{{\"protocol\":\"json\",\"version\":1}}\u{1e}"),
    )
    .await;
    assert_eq!(hs.status, 200, "{}", hs.body);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: {}") {
        let n = within("handshake over SSE", sse.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "the SSE stream was closed while in progress");
        got.extend_from_slice(&chunk[..n]);
    }
    let m = get(a, "/metrics").await.body;
    assert!(metric(&m, "feedhub_http_timeouts_total{kind=\"idle\"}") >= 1);
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let s = server(LimitsConfig {
        body_read_timeout: Duration::from_secs(1),
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    let mut c = TcpStream::connect(a).await.unwrap();
    let started = Instant::now();
    c.write_all(
        format!("POST /api/feed HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{{\"rec\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut c).await;
    let took = started.elapsed();
    assert_eq!(r.status, 408, "{}", r.head);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "answered after {took:?}"
    );
    // ...and the connection is closed after it.
    let mut rest = [0u8; 64];
    assert_eq!(within("close", c.read(&mut rest)).await.unwrap_or(0), 0);
    let m = get(a, "/metrics").await.body;
    assert!(metric(&m, "feedhub_http_timeouts_total{kind=\"body_read\"}") >= 1);
}

#[tokio::test]
async fn the_per_address_cap_answers_429_with_retry_after() {
    let s = server(LimitsConfig {
        max_connections_per_address: 3,
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(a).await.unwrap());
    }
    // Admission happens at accept: give the server a moment to count the three.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get(a, "/healthz").await;
    assert_eq!(r.status, 429, "{}", r.head);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert!(r.body.contains("Too many connections from this address"));
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get(a, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        metric(
            &r.body,
            "feedhub_http_refused_total{reason=\"address_cap\"}"
        ) >= 1
    );
}

/// A kept-alive connection that has been served one request.
async fn served_connection(a: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(a).await.unwrap();
    c.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut c).await.status, 200);
    c
}

#[tokio::test]
async fn the_total_cap_answers_503_when_every_connection_has_sent_a_request() {
    let s = server(LimitsConfig {
        max_connections: 2,
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    let one = served_connection(a).await;
    let _two = served_connection(a).await;
    let r = get(a, "/healthz").await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    assert!(r.body.contains("connection limit"));
    drop(one);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get(a, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(metric(&r.body, "feedhub_http_refused_total{reason=\"total_cap\"}") >= 1);
    // (The gauge is process-wide, and other tests' servers run in this process.)
    assert!(r.body.contains("feedhub_http_connection_limit "));
}

#[tokio::test]
async fn at_the_total_cap_half_open_connections_make_room_for_new_ones() {
    let s = server(LimitsConfig {
        max_connections: 3,
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    // Three half-open connections fill the server...
    let half_open_one = |a: SocketAddr| async move {
        let mut c = TcpStream::connect(a).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        c
    };
    let mut half_open = Vec::new();
    for _ in 0..3 {
        half_open.push(half_open_one(a).await);
    }
    // ...yet /healthz answers, again and again while the flood refills the server: each
    // time the oldest half-open connection is closed to make room.
    for _ in 0..3 {
        assert_eq!(get(a, "/healthz").await.status, 200);
        half_open.push(half_open_one(a).await);
    }
    for c in half_open.iter_mut().take(3) {
        let started = Instant::now();
        closed_silently(c, started).await;
    }
    let m = get(a, "/metrics").await.body;
    assert!(metric(&m, "feedhub_http_timeouts_total{kind=\"evicted_at_cap\"}") >= 3);
}

#[tokio::test]
async fn the_negotiate_and_connect_rate_per_address_answers_429() {
    let s = server(LimitsConfig {
        connect_rate_per_address: 1,
        connect_burst_per_address: 3,
        ..LimitsConfig::default()
    })
    .await;
    let a = addr(&s);
    let token = s.token("rate-user");
    let negotiate = format!("POST /hubs/feed/negotiate?negotiateVersion=1 HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    for _ in 0..3 {
        assert_eq!(request(a, &negotiate).await.status, 200);
    }
    let r = request(a, &negotiate).await;
    assert_eq!(r.status, 429, "{}", r.head);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // A WebSocket upgrade counts against the same bucket.
    let ws = format!("GET /hubs/feed?access_token={token} HTTP/1.1\r\nHost: {a}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
    assert_eq!(request(a, &ws).await.status, 429);
    // Other routes are not rate limited.
    assert_eq!(get(a, "/healthz").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(request(a, &negotiate).await.status, 200);
}

#[tokio::test]
async fn the_per_user_cap_refuses_negotiate_with_429_and_connect_with_a_close_reason() {
    let s = start_feed_server_with(|c| ServerConfig {
        max_connections_per_user: Some(2),
        ..c
    })
    .await;
    let a = addr(&s);
    let token = s.token("capped");
    let url = format!("{}/hubs/feed?access_token={token}", s.ws_url());
    let _c1 = RawClient::connect(&url, ProtocolKind::Json).await;
    let _c2 = RawClient::connect(&url, ProtocolKind::MessagePack).await;
    let r = request(
        a,
        &format!("POST /hubs/feed/negotiate?negotiateVersion=1 HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after").as_deref(), Some("5"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("Too many connections for this user (at most 2"),
        "{v}"
    );
    // A third connect (skipNegotiation): a handshake error, then Close 1008 with a reason.
    let mut c3 = RawClient::open(&url).await;
    let mut req = Vec::new();
    handshake::write_request("json", 1, &mut req);
    c3.send_text(String::from_utf8(req).unwrap()).await;
    let resp = c3.recv_raw().await.expect("handshake response");
    let text = String::from_utf8(resp).unwrap();
    assert!(
        text.starts_with("{\"error\":\"Too many connections for this user"),
        "{text}"
    );
    let close = loop {
        match within("close frame", c3.ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => break f,
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                panic!("closed without a close reason")
            }
            Some(Ok(_)) => continue,
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "too many connections for this user");
    // Another user is not affected.
    let other = format!("{}/hubs/feed?access_token={}", s.ws_url(), s.token("other"));
    let _o = RawClient::connect(&other, ProtocolKind::Json).await;
}

#[tokio::test]
async fn with_cors_origins_websocket_and_sse_from_other_origins_get_403() {
    let s = start_feed_server_with(|c| ServerConfig {
        cors_origins: vec!["https://app.example".to_string()],
        ..c
    })
    .await;
    let a = addr(&s);
    let token = s.token("origin-user");
    let upgrade = |origin: Option<&str>| {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        format!("GET /hubs/feed?access_token={token} HTTP/1.1\r\nHost: {a}\r\n{origin}Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    };
    for bad in ["https://evil.example", "null"] {
        let r = request(a, &upgrade(Some(bad))).await;
        assert_eq!(r.status, 403, "Origin {bad}: {}", r.head);
    }
    for good in [
        Some("https://app.example"),
        Some(format!("http://{a}").as_str()),
        None,
    ] {
        let r = request(a, &upgrade(good)).await;
        assert_eq!(r.status, 101, "Origin {good:?}: {}", r.head);
    }
    let sse = format!("GET /hubs/feed?id=whatever HTTP/1.1\r\nHost: {a}\r\nOrigin: https://evil.example\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    assert_eq!(request(a, &sse).await.status, 403);
    let m = get(a, "/metrics").await.body;
    assert!(metric(&m, "feedhub_http_refused_total{reason=\"origin\"}") >= 3);
}

#[tokio::test]
async fn wildcard_and_null_origins_and_public_development_mode_are_refused_at_start() {
    let base = || ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some("a-secret-of-at-least-thirty-two-bytes".to_string()),
        ..ServerConfig::default()
    };
    for (origins, expect) in [
        (vec!["*"], "'*' is refused"),
        (vec!["null"], "'null' is refused"),
    ] {
        let config = ServerConfig {
            cors_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..base()
        };
        let err = ServerBuilder::new(config)
            .hub(feed::feed_hub())
            .start()
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(expect), "{err}");
    }
    let public_dev = ServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        jwt_secret: None,
        ..base()
    };
    let err = ServerBuilder::new(public_dev.clone())
        .hub(feed::feed_hub())
        .start()
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("--dev-mode-public"), "{err}");
    let allowed = ServerBuilder::new(ServerConfig {
        dev_mode_public: true,
        ..public_dev
    })
    .hub(feed::feed_hub())
    .start()
    .await
    .expect("started with --dev-mode-public");
    allowed.shutdown().await;
}

#[tokio::test]
async fn payloads_nested_deeper_than_128_get_400_and_128_reaches_every_protocol() {
    let s = support::start_feed_server().await;
    let a = addr(&s);
    let user = "deep-user";
    let url = format!("{}/hubs/feed?access_token={}", s.ws_url(), s.token(user));
    let mut json = RawClient::connect(&url, ProtocolKind::Json).await;
    let mut mp = RawClient::connect(&url, ProtocolKind::MessagePack).await;
    let post = |payload: String| {
        let body = format!(r#"{{"recipients":["{user}"],"payload":{payload}}}"#);
        format!("POST /api/feed HTTP/1.1\r\nHost: {a}\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
    };
    let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
    for depth in [129, 100_000] {
        let r = request(a, &post(nested(depth))).await;
        assert_eq!(r.status, 400, "depth {depth}");
        assert_eq!(r.body, "payload nested deeper than 128 levels");
    }
    let r = request(a, &post(nested(128))).await;
    assert_eq!(r.status, 202, "{}", r.body);
    // Raw frames: the test clients' own decoders stop at 128 levels for a whole message.
    let text = String::from_utf8(feed_frame(&mut json).await).unwrap();
    let want = format!("\"arguments\":[{}]", nested(128));
    assert!(text.contains(&want), "{text}");
    let bin = feed_frame(&mut mp).await;
    let mut want = vec![0x91u8; 127];
    want.push(0x90);
    assert!(
        bin.windows(want.len()).any(|w| w == want.as_slice()),
        "MessagePack frame lacks the 128-deep payload"
    );
}

/// The next raw frame carrying a `FeedUpdated` invocation.
async fn feed_frame(c: &mut RawClient) -> Vec<u8> {
    loop {
        let f = c.recv_raw().await.expect("a frame");
        if f.windows(11).any(|w| w == b"FeedUpdated") {
            return f;
        }
    }
}
