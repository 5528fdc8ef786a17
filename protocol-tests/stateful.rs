//! Stateful reconnect (negotiate `useStatefulReconnect`, hub protocol v2, Ack and Sequence).
//!
//! Byte-level tests with a raw WebSocket client against `/statehub` (see `statehub.rs`):
//! negotiate offers it only when asked; Ack trims the replay buffer; a full buffer holds
//! messages back (backpressure) instead of dropping them; the outbound queue's slow-consumer
//! bound still applies; a new socket with the same token gets `Sequence` and exactly the
//! unacknowledged messages, with no OnDisconnected/OnConnected; the client's resent messages
//! are processed once; window expiry runs OnDisconnected and the token then gets 404.
//!
//! And the official `@microsoft/signalr` client (`withStatefulReconnect()`, JSON and
//! MessagePack) through the round-robin proxy, whose connections are cut mid-stream:
//! `protocol-tests/js/stateful.mjs` checks every number arrives exactly once and in order,
//! the same connection id, no `onreconnecting`, hooks not run; it prints the resend numbers.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

#[allow(dead_code)]
#[path = "../examples/rr_proxy.rs"]
mod rr_proxy;

#[path = "statehub.rs"]
mod statehub;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use feedhub::connection::outbound::{OutboundLimits, SLOW_CONSUMER_REASON};
use feedhub::hub::HubOptions;
use feedhub::protocol::{
    Ack, CompletionResult, HubMessage, Invocation, ProtocolKind, Sequence, Value,
};
use feedhub::session::replay::ReplayLimits;
use feedhub::{ServerBuilder, ServerConfig};
use statehub::{state_hub, HubState, STATE_HUB};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(state: &HubState, f: impl FnOnce(&mut HubOptions)) -> TestServer {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        ..ServerConfig::default()
    };
    let server = ServerBuilder::new(config)
        .hub(state_hub(state, f))
        .start()
        .await
        .expect("server");
    TestServer {
        base_url: format!("http://{}", server.local_addr()),
        jwt_secret: TEST_SECRET.to_string(),
        api_key: TEST_API_KEY.to_string(),
        server: Some(server),
    }
}

/// `POST {hub}/negotiate?negotiateVersion=1[&useStatefulReconnect=true]`; the JSON body.
async fn negotiate(base: &str, stateful: bool) -> serde_json::Value {
    let host = base.trim_start_matches("http://");
    let mut s = within("connect", tokio::net::TcpStream::connect(host))
        .await
        .unwrap();
    let q = if stateful {
        "negotiateVersion=1&useStatefulReconnect=true"
    } else {
        "negotiateVersion=1"
    };
    let req = format!(
        "POST {STATE_HUB}/negotiate?{q} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    within("send", s.write_all(req.as_bytes())).await.unwrap();
    let mut raw = Vec::new();
    within("read", s.read_to_end(&mut raw)).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "negotiate: {text}");
    let body = &text[text.find("\r\n\r\n").expect("head") + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn hub_ws(s: &TestServer, token: &str) -> String {
    format!("{}{STATE_HUB}?id={token}", s.ws_url())
}

/// A new connection: negotiate with stateful reconnect, WebSocket, handshake `version`.
async fn connect(s: &TestServer, version: u32) -> (RawClient, String, String) {
    let body = negotiate(&s.base_url, true).await;
    assert_eq!(body["useStatefulReconnect"], true, "{body}");
    let id = body["connectionId"].as_str().unwrap().to_string();
    let token = body["connectionToken"].as_str().unwrap().to_string();
    let mut c = RawClient::open(&hub_ws(s, &token)).await;
    let mut req = Vec::new();
    feedhub::protocol::handshake::write_request("json", version, &mut req);
    c.send_text(String::from_utf8(req).unwrap()).await;
    let resp = c.recv_raw().await.expect("handshake response");
    assert_eq!(&resp[..], feedhub::protocol::handshake::OK_RESPONSE);
    c.protocol = ProtocolKind::Json;
    (c, id, token)
}

/// The same connection on a new socket (no handshake: stateful resume).
async fn reopen(s: &TestServer, token: &str) -> RawClient {
    RawClient::open(&hub_ws(s, token)).await
}

/// The status a WebSocket upgrade gets when it is refused.
async fn refused_status(url: &str) -> u16 {
    match within("ws connect", tokio_tungstenite::connect_async(url)).await {
        Ok(_) => panic!("upgrade to {url} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("connect failed: {e}"),
    }
}

fn invocation(id: Option<&str>, target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::Invocation(Invocation {
        invocation_id: id.map(str::to_string),
        ..Invocation::send(target, args)
    })
}

fn stream_numbers(id: &str, count: i64) -> HubMessage {
    HubMessage::StreamInvocation(Invocation {
        invocation_id: Some(id.into()),
        ..Invocation::send(
            "Numbers",
            vec![
                num(count),
                num(0),
                Value::json_checked(bytes::Bytes::from_static(b"[]")).unwrap(),
            ],
        )
    })
}

fn num(n: i64) -> Value {
    Value::json_checked(bytes::Bytes::from(n.to_string())).unwrap()
}

fn value_text(v: &Value) -> String {
    v.to_json_string().expect("json")
}

/// What a sequenced server message says, as text: `item:N`, `done`, `invoke:Target`.
fn describe(m: &HubMessage) -> String {
    match m {
        HubMessage::StreamItem(i) => format!("item:{}", value_text(&i.item)),
        HubMessage::Completion(c) => match &c.result {
            CompletionResult::Value(v) => format!("done:{}", value_text(v)),
            CompletionResult::Void => "done".into(),
            CompletionResult::Error(e) => format!("error:{e}"),
        },
        HubMessage::Invocation(i) => format!("invoke:{}", i.target),
        other => format!("{other:?}"),
    }
}

/// Next message that is not an Ack (Acks are counted into `acks`); `None` on timeout.
async fn next_within(c: &mut RawClient, d: Duration, acks: &mut Vec<u64>) -> Option<HubMessage> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Err(_) => return None,
            Ok(None) => panic!("server closed the socket"),
            Ok(Some(HubMessage::Ack(a))) => acks.push(a.sequence_id),
            Ok(Some(m)) => return Some(m),
        }
    }
}

