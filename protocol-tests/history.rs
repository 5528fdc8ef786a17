//! Per-user history with offsets, `Recover`, server-side gap repair and raw passthrough
//! (issue 12), on the in-memory bus and on Redis.
//!
//! - every ingested event reaches each connection of the user (JSON and MessagePack, on
//!   both instances) with `"offset"` growing by one, and `Recover` on either instance
//!   returns the events after an offset, the newest, or `recovered: false` with the
//!   position (unknown epoch, an offset ahead of the history, more missed than the limit);
//! - bad `Recover` arguments get a Completion error and the connection keeps working;
//! - a raw `PUBLISH feed-<id> <json>` is delivered as is: no offset, nothing stored;
//! - `FeedUpdated` sends to users from Rust are appended too;
//! - a node that sees a user's offset jump fetches the missing events and delivers them in
//!   order before the newer one (the gap is made by appending without publishing);
//! - Redis only: a node that lost its subscriptions (a private `redis-server` restarted,
//!   without persistence) repairs what was published meanwhile once it is back, without the
//!   client doing anything; two real `feedhub` processes, one killed with SIGKILL, and the
//!   official `@microsoft/signalr` client recovering on the other (`js/history.mjs`, using
//!   the README recipe `js/feed_follower.mjs`).
//!
//! Run: `cargo test --release --test history`. Without Redis, `redis-server` or Node the
//! Redis/JS cases print `SKIPPED`, except under `CI=true`, where they fail.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use feedhub::backplane::memory::MemoryBackplane;
use feedhub::backplane::redis::{RedisBackplane, RedisConfig};
use feedhub::backplane::{Backplane, FeedAppend, HistoryConfig, Inbox};
use feedhub::protocol::{CompletionResult, ProtocolKind};
use feedhub::{feed, ServerBuilder, ServerConfig};
use serde_json::{json, Value as J};
use support::cluster::{self, Client, Cluster, Kind, PrivateRedis};
use support::{within, TEST_API_KEY, TEST_SECRET};

const QUIET: Duration = Duration::from_millis(300);

/// `Recover(arg)`: the answer, or the Completion error text.
async fn recover(client: &mut Client, arg: J) -> Result<J, String> {
    match within(
        "Recover",
        client.invoke("Recover", vec![cluster::json(arg)]),
    )
    .await
    {
        CompletionResult::Value(v) => Ok(v.decode::<J>().expect("Recover answer")),
        CompletionResult::Error(e) => Err(e),
        CompletionResult::Void => panic!("Recover answered nothing"),
    }
}

/// The next `FeedUpdated` payload.
async fn next_feed(client: &mut Client) -> J {
    let (target, arg) = within("FeedUpdated", client.next_invocation()).await;
    assert_eq!(target, "FeedUpdated");
    serde_json::from_str(&arg).expect("json payload")
}

fn offsets(events: &J) -> Vec<u64> {
    events
        .as_array()
        .expect("events array")
        .iter()
        .map(|e| e["offset"].as_u64().expect("offset"))
        .collect()
}

