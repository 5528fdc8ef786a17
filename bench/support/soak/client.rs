//! The soak's SignalR clients (JSON hub protocol), all through the round-robin proxy:
//!
//! - **WebSockets with stateful reconnect** (most clients): negotiate with
//!   `useStatefulReconnect=true`, handshake version 2, an `Ack` about every second, and after
//!   a lost socket a new WebSocket to the same URL that sends `Sequence` and replays what the
//!   server has not acknowledged, dropping replayed messages it already has. When the resume
//!   fails (the instance is gone), a fresh connection, then `Recover({offset, epoch})`.
//! - **Long Polling** and **Server-Sent Events**: negotiate, the transport request, the
//!   handshake by POST; sends by POST; a fresh connection plus `Recover` after any failure.
//! - **The stalled client** (a user of its own with heavy traffic): a WebSocket with a tiny
//!   receive buffer that stops reading while the stall fault lasts.
//!
//! Every client follows the recipe in [`super::checker`] and reports to the shared
//! [`super::stats::Stats`]; its slot tells the fault watcher whether it is connected and
//! how far it got.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Buf, BytesMut};
use feedhub::protocol::{CompletionResult, HubMessage, ProtocolKind};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::checker::{Ev, Next, Recipe, Record, Recovered, Track};
use super::now_micros;
use super::publisher::Oracle;
use super::signalr::{self, Endpoint, Ws};
use super::stats::Stats;

/// Largest hub message accepted.
const MAX_MESSAGE: usize = 16 << 20;
/// How long a resume may take to get the server's `Sequence`.
const RESUME_TIMEOUT: Duration = Duration::from_secs(3);
/// Silence after which a client gives its connection up (the server pings every 15 s).
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How a client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Transport {
    /// WebSockets with stateful reconnect.
    WebSockets,
    /// Long Polling.
    LongPolling,
    /// Server-Sent Events.
    Sse,
}

/// What the fault watcher sees of one client.
pub struct Slot {
    /// Oracle index of its user.
    pub user: usize,
    /// How it connects.
    pub transport: Transport,
    /// Highest `k` applied.
    pub last_k: AtomicU64,
    /// Connected (a live session).
    pub connected: AtomicBool,
    /// Lost `k`s known so far (gaps).
    pub missing: AtomicU64,
}

/// What every client shares.
pub struct Ctx {
    /// The proxy's hub endpoint.
    pub ep: Endpoint,
    /// Mints client JWTs.
    pub auth: feedhub::auth::Authenticator,
    /// Ground truth.
    pub oracle: Arc<Oracle>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Ends every client.
    pub stop: CancellationToken,
    /// The stalled client stops reading while set.
    pub stalled: AtomicBool,
    /// One slot per checked client.
    pub slots: Vec<Slot>,
    source_seq: AtomicUsize,
    source_ips: u8,
}

impl Ctx {
    /// Shared state for clients of `slots`, connecting to `ep`.
    pub fn new(
        ep: Endpoint,
        auth: feedhub::auth::Authenticator,
        oracle: Arc<Oracle>,
        stats: Arc<Stats>,
        slots: Vec<Slot>,
        source_ips: u8,
    ) -> Ctx {
        Ctx {
            ep,
            auth,
            oracle,
            stats,
            stop: CancellationToken::new(),
            stalled: AtomicBool::new(false),
            slots,
            source_seq: AtomicUsize::new(0),
            source_ips,
        }
    }

    fn source_ip(&self) -> Option<std::net::Ipv4Addr> {
        if self.source_ips == 0 {
            return None;
        }
        let n = self.source_seq.fetch_add(1, Ordering::Relaxed);
        Some(std::net::Ipv4Addr::new(
            127,
            0,
            0,
            2 + (n % self.source_ips as usize) as u8,
        ))
    }

    fn jwt(&self, user: &str) -> anyhow::Result<String> {
        self.auth
            .issue(user, 24 * 3600)
            .map_err(|e| anyhow!("token: {e}"))
    }
}