async fn next(c: &mut RawClient, acks: &mut Vec<u64>) -> HubMessage {
    next_within(c, WAIT, acks)
        .await
        .expect("a message within the wait")
}

async fn call(c: &mut RawClient, id: &str, target: &str) -> String {
    c.send(&invocation(Some(id), target, vec![])).await;
    let mut acks = Vec::new();
    loop {
        match next(c, &mut acks).await {
            HubMessage::Completion(done) if done.invocation_id == id => {
                return describe(&HubMessage::Completion(done))
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn negotiate_offers_stateful_reconnect_only_when_asked_and_allowed() {
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let yes = negotiate(&s.base_url, true).await;
    assert_eq!(yes["useStatefulReconnect"], true, "{yes}");
    let no = negotiate(&s.base_url, false).await;
    assert!(no.get("useStatefulReconnect").is_none(), "{no}");
    // A hub that does not allow it never offers it.
    let off = start(&state, |o| o.stateful_reconnect = false).await;
    let body = negotiate(&off.base_url, true).await;
    assert!(body.get("useStatefulReconnect").is_none(), "{body}");
}

#[tokio::test]
async fn ack_trims_the_buffer_and_a_full_buffer_waits_for_acks_without_dropping() {
    let state = HubState::default();
    let s = start(&state, |o| {
        o.replay = ReplayLimits {
            max_bytes: 100_000,
            max_messages: 4,
        }
    })
    .await;
    let (mut c, _, _) = connect(&s, 2).await;
    c.send(&stream_numbers("1", 12)).await;
    let mut acks = Vec::new();
    let mut got = Vec::new();
    // 12 items and the completion: 13 sequenced messages, released 4 at a time.
    for round in 0..4 {
        let expect = if round < 3 { 4 } else { 1 };
        for _ in 0..expect {
            got.push(describe(&next(&mut c, &mut acks).await));
        }
        // Buffer full: nothing more until we acknowledge (backpressure, not drops).
        if round < 3 {
            assert!(
                next_within(&mut c, Duration::from_millis(600), &mut acks)
                    .await
                    .is_none(),
                "the server sent past a full replay buffer (round {round})"
            );
        }
        c.send(&HubMessage::Ack(Ack {
            sequence_id: got.len() as u64,
        }))
        .await;
    }
    let mut expected: Vec<String> = (1..=12).map(|i| format!("item:{i}")).collect();
    expected.push("done".into());
    assert_eq!(got, expected);
    // The server acknowledged our StreamInvocation (sequence id 1) on its ack timer.
    let t0 = Instant::now();
    while !acks.contains(&1) && t0.elapsed() < WAIT {
        let _ = next_within(&mut c, Duration::from_millis(200), &mut acks).await;
    }
    assert!(acks.contains(&1), "no server Ack for our message: {acks:?}");
}

#[tokio::test]
async fn full_replay_buffer_still_bounded_by_the_slow_consumer_policy() {
    let state = HubState::default();
    let s = start(&state, |o| {
        o.replay = ReplayLimits {
            max_bytes: 100_000,
            max_messages: 2,
        };
        o.outbound = OutboundLimits {
            max_messages: 8,
            max_bytes: 1 << 20,
        };
    })
    .await;
    let (mut c, id, _) = connect(&s, 2).await;
    let clients = s.server().clients(STATE_HUB).unwrap();
    let mut acks = Vec::new();
    // Two ticks fill the replay buffer (never acknowledged) ...
    for i in 0..2 {
        let _ = clients.client(&id).send("Tick", (i,)).await;
        assert_eq!(describe(&next(&mut c, &mut acks).await), "invoke:Tick");
    }
    // ... so the outbound queue stops draining and fills up: the slow-consumer policy
    // closes the connection instead of buffering without bound.
    for i in 0..20 {
        let _ = clients.client(&id).send("Tick", (i,)).await;
    }
    match next(&mut c, &mut acks).await {
        HubMessage::Close(close) => {
            assert_eq!(close.error.as_deref(), Some(SLOW_CONSUMER_REASON));
            assert!(close.allow_reconnect);
        }
        other => panic!("expected Close, got {other:?}"),
    }
    c.expect_closed().await;
    within("OnDisconnected", async {
        while state.disconnected.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn reconnect_resends_exactly_the_unacked_messages_without_hooks() {
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let (mut c, id, token) = connect(&s, 2).await;
    c.send(&stream_numbers("1", 5)).await;
    let mut acks = Vec::new();
    let mut first = Vec::new();
    for _ in 0..6 {
        first.push(describe(&next(&mut c, &mut acks).await));
    }
    assert_eq!(first.last().map(String::as_str), Some("done"));
    c.send(&HubMessage::Ack(Ack { sequence_id: 3 })).await;
    // Let the Ack land, then come back on a new socket while the old one is still open
    // (a half-open connection the client gave up on): the new socket wins.
    assert_eq!(
        call(&mut c, "c1", "ConnectionId").await,
        format!("done:\"{id}\"")
    );
    let mut c2 = reopen(&s, &token).await;
    c.expect_closed().await;
    // The client has sent 2 sequenced messages; nothing unacknowledged: Sequence(3).
    c2.send(&HubMessage::Sequence(Sequence { sequence_id: 3 }))
        .await;
    let mut acks2 = Vec::new();
    match next(&mut c2, &mut acks2).await {
        HubMessage::Sequence(seq) => assert_eq!(seq.sequence_id, 4, "first unacked id"),
        other => panic!("expected Sequence, got {other:?}"),
    }
    let mut resent = Vec::new();
    for _ in 0..4 {
        resent.push(describe(&next(&mut c2, &mut acks2).await));
    }
    assert_eq!(
        resent,
        vec!["item:4", "item:5", "done", &format!("done:\"{id}\"")],
        "exactly the unacknowledged messages, in order"
    );
    assert_eq!(
        call(&mut c2, "c2", "ConnectionId").await,
        format!("done:\"{id}\"")
    );
    assert_eq!(call(&mut c2, "c3", "Counters").await, "done:[1,0]");
    assert_eq!(state.disconnected.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn client_messages_resent_after_reconnect_are_processed_once() {
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let (mut c, _, token) = connect(&s, 2).await;
    c.send(&invocation(None, "Record", vec![num(1)])).await;
    c.send(&invocation(None, "Record", vec![num(2)])).await;
    within("records", async {
        while state.recorded.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(c);
    let mut c2 = reopen(&s, &token).await;
    // The client never saw an Ack: it resends both, then sends a new one.
    c2.send(&HubMessage::Sequence(Sequence { sequence_id: 1 }))
        .await;
    c2.send(&invocation(None, "Record", vec![num(1)])).await;
    c2.send(&invocation(None, "Record", vec![num(2)])).await;
    c2.send(&invocation(None, "Record", vec![num(3)])).await;
    let mut acks = Vec::new();
    match next(&mut c2, &mut acks).await {
        HubMessage::Sequence(seq) => assert_eq!(seq.sequence_id, 1, "nothing sent yet"),
        other => panic!("expected Sequence, got {other:?}"),
    }
    assert_eq!(call(&mut c2, "r", "Recorded").await, "done:[1,2,3]");
}

#[tokio::test]
async fn sequence_past_what_was_received_closes_with_an_error() {
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let (c, _, token) = connect(&s, 2).await;
    drop(c);
    let mut c2 = reopen(&s, &token).await;
    c2.send(&HubMessage::Sequence(Sequence { sequence_id: 99 }))
        .await;
    let mut acks = Vec::new();
    let _ = next(&mut c2, &mut acks).await; // the server's Sequence
    match next(&mut c2, &mut acks).await {
        HubMessage::Close(close) => {
            let e = close.error.unwrap_or_default();
            assert!(e.contains("Sequence ID 99"), "{e}");
        }
        other => panic!("expected Close, got {other:?}"),
    }
}

#[tokio::test]
async fn window_expiry_runs_on_disconnected_and_the_token_is_then_refused() {
    let state = HubState::default();
    let s = start(&state, |o| o.reconnect_window = Duration::from_millis(800)).await;
    let (c, _, token) = connect(&s, 2).await;
    assert_eq!(state.connected.load(Ordering::SeqCst), 1);
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state.disconnected.load(Ordering::SeqCst),
        0,
        "OnDisconnected ran inside the reconnect window"
    );
    within("OnDisconnected after the window", async {
        while state.disconnected.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(refused_status(&hub_ws(&s, &token)).await, 404);
    assert_eq!(refused_status(&hub_ws(&s, "not-a-token")).await, 404);
}

#[tokio::test]
async fn client_timeout_detaches_a_stateful_connection_instead_of_ending_it() {
    let state = HubState::default();
    let s = start(&state, |o| o.client_timeout = Duration::from_millis(400)).await;
    let (mut c, id, token) = connect(&s, 2).await;
    c.send(&HubMessage::Ping).await; // arms the client timeout
                                     // Silent (a half-open connection): the server drops the transport, keeps the connection.
    c.expect_closed().await;
    assert_eq!(state.disconnected.load(Ordering::SeqCst), 0);
    let mut c2 = reopen(&s, &token).await;
    c2.send(&HubMessage::Sequence(Sequence { sequence_id: 1 }))
        .await;
    let mut acks = Vec::new();
    assert!(matches!(
        next(&mut c2, &mut acks).await,
        HubMessage::Sequence(_)
    ));
    assert_eq!(
        call(&mut c2, "i", "ConnectionId").await,
        format!("done:\"{id}\"")
    );
    assert_eq!(state.disconnected.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn version_1_handshake_is_not_stateful() {
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let (c, _, token) = connect(&s, 1).await;
    drop(c);
    within("OnDisconnected at once", async {
        while state.disconnected.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(refused_status(&hub_ws(&s, &token)).await, 404);
}

// ---------------------------------------------------------------------------------------
// The official JS client through the round-robin proxy
// ---------------------------------------------------------------------------------------

async fn js_through_proxy(protocol: &str) {
    let Some(node) = external::node() else {
        return;
    };
    let state = HubState::default();
    let s = start(&state, |_| {}).await;
    let proxy = rr_proxy::RrProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        vec![s.server().local_addr()],
    )
    .await
    .expect("proxy");
    state.set_cut(proxy.dropper());
    let run = node
        .run(
            "stateful.mjs",
            &[
                ("FEEDHUB_URL", format!("http://{}", proxy.local_addr())),
                ("FEEDHUB_PROTOCOL", protocol.to_string()),
            ],
            Duration::from_secs(240),
        )
        .await;
    run.assert_success();
    assert!(
        proxy.accepted() >= 3,
        "the proxy saw {} connections: the cuts did not happen",
        proxy.accepted()
    );
    assert_eq!(state.connected.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_reconnect_json() {
    js_through_proxy("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_reconnect_messagepack() {
    js_through_proxy("messagepack").await;
}
