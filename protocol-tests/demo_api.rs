//! The demo's post service over HTTP (no browser): `/demo/users`, `/demo/feed`,
//! `/demo/posts`, the page's assets, and the feed events a post publishes, checked with raw
//! SignalR clients as Alice (1001), Bob (1002) and Carol (1003); and services mounted on the
//! router beside the demo (`http::mount`).
//!
//! Run just these: `cargo test --release --test demo_api`.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use feedhub::http::mount::{Mount, Route};
use feedhub::http::respond::{text, Body};
use feedhub::protocol::{HubMessage, ProtocolKind};
use support::{start_feed_server_built, start_feed_server_with, within, RawClient, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A minimal HTTP/1.1 exchange (`Connection: close`): status and body.
async fn http(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String, String) {
    let addr = server.server().local_addr();
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    within("write", stream.write_all(head.as_bytes()))
        .await
        .expect("write");
    // The server may answer (413) before reading everything; ignore a reset here.
    let _ = within("write", stream.write_all(body)).await;
    let mut response = Vec::new();
    let _ = within("read", stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

async fn demo_server() -> TestServer {
    start_feed_server_with(|c| feedhub::ServerConfig {
        dev_identities: true,
        ..c
    })
    .await
}

async fn feed_client(server: &TestServer, user: &str) -> RawClient {
    let url = format!(
        "{}/hubs/feed?access_token={}",
        server.ws_url(),
        server.token(user)
    );
    RawClient::connect(&url, ProtocolKind::Json).await
}

/// The next FeedUpdated payload as JSON, without the `offset` feedhub adds (checked to
/// be a positive integer; see `history.rs`).
async fn next_feed_update(client: &mut RawClient) -> serde_json::Value {
    loop {
        match client.recv().await.expect("connection open") {
            HubMessage::Invocation(inv) if inv.target == "FeedUpdated" => {
                assert_eq!(inv.arguments.len(), 1);
                let text = inv.arguments[0].to_json_string().expect("json");
                let mut v: serde_json::Value = serde_json::from_str(&text).expect("payload json");
                let offset = v.as_object_mut().and_then(|o| o.remove("offset"));
                assert!(
                    offset
                        .as_ref()
                        .and_then(|o| o.as_u64())
                        .is_some_and(|o| o >= 1),
                    "offset {offset:?}"
                );
                return v;
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reaches_author_and_friends_only_and_is_in_their_feeds() {
    let server = demo_server().await;
    let mut alice = feed_client(&server, "1001").await;
    let mut bob = feed_client(&server, "1002").await;
    let mut carol = feed_client(&server, "1003").await;

    let text = "Hello <b>Bob</b> & friends";
    let body = serde_json::to_vec(&serde_json::json!({ "text": format!("  {text}\n") })).unwrap();
    let (status, head, resp) = http(
        &server,
        "POST",
        "/demo/posts",
        Some(&server.token("1001")),
        &body,
    )
    .await;
    assert_eq!(status, 201, "{resp}");
    assert!(head.contains("application/json"));
    let post: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(post["text"], text, "trimmed, otherwise as written");
    assert_eq!(
        post["author"],
        serde_json::json!({"id": "1001", "name": "Alice"})
    );
    let created = post["createdAt"].as_str().unwrap();
    assert!(
        created.len() == 24 && created.ends_with('Z') && created.as_bytes()[10] == b'T',
        "RFC 3339 time: {created}"
    );
    assert!(post["id"].as_str().unwrap().starts_with("post-"));

    assert_eq!(next_feed_update(&mut bob).await, post);
    assert_eq!(next_feed_update(&mut alice).await, post);
    // Carol is no one's friend: nothing arrives (a ping-free wait well past delivery time).
    let nothing = tokio::time::timeout(Duration::from_millis(700), carol.recv()).await;
    assert!(nothing.is_err(), "Carol got {nothing:?}");

    // The feeds (history) from the post service.
    for (user, expected) in [("1001", 1), ("1002", 1), ("1003", 0)] {
        let (status, _, resp) =
            http(&server, "GET", "/demo/feed", Some(&server.token(user)), b"").await;
        assert_eq!(status, 200, "{resp}");
        let feed: serde_json::Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(feed["user"]["id"], user);
        let posts = feed["posts"].as_array().unwrap();
        assert_eq!(posts.len(), expected, "{user}'s feed: {resp}");
        if expected == 1 {
            assert_eq!(posts[0], post);
        }
    }

    // Newest first, limit honoured.
    let token = server.token("1002");
    let (status, _, _) = http(
        &server,
        "POST",
        "/demo/posts",
        Some(&token),
        br#"{"text":"second"}"#,
    )
    .await;
    assert_eq!(status, 201);
    let (_, _, resp) = http(&server, "GET", "/demo/feed?limit=1", Some(&token), b"").await;
    let feed: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(feed["posts"].as_array().unwrap().len(), 1);
    assert_eq!(feed["posts"][0]["text"], "second");
    assert_eq!(next_feed_update(&mut alice).await["text"], "second");
}

/// Method, path, token, body, expected status, text the answer must contain.
type Case<'a> = (&'a str, &'a str, Option<String>, Vec<u8>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let server = demo_server().await;
    let alice = server.token("1001");
    let cases: Vec<Case> = vec![
        ("GET", "/demo/feed", None, vec![], 401, "access token"),
        (
            "GET",
            "/demo/feed",
            Some("not-a-jwt".into()),
            vec![],
            401,
            "invalid",
        ),
        (
            "GET",
            "/demo/feed",
            Some(server.token("42")),
            vec![],
            403,
            "not a demo user",
        ),
        (
            "GET",
            "/demo/feed?limit=0",
            Some(alice.clone()),
            vec![],
            400,
            "limit",
        ),
        (
            "GET",
            "/demo/feed?limit=abc",
            Some(alice.clone()),
            vec![],
            400,
            "limit",
        ),
        ("POST", "/demo/posts", None, b"{}".to_vec(), 401, "token"),
        (
            "POST",
            "/demo/posts",
            Some(alice.clone()),
            b"{oops".to_vec(),
            400,
            "JSON",
        ),
        (
            "POST",
            "/demo/posts",
            Some(alice.clone()),
            br#"{"text":42}"#.to_vec(),
            400,
            "JSON",
        ),
        (
            "POST",
            "/demo/posts",
            Some(alice.clone()),
            br#"{"text":"   "}"#.to_vec(),
            400,
            "empty",
        ),
        (
            "POST",
            "/demo/posts",
            Some(alice.clone()),
            serde_json::to_vec(&serde_json::json!({ "text": "é".repeat(1001) })).unwrap(),
            413,
            "1000 characters",
        ),
        (
            "POST",
            "/demo/posts",
            Some(alice.clone()),
            vec![b' '; 17 * 1024],
            413,
            "exceeds the limit",
        ),
        ("GET", "/demo/posts", Some(alice.clone()), vec![], 405, ""),
        ("DELETE", "/demo/users", None, vec![], 405, ""),
        ("GET", "/demo/nope", None, vec![], 404, ""),
    ];
    for (method, path, token, body, status, needle) in cases {
        let (got, _, resp) = http(&server, method, path, token.as_deref(), &body).await;
        assert_eq!(got, status, "{method} {path}: {resp}");
        assert!(
            resp.contains(needle),
            "{method} {path}: {resp:?} should mention {needle:?}"
        );
    }
    // Exactly 1000 characters is fine.
    let ok = serde_json::to_vec(&serde_json::json!({ "text": "é".repeat(1000) })).unwrap();
    let (got, _, resp) = http(&server, "POST", "/demo/posts", Some(&alice), &ok).await;
    assert_eq!(got, 201, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_assets() {
    let server = demo_server().await;
    let (status, _, resp) = http(&server, "GET", "/demo/users", None, b"").await;
    assert_eq!(status, 200);
    let users: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(
        users,
        serde_json::json!([
            {"id": "1001", "name": "Alice", "friends": ["1002"]},
            {"id": "1002", "name": "Bob", "friends": ["1001"]},
            {"id": "1003", "name": "Carol", "friends": []},
        ])
    );
    let (status, head, page) = http(&server, "GET", "/", None, b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/html"));
    assert!(page.contains(r#"<script src="app.js">"#) && page.contains("app.css"));
    let (status, head, js) = http(&server, "GET", "/app.js", None, b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/javascript"));
    assert!(
        js.contains("FeedUpdated") && js.len() > 50_000,
        "the bundle"
    );
    let (status, head, _) = http(&server, "GET", "/app.css", None, b"").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/css"));
    // dev token works for demo users.
    let (status, _, resp) = http(&server, "POST", "/dev/token?user=1002", None, b"").await;
    assert_eq!(status, 200, "{resp}");
    assert!(resp.contains("\"token\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_is_off_without_dev_identities() {
    // A production-like server: JWT secret set, dev identities not enabled.
    let server = start_feed_server_with(|c| c).await;
    for (method, path) in [
        ("GET", "/demo/users"),
        ("GET", "/demo/feed"),
        ("POST", "/demo/posts"),
        ("POST", "/dev/token?user=1001"),
    ] {
        let (status, _, resp) = http(
            &server,
            method,
            path,
            Some(&server.token("1001")),
            br#"{"text":"x"}"#,
        )
        .await;
        assert_eq!(status, 404, "{method} {path}: {resp}");
        assert!(resp.contains("disabled"), "{method} {path}: {resp}");
    }
    // The page itself is still served (it explains that the demo is off).
    let (status, _, _) = http(&server, "GET", "/", None, b"").await;
    assert_eq!(status, 200);
}

/// A mounted service that answers with its name, the method and the path it was handed.
struct Echo(&'static str);

#[async_trait::async_trait]
impl Mount for Echo {
    async fn handle(
        &self,
        req: http::Request<hyper::body::Incoming>,
        path: &str,
    ) -> http::Response<Body> {
        text(
            http::StatusCode::OK,
            format!("{} {} {path}", self.0, req.method()),
        )
    }
}

/// A raw exchange with an `Origin` header: status, lower-cased head, body.
async fn http_from_origin(
    server: &TestServer,
    method: &str,
    path: &str,
    origin: &str,
) -> (u16, String, String) {
    let addr = server.server().local_addr();
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    within("write", stream.write_all(head.as_bytes()))
        .await
        .expect("write");
    let mut response = Vec::new();
    let _ = within("read", stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_services_get_their_prefixes_after_the_builtin_routes() {
    let server = start_feed_server_built(
        |c| feedhub::ServerConfig {
            dev_identities: true,
            cors_origins: vec!["https://app.example".to_string()],
            ..c
        },
        |b| {
            b.mount(Route::prefix("/api/hubs/"), Arc::new(Echo("rest")))
                .mount(Route::prefix("/api/health"), Arc::new(Echo("health")))
                // Behind the demo's own `GET /`: never reached with GET.
                .mount(Route::exact("/"), Arc::new(Echo("root")))
        },
    )
    .await;
    let cases = [
        (
            "GET",
            "/api/hubs/feed/users/1001",
            200,
            "rest GET /api/hubs/feed/users/1001",
        ),
        (
            "POST",
            "/api/hubs/feed/:send/",
            200,
            "rest POST /api/hubs/feed/:send",
        ),
        ("HEAD", "/api/health", 200, ""),
        ("GET", "/api/health/x", 200, "health GET /api/health/x"),
        // A prefix ending in `/` needs more; one without it stops at a segment boundary.
        ("GET", "/api/hubs", 404, "Not Found"),
        ("GET", "/api/healthz", 404, "Not Found"),
        // Built-in routes come first.
        ("GET", "/healthz", 200, "ok"),
        ("GET", "/api/feed", 405, "Method Not Allowed"),
        // The demo's mounts come before later ones; its GET-only routes let other methods on.
        ("GET", "/demo/users", 200, "Alice"),
        ("GET", "/demo", 404, "Not Found"),
        ("DELETE", "/demo/users", 405, "Method Not Allowed"),
        ("POST", "/", 200, "root POST /"),
        ("POST", "/app.js", 404, "Not Found"),
        ("GET", "/app.js/", 200, "FeedUpdated"),
    ];
    for (method, path, status, body) in cases {
        let (got, _, resp) = http(&server, method, path, None, b"").await;
        assert_eq!(got, status, "{method} {path}: {resp}");
        assert!(resp.contains(body), "{method} {path}: {resp}");
    }
    let (_, _, page) = http(&server, "GET", "/", None, b"").await;
    assert!(
        page.contains("<html"),
        "the demo's page, not the later mount"
    );
    // CORS and the preflight apply to mounted services too.
    let (got, head, resp) =
        http_from_origin(&server, "GET", "/api/hubs/feed", "https://app.example").await;
    assert_eq!(got, 200, "{resp}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
    let (got, head, _) =
        http_from_origin(&server, "OPTIONS", "/api/hubs/feed", "https://app.example").await;
    assert_eq!(got, 204);
    assert!(head.contains("access-control-allow-methods"), "{head}");
    let (_, head, _) =
        http_from_origin(&server, "GET", "/api/hubs/feed", "https://other.example").await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");
}
