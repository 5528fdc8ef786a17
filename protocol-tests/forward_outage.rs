//! Forwarded Long Polling and Server-Sent Events across a backplane outage: two feed
//! instances on the shared Redis (a unique channel prefix and unique users), one of them
//! reaching Redis through a cut proxy (`bench/support/soak/cutproxy.rs`). The client
//! negotiates on the owner and sends every request to the other instance, so each poll, send
//! and the event stream is forwarded over Redis pub/sub (`http::forward`).
//!
//! While a poll waits (or a stream is open), the proxy cuts one instance off Redis for
//! [`CUT`] and feed events are published meanwhile through the other instance. Whatever was
//! on its way over pub/sub during the cut is lost (a poll answer carrying events the owner
//! already took from the connection's queue, stream frames). The client must notice within
//! [`NOTICED_WITHIN`] of the cut (a poll answers 404, a stream ends; before the fix the poll
//! hung for the long-poll timeout + 30 s), every event it received on that connection must
//! be contiguous (nothing silently skipped), and a fresh connection's
//! `Recover({offset, epoch})` must bring back exactly the rest. Cutting the owner also checks
//! that the owner ended the connection (its token answers 404 afterwards), so a client
//! cannot poll on past the answers it lost. An owner that stays away longer (as a killed
//! one does) must be noticed by the landing node's liveness probe within seconds.
//!
//! Needs the shared Redis: skipped without it, failing under `CI=true`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../bench/support/soak/cutproxy.rs"]
mod cutproxy;

#[path = "../bench/support/signalr.rs"]
mod signalr;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use feedhub::backplane::redis::RedisConfig;
use feedhub::protocol::{handshake, CompletionResult, HubMessage, ProtocolKind};
use feedhub::{feed, Server, ServerBuilder};
use serde_json::{json, Value as J};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use cutproxy::CutProxy;
use support::*;

/// How long the proxy cuts the instance off Redis (the chaos soak's cut).
const CUT: Duration = Duration::from_secs(2);

/// How soon after the cut starts the client must notice: the cut, the backplane's reconnect
/// (backoff up to 1 s) and slack. Shorter than a forwarded poll's own silence limit after
/// the cut (`FORWARD_SILENCE`, 10 s), so the outage signal must be what ended it.
const NOTICED_WITHIN: Duration = Duration::from_secs(8);

/// Which instance the proxy cuts off Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The one requests land on (forwarding to the owner).
    Landing,
    /// The one that owns the connection.
    Owner,
}

/// The forwarded transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LongPolling,
    Sse,
}

/// Two feed instances on the shared Redis; `cut` reaches it through `proxy`.
struct Pair {
    landing: Server,
    owner: Server,
    proxy: CutProxy,
    prefix: String,
}

async fn node(prefix: &str, name: &str, redis_url: &str) -> Server {
    let config = support::feed_node_config(prefix, name);
    let server = ServerBuilder::new(config)
        .hub(support::cluster::test_feed_hub())
        .redis(RedisConfig::from_url(redis_url).expect("redis url"))
        .start()
        .await
        .expect("feed server");
    wait_ready(&server).await;
    server
}

async fn wait_ready(server: &Server) {
    let bp = server.backplane().clone();
    support::cluster::eventually("the Redis backplane to connect", WAIT, || {
        let ready = bp.is_ready();
        async move { ready }
    })
    .await;
}

impl Pair {
    /// `None` (skip) without the shared Redis.
    async fn start(name: &str, cut: Cut) -> Option<Pair> {
        support::cluster::redis().await?;
        let redis_url = support::cluster::redis_url();
        let redis_addr: SocketAddr = redis_url
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .expect("the test Redis URL must be redis://ip:port");
        let proxy = CutProxy::start("127.0.0.1:0".parse().expect("addr"), redis_addr)
            .await
            .expect("cut proxy");
        let via_proxy = format!("redis://{}", proxy.local_addr());
        let prefix = unique_prefix(name);
        let (landing_url, owner_url) = match cut {
            Cut::Landing => (via_proxy, redis_url),
            Cut::Owner => (redis_url, via_proxy),
        };
        let landing = node(&prefix, "landing", &landing_url).await;
        let owner = node(&prefix, "owner", &owner_url).await;
        Some(Pair {
            landing,
            owner,
            proxy,
            prefix,
        })
    }

    fn user(&self) -> String {
        format!("{}-u", self.prefix)
    }

    fn jwt(&self, user: &str) -> String {
        self.owner.issue_token(user, 3600).expect("token")
    }

