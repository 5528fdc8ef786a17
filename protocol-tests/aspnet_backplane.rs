//! ASP.NET Core SignalR Redis backplane interop (issue 15, item 1), against the shared Redis.
//!
//! A harness plays an ASP.NET server on Redis: it publishes exactly the bytes of
//! `docs/aspnet-interop.md` Part C, subscribes to the channels an ASP.NET server would, and
//! decodes what feedhub publishes. Each test uses its own hub type name, so channels never
//! collide.
//!
//! - golden vectors: feedhub's own encoders produce C.2's frames and envelope, and C.5's
//!   reply frame, byte for byte;
//! - harness → feedhub: user, all, group and connection sends reach raw JSON and MessagePack
//!   clients, bins copied as is; a missing protocol entry is counted, not delivered; a group
//!   command for a feedhub connection is acked (`91 07`) after the subscription, after
//!   which group sends reach the client; a command for an unknown connection is not acked;
//!   a 4-item client result call is answered on the harness's return channel (C.5's reply
//!   bytes); malformed payloads on every channel kind are counted and skipped;
//! - feedhub → harness: feed events (`POST /api/feed`) and hub sends come out in ASP.NET's
//!   format with `json` and `messagepack` entries (checked by decoding both), feedhub
//!   clients get each exactly once, and the two-format cost is measured and printed;
//! - mixed fleet: group add/remove from feedhub for connections on another feedhub node and
//!   on the "ASP.NET server" (acks), a timeout when nobody owns the connection, and client
//!   results across nodes and to the harness;
//! - the official `@microsoft/signalr` client (JSON and MessagePack, `js/aspnet_backplane.mjs`)
//!   receives the harness's pushes.
//!
//! Run: `cargo test --release --test aspnet_backplane`. Without Redis or Node the cases
//! print `SKIPPED`, except under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use feedhub::backplane::aspnet::{self, AspNetInvocation, GroupCommand, Origin};
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::hub::{HubBuilder, HubContext, HubDefinition};
use feedhub::protocol::{
    Completion, CompletionResult, HubMessage, Invocation, PreparedMessage, ProtocolKind, Value,
};
use feedhub::{feed, ServerBuilder, ServerConfig};
use futures_util::StreamExt;
use serde_json::json;
use support::cluster::{self, Client};
use support::{within, TestServer, TEST_API_KEY, TEST_SECRET};

const QUIET: Duration = Duration::from_millis(400);
const SERVER: &str = "web01_0123456789abcdef0123456789abcdef";

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect()
}

