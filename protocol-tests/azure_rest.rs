//! The Azure SignalR Service data-plane REST API (api-version 2022-06-01) and serverless
//! negotiate redirect, served by feedhub with `--azure-access-key`.
//!
//! Requests are signed exactly as the management SDK signs them: HS256 with the UTF-8 bytes
//! of the access key, `aud` = `http://<host>/` without the port + path +
//! `?api-version=2022-06-01` (or `?application=<app>&api-version=…`), and the `excluded`,
//! `reason` and `ttl` parameters appended after signing. Every endpoint runs against feed
//! servers with connected raw SignalR clients (two nodes on one in-memory bus, and two on a
//! real Redis with a unique channel prefix), checking statuses, `x-ms-error-code` headers,
//! `ErrorDetail` bodies, and that sends, group changes and closes reach the connections on
//! the other node. The official `@microsoft/signalr` client follows a redirecting negotiate
//! (a tiny "app" endpoint of the test) and receives a REST send to its user, over each
//! transport.
//!
//! Run: `cargo test --release --test azure_rest`. Without Redis or Node the tests that need
//! them print `SKIPPED`, except under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use feedhub::protocol::{HubMessage, ProtocolKind};
use feedhub::ServerConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::cluster::{self, Client, Cluster, Kind};
use support::{within, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "feedhub-test-azure-access-key-0123456789ABCDEFGH=";
const VERSION: &str = "api-version=2022-06-01";
/// How long "nothing else arrives" is watched.
const QUIET: Duration = Duration::from_millis(300);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn sign(key: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .expect("sign")
}

/// The token the management SDK sends for `path?query` (query without the parameters
/// appended after signing): `aud` without the port, `exp` in an hour, `nbf`, `iat`, and the
/// SDK's `nameid`.
fn sdk_token(path_and_query: &str) -> String {
    let t = now();
    sign(
        KEY,
        json!({
            "aud": format!("http://127.0.0.1{path_and_query}"),
            "exp": t + 3600, "nbf": t, "iat": t,
            "nameid": "TESTMACHINE_0123456789abcdef0123456789abcdef",
        }),
    )
}

/// One HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl Resp {
    fn code(&self) -> Option<&str> {
        self.headers.get("x-ms-error-code").map(String::as_str)
    }

    /// Asserts the status and, for errors, the code in both the header and the body.
    fn expect(&self, status: u16, code: Option<&str>) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.code(), code, "{self:?}");
        if let Some(code) = code {
            if !self.body.is_empty() {
                let v: serde_json::Value = serde_json::from_str(&self.body).expect("ErrorDetail");
                assert_eq!(v["code"], code, "{self:?}");
                assert!(v["message"].is_string(), "{self:?}");
            }
        }
    }
}

