//! No sticky sessions: two feedhub instances behind the round-robin proxy, so consecutive
//! TCP connections of one client alternate between the instances. The instances share a
//! backplane: an in-process memory bus (as two nodes share Redis) or a real Redis (the
//! `_redis` tests, with a unique channel prefix; skipped without Redis, failing under
//! `CI=true`). Both instances use the same JWT secret and distinct node ids.
//!
//! `protocol-tests/js/nosticky.mjs` drives the official `@microsoft/signalr` client with
//! `withStatefulReconnect()` (JSON and MessagePack): negotiate lands on one instance, the
//! WebSocket on the other (the connection lives where its first WebSocket lands), and after
//! each cut the resumed WebSocket lands on the instance that does not own the connection and
//! is relayed to the owner over the backplane (`http::relay`). It checks 1,000 streamed and
//! 1,000 sent messages arrive exactly once and in order across cuts, and prints the echo
//! round-trip latency direct vs relayed (p50/p99) = the latency forwarding adds.
//!
//! `protocol-tests/js/nosticky_http.mjs` drives the same client forced to Server-Sent Events
//! (JSON) or Long Polling (JSON and MessagePack), without stateful reconnect, with an
//! `HttpClient` that sends every request on a fresh TCP connection: the negotiate, each poll,
//! each send POST and the DELETE alternate between the instances, so about half of them land
//! on the instance that does not own the connection (the one that answered negotiate) and
//! must be forwarded to the owner over the backplane. It checks 1,000 echoes, 1,000 sends
//! processed once each in order, a 1,000-item stream once each in order, one connection id,
//! OnConnected once and no close until stop, and prints messages/s each way and the echo
//! round-trip latency (p50/p99). The test then checks the proxy sent at least
//! [`MIN_PER_BACKEND`] connections to each instance (so the requests really crossed) and
//! that stopping the client ran OnDisconnected once within [`WAIT`] (the DELETE or the end of
//! the event stream reached the owner, well before its disconnect timeout).

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

use feedhub::backplane::memory::MemoryBus;
use feedhub::backplane::redis::RedisConfig;
use feedhub::hub::HubDefinition;
use feedhub::{Server, ServerBuilder, ServerConfig};
use statehub::{state_hub, HubState};
use support::*;

/// Fewest TCP connections each instance must have received from the proxy in an HTTP
/// transport run (the run makes thousands; all of them on one instance would mean the
/// requests never crossed).
const MIN_PER_BACKEND: u64 = 100;

/// How long one client script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// The backplane the two instances share.
#[derive(Clone)]
enum Bus {
    /// One in-process bus.
    Memory(MemoryBus),
    /// The shared test Redis, with this test's unique channel prefix.
    Redis { url: String, prefix: String },
}

impl Bus {
    fn memory() -> Bus {
        Bus::Memory(MemoryBus::new())
    }

    /// The shared Redis; `None` (skip) when it is unreachable, a panic under `CI=true`.
    async fn redis(name: &str) -> Option<Bus> {
        cluster::redis().await?;
        Some(Bus::Redis {
            url: cluster::redis_url(),
            prefix: unique_prefix(name),
        })
    }
}

async fn node(bus: &Bus, state: &HubState, name: &str) -> Server {
    node_with(bus, name, vec![state_hub(state, |_| {})]).await
}

async fn node_with(bus: &Bus, name: &str, hubs: Vec<HubDefinition>) -> Server {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        node_id: unique_prefix(name),
        ..ServerConfig::default()
    };
    if let Bus::Redis { prefix, .. } = bus {
        config.channel_prefix = Some(prefix.clone());
    }
    let mut builder = ServerBuilder::new(config);
    for hub in hubs {
        builder = builder.hub(hub);
    }
    match bus {
        Bus::Memory(bus) => builder
            .memory_bus(bus.clone())
            .start()
            .await
            .expect("server"),
        Bus::Redis { url, .. } => {
            let server = builder
                .redis(RedisConfig::from_url(url).expect("redis url"))
                .start()
                .await
                .expect("server");
            cluster::eventually("the Redis backplane to connect", WAIT, || {
                let ready = server.backplane().is_ready();
                async move { ready }
            })
            .await;
            server
        }
    }
}

/// Two instances on `bus` behind a round-robin proxy (backend 0 = `a`, 1 = `b`).
struct Pair {
    a: Server,
    b: Server,
    proxy: rr_proxy::RrProxy,
    state: HubState,
}