    /// Publishes feed event `n` to `user` through `via`.
    async fn publish(&self, via: &Server, user: &str, n: u64) {
        let base = format!("http://{}", via.local_addr());
        let body = json!({"recipients": [user], "payload": {"n": n}}).to_string();
        let auth = format!("Bearer {TEST_API_KEY}");
        let (status, text) = support::cluster::http(
            &base,
            "POST",
            "/api/feed",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &body,
        )
        .await;
        assert_eq!(status, 202, "publishing event {n}: {text}");
    }

    async fn shutdown(self) {
        drop(self.proxy);
        self.landing.shutdown().await;
        self.owner.shutdown().await;
    }
}

/// One HTTP/1.1 request with `Connection: close` to `addr`.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    // A poll waits for the owner up to its own limits (well under 30 s).
    tokio::time::timeout(Duration::from_secs(30), signalr::http_once(&mut s, &req))
        .await
        .expect("an HTTP answer within 30 s")
        .expect("HTTP exchange")
}

/// A SignalR JSON connection negotiated on the owner whose requests all go to the landing
/// instance.
struct Client {
    landing: SocketAddr,
    path: String,
    kind: Kind,
    buf: BytesMut,
    /// Server-Sent Events: the open stream and its undecoded bytes.
    stream: Option<(TcpStream, BytesMut, bool)>,
    sse_text: Vec<u8>,
    next_id: u64,
}

/// What the client read.
#[derive(Debug)]
enum Got {
    /// Hub messages (feed events, completions; pings dropped).
    Messages(Vec<HubMessage>),
    /// The connection ended for the client: a poll answered this status (not 200), or the
    /// stream ended.
    Ended(String),
}