/// Sends one HTTP/1.1 request.
async fn request(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Resp {
    let host = base_url.trim_start_matches("http://");
    let mut s = within("connect", TcpStream::connect(host))
        .await
        .expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    // A server may answer (413) and close before the whole body is written; whatever it
    // answered is read all the same.
    let _ = within("write", s.write_all(&bytes)).await;
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 16384];
    loop {
        match within("read", s.read(&mut chunk)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A REST call signed as the SDK signs it: `signed` is `path?query` as in `aud`, `extra`
/// the parameters appended after signing (`&excluded=…`).
async fn call(
    server: &TestServer,
    method: &str,
    signed: &str,
    extra: &str,
    body: Option<serde_json::Value>,
) -> Resp {
    let auth = format!("Bearer {}", sdk_token(signed));
    let mut headers = vec![("Authorization", auth)];
    let body = match body {
        Some(b) => {
            headers.push((
                "Content-Type",
                "application/json; charset=utf-8".to_string(),
            ));
            b.to_string().into_bytes()
        }
        None => Vec::new(),
    };
    request(
        &server.base_url,
        method,
        &format!("{signed}{extra}"),
        &headers,
        &body,
    )
    .await
}

/// `/api/hubs/feed<rest>?api-version=2022-06-01`.
fn hub_path(rest: &str) -> String {
    format!("/api/hubs/feed{rest}?{VERSION}")
}

fn msg(text: &str) -> Option<serde_json::Value> {
    // The .NET SDK's casing.
    Some(json!({ "Target": "Msg", "Arguments": [text] }))
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

async fn azure_cluster(kind: Kind, name: &str) -> Cluster {
    cluster::start_cluster_configured(kind, 2, name, None, true, |c| ServerConfig {
        azure_access_key: Some(KEY.to_string()),
        ..c
    })
    .await
}

async fn memory_cluster(name: &str) -> Cluster {
    azure_cluster(
        Kind::Memory(feedhub::backplane::memory::MemoryBus::new()),
        name,
    )
    .await
}

async fn redis_cluster(name: &str) -> Option<Cluster> {
    cluster::redis().await?;
    Some(azure_cluster(Kind::Redis(cluster::redis_url()), name).await)
}

async fn expect_msg(c: &mut Client, text: &str) {
    let (target, arg) = within("Msg", c.next_invocation()).await;
    assert_eq!(
        (target.as_str(), arg.as_str()),
        ("Msg", format!("\"{text}\"").as_str())
    );
}

/// The Close message a closed connection gets (its error).
async fn expect_close(c: &mut Client) -> Option<String> {
    loop {
        match within("close", c.raw.recv()).await {
            Some(HubMessage::Close(close)) => return close.error,
            Some(_) => continue,
            None => panic!("connection {} ended without a Close message", c.id),
        }
    }
}

// ---- sends ----

/// Sends to all (with excluded), a user, a connection and a group reach clients on both
/// nodes, and only them; a REST send lands on either node.
async fn sends(c: Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let (ua, ub) = (c.user("a"), c.user("b"));
    let mut a = c.connect(0, &ua, ProtocolKind::Json).await;
    let mut b = c.connect(1, &ub, ProtocolKind::MessagePack).await;
    let mut b2 = c.connect(0, &ub, ProtocolKind::Json).await;

    call(n0, "POST", &hub_path("/:send"), "", msg("all"))
        .await
        .expect(202, None);
    for x in [&mut a, &mut b, &mut b2] {
        expect_msg(x, "all").await;
    }
    let extra = format!("&excluded={}&excluded={}", enc(&a.id), enc(&b2.id));
    call(n1, "POST", &hub_path("/:send"), &extra, msg("all-but"))
        .await
        .expect(202, None);
    expect_msg(&mut b, "all-but").await;
    a.expect_nothing(QUIET).await;
    b2.expect_nothing(Duration::ZERO).await;

    call(
        n0,
        "POST",
        &hub_path(&format!("/users/{}/:send", enc(&ub))),
        "",
        msg("to-b"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut b, "to-b").await;
    expect_msg(&mut b2, "to-b").await;
    a.expect_nothing(QUIET).await;

    call(
        n0,
        "POST",
        &hub_path(&format!("/connections/{}/:send", enc(&b.id))),
        "",
        msg("to-conn"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut b, "to-conn").await;
    b2.expect_nothing(QUIET).await;

    // A group: b (node 1) added through node 0, a (node 0) through node 1.
    let g = format!("{}-grp", c.prefix);
    call(
        n0,
        "PUT",
        &hub_path(&format!("/groups/{}/connections/{}", enc(&g), enc(&b.id))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(
        n1,
        "PUT",
        &hub_path(&format!("/groups/{}/connections/{}", enc(&g), enc(&a.id))),
        "",
        None,
    )
    .await
    .expect(200, None);
    let node0 = c.nodes[0].server().hub("/hubs/feed").expect("hub");
    let node1 = c.nodes[1].server().hub("/hubs/feed").expect("hub");
    let gname = feedhub::ids::GroupName::new(&g).expect("group");
    cluster::eventually("remote group adds", Duration::from_secs(5), || {
        let n = (
            node0.registry().group_len(&gname),
            node1.registry().group_len(&gname),
        );
        async move { n == (1, 1) }
    })
    .await;
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:send", enc(&g))),
        "",
        msg("to-group"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut a, "to-group").await;
    expect_msg(&mut b, "to-group").await;
    b2.expect_nothing(QUIET).await;
    let extra = format!("&excluded={}", enc(&a.id));
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:send", enc(&g))),
        &extra,
        msg("group-but"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut b, "group-but").await;
    a.expect_nothing(QUIET).await;
    // Removed from the group (remotely): no longer reached.
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/groups/{}/connections/{}", enc(&g), enc(&b.id))),
        "",
        None,
    )
    .await
    .expect(200, None);
    cluster::eventually("remote group remove", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 0 }
    })
    .await;
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:send", enc(&g))),
        "",
        msg("after"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut a, "after").await;
    b.expect_nothing(QUIET).await;
    // With an application (accepted, not used) and the legacy v1 API.
    let app = format!(
        "/api/hubs/feed/users/{}/:send?application=myapp&{VERSION}",
        enc(&ub)
    );
    call(n1, "POST", &app, "", msg("app"))
        .await
        .expect(202, None);
    expect_msg(&mut b, "app").await;
    expect_msg(&mut b2, "app").await;
    let v1 = format!("/api/v1/hubs/feed/users/{}", enc(&ub));
    call(n1, "POST", &v1, "", msg("v1")).await.expect(202, None);
    expect_msg(&mut b, "v1").await;
    expect_msg(&mut b2, "v1").await;
}

/// `application/octet-stream`: the serializations map (aspnet-interop.md C.2's layout)
/// reaches JSON and MessagePack clients alike.
async fn binary_send(c: Cluster) {
    let u = c.user("bin");
    let mut j = c.connect(0, &u, ProtocolKind::Json).await;
    let mut m = c.connect(1, &u, ProtocolKind::MessagePack).await;
    let json_frame = br#"{"type":1,"target":"Msg","arguments":["bin"]}"#;
    let mp_frame: &[u8] = &[
        0x0E, 0x96, 0x01, 0x80, 0xC0, 0xA3, b'M', b's', b'g', 0x91, 0xA3, b'b', b'i', b'n', 0x90,
    ];
    let mut body = vec![0x82, 0xA4];
    body.extend_from_slice(b"json");
    body.extend_from_slice(&[0xC4, (json_frame.len() + 1) as u8]);
    body.extend_from_slice(json_frame);
    body.push(0x1E);
    body.push(0xAB);
    body.extend_from_slice(b"messagepack");
    body.extend_from_slice(&[0xC4, mp_frame.len() as u8]);
    body.extend_from_slice(mp_frame);
    let path = hub_path(&format!("/users/{}/:send", enc(&u)));
    let headers = vec![
        ("Authorization", format!("Bearer {}", sdk_token(&path))),
        ("Content-Type", "application/octet-stream".to_string()),
    ];
    let r = request(&c.nodes[0].base_url, "POST", &path, &headers, &body).await;
    r.expect(202, None);
    expect_msg(&mut j, "bin").await;
    expect_msg(&mut m, "bin").await;
    // Not a serializations map: 400.
    let r = request(&c.nodes[0].base_url, "POST", &path, &headers, b"\x91\x01").await;
    r.expect(400, Some("Error.Request.Invalid"));
}

// ---- existence, groups, statuses ----

/// Existence checks across nodes, group management statuses, and the errors.
async fn statuses(c: Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let u = c.user("s");
    let mut x = c.connect(1, &u, ProtocolKind::Json).await;
    let g = format!("{}-g", c.prefix);

    call(n0, "HEAD", &format!("/api/health?{VERSION}"), "", None)
        .await
        .expect(200, None);
    call(n0, "GET", "/api/v1/health", "", None)
        .await
        .expect(200, None);
    // Existence, answered on the node without the connection.
    call(
        n0,
        "HEAD",
        &hub_path(&format!("/connections/{}", enc(&x.id))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(n0, "HEAD", &hub_path("/connections/nobody"), "", None)
        .await
        .expect(404, Some("Warning.Connection.NotExisted"));
    call(
        n0,
        "HEAD",
        &hub_path(&format!("/users/{}", enc(&u))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(n0, "HEAD", &hub_path("/users/nobody"), "", None)
        .await
        .expect(404, Some("Warning.User.NotExisted"));
    call(
        n0,
        "HEAD",
        &hub_path(&format!("/groups/{}", enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Warning.Group.NotExisted"));
    call(
        n0,
        "GET",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Info.User.NotInGroup"));
    // The user joins the group (its connection on node 1 with it).
    call(
        n0,
        "PUT",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(
        n0,
        "GET",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(
        n1,
        "HEAD",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(200, None);
    let node1 = n1.server().hub("/hubs/feed").expect("hub");
    let gname = feedhub::ids::GroupName::new(&g).expect("group");
    cluster::eventually("user joined on node 1", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 1 }
    })
    .await;
    call(
        n0,
        "HEAD",
        &hub_path(&format!("/groups/{}", enc(&g))),
        "",
        None,
    )
    .await
    .expect(200, None);
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:send", enc(&g))),
        "",
        msg("ug"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut x, "ug").await;
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(204, None);
    call(
        n0,
        "GET",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Info.User.NotInGroup"));
    cluster::eventually("user left on node 1", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 0 }
    })
    .await;
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/users/{}/groups", enc(&u))),
        "",
        None,
    )
    .await
    .expect(204, None);
    // A connection in two groups, removed from all of them remotely.
    for grp in ["h1", "h2"] {
        call(
            n0,
            "PUT",
            &hub_path(&format!("/groups/{grp}/connections/{}", enc(&x.id))),
            "",
            None,
        )
        .await
        .expect(200, None);
    }
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/connections/{}/groups", enc(&x.id))),
        "",
        None,
    )
    .await
    .expect(200, None);
    let h1 = feedhub::ids::GroupName::new("h1").expect("group");
    cluster::eventually("left every group", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&h1);
        async move { n == 0 }
    })
    .await;
    // A connection that does not exist: 404 for group changes.
    call(
        n0,
        "PUT",
        &hub_path(&format!("/groups/{}/connections/nobody", enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Error.Connection.NotExisted"));
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/groups/{}/connections/nobody", enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Error.Connection.NotExisted"));
    // Legacy v1 user groups: 202.
    call(
        n0,
        "PUT",
        &format!("/api/v1/hubs/feed/groups/{}/users/{}", enc(&g), enc(&u)),
        "",
        None,
    )
    .await
    .expect(202, None);
    call(
        n0,
        "GET",
        &format!("/api/v1/hubs/feed/users/{}/groups/{}", enc(&u), enc(&g)),
        "",
        None,
    )
    .await
    .expect(200, None);
    // Errors.
    call(
        n0,
        "POST",
        "/api/hubs/nohub/:send?api-version=2022-06-01",
        "",
        msg("x"),
    )
    .await
    .expect(404, Some("Error.Hub.NotExisted"));
    call(
        n0,
        "POST",
        "/api/hubs/1bad/:send?api-version=2022-06-01",
        "",
        msg("x"),
    )
    .await
    .expect(400, Some("Error.Request.Invalid"));
    call(
        n0,
        "POST",
        "/api/hubs/b-ad/:send?api-version=2022-06-01",
        "",
        msg("x"),
    )
    .await
    .expect(400, Some("Error.Request.Invalid"));
    call(n0, "POST", &hub_path("/groups/%20%20/:send"), "", msg("x"))
        .await
        .expect(400, Some("Error.Request.Invalid"));
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:send", "g".repeat(1025))),
        "",
        msg("x"),
    )
    .await
    .expect(400, Some("Error.Request.Invalid"));
    call(n0, "POST", "/api/hubs/feed/:send", "", msg("x"))
        .await
        .expect(400, Some("Error.Request.Invalid"));
    call(
        n0,
        "PUT",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "&ttl=soon",
        None,
    )
    .await
    .expect(400, Some("Error.Request.Invalid"));
    call(
        n0,
        "POST",
        &hub_path("/:send"),
        "",
        Some(json!({ "arguments": [] })),
    )
    .await
    .expect(400, Some("Error.Request.Invalid"));
    call(n0, "POST", &hub_path("/:send"), "", Some(json!([1])))
        .await
        .expect(400, Some("Error.Request.Invalid"));
    let big = json!({ "target": "Msg", "arguments": ["x".repeat(1024 * 1024)] });
    call(n0, "POST", &hub_path("/:send"), "", Some(big))
        .await
        .expect(413, Some("Error.Request.PayloadTooLarge"));
    call(n0, "GET", &hub_path("/:send"), "", None)
        .await
        .expect(405, Some("Error.Request.MethodNotAllowed"));
    call(
        n0,
        "PUT",
        &hub_path(&format!("/connections/{}", enc(&x.id))),
        "",
        None,
    )
    .await
    .expect(405, Some("Error.Request.MethodNotAllowed"));
    call(n0, "POST", &hub_path("/nothing/here"), "", None)
        .await
        .expect(404, Some("Error.Request.NotFound"));
    x.expect_nothing(QUIET).await;
}

/// Tokens: missing, another key, another aud, expired, not yet valid: 401; the aud of
/// newer SDKs (path only, port kept) and an aud with the host's port: accepted.
async fn authentication(c: Cluster) {
    let n0 = &c.nodes[0];
    let path = hub_path("/:send");
    let body = json!({ "target": "Msg", "arguments": ["x"] })
        .to_string()
        .into_bytes();
    let send = |token: Option<String>| {
        let mut headers = vec![("Content-Type", "application/json".to_string())];
        if let Some(t) = token {
            headers.push(("Authorization", format!("Bearer {t}")));
        }
        let (base, path, body) = (n0.base_url.clone(), path.clone(), body.clone());
        async move { request(&base, "POST", &path, &headers, &body).await }
    };
    let t = now();
    let aud = format!("http://127.0.0.1{path}");
    send(None)
        .await
        .expect(401, Some("Error.Authentication.Invalid"));
    send(Some("not-a-jwt".into()))
        .await
        .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(
        "another-key",
        json!({ "aud": aud, "exp": t + 60 }),
    )))
    .await
    .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(
        KEY,
        json!({ "aud": format!("http://127.0.0.1{}", hub_path("/users/u/:send")), "exp": t + 60 }),
    )))
    .await
    .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(
        KEY,
        json!({ "aud": format!("http://evil.example{path}"), "exp": t + 60 }),
    )))
    .await
    .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(KEY, json!({ "aud": aud, "exp": t - 120 }))))
        .await
        .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(
        KEY,
        json!({ "aud": aud, "exp": t + 600, "nbf": t + 300 }),
    )))
    .await
    .expect(401, Some("Error.Authentication.Invalid"));
    send(Some(sign(KEY, json!({ "aud": aud }))))
        .await
        .expect(401, Some("Error.Authentication.Invalid"));
    // Accepted forms.
    send(Some(sign(KEY, json!({ "aud": aud, "exp": t + 60 }))))
        .await
        .expect(202, None);
    let with_port = format!("{}{path}", n0.base_url);
    send(Some(sign(KEY, json!({ "aud": with_port, "exp": t + 60 }))))
        .await
        .expect(202, None);
    let path_only = format!("{}/api/hubs/feed/:send", n0.base_url);
    send(Some(sign(KEY, json!({ "aud": path_only, "exp": t + 60 }))))
        .await
        .expect(202, None);
    // A bad path with a bad token: 401 first (nothing is told to strangers).
    request(&n0.base_url, "POST", "/api/hubs/1bad/:send", &[], b"")
        .await
        .expect(401, Some("Error.Authentication.Invalid"));
}

