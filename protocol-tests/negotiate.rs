//! HTTP-level tests over real sockets: `/negotiate` (v0 and v1), connecting with the token,
//! skipNegotiation, authentication (401s, header and query tokens), CORS, health, metrics and
//! the publish API. Requests are written by hand on a `TcpStream` (HTTP/1.1).
//!
//! Section numbers (§) refer to `/work/shared/docs/signalr-protocol.md`.

#[path = "support/mod.rs"]
mod support;

use bytes::BytesMut;
use feedhub::protocol::{CompletionResult, HubMessage, ProtocolKind};
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
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

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

fn host_of(base_url: &str) -> &str {
    base_url.trim_start_matches("http://")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = find(data, b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
async fn http(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let host = host_of(base_url);
    let mut stream = within("tcp connect", TcpStream::connect(host))
        .await
        .expect("connect");
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
    // The server may answer (e.g. 413) and close before reading everything we send.
    let _ = within("send request", stream.write_all(&bytes)).await;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match within("response", stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    let end = find(&raw, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
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
    }
}

async fn post(base: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http(base, "POST", path, headers, b"").await
}

/// Headers the 10.0.11 Node client sends with negotiate (§3.1).
const CLIENT_HEADERS: &[(&str, &str)] = &[
    ("X-Requested-With", "XMLHttpRequest"),
    (
        "User-Agent",
        "Microsoft SignalR/10.0 (10.0.11; Linux; NodeJS; 20.20.2)",
    ),
];

// ---------------------------------------------------------------------------------------
// WebSocket helpers
// ---------------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket; `Err(status)` when the server refuses the upgrade.
async fn ws_open(url: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    match within("websocket connect", tokio_tungstenite::connect_async(req)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket connect to {url} failed: {e}"),
    }
}

/// JSON handshake, then invokes `target()` and returns its Completion's result.
async fn handshake_and_call(ws: &mut Ws, target: &str) -> CompletionResult {
    within(
        "send",
        ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\x1e")),
    )
    .await
    .expect("send");
    let mut buf = BytesMut::new();
    let mut handshaken = false;
    let mut sent = false;
    loop {
        if !handshaken {
            if let Some(end) = buf.iter().position(|&b| b == 0x1e) {
                assert_eq!(&buf[..=end], b"{}\x1e", "handshake failed");
                let _ = buf.split_to(end + 1);
                handshaken = true;
            }
        }
        if handshaken && !sent {
            let msg = format!(
                "{{\"type\":1,\"invocationId\":\"1\",\"target\":\"{target}\",\"arguments\":[]}}\x1e"
            );
            within("send", ws.send(Message::text(msg)))
                .await
                .expect("send");
            sent = true;
        }
        if handshaken {
            while let Some(m) = ProtocolKind::Json
                .decode(&mut buf, usize::MAX)
                .expect("decode")
            {
                if let HubMessage::Completion(c) = m {
                    return c.result;
                }
            }
        }
        match within("frame", ws.next()).await {
            Some(Ok(Message::Text(t))) => buf.extend_from_slice(t.as_bytes()),
            Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
            Some(Ok(_)) => {}
            other => panic!("socket ended before the completion: {other:?}"),
        }
    }
}

fn string_result(r: CompletionResult) -> String {
    match r {
        CompletionResult::Value(v) => v.decode::<String>().expect("string result"),
        other => panic!("expected a string result, got {other:?}"),
    }
}

fn url_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn negotiate_v1(s: &TestServer, hub: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let r = post(
        &s.base_url,
        &format!("{hub}/negotiate?negotiateVersion=1"),
        headers,
    )
    .await;
    assert_eq!(r.status, 200, "negotiate: {}", r.text());
    r.json()
}

fn make_jwt(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("jwt")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// Negotiate
// ---------------------------------------------------------------------------------------

/// §3.3 version 1 body: negotiateVersion 1, connectionId, connectionToken, transports with
/// WebSockets (Text + Binary); JSON content type; not cacheable; no stateful-reconnect flag.
#[tokio::test]
async fn negotiate_v1_body() {
    let s = start_conformance_server().await;
    let r = post(
        &s.base_url,
        "/testhub/negotiate?negotiateVersion=1",
        CLIENT_HEADERS,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let cc = r.header("cache-control").unwrap_or_default();
    assert!(
        cc.contains("no-cache"),
        "cache-control {cc:?} (§9: must not be cached)"
    );
    let body = r.json();
    assert_eq!(body["negotiateVersion"], 1, "{body}");
    let id = body["connectionId"].as_str().expect("connectionId");
    let token = body["connectionToken"].as_str().expect("connectionToken");
    assert!(url_safe(id), "connectionId {id:?} must be URL-safe");
    assert!(
        url_safe(token),
        "connectionToken {token:?} must be URL-safe"
    );
    assert_ne!(id, token, "v1: the token is a separate secret");
    assert!(body.get("error").is_none(), "{body}");
    assert!(
        body.get("useStatefulReconnect").is_none(),
        "useStatefulReconnect only when asked (§3.3): {body}"
    );
    assert!(body.get("ProtocolVersion").is_none(), "{body}");
    let transports = body["availableTransports"]
        .as_array()
        .expect("availableTransports");
    let ws = transports
        .iter()
        .find(|t| t["transport"] == "WebSockets")
        .unwrap_or_else(|| panic!("no WebSockets transport: {body}"));
    assert_eq!(ws["transferFormats"], serde_json::json!(["Text", "Binary"]));
    for t in transports {
        let name = t["transport"].as_str().unwrap_or_default();
        assert!(
            ["WebSockets", "ServerSentEvents", "LongPolling"].contains(&name),
            "unknown transport name {name:?}"
        );
        for f in t["transferFormats"].as_array().expect("formats") {
            assert!(f == "Text" || f == "Binary", "bad format {f}");
        }
    }
    // Every negotiate makes a new connection.
    let again = negotiate_v1(&s, "/testhub", &[]).await;
    assert_ne!(again["connectionId"], body["connectionId"]);
    assert_ne!(again["connectionToken"], body["connectionToken"]);
}

/// §3.3 version 0: no connectionToken; the client connects with `id=<connectionId>`.
#[tokio::test]
async fn negotiate_v0_and_connect_with_the_id() {
    let s = start_conformance_server().await;
    let r = post(&s.base_url, "/testhub/negotiate", CLIENT_HEADERS).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["negotiateVersion"], 0, "{body}");
    assert!(
        body.get("connectionToken").is_none(),
        "v0 has no token: {body}"
    );
    let id = body["connectionId"]
        .as_str()
        .expect("connectionId")
        .to_string();
    assert!(url_safe(&id));
    let mut ws = ws_open(&format!("{}/testhub?id={id}", s.ws_url()), &[])
        .await
        .expect("connect with the v0 id");
    let got = string_result(handshake_and_call(&mut ws, "GetCallerConnectionId").await);
    assert_eq!(got, id);
}

/// §3.1: the query keys are read case-insensitively; versions above 1 are clamped to 1; user
/// query parameters are kept.
#[tokio::test]
async fn negotiate_version_key_is_case_insensitive_and_clamped() {
    let s = start_conformance_server().await;
    for q in [
        "NegotiateVersion=1",
        "NEGOTIATEVERSION=1",
        "negotiateVersion=7",
        "tenant=a&negotiateVersion=1",
    ] {
        let r = post(&s.base_url, &format!("/testhub/negotiate?{q}"), &[]).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        let body = r.json();
        assert_eq!(body["negotiateVersion"], 1, "{q}: {body}");
        assert!(body["connectionToken"].is_string(), "{q}: {body}");
    }
}

/// §3.2: a non-integer version is still HTTP 200, with ASP.NET's error text.
#[tokio::test]
async fn negotiate_non_integer_version_is_an_error_body() {
    let s = start_conformance_server().await;
    for q in [
        "negotiateVersion=abc",
        "negotiateVersion=1.5",
        "negotiateVersion=",
    ] {
        let r = post(&s.base_url, &format!("/testhub/negotiate?{q}"), &[]).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "The client requested a non-integer protocol version."}),
            "{q}"
        );
    }
}

/// §3.1: any method other than POST gets 405.
#[tokio::test]
async fn negotiate_with_other_methods_is_405() {
    let s = start_conformance_server().await;
    for m in ["GET", "PUT", "DELETE"] {
        let r = http(
            &s.base_url,
            m,
            "/testhub/negotiate?negotiateVersion=1",
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 405, "{m}: {}", r.text());
    }
}

/// §3.5: connecting with the v1 token works, and the connection id the hub sees is the
/// negotiated connectionId.
#[tokio::test]
async fn connect_with_the_token() {
    let s = start_conformance_server().await;
    let body = negotiate_v1(&s, "/testhub", &[]).await;
    let id = body["connectionId"].as_str().unwrap();
    let token = body["connectionToken"].as_str().unwrap();
    let mut ws = ws_open(&format!("{}/testhub?id={token}", s.ws_url()), &[])
        .await
        .expect("connect with the token");
    let got = string_result(handshake_and_call(&mut ws, "GetCallerConnectionId").await);
    assert_eq!(got, id);
}

/// §3.5: an unknown (or tampered) `id` on the WebSocket upgrade is 404.
#[tokio::test]
async fn connect_with_unknown_id_is_404() {
    let s = start_conformance_server().await;
    let body = negotiate_v1(&s, "/testhub", &[]).await;
    let token = body["connectionToken"].as_str().unwrap().to_string();
    let mut tampered = token.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let id = body["connectionId"].as_str().unwrap().to_string();
    for bad in [
        "doesnotexist",
        "AAAAAAAAAAAAAAAAAAAAAA",
        tampered.as_str(),
        id.as_str(),
    ] {
        let r = ws_open(&format!("{}/testhub?id={bad}", s.ws_url()), &[]).await;
        assert_eq!(r.err(), Some(404), "id={bad}");
    }
}

/// §4.2: a second WebSocket with the token of a live connection is 409; the first one is
/// unaffected.
#[tokio::test]
async fn reusing_the_token_of_a_live_connection_is_409() {
    let s = start_conformance_server().await;
    let body = negotiate_v1(&s, "/testhub", &[]).await;
    let token = body["connectionToken"].as_str().unwrap();
    let url = format!("{}/testhub?id={token}", s.ws_url());
    let mut first = ws_open(&url, &[]).await.expect("first");
    let got = string_result(handshake_and_call(&mut first, "GetCallerConnectionId").await);
    assert_eq!(got, body["connectionId"].as_str().unwrap());
    assert_eq!(ws_open(&url, &[]).await.err(), Some(409));
    // The first connection still works.
    within(
        "send",
        first.send(Message::text(
            "{\"type\":1,\"invocationId\":\"2\",\"target\":\"Echo\",\"arguments\":[\"x\"]}\x1e",
        )),
    )
    .await
    .expect("send");
    loop {
        match within("frame", first.next()).await {
            Some(Ok(Message::Text(t))) if t.as_str().contains("\"invocationId\":\"2\"") => {
                assert_eq!(
                    t.as_str(),
                    "{\"type\":3,\"invocationId\":\"2\",\"result\":\"x\"}\x1e"
                );
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("first connection broke: {other:?}"),
        }
    }
}

/// §3.4, §3.5: a connection token names one connection; once that connection has ended
/// (ASP.NET disposes it and forgets the token) connecting with the token again is 404, as
/// for any unknown id. Same for a v0 connection id.
#[tokio::test]
async fn token_of_an_ended_connection_is_404() {
    let s = start_conformance_server().await;
    for query in ["negotiateVersion=1", ""] {
        let r = post(&s.base_url, &format!("/testhub/negotiate?{query}"), &[]).await;
        let body = r.json();
        let token = body["connectionToken"]
            .as_str()
            .or(body["connectionId"].as_str())
            .unwrap()
            .to_string();
        let url = format!("{}/testhub?id={token}", s.ws_url());
        let mut first = ws_open(&url, &[]).await.expect("first");
        let _ = handshake_and_call(&mut first, "GetCallerConnectionId").await;
        within("close", first.close(None)).await.expect("close");
        while let Some(Ok(_)) = within("close", first.next()).await {}
        // Give the server a moment to unregister the ended connection.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(
            ws_open(&url, &[]).await.err(),
            Some(404),
            "reconnecting with the token of an ended connection ({query:?})"
        );
    }
}

/// §3.5 skipNegotiation: a WebSocket without `id` creates a connection on the spot.
#[tokio::test]
async fn skip_negotiation_websocket_without_id() {
    let s = start_conformance_server().await;
    let mut a = ws_open(&format!("{}/testhub", s.ws_url()), &[])
        .await
        .expect("a");
    let mut b = ws_open(&format!("{}/testhub?tenant=x", s.ws_url()), &[])
        .await
        .expect("b");
    let ida = string_result(handshake_and_call(&mut a, "GetCallerConnectionId").await);
    let idb = string_result(handshake_and_call(&mut b, "GetCallerConnectionId").await);
    assert!(!ida.is_empty() && !idb.is_empty());
    assert_ne!(ida, idb);
}

/// A plain GET on the hub path without an upgrade: 400 "Connection ID required" without an
/// id (§3.5); unknown paths are 404.
#[tokio::test]
async fn non_upgrade_requests_on_the_hub_path() {
    let s = start_conformance_server().await;
    let r = http(&s.base_url, "GET", "/testhub", &[], b"").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.text(), "Connection ID required");
    let r = http(
        &s.base_url,
        "POST",
        "/nosuchhub/negotiate?negotiateVersion=1",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 404);
}

