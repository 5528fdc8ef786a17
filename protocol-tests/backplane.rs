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
//! The history cases drive [`Backplane::append`] and [`Backplane::history`] directly:
//! offsets grow by exactly one per user and each append is published (kind-5 envelope) to
//! every subscribed node, the origin included; reads after an offset, of the newest, with
//! limits and `complete`; trimming to the size; a redelivered event found by its id is not
//! appended or published again; a lost history (memory: forgotten; Redis: the meta key
//! deleted) gets a new epoch and starts at offset 1 again.
//!
//! The user-group cases drive [`Backplane::user_group_add`], [`Backplane::user_group_remove`]
//! and [`Backplane::user_groups`] (the Azure REST API's user groups) from two nodes: shared,
//! ending at their end, per hub scope, removable, capped per user.
//!
//! Run: `cargo test --release --test backplane`. Without Redis the Redis cases print
//! `SKIPPED`, except under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use feedhub::backplane::memory::MemoryBackplane;
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::backplane::{
    Backplane, BackplanePayload, Channel, Delivery, FeedAppend, HistoryConfig, Inbox,
};
use feedhub::protocol::{CompletionResult, ProtocolKind};
use serde_json::json;
use support::cluster::{self, Cluster, Kind, DEBOUNCE};
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

// ---- history ----

/// A backplane of its own on the cluster's bus or Redis (history bounds of its own), with
/// the receiving end of its inbox.
async fn side_backplane(
    c: &Cluster,
    node: &str,
    history: HistoryConfig,
) -> (Arc<dyn Backplane>, tokio::sync::mpsc::Receiver<Delivery>) {
    let (inbox, mut rxs) = Inbox::new(1, 1024);
    let rx = rxs.pop().expect("one worker");
    let bp: Arc<dyn Backplane> = match &c.kind {
        Kind::Memory(bus) => {
            Arc::new(MemoryBackplane::new(bus.clone(), node, inbox).with_history(history))
        }
        Kind::Redis(url) => {
            let mut cfg = RedisConfig::from_url(url).expect("redis url");
            cfg.history = history;
            let bp = RedisBackplane::new(cfg, node, inbox);
            assert!(bp.wait_ready(Duration::from_secs(10)).await, "Redis");
            bp
        }
    };
    (bp, rx)
}

fn history_config(c: &Cluster, size: usize) -> HistoryConfig {
    HistoryConfig {
        size,
        key_prefix: c.prefix.clone(),
        ..HistoryConfig::default()
    }
}

fn append(user: &str, id: &str, payload: &str, redelivered: bool) -> FeedAppend {
    FeedAppend {
        user: user.to_string(),
        id: id.to_string(),
        payload: Bytes::from(payload.to_string()),
        redelivered,
    }
}

/// The next feed message a side backplane's inbox received: (offset, epoch, payload).
async fn next_feed(rx: &mut tokio::sync::mpsc::Receiver<Delivery>) -> (u64, String, String) {
    let d = within("feed message", rx.recv()).await.expect("inbox open");
    match &d.message.payload {
        BackplanePayload::Feed(f) => (
            f.offset,
            f.epoch.to_string(),
            String::from_utf8(f.payload.to_vec()).expect("utf8"),
        ),
        other => panic!("not a feed message: {other:?}"),
    }
}