// ---- user groups with ttl, later connections ----

/// A user's group membership applies to its connections on every node and to those it
/// opens later, until its ttl ends or it is removed; `ttl=0` adds only the current ones.
async fn user_groups(c: Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let g = format!("{}-ttl", c.prefix);
    let send_group = |text: &'static str| {
        let path = hub_path(&format!("/groups/{}/:send", enc(&g)));
        async move {
            call(n0, "POST", &path, "", msg(text))
                .await
                .expect(202, None)
        }
    };
    // u: connected on node 1, joins for 3 s.
    let u = c.user("u");
    let mut u1 = c.connect(1, &u, ProtocolKind::Json).await;
    call(
        n0,
        "PUT",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "&ttl=3",
        None,
    )
    .await
    .expect(200, None);
    // v: joins before connecting (no ttl), then connects on node 1.
    let v = c.user("v");
    call(
        n0,
        "PUT",
        &hub_path(&format!("/users/{}/groups/{}", enc(&v), enc(&g))),
        "",
        None,
    )
    .await
    .expect(200, None);
    let mut v1 = c.connect(1, &v, ProtocolKind::MessagePack).await;
    // w: ttl=0: its current connection only, nothing kept for later ones.
    let w = c.user("w");
    let mut w0 = c.connect(0, &w, ProtocolKind::Json).await;
    call(
        n1,
        "PUT",
        &hub_path(&format!("/users/{}/groups/{}", enc(&w), enc(&g))),
        "&ttl=0",
        None,
    )
    .await
    .expect(200, None);
    let node0 = n0.server().hub("/hubs/feed").expect("hub");
    let node1 = n1.server().hub("/hubs/feed").expect("hub");
    let gname = feedhub::ids::GroupName::new(&g).expect("group");
    cluster::eventually(
        "u and v in the group on node 1, w on node 0",
        Duration::from_secs(5),
        || {
            let n = (
                node0.registry().group_len(&gname),
                node1.registry().group_len(&gname),
            );
            async move { n == (1, 2) }
        },
    )
    .await;
    send_group("first").await;
    expect_msg(&mut u1, "first").await;
    expect_msg(&mut v1, "first").await;
    expect_msg(&mut w0, "first").await;
    let mut w1 = c.connect(1, &w, ProtocolKind::Json).await;
    // u's membership ends (3 s, plus the sweep).
    cluster::eventually("u's membership ended", Duration::from_secs(8), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 1 }
    })
    .await;
    call(
        n0,
        "GET",
        &hub_path(&format!("/users/{}/groups/{}", enc(&u), enc(&g))),
        "",
        None,
    )
    .await
    .expect(404, Some("Info.User.NotInGroup"));
    send_group("second").await;
    expect_msg(&mut v1, "second").await;
    expect_msg(&mut w0, "second").await;
    u1.expect_nothing(QUIET).await;
    w1.expect_nothing(Duration::ZERO).await;
    // v removed from every group: gone from it on node 1; a new connection of v joins none.
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/users/{}/groups", enc(&v))),
        "",
        None,
    )
    .await
    .expect(204, None);
    cluster::eventually("v left on node 1", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 0 }
    })
    .await;
    let mut v2 = c.connect(0, &v, ProtocolKind::Json).await;
    send_group("third").await;
    expect_msg(&mut w0, "third").await;
    v1.expect_nothing(QUIET).await;
    v2.expect_nothing(Duration::ZERO).await;
}