/// C.2, the user send with both protocols (114 bytes).
fn c2() -> Vec<u8> {
    hex("92 90 82 A4 6A 73 6F 6E C4 3E 7B 22 74 79 70 65 22 3A 31 2C 22 74 61 72 67 65 74 22 3A 22 46 65
        65 64 55 70 64 61 74 65 64 22 2C 22 61 72 67 75 6D 65 6E 74 73 22 3A 5B 7B 22 74 65 78 74 22 3A
        22 68 69 22 7D 5D 7D 1E AB 6D 65 73 73 61 67 65 70 61 63 6B C4 1C 1B 96 01 80 C0 AB 46 65 65 64
        55 70 64 61 74 65 64 91 81 A4 74 65 78 74 A2 68 69 90")
}

/// C.4, `AllExcept("conn-1")` with a json entry only.
fn c4() -> Vec<u8> {
    let mut b = hex("92 91 A6 63 6F 6E 6E 2D 31 81 A4 6A 73 6F 6E C4 2A");
    b.extend_from_slice(br#"{"type":1,"target":"Ping","arguments":[]}"#);
    b.push(0x1e);
    b
}

/// An all/group send with both entries: json, and C.4's upstream messagepack frame for
/// target `target` with no arguments.
fn both_target() -> Vec<u8> {
    let mut json = br#"{"type":1,"target":"target","arguments":[]}"#.to_vec();
    json.push(0x1e);
    aspnet::encode_invocation(&AspNetInvocation {
        excluded: vec![],
        serializations: vec![
            ("json".into(), Bytes::from(json)),
            (
                "messagepack".into(),
                Bytes::from(hex("0D 96 01 80 C0 A6 74 61 72 67 65 74 90 90")),
            ),
        ],
        invocation_id: None,
        return_channel: None,
        origin: None,
    })
}

// ---- golden vectors through feedhub's own encoders (no Redis) ----

#[test]
fn golden_c2_from_feedhubs_own_encoders() {
    let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
        "FeedUpdated",
        vec![Value::from(json!({"text": "hi"}))],
    )));
    let payload = aspnet::encode_invocation(&AspNetInvocation {
        excluded: vec![],
        serializations: ProtocolKind::ALL
            .into_iter()
            .map(|k| (k.name().to_string(), prepared.bytes_for(k).expect("encode")))
            .collect(),
        invocation_id: None,
        return_channel: None,
        origin: None,
    });
    assert_eq!(payload, c2(), "C.2 byte for byte");
    // And back: both frames decode to the same invocation.
    let inv = aspnet::decode_invocation(&Bytes::from(payload)).expect("decode");
    for k in ProtocolKind::ALL {
        let frame = inv.serialization(k.name()).expect("entry");
        let mut buf = BytesMut::from(&frame[..]);
        match k.decode(&mut buf, usize::MAX).expect("frame") {
            Some(HubMessage::Invocation(i)) => {
                assert_eq!(i.target, "FeedUpdated");
                assert_eq!(
                    i.arguments[0].decode::<serde_json::Value>().unwrap(),
                    json!({"text": "hi"})
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn golden_c5_reply_from_feedhubs_own_encoder() {
    let id = "A".repeat(22);
    let mut frame = Vec::new();
    ProtocolKind::Json
        .encode(
            &HubMessage::Completion(Completion {
                headers: vec![],
                invocation_id: id.clone(),
                result: CompletionResult::Value(Value::from(json!("ok"))),
            }),
            &mut frame,
        )
        .expect("encode");
    let mut expect = hex("92 A4 6A 73 6F 6E C4 41");
    expect.extend_from_slice(
        format!(r#"{{"type":3,"invocationId":"{id}","result":"ok"}}"#).as_bytes(),
    );
    expect.push(0x1e);
    assert_eq!(aspnet::encode_completion("json", &frame), expect);
}

// ---- nodes and the harness ----

/// A feed hub with the test helpers, plus `AddTo(conn, group)`, `RemoveFrom(conn, group)`
/// and `Ask(conn)` (a client result: `GetStatus()` on that connection).
fn hub() -> HubDefinition {
    let base = cluster::test_feed_hub();
    let hub = HubBuilder::new(feed::FEED_HUB_PATH).configure(|o| {
        *o = base.options.clone();
        o.client_result_timeout = Duration::from_secs(5);
    });
    cluster::test_feed_methods(hub)
        .method(
            "SendConn",
            |ctx: HubContext, (conn, text): (String, String)| async move {
                ctx.clients().client(&conn).send("Msg", (text,)).await
            },
        )
        .method(
            "AddTo",
            |ctx: HubContext, (conn, group): (String, String)| async move {
                ctx.groups().add(&conn, &group).await
            },
        )
        .method(
            "RemoveFrom",
            |ctx: HubContext, (conn, group): (String, String)| async move {
                ctx.groups().remove(&conn, &group).await
            },
        )
        .method("Ask", |ctx: HubContext, (conn,): (String,)| async move {
            ctx.clients()
                .client(&conn)
                .invoke::<String>("GetStatus", ())
                .await
        })
        .build()
}

/// One test's fleet: feedhub nodes with ASP.NET interop for hub type `hub_type`.
struct Fleet {
    nodes: Vec<TestServer>,
    prefix: String,
    /// `C‖H`.
    base: String,
    channels: aspnet::AspNetChannels,
    redis: redis::aio::MultiplexedConnection,
}

async fn fleet(name: &str, n: usize, channel_prefix: &str) -> Option<Fleet> {
    let redis = cluster::redis().await?;
    let prefix = support::unique_prefix(name);
    let hub_type = format!("Test.{}.FeedHub", prefix.replace('-', "_"));
    let mut nodes = Vec::new();
    for i in 0..n {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(TEST_SECRET.to_string()),
            api_key: Some(TEST_API_KEY.to_string()),
            feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
            node_id: format!("{prefix}-node{i}"),
            channel_prefix: Some(prefix.clone()),
            aspnet_hubs: vec![(feed::FEED_HUB_PATH.to_string(), hub_type.clone())],
            aspnet_channel_prefix: channel_prefix.to_string(),
            aspnet_ack_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        };
        let mut cfg = RedisConfig::from_url(&cluster::redis_url()).expect("redis url");
        let slot: Arc<Mutex<Option<Arc<RedisBackplane>>>> = Arc::default();
        let s = slot.clone();
        let server = ServerBuilder::new(config)
            .hub(hub())
            .backplane(Box::new(move |c, inbox| {
                cfg.history = c.history();
                let bp = RedisBackplane::new(cfg, c.node_id.clone(), inbox);
                *s.lock().expect("slot") = Some(bp.clone());
                bp
            }))
            .start()
            .await
            .expect("feed server");
        let bp = slot.lock().expect("slot").clone().expect("backplane");
        assert!(
            bp.wait_ready(Duration::from_secs(10)).await,
            "Redis not ready"
        );
        nodes.push(TestServer {
            base_url: format!("http://{}", server.local_addr()),
            jwt_secret: TEST_SECRET.to_string(),
            api_key: TEST_API_KEY.to_string(),
            server: Some(server),
        });
    }
    Some(Fleet {
        nodes,
        prefix,
        base: format!("{channel_prefix}{hub_type}"),
        channels: aspnet::AspNetChannels::new(channel_prefix, &hub_type),
        redis,
    })
}

impl Fleet {
    fn ch(&self, rest: &str) -> String {
        format!("{}:{rest}", self.base)
    }

    /// Node `i`'s ASP.NET server name for the hub.
    fn server_name(&self, i: usize) -> String {
        self.nodes[i]
            .server()
            .hub(feed::FEED_HUB_PATH)
            .expect("hub")
            .aspnet_server_name()
            .expect("interop on")
            .to_string()
    }

    async fn connect(&self, node: usize, user: &str, protocol: ProtocolKind) -> Client {
        Fleet::connect_raw(&self.nodes[node], user, protocol).await
    }

    async fn connect_raw(s: &TestServer, user: &str, protocol: ProtocolKind) -> Client {
        // Cluster::connect without a Cluster: the same raw client and ConnId round trip.
        let url = format!(
            "{}{}?access_token={}",
            s.ws_url(),
            feed::FEED_HUB_PATH,
            s.token(user)
        );
        let mut raw = support::RawClient::connect(&url, protocol).await;
        let id = feedhub::ids::random_token();
        raw.send(&HubMessage::Invocation(Invocation {
            invocation_id: Some(id.clone()),
            ..Invocation::send("ConnId", vec![])
        }))
        .await;
        let conn_id = loop {
            match raw.recv().await {
                Some(HubMessage::Completion(c)) if c.invocation_id == id => match c.result {
                    CompletionResult::Value(v) => break v.decode::<String>().expect("id"),
                    other => panic!("ConnId: {other:?}"),
                },
                Some(_) => continue,
                None => panic!("closed"),
            }
        };
        Client::from_raw(raw, conn_id, 0)
    }

    async fn publish(&mut self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut self.redis)
            .await
            .expect("PUBLISH")
    }

    async fn wait_subscribed(&mut self, channel: &str, n: usize) {
        let start = std::time::Instant::now();
        loop {
            let got = cluster::numsub(&mut self.redis, channel).await;
            if got >= n {
                return;
            }
            assert!(
                start.elapsed() < support::WAIT,
                "{channel}: {got} subscribers, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, node: usize, line: &str) -> u64 {
        let (_, body) = cluster::http(&self.nodes[node].base_url, "GET", "/metrics", &[], "").await;
        body.lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {line} missing"))
    }
}

/// An "ASP.NET server" listening on Redis.
struct Listener {
    rx: tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
    _task: tokio::task::JoinHandle<()>,
}

async fn listen(channels: &[String]) -> Listener {
    let client = redis::Client::open(cluster::redis_url()).expect("redis");
    let pubsub = within("pubsub", client.get_async_pubsub())
        .await
        .expect("pubsub");
    let (mut sink, mut stream) = pubsub.split();
    for ch in channels {
        within("subscribe", sink.subscribe(ch.as_str()))
            .await
            .expect("subscribe");
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let task = tokio::spawn(async move {
        let _sink = sink;
        while let Some(msg) = stream.next().await {
            let ch = msg.get_channel_name().to_string();
            if tx
                .send((ch, msg.get_payload_bytes().to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Listener { rx, _task: task }
}

impl Listener {
    async fn next(&mut self) -> (String, Vec<u8>) {
        within("a message on the harness's channels", self.rx.recv())
            .await
            .expect("listener alive")
    }

    async fn next_on(&mut self, channel: &str) -> Vec<u8> {
        loop {
            let (ch, p) = self.next().await;
            if ch == channel {
                return p;
            }
        }
    }

    async fn nothing_on(&mut self, channel: &str, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return,
                Ok(Some((ch, p))) if ch == channel => panic!("unexpected {p:02X?} on {ch}"),
                Ok(_) => continue,
            }
        }
    }
}

/// The (target, first argument) of a framed message in `protocol`.
fn frame_invocation(protocol: ProtocolKind, frame: &[u8]) -> (String, serde_json::Value) {
    let mut buf = BytesMut::from(frame);
    match protocol.decode(&mut buf, usize::MAX) {
        Ok(Some(HubMessage::Invocation(i))) => {
            assert!(buf.is_empty(), "one frame per entry");
            let arg = i
                .arguments
                .first()
                .map(|v| v.decode::<serde_json::Value>().expect("arg"))
                .unwrap_or(serde_json::Value::Null);
            (i.target, arg)
        }
        other => panic!("not an invocation frame: {other:?}"),
    }
}

/// Both entries of a feedhub publish decode to the same (target, argument).
fn both_entries(inv: &AspNetInvocation) -> (String, serde_json::Value) {
    let names: Vec<&str> = inv.serializations.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["json", "messagepack"]);
    let j = frame_invocation(ProtocolKind::Json, inv.serialization("json").unwrap());
    let m = frame_invocation(
        ProtocolKind::MessagePack,
        inv.serialization("messagepack").unwrap(),
    );
    assert_eq!(j, m, "json and messagepack entries say the same");
    j
}

async fn next_msg(c: &mut Client) -> (String, String) {
    within("an invocation", c.next_invocation()).await
}

// ---- harness → feedhub ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_sends_reach_feedhub_clients_as_is() {
    let Some(mut f) = fleet("push", 1, "prod").await else {
        return;
    };
    assert!(
        f.base.starts_with("prodTest."),
        "C is prepended without separator"
    );
    let mut j = f.connect(0, "1002", ProtocolKind::Json).await;
    let mut m = f.connect(0, "1002", ProtocolKind::MessagePack).await;
    f.wait_subscribed(&f.ch("user:1002"), 1).await;

    // C.2 on the user channel: each client gets its protocol's bin as is, byte for byte
    // (one WebSocket frame each: text for JSON, binary for MessagePack).
    assert_eq!(f.publish(&f.ch("user:1002"), &c2()).await, 1);
    let c2_inv = aspnet::decode_invocation(&Bytes::from(c2())).unwrap();
    for c in [&mut j, &mut m] {
        let name = c.raw.protocol.name();
        let frame = within("a frame", c.raw.recv_raw()).await.expect("open");
        assert_eq!(
            &frame[..],
            &c2_inv.serialization(name).unwrap()[..],
            "{name}"
        );
    }
    f.publish(&f.ch("user:1002"), &c2()).await;
    for c in [&mut j, &mut m] {
        assert_eq!(
            next_msg(c).await,
            ("FeedUpdated".into(), r#"{"text":"hi"}"#.into())
        );
    }

    // all, both entries.
    f.publish(&f.ch("all"), &both_target()).await;
    for c in [&mut j, &mut m] {
        assert_eq!(next_msg(c).await.0, "target");
    }

    // C.4 (json only, excluding conn-1): the JSON client gets Ping; the MessagePack client
    // gets nothing, counted.
    let missing = f.metric(0, "feedhub_aspnet_missing_protocol_total ").await;
    f.publish(&f.ch("all"), &c4()).await;
    assert_eq!(next_msg(&mut j).await.0, "Ping");
    m.expect_nothing(QUIET).await;
    assert!(f.metric(0, "feedhub_aspnet_missing_protocol_total ").await > missing);

    // An excluded connection gets nothing.
    let mut ex = aspnet::decode_invocation(&Bytes::from(both_target())).unwrap();
    ex.excluded = vec![j.id.clone()];
    f.publish(&f.ch("all"), &aspnet::encode_invocation(&ex))
        .await;
    assert_eq!(next_msg(&mut m).await.0, "target");
    j.expect_nothing(QUIET).await;

    // connection channel: only that connection.
    let ch = f.ch(&format!("connection:{}", m.id));
    f.wait_subscribed(&ch, 1).await;
    f.publish(&ch, &c2()).await;
    assert_eq!(next_msg(&mut m).await.0, "FeedUpdated");
    j.expect_nothing(QUIET).await;

    // A group command for the JSON client: acked `91 07` on the harness's ack channel,
    // after which group sends reach it.
    let ack_ch = f.ch(&format!("internal:ack:{SERVER}"));
    let mut acks = listen(std::slice::from_ref(&ack_ch)).await;
    let add = |id: i64, action: u8, conn: &str| {
        aspnet::encode_group_command(&GroupCommand {
            id,
            server: SERVER.into(),
            action,
            group: "friends".into(),
            connection: conn.into(),
        })
    };
    f.publish(&f.ch("internal:groups"), &add(7, aspnet::ACTION_ADD, &j.id))
        .await;
    assert_eq!(acks.next_on(&ack_ch).await, hex("91 07"));
    let group_ch = f.ch("group:friends");
    assert_eq!(cluster::numsub(&mut f.redis, &group_ch).await, 1);
    f.publish(&f.ch("group:friends"), &c2()).await;
    assert_eq!(next_msg(&mut j).await.0, "FeedUpdated");
    m.expect_nothing(QUIET).await;
    // Remove: acked, and the group no longer reaches it.
    f.publish(
        &f.ch("internal:groups"),
        &add(8, aspnet::ACTION_REMOVE, &j.id),
    )
    .await;
    assert_eq!(acks.next_on(&ack_ch).await, hex("91 08"));
    f.publish(&f.ch("group:friends"), &c2()).await;
    j.expect_nothing(QUIET).await;
    // Not our connection: no ack (ASP.NET's rule).
    f.publish(
        &f.ch("internal:groups"),
        &add(9, aspnet::ACTION_ADD, "someone-elses"),
    )
    .await;
    acks.nothing_on(&ack_ch, QUIET).await;

    // A client result call (C.5's shape) for the JSON client, answered on our return
    // channel with C.5's reply bytes.
    let ret_logical = format!("{}:internal:return:{SERVER}", f.channels.hub());
    let ret_wire = f.ch(&format!("internal:return:{SERVER}"));
    let mut returns = listen(std::slice::from_ref(&ret_wire)).await;
    let call_id = "A".repeat(22);
    let mut frame =
        format!(r#"{{"type":1,"invocationId":"{call_id}","target":"GetStatus","arguments":[]}}"#)
            .into_bytes();
    frame.push(0x1e);
    let call = aspnet::encode_invocation(&AspNetInvocation {
        excluded: vec![],
        serializations: vec![("json".into(), Bytes::from(frame))],
        invocation_id: Some(call_id.clone()),
        return_channel: Some(ret_logical),
        origin: None,
    });
    f.publish(&f.ch(&format!("connection:{}", j.id)), &call)
        .await;
    answer_client_result(&mut j, "GetStatus", json!("ok")).await;
    let mut reply = hex("92 A4 6A 73 6F 6E C4 41");
    reply.extend_from_slice(
        format!(r#"{{"type":3,"invocationId":"{call_id}","result":"ok"}}"#).as_bytes(),
    );
    reply.push(0x1e);
    assert_eq!(returns.next_on(&ret_wire).await, reply, "C.5's reply");

    // Malformed payloads on every channel kind: counted and skipped; the next valid
    // message still arrives.
    let own_server = f.server_name(0);
    let garbage: Vec<Vec<u8>> = vec![
        hex("92 C0 80"),
        hex("95 07"),
        br#"{"not":"aspnet"}"#.to_vec(),
    ];
    let kinds = [
        ("aspnet_user", f.ch("user:1002")),
        ("aspnet_all", f.ch("all")),
        ("aspnet_connection", f.ch(&format!("connection:{}", j.id))),
        ("aspnet_groups", f.ch("internal:groups")),
        ("aspnet_ack", f.ch(&format!("internal:ack:{own_server}"))),
        (
            "aspnet_return",
            f.ch(&format!("internal:return:{own_server}")),
        ),
    ];
    for (kind, ch) in &kinds {
        let line = format!("feedhub_backplane_malformed_total{{kind=\"{kind}\"}} ");
        let before = f.metric(0, &line).await;
        for g in &garbage {
            f.publish(ch, g).await;
        }
        let (fr, lr, target) = (&f, &line, before + garbage.len() as u64);
        cluster::eventually(kind, support::WAIT, || async move {
            fr.metric(0, lr).await >= target
        })
        .await;
    }
    // Group channel with a member again.
    f.publish(
        &f.ch("internal:groups"),
        &add(10, aspnet::ACTION_ADD, &j.id),
    )
    .await;
    assert_eq!(acks.next_on(&ack_ch).await, hex("91 0A"));
    let line = "feedhub_backplane_malformed_total{kind=\"aspnet_group\"} ";
    let before = f.metric(0, line).await;
    f.publish(
        &f.ch("group:friends"),
        &hex("92 90 81 A4 6A 73 6F 6E A1 78"),
    )
    .await;
    f.publish(&f.ch("group:friends"), &c2()).await;
    assert_eq!(next_msg(&mut j).await.0, "FeedUpdated");
    assert!(f.metric(0, line).await > before);
    // A json entry without its 0x1E: not pushed to the JSON client (it would break its
    // parser), counted; the MessagePack entry still reaches the MessagePack client.
    let line = "feedhub_backplane_malformed_total{kind=\"aspnet_user\"} ";
    let before = f.metric(0, line).await;
    let mut bad = aspnet::decode_invocation(&Bytes::from(c2())).unwrap();
    let json = bad.serializations[0].1.clone();
    bad.serializations[0].1 = json.slice(..json.len() - 1);
    f.publish(&f.ch("user:1002"), &aspnet::encode_invocation(&bad))
        .await;
    assert_eq!(next_msg(&mut m).await.0, "FeedUpdated");
    j.expect_nothing(QUIET).await;
    assert!(f.metric(0, line).await > before);
    f.publish(&f.ch("user:1002"), &c2()).await;
    for c in [&mut j, &mut m] {
        assert_eq!(next_msg(c).await.0, "FeedUpdated", "still delivering");
    }
}

/// Waits for the client result call `method` and answers it.
async fn answer_client_result(c: &mut Client, method: &str, result: serde_json::Value) {
    loop {
        match within("client result call", c.raw.recv()).await {
            Some(HubMessage::Invocation(i)) if i.target == method => {
                let id = i.invocation_id.expect("a call with an invocation id");
                c.raw
                    .send(&HubMessage::Completion(Completion {
                        headers: vec![],
                        invocation_id: id,
                        result: CompletionResult::Value(Value::from(result)),
                    }))
                    .await;
                return;
            }
            Some(_) => continue,
            None => panic!("closed"),
        }
    }
}

// ---- feedhub → harness ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedhub_publishes_in_aspnet_format() {
    let Some(mut f) = fleet("out", 1, "").await else {
        return;
    };
    let user = format!("{}-u", f.prefix);
    let mut listener = listen(&[
        f.ch(&format!("user:{user}")),
        f.ch("all"),
        f.ch("group:g1"),
        f.ch("connection:asp-conn-1"),
        format!("feed-{user}"),
    ])
    .await;
    let mut a = f.connect(0, &user, ProtocolKind::Json).await;
    let mut b = f.connect(0, &user, ProtocolKind::MessagePack).await;

    // A typical 290-byte feed event through POST /api/feed.
    let filler = "x".repeat(220);
    let payload =
        json!({"id": "evt-1", "type": "post", "author": "1001", "text": filler, "ts": 1733600000});
    let event_len = payload.to_string().len();
    assert_eq!(
        cluster::post_feed(&f.nodes[0], &[&user], payload.clone()).await,
        202
    );
    let mut feed_bytes = 0;
    let mut asp = None;
    while feed_bytes == 0 || asp.is_none() {
        let (ch, p) = listener.next().await;
        if ch == format!("feed-{user}") {
            feed_bytes = p.len();
        } else if ch == f.ch(&format!("user:{user}")) {
            asp = Some(p);
        }
    }
    let asp = asp.unwrap();
    let inv = aspnet::decode_invocation(&Bytes::from(asp.clone())).expect("ASP.NET payload");
    assert!(inv.excluded.is_empty());
    assert!(
        matches!(inv.origin, Some(Origin::Feed(_))),
        "tagged as a feed copy"
    );
    let (target, arg) = both_entries(&inv);
    assert_eq!(target, "FeedUpdated");
    assert_eq!(arg["text"], payload["text"]);
    assert_eq!(
        arg["offset"], 1,
        "what feedhub's clients get: with the offset"
    );
    // feedhub clients get it once (through feed-<id>), not twice.
    for c in [&mut a, &mut b] {
        let (t, got) = next_msg(c).await;
        assert_eq!(t, "FeedUpdated");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&got).unwrap()["offset"],
            1
        );
        c.expect_nothing(QUIET).await;
    }
    println!(
        "COST feed event: payload {event_len} B; feedhub envelope on feed-<id> {feed_bytes} B; \
         ASP.NET payload (json + messagepack) {} B (json entry {} B, messagepack entry {} B); \
         Redis commands per event and recipient: 1 EVALSHA (history + feed-<id>) + 1 PUBLISH (H:user)",
        asp.len(),
        inv.serialization("json").unwrap().len(),
        inv.serialization("messagepack").unwrap().len(),
    );

    // Hub sends: group (with the sender excluded from nothing), others (all, excluded).
    within("Join", a.invoke("Join", vec![cluster::json(json!("g1"))])).await;
    f.wait_subscribed(&f.ch("group:g1"), 1).await;
    let r = within(
        "SendGroup",
        b.invoke(
            "SendGroup",
            vec![cluster::json(json!("g1")), cluster::json(json!("hello"))],
        ),
    )
    .await;
    assert!(
        matches!(r, CompletionResult::Value(_) | CompletionResult::Void),
        "{r:?}"
    );
    let p = listener.next_on(&f.ch("group:g1")).await;
    let inv = aspnet::decode_invocation(&Bytes::from(p.clone())).unwrap();
    assert!(matches!(&inv.origin, Some(Origin::Send(n)) if n == &format!("{}-node0", f.prefix)));
    assert_eq!(both_entries(&inv), ("Msg".into(), json!("hello")));
    let envelope = feedhub::backplane::envelope::encode(&feedhub::backplane::BackplaneMessage {
        origin: format!("{}-node0", f.prefix),
        payload: feedhub::backplane::BackplanePayload::Invocation {
            target: "Msg".into(),
            arguments: vec![Value::from(json!("hello"))],
            exclude: vec![],
        },
    })
    .expect("envelope");
    println!(
        "COST hub send Msg(\"hello\"): ASP.NET payload {} B vs feedhub envelope {} B; 1 PUBLISH per channel either way",
        p.len(),
        envelope.len()
    );
    // The local member got it once, not again from its own echo.
    assert_eq!(next_msg(&mut a).await, ("Msg".into(), "\"hello\"".into()));
    a.expect_nothing(QUIET).await;

    within(
        "SendOthers",
        a.invoke("SendOthers", vec![cluster::json(json!("bye"))]),
    )
    .await;
    let p = listener.next_on(&f.ch("all")).await;
    let inv = aspnet::decode_invocation(&Bytes::from(p)).unwrap();
    assert_eq!(inv.excluded, vec![a.id.clone()]);
    assert_eq!(both_entries(&inv), ("Msg".into(), json!("bye")));
    assert_eq!(next_msg(&mut b).await.0, "Msg");
    a.expect_nothing(QUIET).await;

    // Clients.Client(id) for a connection on no feedhub node: its ASP.NET connection
    // channel, plain 2 items.
    within(
        "SendConn",
        a.invoke(
            "SendConn",
            vec![
                cluster::json(json!("asp-conn-1")),
                cluster::json(json!("yo")),
            ],
        ),
    )
    .await;
    let p = listener.next_on(&f.ch("connection:asp-conn-1")).await;
    assert_eq!(p[0], 0x92, "2 items, as ASP.NET writes");
    let inv = aspnet::decode_invocation(&Bytes::from(p)).unwrap();
    assert_eq!(both_entries(&inv), ("Msg".into(), json!("yo")));
}

// ---- a mixed fleet ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_groups_and_client_results() {
    let Some(mut f) = fleet("mixed", 2, "").await else {
        return;
    };
    let mut a = f.connect(0, "ua", ProtocolKind::Json).await;
    let mut b = Fleet::connect_raw(&f.nodes[1], "ub", ProtocolKind::MessagePack).await;
    let groups_ch = f.ch("internal:groups");
    let mut harness = listen(&[groups_ch.clone(), f.ch("connection:asp-conn-2")]).await;

    // feedhub node 0 adds a connection of node 1 to a group: an ASP.NET group command,
    // applied and acked by node 1.
    let r = within(
        "AddTo",
        a.invoke(
            "AddTo",
            vec![cluster::json(json!(b.id)), cluster::json(json!("g"))],
        ),
    )
    .await;
    assert!(!matches!(r, CompletionResult::Error(_)), "{r:?}");
    let cmd = aspnet::decode_group_command(&harness.next_on(&groups_ch).await).unwrap();
    assert_eq!((cmd.action, cmd.group.as_str()), (aspnet::ACTION_ADD, "g"));
    assert_eq!(cmd.server, f.server_name(0));
    within(
        "SendGroup",
        a.invoke(
            "SendGroup",
            vec![cluster::json(json!("g")), cluster::json(json!("m1"))],
        ),
    )
    .await;
    assert_eq!(next_msg(&mut b).await, ("Msg".into(), "\"m1\"".into()));
    let r = within(
        "RemoveFrom",
        a.invoke(
            "RemoveFrom",
            vec![cluster::json(json!(b.id)), cluster::json(json!("g"))],
        ),
    )
    .await;
    assert!(!matches!(r, CompletionResult::Error(_)), "{r:?}");
    let cmd = aspnet::decode_group_command(&harness.next_on(&groups_ch).await).unwrap();
    assert_eq!(
        (cmd.action, cmd.connection.as_str()),
        (aspnet::ACTION_REMOVE, b.id.as_str())
    );
    within(
        "SendGroup",
        a.invoke(
            "SendGroup",
            vec![cluster::json(json!("g")), cluster::json(json!("m2"))],
        ),
    )
    .await;
    b.expect_nothing(QUIET).await;

    // A connection on the "ASP.NET server": the harness acks, as ASP.NET would.
    let add = tokio::spawn({
        let mut a_raw = a;
        async move {
            let r = a_raw
                .invoke(
                    "AddTo",
                    vec![
                        cluster::json(json!("asp-conn-1")),
                        cluster::json(json!("g")),
                    ],
                )
                .await;
            (a_raw, r)
        }
    });
    let cmd = aspnet::decode_group_command(&harness.next_on(&groups_ch).await).unwrap();
    assert_eq!(cmd.connection, "asp-conn-1");
    f.publish(
        &f.ch(&format!("internal:ack:{}", cmd.server)),
        &aspnet::encode_ack(cmd.id),
    )
    .await;
    let (mut a, r) = within("AddTo asp-conn-1", add).await.expect("task");
    assert!(!matches!(r, CompletionResult::Error(_)), "{r:?}");
    // Nobody owns it: the ack never comes, the call fails after the ack timeout (1 s here).
    let timeouts = f.metric(0, "feedhub_aspnet_ack_timeouts_total ").await;
    let r = within(
        "AddTo nobody",
        a.invoke(
            "AddTo",
            vec![cluster::json(json!("nobody")), cluster::json(json!("g"))],
        ),
    )
    .await;
    assert!(matches!(r, CompletionResult::Error(_)), "{r:?}");
    assert!(f.metric(0, "feedhub_aspnet_ack_timeouts_total ").await > timeouts);

    // Client results across feedhub nodes: node 0 asks node 1's client.
    let ask = tokio::spawn({
        let id = b.id.clone();
        async move {
            let r = a.invoke("Ask", vec![cluster::json(json!(id))]).await;
            (a, r)
        }
    });
    answer_client_result(&mut b, "GetStatus", json!("fine")).await;
    let (mut a, r) = within("Ask", ask).await.expect("task");
    match r {
        CompletionResult::Value(v) => assert_eq!(v.decode::<String>().unwrap(), "fine"),
        other => panic!("{other:?}"),
    }
    // ... and a connection of the "ASP.NET server": the 4-item call, answered on node 0's
    // return channel.
    let ask = tokio::spawn(async move {
        let r = a
            .invoke("Ask", vec![cluster::json(json!("asp-conn-2"))])
            .await;
        (a, r)
    });
    let p = harness.next_on(&f.ch("connection:asp-conn-2")).await;
    assert_eq!(p[0], 0x94, "4 items");
    let call = aspnet::decode_invocation(&Bytes::from(p)).unwrap();
    let id = call.invocation_id.clone().expect("invocation id");
    assert_eq!(id.len(), 22);
    let ret = call.return_channel.clone().expect("return channel");
    assert_eq!(ret, f.channels.logical_return(&f.server_name(0)));
    assert_eq!(both_entries(&call).0, "GetStatus");
    let mut done = format!(r#"{{"type":3,"invocationId":"{id}","result":"ok"}}"#).into_bytes();
    done.push(0x1e);
    f.publish(
        &f.channels.wire_of_logical(&ret).to_string(),
        &aspnet::encode_completion("json", &done),
    )
    .await;
    let (_a, r) = within("Ask asp-conn-2", ask).await.expect("task");
    match r {
        CompletionResult::Value(v) => assert_eq!(v.decode::<String>().unwrap(), "ok"),
        other => panic!("{other:?}"),
    }
}

// ---- the official JS client ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_js_client_receives_harness_pushes() {
    let Some(node) = external::node() else {
        return;
    };
    let Some(mut f) = fleet("js", 1, "").await else {
        return;
    };
    let user = format!("{}-js", f.prefix);
    let env = vec![
        ("FEEDHUB_URL", f.nodes[0].base_url.clone()),
        ("FEEDHUB_JWT_SECRET", TEST_SECRET.to_string()),
        ("FEEDHUB_USER", user.clone()),
        ("FEEDHUB_GROUP", "jsgroup".to_string()),
    ];
    let run = node.run("aspnet_backplane.mjs", &env, Duration::from_secs(60));
    let user_ch = f.ch(&format!("user:{user}"));
    let group_ch = f.ch("group:jsgroup");
    let ready_ch = f.ch(&format!("group:ready-{user}"));
    let harness = async {
        // Both clients (JSON and MessagePack) are connected and in the group when the
        // script joins its "ready" group.
        f.wait_subscribed(&ready_ch, 1).await;
        assert_eq!(cluster::numsub(&mut f.redis, &user_ch).await, 1);
        assert_eq!(cluster::numsub(&mut f.redis, &group_ch).await, 1);
        f.publish(&user_ch, &c2()).await;
        f.publish(&f.ch("all"), &both_target()).await;
        f.publish(&group_ch, &c2()).await;
    };
    let (run, ()) = tokio::join!(run, harness);
    run.assert_success();
}