// ---------------------------------------------------------------------------------------
// Authentication (§9)
// ---------------------------------------------------------------------------------------

/// `/authorizedhub`: negotiate and connect without a token, with an expired token, with a
/// wrongly signed token, with a token without `sub`, or with garbage → 401.
#[tokio::test]
async fn authorized_hub_rejects_missing_and_bad_tokens() {
    let s = start_conformance_server().await;
    let expired = make_jwt(
        &s.jwt_secret,
        serde_json::json!({"sub": "alice", "exp": now() - 3600}),
    );
    let wrong_key = make_jwt(
        "not-the-secret",
        serde_json::json!({"sub": "alice", "exp": now() + 3600}),
    );
    let no_sub = make_jwt(&s.jwt_secret, serde_json::json!({"exp": now() + 3600}));
    let r = post(
        &s.base_url,
        "/authorizedhub/negotiate?negotiateVersion=1",
        &[],
    )
    .await;
    assert_eq!(r.status, 401, "no token: {}", r.text());
    assert_eq!(
        ws_open(&format!("{}/authorizedhub", s.ws_url()), &[])
            .await
            .err(),
        Some(401),
        "connect without a token"
    );
    for (what, token) in [
        ("expired", expired.as_str()),
        ("wrongly signed", wrong_key.as_str()),
        ("no sub", no_sub.as_str()),
        ("garbage", "not.a.jwt"),
    ] {
        let bearer = format!("Bearer {token}");
        let r = post(
            &s.base_url,
            "/authorizedhub/negotiate?negotiateVersion=1",
            &[("Authorization", &bearer)],
        )
        .await;
        assert_eq!(r.status, 401, "{what} (header) negotiate: {}", r.text());
        let r = post(
            &s.base_url,
            &format!("/authorizedhub/negotiate?negotiateVersion=1&access_token={token}"),
            &[],
        )
        .await;
        assert_eq!(r.status, 401, "{what} (query) negotiate: {}", r.text());
        assert_eq!(
            ws_open(
                &format!("{}/authorizedhub", s.ws_url()),
                &[("Authorization", &bearer)]
            )
            .await
            .err(),
            Some(401),
            "{what} (header) connect"
        );
        assert_eq!(
            ws_open(
                &format!("{}/authorizedhub?access_token={token}", s.ws_url()),
                &[]
            )
            .await
            .err(),
            Some(401),
            "{what} (query) connect"
        );
    }
}

