//! Multi-instance helpers for the backplane tests: several feed servers in one process on
//! one backplane (an in-memory bus or a real Redis), Redis inspection (`PUBSUB NUMSUB`),
//! a private `redis-server` that tests may kill and restart, and a tiny HTTP client.
//!
//! Redis is `FEEDHUB_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). When it is not
//! reachable (or `redis-server` is missing for the private one) the helpers panic under
//! `CI=true` and otherwise print `SKIPPED` and return `None`. Every test uses a unique
//! channel prefix and unique user ids, so tests sharing the Redis never see each other.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use feedhub::backplane::memory::{MemoryBackplane, MemoryBus};
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::backplane::{Backplane, BackplaneMessage, BackplanePayload, Channel, Inbox};
use feedhub::hub::{HubBuilder, HubContext, HubDefinition, HubError};
use feedhub::protocol::{CompletionResult, HubMessage, Invocation, ProtocolKind, Value};
use feedhub::{feed, ServerBuilder, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{within, RawClient, TestServer, TEST_API_KEY, TEST_SECRET};

/// The shared Redis of the tests.
pub fn redis_url() -> String {
    std::env::var("FEEDHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn is_ci() -> bool {
    matches!(
        std::env::var("CI")
            .map(|v| v.to_ascii_lowercase())
            .as_deref(),
        Ok("true") | Ok("1") | Ok("yes")
    )
}

fn unavailable<T>(what: &str, why: &str) -> Option<T> {
    if is_ci() {
        panic!("{what} is required under CI=true but unavailable: {why}");
    }
    println!("SKIPPED: {what} unavailable ({why}); set CI=true to make this a failure");
    None
}

/// A connection to the shared Redis, or `None` (skip) / panic under CI.
pub async fn redis() -> Option<redis::aio::MultiplexedConnection> {
    redis_at(&redis_url()).await
}

async fn redis_at(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let client = match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => return unavailable("Redis", &e.to_string()),
    };
    match tokio::time::timeout(
        Duration::from_secs(3),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => unavailable("Redis", &format!("{url}: {e}")),
        Err(_) => unavailable("Redis", &format!("{url}: connect timed out")),
    }
}

/// `PUBSUB NUMSUB channel`.
pub async fn numsub(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> usize {
    let r: Vec<(String, usize)> = within(
        "PUBSUB NUMSUB",
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(conn),
    )
    .await
    .expect("PUBSUB NUMSUB");
    r.first().map_or(0, |(_, n)| *n)
}

/// `PUBSUB CHANNELS pattern`.
pub async fn channels(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    within(
        "PUBSUB CHANNELS",
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query_async(conn),
    )
    .await
    .expect("PUBSUB CHANNELS")
}

/// `PUBLISH channel payload`; returns the number of receivers.
pub async fn publish(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    payload: &str,
) -> usize {
    within(
        "PUBLISH",
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(conn),
    )
    .await
    .expect("PUBLISH")
}

/// Polls `f` every 20 ms until it returns true, for at most `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Unsubscribe debounce of the test hubs (short, so tests can watch it).
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// The feed hub (its options and methods) with a short debounce and helper methods for the
/// tests: `ConnId()`, `Join(group)`, `SendOthers(text)`, `SendGroup(group, text)`.
pub fn test_feed_hub() -> HubDefinition {
    let base = feed::feed_hub();
    let hub = HubBuilder::new(feed::FEED_HUB_PATH).configure(|o| {
        *o = base.options.clone();
        o.unsubscribe_debounce = DEBOUNCE;
    });
    test_feed_methods(hub).build()
}

/// The feed hub's methods (`feed::feed_methods`) plus the test helpers `ConnId()`,
/// `Join(group)`, `SendOthers(text)` and `SendGroup(group, text)`, on `hub`.
pub fn test_feed_methods(hub: HubBuilder) -> HubBuilder {
    feed::feed_methods(hub)
        .method("ConnId", |ctx: HubContext, (): ()| async move {
            Ok::<_, HubError>(ctx.connection_id().to_string())
        })
        .method("Join", |ctx: HubContext, (group,): (String,)| async move {
            ctx.groups().add(ctx.connection_id(), &group).await
        })
        .method(
            "SendOthers",
            |ctx: HubContext, (text,): (String,)| async move {
                ctx.clients().others().send("Msg", (text,)).await
            },
        )
        .method(
            "SendGroup",
            |ctx: HubContext, (group, text): (String, String)| async move {
                ctx.clients().group(&group).send("Msg", (text,)).await
            },
        )
}

/// Which backplane a [`Cluster`] runs on.
#[derive(Clone)]
pub enum Kind {
    /// One in-process bus.
    Memory(MemoryBus),
    /// A Redis at this URL.
    Redis(String),
}

/// Several feed servers on one backplane.
pub struct Cluster {
    /// The servers.
    pub nodes: Vec<TestServer>,
    /// Their Redis backplanes (Redis clusters only), in node order.
    pub redis: Vec<Arc<RedisBackplane>>,
    /// The backplane kind.
    pub kind: Kind,
    /// The unique channel prefix of this cluster (and user id prefix of its test).
    pub prefix: String,
    /// A Redis connection for inspection (Redis clusters only).
    pub inspect: Option<redis::aio::MultiplexedConnection>,
}

/// Starts `n` feed servers on an in-memory bus.
pub async fn memory_cluster(n: usize, name: &str) -> Cluster {
    start_cluster(Kind::Memory(MemoryBus::new()), n, name, None).await
}

/// Starts `n` feed servers on the shared Redis; `None` when Redis is unavailable (skip).
pub async fn redis_cluster(n: usize, name: &str) -> Option<Cluster> {
    let inspect = redis().await?;
    Some(start_cluster(Kind::Redis(redis_url()), n, name, Some(inspect)).await)
}

/// Starts `n` feed servers on the Redis at `url` (e.g. a [`PrivateRedis`]).
pub async fn redis_cluster_at(url: &str, n: usize, name: &str) -> Cluster {
    let inspect = redis_at(url).await;
    start_cluster(Kind::Redis(url.to_string()), n, name, inspect).await
}

/// Starts one feed server on the Redis at `url` without waiting for it to connect.
pub async fn redis_cluster_unready(url: &str, name: &str) -> Cluster {
    start_cluster_with(Kind::Redis(url.to_string()), 1, name, None, false).await
}

/// A connection to the Redis at `url`; panics when it is unreachable.
pub async fn redis_url_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).expect("redis url");
    within("redis connect", client.get_multiplexed_async_connection())
        .await
        .expect("redis connect")
}

