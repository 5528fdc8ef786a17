//! The benchmark load generator: opens N WebSocket clients against feedhub (SignalR JSON or
//! MessagePack), the bare WebSocket peer (`ws`) or the Socket.IO peer (`socketio`), publishes
//! feed events at set rates through Redis, RabbitMQ or feedhub's HTTP API, and measures
//! end-to-end latency (publish timestamp in the payload → receipt) in an HDR histogram.
//!
//! - SignalR clients do what `@microsoft/signalr` does over WebSockets: `POST
//!   <hub>/negotiate?negotiateVersion=1` with the bearer token, then the WebSocket to
//!   `<hub>?id=<connectionToken>&access_token=<jwt>`, the handshake, a keep-alive Ping every
//!   15 s, and reconnection after a Close with `allowReconnect` (storm scenario).
//! - Socket.IO clients speak engine.io v4 over a WebSocket
//!   (`/socket.io/?EIO=4&transport=websocket`): `0{...}` open, `40` connect, `2`→`3` pong,
//!   `42["feed",{...}]` events.
//! - Every socket is bound to one of many 127.0.0.x source addresses before connecting, so
//!   one load generator can exceed the 64k ephemeral-port limit of one address pair.
//! - It raises its own `RLIMIT_NOFILE` to the hard limit and prints how to raise the
//!   server's.
//!
//! Scenarios (`--scenario`): `idle` (density and idle CPU), `publish` (fan-out steps or fixed
//! rates, latency percentiles per step), `broadcast` (one event to every connection, time
//! until the last receipt), `storm` (connect rate; with `--wait-restart`, time until every
//! client is back after a server restart), `churn` (connect/disconnect cycles, RSS before and
//! after, leaked Redis subscriptions). The summary is printed and written as JSON (`--json`).
//!
//! ```sh
//! cargo run --release --example loadgen -- --mode signalr-json \
//!   --url http://127.0.0.1:5000/hubs/feed --jwt-secret feedhub-bench-secret-of-at-least-32-bytes --conns 1000 --users 200 \
//!   --scenario publish --publisher http --api-key k --rates 2000,5000 --server-pid 1234
//! ```

#[path = "../bench/support/procstat.rs"]
mod procstat;
#[path = "../bench/support/resp.rs"]
mod resp;
#[path = "../bench/support/signalr.rs"]
mod signalr;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use feedhub::protocol::{HubMessage, ProtocolKind};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::json;
use signalr::{parse_endpoint, parse_response_head, urlencode, Endpoint, Ws};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// SignalR, JSON hub protocol.
    SignalrJson,
    /// SignalR, MessagePack hub protocol.
    SignalrMsgpack,
    /// Raw WebSocket (`?user=ID`), payload = frame.
    Ws,
    /// Socket.IO (engine.io v4 over WebSocket).
    Socketio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Publish,
    Broadcast,
    Storm,
    Churn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PublisherKind {
    /// `PUBLISH feed-<user> <json>` (feedhub with Redis, bare peer).
    Redis,
    /// `@socket.io/redis-emitter` messages on `socket.io#/#<user>#`.
    Socketio,
    /// RabbitMQ exchange `FeedUpdate`, routing key `feed.<user>`.
    Amqp,
    /// feedhub's `POST /api/feed` (pipelined on one keep-alive connection).
    Http,
}

/// Load generator for feedhub and its benchmark peers.
#[derive(Debug, Parser)]
#[command(name = "loadgen")]
pub struct Args {
    /// Client protocol.
    #[arg(long, value_enum, default_value = "signalr-json")]
    mode: Mode,
    /// Endpoint(s), comma-separated; connections are spread round-robin per user
    /// (e.g. http://127.0.0.1:5000/hubs/feed, http://127.0.0.1:5101/ws,
    /// http://127.0.0.1:5201/socket.io/).
    #[arg(long, value_delimiter = ',', required = true)]
    url: Vec<String>,
    /// Connections.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Users the connections are spread over (connection i belongs to user i mod users).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// User id prefix (default: random, so runs never share Redis channels).
    #[arg(long)]
    user_prefix: Option<String>,
    /// Connections opened per second (0: as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    connect_rate: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+N).
    #[arg(long, default_value_t = 32)]
    source_ips: u8,
    /// HS256 secret to mint client JWTs (SignalR modes).
    #[arg(long, default_value = "feedhub-bench-secret-of-at-least-32-bytes")]
    jwt_secret: String,
    /// Client keep-alive interval (SignalR Ping / WebSocket ping), seconds.
    #[arg(long, default_value_t = 15)]
    ping_secs: u64,
    /// Server processes to measure (RSS, CPU), comma-separated.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// What to run.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Write the summary JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// How events are published (publish and broadcast scenarios).
    #[arg(long, value_enum, default_value = "redis")]
    publisher: PublisherKind,
    /// Redis URL (publishers, subscription checks).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// RabbitMQ URL (amqp publisher).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// RabbitMQ exchange (amqp publisher).
    #[arg(long, default_value = "FeedUpdate")]
    amqp_exchange: String,
    /// API key for the http publisher.
    #[arg(long, default_value = "feedhub-bench-key")]
    api_key: String,
    /// Delivery rates to step through (deliveries per second), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5000,10000,20000,40000,80000"
    )]
    rates: Vec<f64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 8.0)]
    step_secs: f64,
    /// A step passes when p99 is at most this (ms) and ≥ 99% of deliveries arrived.
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// Keep stepping after a failed step.
    #[arg(long)]
    no_stop: bool,
    /// Approximate payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Idle scenario: seconds of idle measurement (keep-alive running).
    #[arg(long, default_value_t = 30.0)]
    idle_secs: f64,
    /// Broadcast scenario: repetitions.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Churn scenario: connect/disconnect cycles.
    #[arg(long, default_value_t = 100_000)]
    cycles: usize,
    /// Storm scenario: after connecting, print READY and wait until every client has
    /// reconnected after the server restarts.
    #[arg(long)]
    wait_restart: bool,
    /// Overall deadline for waits (connect, reconnect, drain), seconds.
    #[arg(long, default_value_t = 180.0)]
    timeout_secs: f64,
}

