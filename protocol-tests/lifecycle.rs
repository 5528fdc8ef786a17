//! Connection life cycle with short timers: handshake deadline, server keep-alive pings,
//! client timeout after the first ping, slow consumers (a write that times out is counted as
//! a slow-consumer close), and graceful shutdown sending Close with `allowReconnect: true` to
//! every client.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use futures_util::StreamExt;

use feedhub::hub::{HubBuilder, HubContext, HubError};
use feedhub::protocol::{Close, HubMessage, ProtocolKind};
use feedhub::{Server, ServerBuilder, ServerConfig};
use support::*;

async fn server_with(f: impl FnOnce(&mut feedhub::hub::HubOptions)) -> Server {
    let hub = HubBuilder::new("/short")
        .configure(f)
        .method("Echo", |_c: HubContext, (s,): (String,)| async move {
            Ok::<_, HubError>(s)
        })
        // Pushes `n` messages of `size` bytes to the caller (a flood it may not read).
        .method(
            "Flood",
            |c: HubContext, (n, size): (usize, usize)| async move {
                let body: std::sync::Arc<str> = "f".repeat(size.min(1 << 20)).into();
                for _ in 0..n.min(100_000) {
                    c.clients().caller().send("Bulk", (body.clone(),)).await?;
                }
                Ok::<_, HubError>(())
            },
        )
        .build();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    ServerBuilder::new(config).hub(hub).start().await.unwrap()
}

fn url(s: &Server) -> String {
    format!("ws://{}/short", s.local_addr())
}

#[tokio::test]
async fn a_silent_client_gets_the_handshake_canceled_after_the_deadline() {
    let s = server_with(|o| o.handshake_timeout = Duration::from_millis(300)).await;
    let mut c = RawClient::open(&url(&s)).await;
    let started = std::time::Instant::now();
    let resp = c.recv_raw().await.expect("an error response");
    assert_eq!(resp, b"{\"error\":\"Handshake was canceled.\"}\x1e");
    assert!(started.elapsed() >= Duration::from_millis(250));
    c.expect_closed().await;
}

#[tokio::test]
async fn the_server_pings_an_idle_connection_at_the_keep_alive_interval() {
    let s = server_with(|o| o.keep_alive_interval = Duration::from_millis(200)).await;
    for p in ProtocolKind::ALL {
        let mut c = RawClient::connect(&url(&s), p).await;
        let started = std::time::Instant::now();
        let frame = c.recv_raw().await.expect("a ping");
        let mut expected = Vec::new();
        p.encode(&HubMessage::Ping, &mut expected).unwrap();
        assert_eq!(frame, expected, "{p:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_client_timeout_counted_from_the_handshake() {
    let s = server_with(|o| {
        o.client_timeout = Duration::from_millis(400);
        o.keep_alive_interval = Duration::from_millis(100);
    })
    .await;
    // Issue 14: a client that completes the handshake and never sends anything is timed out
    // too (the timer no longer waits for a first Ping), as is one that stops after a Ping.
    let mut quiet = RawClient::connect(&url(&s), ProtocolKind::Json).await;
    let mut c = RawClient::connect(&url(&s), ProtocolKind::Json).await;
    let mut alive = RawClient::connect(&url(&s), ProtocolKind::Json).await;
    c.send(&HubMessage::Ping).await;
    let started = std::time::Instant::now();
    let closes = async {
        for client in [&mut quiet, &mut c] {
            let close = loop {
                match client.recv().await {
                    Some(HubMessage::Close(close)) => break close,
                    Some(_) => continue,
                    None => panic!("socket closed without a Close message"),
                }
            };
            assert!(close.allow_reconnect);
            assert!(close.error.unwrap().contains("ClientTimeoutInterval"));
            client.expect_closed().await;
        }
    };
    // Meanwhile a client that keeps pinging is still served.
    let pings = async {
        for _ in 0..12 {
            alive.send(&HubMessage::Ping).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::join!(closes, pings);
    assert!(started.elapsed() < Duration::from_secs(3));
    alive
        .send_text(
            "{\"type\":1,\"invocationId\":\"1\",\"target\":\"echo\",\"arguments\":[\"x\"]}\u{1e}",
        )
        .await;
    loop {
        match alive.recv().await.expect("still open") {
            HubMessage::Completion(done) => {
                assert_eq!(done.invocation_id, "1");
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn graceful_shutdown_sends_close_with_allow_reconnect_to_every_client() {
    let s = server_with(|_| {}).await;
    let mut clients = Vec::new();
    for p in [
        ProtocolKind::Json,
        ProtocolKind::MessagePack,
        ProtocolKind::Json,
    ] {
        clients.push(RawClient::connect(&url(&s), p).await);
    }
    let shutdown = tokio::spawn(s.shutdown());
    for c in &mut clients {
        let close = loop {
            match c.recv().await {
                Some(HubMessage::Close(close)) => break close,
                Some(_) => continue,
                None => panic!("closed without a Close message"),
            }
        };
        assert_eq!(
            close,
            Close {
                error: None,
                allow_reconnect: true
            }
        );
        c.expect_closed().await;
    }
    within("shutdown to finish", shutdown).await.unwrap();
}

/// A client that stops reading while the queue policy never closes it (DropNewest, a queue
/// larger than the flood): the socket write times out after the send timeout (10 s), the
/// connection ends, and `feedhub_slow_consumer_closes_total` counts it like a full queue's
/// close. A bystander is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_timeout_counts_as_a_slow_consumer_close() {
    use feedhub::connection::outbound::{OutboundLimits, SlowConsumerPolicy};
    use feedhub::metrics::METRICS;
    use std::sync::atomic::Ordering;

    let s = server_with(|o| {
        o.slow_consumer = SlowConsumerPolicy::DropNewest;
        o.outbound = OutboundLimits {
            max_messages: 100_000,
            max_bytes: 256 << 20,
        };
    })
    .await;
    let before = METRICS.slow_consumer_closes.load(Ordering::Relaxed);
    let mut bystander = RawClient::connect(&url(&s), ProtocolKind::Json).await;
    let mut victim = RawClient::connect(&url(&s), ProtocolKind::Json).await;
    // 48 MiB: far beyond the wire bound and both sockets' buffers. The victim never reads.
    victim
        .send_text("{\"type\":1,\"target\":\"Flood\",\"arguments\":[3072,16384]}\u{1e}")
        .await;
    let started = std::time::Instant::now();
    let mut n = 0;
    loop {
        if METRICS.slow_consumer_closes.load(Ordering::Relaxed) > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "no slow-consumer close counted {:?} after a client stopped reading",
            started.elapsed()
        );
        n += 1;
        bystander
            .send_text(format!(
                "{{\"type\":1,\"invocationId\":\"{n}\",\"target\":\"echo\",\"arguments\":[\"x\"]}}\u{1e}"
            ))
            .await;
        loop {
            match bystander.recv().await.expect("bystander still open") {
                HubMessage::Completion(done) => {
                    assert_eq!(done.invocation_id, n.to_string());
                    break;
                }
                _ => continue,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The send timeout is 10 s; the close is counted once it fires, not before.
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "counted after {:?}, before any send timeout could fire",
        started.elapsed()
    );
    // The victim's connection is gone: reading what was buffered ends in the socket closing.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(_)) = victim.ws.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection was not closed");
}