/// Events reach every connection with offsets; `Recover` answers on both instances.
async fn offsets_and_recover(mut c: Cluster) {
    let u = c.user("u");
    let mut xa = c.connect(0, &u, ProtocolKind::Json).await;
    let mut xb = c.connect(1, &u, ProtocolKind::MessagePack).await;
    c.expect_subscribers(&Cluster::user_channel(&u), 2, Duration::from_secs(5))
        .await;
    let first = recover(&mut xa, J::Null).await.expect("first load");
    assert_eq!(first["events"], json!([]));
    assert_eq!(
        (first["recovered"].clone(), first["offset"].clone()),
        (json!(true), json!(0))
    );
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    for i in 1..=3 {
        let status =
            cluster::post_feed(&c.nodes[1], &[&u], json!({"id": format!("e{i}"), "n": i})).await;
        assert_eq!(status, 202);
    }
    for client in [&mut xa, &mut xb] {
        for i in 1..=3u64 {
            let got = next_feed(client).await;
            assert_eq!(got, json!({"id": format!("e{i}"), "n": i, "offset": i}));
        }
    }
    // The newest, from the other instance: the same history.
    let all = recover(&mut xb, J::Null).await.expect("Recover(null)");
    assert_eq!(offsets(&all["events"]), vec![1, 2, 3]);
    assert_eq!(all["events"][0], json!({"id": "e1", "n": 1, "offset": 1}));
    assert_eq!(
        (all["offset"].clone(), all["epoch"].clone()),
        (json!(3), json!(epoch))
    );
    let after1 = recover(&mut xa, json!({"offset": 1, "epoch": epoch}))
        .await
        .expect("after 1");
    assert_eq!(after1["recovered"], json!(true));
    assert_eq!(offsets(&after1["events"]), vec![2, 3]);
    let at_top = recover(&mut xa, json!({"offset": 3, "epoch": epoch}))
        .await
        .expect("at top");
    assert_eq!(
        (at_top["recovered"].clone(), at_top["events"].clone()),
        (json!(true), json!([]))
    );
    // Not recoverable: the position comes back, no events.
    for arg in [
        json!({"offset": 4, "epoch": epoch}),
        json!({"offset": 1, "epoch": "some-other-epoch"}),
        json!({"offset": 1, "epoch": ""}),
        json!({"offset": 1e30, "epoch": epoch}),
        json!({"offset": u64::MAX, "epoch": epoch}),
    ] {
        let r = recover(&mut xb, arg.clone()).await.expect("an answer");
        assert_eq!(
            r,
            json!({"events": [], "recovered": false, "offset": 3, "epoch": epoch}),
            "{arg}"
        );
    }
    // A non-object payload: no offset (but it has one: the next object shows it).
    assert_eq!(
        cluster::post_feed(&c.nodes[0], &[&u], json!([1, 2])).await,
        202
    );
    assert_eq!(next_feed(&mut xa).await, json!([1, 2]));
    assert_eq!(
        cluster::post_feed(&c.nodes[0], &[&u], json!({"n": 5})).await,
        202
    );
    assert_eq!(next_feed(&mut xa).await, json!({"n": 5, "offset": 5}));
    let r = recover(&mut xa, json!({"offset": 3, "epoch": epoch}))
        .await
        .expect("after 3");
    assert_eq!(r["events"], json!([[1, 2], {"n": 5, "offset": 5}]));
    // A payload with its own top-level offset is refused (400), nothing appended.
    let auth = format!("Bearer {TEST_API_KEY}");
    let (status, body) = cluster::http(
        &c.nodes[0].base_url,
        "POST",
        "/api/feed",
        &[("Authorization", auth.as_str())],
        &json!({"recipients": [u], "payload": {"offset": 1}}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("offset"), "{body}");
    xa.expect_nothing(QUIET).await;
}

/// Malformed `Recover` arguments get a Completion error; the connection keeps working.
async fn recover_bad_input(c: Cluster) {
    let u = c.user("bad");
    let mut x = c.connect(0, &u, ProtocolKind::Json).await;
    for arg in [
        json!(7),
        json!("x"),
        json!(true),
        json!([0, "e"]),
        json!({}),
        json!({"offset": 1}),
        json!({"epoch": "e"}),
        json!({"offset": -1, "epoch": "e"}),
        json!({"offset": 1.5, "epoch": "e"}),
        json!({"offset": "1", "epoch": "e"}),
        json!({"offset": null, "epoch": "e"}),
        json!({"offset": 1, "epoch": 5}),
        json!({"offset": 1, "epoch": null}),
        json!({"offset": 1, "epoch": "e", "since": 0}),
    ] {
        let e = recover(&mut x, arg.clone())
            .await
            .expect_err(&arg.to_string());
        assert!(e.contains("HubException"), "{arg}: {e}");
        assert!(
            e.contains("offset") || e.contains("epoch") || e.contains("Recover"),
            "{e}"
        );
    }
    for args in [vec![], vec![cluster::json(J::Null), cluster::json(J::Null)]] {
        let r = within("Recover arity", x.invoke("Recover", args)).await;
        assert!(matches!(r, CompletionResult::Error(_)), "{r:?}");
    }
    // Still usable.
    let ok = recover(&mut x, J::Null).await.expect("Recover(null)");
    assert_eq!(ok["recovered"], json!(true));
    assert!(matches!(
        within("WhoAmI", x.invoke("WhoAmI", vec![])).await,
        CompletionResult::Value(_)
    ));
}

/// A raw `PUBLISH feed-<id> <json>` reaches the user live, without an offset, and is not
/// stored; appended events keep their own numbering.
async fn raw_publish_passes_through(mut c: Cluster) {
    let u = c.user("raw");
    let mut x = c.connect(1, &u, ProtocolKind::Json).await;
    let mut y = c.connect(0, &u, ProtocolKind::MessagePack).await;
    c.expect_subscribers(&Cluster::user_channel(&u), 2, Duration::from_secs(5))
        .await;
    c.foreign_publish(
        &Cluster::user_channel(&u),
        r#"{"text":"raw","offset":"theirs"}"#,
    )
    .await;
    for client in [&mut x, &mut y] {
        assert_eq!(
            next_feed(client).await,
            json!({"text": "raw", "offset": "theirs"})
        );
    }
    let r = recover(&mut x, J::Null).await.expect("Recover(null)");
    assert_eq!(
        (r["events"].clone(), r["offset"].clone()),
        (json!([]), json!(0))
    );
    assert_eq!(
        cluster::post_feed(&c.nodes[0], &[&u], json!({"k": 1})).await,
        202
    );
    assert_eq!(next_feed(&mut x).await, json!({"k": 1, "offset": 1}));
    assert_eq!(next_feed(&mut y).await, json!({"k": 1, "offset": 1}));
}

/// `Clients.User(..).Send("FeedUpdated", payload)` from Rust is appended like any event.
async fn rust_sends_are_appended(c: Cluster) {
    let u = c.user("rs");
    let mut x = c.connect(1, &u, ProtocolKind::Json).await;
    let clients = c.nodes[0]
        .server()
        .clients(feed::FEED_HUB_PATH)
        .expect("hub");
    for i in 1..=2 {
        within(
            "send",
            clients.user(&u).send("FeedUpdated", (json!({"k": i}),)),
        )
        .await
        .expect("send");
    }
    assert_eq!(next_feed(&mut x).await, json!({"k": 1, "offset": 1}));
    assert_eq!(next_feed(&mut x).await, json!({"k": 2, "offset": 2}));
    let epoch = recover(&mut x, J::Null).await.expect("position")["epoch"].clone();
    let r = recover(&mut x, json!({"offset": 1, "epoch": epoch}))
        .await
        .expect("after 1");
    assert_eq!(offsets(&r["events"]), vec![2]);
}

/// `--history-size` and `--recover-limit`: Recover(null) gives at most the limit; more
/// missed than the limit is not recovered.
async fn bounds(c: Cluster) {
    let u = c.user("b");
    let mut x = c.connect(0, &u, ProtocolKind::Json).await;
    for i in 1..=8 {
        assert_eq!(
            cluster::post_feed(&c.nodes[1], &[&u], json!({"i": i})).await,
            202
        );
    }
    for i in 1..=8u64 {
        assert_eq!(next_feed(&mut x).await["offset"], json!(i));
    }
    let newest = recover(&mut x, J::Null).await.expect("newest");
    assert_eq!(
        offsets(&newest["events"]),
        vec![6, 7, 8],
        "the recover limit (3)"
    );
    let epoch = newest["epoch"].clone();
    let ok = recover(&mut x, json!({"offset": 5, "epoch": epoch}))
        .await
        .expect("3 missed");
    assert_eq!(
        (ok["recovered"].clone(), offsets(&ok["events"])),
        (json!(true), vec![6, 7, 8])
    );
    for since in [4, 2] {
        let r = recover(&mut x, json!({"offset": since, "epoch": epoch}))
            .await
            .expect("too many");
        assert_eq!(
            (r["recovered"].clone(), r["offset"].clone()),
            (json!(false), json!(8)),
            "{since}"
        );
    }
}

/// A node that sees a user's offset jump reads the missing events from history and
/// delivers them, in order, before the newer one.
async fn gap_repair_on_a_jump(c: Cluster) {
    let u = c.user("gap");
    let mut x = c.connect(0, &u, ProtocolKind::Json).await;
    assert_eq!(
        cluster::post_feed(&c.nodes[1], &[&u], json!({"k": 1})).await,
        202
    );
    assert_eq!(next_feed(&mut x).await, json!({"k": 1, "offset": 1}));
    // 2 and 3 are stored but published on a channel nobody listens to: lost on the way.
    let silent = HistoryConfig {
        key_prefix: c.prefix.clone(),
        channel_prefix: format!("{}-nobody-", c.prefix),
        ..HistoryConfig::default()
    };
    let (inbox, _rx) = Inbox::new(1, 16);
    let side: Arc<dyn Backplane> = match &c.kind {
        Kind::Memory(bus) => {
            Arc::new(MemoryBackplane::new(bus.clone(), "silent", inbox).with_history(silent))
        }
        Kind::Redis(url) => {
            let mut cfg = RedisConfig::from_url(url).expect("redis url");
            cfg.history = silent;
            let bp = RedisBackplane::new(cfg, "silent", inbox);
            assert!(bp.wait_ready(Duration::from_secs(10)).await);
            bp
        }
    };
    let lost: Vec<FeedAppend> = (2..=3)
        .map(|k| FeedAppend {
            user: u.clone(),
            id: format!("lost{k}"),
            payload: bytes::Bytes::from(format!(r#"{{"k":{k}}}"#)),
            redelivered: false,
        })
        .collect();
    let done = within("silent append", side.append(&lost))
        .await
        .expect("append");
    assert_eq!(
        done.iter().map(|d| d.offset).collect::<Vec<_>>(),
        vec![2, 3]
    );
    x.expect_nothing(QUIET).await;
    let hub = c.nodes[0].server().hub(feed::FEED_HUB_PATH).expect("hub");
    let before = hub.history_counts();
    assert_eq!(
        cluster::post_feed(&c.nodes[1], &[&u], json!({"k": 4})).await,
        202
    );
    for k in 2..=4u64 {
        assert_eq!(next_feed(&mut x).await, json!({"k": k, "offset": k}));
    }
    x.expect_nothing(QUIET).await;
    let after = hub.history_counts();
    assert!(after.repairs > before.repairs, "{after:?}");
    assert_eq!(
        after.repaired - before.repaired,
        3,
        "2, 3 and 4 read from history"
    );
}

macro_rules! both {
    ($($case:ident $(with $adjust:expr)?),* $(,)?) => {
        mod memory {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    #[allow(unused_variables)]
                    let adjust = |c: ServerConfig| c;
                    $(let adjust = $adjust;)?
                    let c = cluster::start_cluster_configured(
                        Kind::Memory(feedhub::backplane::memory::MemoryBus::new()),
                        2, stringify!($case), None, true, adjust,
                    ).await;
                    super::$case(c).await;
                }
            )*
        }
        mod redis {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(inspect) = cluster::redis().await else { return };
                    #[allow(unused_variables)]
                    let adjust = |c: ServerConfig| c;
                    $(let adjust = $adjust;)?
                    let c = cluster::start_cluster_configured(
                        Kind::Redis(cluster::redis_url()),
                        2, stringify!($case), Some(inspect), true, adjust,
                    ).await;
                    super::$case(c).await;
                }
            )*
        }
    };
}