/// What the payload carries: publish time (µs since the epoch) and the step slot.
#[derive(Debug, Deserialize)]
struct Stamp {
    t: u64,
    k: u32,
}

const SLOTS: usize = 64;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counters and histograms shared by every connection.
struct Stats {
    connected: AtomicUsize,
    connect_ok: AtomicU64,
    connect_failed: AtomicU64,
    disconnects: AtomicU64,
    protocol_errors: AtomicU64,
    received: Vec<AtomicU64>,
    hist: Vec<Mutex<Histogram<u64>>>,
    first_disconnect: Mutex<Option<Instant>>,
    last_reconnect: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            connected: AtomicUsize::new(0),
            connect_ok: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            received: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hist: (0..SLOTS)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("hist")))
                .collect(),
            first_disconnect: Mutex::new(None),
            last_reconnect: Mutex::new(None),
            last_error: Mutex::new(None),
        }
    }

    fn record(&self, stamps: &[(u64, u32)]) {
        if stamps.is_empty() {
            return;
        }
        let now = now_micros();
        let slot = (stamps[0].1 as usize).min(SLOTS - 1);
        self.received[slot].fetch_add(stamps.len() as u64, Ordering::Relaxed);
        let mut h = self.hist[slot].lock().unwrap_or_else(|e| e.into_inner());
        for (t, k) in stamps {
            if *k as usize != slot {
                drop(h);
                self.record_one(now, *t, *k);
                h = self.hist[slot].lock().unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let _ = h.record(now.saturating_sub(*t).max(1));
        }
    }

    fn record_one(&self, now: u64, t: u64, k: u32) {
        let slot = (k as usize).min(SLOTS - 1);
        let mut h = self.hist[slot].lock().unwrap_or_else(|e| e.into_inner());
        let _ = h.record(now.saturating_sub(t).max(1));
    }

    fn error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    fn slot_summary(&self, slot: usize) -> serde_json::Value {
        let h = self.hist[slot].lock().unwrap_or_else(|e| e.into_inner());
        let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "received": self.received[slot].load(Ordering::Relaxed),
            "p50_ms": ms(h.value_at_quantile(0.5)),
            "p90_ms": ms(h.value_at_quantile(0.9)),
            "p99_ms": ms(h.value_at_quantile(0.99)),
            "p999_ms": ms(h.value_at_quantile(0.999)),
            "max_ms": ms(h.max()),
            "mean_ms": (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        })
    }
}

/// Everything a connection needs.
struct Ctx {
    args: Args,
    stats: Stats,
    prefix: String,
    source_seq: AtomicUsize,
    /// Storm: reconnect after a drop.
    reconnect: AtomicBool,
    stop: AtomicBool,
    auth: feedhub::auth::Authenticator,
}

impl Ctx {
    fn user(&self, i: usize) -> String {
        format!("{}{}", self.prefix, i % self.args.users.max(1))
    }

    /// Endpoint for connection `i`: the k-th connection of a user goes to url k mod len, so
    /// every user is spread over all instances.
    fn url_for(&self, i: usize) -> &str {
        let n = self.args.url.len();
        &self.args.url[(i / self.args.users.max(1)) % n]
    }

    fn source_ip(&self) -> Ipv4Addr {
        let n = self.source_seq.fetch_add(1, Ordering::Relaxed);
        let k = self.args.source_ips.max(1) as usize;
        Ipv4Addr::new(127, 0, 0, 2 + (n % k) as u8)
    }
}

async fn ws_connect(ctx: &Ctx, ep: &Endpoint, path_and_query: &str) -> anyhow::Result<Ws> {
    signalr::ws_connect(Some(ctx.source_ip()), ep, path_and_query).await
}

/// A connected client, ready to receive.
struct Client {
    ws: Ws,
    buf: BytesMut,
}

