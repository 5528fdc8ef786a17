//! One backplane conformance suite, run against every backplane: the in-memory bus and a
//! real Redis (add a line to `conformance!` for a future one).
//!
//! Each case starts two feed servers on one backplane and checks, with real SignalR
//! connections (raw WebSocket clients), that sends cross instances exactly as on one
//! instance: to a user, to a connection on another instance, to a group (joined locally and
//! remotely), to all, to others and all-except; that one of two sessions of a user leaving
//! keeps the node's subscription and the last leaving drops it (`PUBSUB NUMSUB` on Redis,
//! the bus's count in memory); and that a foreign `PUBLISH feed-<user> <json>` reaches the
//! user as `FeedUpdated(<json>)`.
//!
//! Run: `cargo test --release --test backplane`. Without Redis the Redis cases print
//! `SKIPPED`, except under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use feedhub::protocol::{CompletionResult, ProtocolKind};
use serde_json::json;
use support::cluster::{self, Cluster, DEBOUNCE};
use support::within;

/// How long "nothing else arrives" is watched.
const QUIET: Duration = Duration::from_millis(300);

/// Sends to a user reach every connection of that user on every instance, and no one else.
async fn send_to_user(mut c: Cluster) {
    let x = c.user("x");
    let y = c.user("y");
    let mut xa = c.connect(0, &x, ProtocolKind::Json).await;
    let mut xb = c.connect(1, &x, ProtocolKind::MessagePack).await;
    let mut yb = c.connect(1, &y, ProtocolKind::Json).await;
    c.expect_subscribers(&Cluster::user_channel(&x), 2, Duration::from_secs(5))
        .await;
    let clients = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    within("send", clients.user(&x).send("Msg", ("to-x",)))
        .await
        .expect("send to user");
    for client in [&mut xa, &mut xb] {
        let (target, arg) = within("Msg", client.next_invocation()).await;
        assert_eq!((target.as_str(), arg.as_str()), ("Msg", "\"to-x\""));
    }
    yb.expect_nothing(QUIET).await;
    xa.expect_nothing(Duration::ZERO).await;
    xb.expect_nothing(QUIET).await;
}

/// A send to one connection reaches it on another instance, and only it.
async fn send_to_connection_on_other_instance(c: Cluster) {
    let mut target = c.connect(1, &c.user("t"), ProtocolKind::Json).await;
    let mut bystander = c.connect(1, &c.user("b"), ProtocolKind::Json).await;
    let clients = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    within(
        "send",
        clients.client(&target.id).send("Msg", ("just-you",)),
    )
    .await
    .expect("send to connection");
    let (_, arg) = within("Msg", target.next_invocation()).await;
    assert_eq!(arg, "\"just-you\"");
    bystander.expect_nothing(QUIET).await;
}

/// Group sends reach members on every instance, whether they joined on their own instance
/// or were added from another one; non-members get nothing.
async fn send_to_group(c: Cluster) {
    let group = format!("{}-g", c.prefix);
    let mut m1 = c.connect(0, &c.user("m1"), ProtocolKind::Json).await;
    let mut m2 = c.connect(1, &c.user("m2"), ProtocolKind::MessagePack).await;
    let mut m3 = c.connect(1, &c.user("m3"), ProtocolKind::Json).await;
    let mut outsider = c.connect(1, &c.user("o"), ProtocolKind::Json).await;
    for m in [&mut m1, &mut m2] {
        let r = m.invoke("Join", vec![cluster::json(json!(group))]).await;
        assert!(matches!(r, CompletionResult::Value(_)), "{r:?}");
    }
    // m3 (on node 1) is added from node 0: a group command across instances.
    let g = c.nodes[0].server().groups("/hubs/feed").expect("hub");
    within("remote add", g.add(&m3.id, &group))
        .await
        .expect("remote group add");
    // The remote add is applied asynchronously on node 1: wait for it to take effect.
    let node1 = c.nodes[1].server().hub("/hubs/feed").expect("hub");
    let gname = feedhub::ids::GroupName::new(&group).expect("group");
    cluster::eventually("remote group add", Duration::from_secs(5), || {
        let n = node1.registry().group_len(&gname);
        async move { n == 2 }
    })
    .await;
    let r = m1
        .invoke(
            "SendGroup",
            vec![
                cluster::json(json!(group)),
                cluster::json(json!("hello group")),
            ],
        )
        .await;
    assert!(matches!(r, CompletionResult::Value(_)), "{r:?}");
    for m in [&mut m1, &mut m2, &mut m3] {
        let (target, arg) = within("group Msg", m.next_invocation()).await;
        assert_eq!((target.as_str(), arg.as_str()), ("Msg", "\"hello group\""));
    }
    outsider.expect_nothing(QUIET).await;
}