both!(
    offsets_and_recover,
    recover_bad_input,
    raw_publish_passes_through,
    rust_sends_are_appended,
    bounds with |c: ServerConfig| ServerConfig { history_size: 5, recover_limit: 3, ..c },
    gap_repair_on_a_jump,
);

// ---- Redis only ----

/// A feed server on `url` whose backplane waits `backoff` before reconnecting.
async fn node_on(
    url: &str,
    prefix: &str,
    name: &str,
    backoff: Duration,
) -> (support::TestServer, Arc<RedisBackplane>) {
    let config = support::feed_node_config(prefix, name);
    let mut cfg = RedisConfig::from_url(url).expect("redis url");
    cfg.backoff_min = backoff;
    cfg.backoff_max = backoff;
    let slot: Arc<Mutex<Option<Arc<RedisBackplane>>>> = Arc::default();
    let s = slot.clone();
    let server = ServerBuilder::new(config)
        .hub(cluster::test_feed_hub())
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
        "Redis backplane did not connect"
    );
    (
        support::TestServer {
            base_url: format!("http://{}", server.local_addr()),
            jwt_secret: TEST_SECRET.to_string(),
            api_key: TEST_API_KEY.to_string(),
            server: Some(server),
        },
        bp,
    )
}

/// Redis restarts (without persistence: the history is lost, a new epoch). Events are
/// published through instance B while instance A is still reconnecting (it waits 3 s
/// between attempts); once A is back it reads them from history and delivers them to its
/// client, in order, without the client doing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_repair_after_a_redis_outage() {
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    let url = redis.url();
    let prefix = support::unique_prefix("outage");
    let (a, bp_a) = node_on(&url, &prefix, "a", Duration::from_secs(3)).await;
    let (b, bp_b) = node_on(&url, &prefix, "b", Duration::from_millis(50)).await;
    let c = Cluster {
        nodes: vec![a, b],
        redis: vec![bp_a.clone(), bp_b.clone()],
        kind: Kind::Redis(url.clone()),
        prefix: prefix.clone(),
        inspect: None,
    };
    let u = c.user("u");
    let mut x = c.connect(0, &u, ProtocolKind::Json).await;
    assert_eq!(
        cluster::post_feed(&c.nodes[1], &[&u], json!({"k": "before"})).await,
        202
    );
    assert_eq!(next_feed(&mut x).await, json!({"k": "before", "offset": 1}));
    let hub = c.nodes[0].server().hub(feed::FEED_HUB_PATH).expect("hub");
    let before = hub.history_counts();

    redis.kill();
    cluster::eventually("both instances notice", Duration::from_secs(10), || {
        let down = !bp_a.is_ready() && !bp_b.is_ready();
        async move { down }
    })
    .await;
    redis.restart().await;
    assert!(
        bp_b.wait_ready(Duration::from_secs(5)).await,
        "B reconnects first"
    );
    assert!(!bp_a.is_ready(), "A is still waiting to reconnect");
    let started = Instant::now();
    for k in 1..=3 {
        assert_eq!(
            cluster::post_feed(&c.nodes[1], &[&u], json!({"k": k})).await,
            202
        );
    }
    assert!(
        !bp_a.is_ready(),
        "published while A was away (took {:?})",
        started.elapsed()
    );
    assert!(
        bp_a.wait_ready(Duration::from_secs(10)).await,
        "A reconnects"
    );
    // The new epoch's events, in order (offsets restart: the history was lost).
    for k in 1..=3u64 {
        assert_eq!(next_feed(&mut x).await, json!({"k": k, "offset": k}));
    }
    x.expect_nothing(QUIET).await;
    let after = hub.history_counts();
    assert!(after.repaired - before.repaired >= 3, "{after:?}");
    // And live delivery goes on.
    assert_eq!(
        cluster::post_feed(&c.nodes[1], &[&u], json!({"k": 4})).await,
        202
    );
    assert_eq!(next_feed(&mut x).await, json!({"k": 4, "offset": 4}));
}

