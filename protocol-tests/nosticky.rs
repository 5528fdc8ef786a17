//! No sticky sessions: two feedhub instances (sharing an in-process memory backplane, as
//! two nodes share Redis) behind the round-robin proxy, so consecutive TCP connections of one
//! client alternate between the instances.
//!
//! `protocol-tests/js/nosticky.mjs` drives the official `@microsoft/signalr` client with
//! `withStatefulReconnect()` (JSON and MessagePack): negotiate lands on one instance, the
//! WebSocket on the other (the connection lives where its first WebSocket lands), and after
//! each cut the resumed WebSocket lands on the instance that does not own the connection and
//! is relayed to the owner over the backplane (`http::relay`). It checks 1,000 streamed and
//! 1,000 sent messages arrive exactly once and in order across cuts, and prints the echo
//! round-trip latency direct vs relayed (p50/p99) = the latency forwarding adds.
//!
//! Server-Sent Events and Long Polling are not covered yet (see the README).

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
use std::time::Duration;

use feedhub::backplane::memory::MemoryBus;
use feedhub::{Server, ServerBuilder, ServerConfig};
use statehub::{state_hub, HubState};
use support::*;

async fn node(bus: &MemoryBus, state: &HubState, name: &str) -> Server {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        node_id: unique_prefix(name),
        ..ServerConfig::default()
    };
    ServerBuilder::new(config)
        .hub(state_hub(state, |_| {}))
        .memory_bus(bus.clone())
        .start()
        .await
        .expect("server")
}

async fn two_nodes_behind_proxy(protocol: &str) {
    let Some(node_rt) = external::node() else {
        return;
    };
    let bus = MemoryBus::new();
    let state = HubState::default();
    let a = node(&bus, &state, "a").await;
    let b = node(&bus, &state, "b").await;
    let proxy = rr_proxy::RrProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        vec![a.local_addr(), b.local_addr()],
    )
    .await
    .expect("proxy");
    state.set_cut(proxy.dropper());
    let run = node_rt
        .run(
            "nosticky.mjs",
            &[
                ("FEEDHUB_URL", format!("http://{}", proxy.local_addr())),
                ("FEEDHUB_PROTOCOL", protocol.to_string()),
            ],
            Duration::from_secs(240),
        )
        .await;
    run.assert_success();
    assert_eq!(
        state.connected.load(Ordering::SeqCst),
        1,
        "one connection across both instances"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_across_two_instances_json() {
    two_nodes_behind_proxy("json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_stateful_across_two_instances_messagepack() {
    two_nodes_behind_proxy("messagepack").await;
}