/// All, Others and AllExcept across instances.
async fn send_to_all_others_except(c: Cluster) {
    let mut a = c.connect(0, &c.user("a"), ProtocolKind::Json).await;
    let mut b = c.connect(1, &c.user("b"), ProtocolKind::MessagePack).await;
    let mut d = c.connect(1, &c.user("d"), ProtocolKind::Json).await;
    let clients = c.nodes[1].server().clients("/hubs/feed").expect("hub");
    within("all", clients.all().send("Msg", ("everyone",)))
        .await
        .expect("send to all");
    for m in [&mut a, &mut b, &mut d] {
        let (_, arg) = within("all Msg", m.next_invocation()).await;
        assert_eq!(arg, "\"everyone\"");
    }
    // Others: everyone but the caller.
    let r = a
        .invoke("SendOthers", vec![cluster::json(json!("not-a"))])
        .await;
    assert!(matches!(r, CompletionResult::Value(_)), "{r:?}");
    for m in [&mut b, &mut d] {
        let (_, arg) = within("others Msg", m.next_invocation()).await;
        assert_eq!(arg, "\"not-a\"");
    }
    a.expect_nothing(QUIET).await;
    // AllExcept from node 0, excluding a connection on node 1.
    let clients0 = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    within(
        "all except",
        clients0.all_except([b.id.as_str()]).send("Msg", ("not-b",)),
    )
    .await
    .expect("send all except");
    for m in [&mut a, &mut d] {
        let (_, arg) = within("except Msg", m.next_invocation()).await;
        assert_eq!(arg, "\"not-b\"");
    }
    b.expect_nothing(QUIET).await;
}

/// One of two sessions of a user leaving keeps the node's subscription; the last leaving
/// unsubscribes (after the debounce).
async fn last_session_leaving_unsubscribes(mut c: Cluster) {
    let x = c.user("x");
    let ch = Cluster::user_channel(&x);
    let s1 = c.connect(0, &x, ProtocolKind::Json).await;
    let mut s2 = c.connect(0, &x, ProtocolKind::Json).await;
    c.expect_subscribers(&ch, 1, Duration::from_secs(5)).await;
    s1.close().await;
    // Well past the debounce: still subscribed, and still delivering.
    tokio::time::sleep(DEBOUNCE * 4).await;
    assert_eq!(
        c.subscribers(&ch).await,
        1,
        "one session left keeps the subscription"
    );
    c.foreign_publish(&ch, r#"{"still":"here"}"#).await;
    let (target, arg) = within("FeedUpdated", s2.next_invocation()).await;
    assert_eq!(
        (target.as_str(), arg.as_str()),
        ("FeedUpdated", r#"{"still":"here"}"#)
    );
    s2.close().await;
    c.expect_subscribers(&ch, 0, DEBOUNCE + Duration::from_secs(5))
        .await;
}

/// A foreign `PUBLISH feed-<user> <json>` reaches every connection of the user on every
/// instance as `FeedUpdated(<json>)`; non-JSON is dropped without harm.
async fn foreign_raw_json_on_user_channel(mut c: Cluster) {
    let x = c.user("x");
    let mut xa = c.connect(0, &x, ProtocolKind::Json).await;
    let mut xb = c.connect(1, &x, ProtocolKind::MessagePack).await;
    let mut other = c.connect(1, &c.user("other"), ProtocolKind::Json).await;
    c.expect_subscribers(&Cluster::user_channel(&x), 2, Duration::from_secs(5))
        .await;
    c.foreign_publish(&Cluster::user_channel(&x), "not json at all")
        .await;
    let payload = r#"{"text":"hi","n":[1,2.5,null]}"#;
    c.foreign_publish(&Cluster::user_channel(&x), payload).await;
    for m in [&mut xa, &mut xb] {
        let (target, arg) = within("FeedUpdated", m.next_invocation()).await;
        assert_eq!(target, "FeedUpdated");
        let got: serde_json::Value = serde_json::from_str(&arg).expect("json");
        let want: serde_json::Value = serde_json::from_str(payload).expect("json");
        assert_eq!(got, want);
    }
    other.expect_nothing(QUIET).await;
    xa.expect_nothing(Duration::ZERO).await;
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let c = super::cluster::memory_cluster(2, stringify!($case)).await;
                    super::$case(c).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(c) = super::cluster::redis_cluster(2, stringify!($case)).await else {
                        return;
                    };
                    super::$case(c).await;
                }
            )*
        }
    };
}

conformance!(
    send_to_user,
    send_to_connection_on_other_instance,
    send_to_group,
    send_to_all_others_except,
    last_session_leaving_unsubscribes,
    foreign_raw_json_on_user_channel,
);