impl Client {
    async fn connect(pair: &Pair, user: &str, kind: Kind) -> Client {
        let jwt = pair.jwt(user);
        let owner_ep = signalr::parse_endpoint(&format!(
            "http://{}{}",
            pair.owner.local_addr(),
            feed::FEED_HUB_PATH
        ))
        .expect("endpoint");
        let neg = within(
            "negotiate",
            signalr::negotiate(None, &owner_ep, &jwt, false),
        )
        .await
        .expect("negotiate");
        let path = signalr::connect_path(&owner_ep, &neg.token, &jwt);
        let mut c = Client {
            landing: pair.landing.local_addr(),
            path,
            kind,
            buf: BytesMut::new(),
            stream: None,
            sse_text: Vec::new(),
            next_id: 0,
        };
        match kind {
            Kind::LongPolling => {
                let (status, body) = c.get().await;
                assert_eq!(
                    status,
                    200,
                    "first poll: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Kind::Sse => c.open_stream().await,
        }
        let mut hs = Vec::new();
        handshake::write_request("json", 1, &mut hs);
        c.post(&hs).await;
        loop {
            if let Some(resp) = handshake::parse_response(&mut c.buf).expect("handshake") {
                assert!(resp.error.is_none(), "handshake error {:?}", resp.error);
                break;
            }
            let bytes = match c.read_raw().await {
                Ok(b) => b,
                Err(e) => panic!("no handshake answer: {e}"),
            };
            c.buf.extend_from_slice(&bytes);
        }
        c
    }

    async fn get(&self) -> (u16, Vec<u8>) {
        request(self.landing, "GET", &self.path, "", b"").await
    }

    async fn post(&self, body: &[u8]) {
        let (status, text) = request(
            self.landing,
            "POST",
            &self.path,
            "Content-Type: text/plain;charset=UTF-8\r\n",
            body,
        )
        .await;
        assert_eq!(status, 200, "send: {}", String::from_utf8_lossy(&text));
    }

    async fn open_stream(&mut self) {
        let mut s = within("connect", TcpStream::connect(self.landing))
            .await
            .expect("connect");
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n",
            self.path, self.landing
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = BytesMut::new();
        let head = loop {
            let n = within("SSE head", s.read_buf(&mut raw))
                .await
                .expect("read");
            assert!(n > 0, "SSE: closed before the head");
            if let Some(h) = signalr::parse_response_head(&raw).expect("head") {
                break h;
            }
        };
        assert_eq!(head.status, 200, "SSE status");
        raw.advance(head.body_start);
        self.stream = Some((s, raw, head.chunked));
    }

    /// The next bytes of hub messages: a poll's body, or the data of the next SSE events.
    /// `Err(why)` when the connection ended for the client.
    async fn read_raw(&mut self) -> Result<Vec<u8>, String> {
        match self.kind {
            Kind::LongPolling => {
                let (status, body) = self.get().await;
                if status == 200 {
                    Ok(body)
                } else {
                    Err(format!(
                        "poll: HTTP {status} {}",
                        String::from_utf8_lossy(&body)
                    ))
                }
            }
            Kind::Sse => {
                let Some((s, raw, chunked)) = self.stream.as_mut() else {
                    return Err("no stream".into());
                };
                loop {
                    if *chunked {
                        if signalr::dechunk(raw, &mut self.sse_text).map_err(|e| e.to_string())? {
                            return Err("SSE: stream ended".into());
                        }
                    } else {
                        self.sse_text.extend_from_slice(raw);
                        raw.clear();
                    }
                    self.sse_text.retain(|b| *b != b'\r');
                    let mut data = Vec::new();
                    while let Some(end) = self.sse_text.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = self.sse_text.drain(..end + 2).collect();
                        for line in event.split(|b| *b == b'\n') {
                            if let Some(d) = line.strip_prefix(b"data: ") {
                                data.extend_from_slice(d);
                            }
                        }
                    }
                    if !data.is_empty() {
                        return Ok(data);
                    }
                    match tokio::time::timeout(Duration::from_secs(30), s.read_buf(raw)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return Err("SSE: closed".into()),
                        Ok(Ok(_)) => {}
                        Err(_) => return Err("SSE: 30 s without a byte".into()),
                    }
                }
            }
        }
    }

    /// The next hub messages (Pings dropped), or the end of the connection.
    async fn next(&mut self) -> Got {
        loop {
            let mut out = Vec::new();
            loop {
                match ProtocolKind::Json.decode(&mut self.buf, 1 << 20) {
                    Ok(Some(HubMessage::Ping)) => {}
                    Ok(Some(m)) => out.push(m),
                    Ok(None) => break,
                    Err(e) => panic!("undecodable hub message: {e}"),
                }
            }
            if !out.is_empty() {
                return Got::Messages(out);
            }
            match self.read_raw().await {
                Ok(bytes) => self.buf.extend_from_slice(&bytes),
                Err(why) => return Got::Ended(why),
            }
        }
    }

    /// Invokes `Recover(arg)` and returns its result, reading on until it arrives (feed
    /// events meanwhile are returned too).
    async fn recover(&mut self, arg: J) -> (J, Vec<(u64, u64)>) {
        self.next_id += 1;
        let id = self.next_id.to_string();
        let frame = format!(
            "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"Recover\",\"arguments\":[{arg}]}}\u{1e}"
        );
        self.post(frame.as_bytes()).await;
        let mut live = Vec::new();
        loop {
            let msgs = match self.next().await {
                Got::Messages(m) => m,
                Got::Ended(why) => panic!("connection ended while recovering: {why}"),
            };
            for m in msgs {
                if let Some(ev) = feed_event(&m) {
                    live.push(ev);
                    continue;
                }
                if let HubMessage::Completion(c) = m {
                    assert_eq!(c.invocation_id, id);
                    match c.result {
                        CompletionResult::Value(v) => {
                            return (v.decode::<J>().expect("Recover result"), live)
                        }
                        other => panic!("Recover failed: {other:?}"),
                    }
                }
            }
        }
    }
}

/// A `FeedUpdated` event's (offset, n).
fn feed_event(m: &HubMessage) -> Option<(u64, u64)> {
    let HubMessage::Invocation(inv) = m else {
        return None;
    };
    if inv.target != feed::FEED_TARGET {
        return None;
    }
    let v: J = inv.arguments.first()?.decode().ok()?;
    Some((v["offset"].as_u64()?, v["n"].as_u64()?))
}

/// Reads until events up to `n` arrived; returns them.
async fn read_events(c: &mut Client, up_to: u64) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    while got.last().map_or(0, |e: &(u64, u64)| e.1) < up_to {
        match within("feed events", c.next()).await {
            Got::Messages(msgs) => got.extend(msgs.iter().filter_map(feed_event)),
            Got::Ended(why) => panic!("connection ended before the cut: {why}"),
        }
    }
    got
}

async fn forwarded_connection_survives_nothing_silently(name: &str, cut: Cut, kind: Kind) {
    cut_and_check(name, cut, kind, CUT, NOTICED_WITHIN).await;
}

