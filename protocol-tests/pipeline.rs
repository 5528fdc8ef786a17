//! The feed pipeline against a real RabbitMQ: ingest in both message forms through the
//! official `@microsoft/signalr` client (JSON and MessagePack), dead-lettering of malformed
//! messages with a reason, a RabbitMQ outage (a TCP proxy between feedhub and the broker is
//! cut and restored: a real connection loss from feedhub's view, without touching the shared
//! broker), backplane failure (nack, requeue, delivered later), two instances sharing the
//! queue, and the delivery rate.
//!
//! Every test uses its own exchange and queue (`unique_prefix`), deleted at the end (also
//! when the test fails). Without RabbitMQ (or Node for the JS tests) the tests print
//! `SKIPPED`, except under `CI=true`, where they fail. Broker URL:
//! `FEEDHUB_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Run just these: `cargo test --release --test pipeline -- --nocapture`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use feedhub::app::BackplaneFactory;
use feedhub::backplane::memory::{MemoryBackplane, MemoryBus};
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::backplane::{
    Appended, Backplane, BackplaneError, BackplaneMessage, Channel, FeedAppend, HistoryPage,
};
use feedhub::ingest::amqp::{queue_arguments, AmqpConfig, AmqpIngest, AMQP_METRICS, REASON_HEADER};
use feedhub::protocol::{HubMessage, ProtocolKind};
use feedhub::{feed, ServerBuilder, ServerConfig};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel as AmqpChannel, Connection, ConnectionProperties};
use support::{unique_prefix, within, RawClient, TestServer, TEST_API_KEY, TEST_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Hard limit for one script run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn amqp_url() -> String {
    std::env::var("FEEDHUB_TEST_AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

async fn amqp_connect(url: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Connection::connect(url, props).await
}

/// The broker URL when RabbitMQ answers; `None` (SKIPPED) when it does not, except under
/// CI, where that fails the test.
async fn rabbitmq() -> Option<String> {
    let url = amqp_url();
    let reason = match tokio::time::timeout(Duration::from_secs(5), amqp_connect(&url)).await {
        Ok(Ok(c)) => {
            let _ = c.close(200, "probe").await;
            return Some(url);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "connect timed out".to_string(),
    };
    if external::is_ci() {
        panic!("RabbitMQ is required under CI=true but unavailable at {url}: {reason}");
    }
    println!(
        "SKIPPED: RabbitMQ unavailable at {url} ({reason}); set CI=true to make this a failure"
    );
    None
}

/// One test's exchange and queue (and their dead-letter twins), with a publisher.
/// Dropping it deletes all four.
struct Topo {
    url: String,
    exchange: String,
    queue: String,
    _conn: Connection,
    ch: AmqpChannel,
}

impl Topo {
    async fn new(url: &str, name: &str) -> Topo {
        let prefix = unique_prefix(name);
        let conn = within("amqp connect", amqp_connect(url))
            .await
            .expect("amqp connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        let exchange = format!("{prefix}.FeedUpdate");
        // Declared here too so tests can publish before feedhub has connected.
        ch.exchange_declare(
            &exchange,
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
        Topo {
            url: url.to_string(),
            exchange,
            queue: format!("{prefix}.feed-updates"),
            _conn: conn,
            ch,
        }
    }

    /// The ingest settings for this topology, consuming from `url` (the broker or a proxy).
    fn config(&self, url: &str) -> AmqpConfig {
        AmqpConfig {
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            ..AmqpConfig::new(url)
        }
    }

    /// Declares the queue as feedhub does (so messages can wait in it before feedhub
    /// consumes; feedhub's own declaration then fails if they differ).
    async fn declare_queue(&self) {
        let durable_x = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_q = lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let dlx = format!("{}.dlx", self.exchange);
        let dlq = format!("{}.dlx", self.queue);
        self.ch
            .exchange_declare(
                &dlx,
                lapin::ExchangeKind::Fanout,
                durable_x,
                FieldTable::default(),
            )
            .await
            .expect("declare dlx");
        self.ch
            .queue_declare(&dlq, durable_q, FieldTable::default())
            .await
            .expect("declare dlq");
        self.ch
            .queue_declare(&self.queue, durable_q, queue_arguments(&dlx))
            .await
            .expect("declare queue");
        self.ch
            .queue_bind(
                &self.queue,
                &self.exchange,
                "#",
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
    }

    /// Publishes one message and waits for the broker's confirm.
    async fn publish(&self, routing_key: &str, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let confirm = within(
            "publish",
            self.ch.basic_publish(
                &self.exchange,
                routing_key,
                BasicPublishOptions::default(),
                body,
                props,
            ),
        )
        .await
        .expect("publish");
        let c = within("publisher confirm", confirm).await.expect("confirm");
        assert!(c.is_ack(), "broker did not confirm the publish");
    }

    /// Publishes many messages pipelined, then waits for every confirm.
    async fn publish_many(&self, messages: &[(String, Vec<u8>)]) {
        let mut confirms = Vec::with_capacity(messages.len());
        for (key, body) in messages {
            confirms.push(
                within(
                    "publish",
                    self.ch.basic_publish(
                        &self.exchange,
                        key,
                        BasicPublishOptions::default(),
                        body,
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            let c = tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("confirm timed out")
                .expect("confirm");
            assert!(c.is_ack());
        }
    }

    /// Takes the messages in the dead-letter queue until `n` arrived (or the wait ends).
    async fn dead_letters(&self, n: usize) -> Vec<(Vec<u8>, HashMap<String, String>)> {
        let dlq = format!("{}.dlx", self.queue);
        let mut out = Vec::new();
        let deadline = Instant::now() + support::WAIT;
        while out.len() < n && Instant::now() < deadline {
            let got = self
                .ch
                .basic_get(&dlq, BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            let Some(msg) = got else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut headers = HashMap::new();
            if let Some(h) = msg.delivery.properties.headers() {
                for (k, v) in h.inner() {
                    let text = match v {
                        AMQPValue::LongString(s) => {
                            String::from_utf8_lossy(s.as_bytes()).into_owned()
                        }
                        AMQPValue::ShortString(s) => s.as_str().to_string(),
                        other => format!("{other:?}"),
                    };
                    headers.insert(k.as_str().to_string(), text);
                }
            }
            out.push((msg.delivery.data.clone(), headers));
        }
        out
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        let url = self.url.clone();
        let exchange = self.exchange.clone();
        let queue = self.queue.clone();
        // A runtime of its own: Drop cannot await, and this also runs after a panic.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(5), amqp_connect(&url)).await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    for q in [queue.clone(), format!("{queue}.dlx")] {
                        let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
                    }
                    for e in [exchange.clone(), format!("{exchange}.dlx")] {
                        let _ = ch
                            .exchange_delete(&e, ExchangeDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "test cleanup").await;
            });
        })
        .join();
    }
}

/// A feed server with a RabbitMQ consumer.
struct Node {
    server: TestServer,
    ingest: Arc<AmqpIngest>,
}

impl Node {
    fn token(&self, user: &str) -> String {
        self.server.token(user)
    }

    /// A raw JSON client of `user`'s feed.
    async fn client(&self, user: &str) -> RawClient {
        RawClient::connect(
            &format!(
                "{}/hubs/feed?access_token={}",
                self.server.ws_url(),
                self.token(user)
            ),
            ProtocolKind::Json,
        )
        .await
    }

    fn start_consuming(&self) {
        self.ingest.start(
            self.server
                .server()
                .hub(feed::FEED_HUB_PATH)
                .expect("feed hub"),
        );
    }

    async fn wait_consuming(&self) {
        within("RabbitMQ consumer to start", async {
            while !self.ingest.is_consuming() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

/// Starts a feed server, optionally on `backplane`, with a consumer of `amqp` (if any).
async fn start_node(amqp: Option<AmqpConfig>, backplane: Option<BackplaneFactory>) -> Node {
    let consume = amqp.is_some();
    let n = start_idle_node(amqp, backplane).await;
    if consume {
        n.start_consuming();
    }
    n
}

/// Like [`start_node`], but the consumer starts only with [`Node::start_consuming`].
async fn start_idle_node(amqp: Option<AmqpConfig>, backplane: Option<BackplaneFactory>) -> Node {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        ..ServerConfig::default()
    };
    let ingest = Arc::new(AmqpIngest::new(
        amqp.clone()
            .unwrap_or_else(|| AmqpConfig::new("amqp://unused")),
    ));
    // The raw test clients only receive, and never ping as the official clients do (every
    // 15 s): under a loaded machine the delivery-rate runs leave them silent longer than
    // the 30 s client timeout, which counts from the handshake.
    let mut hub = feed::feed_hub();
    hub.options.client_timeout = Duration::from_secs(600);
    let mut builder = ServerBuilder::new(config).hub(hub);
    if amqp.is_some() {
        builder = builder.ready_check(ingest.ready_check());
    }
    if let Some(b) = backplane {
        builder = builder.backplane(b);
    }
    let server = builder.start().await.expect("feed server");
    Node {
        server: TestServer {
            base_url: format!("http://{}", server.local_addr()),
            jwt_secret: TEST_SECRET.to_string(),
            api_key: TEST_API_KEY.to_string(),
            server: Some(server),
        },
        ingest,
    }
}

fn memory(bus: &MemoryBus) -> BackplaneFactory {
    let bus = bus.clone();
    Box::new(move |cfg, inbox| Arc::new(MemoryBackplane::new(bus, cfg.node_id.clone(), inbox)))
}

/// The next FeedUpdated argument (as JSON) a client receives, without what feedhub adds:
/// the history `"offset"` of an object payload (checked to be there, a positive integer)
/// and the stable id of a
/// message that has none (`"id":"h:<hex>"`, checked to be well formed), so the tests below
/// compare payloads; see [`next_feed_raw`].
async fn next_feed(c: &mut RawClient) -> serde_json::Value {
    let mut v = next_feed_raw(c).await;
    if let Some(obj) = v.as_object_mut() {
        let offset = obj.remove("offset");
        assert!(
            offset
                .as_ref()
                .and_then(|o| o.as_u64())
                .is_some_and(|o| o > 0),
            "offset {offset:?}"
        );
        if let Some(id) = obj.get("id").and_then(|i| i.as_str()) {
            if let Some(hex) = id.strip_prefix("h:") {
                assert!(
                    hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                    "stable id {id:?}"
                );
                obj.remove("id");
            }
        }
    }
    v
}

/// The next FeedUpdated argument (as JSON) a client receives, as is.
async fn next_feed_raw(c: &mut RawClient) -> serde_json::Value {
    match c.recv().await {
        Some(HubMessage::Invocation(inv)) if inv.target == "FeedUpdated" => {
            assert_eq!(inv.arguments.len(), 1, "FeedUpdated has one argument");
            inv.arguments[0]
                .decode::<serde_json::Value>()
                .expect("argument is JSON")
        }
        Some(other) => panic!("unexpected message {other:?}"),
        None => panic!("connection closed while waiting for FeedUpdated"),
    }
}

/// Asserts that `c` receives no FeedUpdated within `d`.
async fn expect_quiet(c: &mut RawClient, d: Duration, what: &str) {
    if let Ok(m) = tokio::time::timeout(d, c.recv()).await {
        panic!("{what}: expected nothing, got {m:?}");
    }
}

/// `GET path` status code.
async fn http_status(base_url: &str, path: &str) -> u16 {
    let host = base_url.trim_start_matches("http://").to_string();
    let mut s = within("connect", TcpStream::connect(&host))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    within("send", s.write_all(req.as_bytes()))
        .await
        .expect("send");
    let mut raw = Vec::new();
    within("response", s.read_to_end(&mut raw))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {text:?}"))
}

/// `POST /api/feed` with the test key; returns the status.
async fn post_feed(base_url: &str, body: &str) -> u16 {
    let host = base_url.trim_start_matches("http://").to_string();
    let mut s = within("connect", TcpStream::connect(&host))
        .await
        .expect("connect");
    let req = format!(
        "POST /api/feed HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    within("send", s.write_all(req.as_bytes()))
        .await
        .expect("send");
    let mut raw = Vec::new();
    within("response", s.read_to_end(&mut raw))
        .await
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {text:?}"))
}

async fn wait_status(base_url: &str, path: &str, want: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if http_status(base_url, path).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{path} did not answer {want} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn js_pipeline(protocol: &str) {
    let Some(url) = rabbitmq().await else { return };
    let Some(node) = external::node() else { return };
    let topo = Topo::new(&url, &format!("js-{protocol}")).await;
    let n = start_node(Some(topo.config(&url)), None).await;
    n.wait_consuming().await;
    let env = vec![
        ("FEEDHUB_URL", n.server.base_url.clone()),
        ("FEEDHUB_JWT_SECRET", TEST_SECRET.to_string()),
        ("FEEDHUB_PROTOCOL", protocol.to_string()),
        ("FEEDHUB_AMQP_URL", url.clone()),
        ("FEEDHUB_AMQP_EXCHANGE", topo.exchange.clone()),
        ("FEEDHUB_USER_PREFIX", unique_prefix("u")),
    ];
    let run = node.run("pipeline.mjs", &env, SCRIPT_TIMEOUT).await;
    drop(n);
    run.assert_success();
    // The script's malformed messages were dead-lettered, not lost or stuck.
    let dead = topo.dead_letters(3).await;
    assert_eq!(dead.len(), 3, "three malformed messages in the DLX");
}

/// `@microsoft/signalr` (JSON): both message forms reach exactly their recipients, ids
/// travel in the payload, a malformed message is skipped, per-user order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_rabbitmq_ingest_json() {
    js_pipeline("json").await;
}

/// The same with `@microsoft/signalr-protocol-msgpack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_rabbitmq_ingest_messagepack() {
    js_pipeline("messagepack").await;
}

/// Every kind of malformed message lands in the dead-letter queue with its reason header
/// and its body unchanged, is counted, and the good message after them still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_a_reason() {
    let Some(url) = rabbitmq().await else { return };
    let topo = Topo::new(&url, "dlx").await;
    let mut cfg = topo.config(&url);
    cfg.max_message_size = 128 * 1024;
    let n = start_node(Some(cfg), None).await;
    n.wait_consuming().await;
    let user = unique_prefix("u");
    let mut c = n.client(&user).await;
    let before: HashMap<&str, u64> = [
        "too_large",
        "not_json",
        "bad_user_id",
        "no_payload",
        "no_address",
        "too_many_recipients",
        "too_deep",
    ]
    .into_iter()
    .map(|r| (r, rejected(r)))
    .collect();

    let huge = format!("\"{}\"", "x".repeat(130 * 1024));
    let many: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    let too_many = serde_json::json!({"recipients": many, "payload": 1}).to_string();
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (format!("feed.{user}"), huge.into_bytes(), "too_large"),
        (format!("feed.{user}"), b"{oops".to_vec(), "not_json"),
        ("feed".into(), b"not json at all".to_vec(), "not_json"),
        (
            "feed".into(),
            br#"{"payload":{"a":1}}"#.to_vec(),
            "no_address",
        ),
        (
            "feed".into(),
            br#"{"recipients":[],"payload":1}"#.to_vec(),
            "no_address",
        ),
        (
            "post.created".into(),
            br#"{"text":"no recipients"}"#.to_vec(),
            "no_address",
        ),
        (
            "feed".into(),
            br#"{"recipients":[""],"payload":1}"#.to_vec(),
            "bad_user_id",
        ),
        (
            "feed".into(),
            br#"{"recipients":[{"x":1}],"payload":1}"#.to_vec(),
            "bad_user_id",
        ),
        (
            "feed".into(),
            format!(r#"{{"recipients":["{user}"]}}"#).into_bytes(),
            "no_payload",
        ),
        ("feed".into(), too_many.into_bytes(), "too_many_recipients"),
        // Deeper than MessagePack clients can be sent (issue 14): nobody gets it.
        (
            format!("feed.{user}"),
            format!("{}{}", "[".repeat(129), "]".repeat(129)).into_bytes(),
            "too_deep",
        ),
        (
            "feed".into(),
            format!(
                r#"{{"recipients":["{user}"],"payload":{}{}}}"#,
                "[".repeat(60_000),
                "]".repeat(60_000)
            )
            .into_bytes(),
            "too_deep",
        ),
    ];
    for (key, body, _) in &cases {
        topo.publish(key, body, None).await;
    }
    topo.publish(
        &format!("feed.{user}"),
        br#"{"text":"good"}"#,
        Some("good-1"),
    )
    .await;
    assert_eq!(
        next_feed(&mut c).await,
        serde_json::json!({"id":"good-1","text":"good"}),
        "the first event the client sees is the good one"
    );

    let dead = topo.dead_letters(cases.len()).await;
    assert_eq!(
        dead.len(),
        cases.len(),
        "every malformed message is in the DLX"
    );
    for ((key, body, reason), (dead_body, headers)) in cases.iter().zip(&dead) {
        assert_eq!(dead_body, body, "body kept unchanged ({reason})");
        let why = headers.get(REASON_HEADER).map(String::as_str).unwrap_or("");
        assert!(
            why.starts_with(&format!("{reason}: ")),
            "reason header {why:?} should start with {reason}"
        );
        assert_eq!(
            headers.get("x-feedhub-routing-key").map(String::as_str),
            Some(key.as_str())
        );
    }
    for (reason, was) in before {
        let want = cases.iter().filter(|c| c.2 == reason).count() as u64;
        assert!(
            rejected(reason) >= was + want,
            "feedhub_amqp_rejected_total{{reason={reason}}} counted"
        );
    }
    let metrics = http_text(&n.server.base_url, "/metrics").await;
    assert!(
        metrics.contains("feedhub_amqp_rejected_total{reason=\"not_json\"}"),
        "{metrics}"
    );
    expect_quiet(&mut c, Duration::from_millis(300), "after the good event").await;
}

fn rejected(reason: &str) -> u64 {
    use feedhub::ingest::amqp::RejectReason::*;
    let r = [
        TooLarge,
        NotJson,
        NoRecipients,
        TooManyRecipients,
        BadUserId,
        NoPayload,
        NoAddress,
        TooDeep,
    ]
    .into_iter()
    .find(|r| r.as_str() == reason)
    .expect("reason");
    AMQP_METRICS.rejected(r)
}

async fn http_text(base_url: &str, path: &str) -> String {
    let host = base_url.trim_start_matches("http://").to_string();
    let mut s = within("connect", TcpStream::connect(&host))
        .await
        .expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    within("send", s.write_all(req.as_bytes()))
        .await
        .expect("send");
    let mut raw = Vec::new();
    within("response", s.read_to_end(&mut raw))
        .await
        .expect("read");
    String::from_utf8_lossy(&raw).into_owned()
}

/// A TCP proxy in front of RabbitMQ that the test can cut (every open connection is
/// dropped and new ones are refused) and restore.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let gen_tx = generation.clone();
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = gen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
            task,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

fn broker_addr(url: &str) -> SocketAddr {
    let uri: lapin::uri::AMQPUri = url.parse().expect("amqp url");
    let host = if uri.authority.host == "localhost" {
        "127.0.0.1".to_string()
    } else {
        uri.authority.host.clone()
    };
    format!("{host}:{}", uri.authority.port)
        .parse()
        .expect("broker address must be an IP:port for the proxy")
}

fn proxied_url(url: &str, proxy: SocketAddr) -> String {
    let mut uri: lapin::uri::AMQPUri = url.parse().expect("amqp url");
    uri.authority.host = proxy.ip().to_string();
    uri.authority.port = proxy.port();
    let userinfo = &uri.authority.userinfo;
    format!(
        "amqp://{}:{}@{}:{}/{}",
        userinfo.username,
        userinfo.password,
        uri.authority.host,
        uri.authority.port,
        urlencode(&uri.vhost)
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// RabbitMQ goes away (the connection between feedhub and the broker is cut) while clients
/// stay connected: `/readyz` answers 503, events published meanwhile wait in the queue;
/// when the broker is reachable again feedhub reconnects, `/readyz` is 200 again, and every
/// event arrives, in order, within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_outage_loses_no_event() {
    let Some(url) = rabbitmq().await else { return };
    let topo = Topo::new(&url, "outage").await;
    let proxy = Proxy::start(broker_addr(&url)).await;
    let n = start_node(Some(topo.config(&proxied_url(&url, proxy.addr))), None).await;
    n.wait_consuming().await;
    assert_eq!(http_status(&n.server.base_url, "/readyz").await, 200);
    let user = unique_prefix("u");
    let mut c = n.client(&user).await;
    let key = format!("feed.{user}");
    topo.publish(&key, br#"{"seq":-1}"#, None).await;
    assert_eq!(next_feed(&mut c).await, serde_json::json!({"seq":-1}));
    // Its ack must have left before the cut, or the broker rightly redelivers it.
    within("ack of the first event", async {
        while n.ingest.acked() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reconnects_before = AMQP_METRICS.reconnects.load(Ordering::Relaxed);

    proxy.cut();
    let took = wait_status(&n.server.base_url, "/readyz", 503, Duration::from_secs(5)).await;
    println!("readyz 503 {took:?} after the cut");
    const N: usize = 100;
    let batch: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| (key.clone(), format!(r#"{{"seq":{i}}}"#).into_bytes()))
        .collect();
    topo.publish_many(&batch).await;
    expect_quiet(&mut c, Duration::from_millis(500), "during the outage").await;
    assert_eq!(http_status(&n.server.base_url, "/readyz").await, 503);

    proxy.restore();
    let restored = Instant::now();
    for i in 0..N {
        let got = next_feed(&mut c).await;
        assert_eq!(got, serde_json::json!({ "seq": i }), "event {i} in order");
    }
    let all_in = restored.elapsed();
    let ready_in = wait_status(&n.server.base_url, "/readyz", 200, Duration::from_secs(5)).await;
    println!(
        "after restore: all {N} queued events delivered in {all_in:?}; readyz 200 by {:?}",
        restored.elapsed()
    );
    let _ = ready_in;
    assert!(
        all_in < Duration::from_secs(2),
        "delivery resumed and caught up within 2 s (took {all_in:?})"
    );
    assert!(AMQP_METRICS.reconnects.load(Ordering::Relaxed) > reconnects_before);
    expect_quiet(&mut c, Duration::from_millis(300), "no duplicates").await;
}

/// A backplane that fails every publish while `failing` is set (and reports not ready).
struct FlakyBackplane {
    inner: MemoryBackplane,
    failing: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
}

#[async_trait]
impl Backplane for FlakyBackplane {
    fn name(&self) -> &'static str {
        "flaky-memory"
    }
    fn node_id(&self) -> &str {
        self.inner.node_id()
    }
    async fn publish(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<(), BackplaneError> {
        if self.failing.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(BackplaneError::Unavailable("test outage".into()));
        }
        self.inner.publish(channel, message).await
    }
    async fn subscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        self.inner.subscribe(channels).await
    }
    async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        self.inner.unsubscribe(channels).await
    }
    fn is_ready(&self) -> bool {
        !self.failing.load(Ordering::SeqCst)
    }
    async fn append(&self, batch: &[FeedAppend]) -> Result<Vec<Appended>, BackplaneError> {
        if self.failing.load(Ordering::SeqCst) {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(BackplaneError::Unavailable("test outage".into()));
        }
        self.inner.append(batch).await
    }
    async fn history(
        &self,
        user: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackplaneError::Unavailable("test outage".into()));
        }
        self.inner.history(user, since, limit).await
    }
}

fn flaky(
    bus: &MemoryBus,
    failing: &Arc<AtomicBool>,
    failures: &Arc<AtomicU64>,
) -> BackplaneFactory {
    let (bus, failing, failures) = (bus.clone(), failing.clone(), failures.clone());
    Box::new(move |cfg, inbox| {
        Arc::new(FlakyBackplane {
            inner: MemoryBackplane::new(bus, cfg.node_id.clone(), inbox),
            failing,
            failures,
        })
    })
}

/// The backplane fails while a RabbitMQ event is processed: the message is nacked and
/// requeued (retried with backoff, never acked, never lost), and delivered to the user on
/// the other instance once the backplane is back, exactly once and before later events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_failure_requeues_and_delivers_later() {
    let Some(url) = rabbitmq().await else { return };
    let topo = Topo::new(&url, "bpfail").await;
    let bus = MemoryBus::new();
    let failing = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let a = start_node(
        Some(topo.config(&url)),
        Some(flaky(&bus, &failing, &failures)),
    )
    .await;
    let b = start_node(None, Some(memory(&bus))).await;
    a.wait_consuming().await;
    let user = unique_prefix("u");
    let mut c = b.client(&user).await;
    let key = format!("feed.{user}");
    topo.publish(&key, br#"{"n":0}"#, None).await;
    assert_eq!(next_feed(&mut c).await, serde_json::json!({"n":0}));

    failing.store(true, Ordering::SeqCst);
    topo.publish(&key, br#"{"n":1}"#, Some("e1")).await;
    topo.publish(&key, br#"{"n":2}"#, Some("e2")).await;
    within("two failed attempts (nack, requeue, retry)", async {
        while a.ingest.nacked() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(http_status(&a.server.base_url, "/readyz").await, 503);
    expect_quiet(
        &mut c,
        Duration::from_millis(300),
        "while the backplane fails",
    )
    .await;

    failing.store(false, Ordering::SeqCst);
    assert_eq!(
        next_feed(&mut c).await,
        serde_json::json!({"id":"e1","n":1})
    );
    assert_eq!(
        next_feed(&mut c).await,
        serde_json::json!({"id":"e2","n":2})
    );
    expect_quiet(&mut c, Duration::from_millis(300), "no duplicates").await;
    wait_status(&a.server.base_url, "/readyz", 200, Duration::from_secs(10)).await;
}

/// `POST /api/feed` answers 503 while the backplane publish fails, 202 again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_answers_503_when_the_backplane_fails() {
    let bus = MemoryBus::new();
    let failing = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let n = start_node(None, Some(flaky(&bus, &failing, &failures))).await;
    let body = r#"{"recipients":["1002"],"payload":{"a":1},"id":"h1"}"#;
    assert_eq!(post_feed(&n.server.base_url, body).await, 202);
    failing.store(true, Ordering::SeqCst);
    assert_eq!(post_feed(&n.server.base_url, body).await, 503);
    assert!(failures.load(Ordering::SeqCst) >= 1);
    failing.store(false, Ordering::SeqCst);
    assert_eq!(post_feed(&n.server.base_url, body).await, 202);
    // The body's id reaches clients inside the payload, as for RabbitMQ events.
    let mut c = n.client("1002").await;
    assert_eq!(post_feed(&n.server.base_url, body).await, 202);
    assert_eq!(
        next_feed(&mut c).await,
        serde_json::json!({"id":"h1","a":1})
    );
}

/// Counts FeedUpdated receipts of one client and checks per-user order (`seq` increasing).
async fn count_receipts(mut c: RawClient, expected: usize, total: Arc<AtomicU64>, ordered: bool) {
    let mut last: i64 = -1;
    for _ in 0..expected {
        let v = next_feed(&mut c).await;
        let seq = v["seq"].as_i64().expect("seq");
        if ordered {
            assert!(seq > last, "per-user order: {seq} after {last}");
        }
        last = seq;
        total.fetch_add(1, Ordering::Relaxed);
    }
}

async fn wait_total(total: &AtomicU64, want: u64, tasks: &mut Vec<tokio::task::JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while total.load(Ordering::Relaxed) < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} events received within 120 s",
            total.load(Ordering::Relaxed)
        );
        // A receiver that got all its events ends; one that panicked fails the test now.
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let t = tasks.swap_remove(i);
            if let Err(e) = t.await {
                panic!(
                    "a receiver failed at {} of {want} events: {e:?}",
                    total.load(Ordering::Relaxed)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn events(prefix: &str, users: usize, range: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            (
                format!("feed.{prefix}-{}", i % users),
                format!(r#"{{"seq":{i},"text":"event {i}"}}"#).into_bytes(),
            )
        })
        .collect()
}

/// Two measurements with 100 connected users: **drain** (20,000 events wait in the queue,
/// then the consumers start: feedhub's own consume-and-deliver rate) and **live** (20,000
/// more published while consuming: end to end, bounded by the test publisher).
async fn measure(instances: usize, label: &str, backplane: impl Fn() -> BackplaneFactory) {
    let Some(url) = rabbitmq().await else { return };
    const USERS: usize = 100;
    const EVENTS: usize = 20_000;
    let topo = Topo::new(&url, &format!("rate{instances}")).await;
    topo.declare_queue().await;
    let mut nodes = Vec::new();
    for _ in 0..instances {
        nodes.push(start_idle_node(Some(topo.config(&url)), Some(backplane())).await);
    }
    let prefix = unique_prefix("u");
    let total = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for u in 0..USERS {
        clients.push(nodes[u % instances].client(&format!("{prefix}-{u}")).await);
    }

    topo.publish_many(&events(&prefix, USERS, 0..EVENTS)).await;
    // Receivers start now: every wait for a frame is bounded, and nothing flows before the
    // consumers start.
    let mut tasks = Vec::new();
    for c in clients {
        // Per-user order holds with any number of instances (single active consumer).
        tasks.push(tokio::spawn(count_receipts(
            c,
            2 * EVENTS / USERS,
            total.clone(),
            true,
        )));
    }
    let started = Instant::now();
    for n in &nodes {
        n.start_consuming();
    }
    wait_total(&total, EVENTS as u64, &mut tasks).await;
    let drain = started.elapsed();
    let consumed_drain: Vec<u64> = nodes.iter().map(|n| n.ingest.consumed()).collect();

    let started = Instant::now();
    topo.publish_many(&events(&prefix, USERS, EVENTS..2 * EVENTS))
        .await;
    let published = started.elapsed();
    wait_total(&total, 2 * EVENTS as u64, &mut tasks).await;
    let live = started.elapsed();
    for t in tasks {
        within("receiver task", t).await.expect("receiver task");
    }
    let rate = |d: Duration| EVENTS as f64 / d.as_secs_f64();
    println!(
        "DELIVERY RATE drain ({instances} instance(s), {label}): {EVENTS} queued events to {USERS} users in {drain:?} = {:.0} events/s",
        rate(drain)
    );
    println!(
        "DELIVERY RATE live ({instances} instance(s), {label}): {EVENTS} events to {USERS} users in {live:?} = {:.0} events/s (the test publisher needed {published:?})",
        rate(live)
    );
    for (i, n) in nodes.iter().enumerate() {
        println!(
            "instance {i} consumed {} of the queued and {} of the live events",
            consumed_drain[i],
            n.ingest.consumed() - consumed_drain[i]
        );
    }
    let active = nodes.iter().filter(|n| n.ingest.consumed() > 0).count();
    assert_eq!(
        active, 1,
        "one instance (the single active consumer) consumed everything"
    );
}

/// Delivery rate from RabbitMQ publish to receipt at 100 connected clients, one instance;
/// per-user order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_rate_one_instance() {
    let bus = MemoryBus::new();
    measure(1, "memory bus", || memory(&bus)).await;
}

/// The same with two instances sharing the queue (in-memory bus between them): one is the
/// active consumer, events reach users on either instance, per-user order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_rate_two_instances_share_the_queue() {
    let bus = MemoryBus::new();
    measure(2, "memory bus", || memory(&bus)).await;
}

/// An existing queue declared with other arguments (no dead-letter exchange) is not used
/// silently: `/readyz` answers 503 naming the conflict, and the consumer keeps retrying.
/// An unreachable broker is reported the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_or_unreachable_broker_is_reported_not_ready() {
    let Some(url) = rabbitmq().await else { return };
    let topo = Topo::new(&url, "conflict").await;
    topo.ch
        .queue_declare(
            &topo.queue,
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare a conflicting queue");
    let n = start_node(Some(topo.config(&url)), None).await;
    let deadline = Instant::now() + support::WAIT;
    let text = loop {
        let text = http_text(&n.server.base_url, "/readyz").await;
        if text.contains("x-dead-letter-exchange") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("x-dead-letter-exchange"), "{text}");
    assert!(!n.ingest.is_consuming());

    // Nothing listens on this port.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr");
    drop(closed);
    let m = start_node(Some(topo.config(&proxied_url(&url, addr))), None).await;
    let deadline = Instant::now() + support::WAIT;
    let text = loop {
        let text = http_text(&m.server.base_url, "/readyz").await;
        if text.contains("not connected: connect") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.contains("RabbitMQ consumer not connected: connect"),
        "{text}"
    );
}

fn redis_backplane(url: &str) -> BackplaneFactory {
    let cfg = RedisConfig::from_url(url).expect("redis url");
    Box::new(move |c, inbox| RedisBackplane::new(cfg, c.node_id.clone(), inbox))
}

impl Node {
    async fn wait_backplane(&self) {
        within("backplane connected", async {
            while !self.server.server().backplane().is_ready() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

/// Receives `n` FeedUpdated payloads (in any order).
async fn receive_set(c: &mut RawClient, n: usize) -> Vec<serde_json::Value> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        got.push(next_feed(c).await);
    }
    got.sort_by_key(|v| v.to_string());
    got
}

fn sorted(mut v: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    v.sort_by_key(|v| v.to_string());
    v
}

/// A topology and two consuming instances on the shared Redis (`None`: SKIPPED).
async fn two_redis_consumers(name: &str) -> Option<(Topo, Node, Node)> {
    let url = rabbitmq().await?;
    support::cluster::redis().await?;
    let redis_url = support::cluster::redis_url();
    let topo = Topo::new(&url, name).await;
    let n0 = start_node(Some(topo.config(&url)), Some(redis_backplane(&redis_url))).await;
    let n1 = start_node(Some(topo.config(&url)), Some(redis_backplane(&redis_url))).await;
    for n in [&n0, &n1] {
        n.wait_backplane().await;
        n.wait_consuming().await;
    }
    Some((topo, n0, n1))
}

/// Two instances with the Redis backplane consume one RabbitMQ queue (one of them active at
/// a time): every event reaches all connections of its users on either instance (a user
/// with connections on both gets it on both), and nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_share_the_queue_and_reach_users_anywhere() {
    let Some((topo, n0, n1)) = two_redis_consumers("redis2").await else {
        return;
    };
    let p = unique_prefix("u");
    let (a, b, c, d) = (
        format!("{p}-a"),
        format!("{p}-b"),
        format!("{p}-c"),
        format!("{p}-d"),
    );
    let mut a0 = n0.client(&a).await;
    let mut a0b = n0.client(&a).await;
    let mut b1 = n1.client(&b).await;
    let mut c0 = n0.client(&c).await;
    let mut c1 = n1.client(&c).await;
    let mut d0 = n0.client(&d).await;
    let mut expected: HashMap<&str, Vec<serde_json::Value>> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..30 {
        let user = [&a, &b, &c][i % 3];
        let payload = serde_json::json!({ "i": i, "to": user });
        batch.push((format!("feed.{user}"), payload.to_string().into_bytes()));
        expected.entry(user.as_str()).or_default().push(payload);
    }
    let both = serde_json::json!({ "id": "all-three", "text": "to a, b and c" });
    batch.push((
        "feed".to_string(),
        serde_json::json!({ "recipients": [&a, &b, &c], "payload": {"text": "to a, b and c"}, "id": "all-three" })
            .to_string()
            .into_bytes(),
    ));
    for u in [&a, &b, &c] {
        expected.entry(u.as_str()).or_default().push(both.clone());
    }
    topo.publish_many(&batch).await;
    let want = |u: &str| sorted(expected[u].clone());
    assert_eq!(receive_set(&mut a0, 11).await, want(&a), "a on instance 0");
    assert_eq!(
        receive_set(&mut a0b, 11).await,
        want(&a),
        "a's second connection"
    );
    assert_eq!(receive_set(&mut b1, 11).await, want(&b), "b on instance 1");
    assert_eq!(receive_set(&mut c0, 11).await, want(&c), "c on instance 0");
    assert_eq!(receive_set(&mut c1, 11).await, want(&c), "c on instance 1");
    for (cl, who) in [
        (&mut a0, "a"),
        (&mut b1, "b"),
        (&mut c1, "c"),
        (&mut d0, "d"),
    ] {
        expect_quiet(cl, Duration::from_millis(300), who).await;
    }
    let (k0, k1) = (n0.ingest.consumed(), n1.ingest.consumed());
    println!("instance 0 consumed {k0}, instance 1 consumed {k1} of 31 events");
    assert_eq!(k0 + k1, 31);
    assert!(
        k0 == 0 || k1 == 0,
        "one active consumer (single active consumer queue)"
    );
}

/// Redis (a private `redis-server`) dies while RabbitMQ events arrive for a user on another
/// instance: the consuming instance nacks and requeues them (nothing acked, nothing lost)
/// and `/readyz` answers 503; after Redis is back they are delivered, once each, in order,
/// without the client reconnecting. (The consumer is held off RabbitMQ through the proxy
/// until the receiving instance has resubscribed: Redis pub/sub drops what is published
/// before a subscriber is back, which is outside this test's question.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_requeues_and_delivers_after_it_returns() {
    let Some(url) = rabbitmq().await else { return };
    let Some(mut redis) = support::cluster::PrivateRedis::start().await else {
        return;
    };
    let topo = Topo::new(&url, "redisdown").await;
    let proxy = Proxy::start(broker_addr(&url)).await;
    let a = start_node(
        Some(topo.config(&proxied_url(&url, proxy.addr))),
        Some(redis_backplane(&redis.url())),
    )
    .await;
    let b = start_node(None, Some(redis_backplane(&redis.url()))).await;
    a.wait_backplane().await;
    b.wait_backplane().await;
    a.wait_consuming().await;
    let user = unique_prefix("u");
    let mut c = b.client(&user).await;
    let key = format!("feed.{user}");
    topo.publish(&key, br#"{"n":0}"#, None).await;
    assert_eq!(next_feed(&mut c).await, serde_json::json!({"n":0}));

    redis.kill();
    wait_status(&a.server.base_url, "/readyz", 503, Duration::from_secs(5)).await;
    for i in 1..=3 {
        topo.publish(
            &key,
            format!(r#"{{"n":{i}}}"#).as_bytes(),
            Some(&format!("e{i}")),
        )
        .await;
    }
    within("a nack while Redis is down", async {
        while a.ingest.nacked() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(a.ingest.acked(), 1, "nothing acked during the outage");
    expect_quiet(
        &mut c,
        Duration::from_millis(300),
        "during the Redis outage",
    )
    .await;

    proxy.cut();
    redis.restart().await;
    b.wait_backplane().await;
    a.wait_backplane().await;
    wait_status(&b.server.base_url, "/readyz", 200, Duration::from_secs(10)).await;
    proxy.restore();
    for i in 1..=3 {
        assert_eq!(
            next_feed(&mut c).await,
            serde_json::json!({ "id": format!("e{i}"), "n": i }),
            "event {i} after Redis returned"
        );
    }
    expect_quiet(&mut c, Duration::from_millis(300), "no duplicates").await;
}

/// Delivery rate with the Redis backplane, one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_rate_one_instance_redis() {
    if support::cluster::redis().await.is_none() {
        return;
    }
    let url = support::cluster::redis_url();
    measure(1, "Redis backplane", || redis_backplane(&url)).await;
}

/// Delivery rate with the Redis backplane, two instances sharing the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_rate_two_instances_redis() {
    if support::cluster::redis().await.is_none() {
        return;
    }
    let url = support::cluster::redis_url();
    measure(2, "Redis backplane", || redis_backplane(&url)).await;
}

/// Receives exactly `expected` (the values of `"k"`, in this order) on `c`, counting each.
async fn expect_sequence(mut c: RawClient, expected: Vec<u64>, received: Arc<AtomicU64>) {
    for (i, want) in expected.iter().enumerate() {
        let v = next_feed(&mut c).await;
        assert_eq!(
            v["k"].as_u64(),
            Some(*want),
            "event {i} of this connection's user: got {v}, want k={want} (per-user order)"
        );
        received.fetch_add(1, Ordering::Relaxed);
    }
}

/// Issue 12 (per-user order across instances): two instances on Redis share the queue;
/// three users get 2,000 events each, in both message forms interleaved (a recipients
/// event names all three, in rotating order), and every connection (each user has one on
/// each instance) receives its user's events exactly in publish order: nothing missing,
/// nothing twice, nothing reordered. A quarter of the way through, the active consumer
/// stops (graceful shutdown): the other instance takes over the unacked rest and the second
/// half, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_instances_keep_per_user_order_in_both_forms() {
    let Some((topo, n0, n1)) = two_redis_consumers("order2").await else {
        return;
    };
    const PER_USER: usize = 2_000;
    let p = unique_prefix("u");
    let users: Vec<String> = (0..3).map(|i| format!("{p}-{i}")).collect();
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); users.len()];
    let mut messages = Vec::new();
    let mut k = 0u64;
    for j in 0..PER_USER / 2 {
        for (ui, u) in users.iter().enumerate() {
            messages.push((
                format!("feed.{u}"),
                serde_json::json!({ "k": k }).to_string().into_bytes(),
            ));
            expected[ui].push(k);
            k += 1;
        }
        let rotated: Vec<&String> = (0..users.len())
            .map(|x| &users[(j + x) % users.len()])
            .collect();
        messages.push((
            "feed".to_string(),
            serde_json::json!({ "recipients": rotated, "payload": { "k": k }, "id": format!("{p}-r{j}") })
                .to_string()
                .into_bytes(),
        ));
        for e in expected.iter_mut() {
            e.push(k);
        }
        k += 1;
    }
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (ui, u) in users.iter().enumerate() {
        for n in [&n0, &n1] {
            let c = n.client(u).await;
            tasks.push(tokio::spawn(expect_sequence(
                c,
                expected[ui].clone(),
                received.clone(),
            )));
        }
    }
    let total = (users.len() * 2 * PER_USER) as u64;
    let (first_half, second_half) = messages.split_at(messages.len() / 2);
    topo.publish_many(first_half).await;
    within("a quarter of the deliveries", async {
        while received.load(Ordering::Relaxed) < total / 4 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let (active, standby) = if n0.ingest.consumed() > 0 {
        (&n0, &n1)
    } else {
        (&n1, &n0)
    };
    assert_eq!(standby.ingest.consumed(), 0, "one active consumer");
    let at_stop = received.load(Ordering::Relaxed);
    active.ingest.stop().await;
    let stopped = Instant::now();
    topo.publish_many(second_half).await;
    wait_total(&received, total, &mut tasks).await;
    for t in tasks {
        within("receiver", t).await.expect("receiver");
    }
    println!(
        "per-user order: {} messages ({} deliveries to 6 connections) in order; the active instance stopped after {at_stop} deliveries, the other consumed {} messages, all in {:?} after the stop",
        messages.len(),
        total,
        standby.ingest.consumed(),
        stopped.elapsed()
    );
    assert!(
        standby.ingest.consumed() > 0,
        "the other instance took over"
    );
    assert_eq!(
        active.ingest.consumed() + standby.ingest.consumed(),
        messages.len() as u64,
        "each message consumed once (no redelivery after a graceful stop)"
    );
}

/// A feedhub binary (a child process: it can be killed with SIGKILL by its PID).
struct Instance {
    child: std::process::Child,
    base_url: String,
}

impl Instance {
    fn start(args: &[String]) -> Instance {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_feedhub"))
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn feedhub");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log to the end (a full pipe would block the child), reporting the
        // listen address once.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("feed hub at http://") {
                    let rest = &line[at + "feed hub at http://".len()..];
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                        .collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("feedhub logged its address");
        Instance {
            child,
            base_url: format!("http://{addr}"),
        }
    }

    /// `kill -9` (SIGKILL to this child's PID).
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn metric(&self, name: &str) -> u64 {
        let text = http_text(&self.base_url, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Issue 12 (failover): two feedhub binaries on Redis share the queue; while events to one
/// user are being published (no `message_id`: feedhub's stable `h:` ids), the active
/// consumer is killed with SIGKILL. The other instance takes over within 5 s; an observer
/// (a third instance, not consuming) receives every event, and after dropping repeated ids
/// in exactly publish order, with offsets 1..=N; a repeated event (if any) carries the same
/// id as its first delivery.
/// Prints the takeover time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_active_consumer_fails_over_without_loss_or_reordering() {
    let Some(url) = rabbitmq().await else { return };
    if support::cluster::redis().await.is_none() {
        return;
    }
    let redis_url = support::cluster::redis_url();
    let topo = Topo::new(&url, "kill9").await;
    topo.declare_queue().await;
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        &redis_url,
        "--amqp-url",
        &url,
        "--amqp-exchange",
        &topo.exchange,
        "--amqp-queue",
        &topo.queue,
        "--jwt-secret",
        TEST_SECRET,
        "--api-key",
        TEST_API_KEY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut first = Instance::start(&args);
    wait_status(&first.base_url, "/readyz", 200, Duration::from_secs(20)).await;
    let mut second = Instance::start(&args);
    wait_status(&second.base_url, "/readyz", 200, Duration::from_secs(20)).await;
    let observer = start_node(None, Some(redis_backplane(&redis_url))).await;
    observer.wait_backplane().await;
    let user = unique_prefix("u");
    let mut c = observer.client(&user).await;

    const N: usize = 4_000;
    let key = format!("feed.{user}");
    let publisher = {
        let (url, exchange, key) = (topo.url.clone(), topo.exchange.clone(), key.clone());
        tokio::spawn(async move {
            let conn = amqp_connect(&url).await.expect("publisher connect");
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirms");
            // As fast as the confirms allow, in chunks of 100: the consumer has a backlog
            // (unacked deliveries) when it is killed.
            for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
                let mut confirms = Vec::new();
                for i in chunk {
                    let body = format!(r#"{{"seq":{i}}}"#);
                    confirms.push(
                        ch.basic_publish(
                            &exchange,
                            &key,
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish"),
                    );
                }
                for c in confirms {
                    assert!(c.await.expect("confirm").is_ack());
                }
            }
            let _ = conn.close(200, "done").await;
        })
    };

    let mut seen = Seen::default();
    // Until a quarter is through, then kill the active consumer.
    while seen.order.len() < N / 4 {
        let v = within("events before the kill", next_feed_raw(&mut c)).await;
        seen.receive(&v);
    }
    let consumed = [
        first.metric("feedhub_amqp_consumed_total").await,
        second.metric("feedhub_amqp_consumed_total").await,
    ];
    assert!(
        consumed[0] == 0 || consumed[1] == 0,
        "one active consumer: {consumed:?}"
    );
    let (active, standby) = if consumed[0] > 0 {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let pid = active.child.id();
    active.kill9();
    let killed = Instant::now();
    let seen_at_kill = seen.order.len();
    // Takeover: the standby's first consumed delivery (its /metrics, polled).
    let takeover = within("the standby takes over", async {
        loop {
            if standby.metric("feedhub_amqp_consumed_total").await > 0 {
                return killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut first_new_after_kill = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.order.len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} distinct events within 60 s",
            seen.order.len()
        );
        let v = within("events after the kill", next_feed_raw(&mut c)).await;
        if seen.receive(&v) && first_new_after_kill.is_none() {
            first_new_after_kill = Some(killed.elapsed());
        }
    }
    within("publisher", publisher).await.expect("publisher");
    // Late repeats (none expected) are still checked for their ids.
    while let Ok(v) = tokio::time::timeout(Duration::from_millis(300), next_feed_raw(&mut c)).await
    {
        assert!(!seen.receive(&v), "no event beyond {N}");
    }
    let redelivered = standby.metric("feedhub_amqp_redelivered_total").await;
    println!(
        "kill -9 of pid {pid} after {seen_at_kill} events: the standby consumed its first delivery {takeover:?} after the kill; the observer's next new event came {:?} after it; {} repeated deliveries (same ids), {redelivered} deliveries flagged redelivered at the standby",
        first_new_after_kill.unwrap_or_default(),
        seen.repeats
    );
    assert!(
        takeover < Duration::from_secs(5),
        "takeover within 5 s (took {takeover:?})"
    );
    assert_eq!(
        seen.order,
        (0..N as u64).collect::<Vec<_>>(),
        "after dropping repeated ids: every event once, in publish order"
    );
    assert_eq!(
        seen.offsets,
        (1..=N as u64).collect::<Vec<_>>(),
        "offsets 1..=N: each event appended once (redeliveries recognized by id)"
    );
}

/// Events one client received, deduplicated by id.
#[derive(Default)]
struct Seen {
    /// `seq` -> the event's id.
    ids: HashMap<u64, String>,
    /// Every id seen.
    all: std::collections::HashSet<String>,
    /// `seq`s in the order of their first delivery.
    order: Vec<u64>,
    /// Their history offsets.
    offsets: Vec<u64>,
    /// Deliveries of an id seen before.
    repeats: usize,
}

impl Seen {
    /// Records one delivery; true when its id is new.
    fn receive(&mut self, v: &serde_json::Value) -> bool {
        let seq = v["seq"].as_u64().expect("seq");
        let id = v["id"].as_str().expect("id").to_string();
        assert!(id.starts_with("h:"), "stable id {id}");
        if let Some(was) = self.ids.get(&seq) {
            assert_eq!(was, &id, "a repeated event carries the same id");
            self.repeats += 1;
            return false;
        }
        assert!(self.all.insert(id.clone()), "distinct events, distinct ids");
        self.ids.insert(seq, id);
        self.order.push(seq);
        self.offsets.push(v["offset"].as_u64().expect("offset"));
        true
    }
}
