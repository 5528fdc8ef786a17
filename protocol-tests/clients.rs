//! Real SignalR clients against feedhub.
//!
//! Each test starts a server (from `support`), then runs one client script
//! from `protocol-tests/js` or `protocol-tests/python` against it and fails
//! when the script does. The scripts print one line per check and finish with
//! `N passed, M failed`; their output is forwarded to the test output.
//!
//! Run just these: `cargo test --release --test clients -- --nocapture`.
//! Without Node/npm or Python the tests print `SKIPPED` and pass, unless
//! `CI=true`, where they fail. `FEEDHUB_ONLY=<substring>` runs only the
//! matching checks of each script, `FEEDHUB_VERBOSE=1` prints client logs.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::time::Duration;

use support::TestServer;

/// Hard limit for one script run (the scripts time out each check themselves).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(420);

fn server_env(server: &TestServer, protocol: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FEEDHUB_URL", server.base_url.clone()),
        ("FEEDHUB_JWT_SECRET", server.jwt_secret.clone()),
        ("FEEDHUB_API_KEY", server.api_key.clone()),
        ("FEEDHUB_PROTOCOL", protocol.to_string()),
    ]
}

async fn node_against_conformance(script: &str, protocol: &str) {
    node_against_conformance_over(script, protocol, "WebSockets").await;
}

/// Runs `script` with the client forced to `transport` (`HttpTransportType` name).
async fn node_against_conformance_over(script: &str, protocol: &str, transport: &str) {
    let Some(node) = external::node() else {
        return;
    };
    let server = support::start_conformance_server().await;
    let mut env = server_env(&server, protocol);
    env.push(("FEEDHUB_TRANSPORT", transport.to_string()));
    let run = node.run(script, &env, SCRIPT_TIMEOUT).await;
    drop(server);
    run.assert_success();
}

async fn node_against_feed(protocol: &str) {
    let Some(node) = external::node() else {
        return;
    };
    let server = support::start_feed_server().await;
    let run = node
        .run("feed.mjs", &server_env(&server, protocol), SCRIPT_TIMEOUT)
        .await;
    drop(server);
    run.assert_success();
}

async fn python_against_conformance(protocol: &str) {
    python_against_conformance_over(protocol, "websockets").await;
}

/// Runs `signalrcore_client.py` with the client forced to `transport` (`websockets`,
/// `longpolling` or `sse`: the script maps it to signalrcore's `HttpTransportType`).
async fn python_against_conformance_over(protocol: &str, transport: &str) {
    let Some(python) = external::python() else {
        return;
    };
    let server = support::start_conformance_server().await;
    let mut env = server_env(&server, protocol);
    env.push(("FEEDHUB_TRANSPORT", transport.to_string()));
    let run = python
        .run("signalrcore_client.py", &env, SCRIPT_TIMEOUT)
        .await;
    drop(server);
    run.assert_success();
}

/// `@microsoft/signalr` 10.x with the JSON protocol: every /testhub method,
/// streaming both ways, cancellation, client results, groups and users,
/// reconnect, /authorizedhub, skipNegotiation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_conformance_json() {
    node_against_conformance("conformance.mjs", "json").await;
}

/// The same conformance script with `@microsoft/signalr-protocol-msgpack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_conformance_messagepack() {
    node_against_conformance("conformance.mjs", "messagepack").await;
}

/// The conformance suite with the client forced to Server-Sent Events (JSON; SSE is
/// Text-only). skipNegotiation checks are skipped with their reason printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_conformance_sse_json() {
    node_against_conformance_over("conformance.mjs", "json", "ServerSentEvents").await;
}

/// The conformance suite over Long Polling with JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_conformance_long_polling_json() {
    node_against_conformance_over("conformance.mjs", "json", "LongPolling").await;
}

/// The conformance suite over Long Polling with MessagePack (binary poll and POST bodies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_conformance_long_polling_messagepack() {
    node_against_conformance_over("conformance.mjs", "messagepack", "LongPolling").await;
}

/// `@aspnet/signalr` 1.1.4 (negotiate v0: the id is the connection id) over Long Polling
/// and over Server-Sent Events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_aspnet_signalr_1x_http_transports() {
    node_against_conformance_over("aspnet1.mjs", "json", "LongPolling").await;
    node_against_conformance_over("aspnet1.mjs", "json", "ServerSentEvents").await;
}

/// The old `@aspnet/signalr` 1.1.4 client (negotiate version 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_aspnet_signalr_1x() {
    node_against_conformance("aspnet1.mjs", "json").await;
}

/// The feed hub: POST /api/feed fan-out to users' connections, JWT checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_feed_hub_json() {
    node_against_feed("json").await;
}

/// The feed hub with the MessagePack protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_feed_hub_messagepack() {
    node_against_feed("messagepack").await;
}

/// The Python `signalrcore` client with JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signalrcore_json() {
    python_against_conformance("json").await;
}

/// The Python `signalrcore` client with MessagePack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signalrcore_messagepack() {
    python_against_conformance("messagepack").await;
}

/// The Python `signalrcore` client over Long Polling with JSON. Two checks are skipped with
/// their reason printed: signalrcore 1.0.2 hands the hub only the first message of each poll
/// response (a push plus its completion, or stream items, arrive together, as from ASP.NET),
/// and its polls drop the Authorization header, so the token goes in `access_token`.
/// MessagePack over Long Polling cannot work with signalrcore 1.0.2 at all (it always frames
/// poll bodies by the JSON record separator), so there is no MessagePack variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signalrcore_long_polling_json() {
    python_against_conformance_over("json", "longpolling").await;
}

/// The Python `signalrcore` client over Server-Sent Events (JSON; SSE is Text-only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signalrcore_sse_json() {
    python_against_conformance_over("json", "sse").await;
}