/// What a client ends with.
pub struct ClientEnd {
    /// Its index.
    pub index: usize,
    /// Its check.
    pub track: Track,
    /// Its last position (offset, epoch) and how many connections it made.
    pub position: (Option<u64>, Option<String>),
    /// Connections made.
    pub connections: u64,
}

/// The hub-message side of a client: the recipe, the check and the pending `Recover`.
struct Logic {
    index: usize,
    recipe: Recipe,
    track: Track,
    next_invocation: u64,
    pending: Option<String>,
    transport: Transport,
    connection: u64,
}

/// Why a session ended.
enum End {
    /// Stop requested.
    Stopped,
    /// The connection is gone; connect afresh.
    Lost(String),
}

fn invocation_text(id: &str, arg: &Option<(u64, String)>) -> String {
    let arg = match arg {
        None => "null".to_string(),
        Some((o, e)) => serde_json::json!({"offset": o, "epoch": e}).to_string(),
    };
    format!("{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"Recover\",\"arguments\":[{arg}]}}\u{1e}")
}

impl Logic {
    fn new(index: usize, user: String, transport: Transport) -> Logic {
        Logic {
            index,
            recipe: Recipe::default(),
            track: Track::new(user),
            next_invocation: 0,
            pending: None,
            transport,
            connection: 0,
        }
    }

    fn context(&self) -> String {
        format!(
            "client {} ({:?}, connection #{}, recipe position {:?}/{:?})",
            self.index, self.transport, self.connection, self.recipe.last, self.recipe.epoch
        )
    }

    fn recover_frame(&mut self, next: Next) -> Option<String> {
        match next {
            Next::Nothing => None,
            Next::Recover(arg) => {
                self.next_invocation += 1;
                let id = self.next_invocation.to_string();
                self.pending = Some(id.clone());
                Some(invocation_text(&id, &arg))
            }
        }
    }

    /// A fresh connection: the first load or the repair from the position.
    fn on_connect(&mut self) -> Option<String> {
        self.connection += 1;
        self.recipe.on_disconnect();
        self.pending = None;
        let next = self.recipe.on_connect();
        self.recover_frame(next)
    }

    fn sync(&self, ctx: &Ctx) {
        let slot = &ctx.slots[self.index];
        slot.last_k.store(self.track.last_k, Ordering::Relaxed);
        slot.missing
            .store(self.track.missing() as u64, Ordering::Relaxed);
    }