/// Connects client `i` the way the mode's official client does.
async fn connect(ctx: &Ctx, i: usize) -> anyhow::Result<Client> {
    let ep = parse_endpoint(ctx.url_for(i))?;
    let user = ctx.user(i);
    match ctx.args.mode {
        Mode::SignalrJson | Mode::SignalrMsgpack => {
            let token = ctx
                .auth
                .issue(&user, 24 * 3600)
                .map_err(|e| anyhow!("token: {e}"))?;
            let neg = signalr::negotiate(Some(ctx.source_ip()), &ep, &token, false).await?;
            let pq = signalr::connect_path(&ep, &neg.token, &token);
            let mut ws = ws_connect(ctx, &ep, &pq).await?;
            let buf = signalr::ws_handshake(&mut ws, protocol_of(ctx.args.mode), 1).await?;
            Ok(Client { ws, buf })
        }
        Mode::Ws => {
            let pq = format!("{}?user={}", ep.path, urlencode(&user));
            let ws = ws_connect(ctx, &ep, &pq).await?;
            Ok(Client {
                ws,
                buf: BytesMut::new(),
            })
        }
        Mode::Socketio => {
            let sep = if ep.path.contains('?') { '&' } else { '?' };
            let pq = format!(
                "{}{sep}EIO=4&transport=websocket&user={}",
                ep.path,
                urlencode(&user)
            );
            let mut ws = ws_connect(ctx, &ep, &pq).await?;
            let mut opened = false;
            loop {
                let msg = ws
                    .next()
                    .await
                    .ok_or_else(|| anyhow!("closed during socket.io connect"))??;
                let Message::Text(t) = msg else { continue };
                let t = t.as_str();
                if t.starts_with('0') && !opened {
                    opened = true;
                    ws.send(Message::Text("40".into())).await?;
                } else if t.starts_with("40") {
                    break;
                } else if t.starts_with("44") {
                    bail!("socket.io connect error: {t}");
                } else if t == "2" {
                    ws.send(Message::Text("3".into())).await?;
                }
            }
            Ok(Client {
                ws,
                buf: BytesMut::new(),
            })
        }
    }
}

fn protocol_of(mode: Mode) -> ProtocolKind {
    match mode {
        Mode::SignalrMsgpack => ProtocolKind::MessagePack,
        _ => ProtocolKind::Json,
    }
}

/// Why a receive loop ended.
enum End {
    /// Server closed (may reconnect).
    Dropped,
    /// We were told to stop.
    Stopped,
}

/// Receives until the connection ends, recording latencies and keeping the connection
/// alive.
async fn receive(ctx: &Ctx, client: &mut Client) -> End {
    let protocol = protocol_of(ctx.args.mode);
    let mut ping = Vec::new();
    let _ = protocol.encode(&HubMessage::Ping, &mut ping);
    let period = Duration::from_secs(ctx.args.ping_secs.max(1));
    // Spread the keep-alives of many clients over the whole period.
    let offset = Duration::from_millis(rand::random::<u64>() % period.as_millis().max(1) as u64);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    let mut stamps: Vec<(u64, u32)> = Vec::new();
    let mut stop_check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = client.ws.next() => {
                let msg = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => { ctx.stats.error(format!("receive: {e}")); return End::Dropped }
                    None => return End::Dropped,
                };
                stamps.clear();
                match ctx.args.mode {
                    Mode::SignalrJson | Mode::SignalrMsgpack => {
                        match msg {
                            Message::Text(t) => client.buf.extend_from_slice(t.as_bytes()),
                            Message::Binary(b) => client.buf.extend_from_slice(&b),
                            Message::Close(_) => return End::Dropped,
                            _ => continue,
                        }
                        loop {
                            match protocol.decode(&mut client.buf, 16 << 20) {
                                Ok(Some(HubMessage::Invocation(inv))) => {
                                    if let Some(Ok(s)) = inv.arguments.first().map(|a| a.decode::<Stamp>()) {
                                        stamps.push((s.t, s.k));
                                    } else {
                                        ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Ok(Some(HubMessage::Close(c))) => {
                                    if let Some(e) = c.error { ctx.stats.error(format!("server Close: {e}")); }
                                    return End::Dropped;
                                }
                                Ok(Some(_)) => {}
                                Ok(None) => break,
                                Err(e) => {
                                    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                                    ctx.stats.error(format!("decode: {e}"));
                                    client.buf.clear();
                                    break;
                                }
                            }
                        }
                    }
                    Mode::Ws => match msg {
                        Message::Text(t) => match serde_json::from_str::<Stamp>(t.as_str()) {
                            Ok(s) => stamps.push((s.t, s.k)),
                            Err(_) => { ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed); }
                        },
                        Message::Close(_) => return End::Dropped,
                        _ => {}
                    },
                    Mode::Socketio => match msg {
                        Message::Text(t) => {
                            let t = t.as_str();
                            if t == "2" {
                                if client.ws.send(Message::Text("3".into())).await.is_err() { return End::Dropped; }
                            } else if let Some(body) = t.strip_prefix("42") {
                                match serde_json::from_str::<(String, Stamp)>(body) {
                                    Ok((_, s)) => stamps.push((s.t, s.k)),
                                    Err(_) => { ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed); }
                                }
                            } else if t.starts_with('1') || t.starts_with("41") {
                                return End::Dropped;
                            }
                        }
                        Message::Close(_) => return End::Dropped,
                        _ => {}
                    },
                }
                ctx.stats.record(&stamps);
            }
            _ = keepalive.tick() => {
                let r = match ctx.args.mode {
                    Mode::SignalrJson => client.ws.send(Message::Text(String::from_utf8_lossy(&ping).into_owned().into())).await,
                    Mode::SignalrMsgpack => client.ws.send(Message::Binary(ping.clone().into())).await,
                    Mode::Ws => client.ws.send(Message::Ping(Default::default())).await,
                    // engine.io: the server pings, the client answers.
                    Mode::Socketio => Ok(()),
                };
                if r.is_err() { return End::Dropped; }
            }
            _ = stop_check.tick() => {
                if ctx.stop.load(Ordering::Relaxed) {
                    let _ = client.ws.close(None).await;
                    return End::Stopped;
                }
            }
        }
    }
}