async fn start_cluster(
    kind: Kind,
    n: usize,
    name: &str,
    inspect: Option<redis::aio::MultiplexedConnection>,
) -> Cluster {
    start_cluster_with(kind, n, name, inspect, true).await
}

async fn start_cluster_with(
    kind: Kind,
    n: usize,
    name: &str,
    inspect: Option<redis::aio::MultiplexedConnection>,
    wait_ready: bool,
) -> Cluster {
    start_cluster_configured(kind, n, name, inspect, wait_ready, |c| c).await
}

/// Starts `n` feed servers on `kind` with an adjusted config (e.g. history bounds);
/// `inspect` is a Redis connection for inspection (Redis clusters only).
pub async fn start_cluster_configured(
    kind: Kind,
    n: usize,
    name: &str,
    inspect: Option<redis::aio::MultiplexedConnection>,
    wait_ready: bool,
    adjust: impl Fn(ServerConfig) -> ServerConfig,
) -> Cluster {
    let prefix = super::unique_prefix(name);
    let mut nodes = Vec::new();
    let mut redis = Vec::new();
    for i in 0..n {
        let config = adjust(ServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(TEST_SECRET.to_string()),
            api_key: Some(TEST_API_KEY.to_string()),
            feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
            node_id: format!("{prefix}-node{i}"),
            channel_prefix: Some(prefix.clone()),
            ..ServerConfig::default()
        });
        let builder = ServerBuilder::new(config).hub(test_feed_hub());
        let builder = match &kind {
            Kind::Memory(bus) => builder.memory_bus(bus.clone()),
            Kind::Redis(url) => {
                let mut cfg = RedisConfig::from_url(url).expect("redis url");
                let slot: Arc<Mutex<Option<Arc<RedisBackplane>>>> = Arc::default();
                let s = slot.clone();
                let b = builder.backplane(Box::new(move |c, inbox| {
                    cfg.history = c.history();
                    let bp = RedisBackplane::new(cfg, c.node_id.clone(), inbox);
                    *s.lock().expect("slot") = Some(bp.clone());
                    bp
                }));
                let server = b.start().await.expect("feed server");
                let bp = slot.lock().expect("slot").clone().expect("backplane built");
                assert!(
                    !wait_ready || bp.wait_ready(Duration::from_secs(10)).await,
                    "Redis backplane did not connect"
                );
                redis.push(bp);
                nodes.push(wrap(server));
                continue;
            }
        };
        nodes.push(wrap(builder.start().await.expect("feed server")));
    }
    Cluster {
        nodes,
        redis,
        kind,
        prefix,
        inspect,
    }
}

