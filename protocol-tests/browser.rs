//! The live feed page (`js-client-demo/`, served at `/`) end to end in headless Chromium,
//! driven by playwright-core from `protocol-tests/js/browser.mjs`, plus a check that the
//! committed bundle `js-client-demo/dist/app.js` matches its sources.
//!
//! Each test starts feedhub instance(s) in-process on port 0 with demo identities on, runs
//! one scenario of `browser.mjs` against them and fails when it does. Browser tests run one
//! at a time (they time deliveries; two Chromiums on a 2-core machine would skew that).
//! Without Chromium, Node or npm they print `SKIPPED`, except under `CI=true`, where they
//! fail. The screenshot test writes `js-client-demo/screenshot.png` (shown in the README).
//!
//! Run just these: `cargo test --release --test browser -- --nocapture`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

#[allow(dead_code)]
#[path = "../examples/rr_proxy.rs"]
mod rr_proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use feedhub::backplane::memory::MemoryBus;
use feedhub::backplane::redis::RedisConfig;
use feedhub::demo::amqp_publisher::AmqpPublisher;
use feedhub::demo::redis_store::RedisStore;
use feedhub::demo::store::MemoryStore;
use feedhub::demo::Directory;
use feedhub::ingest::amqp::{AmqpConfig, AmqpIngest};
use feedhub::{feed, ServerBuilder, ServerConfig};
use support::{TestServer, TEST_API_KEY, TEST_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// Hard limit for one scenario run (each check inside has its own, shorter timeouts).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// One browser test at a time in this process.
static BROWSER: Mutex<()> = Mutex::const_new(());

/// One feedhub instance with the demo on, joined to `bus`, storing posts in `store`.
async fn start_demo(addr: SocketAddr, bus: MemoryBus, store: Arc<MemoryStore>) -> TestServer {
    let config = ServerConfig {
        listen: addr,
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        dev_identities: true,
        shutdown_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    // Rebinding the address of an instance that just stopped can briefly fail.
    let mut last_error = None;
    for _ in 0..50 {
        let builder = ServerBuilder::new(config.clone())
            .hub(feed::feed_hub())
            .memory_bus(bus.clone())
            .demo_store(store.clone());
        match builder.start().await {
            Ok(server) => {
                return TestServer {
                    base_url: format!("http://{}", server.local_addr()),
                    jwt_secret: TEST_SECRET.to_string(),
                    api_key: TEST_API_KEY.to_string(),
                    server: Some(server),
                }
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot start feedhub on {addr}: {last_error:?}");
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn script_env(
    a: &TestServer,
    b: &TestServer,
    scenario: &str,
    protocol: &str,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("FEEDHUB_URL", a.base_url.clone()),
        ("FEEDHUB_URL_B", b.base_url.clone()),
        ("FEEDHUB_API_KEY", a.api_key.clone()),
        ("FEEDHUB_SCENARIO", scenario.to_string()),
        ("FEEDHUB_PROTOCOL", protocol.to_string()),
    ];
    if let Some(path) = external::chromium() {
        env.push(("FEEDHUB_CHROMIUM", path.display().to_string()));
    }
    env
}

/// Node with playwright-core, and Chromium; `None` when skipped.
fn browser_tools() -> Option<external::Runtime> {
    let node = external::node()?;
    external::chromium()?;
    Some(node)
}

/// Runs `scenario` against one instance.
async fn single_instance(scenario: &str, protocol: &str, extra: &[(&'static str, String)]) {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let server = start_demo(local(), MemoryBus::new(), Arc::new(MemoryStore::new(1000))).await;
    let mut env = script_env(&server, &server, scenario, protocol);
    env.extend(extra.iter().cloned());
    let run = node.run("browser.mjs", &env, SCRIPT_TIMEOUT).await;
    drop(server);
    run.assert_success();
}

/// Alice posts, Bob (a friend) sees it live within 2 s with author, text and time, Carol
/// does not; HTML in a post renders as text; an event published twice shows once; the
/// page shows the connection state, transport and protocol (JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_feed_json() {
    single_instance("feed", "json", &[]).await;
}

/// The same with the MessagePack hub protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_feed_messagepack() {
    single_instance("feed", "messagepack", &[]).await;
}

/// Bob's browser has no WebSocket at all (deleted by an init script, as behind a proxy that
/// blocks it): the official client falls back to Server-Sent Events, Bob's page says so,
/// receives Alice's post live and can post himself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_fallback_without_websocket() {
    let expect = [("FEEDHUB_EXPECT_TRANSPORT", "Server-Sent Events".to_string())];
    single_instance("fallback", "json", &expect).await;
}

/// Bob's page limited to Long Polling, with MessagePack (binary polls and sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_long_polling_messagepack() {
    let extra = [
        ("FEEDHUB_BOB_TRANSPORT", "longpolling".to_string()),
        ("FEEDHUB_EXPECT_TRANSPORT", "Long Polling".to_string()),
    ];
    single_instance("fallback", "messagepack", &extra).await;
}

/// Alice and Bob side by side after a short conversation, saved to
/// `js-client-demo/screenshot.png` (embedded in the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_screenshot() {
    let path = external::repo_root()
        .join("js-client-demo")
        .join("screenshot.png");
    single_instance(
        "screenshot",
        "json",
        &[("FEEDHUB_SCREENSHOT", path.display().to_string())],
    )
    .await;
    if external::chromium().is_some() {
        let png = std::fs::read(&path).expect("screenshot written");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        assert!(png.len() > 20_000, "screenshot has content");
    }
}

/// Two demo instances on one in-process bus, sharing the post store.
async fn two_demo_instances() -> (TestServer, TestServer) {
    let bus = MemoryBus::new();
    let store = Arc::new(MemoryStore::new(1000));
    let a = start_demo(local(), bus.clone(), store.clone()).await;
    let b = start_demo(local(), bus, store).await;
    (a, b)
}

/// Two instances behind the round-robin proxy, no sticky sessions: both pages load from the
/// proxy, Bob's page limited by `extra` to a transport other than WebSockets, so his polls,
/// sends or event stream land on both instances and those on the instance that did not
/// negotiate are forwarded to it.
async fn behind_round_robin_proxy(protocol: &str, extra: &[(&'static str, String)]) {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let (a, b) = two_demo_instances().await;
    let proxy = rr_proxy::RrProxy::start(
        local(),
        vec![a.server().local_addr(), b.server().local_addr()],
    )
    .await
    .expect("proxy");
    let url = format!("http://{}", proxy.local_addr());
    let mut env = script_env(&a, &b, "fallback", protocol);
    for (k, v) in env.iter_mut() {
        if *k == "FEEDHUB_URL" || *k == "FEEDHUB_URL_B" {
            *v = url.clone();
        }
    }
    env.extend(extra.iter().cloned());
    let run = node.run("browser.mjs", &env, SCRIPT_TIMEOUT).await;
    let forwarded = a.server().forwarded_requests() + b.server().forwarded_requests();
    println!(
        "proxy connections per instance {:?}; requests forwarded {forwarded}",
        proxy.accepted_per_backend()
    );
    drop(proxy);
    drop((a, b));
    run.assert_success();
    assert!(
        forwarded > 0,
        "some of Bob's requests landed on the instance that did not negotiate"
    );
}

/// [`behind_round_robin_proxy`] with Bob on Long Polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_long_polling_behind_round_robin_proxy() {
    let extra = [
        ("FEEDHUB_BOB_TRANSPORT", "longpolling".to_string()),
        ("FEEDHUB_EXPECT_TRANSPORT", "Long Polling".to_string()),
    ];
    behind_round_robin_proxy("json", &extra).await;
}

/// [`behind_round_robin_proxy`] with Bob's browser lacking WebSocket (falls back to SSE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sse_behind_round_robin_proxy() {
    let expect = [("FEEDHUB_EXPECT_TRANSPORT", "Server-Sent Events".to_string())];
    behind_round_robin_proxy("json", &expect).await;
}

/// Two instances on one in-process bus sharing the post store: Alice on one, Bob and Carol
/// on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_two_instances_memory_bus() {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let (a, b) = two_demo_instances().await;
    let run = node
        .run(
            "browser.mjs",
            &script_env(&a, &b, "instances", "json"),
            SCRIPT_TIMEOUT,
        )
        .await;
    drop((a, b));
    run.assert_success();
}

/// One instance of a scale-out deployment: Redis backplane, demo posts in Redis, demo
/// users, channels and keys under this test's own `prefix`.
async fn start_redis_demo(
    prefix: &str,
    node: usize,
    amqp: Option<&AmqpConfig>,
) -> (TestServer, Option<AmqpIngest>) {
    let url = support::cluster::redis_url();
    let config = ServerConfig {
        listen: local(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        dev_identities: true,
        node_id: format!("{prefix}-node{node}"),
        channel_prefix: Some(prefix.to_string()),
        shutdown_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    };
    let store = RedisStore::new(&url, &format!("{prefix}:demo:")).expect("redis store");
    let mut builder = ServerBuilder::new(config)
        .hub(feed::feed_hub())
        .redis(RedisConfig::from_url(&url).expect("redis url"))
        .demo_users(Directory::with_prefix(&format!("{prefix}-")))
        .demo_store(Arc::new(store));
    let ingest = amqp.map(|c| AmqpIngest::new(c.clone()));
    if let Some(c) = amqp {
        builder = builder.demo_publisher(Arc::new(AmqpPublisher::new(
            c.url.clone(),
            c.exchange.clone(),
        )));
    }
    let server = builder.start().await.expect("feed server");
    if let Some(ingest) = &ingest {
        ingest.start(server.hub(feed::FEED_HUB_PATH).expect("feed hub"));
        support::within("RabbitMQ consumer ready", async {
            while !ingest.is_consuming() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    support::within("Redis backplane ready", async {
        while !server.backplane().is_ready() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let server = TestServer {
        base_url: format!("http://{}", server.local_addr()),
        jwt_secret: TEST_SECRET.to_string(),
        api_key: TEST_API_KEY.to_string(),
        server: Some(server),
    };
    (server, ingest)
}

/// Two instances on the shared Redis (backplane and post store): Alice on one, Bob and
/// Carol on the other; Bob's history on his instance has Alice's post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_two_instances_redis() {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let Some(mut redis) = support::cluster::redis().await else {
        return;
    };
    let prefix = support::unique_prefix("demo");
    let (a, _) = start_redis_demo(&prefix, 0, None).await;
    let (b, _) = start_redis_demo(&prefix, 1, None).await;
    let mut env = script_env(&a, &b, "instances", "messagepack");
    env.push(("FEEDHUB_USER_PREFIX", format!("{prefix}-")));
    let run = node.run("browser.mjs", &env, SCRIPT_TIMEOUT).await;
    drop((a, b));
    // The posts this test stored.
    let keys: Vec<String> = ["1001", "1002", "1003"]
        .iter()
        .map(|u| format!("{prefix}:demo:feed:{prefix}-{u}"))
        .collect();
    let stored: i64 = support::within(
        "redis DEL",
        redis::cmd("DEL").arg(&keys).query_async(&mut redis),
    )
    .await
    .expect("DEL");
    run.assert_success();
    assert_eq!(
        stored, 2,
        "Alice's and Bob's feeds were in Redis, Carol's empty"
    );
}

/// The full pipeline on two instances: Alice's post goes from the post service to this
/// test's RabbitMQ exchange, is consumed by one instance (shared queue) and reaches Bob on
/// the other through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_two_instances_redis_rabbitmq() {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let Some(mut redis) = support::cluster::redis().await else {
        return;
    };
    let url = std::env::var("FEEDHUB_TEST_AMQP_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let admin = match tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&url, props),
    )
    .await
    {
        Ok(Ok(c)) => c,
        other => {
            let why = format!("{url}: {:?}", other.map(|r| r.map(|_| ())));
            assert!(
                !external::is_ci(),
                "RabbitMQ is required under CI=true but unavailable: {why}"
            );
            println!("SKIPPED: RabbitMQ unavailable ({why})");
            return;
        }
    };
    let prefix = support::unique_prefix("demoamqp");
    let amqp = AmqpConfig {
        exchange: format!("{prefix}.FeedUpdate"),
        queue: format!("{prefix}.feed-updates"),
        ..AmqpConfig::new(url.clone())
    };
    let (a, ingest_a) = start_redis_demo(&prefix, 0, Some(&amqp)).await;
    let (b, ingest_b) = start_redis_demo(&prefix, 1, Some(&amqp)).await;
    let mut env = script_env(&a, &b, "instances", "json");
    env.push(("FEEDHUB_USER_PREFIX", format!("{prefix}-")));
    let run = node.run("browser.mjs", &env, SCRIPT_TIMEOUT).await;
    for ingest in [ingest_a, ingest_b].into_iter().flatten() {
        support::within("ingest stop", ingest.stop()).await;
    }
    drop((a, b));
    // Remove this test's queues, exchanges and Redis keys.
    if let Ok(ch) = admin.create_channel().await {
        for q in [amqp.queue.clone(), amqp.dead_letter_queue()] {
            let _ = ch
                .queue_delete(&q, lapin::options::QueueDeleteOptions::default())
                .await;
        }
        for e in [amqp.exchange.clone(), amqp.dead_letter_exchange()] {
            let _ = ch
                .exchange_delete(&e, lapin::options::ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = admin.close(200, "done").await;
    let keys: Vec<String> = ["1001", "1002", "1003"]
        .iter()
        .map(|u| format!("{prefix}:demo:feed:{prefix}-{u}"))
        .collect();
    let _: Result<i64, _> = support::within(
        "redis DEL",
        redis::cmd("DEL").arg(&keys).query_async(&mut redis),
    )
    .await;
    run.assert_success();
}

/// Bob's instance is shut down (graceful: Close with allowReconnect) and started again on
/// the same address: his page shows reconnecting, then connected with a "reconnected"
/// notice, loads the post he missed meanwhile, and shows later posts live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_reconnect_after_restart() {
    let _one = BROWSER.lock().await;
    let Some(node) = browser_tools() else { return };
    let bus = MemoryBus::new();
    let store = Arc::new(MemoryStore::new(1000));
    let a = start_demo(local(), bus.clone(), store.clone()).await;
    let b = start_demo(local(), bus.clone(), store.clone()).await;
    let b_addr = b.server().local_addr();
    let env = script_env(&a, &b, "reconnect", "json");
    let b = Arc::new(Mutex::new(Some(b)));

    // POST /stop and POST /start, for the script.
    let control = TcpListener::bind(local()).await.expect("control listener");
    let control_url = format!("http://{}", control.local_addr().expect("addr"));
    let b2 = b.clone();
    let control_task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = control.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head);
            let (status, body) = if head.starts_with("POST /stop ") {
                if let Some(mut server) = b2.lock().await.take() {
                    if let Some(s) = server.server.take() {
                        s.shutdown().await;
                    }
                }
                ("200 OK", "stopped")
            } else if head.starts_with("POST /start ") {
                let server = start_demo(b_addr, bus.clone(), store.clone()).await;
                *b2.lock().await = Some(server);
                ("200 OK", "started")
            } else {
                ("404 Not Found", "unknown control request")
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });

    let mut env = env;
    env.push(("FEEDHUB_CONTROL_URL", control_url));
    let run = node.run("browser.mjs", &env, SCRIPT_TIMEOUT).await;
    control_task.abort();
    drop(a);
    drop(b.lock().await.take());
    run.assert_success();
}

/// The committed bundle `js-client-demo/dist/app.js` is what `npm ci && npm run build`
/// makes from the sources, so the page `cargo run` serves cannot silently rot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_bundle_is_fresh() {
    let Some(node) = external::demo_node() else {
        return;
    };
    let out = external::target_dir().join(format!("demo-bundle-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = node
        .run(
            "build.mjs",
            &[("OUT_DIR", out.display().to_string())],
            Duration::from_secs(120),
        )
        .await;
    run.assert_success();
    let fresh = std::fs::read(out.join("app.js")).expect("fresh bundle");
    let committed = std::fs::read(
        external::repo_root()
            .join("js-client-demo")
            .join("dist")
            .join("app.js"),
    )
    .expect("committed bundle");
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        fresh == committed,
        "js-client-demo/dist/app.js is stale: run `npm ci && npm run build` in js-client-demo/ and commit dist/app.js"
    );
    assert!(
        String::from_utf8_lossy(&committed).contains("FeedUpdated"),
        "the bundle is the feed page"
    );
}