/// A long-lived client: connect (retrying under `--wait-restart`), receive, reconnect.
async fn client_task(ctx: Arc<Ctx>, i: usize, permit: tokio::sync::OwnedSemaphorePermit) {
    let mut permit = Some(permit);
    let mut was_connected = false;
    let deadline = Instant::now() + Duration::from_secs_f64(ctx.args.timeout_secs * 2.0);
    loop {
        if ctx.stop.load(Ordering::Relaxed) {
            return;
        }
        match connect(&ctx, i).await {
            Ok(mut client) => {
                ctx.stats.connect_ok.fetch_add(1, Ordering::Relaxed);
                ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
                drop(permit.take());
                if was_connected {
                    *ctx.stats
                        .last_reconnect
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                }
                was_connected = true;
                let end = receive(&ctx, &mut client).await;
                ctx.stats.connected.fetch_sub(1, Ordering::Relaxed);
                match end {
                    End::Stopped => return,
                    End::Dropped => {
                        ctx.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        let mut first = ctx
                            .stats
                            .first_disconnect
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        if first.is_none() {
                            *first = Some(Instant::now());
                        }
                    }
                }
                if !ctx.reconnect.load(Ordering::Relaxed) {
                    return;
                }
                // Like withAutomaticReconnect's immediate first retry, with jitter so
                // that 10k clients do not arrive in the same millisecond.
                tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 250)).await;
            }
            Err(e) => {
                ctx.stats.connect_failed.fetch_add(1, Ordering::Relaxed);
                ctx.stats.error(format!("connect: {e:#}"));
                drop(permit.take());
                if !(was_connected && ctx.reconnect.load(Ordering::Relaxed))
                    || Instant::now() > deadline
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100 + rand::random::<u64>() % 200)).await;
            }
        }
    }
}

/// Opens `n` long-lived clients at the configured rate; returns once each attempt has
/// finished connecting or failed (or the deadline passed), with the elapsed time.
async fn open_clients(ctx: &Arc<Ctx>, n: usize) -> Duration {
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(ctx.args.connect_concurrency.max(1)));
    let rate = ctx.args.connect_rate;
    for i in 0..n {
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        tokio::spawn(client_task(ctx.clone(), i, permit));
    }
    // All attempts finished once every permit is back.
    let deadline = Duration::from_secs_f64(ctx.args.timeout_secs);
    let all = sem.acquire_many(ctx.args.connect_concurrency.max(1) as u32);
    let _ = tokio::time::timeout(deadline, all).await;
    started.elapsed()
}

fn server_sample(ctx: &Ctx) -> procstat::Sample {
    procstat::sample_all(&ctx.args.server_pid)
}

fn client_sample() -> procstat::Sample {
    procstat::sample("self").unwrap_or_default()
}

/// The payload JSON text for slot `k`.
fn payload(ctx: &Ctx, k: u32) -> String {
    let head = format!("{{\"t\":{},\"k\":{k},\"p\":\"", now_micros());
    let pad = ctx.args.payload_bytes.saturating_sub(head.len() + 2).max(1);
    format!("{head}{}\"}}", "x".repeat(pad))
}

// ---------------------------------------------------------------------------------------
// Publishers

enum Publisher {
    Resp {
        writer: tokio::net::tcp::OwnedWriteHalf,
        replies: Arc<AtomicU64>,
        receivers: Arc<AtomicU64>,
        socketio: bool,
        emitter_uid: String,
    },
    Http {
        writer: tokio::net::tcp::OwnedWriteHalf,
        replies: Arc<AtomicU64>,
        failures: Arc<AtomicU64>,
        host: String,
        path: String,
        key: String,
    },
    Amqp {
        channel: lapin::Channel,
        exchange: String,
    },
}