/// A valid token works via `Authorization: Bearer` (Node clients) and via the
/// `access_token` query parameter (browsers), at negotiate and at connect; the hub sees the
/// `sub` claim as the user identifier.
#[tokio::test]
async fn authorized_hub_accepts_header_and_query_tokens() {
    let s = start_conformance_server().await;
    let token = s.token("alice");
    let bearer = format!("Bearer {token}");

    // Header at negotiate and at connect (Node).
    let body = negotiate_v1(&s, "/authorizedhub", &[("Authorization", &bearer)]).await;
    let ct = body["connectionToken"].as_str().expect("token");
    let mut ws = ws_open(
        &format!("{}/authorizedhub?id={ct}", s.ws_url()),
        &[("Authorization", &bearer)],
    )
    .await
    .expect("connect with header");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "GetUserIdentifier").await),
        "alice"
    );

    // Query at negotiate and at connect (browser).
    let r = post(
        &s.base_url,
        &format!("/authorizedhub/negotiate?negotiateVersion=1&access_token={token}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.json()["connectionToken"]
        .as_str()
        .expect("token")
        .to_string();
    let mut ws = ws_open(
        &format!("{}/authorizedhub?id={ct}&access_token={token}", s.ws_url()),
        &[],
    )
    .await
    .expect("connect with query token");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "GetUserIdentifier").await),
        "alice"
    );

    // skipNegotiation with a query token.
    let mut ws = ws_open(
        &format!("{}/authorizedhub?access_token={token}", s.ws_url()),
        &[],
    )
    .await
    .expect("skipNegotiation with token");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "GetUserIdentifier").await),
        "alice"
    );

    // The anonymous hub still sees the user when a token is sent.
    let mut ws = ws_open(&format!("{}/testhub?access_token={token}", s.ws_url()), &[])
        .await
        .expect("testhub with token");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "GetUserIdentifier").await),
        "alice"
    );
}