impl Pair {
    async fn start(bus: &Bus) -> Pair {
        let state = HubState::default();
        let a = node(bus, &state, "a").await;
        let b = node(bus, &state, "b").await;
        let proxy = rr_proxy::RrProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            vec![a.local_addr(), b.local_addr()],
        )
        .await
        .expect("proxy");
        Pair { a, b, proxy, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.proxy.local_addr())
    }

    async fn shutdown(self) {
        drop(self.proxy);
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// The WebSocket client with stateful reconnect (`nosticky.mjs`), cut mid-run.
async fn stateful_websocket(bus: Bus, protocol: &str) {
    let Some(node_rt) = external::node() else {
        return;
    };
    let pair = Pair::start(&bus).await;
    pair.state.set_cut(pair.proxy.dropper());
    let run = node_rt
        .run(
            "nosticky.mjs",
            &[
                ("FEEDHUB_URL", pair.url()),
                ("FEEDHUB_PROTOCOL", protocol.to_string()),
            ],
            SCRIPT_TIMEOUT,
        )
        .await;
    run.assert_success();
    assert_eq!(
        pair.state.connected.load(Ordering::SeqCst),
        1,
        "one connection across both instances"
    );
    pair.shutdown().await;
}

/// The client forced to `transport` (`nosticky_http.mjs`), every request on a fresh TCP
/// connection.
async fn http_transport(bus: Bus, transport: &str, protocol: &str) {
    let Some(node_rt) = external::node() else {
        return;
    };
    let pair = Pair::start(&bus).await;
    let run = node_rt
        .run(
            "nosticky_http.mjs",
            &[
                ("FEEDHUB_URL", pair.url()),
                ("FEEDHUB_TRANSPORT", transport.to_string()),
                ("FEEDHUB_PROTOCOL", protocol.to_string()),
            ],
            SCRIPT_TIMEOUT,
        )
        .await;
    let per_backend = pair.proxy.accepted_per_backend();
    let forwarded = [pair.a.forwarded_requests(), pair.b.forwarded_requests()];
    let served = [
        pair.a.served_forwarded_requests(),
        pair.b.served_forwarded_requests(),
    ];
    println!(
        "rr_proxy connections per instance: {per_backend:?}; requests forwarded by each \
         instance: {forwarded:?}; forwarded requests served: {served:?}"
    );
    run.assert_success();
    assert!(
        forwarded.iter().sum::<u64>() >= MIN_PER_BACKEND,
        "requests landing on the instance that does not own the connection are forwarded \
         to the owner: {forwarded:?}"
    );
    assert_eq!(
        forwarded.iter().sum::<u64>(),
        served.iter().sum::<u64>(),
        "every forwarded request was served by the owner"
    );
    assert!(
        per_backend.iter().all(|&n| n >= MIN_PER_BACKEND),
        "the proxy must have sent at least {MIN_PER_BACKEND} connections to each instance \
         (requests crossing instances), got {per_backend:?}"
    );
    assert_eq!(
        pair.state.connected.load(Ordering::SeqCst),
        1,
        "one connection across both instances"
    );
    // Stopping the client (DELETE on Long Polling, closing the event stream on SSE) must
    // reach the owner: OnDisconnected runs once, long before the disconnect timeout.
    let started = Instant::now();
    cluster::eventually("OnDisconnected after the client stopped", WAIT, || {
        let n = pair.state.disconnected.load(Ordering::SeqCst);
        async move { n >= 1 }
    })
    .await;
    println!(
        "OnDisconnected ran {:?} after the client script exited",
        started.elapsed()
    );
    assert_eq!(
        pair.state.disconnected.load(Ordering::SeqCst),
        1,
        "OnDisconnected once"
    );
    pair.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_across_two_instances_json() {
    stateful_websocket(Bus::memory(), "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_across_two_instances_messagepack() {
    stateful_websocket(Bus::memory(), "messagepack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_longpolling_across_two_instances_json() {
    http_transport(Bus::memory(), "LongPolling", "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_longpolling_across_two_instances_messagepack() {
    http_transport(Bus::memory(), "LongPolling", "messagepack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sse_across_two_instances_json() {
    http_transport(Bus::memory(), "ServerSentEvents", "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_across_two_instances_redis() {
    let Some(bus) = Bus::redis("nst-ws").await else {
        return;
    };
    stateful_websocket(bus, "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_longpolling_across_two_instances_redis() {
    let Some(bus) = Bus::redis("nst-lp").await else {
        return;
    };
    http_transport(bus, "LongPolling", "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_sse_across_two_instances_redis() {
    let Some(bus) = Bus::redis("nst-sse").await else {
        return;
    };
    http_transport(bus, "ServerSentEvents", "json").await;
}

/// The old `@aspnet/signalr` 1.1.4 client (negotiate v0: its connection id is the token it
/// connects with) on each transport, through the proxy to two conformance instances: the
/// v0 id is signed and names the negotiating instance, so a WebSocket that lands on the
/// other instance is accepted there, and SSE and Long Polling requests are forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_aspnet_signalr_1x_across_two_instances() {
    let Some(node_rt) = external::node() else {
        return;
    };
    for transport in ["WebSockets", "ServerSentEvents", "LongPolling"] {
        let bus = Bus::memory();
        let hubs = || {
            vec![
                support::conformance::test_hub(),
                support::conformance::authorized_hub(),
            ]
        };
        let a = node_with(&bus, "v0a", hubs()).await;
        let b = node_with(&bus, "v0b", hubs()).await;
        let proxy = rr_proxy::RrProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            vec![a.local_addr(), b.local_addr()],
        )
        .await
        .expect("proxy");
        let run = node_rt
            .run(
                "aspnet1.mjs",
                &[
                    ("FEEDHUB_URL", format!("http://{}", proxy.local_addr())),
                    ("FEEDHUB_JWT_SECRET", TEST_SECRET.to_string()),
                    ("FEEDHUB_TRANSPORT", transport.to_string()),
                ],
                SCRIPT_TIMEOUT,
            )
            .await;
        let per_backend = proxy.accepted_per_backend();
        let forwarded = a.forwarded_requests() + b.forwarded_requests();
        println!(
            "@aspnet/signalr 1.x over {transport}: proxy connections per instance \
             {per_backend:?}, requests forwarded {forwarded}"
        );
        run.assert_success();
        assert!(
            per_backend.iter().all(|&n| n > 0),
            "both instances were used: {per_backend:?}"
        );
        drop(proxy);
        a.shutdown().await;
        b.shutdown().await;
    }
}