/// Cuts `cut` off Redis for `cut_for` while the client's read waits; the client must notice
/// within `noticed_within`, miss nothing silently, and recover the rest afterwards.
async fn cut_and_check(
    name: &str,
    cut: Cut,
    kind: Kind,
    cut_for: Duration,
    noticed_within: Duration,
) {
    let Some(pair) = Pair::start(name, cut).await else {
        return;
    };
    let user = pair.user();
    // Events go through the instance that keeps Redis.
    let publisher = match cut {
        Cut::Landing => &pair.owner,
        Cut::Owner => &pair.landing,
    };
    let mut c = Client::connect(&pair, &user, kind).await;
    let (first, _) = c.recover(J::Null).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    for n in 1..=2 {
        pair.publish(publisher, &user, n).await;
    }
    let mut got = read_events(&mut c, 2).await;
    assert_eq!(got, vec![(1, 1), (2, 2)], "before the cut");

    let old_path = c.path.clone();
    // The next read waits (a poll on the owner, or the stream) when the cut starts.
    let reader = tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            match c.next().await {
                Got::Messages(msgs) => events.extend(msgs.iter().filter_map(feed_event)),
                Got::Ended(why) => return (events, why, Instant::now()),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut_at = Instant::now();
    let proxy = &pair.proxy;
    let cutting = proxy.cut(cut_for);
    let publishing = async {
        // The cut instance notices at once (the proxy closes its socket); then publish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for n in 3..=5 {
            pair.publish(publisher, &user, n).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::join!(cutting, publishing);
    let (events, why, ended_at) = tokio::time::timeout(noticed_within * 3, reader)
        .await
        .expect("the client never noticed the outage")
        .expect("reader");
    let noticed = ended_at.saturating_duration_since(cut_at);
    println!(
        "{cut:?} cut, {kind:?}: the connection ended {noticed:?} after the cut started ({why}); \
         received meanwhile: {events:?}"
    );
    assert!(
        noticed < noticed_within,
        "the client must notice within {noticed_within:?} of the cut, took {noticed:?} ({why})"
    );
    got.extend(events);
    let offsets: Vec<u64> = got.iter().map(|e| e.0).collect();
    let contiguous: Vec<u64> = (1..=offsets.len() as u64).collect();
    assert_eq!(
        offsets, contiguous,
        "events on the old connection must be contiguous (nothing silently skipped)"
    );
    if cut == Cut::Owner {
        // The owner ended the connection: polling on past a lost answer is refused (a live
        // Long Polling connection would hold this poll, a live stream's would get 400).
        let owner = pair.owner.local_addr();
        support::cluster::eventually("the owner to end the connection", WAIT, || {
            let path = old_path.clone();
            async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(2),
                    request(owner, "GET", &path, "", b""),
                )
                .await;
                matches!(r, Ok((404, _)))
            }
        })
        .await;
    }

    // A fresh connection recovers the rest from history.
    wait_ready(&pair.landing).await;
    wait_ready(&pair.owner).await;
    let mut fresh = Client::connect(&pair, &user, kind).await;
    let last = got.last().map_or(0, |e| e.0);
    let (r, live) = fresh.recover(json!({"offset": last, "epoch": epoch})).await;
    assert_eq!(r["recovered"], json!(true), "{r}");
    let mut all: Vec<(u64, u64)> = got.clone();
    for e in r["events"].as_array().expect("events") {
        all.push((
            e["offset"].as_u64().expect("offset"),
            e["n"].as_u64().expect("n"),
        ));
    }
    all.extend(live);
    all.sort();
    all.dedup();
    assert_eq!(
        all,
        (1..=5).map(|n| (n, n)).collect::<Vec<_>>(),
        "every event once, after the recovery"
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_forwarded_across_a_landing_node_cut() {
    forwarded_connection_survives_nothing_silently("fo-lp-land", Cut::Landing, Kind::LongPolling)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_forwarded_across_a_landing_node_cut() {
    forwarded_connection_survives_nothing_silently("fo-sse-land", Cut::Landing, Kind::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_forwarded_across_an_owner_cut() {
    forwarded_connection_survives_nothing_silently("fo-lp-own", Cut::Owner, Kind::LongPolling)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_forwarded_across_an_owner_cut() {
    forwarded_connection_survives_nothing_silently("fo-sse-own", Cut::Owner, Kind::Sse).await;
}

/// An owner that stays away (its process died, as far as Redis can tell: its subscriptions
/// are gone): the landing node's probe (`PUBSUB NUMSUB` every second) fails the poll or the
/// stream waiting on it within seconds, long before the owner could tell anyone and before
/// the forwarded exchange's own silence limit (10 s).
const VANISHED: Duration = Duration::from_secs(12);

/// How soon the client must notice a vanished owner.
const VANISHED_NOTICED_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_forwarded_to_a_vanished_owner_ends_within_seconds() {
    cut_and_check(
        "fo-lp-gone",
        Cut::Owner,
        Kind::LongPolling,
        VANISHED,
        VANISHED_NOTICED_WITHIN,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_forwarded_to_a_vanished_owner_ends_within_seconds() {
    cut_and_check(
        "fo-sse-gone",
        Cut::Owner,
        Kind::Sse,
        VANISHED,
        VANISHED_NOTICED_WITHIN,
    )
    .await;
}