// ---------------------------------------------------------------------------------------
// CORS (§9)
// ---------------------------------------------------------------------------------------

/// A preflight from an allowed origin echoes the origin (never `*`), allows credentials,
/// GET/POST/DELETE and the SignalR request headers; the real request echoes it too.
#[tokio::test]
async fn cors_preflight_from_allowed_origin() {
    let s = start_conformance_server().await;
    let origin = "http://localhost:5173";
    let r = http(
        &s.base_url,
        "OPTIONS",
        "/testhub/negotiate?negotiateVersion=1",
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,x-requested-with,x-signalr-user-agent",
            ),
        ],
        b"",
    )
    .await;
    assert!(
        (200..300).contains(&r.status),
        "preflight status {}",
        r.status
    );
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let methods = r
        .header("access-control-allow-methods")
        .unwrap_or_default()
        .to_ascii_uppercase();
    for m in ["GET", "POST", "DELETE"] {
        assert!(methods.contains(m), "allow-methods {methods:?} lacks {m}");
    }
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in ["authorization", "x-requested-with", "x-signalr-user-agent"] {
        assert!(allowed.contains(h), "allow-headers {allowed:?} lacks {h}");
    }

    let r = post(
        &s.base_url,
        "/testhub/negotiate?negotiateVersion=1",
        &[("Origin", origin), ("X-Requested-With", "XMLHttpRequest")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(origin));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
}