    /// Handles one hub message; returns a frame to send, or the end of the connection.
    fn handle(&mut self, ctx: &Ctx, msg: HubMessage) -> Result<Option<String>, End> {
        let rec: &dyn Record = &*ctx.stats;
        let out = match msg {
            HubMessage::Invocation(inv) if inv.target.eq_ignore_ascii_case("FeedUpdated") => {
                let ev = inv.arguments.first().map(|a| a.decode::<Ev>());
                match ev {
                    Some(Ok(ev)) => {
                        let ctxt = self.context();
                        let next =
                            self.recipe
                                .on_live(ev, &mut self.track, now_micros(), rec, &ctxt);
                        self.recover_frame(next)
                    }
                    _ => {
                        ctx.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        rec.violation(
                            &self.track.user,
                            format!(
                                "a FeedUpdated argument is not a soak event: {:?}; {}",
                                inv.arguments.first(),
                                self.context()
                            ),
                        );
                        None
                    }
                }
            }
            HubMessage::Completion(done) if Some(&done.invocation_id) == self.pending.as_ref() => {
                self.pending = None;
                let ctxt = self.context();
                match done.result {
                    CompletionResult::Value(v) => match v.decode::<Recovered>() {
                        Ok(r) => {
                            let next = self.recipe.on_recovered(
                                r,
                                &mut self.track,
                                now_micros(),
                                rec,
                                &ctxt,
                            );
                            self.recover_frame(next)
                        }
                        Err(e) => {
                            rec.violation(
                                &self.track.user,
                                format!("Recover result not understood: {e}; {ctxt}"),
                            );
                            self.recipe
                                .on_no_history(&mut self.track, now_micros(), rec, &ctxt);
                            None
                        }
                    },
                    CompletionResult::Error(e)
                        if e.contains("does not exist")
                            || e.contains("Unknown")
                            || e.contains("not found") =>
                    {
                        // A server without history: the recipe applies events as they come
                        // (gaps cannot be repaired and will show as violations).
                        self.recipe
                            .on_no_history(&mut self.track, now_micros(), rec, &ctxt);
                        None
                    }
                    CompletionResult::Error(e) => {
                        // The history is unavailable for now (Redis restarting): the app
                        // asks again at the next gap; not a violation by itself.
                        if ctx.stats.recover_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!(
                                "soak: Recover failed (retried at the next gap): {e}; {ctxt}"
                            );
                        }
                        self.recipe.recovering = false;
                        None
                    }
                    CompletionResult::Void => {
                        rec.violation(
                            &self.track.user,
                            format!("Recover completed without a result; {ctxt}"),
                        );
                        self.recipe.recovering = false;
                        None
                    }
                }
            }
            HubMessage::Close(c) => {
                return Err(End::Lost(format!(
                    "server Close: {:?} (allowReconnect {})",
                    c.error, c.allow_reconnect
                )))
            }
            _ => None,
        };
        self.sync(ctx);
        Ok(out)
    }
}

/// Runs checked client `index` until the context stops; returns its check.
pub async fn run(ctx: Arc<Ctx>, index: usize) -> ClientEnd {
    let slot = &ctx.slots[index];
    let user = ctx.oracle.users[slot.user].clone();
    let mut logic = Logic::new(index, user, slot.transport);
    let mut attempts = 0u64;
    loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        if attempts > 0 {
            ctx.stats.now().reconnects.fetch_add(1, Ordering::Relaxed);
        }
        attempts += 1;
        let end = match slot.transport {
            Transport::WebSockets => ws_session(&ctx, &mut logic).await,
            Transport::LongPolling | Transport::Sse => http_session(&ctx, &mut logic).await,
        };
        slot.connected.store(false, Ordering::Relaxed);
        match end {
            Ok(End::Stopped) => break,
            Ok(End::Lost(_)) => {}
            Err(e) => ctx.stats.connect_failed(&e),
        }
        let jitter = Duration::from_millis(50 + rand::random::<u64>() % 400);
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = tokio::time::sleep(jitter) => {}
        }
    }
    logic.sync(&ctx);
    ClientEnd {
        index,
        position: (logic.recipe.last, logic.recipe.epoch.clone()),
        connections: logic.connection,
        track: logic.track,
    }
}

// ---------------------------------------------------------------------------------------
// WebSockets with stateful reconnect

/// Stateful reconnect bookkeeping of one connection.
#[derive(Default)]
struct Seq {
    /// Id the next incoming trackable message has.
    next_in: u64,
    /// Highest incoming id processed.
    received: u64,
    /// An Ack is due.
    ack_due: bool,
    /// Trackable messages sent.
    sent: u64,
    /// Sent and not acknowledged: (id, frame).
    unacked: VecDeque<(u64, String)>,
}

fn ws_text(s: String) -> Message {
    Message::Text(s.into())
}

async fn ws_send_trackable(ws: &mut Ws, seq: &mut Seq, frame: String) -> anyhow::Result<()> {
    seq.sent += 1;
    if seq.unacked.len() < 10_000 {
        seq.unacked.push_back((seq.sent, frame.clone()));
    }
    ws.send(ws_text(frame)).await?;
    Ok(())
}

