//! Scale-out with Redis: several feedhub instances in this process on one real Redis.
//!
//! - users spread over three instances, some with connections on two or three: a publish
//!   for user X reaches all of X's connections and no one else's, `PUBSUB NUMSUB feed-X`
//!   equals the number of instances holding X and drops to 0 once X left everywhere;
//! - a Redis restart (a private `redis-server`, killed and restarted on the same port):
//!   clients stay connected, `/readyz` is 503 during the outage and 200 after, delivery
//!   resumes within 2 s without clients reconnecting; prints the resubscribe time of
//!   1,000+ channels;
//! - an instance started while Redis is down serves, is not ready, and recovers;
//! - per-user order of 10,000 events published on another instance and by foreign
//!   `PUBLISH`; the cross-instance delivery rate (printed);
//! - an event published right after the handshake was answered is not missed;
//! - connection churn leaves no subscription behind;
//! - the official `@microsoft/signalr` client (JSON on one instance, MessagePack on the
//!   other) through `protocol-tests/js/scaleout.mjs`.
//!
//! Run: `cargo test --release --test scaleout -- --nocapture` (prints the measurements).
//! Without Redis (or `redis-server` for the private one) the tests print `SKIPPED`, except
//! under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use feedhub::backplane::{Backplane, Channel};
use feedhub::protocol::ProtocolKind;
use serde_json::json;
use support::cluster::{self, Client, Cluster, PrivateRedis, DEBOUNCE};
use support::within;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_users_spread() {
    let Some(mut c) = cluster::redis_cluster(3, "spread").await else {
        return;
    };
    // user -> the nodes of its connections (node 2 twice for u5).
    let layout: Vec<(&str, Vec<usize>)> = vec![
        ("u1", vec![0]),
        ("u2", vec![1]),
        ("u3", vec![2]),
        ("u4", vec![0, 1]),
        ("u5", vec![1, 2, 2]),
        ("u6", vec![0, 1, 2]),
    ];
    let mut conns: Vec<(String, Client)> = Vec::new();
    for (name, nodes) in &layout {
        let user = c.user(name);
        for (i, node) in nodes.iter().enumerate() {
            let protocol = if i % 2 == 0 {
                ProtocolKind::Json
            } else {
                ProtocolKind::MessagePack
            };
            conns.push((user.clone(), c.connect(*node, &user, protocol).await));
        }
    }
    for (name, nodes) in &layout {
        let mut distinct = nodes.clone();
        distinct.dedup();
        let ch = Cluster::user_channel(&c.user(name));
        c.expect_subscribers(&ch, distinct.len(), Duration::from_secs(5))
            .await;
    }
    // Publish for each user through the HTTP API of some instance.
    for (i, (name, _)) in layout.iter().enumerate() {
        let user = c.user(name);
        let status = cluster::post_feed(
            &c.nodes[i % 3],
            &[&user],
            json!({"for": user, "text": "hello"}),
        )
        .await;
        assert_eq!(status, 202, "POST /api/feed");
        for (owner, client) in conns.iter_mut() {
            if *owner == user {
                let (target, arg) = within("FeedUpdated", client.next_invocation()).await;
                assert_eq!(target, "FeedUpdated");
                let v: serde_json::Value = serde_json::from_str(&arg).expect("json");
                assert_eq!(
                    v["for"],
                    json!(user),
                    "{} got another user's event",
                    client.id
                );
            }
        }
    }
    // Nobody got anything else (in particular nothing meant for another user).
    for (_, client) in conns.iter_mut() {
        client.expect_nothing(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(QUIET).await;
    for (_, client) in conns.iter_mut() {
        client.expect_nothing(Duration::ZERO).await;
    }
    // u4 and u6 leave everywhere: their channels drop to 0; the others stay.
    let (leaving, staying): (Vec<_>, Vec<_>) = conns
        .into_iter()
        .partition(|(u, _)| *u == c.user("u4") || *u == c.user("u6"));
    for (_, client) in leaving {
        client.close().await;
    }
    for name in ["u4", "u6"] {
        let ch = Cluster::user_channel(&c.user(name));
        c.expect_subscribers(&ch, 0, DEBOUNCE + Duration::from_secs(5))
            .await;
    }
    assert_eq!(
        c.subscribers(&Cluster::user_channel(&c.user("u5"))).await,
        2
    );
    drop(staying);
}

/// Redis goes away and comes back; clients stay connected throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resumes_delivery() {
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    let c = cluster::redis_cluster_at(&redis.url(), 2, "restart").await;
    let x = c.user("x");
    let mut client = c.connect(1, &x, ProtocolKind::Json).await;
    // 1,000 more live channels on node 1, to measure a resubscribe of a realistic size.
    let extra: Vec<Channel> = (0..1000)
        .map(|i| Channel::new(&format!("{}:extra:{i}", c.prefix)))
        .collect();
    within("subscribe 1000", c.redis[1].subscribe(&extra))
        .await
        .expect("subscribe 1000 channels");
    let live = c.redis[1].stats().subscribed;
    assert!(live >= 1002, "{live} channels subscribed");
    let sender = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    within(
        "send before",
        sender.user(&x).send("FeedUpdated", ("before",)),
    )
    .await
    .expect("send before the outage");
    assert_eq!(
        within("before", client.next_invocation()).await.1,
        "\"before\""
    );

    redis.kill();
    let outage = Instant::now();
    for node in &c.nodes {
        cluster::eventually("/readyz 503", Duration::from_secs(5), || async {
            cluster::readyz(node).await == 503
        })
        .await;
    }
    // Publishing fails promptly while Redis is away (the ingest can nack).
    let t = Instant::now();
    let r = within(
        "send during",
        sender.user(&x).send("FeedUpdated", ("lost",)),
    )
    .await;
    assert!(r.is_err(), "publish during the outage must fail");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "failed after {:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart().await;
    let back = Instant::now();
    // Delivery resumes on the same connection, without the client reconnecting.
    let mut n = 0u32;
    let delivered = loop {
        n += 1;
        if sender
            .user(&x)
            .send("FeedUpdated", (format!("after-{n}"),))
            .await
            .is_ok()
        {
            if let Ok((_, arg)) =
                tokio::time::timeout(Duration::from_millis(200), client.next_invocation()).await
            {
                break (arg, back.elapsed());
            }
        }
        assert!(
            back.elapsed() < Duration::from_secs(2),
            "delivery did not resume within 2 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(delivered.0.starts_with("\"after-"), "{delivered:?}");
    for node in &c.nodes {
        cluster::eventually("/readyz 200", Duration::from_secs(2), || async {
            cluster::readyz(node).await == 200
        })
        .await;
    }
    let stats = c.redis[1].stats();
    assert_eq!(stats.reconnects, 1);
    assert!(stats.last_resubscribed >= 1002, "{stats:?}");
    assert!(stats.subscribed >= 1002, "{stats:?}");
    println!(
        "MEASURED redis restart: outage {:?}; delivery resumed {:?} after Redis answered; \
         node 1 resubscribed {} channels in {:?}",
        back - outage,
        delivered.1,
        stats.last_resubscribed,
        stats.last_resubscribe
    );
    // The resubscribed channels are really live again on Redis.
    let mut inspect = cluster::redis_url_conn(&redis.url()).await;
    assert_eq!(
        cluster::numsub(&mut inspect, &format!("{}:extra:999", c.prefix)).await,
        1
    );
    assert_eq!(
        cluster::numsub(&mut inspect, &Cluster::user_channel(&x)).await,
        1
    );
}

/// An instance started while Redis is down serves (not ready) and recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_not_ready_while_redis_is_down() {
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    redis.kill();
    let c = cluster::redis_cluster_unready(&redis.url(), "down").await;
    assert_eq!(cluster::readyz(&c.nodes[0]).await, 503);
    redis.restart().await;
    cluster::eventually("/readyz 200", Duration::from_secs(5), || async {
        cluster::readyz(&c.nodes[0]).await == 200
    })
    .await;
    let mut a = c.connect(0, &c.user("a"), ProtocolKind::Json).await;
    // The hub-wide channel was subscribed by the background retry: sends to all work.
    let mut inspect = cluster::redis_url_conn(&redis.url()).await;
    let all = format!("{}:/hubs/feed:all", c.prefix);
    let start = Instant::now();
    while cluster::numsub(&mut inspect, &all).await != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "hub-wide channel not resubscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster::publish(&mut inspect, &all, r#"{"to":"all"}"#).await;
    let (target, arg) = within("FeedUpdated", a.next_invocation()).await;
    assert_eq!(
        (target.as_str(), arg.as_str()),
        ("FeedUpdated", r#"{"to":"all"}"#)
    );
}

async fn ordered_receive(client: &mut Client, total: usize, received: &AtomicUsize) {
    for i in 0..total {
        let (_, arg) = within("ordered event", client.next_invocation()).await;
        let v: serde_json::Value = serde_json::from_str(&arg).expect("json");
        assert_eq!(v["seq"], json!(i), "event {i} out of order: {arg}");
        received.store(i + 1, Ordering::Release);
    }
}

/// At most this many events are in flight to one client, so the test measures the backplane
/// and not the slow-consumer policy.
const WINDOW: usize = 1000;

async fn wait_window(sent: usize, received: &AtomicUsize) {
    let start = Instant::now();
    while sent >= received.load(Ordering::Acquire) + WINDOW {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "receiver stalled"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_order_10000_events_across_instances() {
    let Some(c) = cluster::redis_cluster(2, "order").await else {
        return;
    };
    const N: usize = 10_000;
    let x = c.user("x");
    let mut client = c.connect(1, &x, ProtocolKind::Json).await;

    // Published by the hub on instance 0, received on instance 1.
    let received = Arc::new(AtomicUsize::new(0));
    let sender = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    let start = Instant::now();
    let publisher = {
        let received = received.clone();
        let x = x.clone();
        tokio::spawn(async move {
            for i in 0..N {
                wait_window(i, &received).await;
                sender
                    .user(&x)
                    .send("FeedUpdated", (json!({ "seq": i }),))
                    .await
                    .expect("publish");
            }
        })
    };
    within("10,000 events", ordered_receive(&mut client, N, &received)).await;
    let took = start.elapsed();
    within("publisher", publisher).await.expect("publisher");
    println!(
        "MEASURED per-user order, hub publish on another instance: {N} events in {took:?} = {:.0} events/s",
        N as f64 / took.as_secs_f64()
    );

    // Foreign PUBLISH feed-<user> {json}, pipelined.
    let mut redis = cluster::redis_url_conn(&cluster::redis_url()).await;
    let received = Arc::new(AtomicUsize::new(0));
    let ch = Cluster::user_channel(&x);
    let start = Instant::now();
    let publisher = {
        let received = received.clone();
        tokio::spawn(async move {
            for chunk in (0..N).collect::<Vec<_>>().chunks(250) {
                wait_window(chunk[chunk.len() - 1], &received).await;
                let mut pipe = redis::pipe();
                for i in chunk {
                    pipe.cmd("PUBLISH")
                        .arg(&ch)
                        .arg(json!({ "seq": i }).to_string())
                        .ignore();
                }
                within("pipeline", pipe.query_async::<()>(&mut redis))
                    .await
                    .expect("PUBLISH pipeline");
            }
        })
    };
    within(
        "10,000 foreign events",
        ordered_receive(&mut client, N, &received),
    )
    .await;
    let took = start.elapsed();
    within("publisher", publisher).await.expect("publisher");
    println!(
        "MEASURED per-user order, foreign PUBLISH: {N} events in {took:?} = {:.0} events/s",
        N as f64 / took.as_secs_f64()
    );
}

/// One publisher on instance 0, 20 users with a connection each on instance 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_instance_delivery_rate() {
    let Some(c) = cluster::redis_cluster(2, "rate").await else {
        return;
    };
    const USERS: usize = 20;
    const PER_USER: usize = 1000;
    let mut clients = Vec::new();
    let mut users = Vec::new();
    for i in 0..USERS {
        let u = c.user(&format!("r{i}"));
        clients.push(c.connect(1, &u, ProtocolKind::Json).await);
        users.push(u);
    }
    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..USERS).map(|_| AtomicUsize::new(0)).collect());
    let sender = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    let start = Instant::now();
    // One publishing instance; each user's events are published in order by its own task
    // (as concurrent ingest consumers would), so the shared connection pipelines them.
    let mut publishers = Vec::new();
    for (u, user) in users.into_iter().enumerate() {
        let received = received.clone();
        let sender = sender.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..PER_USER {
                wait_window(i, &received[u]).await;
                sender
                    .user(&user)
                    .send("FeedUpdated", (json!({ "seq": i }),))
                    .await
                    .expect("publish");
            }
        }));
    }
    let mut readers = Vec::new();
    for (u, mut client) in clients.into_iter().enumerate() {
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            ordered_receive(&mut client, PER_USER, &received[u]).await;
        }));
    }
    for r in readers {
        within("reader", r).await.expect("reader");
    }
    let took = start.elapsed();
    for p in publishers {
        within("publisher", p).await.expect("publisher");
    }
    let total = USERS * PER_USER;
    println!(
        "MEASURED cross-instance delivery: {total} events ({USERS} users on another instance, one publisher) in {took:?} = {:.0} events/s",
        total as f64 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_no_subscriptions() {
    let Some(mut c) = cluster::redis_cluster(2, "churn").await else {
        return;
    };
    let users: Vec<String> = (0..8).map(|i| c.user(&format!("c{i}"))).collect();
    for round in 0..40 {
        // Several sessions at once, some of the same user, on both instances.
        let mut open = Vec::new();
        for k in 0..4 {
            let user = &users[(round * 3 + k) % users.len()];
            open.push(c.connect((round + k) % 2, user, ProtocolKind::Json).await);
        }
        for client in open {
            client.close().await;
        }
    }
    for user in &users {
        c.expect_subscribers(
            &Cluster::user_channel(user),
            0,
            DEBOUNCE + Duration::from_secs(5),
        )
        .await;
    }
    // Only the hub-wide channel is left (connection channels are dropped at once).
    let mut inspect = c.inspect.take().expect("redis");
    let left = cluster::channels(&mut inspect, &format!("{}:*", c.prefix)).await;
    assert_eq!(left, vec![format!("{}:/hubs/feed:all", c.prefix)]);
    for bp in &c.redis {
        cluster::eventually("backplane subscriptions", Duration::from_secs(5), || {
            let n = bp.stats().subscribed;
            async move { n == 1 }
        })
        .await;
    }
}

/// The official `@microsoft/signalr` client, JSON and MessagePack, on two instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_across_instances() {
    let Some(node) = external::node() else {
        return;
    };
    let Some(c) = cluster::redis_cluster(2, "official").await else {
        return;
    };
    let env = vec![
        ("FEEDHUB_URL", c.nodes[0].base_url.clone()),
        ("FEEDHUB_URL_B", c.nodes[1].base_url.clone()),
        ("FEEDHUB_JWT_SECRET", c.nodes[0].jwt_secret.clone()),
        ("FEEDHUB_API_KEY", c.nodes[0].api_key.clone()),
        ("FEEDHUB_USER_PREFIX", c.prefix.clone()),
    ];
    let run = node
        .run("scaleout.mjs", &env, Duration::from_secs(120))
        .await;
    drop(c);
    run.assert_success();
}