// ---- close ----

/// Closing one connection (with a reason), a group's, a user's and all (with excluded), on
/// either node.
async fn closes(c: Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let mut one = c.connect(1, &c.user("one"), ProtocolKind::Json).await;
    call(
        n0,
        "DELETE",
        &hub_path(&format!("/connections/{}", enc(&one.id))),
        "&reason=go%20away",
        None,
    )
    .await
    .expect(200, None);
    let why = expect_close(&mut one).await;
    assert!(
        why.as_deref().is_some_and(|w| w.contains("go away")),
        "{why:?}"
    );

    let g = format!("{}-cg", c.prefix);
    let mut g1 = c.connect(1, &c.user("g1"), ProtocolKind::Json).await;
    let mut g2 = c.connect(0, &c.user("g2"), ProtocolKind::Json).await;
    let mut g3 = c.connect(1, &c.user("g3"), ProtocolKind::Json).await;
    for x in [&g1, &g2, &g3] {
        call(
            n0,
            "PUT",
            &hub_path(&format!("/groups/{}/connections/{}", enc(&g), enc(&x.id))),
            "",
            None,
        )
        .await
        .expect(200, None);
    }
    let node1 = n1.server().hub("/hubs/feed").expect("hub");
    let gname = feedhub::ids::GroupName::new(&g).expect("group");
    cluster::eventually("group members on node 1", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 2 }
    })
    .await;
    let extra = format!("&excluded={}&reason=group-closed", enc(&g3.id));
    call(
        n0,
        "POST",
        &hub_path(&format!("/groups/{}/:closeConnections", enc(&g))),
        &extra,
        None,
    )
    .await
    .expect(204, None);
    for x in [&mut g1, &mut g2] {
        let why = expect_close(x).await;
        assert!(
            why.as_deref().is_some_and(|w| w.contains("group-closed")),
            "{why:?}"
        );
    }

    let u = c.user("closeme");
    let mut u0 = c.connect(0, &u, ProtocolKind::Json).await;
    let mut u1 = c.connect(1, &u, ProtocolKind::MessagePack).await;
    call(
        n1,
        "POST",
        &hub_path(&format!("/users/{}/:closeConnections", enc(&u))),
        "",
        None,
    )
    .await
    .expect(204, None);
    expect_close(&mut u0).await;
    expect_close(&mut u1).await;

    let mut keep = c.connect(0, &c.user("keep"), ProtocolKind::Json).await;
    call(
        n1,
        "POST",
        &hub_path("/:closeConnections"),
        &format!("&excluded={}", enc(&keep.id)),
        None,
    )
    .await
    .expect(204, None);
    expect_close(&mut g3).await;
    call(
        n0,
        "POST",
        &hub_path(&format!("/connections/{}/:send", enc(&keep.id))),
        "",
        msg("still-here"),
    )
    .await
    .expect(202, None);
    expect_msg(&mut keep, "still-here").await;
}