/// A `feedhub` process, killed (SIGKILL) on drop if still running.
struct Process {
    child: Child,
    base_url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the real binary on a free port (read back from its log) with `redis_url`.
async fn spawn_feedhub(redis_url: &str, prefix: &str) -> Process {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_feedhub"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            redis_url,
            "--channel-prefix",
            prefix,
            "--jwt-secret",
            TEST_SECRET,
            "--api-key",
            TEST_API_KEY,
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn feedhub");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.split("addr=").nth(1) {
                let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = within("feedhub listening", rx)
        .await
        .expect("listen address in the log");
    let p = Process {
        child,
        base_url: format!("http://{addr}"),
    };
    let start = Instant::now();
    while cluster::http(&p.base_url, "GET", "/readyz", &[], "")
        .await
        .0
        != 200
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "feedhub not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p
}

/// Two real processes on Redis; the official client's instance is killed with SIGKILL
/// and `Recover` on the other instance returns every missed event (`js/history.mjs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_on_another_instance_after_kill() {
    let Some(_redis) = cluster::redis().await else {
        return;
    };
    let Some(node) = external::node() else {
        return;
    };
    let prefix = support::unique_prefix("kill");
    let mut a = spawn_feedhub(&cluster::redis_url(), &prefix).await;
    let b = spawn_feedhub(&cluster::redis_url(), &prefix).await;
    let env = vec![
        ("FEEDHUB_URL", a.base_url.clone()),
        ("FEEDHUB_URL_B", b.base_url.clone()),
        ("FEEDHUB_PID_A", a.child.id().to_string()),
        ("FEEDHUB_JWT_SECRET", TEST_SECRET.to_string()),
        ("FEEDHUB_API_KEY", TEST_API_KEY.to_string()),
        ("FEEDHUB_USER_PREFIX", prefix.clone()),
    ];
    let run = node.run("history.mjs", &env, Duration::from_secs(90)).await;
    run.assert_success();
    // A was killed by the script: it must have died of SIGKILL, not exited.
    let status = within("A exits", async {
        loop {
            if let Some(s) = a.child.try_wait().expect("try_wait") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "A was killed with SIGKILL");
    drop(b);
}