/// Garbage on a user channel (a broken envelope, non-JSON, a message over the size limit)
/// is dropped and counted; the connection, the instance and later messages are unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_publishes_are_dropped() {
    let Some(mut c) = cluster::redis_cluster(1, "hostile").await else {
        return;
    };
    let x = c.user("x");
    let mut client = c.connect(0, &x, ProtocolKind::MessagePack).await;
    let ch = Cluster::user_channel(&x);
    let mut redis = c.inspect.take().expect("redis");
    let mut broken = feedhub::backplane::envelope::MAGIC.to_vec();
    broken.extend_from_slice(&[
        0x95, 0xa1, b'n', 0x00, 0xa1, b'T', 0xdd, 0xff, 0xff, 0xff, 0xff,
    ]);
    let huge = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
    for payload in [
        broken,
        b"{not json".to_vec(),
        huge.into_bytes(),
        vec![0xff; 3],
    ] {
        let n: usize = within(
            "PUBLISH",
            redis::cmd("PUBLISH")
                .arg(&ch)
                .arg(payload)
                .query_async(&mut redis),
        )
        .await
        .expect("PUBLISH");
        assert_eq!(n, 1);
    }
    cluster::publish(&mut redis, &ch, r#"{"fine":true}"#).await;
    let (target, arg) = within("FeedUpdated", client.next_invocation()).await;
    assert_eq!(
        (target.as_str(), arg.as_str()),
        ("FeedUpdated", r#"{"fine":true}"#)
    );
    client.expect_nothing(QUIET).await;
    assert_eq!(cluster::readyz(&c.nodes[0]).await, 200);
    assert_eq!(
        c.redis[0].stats().reconnects,
        0,
        "garbage must not cost the connection"
    );
}

/// The handshake is answered only once the user's channel is subscribed: an event published
/// (on another instance, or by a foreign publisher) right after the client saw the handshake
/// response is never missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_right_after_handshake_is_not_missed() {
    let Some(mut c) = cluster::redis_cluster(2, "handshake").await else {
        return;
    };
    let sender = c.nodes[0].server().clients("/hubs/feed").expect("hub");
    for i in 0..30 {
        let user = c.user(&format!("h{i}"));
        let mut client = c.connect_handshake_only(1, &user).await;
        if i % 2 == 0 {
            within("send", sender.user(&user).send("FeedUpdated", (i,)))
                .await
                .expect("send");
        } else {
            c.foreign_publish(&Cluster::user_channel(&user), &i.to_string())
                .await;
        }
        let (target, arg) = within("first event", client.next_invocation()).await;
        assert_eq!((target.as_str(), arg), ("FeedUpdated", i.to_string()));
    }
}