async fn ws_session(ctx: &Ctx, logic: &mut Logic) -> anyhow::Result<End> {
    let user = logic.track.user.clone();
    let jwt = ctx.jwt(&user)?;
    let neg = signalr::negotiate(ctx.source_ip(), &ctx.ep, &jwt, true).await?;
    let path = signalr::connect_path(&ctx.ep, &neg.token, &jwt);
    let mut ws = signalr::ws_connect(ctx.source_ip(), &ctx.ep, &path).await?;
    let version = if neg.stateful { 2 } else { 1 };
    let mut buf = tokio::time::timeout(
        Duration::from_secs(10),
        signalr::ws_handshake(&mut ws, ProtocolKind::Json, version),
    )
    .await
    .map_err(|_| anyhow!("handshake timed out"))??;
    let slot = &ctx.slots[logic.index];
    slot.connected.store(true, Ordering::Relaxed);
    let mut seq = Seq {
        next_in: 1,
        ..Seq::default()
    };
    if let Some(f) = logic.on_connect() {
        ws_send_trackable(&mut ws, &mut seq, f).await?;
    }
    let mut ack = tokio::time::interval(Duration::from_secs(1));
    let mut ping = tokio::time::interval(Duration::from_secs(15));
    let mut awaiting_sequence = false;
    loop {
        // Decode what is buffered.
        loop {
            let msg = match ProtocolKind::Json.decode(&mut buf, MAX_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Ok(End::Lost(format!("undecodable: {e}"))),
            };
            match msg {
                HubMessage::Ack(a) => {
                    while seq
                        .unacked
                        .front()
                        .is_some_and(|(id, _)| *id <= a.sequence_id)
                    {
                        seq.unacked.pop_front();
                    }
                }
                HubMessage::Sequence(s) => {
                    if s.sequence_id > seq.received + 1 {
                        return Ok(End::Lost(format!(
                            "Sequence {} is beyond what was received ({})",
                            s.sequence_id, seq.received
                        )));
                    }
                    seq.next_in = s.sequence_id;
                    awaiting_sequence = false;
                }
                m if awaiting_sequence => {
                    // Until the server's Sequence, incoming data is discarded.
                    let _ = m;
                }
                m if m.is_sequenced() => {
                    let id = seq.next_in;
                    seq.next_in += 1;
                    if id <= seq.received {
                        continue; // replayed, already processed
                    }
                    seq.received = id;
                    seq.ack_due = true;
                    match logic.handle(ctx, m) {
                        Ok(Some(f)) => ws_send_trackable(&mut ws, &mut seq, f).await?,
                        Ok(None) => {}
                        Err(end) => return Ok(end),
                    }
                }
                m => match logic.handle(ctx, m) {
                    Ok(Some(f)) => ws_send_trackable(&mut ws, &mut seq, f).await?,
                    Ok(None) => {}
                    Err(end) => return Ok(end),
                },
            }
        }
        let next = tokio::select! {
            _ = ctx.stop.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(End::Stopped);
            }
            m = tokio::time::timeout(SERVER_TIMEOUT, ws.next()) => m,
            _ = ack.tick() => {
                if seq.ack_due {
                    seq.ack_due = false;
                    let f = format!("{{\"type\":8,\"sequenceId\":{}}}\u{1e}", seq.received);
                    if ws.send(ws_text(f)).await.is_err() {
                        // Noticed on the next read.
                    }
                }
                continue;
            }
            _ = ping.tick() => {
                let _ = ws.send(ws_text("{\"type\":6}\u{1e}".to_string())).await;
                continue;
            }
        };
        match next {
            Ok(Some(Ok(Message::Text(t)))) => {
                buf.extend_from_slice(t.as_bytes());
                continue;
            }
            Ok(Some(Ok(Message::Binary(b)))) => {
                buf.extend_from_slice(&b);
                continue;
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {}
            Ok(Some(Ok(_))) => continue,
        }
        // The socket is gone (or silent). Resume on a new one if stateful.
        if !neg.stateful {
            return Ok(End::Lost("socket closed".into()));
        }
        slot.connected.store(false, Ordering::Relaxed);
        let mut resumed = None;
        for attempt in 0..3 {
            if ctx.stop.is_cancelled() {
                return Ok(End::Stopped);
            }
            tokio::time::sleep(Duration::from_millis(100 + 300 * attempt)).await;
            match resume(ctx, &path, &seq).await {
                Ok(w) => {
                    resumed = Some(w);
                    break;
                }
                Err(_) => continue,
            }
        }
        match resumed {
            Some((w, rest)) => {
                ws = w;
                buf = rest;
                awaiting_sequence = true;
                // The Sequence has arrived at the front of `rest` (checked by `resume`).
                ctx.stats.now().resumes.fetch_add(1, Ordering::Relaxed);
                slot.connected.store(true, Ordering::Relaxed);
            }
            None => {
                ctx.stats
                    .now()
                    .resume_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(End::Lost("resume failed".into()));
            }
        }
    }
}