impl Publisher {
    async fn new(ctx: &Ctx) -> anyhow::Result<Publisher> {
        match ctx.args.publisher {
            PublisherKind::Redis | PublisherKind::Socketio => {
                let stream = resp::connect(&ctx.args.redis_url).await?;
                let (rd, writer) = stream.into_split();
                let replies = Arc::new(AtomicU64::new(0));
                let receivers = Arc::new(AtomicU64::new(0));
                let (r2, v2) = (replies.clone(), receivers.clone());
                tokio::spawn(async move {
                    let mut reader = resp::Reader::new(rd);
                    while let Ok(reply) = reader.next().await {
                        if let resp::Reply::Int(n) = reply {
                            v2.fetch_add(n.max(0) as u64, Ordering::Relaxed);
                        }
                        r2.fetch_add(1, Ordering::Relaxed);
                    }
                });
                Ok(Publisher::Resp {
                    writer,
                    replies,
                    receivers,
                    socketio: ctx.args.publisher == PublisherKind::Socketio,
                    emitter_uid: "emitter".to_string(),
                })
            }
            PublisherKind::Http => {
                let ep = parse_endpoint(&ctx.args.url[0])?;
                let stream = TcpStream::connect(ep.addr).await?;
                stream.set_nodelay(true)?;
                let (mut rd, writer) = stream.into_split();
                let replies = Arc::new(AtomicU64::new(0));
                let failures = Arc::new(AtomicU64::new(0));
                let (r2, f2) = (replies.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut buf = BytesMut::with_capacity(64 * 1024);
                    loop {
                        match parse_response_head(&buf) {
                            Ok(Some(head)) => {
                                let (status, start) = (head.status, head.body_start);
                                let len = head.content_length.unwrap_or(0);
                                if buf.len() >= start + len {
                                    if status != 202 && status != 200 {
                                        f2.fetch_add(1, Ordering::Relaxed);
                                        eprintln!(
                                            "publish API: HTTP {status}: {}",
                                            String::from_utf8_lossy(&buf[start..start + len])
                                        );
                                    }
                                    r2.fetch_add(1, Ordering::Relaxed);
                                    buf.advance(start + len);
                                    continue;
                                }
                            }
                            Ok(None) => {}
                            Err(_) => return,
                        }
                        buf.reserve(64 * 1024);
                        match rd.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                });
                let path = ep
                    .path
                    .find("/hubs/")
                    .map(|i| ep.path[..i].to_string())
                    .unwrap_or_default();
                Ok(Publisher::Http {
                    writer,
                    replies,
                    failures,
                    host: ep.host,
                    path: format!("{path}/api/feed"),
                    key: ctx.args.api_key.clone(),
                })
            }
            PublisherKind::Amqp => {
                let props = lapin::ConnectionProperties::default()
                    .with_connection_name("feedhub-loadgen".into())
                    .with_executor(tokio_executor_trait::Tokio::current())
                    .with_reactor(tokio_reactor_trait::Tokio::current());
                let conn = lapin::Connection::connect(&ctx.args.amqp_url, props).await?;
                let channel = conn.create_channel().await?;
                // The connection must outlive the channel.
                std::mem::forget(conn);
                Ok(Publisher::Amqp {
                    channel,
                    exchange: ctx.args.amqp_exchange.clone(),
                })
            }
        }
    }