/// Offsets grow by one per user, in batch order; each append is published to every
/// subscribed node (the appending one included) with its offset and epoch; reads return
/// what was appended.
async fn history_append_publish_and_read(c: Cluster) {
    let (a, mut rx_a) =
        side_backplane(&c, &format!("{}-a", c.prefix), history_config(&c, 100)).await;
    let (b, mut rx_b) =
        side_backplane(&c, &format!("{}-b", c.prefix), history_config(&c, 100)).await;
    let (u, v) = (c.user("u"), c.user("v"));
    let ch = Channel::new(&format!("feed-{u}"));
    a.subscribe(std::slice::from_ref(&ch))
        .await
        .expect("subscribe a");
    b.subscribe(std::slice::from_ref(&ch))
        .await
        .expect("subscribe b");
    let batch = vec![
        append(&u, "e1", r#"{"id":"e1","n":1}"#, false),
        append(&v, "e2", r#"{"n":2}"#, false),
        append(&u, "", r#"[3]"#, false),
        append(&u, "e4", r#"{"n":4}"#, false),
    ];
    let done = a.append(&batch).await.expect("append");
    assert_eq!(
        done.iter().map(|d| d.offset).collect::<Vec<_>>(),
        vec![1, 1, 2, 3]
    );
    assert!(done.iter().all(|d| !d.duplicate));
    let epoch_u = done[0].epoch.to_string();
    assert_eq!(done[2].epoch.to_string(), epoch_u);
    for rx in [&mut rx_a, &mut rx_b] {
        for (want_offset, want_payload) in
            [(1, r#"{"id":"e1","n":1}"#), (2, "[3]"), (3, r#"{"n":4}"#)]
        {
            let (offset, epoch, payload) = next_feed(rx).await;
            assert_eq!(
                (offset, epoch.as_str(), payload.as_str()),
                (want_offset, epoch_u.as_str(), want_payload)
            );
        }
    }
    // Newest, after an offset, limited, ahead of the top.
    let page = b.history(&u, None, 2).await.expect("read newest");
    assert_eq!(
        (page.offset, &*page.epoch, page.complete),
        (3, epoch_u.as_str(), true)
    );
    assert_eq!(
        page.events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let page = b.history(&u, Some(1), 10).await.expect("read after 1");
    assert!(page.complete);
    assert_eq!(
        page.events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(&page.events[0].1[..], b"[3]");
    assert!(
        b.history(&u, Some(3), 10)
            .await
            .expect("read at top")
            .complete
    );
    let page = b.history(&u, Some(0), 2).await.expect("limited");
    assert!(!page.complete, "the limit cut it");
    assert!(!b.history(&u, Some(9), 10).await.expect("ahead").complete);
    assert!(
        !b.history(&u, Some(u64::MAX), 10)
            .await
            .expect("huge")
            .complete
    );
    // A user without history gets a position: offset 0, complete.
    let w = c.user("w");
    let page = b.history(&w, Some(0), 10).await.expect("fresh");
    assert_eq!(
        (page.offset, page.complete, page.events.len()),
        (0, true, 0)
    );
    let again = a.history(&w, None, 10).await.expect("fresh again");
    assert_eq!(again.epoch, page.epoch, "reading creates one epoch, kept");
    assert_eq!(
        a.append(&[append(&w, "", "{}", false)])
            .await
            .expect("append w")[0]
            .offset,
        1
    );
}

/// The history keeps the newest `size` events; reads from before them are incomplete.
async fn history_is_trimmed_to_its_size(c: Cluster) {
    let (a, _rx) = side_backplane(&c, &format!("{}-a", c.prefix), history_config(&c, 5)).await;
    let u = c.user("u");
    let batch: Vec<FeedAppend> = (1..=12)
        .map(|i| append(&u, &format!("e{i}"), &format!(r#"{{"i":{i}}}"#), false))
        .collect();
    let done = a.append(&batch).await.expect("append");
    assert_eq!(done.last().map(|d| d.offset), Some(12));
    let page = a.history(&u, None, 100).await.expect("newest");
    assert_eq!(
        page.events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![8, 9, 10, 11, 12]
    );
    let page = a.history(&u, Some(3), 100).await.expect("after 3");
    assert!(!page.complete, "4..7 were trimmed");
    assert_eq!(page.events.first().map(|e| e.0), Some(8));
    assert!(a.history(&u, Some(7), 100).await.expect("after 7").complete);
}

/// A redelivered event whose id is among the newest is found, not appended or published
/// again; a redelivery of an unknown id, or without an id, is appended.
async fn history_redelivery_is_deduplicated(c: Cluster) {
    let (a, mut rx) = side_backplane(&c, &format!("{}-a", c.prefix), history_config(&c, 100)).await;
    let u = c.user("u");
    a.subscribe(&[Channel::new(&format!("feed-{u}"))])
        .await
        .expect("subscribe");
    a.append(&[
        append(&u, "m1", r#"{"k":1}"#, false),
        append(&u, "m2", r#"{"k":2}"#, false),
    ])
    .await
    .expect("append");
    let again = a
        .append(&[
            append(&u, "m1", r#"{"k":1}"#, true),
            append(&u, "m2", r#"{"k":2}"#, true),
            append(&u, "m3", r#"{"k":3}"#, true),
            append(&u, "", r#"{"k":4}"#, true),
        ])
        .await
        .expect("redeliver");
    assert_eq!(
        again
            .iter()
            .map(|d| (d.offset, d.duplicate))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true), (3, false), (4, false)]
    );
    let offsets: Vec<u64> = [
        next_feed(&mut rx).await.0,
        next_feed(&mut rx).await.0,
        next_feed(&mut rx).await.0,
        next_feed(&mut rx).await.0,
    ]
    .to_vec();
    assert_eq!(offsets, vec![1, 2, 3, 4], "duplicates were not published");
    assert!(
        tokio::time::timeout(QUIET, rx.recv()).await.is_err(),
        "nothing else published"
    );
}

/// A lost history (Redis without persistence restarted, keys expired or flushed; memory:
/// forgotten) gets a new epoch, starting at offset 1.
async fn history_lost_gets_a_new_epoch(mut c: Cluster) {
    let cfg = history_config(&c, 100);
    let (a, _rx) = side_backplane(&c, &format!("{}-a", c.prefix), cfg.clone()).await;
    let u = c.user("u");
    let first = a
        .append(&[append(&u, "", "{}", false), append(&u, "", "{}", false)])
        .await
        .expect("append");
    assert_eq!(first[1].offset, 2);
    match &c.kind {
        Kind::Memory(bus) => bus.forget_histories(),
        Kind::Redis(_) => {
            let conn = c.inspect.as_mut().expect("inspection connection");
            let _: i64 = within(
                "DEL",
                ::redis::cmd("DEL").arg(cfg.meta_key(&u)).query_async(conn),
            )
            .await
            .expect("DEL meta");
        }
    }
    let page = a.history(&u, Some(2), 10).await.expect("read");
    assert_ne!(page.epoch, first[1].epoch, "a new epoch");
    assert_eq!((page.offset, page.events.len()), (0, 0));
    let next = a
        .append(&[append(&u, "", "{}", false)])
        .await
        .expect("append");
    assert_eq!((next[0].offset, &next[0].epoch), (1, &page.epoch));
}

/// A batch larger than one Redis script call (several calls chained in one pipeline)
/// keeps every user's order and contiguous offsets, is published in that order, and finds
/// a redelivery of an event appended earlier in the same batch.
async fn history_large_batch_keeps_order(c: Cluster) {
    let (a, mut rx) =
        side_backplane(&c, &format!("{}-a", c.prefix), history_config(&c, 1000)).await;
    let users = [c.user("u"), c.user("v"), c.user("w")];
    let subscribed: Vec<Channel> = users[..2]
        .iter()
        .map(|u| Channel::new(&format!("feed-{u}")))
        .collect();
    a.subscribe(&subscribed).await.expect("subscribe");
    let mut batch: Vec<FeedAppend> = (0..700)
        .map(|i| {
            let id = format!("e{i}");
            append(&users[i % 3], &id, &format!(r#"{{"i":{i}}}"#), false)
        })
        .collect();
    // Event 0 (u's first) again, redelivered, in a later script call of the same batch.
    batch.insert(650, append(&users[0], "e0", r#"{"i":0}"#, true));
    let done = a.append(&batch).await.expect("append");
    assert_eq!(done.len(), batch.len());
    let mut next = [1u64; 3];
    for (i, (e, d)) in batch.iter().zip(&done).enumerate() {
        let k = users.iter().position(|u| *u == e.user).expect("user");
        if i == 650 {
            assert_eq!((d.offset, d.duplicate), (1, true), "found, not appended");
            continue;
        }
        assert_eq!((d.offset, d.duplicate), (next[k], false), "event {i}");
        assert_eq!(d.epoch, done[k].epoch, "one epoch per user");
        next[k] += 1;
    }
    // Published in order, each user's offsets 1, 2, 3, ...
    let want = batch.len() - 1 - 233; // w is not subscribed; the duplicate is not published
    let mut seen = [0u64; 2];
    for _ in 0..want {
        let d = within("feed message", rx.recv()).await.expect("inbox open");
        let BackplanePayload::Feed(f) = &d.message.payload else {
            panic!("not a feed message");
        };
        let k = users.iter().position(|u| *u == f.user).expect("user");
        assert_eq!(f.offset, seen[k] + 1, "{}'s order", f.user);
        seen[k] = f.offset;
    }
    assert_eq!(seen, [234, 233]);
    assert!(tokio::time::timeout(QUIET, rx.recv()).await.is_err());
    let page = a.history(&users[2], Some(0), 1000).await.expect("read w");
    assert!(page.complete);
    assert_eq!(page.events.len(), 233);
}

// ---- user groups (the Azure REST API's) ----

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn group_names(bp: &Arc<dyn Backplane>, scope: &str, user: &str, now: u64) -> Vec<String> {
    let mut names: Vec<String> = bp
        .user_groups(scope, user, now)
        .await
        .expect("user groups")
        .into_iter()
        .map(|g| g.group)
        .collect();
    names.sort();
    names
}

/// A user's group memberships are shared by every node, end at their end (a later add
/// replaces it), are kept per hub scope, can be removed one by one or all at once, and are
/// capped per user (the ones ending soonest go); on Redis the key expires with its last
/// membership.
async fn user_groups_are_shared_and_end(mut c: Cluster) {
    let (a, _ra) = side_backplane(&c, &format!("{}-ug-a", c.prefix), history_config(&c, 10)).await;
    let (b, _rb) = side_backplane(&c, &format!("{}-ug-b", c.prefix), history_config(&c, 10)).await;
    let scope = format!("{}:/hubs/feed", c.prefix);
    let user = c.user("ug");
    let now = unix_ms();
    a.user_group_add(&scope, &user, "g1", now + 60_000, now)
        .await
        .expect("add");
    a.user_group_add(&scope, &user, "g2", now + 1_000, now)
        .await
        .expect("add");
    b.user_group_add(&scope, &user, "g 3", now + 120_000, now)
        .await
        .expect("add");
    assert_eq!(
        group_names(&b, &scope, &user, now).await,
        ["g 3", "g1", "g2"]
    );
    assert_eq!(
        group_names(&a, &scope, &user, now + 1_000).await,
        ["g 3", "g1"],
        "g2 ended"
    );
    let ends: Vec<u64> = b
        .user_groups(&scope, &user, now)
        .await
        .expect("user groups")
        .into_iter()
        .filter(|g| g.group == "g1")
        .map(|g| g.expires_ms)
        .collect();
    assert_eq!(ends, [now + 60_000]);
    b.user_group_add(&scope, &user, "g1", now + 500, now)
        .await
        .expect("re-add");
    assert_eq!(
        group_names(&a, &scope, &user, now + 1_000).await,
        ["g 3"],
        "the later add's end wins"
    );
    assert!(group_names(&a, "another-scope", &user, now)
        .await
        .is_empty());
    a.user_group_remove(&scope, &user, Some("g 3"))
        .await
        .expect("remove");
    assert!(group_names(&b, &scope, &user, now + 1_000).await.is_empty());
    b.user_group_remove(&scope, &user, None)
        .await
        .expect("remove all");
    assert!(group_names(&a, &scope, &user, now).await.is_empty());
    // The cap: the memberships ending soonest are dropped.
    let capped = c.user("capped");
    let max = feedhub::backplane::MAX_USER_GROUPS;
    for i in 0..max + 3 {
        a.user_group_add(
            &scope,
            &capped,
            &format!("c{i}"),
            now + 60_000 + i as u64,
            now,
        )
        .await
        .expect("add");
    }
    let kept = b
        .user_groups(&scope, &capped, now)
        .await
        .expect("user groups");
    assert_eq!(kept.len(), max);
    assert!(
        kept.iter().all(|g| g.expires_ms >= now + 60_003),
        "soonest dropped"
    );
    a.user_group_remove(&scope, &capped, None)
        .await
        .expect("remove all");
    // Redis: the key goes away with its last membership.
    if let Some(conn) = c.inspect.as_mut() {
        let short = c.prefix.clone() + "-short";
        let t = unix_ms();
        a.user_group_add(&scope, &short, "g", t + 300, t)
            .await
            .expect("add");
        let key = format!("{scope}:ugroups:{short}");
        let exists = |conn: &mut ::redis::aio::MultiplexedConnection| {
            let key = key.clone();
            let mut conn = conn.clone();
            async move {
                ::redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .expect("EXISTS")
            }
        };
        assert_eq!(exists(conn).await, 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(exists(conn).await, 0, "expired with its last membership");
    }
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
    history_append_publish_and_read,
    history_is_trimmed_to_its_size,
    history_redelivery_is_deduplicated,
    history_lost_gets_a_new_epoch,
    history_large_batch_keeps_order,
    user_groups_are_shared_and_end,
);

/// Redis: a script call that fails keeps the events before the failure complete and stops
/// the rest of its batch: the later calls of the same pipeline change nothing (the fence),
/// so no event overtakes one that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failed_call_is_not_overtaken_by_its_batch() {
    let Some(mut c) = cluster::redis_cluster(1, "fence").await else {
        return;
    };
    let cfg = history_config(&c, 1000);
    let (a, mut rx) = side_backplane(&c, &format!("{}-a", c.prefix), cfg.clone()).await;
    let (bad, v) = (c.user("bad"), c.user("v"));
    a.subscribe(&[Channel::new(&format!("feed-{v}"))])
        .await
        .expect("subscribe");
    // bad has a position, but its events key is not a stream: its XADD fails (WRONGTYPE).
    let conn = c.inspect.as_mut().expect("inspection connection");
    let _: () = within(
        "HSET",
        ::redis::cmd("HSET")
            .arg(cfg.meta_key(&bad))
            .arg("e")
            .arg("x")
            .arg("s")
            .arg(0)
            .query_async(&mut *conn),
    )
    .await
    .expect("HSET");
    let _: () = within(
        "SET",
        ::redis::cmd("SET")
            .arg(cfg.stream_key(&bad))
            .arg("not a stream")
            .query_async(&mut *conn),
    )
    .await
    .expect("SET");
    // v x10, bad, v x290: the first script call fails at bad, the second is fenced.
    let mut batch: Vec<FeedAppend> = (0..10)
        .map(|i| append(&v, &format!("v{i}"), &format!(r#"{{"i":{i}}}"#), false))
        .collect();
    batch.push(append(&bad, "b", "{}", false));
    batch
        .extend((10..300).map(|i| append(&v, &format!("v{i}"), &format!(r#"{{"i":{i}}}"#), false)));
    let err = a.append(&batch).await.expect_err("bad's append fails");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    for want in 1..=10 {
        assert_eq!(next_feed(&mut rx).await.0, want, "the events before bad");
    }
    assert!(
        tokio::time::timeout(QUIET, rx.recv()).await.is_err(),
        "nothing after bad was published"
    );
    let page = a.history(&v, Some(0), 1000).await.expect("read v");
    assert_eq!(
        (page.offset, page.events.len()),
        (10, 10),
        "nothing after bad"
    );
    let _: () = within(
        "DEL",
        ::redis::cmd("DEL")
            .arg(cfg.meta_key(&bad))
            .arg(cfg.stream_key(&bad))
            .query_async(&mut *conn),
    )
    .await
    .expect("DEL");
}

/// Redis: an emptied script cache (`SCRIPT FLUSH`: NOSCRIPT replies on the same
/// connection) and a restarted Redis (a new connection) both load the script again; a
/// batch of several script calls is appended completely and in order after the flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_script_is_loaded_again() {
    let Some(mut redis) = cluster::PrivateRedis::start().await else {
        return;
    };
    let url = redis.url();
    let (inbox, _rxs) = Inbox::new(1, 1024);
    let mut cfg = RedisConfig::from_url(&url).expect("redis url");
    cfg.backoff_max = Duration::from_millis(100);
    cfg.history = HistoryConfig {
        size: 1000,
        key_prefix: "reload".to_string(),
        ..HistoryConfig::default()
    };
    let bp = RedisBackplane::new(cfg, "reload-node", inbox);
    assert!(bp.wait_ready(Duration::from_secs(10)).await, "Redis");
    let one = |id: &str| append("u", id, "{}", false);
    assert_eq!(
        bp.append(&[one("first")]).await.expect("append")[0].offset,
        1
    );

    let mut conn = cluster::redis_url_conn(&url).await;
    let flush = || ::redis::cmd("SCRIPT").arg("FLUSH").to_owned();
    let _: () = within("SCRIPT FLUSH", flush().query_async(&mut conn))
        .await
        .expect("flush");
    let batch: Vec<FeedAppend> = (0..600).map(|i| one(&format!("e{i}"))).collect();
    let done = bp.append(&batch).await.expect("append after SCRIPT FLUSH");
    assert_eq!(
        done.iter().map(|d| d.offset).collect::<Vec<_>>(),
        (2..=601).collect::<Vec<_>>()
    );
    let _: () = within("SCRIPT FLUSH", flush().query_async(&mut conn))
        .await
        .expect("flush");
    let page = bp
        .history("u", Some(591), 100)
        .await
        .expect("read after flush");
    assert_eq!(
        (page.offset, page.events.len(), page.complete),
        (601, 10, true)
    );

    // Restarted without persistence: a new connection loads the script; a new epoch.
    redis.restart().await;
    let started = std::time::Instant::now();
    let again = loop {
        match bp.append(&[one("after restart")]).await {
            Ok(done) => break done,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(10), "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(again[0].offset, 1);
    assert_ne!(again[0].epoch, done[0].epoch);
}