/// With a restricted origin list, other origins get no CORS grant.
#[tokio::test]
async fn cors_disallowed_origin_gets_no_grant() {
    let s = start_feed_server_with(|mut c| {
        c.cors_origins = vec!["http://good.example".to_string()];
        c
    })
    .await;
    let token = s.token("1002");
    let bearer = format!("Bearer {token}");
    for (origin, allowed) in [
        ("http://good.example", true),
        ("http://evil.example", false),
    ] {
        let r = http(
            &s.base_url,
            "OPTIONS",
            "/hubs/feed/negotiate?negotiateVersion=1",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
            ],
            b"",
        )
        .await;
        assert_eq!(
            r.header("access-control-allow-origin").is_some(),
            allowed,
            "preflight from {origin}: {:?}",
            r.headers
        );
        let r = post(
            &s.base_url,
            "/hubs/feed/negotiate?negotiateVersion=1",
            &[("Origin", origin), ("Authorization", &bearer)],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("access-control-allow-origin").is_some(),
            allowed,
            "negotiate from {origin}: {:?}",
            r.headers
        );
    }
}

// ---------------------------------------------------------------------------------------
// Health, metrics, publish API
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn health_ready_and_metrics() {
    let s = start_feed_server().await;
    let r = http(&s.base_url, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http(&s.base_url, "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // With one connection open, the gauge is at least 1.
    let token = s.token("1002");
    let mut ws = ws_open(
        &format!("{}/hubs/feed?access_token={token}", s.ws_url()),
        &[],
    )
    .await
    .expect("connect");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "WhoAmI").await),
        "1002"
    );
    let r = http(&s.base_url, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let gauge = text
        .lines()
        .find(|l| l.starts_with("feedhub_connections ") || l.starts_with("feedhub_connections{"))
        .unwrap_or_else(|| panic!("no feedhub_connections sample in:\n{text}"));
    let value: f64 = gauge
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad sample {gauge:?}"));
    assert!(value >= 1.0, "{gauge}");
    for counter in [
        "feedhub_connections_total",
        "feedhub_messages_in_total",
        "feedhub_messages_out_total",
        "feedhub_protocol_errors_total",
        "feedhub_auth_failures_total",
        "feedhub_slow_consumer_closes_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(counter)),
            "{counter} missing from /metrics"
        );
    }
    assert!(text.contains("# TYPE feedhub_connections gauge"), "{text}");
}