    /// Publishes one event per entry: (recipients, payload JSON). An empty recipient list
    /// means "everyone" (Socket.IO broadcast).
    async fn publish(&mut self, events: &[(Vec<String>, String)]) -> anyhow::Result<()> {
        match self {
            Publisher::Resp {
                writer,
                socketio,
                emitter_uid,
                ..
            } => {
                let mut out = Vec::with_capacity(events.len() * 160);
                for (users, body) in events {
                    if *socketio {
                        let channel = match users.as_slice() {
                            [one] => format!("socket.io#/#{one}#"),
                            _ => "socket.io#/#".to_string(),
                        };
                        let msg = emitter_message(emitter_uid, users, body)?;
                        resp::encode(&[b"PUBLISH", channel.as_bytes(), &msg], &mut out);
                    } else {
                        for u in users {
                            let channel = format!("feed-{u}");
                            resp::encode(
                                &[b"PUBLISH", channel.as_bytes(), body.as_bytes()],
                                &mut out,
                            );
                        }
                    }
                }
                writer.write_all(&out).await?;
            }
            Publisher::Http {
                writer,
                host,
                path,
                key,
                ..
            } => {
                let mut out = Vec::with_capacity(events.len() * 300);
                for (users, body) in events {
                    let recipients = serde_json::to_string(users)?;
                    let json = format!("{{\"recipients\":{recipients},\"payload\":{body}}}");
                    out.extend_from_slice(
                        format!(
                            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                            json.len()
                        )
                        .as_bytes(),
                    );
                    out.extend_from_slice(json.as_bytes());
                }
                writer.write_all(&out).await?;
            }
            Publisher::Amqp { channel, exchange } => {
                for (users, body) in events {
                    for u in users {
                        let _confirm = channel
                            .basic_publish(
                                exchange.as_str(),
                                format!("feed.{u}").as_str(),
                                lapin::options::BasicPublishOptions::default(),
                                body.as_bytes(),
                                lapin::BasicProperties::default()
                                    .with_content_type("application/json".into()),
                            )
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        match self {
            Publisher::Resp {
                replies, receivers, ..
            } => json!({
                "redis_replies": replies.load(Ordering::Relaxed),
                "redis_receivers": receivers.load(Ordering::Relaxed),
            }),
            Publisher::Http {
                replies, failures, ..
            } => json!({
                "http_replies": replies.load(Ordering::Relaxed),
                "http_failures": failures.load(Ordering::Relaxed),
            }),
            Publisher::Amqp { .. } => json!({}),
        }
    }
}

/// What `@socket.io/redis-emitter` publishes: msgpack `[uid, packet, opts]` with an EVENT
/// packet `{type: 2, data: ["feed", payload], nsp: "/"}`.
fn emitter_message(uid: &str, rooms: &[String], body: &str) -> anyhow::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Packet<'a> {
        #[serde(rename = "type")]
        kind: u8,
        data: (&'a str, serde_json::Value),
        nsp: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Opts<'a> {
        rooms: &'a [String],
        except: [u8; 0],
        flags: std::collections::BTreeMap<String, bool>,
    }
    let payload: serde_json::Value = serde_json::from_str(body)?;
    let msg = (
        uid,
        Packet {
            kind: 2,
            data: ("feed", payload),
            nsp: "/",
        },
        Opts {
            rooms,
            except: [],
            flags: Default::default(),
        },
    );
    Ok(rmp_serde::to_vec_named(&msg)?)
}

// ---------------------------------------------------------------------------------------
// Scenarios

async fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

fn connect_summary(ctx: &Ctx, n: usize, took: Duration) -> serde_json::Value {
    let ok = ctx.stats.connected.load(Ordering::Relaxed);
    json!({
        "requested": n,
        "connected": ok,
        "failed": ctx.stats.connect_failed.load(Ordering::Relaxed),
        "secs": took.as_secs_f64(),
        "per_sec": ok as f64 / took.as_secs_f64().max(1e-9),
        "last_error": ctx.stats.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    })
}

async fn scenario_idle(ctx: &Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let n = ctx.args.conns;
    let before = server_sample(ctx);
    let client_before = client_sample();
    let took = open_clients(ctx, n).await;
    let connect = connect_summary(ctx, n, took);
    eprintln!("idle: connected {connect}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = server_sample(ctx);
    let client_after = client_sample();
    let connected = ctx.stats.connected.load(Ordering::Relaxed);
    let idle = Duration::from_secs_f64(ctx.args.idle_secs);
    let cpu0 = server_sample(ctx);
    let ccpu0 = client_sample();
    let load0 = procstat::loadavg();
    tokio::time::sleep(idle).await;
    let cpu1 = server_sample(ctx);
    let ccpu1 = client_sample();
    let still = ctx.stats.connected.load(Ordering::Relaxed);
    let per_conn = |a: u64, b: u64| {
        if connected == 0 {
            0.0
        } else {
            (a as f64 - b as f64) / connected as f64
        }
    };
    Ok(json!({
        "connect": connect,
        "connected": connected,
        "still_connected_after_idle": still,
        "server_rss_before_kib": before.rss_kib,
        "server_rss_after_kib": after.rss_kib,
        "server_rss_per_conn_kib": per_conn(after.rss_kib, before.rss_kib),
        "client_rss_per_conn_kib": per_conn(client_after.rss_kib, client_before.rss_kib),
        "idle_secs": idle.as_secs_f64(),
        "server_idle_cpu_pct": (cpu1.cpu_secs - cpu0.cpu_secs) / idle.as_secs_f64() * 100.0,
        "client_idle_cpu_pct": (ccpu1.cpu_secs - ccpu0.cpu_secs) / idle.as_secs_f64() * 100.0,
        "server_connect_cpu_secs": after.cpu_secs - before.cpu_secs,
        "loadavg": [load0, procstat::loadavg()],
    }))
}

/// How many connections user index `u` has.
fn conns_of(ctx: &Ctx, u: usize) -> u64 {
    let users = ctx.args.users.max(1);
    let n = ctx.args.conns;
    (n / users + usize::from(u < n % users)) as u64
}

async fn scenario_publish(ctx: &Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let n = ctx.args.conns;
    let took = open_clients(ctx, n).await;
    let connect = connect_summary(ctx, n, took);
    eprintln!("publish: connected {connect}");
    if ctx.stats.connected.load(Ordering::Relaxed) == 0 {
        bail!("no client connected: {connect}");
    }
    let mut publisher = Publisher::new(ctx).await?;
    // Subscriptions settle (feedhub subscribes on the first connection of a user).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let users = ctx.args.users.max(1);
    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    for (i, &rate) in ctx.args.rates.iter().enumerate() {
        let slot = (i + 1).min(SLOTS - 1) as u32;
        let per_event = n as f64 / users as f64;
        let events_per_sec = rate / per_event;
        let step = Duration::from_secs_f64(ctx.args.step_secs);
        let s0 = server_sample(ctx);
        let c0 = client_sample();
        let load0 = procstat::loadavg();
        let start = Instant::now();
        let mut published: u64 = 0;
        let mut expected: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut behind = false;
        while start.elapsed() < step {
            tick.tick().await;
            let due = (events_per_sec * start.elapsed().as_secs_f64()) as u64;
            let count = due.saturating_sub(published).min(20_000);
            if count == 0 {
                continue;
            }
            let mut batch = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let u = rand::random::<u64>() as usize % users;
                expected += conns_of(ctx, u);
                batch.push((vec![format!("{}{u}", ctx.prefix)], payload(ctx, slot)));
            }
            publisher.publish(&batch).await?;
            published += count;
            if due.saturating_sub(published) > events_per_sec as u64 / 2 {
                behind = true;
            }
        }
        let elapsed = start.elapsed();
        let s1 = server_sample(ctx);
        let c1 = client_sample();
        // Drain: wait for stragglers (bounded).
        let slot_us = slot as usize;
        wait_until(Duration::from_secs(3), || {
            ctx.stats.received[slot_us].load(Ordering::Relaxed) >= expected
        })
        .await;
        let mut summary = ctx.stats.slot_summary(slot_us);
        let received = ctx.stats.received[slot_us].load(Ordering::Relaxed);
        let p99 = summary["p99_ms"].as_f64().unwrap_or(f64::MAX);
        let server_cpu = s1.cpu_secs - s0.cpu_secs;
        let achieved = received as f64 / elapsed.as_secs_f64();
        let pass = p99 <= ctx.args.p99_limit_ms
            && received as f64 >= expected as f64 * 0.99
            && !behind
            && expected > 0;
        let obj = summary.as_object_mut().expect("object");
        obj.insert("target_per_sec".into(), json!(rate));
        obj.insert("events_published".into(), json!(published));
        obj.insert("expected".into(), json!(expected));
        obj.insert("achieved_per_sec".into(), json!(achieved));
        obj.insert("secs".into(), json!(elapsed.as_secs_f64()));
        obj.insert("server_cpu_secs".into(), json!(server_cpu));
        obj.insert(
            "server_cpu_pct".into(),
            json!(server_cpu / elapsed.as_secs_f64() * 100.0),
        );
        obj.insert("client_cpu_secs".into(), json!(c1.cpu_secs - c0.cpu_secs));
        obj.insert(
            "deliveries_per_server_cpu_sec".into(),
            json!(received as f64 / server_cpu.max(1e-6)),
        );
        obj.insert("server_rss_kib".into(), json!(s1.rss_kib));
        obj.insert("publisher_behind".into(), json!(behind));
        obj.insert("loadavg".into(), json!([load0, procstat::loadavg()]));
        obj.insert("pass".into(), json!(pass));
        eprintln!("publish step: {summary}");
        steps.push(summary);
        if pass {
            best = Some(best.map_or(achieved, |b: f64| b.max(achieved)));
        } else if !ctx.args.no_stop {
            break;
        }
    }
    Ok(json!({
        "connect": connect,
        "connected": ctx.stats.connected.load(Ordering::Relaxed),
        "steps": steps,
        "max_sustained_per_sec": best,
        "publisher": publisher.status(),
        "protocol_errors": ctx.stats.protocol_errors.load(Ordering::Relaxed),
        "disconnects": ctx.stats.disconnects.load(Ordering::Relaxed),
    }))
}

async fn scenario_broadcast(ctx: &Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let n = ctx.args.conns;
    let took = open_clients(ctx, n).await;
    let connect = connect_summary(ctx, n, took);
    eprintln!("broadcast: connected {connect}");
    let connected = ctx.stats.connected.load(Ordering::Relaxed) as u64;
    if connected == 0 {
        bail!("no client connected: {connect}");
    }
    let mut publisher = Publisher::new(ctx).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all: Vec<String> = (0..ctx.args.users.max(1))
        .map(|u| format!("{}{u}", ctx.prefix))
        .collect();
    let mut rounds = Vec::new();
    for r in 0..ctx.args.repeat {
        let slot = (r + 1).min(SLOTS - 1);
        let body = payload(ctx, slot as u32);
        let events: Vec<(Vec<String>, String)> = match ctx.args.publisher {
            // One message for everyone.
            PublisherKind::Socketio => vec![(Vec::new(), body)],
            // One API call with every recipient (chunks of the API's limit).
            PublisherKind::Http => all
                .chunks(10_000)
                .map(|c| (c.to_vec(), body.clone()))
                .collect(),
            // One publish per user channel.
            PublisherKind::Redis | PublisherKind::Amqp => vec![(all.clone(), body)],
        };
        let start = Instant::now();
        publisher.publish(&events).await?;
        let complete = wait_until(Duration::from_secs(15), || {
            ctx.stats.received[slot].load(Ordering::Relaxed) >= connected
        })
        .await;
        let mut s = ctx.stats.slot_summary(slot);
        let obj = s.as_object_mut().expect("object");
        obj.insert("complete".into(), json!(complete));
        obj.insert(
            "wall_ms".into(),
            json!(start.elapsed().as_secs_f64() * 1000.0),
        );
        eprintln!("broadcast round: {s}");
        rounds.push(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut lasts: Vec<f64> = rounds.iter().filter_map(|r| r["max_ms"].as_f64()).collect();
    lasts.sort_by(|a, b| a.total_cmp(b));
    Ok(json!({
        "connect": connect,
        "connected": connected,
        "rounds": rounds,
        "last_receipt_ms_median": lasts.get(lasts.len() / 2),
        "last_receipt_ms_max": lasts.last(),
        "all_complete": rounds.iter().all(|r| r["complete"] == json!(true)),
    }))
}

async fn scenario_storm(ctx: &Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let n = ctx.args.conns;
    let s0 = server_sample(ctx);
    let took = open_clients(ctx, n).await;
    let s1 = server_sample(ctx);
    let connect = connect_summary(ctx, n, took);
    eprintln!("storm: connected {connect}");
    let mut out = json!({
        "connect": connect,
        "server_cpu_secs_connecting": s1.cpu_secs - s0.cpu_secs,
    });
    if ctx.args.wait_restart {
        ctx.reconnect.store(true, Ordering::Relaxed);
        println!("READY");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let deadline = Duration::from_secs_f64(ctx.args.timeout_secs);
        // The runner restarts the server now.
        let dropped = wait_until(deadline, || {
            ctx.stats
                .first_disconnect
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
        })
        .await;
        let target = ctx.stats.connected.load(Ordering::Relaxed).max(1);
        let _ = target;
        let back = dropped
            && wait_until(deadline, || {
                ctx.stats.connected.load(Ordering::Relaxed) >= n
                    && ctx.stats.disconnects.load(Ordering::Relaxed) >= n as u64
            })
            .await;
        let first = *ctx
            .stats
            .first_disconnect
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let last = *ctx
            .stats
            .last_reconnect
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let secs = match (first, last) {
            (Some(f), Some(l)) if l > f => Some((l - f).as_secs_f64()),
            _ => None,
        };
        let obj = out.as_object_mut().expect("object");
        obj.insert("reconnected_all".into(), json!(back));
        obj.insert(
            "reconnected".into(),
            json!(ctx.stats.connected.load(Ordering::Relaxed)),
        );
        obj.insert(
            "disconnects".into(),
            json!(ctx.stats.disconnects.load(Ordering::Relaxed)),
        );
        obj.insert("reconnect_secs".into(), json!(secs));
    }
    Ok(out)
}

/// One connect + handshake + close cycle.
async fn cycle(ctx: &Ctx, i: usize) -> anyhow::Result<()> {
    let mut client = connect(ctx, i).await?;
    client.ws.close(None).await?;
    // Wait for the server's close (bounded), as a client that stops cleanly does.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = client.ws.next().await {}
    })
    .await;
    Ok(())
}

async fn run_cycles(ctx: &Arc<Ctx>, from: usize, count: usize) -> (u64, u64, Duration) {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(from));
    let end = from + count;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..ctx.args.connect_concurrency.max(1) {
        let (ctx, next, ok, failed) = (ctx.clone(), next.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(20), cycle(&ctx, i)).await {
                    Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(e)) => {
                        ctx.stats.error(format!("cycle: {e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

async fn scenario_churn(ctx: &Arc<Ctx>) -> anyhow::Result<serde_json::Value> {
    let total = ctx.args.cycles;
    let fresh = server_sample(ctx);
    let warmup = (total / 50).max(100).min(total);
    let (wok, wfail, _) = run_cycles(ctx, 0, warmup).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = server_sample(ctx);
    let (ok, failed, took) = run_cycles(ctx, warmup, total - warmup).await;
    // feedhub unsubscribes after a debounce; give it time, then check.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = server_sample(ctx);
    let pattern = format!("feed-{}*", ctx.prefix);
    let leaked = if ctx.args.publisher == PublisherKind::Redis {
        resp::count_channels(&ctx.args.redis_url, &pattern)
            .await
            .ok()
    } else {
        None
    };
    let growth = (after.rss_kib as f64 - before.rss_kib as f64) / before.rss_kib.max(1) as f64;
    Ok(json!({
        "cycles": total,
        "warmup_cycles": warmup,
        "warmup_ok": wok,
        "warmup_failed": wfail,
        "ok": ok,
        "failed": failed,
        "secs": took.as_secs_f64(),
        "cycles_per_sec": ok as f64 / took.as_secs_f64().max(1e-9),
        "server_rss_fresh_kib": fresh.rss_kib,
        "server_rss_before_kib": before.rss_kib,
        "server_rss_after_kib": after.rss_kib,
        "rss_growth_pct": growth * 100.0,
        "server_cpu_secs": after.cpu_secs - before.cpu_secs,
        "redis_channels_left": leaked,
        "redis_pattern": pattern,
        "last_error": ctx.stats.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }))
}

/// Prints the descriptor-limit advice for this run.
fn fd_advice(args: &Args) {
    let (soft, hard) = procstat::raise_nofile();
    // Churn holds at most `--connect-concurrency` connections at once.
    let open = if args.scenario == Scenario::Churn {
        args.connect_concurrency.min(args.conns)
    } else {
        args.conns
    };
    let needed = open as u64 + 256;
    if soft < needed {
        eprintln!(
            "warning: RLIMIT_NOFILE is {soft} (hard {hard}) but {open} connections need about {needed}; \
             raise it with `ulimit -n {needed}` (or LimitNOFILE= in a systemd unit) before starting the load generator"
        );
    }
    eprintln!(
        "loadgen: fd limit {soft}; the server needs about one descriptor per connection: \
         start it from a shell with `ulimit -n {needed}` (hard limit permitting) or LimitNOFILE={needed}"
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fd_advice(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(args))?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Runs one scenario and returns its summary (also written to `--json`).
pub async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("b{:08x}-", rand::random::<u32>()));
    let ctx = Arc::new(Ctx {
        auth: feedhub::auth::Authenticator::with_secret(Some(&args.jwt_secret)),
        args,
        stats: Stats::new(),
        prefix,
        source_seq: AtomicUsize::new(0),
        reconnect: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let c0 = client_sample();
    let result = match ctx.args.scenario {
        Scenario::Idle => scenario_idle(&ctx).await,
        Scenario::Publish => scenario_publish(&ctx).await,
        Scenario::Broadcast => scenario_broadcast(&ctx).await,
        Scenario::Storm => scenario_storm(&ctx).await,
        Scenario::Churn => scenario_churn(&ctx).await,
    };
    let c1 = client_sample();
    ctx.stop.store(true, Ordering::Relaxed);
    let mut result = result?;
    let obj = result.as_object_mut().expect("object");
    obj.insert(
        "scenario".into(),
        json!(format!("{:?}", ctx.args.scenario).to_lowercase()),
    );
    obj.insert(
        "mode".into(),
        json!(format!("{:?}", ctx.args.mode).to_lowercase()),
    );
    obj.insert("conns".into(), json!(ctx.args.conns));
    obj.insert("users".into(), json!(ctx.args.users));
    obj.insert("urls".into(), json!(ctx.args.url));
    obj.insert("user_prefix".into(), json!(ctx.prefix));
    obj.insert(
        "client_cpu_secs_total".into(),
        json!(c1.cpu_secs - c0.cpu_secs),
    );
    obj.insert("client_rss_kib".into(), json!(c1.rss_kib));
    obj.insert("wall_secs".into(), json!(started.elapsed().as_secs_f64()));
    if let Some(path) = &ctx.args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(result)
}