/// A new WebSocket to the same URL: sends `Sequence` and the unacknowledged messages, and
/// waits for the server's first bytes (its `Sequence`).
async fn resume(ctx: &Ctx, path: &str, seq: &Seq) -> anyhow::Result<(Ws, BytesMut)> {
    let attempt = async {
        let mut ws = signalr::ws_connect(ctx.source_ip(), &ctx.ep, path).await?;
        let first = seq.unacked.front().map_or(seq.sent + 1, |(id, _)| *id);
        ws.send(ws_text(format!(
            "{{\"type\":9,\"sequenceId\":{first}}}\u{1e}"
        )))
        .await?;
        for (_, f) in &seq.unacked {
            ws.send(ws_text(f.clone())).await?;
        }
        let mut buf = BytesMut::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => buf.extend_from_slice(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
                Some(Ok(Message::Close(c))) => bail!("closed on resume: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("resume: {e}"),
                None => bail!("closed on resume"),
            }
            if buf.contains(&0x1e) {
                return Ok((ws, buf));
            }
        }
    };
    tokio::time::timeout(RESUME_TIMEOUT, attempt)
        .await
        .map_err(|_| anyhow!("resume timed out"))?
}

// ---------------------------------------------------------------------------------------
// Long Polling and Server-Sent Events