macro_rules! both_backplanes {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory_cluster(stringify!($case)).await).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(c) = super::redis_cluster(stringify!($case)).await else {
                        return;
                    };
                    super::$case(c).await;
                }
            )*
        }
    };
}

both_backplanes!(
    sends,
    binary_send,
    statuses,
    authentication,
    user_groups,
    closes
);

/// Without `--azure-access-key` the REST API is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_nothing_is_served() {
    let server = support::start_feed_server().await;
    let path = hub_path("/:send");
    call(&server, "POST", &path, "", msg("x"))
        .await
        .expect(404, None);
    let r = request(
        &server.base_url,
        "POST",
        "/client/negotiate?hub=feed",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
}

// ---- the serverless negotiate redirect, with the official client ----

/// A tiny serverless "app": its negotiate answers the Azure redirect: feedhub's
/// `/client/?hub=feed` and a client token for `user` signed with the access key.
async fn start_app(feedhub_url: String, user: String) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (feedhub_url, user) = (feedhub_url.clone(), user.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                loop {
                    let Ok(n) = s.read(&mut buf[got..]).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got += n;
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") || got == buf.len() {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..got]).to_string();
                let url = format!("{feedhub_url}/client/?hub=feed");
                // The aud without the port, as the SDK writes it.
                let aud = "http://127.0.0.1/client/?hub=feed";
                let t = now();
                let token = sign(
                    KEY,
                    json!({ "aud": aud, "exp": t + 3600, "nbf": t, "iat": t, "asrs.s.uid": user }),
                );
                let (status, body) = if head.starts_with("POST ") && head.contains("/negotiate") {
                    (
                        "200 OK",
                        json!({ "url": url, "accessToken": token }).to_string(),
                    )
                } else if head.starts_with("OPTIONS ") {
                    ("204 No Content", String::new())
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/api"), task)
}

/// The official client follows the redirect over `transport`, and a REST send to the
/// token's user reaches it.
async fn redirected_client(transport: &str) {
    let Some(node) = external::node() else {
        return;
    };
    let c = memory_cluster(&format!("redirect-{transport}")).await;
    let user = c.user("redirected");
    let (app_url, app) = start_app(c.nodes[1].base_url.clone(), user.clone()).await;
    let text = format!("hello-{transport}");
    let env = vec![
        ("FEEDHUB_APP_URL", app_url),
        ("FEEDHUB_TRANSPORT", transport.to_string()),
        ("FEEDHUB_EXPECT", text.clone()),
    ];
    let script = node.run("azure_redirect.mjs", &env, Duration::from_secs(60));
    let rest = async {
        // Once the client is connected (its user exists), send to it from the other node.
        let n0 = &c.nodes[0];
        let path = hub_path(&format!("/users/{}", enc(&user)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            if call(n0, "HEAD", &path, "", None).await.status == 200 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        call(
            n0,
            "POST",
            &hub_path(&format!("/users/{}/:send", enc(&user))),
            "",
            msg(&text),
        )
        .await
        .expect(202, None);
    };
    let (run, ()) = tokio::join!(script, rest);
    app.abort();
    run.assert_success();
    assert!(
        run.output.contains(&format!("received {text}")),
        "{}",
        run.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_client_through_redirect_websockets() {
    redirected_client("WebSockets").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_client_through_redirect_server_sent_events() {
    redirected_client("ServerSentEvents").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_client_through_redirect_long_polling() {
    redirected_client("LongPolling").await;
}

/// The redirect's paths by hand: a client token with a wrong aud or key is refused, and the
/// right one negotiates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_are_checked() {
    let c = memory_cluster("client-tokens").await;
    let base = &c.nodes[0].base_url;
    let t = now();
    let negotiate = |token: String| {
        let base = base.clone();
        async move {
            request(
                &base,
                "POST",
                "/client/negotiate?hub=feed&negotiateVersion=1",
                &[("Authorization", format!("Bearer {token}"))],
                b"",
            )
            .await
        }
    };
    let good = sign(
        KEY,
        json!({ "aud": "http://127.0.0.1/client/?hub=feed", "exp": t + 60, "asrs.s.uid": "u1" }),
    );
    let r = negotiate(good).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("negotiate json");
    assert!(v["connectionToken"].is_string(), "{v}");
    let wrong_hub = sign(
        KEY,
        json!({ "aud": "http://127.0.0.1/client/?hub=other", "exp": t + 60, "asrs.s.uid": "u1" }),
    );
    assert_eq!(negotiate(wrong_hub).await.status, 401);
    let wrong_key = sign(
        "nope",
        json!({ "aud": "http://127.0.0.1/client/?hub=feed", "exp": t + 60, "asrs.s.uid": "u1" }),
    );
    assert_eq!(negotiate(wrong_key).await.status, 401);
    let expired = sign(
        KEY,
        json!({ "aud": "http://127.0.0.1/client/?hub=feed", "exp": t - 120, "asrs.s.uid": "u1" }),
    );
    assert_eq!(negotiate(expired).await.status, 401);
    // The application prefix of the hub is accepted.
    let app = sign(
        KEY,
        json!({ "aud": "http://127.0.0.1/client/?hub=myapp_feed", "exp": t + 60, "nameid": "u2" }),
    );
    let r = request(
        base,
        "POST",
        "/client/negotiate?hub=myapp_feed&negotiateVersion=1",
        &[("Authorization", format!("Bearer {app}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // A WebSocket on /client/?hub=feed with the token, as the browser client connects.
    let good = sign(
        KEY,
        json!({ "aud": "http://127.0.0.1/client/?hub=feed", "exp": t + 60, "asrs.s.uid": "ws-user" }),
    );
    let url = format!(
        "{}/client/?hub=feed&access_token={good}",
        c.nodes[0].ws_url()
    );
    let mut raw = support::RawClient::connect(&url, ProtocolKind::Json).await;
    let r = call(&c.nodes[1], "HEAD", &hub_path("/users/ws-user"), "", None).await;
    r.expect(200, None);
    call(
        &c.nodes[1],
        "POST",
        &hub_path("/users/ws-user/:send"),
        "",
        msg("ws"),
    )
    .await
    .expect(202, None);
    match within("Msg", raw.recv()).await {
        Some(HubMessage::Invocation(inv)) => assert_eq!(inv.target, "Msg"),
        other => panic!("{other:?}"),
    }
}
