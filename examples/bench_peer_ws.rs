//! The bare tokio-tungstenite peer of the benchmark (the "ceiling"): accepts WebSockets at
//! `/ws?user=ID`, subscribes Redis `feed-<user>` while the user has at least one connection
//! (reference-counted, like feedhub), and forwards each published payload to the user's
//! sockets as one text frame, with no SignalR framing, negotiate, handshake, auth or
//! keep-alive. It does the same Redis and socket work as feedhub and nothing else.
//!
//! Same buffer discipline as feedhub: 1 KiB tungstenite read buffer, a bounded outbound
//! queue per connection (full: the message is dropped and counted), and the Redis reader
//! never waits for a socket.
//!
//! ```sh
//! cargo run --release --example bench_peer_ws -- --listen 127.0.0.1:5101 --redis-url redis://127.0.0.1:6379
//! ```

#[path = "../bench/support/resp.rs"]
mod resp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Bare WebSocket + Redis peer for the feedhub benchmark.
#[derive(Debug, Parser)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5101")]
    listen: SocketAddr,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Channel prefix (the user id follows it).
    #[arg(long, default_value = "feed-")]
    channel_prefix: String,
    /// Messages queued per connection before drops.
    #[arg(long, default_value_t = 256)]
    queue: usize,
}

type ConnTx = mpsc::Sender<Bytes>;

/// user → (connection id → queue); the Redis subscription exists while the entry does.
#[derive(Default)]
struct Registry {
    users: Mutex<HashMap<String, HashMap<u64, ConnTx>>>,
}

struct Shared {
    registry: Registry,
    /// SUBSCRIBE/UNSUBSCRIBE commands for the Redis writer (bounded).
    redis_cmds: mpsc::Sender<Vec<u8>>,
    prefix: String,
    dropped: AtomicU64,
    next_id: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, None))
}

/// Serves until the process ends; `ready` receives the bound address.
pub async fn run(
    args: Args,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let redis = resp::connect(&args.redis_url).await?;
    let (rd, mut wr) = redis.into_split();
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Vec<u8>>(65_536);
    let shared = Arc::new(Shared {
        registry: Registry::default(),
        redis_cmds: cmd_tx,
        prefix: args.channel_prefix.clone(),
        dropped: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
    });
    // Redis writer: batches queued commands into one write.
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(cmd) = cmd_rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&cmd);
            while let Ok(more) = cmd_rx.try_recv() {
                buf.extend_from_slice(&more);
            }
            if let Err(e) = wr.write_all(&buf).await {
                eprintln!("redis write failed: {e}; subscriptions stop changing");
                return;
            }
        }
    });
    // Redis reader: never waits for a socket (try_send into bounded queues).
    let reader_shared = shared.clone();
    tokio::spawn(async move {
        let mut reader = resp::Reader::new(rd);
        loop {
            let reply = match reader.next().await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("redis read failed: {e}; deliveries stop");
                    return;
                }
            };
            let resp::Reply::Array(Some(items)) = reply else {
                continue;
            };
            if items.len() != 3 || items[0].as_bytes() != Some(b"message") {
                continue;
            }
            let (Some(channel), resp::Reply::Bulk(Some(payload))) =
                (items[1].as_bytes(), items[2].clone())
            else {
                continue;
            };
            let Some(user) = std::str::from_utf8(channel)
                .ok()
                .and_then(|c| c.strip_prefix(reader_shared.prefix.as_str()))
            else {
                continue;
            };
            let users = reader_shared
                .registry
                .users
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(conns) = users.get(user) {
                for tx in conns.values() {
                    if tx.try_send(payload.clone()).is_err() {
                        reader_shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });

    let listener = TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    println!("LISTENING {local}");
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let queue = args.queue;
        tokio::spawn(async move {
            if let Err(e) = serve(stream, shared, queue).await {
                let _ = e;
            }
        });
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(32 * 1024))
        .max_frame_size(Some(32 * 1024))
}

// tungstenite's handshake callback type fixes the large error response.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, shared: Arc<Shared>, queue: usize) -> anyhow::Result<()> {
    let mut user: Option<String> = None;
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| {
            user = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "user")
                    .map(|(_, v)| v.into_owned())
            });
            Ok(resp)
        },
        Some(ws_config()),
    )
    .await?;
    let Some(user) = user.filter(|u| !u.is_empty() && u.len() <= 128) else {
        let mut ws = ws;
        let _ = ws.close(None).await;
        return Ok(());
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(queue);
    {
        // The command is queued under the lock, so SUBSCRIBE/UNSUBSCRIBE of one user reach
        // Redis in the order the registry changed.
        let mut users = shared
            .registry
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = users.entry(user.clone()).or_default();
        entry.insert(id, tx);
        if entry.len() == 1 {
            redis_command(&shared, b"SUBSCRIBE", &user);
        }
    }
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(first) = msg else { break };
                let mut batch = vec![first];
                while batch.len() < 64 {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let mut failed = false;
                for m in batch {
                    let text = match Utf8Bytes::try_from(m.clone()) {
                        Ok(t) => Message::Text(t),
                        Err(_) => Message::Binary(m),
                    };
                    if sink.feed(text).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || sink.flush().await.is_err() {
                    break;
                }
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {
                    // Pings are answered by tungstenite on the next write or flush.
                    if sink.flush().await.is_err() { break; }
                }
            }
        }
    }
    {
        let mut users = shared
            .registry
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = users.get_mut(&user) {
            entry.remove(&id);
            if entry.is_empty() {
                users.remove(&user);
                redis_command(&shared, b"UNSUBSCRIBE", &user);
            }
        }
    }
    Ok(())
}

/// Queues `SUBSCRIBE`/`UNSUBSCRIBE` of a user's channel without waiting.
fn redis_command(shared: &Shared, verb: &[u8], user: &str) {
    let mut cmd = Vec::new();
    let channel = format!("{}{}", shared.prefix, user);
    resp::encode(&[verb, channel.as_bytes()], &mut cmd);
    if shared.redis_cmds.try_send(cmd).is_err() {
        eprintln!(
            "redis command queue full: {} lost",
            String::from_utf8_lossy(verb)
        );
    }
}
