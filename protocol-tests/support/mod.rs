//! Shared helpers for the protocol tests: servers on port 0, a raw WebSocket SignalR client,
//! timeouts on every wait, and unique prefixes. Included with `#[path]` by each test target.
#![allow(dead_code)]

pub mod cluster;

#[path = "../../examples/conformance.rs"]
#[allow(dead_code)]
pub mod conformance;

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use feedhub::protocol::{handshake, HubMessage, ProtocolKind};
use feedhub::{feed, Server, ServerBuilder, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// The JWT secret test servers use.
pub const TEST_SECRET: &str = "feedhub-test-secret-of-at-least-32-bytes";
/// The publish API key test servers use.
pub const TEST_API_KEY: &str = "feedhub-test-api-key";
/// Default timeout for any wait in tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `fut` or panics after `WAIT` with `what`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A running test server; dropping it shuts the server down (in the background).
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// JWT secret.
    pub jwt_secret: String,
    /// Publish API key.
    pub api_key: String,
    /// The server.
    pub server: Option<Server>,
}

impl TestServer {
    /// The server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server running")
    }

    /// `ws://127.0.0.1:PORT`.
    pub fn ws_url(&self) -> String {
        self.base_url.replacen("http://", "ws://", 1)
    }

    /// A token for `user`.
    pub fn token(&self, user: &str) -> String {
        self.server().issue_token(user, 3600).expect("token")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(s.shutdown());
            }
        }
    }
}

fn wrap(server: Server) -> TestServer {
    TestServer {
        base_url: format!("http://{}", server.local_addr()),
        jwt_secret: TEST_SECRET.to_string(),
        api_key: TEST_API_KEY.to_string(),
        server: Some(server),
    }
}

fn local() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// The conformance server (`/testhub`, `/authorizedhub`) on a free port.
pub async fn start_conformance_server() -> TestServer {
    wrap(
        conformance::start(local(), Some(TEST_SECRET.to_string()))
            .await
            .expect("conformance server"),
    )
}

/// The feed server (`/hubs/feed`, `POST /api/feed`) on a free port.
pub async fn start_feed_server() -> TestServer {
    start_feed_server_with(|c| c).await
}

/// The feed server with an adjusted config.
pub async fn start_feed_server_with(f: impl FnOnce(ServerConfig) -> ServerConfig) -> TestServer {
    let config = f(ServerConfig {
        listen: local(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        ..ServerConfig::default()
    });
    let server = ServerBuilder::new(config)
        .hub(feed::feed_hub())
        .start()
        .await
        .expect("feed server");
    wrap(server)
}

/// The feed server with an adjusted config and builder (e.g. mounted services).
pub async fn start_feed_server_built(
    f: impl FnOnce(ServerConfig) -> ServerConfig,
    b: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    let config = f(ServerConfig {
        listen: local(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        ..ServerConfig::default()
    });
    let server = b(ServerBuilder::new(config).hub(feed::feed_hub()))
        .start()
        .await
        .expect("feed server");
    wrap(server)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw SignalR client over a WebSocket, for byte-level tests.
pub struct RawClient {
    /// The socket.
    pub ws: Ws,
    /// Protocol after the handshake.
    pub protocol: ProtocolKind,
    buf: BytesMut,
}

impl RawClient {
    /// Opens a WebSocket to `url` (e.g. `ws://127.0.0.1:1/testhub`) without a handshake.
    pub async fn open(url: &str) -> RawClient {
        let (ws, _) = within("websocket connect", tokio_tungstenite::connect_async(url))
            .await
            .expect("connect");
        RawClient {
            ws,
            protocol: ProtocolKind::Json,
            buf: BytesMut::new(),
        }
    }

    /// Opens and completes the handshake for `protocol`.
    pub async fn connect(url: &str, protocol: ProtocolKind) -> RawClient {
        let mut c = RawClient::open(url).await;
        let mut req = Vec::new();
        handshake::write_request(protocol.name(), 1, &mut req);
        c.send_text(String::from_utf8(req).expect("utf8")).await;
        let resp = c.recv_raw().await.expect("handshake response");
        assert_eq!(
            &resp[..],
            handshake::OK_RESPONSE,
            "handshake failed: {:?}",
            String::from_utf8_lossy(&resp)
        );
        c.protocol = protocol;
        c
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, s: impl Into<String>) {
        within("send", self.ws.send(Message::text(s.into())))
            .await
            .expect("send");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, b: Vec<u8>) {
        within("send", self.ws.send(Message::binary(b)))
            .await
            .expect("send");
    }

    /// Sends one message in the client's protocol.
    pub async fn send(&mut self, msg: &HubMessage) {
        let mut out = Vec::new();
        self.protocol.encode(msg, &mut out).expect("encode");
        match self.protocol {
            ProtocolKind::Json => self.send_text(String::from_utf8(out).expect("utf8")).await,
            ProtocolKind::MessagePack => self.send_binary(out).await,
        }
    }

    /// The next data frame's bytes; `None` when the socket closed.
    pub async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        loop {
            match within("frame", self.ws.next()).await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Text(t))) => return Some(t.as_bytes().to_vec()),
                Some(Ok(Message::Binary(b))) => return Some(b.to_vec()),
                Some(Ok(Message::Close(_))) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next hub message, skipping pings; `None` when the socket closed.
    pub async fn recv(&mut self) -> Option<HubMessage> {
        loop {
            match self.protocol.decode(&mut self.buf, usize::MAX) {
                Ok(Some(HubMessage::Ping)) => continue,
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => panic!("server sent undecodable bytes: {e}"),
            }
            let bytes = self.recv_raw().await?;
            self.buf.extend_from_slice(&bytes);
        }
    }

    /// Whether the server closes the socket within `WAIT` (after any messages).
    pub async fn expect_closed(&mut self) {
        loop {
            match within("close", self.ws.next()).await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    }
}

/// The configuration of feed-hub node `name` in a test cluster on channel prefix `prefix`
/// (port 0, the test secret and API key; the caller adds the backplane).
pub fn feed_node_config(prefix: &str, name: &str) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        node_id: format!("{prefix}-{name}"),
        channel_prefix: Some(prefix.to_string()),
        ..ServerConfig::default()
    }
}

/// A unique prefix for channels and queues of one test.
pub fn unique_prefix(name: &str) -> String {
    format!(
        "t{}-{}-{}",
        std::process::id(),
        name,
        feedhub::ids::random_token()
    )
}