async fn http_request(
    ctx: &Ctx,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = signalr::tcp_from(ctx.source_ip(), ctx.ep.addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        ctx.ep.host,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    signalr::http_once(&mut s, &req).await
}

async fn post(ctx: &Ctx, path: &str, frame: &str) -> anyhow::Result<()> {
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(15),
        http_request(
            ctx,
            "POST",
            path,
            "Content-Type: text/plain;charset=UTF-8\r\n",
            frame.as_bytes(),
        ),
    )
    .await
    .map_err(|_| anyhow!("POST timed out"))??;
    if status != 200 {
        bail!("POST: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// Long Polling: polls until the connection ends, feeding bodies to `tx`.
async fn poll_loop(ctx: &Ctx, path: &str, tx: mpsc::Sender<anyhow::Result<Vec<u8>>>) {
    loop {
        // `@microsoft/signalr`'s poll timeout.
        let r = tokio::time::timeout(
            Duration::from_secs(100),
            http_request(ctx, "GET", path, "", b""),
        )
        .await;
        let item = match r {
            Ok(Ok((200, body))) => Ok(body),
            Ok(Ok((204, _))) => Err(anyhow!("poll: 204 (connection ended)")),
            Ok(Ok((status, body))) => Err(anyhow!(
                "poll: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow!("poll timed out")),
        };
        let end = item.is_err();
        if tx.send(item).await.is_err() || end {
            return;
        }
    }
}

/// Server-Sent Events: one streaming GET; every `data:` event's text goes to `tx`.
async fn sse_loop(ctx: &Ctx, path: &str, tx: mpsc::Sender<anyhow::Result<Vec<u8>>>) {
    let r = async {
        let mut s = signalr::tcp_from(ctx.source_ip(), ctx.ep.addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
            ctx.ep.host
        );
        s.write_all(req.as_bytes()).await?;
        let mut raw = BytesMut::with_capacity(16 * 1024);
        let head = loop {
            if s.read_buf(&mut raw).await? == 0 {
                bail!("SSE: closed before the response head");
            }
            if let Some(h) = signalr::parse_response_head(&raw)? {
                break h;
            }
        };
        if head.status != 200 {
            bail!("SSE: HTTP {}", head.status);
        }
        raw.advance(head.body_start);
        let mut text: Vec<u8> = Vec::new();
        loop {
            if head.chunked {
                if signalr::dechunk(&mut raw, &mut text)? {
                    bail!("SSE: stream ended");
                }
            } else {
                text.extend_from_slice(&raw);
                raw.clear();
            }
            // Lines may end with CRLF; events end with a blank line.
            text.retain(|b| *b != b'\r');
            // Whole events end with a blank line.
            while let Some(end) = text.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = text.drain(..end + 2).collect();
                let mut data = Vec::new();
                for line in event.split(|b| *b == b'\n') {
                    if let Some(d) = line.strip_prefix(b"data: ").or_else(|| line.strip_prefix(b"data:")) {
                        if !data.is_empty() {
                            data.push(b'\n');
                        }
                        data.extend_from_slice(d);
                    }
                }
                if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                    return Ok(());
                }
            }
            if text.len() > MAX_MESSAGE {
                bail!("SSE: event too large");
            }
            if s.read_buf(&mut raw).await? == 0 {
                bail!("SSE: closed");
            }
        }
    }
    .await;
    if let Err(e) = r {
        let _ = tx.send(Err(e)).await;
    }
}

async fn http_session(ctx: &Ctx, logic: &mut Logic) -> anyhow::Result<End> {
    let user = logic.track.user.clone();
    let jwt = ctx.jwt(&user)?;
    let neg = signalr::negotiate(ctx.source_ip(), &ctx.ep, &jwt, false).await?;
    let path = signalr::connect_path(&ctx.ep, &neg.token, &jwt);
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<Vec<u8>>>(16);
    let reader = {
        let ctx2: &Ctx = ctx;
        let path = path.clone();
        let transport = logic.transport;
        async move {
            match transport {
                Transport::LongPolling => {
                    // The first poll answers at once (it binds the transport).
                    match tokio::time::timeout(
                        Duration::from_secs(15),
                        http_request(ctx2, "GET", &path, "", b""),
                    )
                    .await
                    {
                        Ok(Ok((200, _))) => poll_loop(ctx2, &path, tx).await,
                        Ok(Ok((s, b))) => {
                            let _ = tx
                                .send(Err(anyhow!(
                                    "first poll: HTTP {s}: {}",
                                    String::from_utf8_lossy(&b)
                                )))
                                .await;
                        }
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(e)).await;
                        }
                        Err(_) => {
                            let _ = tx.send(Err(anyhow!("first poll timed out"))).await;
                        }
                    }
                }
                _ => sse_loop(ctx2, &path, tx).await,
            }
        }
    };
    tokio::pin!(reader);
    let mut reader_done = false;
    // The handshake goes by POST once the transport request is under way.
    let mut handshake_sent = false;
    let mut handshaken = false;
    let mut buf = BytesMut::new();
    let slot = &ctx.slots[logic.index];
    let started = tokio::time::Instant::now();
    loop {
        if !handshake_sent && started.elapsed() > Duration::from_millis(50) {
            let mut hs = Vec::new();
            feedhub::protocol::handshake::write_request("json", 1, &mut hs);
            post(ctx, &path, &String::from_utf8_lossy(&hs)).await?;
            handshake_sent = true;
        }
        let item = tokio::select! {
            _ = ctx.stop.cancelled() => {
                let _ = http_request(ctx, "DELETE", &path, "", b"").await;
                return Ok(End::Stopped);
            }
            _ = &mut reader, if !reader_done => { reader_done = true; continue; }
            item = rx.recv() => item,
            _ = tokio::time::sleep(Duration::from_millis(60)), if !handshake_sent => continue,
            // As `@microsoft/signalr`: no message (the server pings every 15 s) for the
            // server timeout ends an SSE connection; Long Polling has no such timeout.
            _ = tokio::time::sleep(SERVER_TIMEOUT), if logic.transport == Transport::Sse => {
                return Ok(End::Lost("server timeout (30 s without a message)".into()));
            }
        };
        let bytes = match item {
            Some(Ok(b)) => b,
            Some(Err(e)) => return Ok(End::Lost(format!("{e:#}"))),
            None => return Ok(End::Lost("transport ended".into())),
        };
        buf.extend_from_slice(&bytes);
        if !handshaken {
            match feedhub::protocol::handshake::parse_response(&mut buf) {
                Ok(Some(resp)) => {
                    if let Some(e) = resp.error {
                        bail!("handshake error: {e}");
                    }
                    handshaken = true;
                    slot.connected.store(true, Ordering::Relaxed);
                    if let Some(f) = logic.on_connect() {
                        post(ctx, &path, &f).await?;
                    }
                }
                Ok(None) => continue,
                Err(e) => bail!("handshake: {e}"),
            }
        }
        loop {
            let msg = match ProtocolKind::Json.decode(&mut buf, MAX_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return Ok(End::Lost(format!("undecodable: {e}"))),
            };
            match logic.handle(ctx, msg) {
                Ok(Some(f)) => post(ctx, &path, &f).await?,
                Ok(None) => {}
                Err(end) => return Ok(end),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The stalled client

/// A WebSocket client of the stall user with a 4 KiB receive buffer that stops reading
/// while `ctx.stalled` is set; it reconnects whenever its connection ends.
pub async fn stalled_client(ctx: Arc<Ctx>, user: String) {
    loop {
        if ctx.stop.is_cancelled() {
            return;
        }
        let r: anyhow::Result<()> = async {
            let jwt = ctx.jwt(&user)?;
            let neg = signalr::negotiate(ctx.source_ip(), &ctx.ep, &jwt, false).await?;
            let path = signalr::connect_path(&ctx.ep, &neg.token, &jwt);
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.set_recv_buffer_size(4096)?;
            let stream = sock.connect(ctx.ep.addr).await?;
            let mut ws = signalr::ws_upgrade(stream, &ctx.ep, &path).await?;
            let mut buf = signalr::ws_handshake(&mut ws, ProtocolKind::Json, 1).await?;
            ctx.stats.stall_connects.fetch_add(1, Ordering::Relaxed);
            loop {
                if ctx.stalled.load(Ordering::Relaxed) {
                    tokio::select! {
                        _ = ctx.stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
                let m = tokio::select! {
                    _ = ctx.stop.cancelled() => return Ok(()),
                    m = tokio::time::timeout(Duration::from_millis(200), ws.next()) => m,
                };
                match m {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(t)))) => buf.extend_from_slice(t.as_bytes()),
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(e))) => bail!("stalled client: {e}"),
                    Ok(None) => bail!("stalled client: closed"),
                }
                while let Ok(Some(msg)) = ProtocolKind::Json.decode(&mut buf, MAX_MESSAGE) {
                    if let HubMessage::Close(c) = msg {
                        let mut v = ctx
                            .stats
                            .stall_closes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        if v.len() < 100 {
                            v.push(c.error.unwrap_or_else(|| "(no error)".into()));
                        }
                        bail!("stalled client: server Close");
                    }
                }
                if buf.len() > MAX_MESSAGE {
                    buf.clear();
                }
            }
        }
        .await;
        let _ = r;
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}