fn wrap(server: feedhub::Server) -> TestServer {
    TestServer {
        base_url: format!("http://{}", server.local_addr()),
        jwt_secret: TEST_SECRET.to_string(),
        api_key: TEST_API_KEY.to_string(),
        server: Some(server),
    }
}

impl Cluster {
    /// A unique user id of this test.
    pub fn user(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The channel of `user` (`feed-<user>`).
    pub fn user_channel(user: &str) -> String {
        format!("feed-{user}")
    }

    /// Connects `user` to node `node` with `protocol`.
    pub async fn connect(&self, node: usize, user: &str, protocol: ProtocolKind) -> Client {
        let s = &self.nodes[node];
        let url = format!(
            "{}{}?access_token={}",
            s.ws_url(),
            feed::FEED_HUB_PATH,
            s.token(user)
        );
        let mut raw = RawClient::connect(&url, protocol).await;
        let id = match invoke(&mut raw, "ConnId", vec![]).await {
            CompletionResult::Value(v) => v.decode::<String>().expect("connection id"),
            other => panic!("ConnId failed: {other:?}"),
        };
        Client {
            raw,
            id,
            node,
            pending: Default::default(),
        }
    }

    /// Connects `user` to node `node` and returns as soon as the handshake was answered
    /// (no round trip afterwards; the connection id is left empty).
    pub async fn connect_handshake_only(&self, node: usize, user: &str) -> Client {
        let s = &self.nodes[node];
        let url = format!(
            "{}{}?access_token={}",
            s.ws_url(),
            feed::FEED_HUB_PATH,
            s.token(user)
        );
        Client {
            raw: RawClient::connect(&url, ProtocolKind::Json).await,
            id: String::new(),
            node,
            pending: Default::default(),
        }
    }

    /// How many nodes subscribe `channel`: `PUBSUB NUMSUB` on Redis, the bus's count in
    /// memory.
    pub async fn subscribers(&mut self, channel: &str) -> usize {
        match &self.kind {
            Kind::Memory(bus) => bus.subscriber_count(&Channel::new(channel)),
            Kind::Redis(_) => {
                let conn = self.inspect.as_mut().expect("inspection connection");
                numsub(conn, channel).await
            }
        }
    }

    /// Waits until `channel` has `n` subscribing nodes.
    pub async fn expect_subscribers(&mut self, channel: &str, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let got = self.subscribers(channel).await;
            if got == n {
                return;
            }
            if start.elapsed() > timeout {
                panic!("{channel}: expected {n} subscribers, got {got} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes foreign raw JSON on `channel`, as another service would
    /// (`PUBLISH feed-42 {json}`).
    pub async fn foreign_publish(&mut self, channel: &str, json: &str) {
        match &self.kind {
            Kind::Memory(bus) => {
                let (inbox, _rx) = Inbox::new(1, 1);
                let outsider = MemoryBackplane::new(bus.clone(), "outsider", inbox);
                outsider
                    .publish(
                        &Channel::new(channel),
                        Arc::new(BackplaneMessage {
                            origin: String::new(),
                            payload: BackplanePayload::RawJson(bytes::Bytes::from(
                                json.to_string(),
                            )),
                        }),
                    )
                    .await
                    .expect("memory publish");
            }
            Kind::Redis(_) => {
                let conn = self.inspect.as_mut().expect("inspection connection");
                publish(conn, channel, json).await;
            }
        }
    }
}

/// A test client: a raw SignalR connection and its connection id.
pub struct Client {
    /// The socket.
    pub raw: RawClient,
    /// Its connection id.
    pub id: String,
    /// The node it is connected to.
    pub node: usize,
    /// Invocations that arrived while waiting for a completion.
    pending: std::collections::VecDeque<Invocation>,
}

impl Client {
    /// A client over a raw connection whose id is known.
    pub fn from_raw(raw: RawClient, id: String, node: usize) -> Client {
        Client {
            raw,
            id,
            node,
            pending: Default::default(),
        }
    }

    /// The next invocation (target, first argument as JSON).
    pub async fn next_invocation(&mut self) -> (String, String) {
        loop {
            let next = match self.pending.pop_front() {
                Some(inv) => Some(HubMessage::Invocation(inv)),
                None => self.raw.recv().await,
            };
            match next {
                Some(HubMessage::Invocation(inv)) => {
                    let arg = inv
                        .arguments
                        .first()
                        .map(|v| v.to_json_string().expect("json"))
                        .unwrap_or_default();
                    return (inv.target, arg);
                }
                Some(_) => continue,
                None => panic!("connection {} closed", self.id),
            }
        }
    }

    /// Asserts that no invocation arrives within `quiet`.
    pub async fn expect_nothing(&mut self, quiet: Duration) {
        if let Ok(got) = tokio::time::timeout(quiet, self.next_invocation()).await {
            panic!("connection {} got an unexpected {got:?}", self.id);
        }
    }

    /// Invokes `method(args)` and returns its completion.
    pub async fn invoke(&mut self, method: &str, args: Vec<Value>) -> CompletionResult {
        let id = feedhub::ids::random_token();
        self.raw
            .send(&HubMessage::Invocation(Invocation {
                invocation_id: Some(id.clone()),
                ..Invocation::send(method, args)
            }))
            .await;
        loop {
            match self.raw.recv().await {
                Some(HubMessage::Completion(c)) if c.invocation_id == id => return c.result,
                Some(HubMessage::Invocation(inv)) => self.pending.push_back(inv),
                Some(_) => continue,
                None => panic!("closed while invoking {method}"),
            }
        }
    }

    /// Closes the socket.
    pub async fn close(mut self) {
        let _ = within("close", self.raw.ws.close(None)).await;
    }
}

async fn invoke(raw: &mut RawClient, method: &str, args: Vec<Value>) -> CompletionResult {
    let id = feedhub::ids::random_token();
    raw.send(&HubMessage::Invocation(Invocation {
        invocation_id: Some(id.clone()),
        ..Invocation::send(method, args)
    }))
    .await;
    loop {
        match raw.recv().await {
            Some(HubMessage::Completion(c)) if c.invocation_id == id => return c.result,
            Some(_) => continue,
            None => panic!("closed while invoking {method}"),
        }
    }
}

/// A JSON value argument.
pub fn json(v: serde_json::Value) -> Value {
    Value::from(v)
}

// ---- a private redis-server ----

/// A `redis-server` of this test alone, on a free port; it can be killed and restarted on
/// the same port. Killed on drop.
pub struct PrivateRedis {
    /// The port.
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one; `None` when `redis-server` is missing (panics under CI).
    pub async fn start() -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            return unavailable("redis-server", "not on PATH");
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("addr").port()
        };
        let mut r = PrivateRedis { port, child: None };
        r.restart().await;
        Some(r)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    && &buf == b"+PONG\r\n"
                {
                    return;
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                panic!("private redis-server on port {} did not start", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---- HTTP ----

/// Sends one HTTP/1.1 request to `base_url` (`http://host:port`) and returns the status
/// and body.
pub async fn http(
    base_url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let host = base_url.trim_start_matches("http://");
    let mut s = within("http connect", TcpStream::connect(host))
        .await
        .expect("http connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    within("http write", s.write_all(req.as_bytes()))
        .await
        .expect("http write");
    let mut out = Vec::new();
    within("http read", s.read_to_end(&mut out))
        .await
        .expect("http read");
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("http status");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `GET /readyz` status.
pub async fn readyz(server: &TestServer) -> u16 {
    http(&server.base_url, "GET", "/readyz", &[], "").await.0
}

/// `POST /api/feed` with the test key; returns the status.
pub async fn post_feed(
    server: &TestServer,
    recipients: &[&str],
    payload: serde_json::Value,
) -> u16 {
    let body = serde_json::json!({ "recipients": recipients, "payload": payload }).to_string();
    let auth = format!("Bearer {}", server.api_key);
    http(
        &server.base_url,
        "POST",
        "/api/feed",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await
    .0
}