/// `POST /api/feed`: 401 without or with a wrong key, 400 for a bad body, 413 for a too large
/// one, 202 for a good one, which reaches the user's connection as FeedUpdated(payload) with
/// the payload's bytes unchanged (the history offset spliced in before the closing brace).
#[tokio::test]
async fn publish_api_statuses_and_delivery() {
    let s = start_feed_server().await;
    let good =
        br#"{"recipients":["1002"],"payload":{"n":1,"text":"h\u00e9llo","list":[1,2.5,null]}}"#;
    let key = format!("Bearer {}", s.api_key);

    let r = http(
        &s.base_url,
        "POST",
        "/api/feed",
        &[("Content-Type", "application/json")],
        good,
    )
    .await;
    assert_eq!(r.status, 401, "no key: {}", r.text());
    let r = http(
        &s.base_url,
        "POST",
        "/api/feed",
        &[("Authorization", "Bearer wrong-key")],
        good,
    )
    .await;
    assert_eq!(r.status, 401, "wrong key: {}", r.text());
    for bad in [
        &b"not json"[..],
        b"{\"payload\":{}}",
        b"{\"recipients\":[],\"payload\":{}}",
        b"{\"recipients\":[\"1002\"]}",
        b"",
    ] {
        let r = http(
            &s.base_url,
            "POST",
            "/api/feed",
            &[("Authorization", &key)],
            bad,
        )
        .await;
        assert_eq!(
            r.status,
            400,
            "bad body {:?}: {}",
            String::from_utf8_lossy(bad),
            r.text()
        );
    }
    let mut huge = br#"{"recipients":["1002"],"payload":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 300 * 1024));
    huge.extend_from_slice(b"\"}");
    let r = http(
        &s.base_url,
        "POST",
        "/api/feed",
        &[("Authorization", &key)],
        &huge,
    )
    .await;
    assert_eq!(r.status, 413, "too large: {}", r.text());

    let token = s.token("1002");
    let mut ws = ws_open(
        &format!("{}/hubs/feed?access_token={token}", s.ws_url()),
        &[],
    )
    .await
    .expect("connect");
    assert_eq!(
        string_result(handshake_and_call(&mut ws, "WhoAmI").await),
        "1002"
    );
    let r = http(
        &s.base_url,
        "POST",
        "/api/feed",
        &[
            ("Authorization", &key),
            ("Content-Type", "application/json"),
        ],
        good,
    )
    .await;
    assert_eq!(r.status, 202, "good: {}", r.text());
    let expected = "{\"type\":1,\"target\":\"FeedUpdated\",\"arguments\":[{\"n\":1,\"text\":\"h\\u00e9llo\",\"list\":[1,2.5,null],\"offset\":1}]}\x1e";
    loop {
        match within("FeedUpdated", ws.next()).await {
            Some(Ok(Message::Text(t))) if t.as_str() == "{\"type\":6}\x1e" => {}
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), expected);
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected FeedUpdated, got {other:?}"),
        }
    }
}
