//! TLS end to end (`--tls-cert`, `--tls-key`, `ServerBuilder::tls`): every test makes its
//! own certificate authority and server certificates (rcgen), writes them as PEM files under
//! `target/tls-tests/`, and trusts only that CA on the client side; no certificate check is
//! switched off anywhere.
//!
//! - https negotiate, a wss:// hub connection and a feed event, with a Rust client;
//! - plain HTTP, a plain ws:// upgrade, garbage, a silent socket, a truncated ClientHello and
//!   a client that does not trust the certificate: each ends only its own connection (a
//!   clear `400` for plain HTTP, the handshake deadline for the silent ones), the server
//!   keeps serving;
//! - reload in-process: new connections get the new certificate, an open WebSocket keeps
//!   working, a bad file keeps the old certificate; unusable files fail startup;
//! - the real binary: SIGHUP reloads (new certificate for new connections, an open wss://
//!   WebSocket stays open), a bad file on SIGHUP is logged and the old one kept;
//! - the official `@microsoft/signalr` Node client on every transport over https/wss
//!   (`protocol-tests/js/tls.mjs`, the CA through `NODE_EXTRA_CA_CERTS`);
//! - the demo page in headless Chromium over https with a wss:// hub connection
//!   (`protocol-tests/js/browser.mjs`, the server's key pinned with
//!   `--ignore-certificate-errors-spki-list`).
//!
//! Node and Chromium tests print `SKIPPED` without the tools, and fail under `CI=true`.
//! Run just these: `cargo test --release --test tls -- --nocapture`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use feedhub::backplane::memory::MemoryBus;
use feedhub::demo::store::MemoryStore;
use feedhub::tls::{TlsConfig, TLS_METRICS};
use feedhub::{feed, Server, ServerBuilder, ServerConfig};
use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use support::{unique_prefix, within, TEST_API_KEY, TEST_SECRET, WAIT};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------------------
// A test PKI
// ---------------------------------------------------------------------------------------

/// A certificate authority made for one test.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pem: String,
}

/// A server certificate (for `localhost` and `127.0.0.1`) with its key.
struct ServerCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    /// base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes (it matches keys of the chain the
    /// server presents, so the leaf's, not the CA's).
    spki_sha256: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("feedhub test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate signed by this CA; `label` goes into its common name.
    fn issue(&self, label: &str) -> ServerCert {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("feedhub {label}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            spki_sha256: base64::engine::general_purpose::STANDARD
                .encode(Sha256::digest(key.subject_public_key_info())),
        }
    }
}

/// A directory of PEM files for one test, under `target/tls-tests/`.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(test: &str) -> Files {
        let dir = external::target_dir()
            .join("tls-tests")
            .join(unique_prefix(test));
        std::fs::create_dir_all(&dir).expect("test dir");
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `name` the way certificate tools do: a temporary file renamed into place.
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write pem");
        std::fs::rename(&tmp, &path).expect("rename pem");
        path
    }

    /// `cert.pem` and `key.pem` for `cert`; the TLS config naming them.
    fn install(&self, cert: &ServerCert) -> TlsConfig {
        let c = self.write("cert.pem", &cert.cert_pem);
        let k = self.write("key.pem", &cert.key_pem);
        TlsConfig::new(c, k)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// A TLS client
// ---------------------------------------------------------------------------------------

/// A rustls client trusting only `cas`.
fn connector(cas: &[&TestCa]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA pem");
        roots.add(der).expect("CA root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` for the name `localhost`.
async fn tls_connect(addr: SocketAddr, cas: &[&TestCa]) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within("tcp connect", TcpStream::connect(addr)).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    within("tls handshake", connector(cas).connect(name, tcp)).await
}

/// The leaf certificate the server presented.
fn leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec()
}

/// A parsed HTTP response.
struct Response {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Response {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request (`Connection: close`) over `io`; reads the response to the end.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    within("write request", io.write_all(&out))
        .await
        .expect("write");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match within("response", io.read(&mut chunk)).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A peer closing without close_notify ends the response too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)));
    let headers = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = headers
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let rest = raw[end + 4..].to_vec();
    let body = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&rest)
    } else {
        rest
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap_or("0").trim(), 16)
                .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// An https request to `addr`, trusting `ca`.
async fn https(
    addr: SocketAddr,
    ca: &TestCa,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let tls = tls_connect(addr, &[ca]).await.expect("tls connect");
    request(tls, method, path, headers, body).await
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A wss:// WebSocket to the feed hub for `token`, after the JSON handshake; the leaf
/// certificate it got.
async fn wss_feed(addr: SocketAddr, cas: &[&TestCa], query: &str) -> (Wss, Vec<u8>) {
    let tls = tls_connect(addr, cas).await.expect("tls connect");
    let cert = leaf(&tls);
    let url = format!(
        "wss://localhost:{}{}?{query}",
        addr.port(),
        feed::FEED_HUB_PATH
    );
    let (mut ws, _) = within("wss upgrade", tokio_tungstenite::client_async(url, tls))
        .await
        .expect("wss upgrade");
    within(
        "handshake send",
        ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\x1e")),
    )
    .await
    .expect("send");
    let reply = next_text(&mut ws).await.expect("handshake response");
    assert_eq!(reply, "{}\x1e", "handshake accepted");
    (ws, cert)
}

/// The next text frame (skipping pings); `None` when the socket closed.
async fn next_text(ws: &mut Wss) -> Option<String> {
    loop {
        match within("frame", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                let t = t.to_string();
                if t.contains("\"type\":6") && t.len() < 16 {
                    continue;
                }
                return Some(t);
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Invokes `WhoAmI` on `ws` and returns the user it names (a full round trip through the
/// server's session).
async fn who_am_i(ws: &mut Wss, id: &str) -> String {
    let call = format!(
        "{{\"type\":1,\"invocationId\":\"{id}\",\"target\":\"WhoAmI\",\"arguments\":[]}}\x1e"
    );
    within("invoke", ws.send(Message::text(call)))
        .await
        .expect("send");
    loop {
        let text = next_text(ws).await.expect("completion");
        for frame in text.split('\x1e').filter(|f| !f.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(frame).expect("json");
            if v["type"] == 3 && v["invocationId"] == id {
                return v["result"].as_str().expect("user id").to_string();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn feed_config() -> ServerConfig {
    ServerConfig {
        listen: local(),
        jwt_secret: Some(TEST_SECRET.to_string()),
        api_key: Some(TEST_API_KEY.to_string()),
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        shutdown_timeout: Duration::from_secs(3),
        ..ServerConfig::default()
    }
}

/// The feed hub over TLS, in process.
async fn start_tls_feed(tls: TlsConfig) -> Server {
    ServerBuilder::new(feed_config())
        .hub(feed::feed_hub())
        .tls(tls)
        .start()
        .await
        .expect("tls server")
}

fn connection_token(negotiate: &Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&negotiate.body).expect("negotiate json");
    v["connectionToken"]
        .as_str()
        .expect("connectionToken")
        .to_string()
}

// ---------------------------------------------------------------------------------------
// In-process tests
// ---------------------------------------------------------------------------------------

/// https negotiate, a wss:// connection with its token, WhoAmI, a feed event published over
/// https arriving on the wss:// socket, and the TLS series on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_negotiate_then_wss_hub_connection_receives_a_feed_event() {
    let ca = TestCa::new("negotiate");
    let cert = ca.issue("server");
    let files = Files::new("negotiate");
    let server = start_tls_feed(files.install(&cert)).await;
    let addr = server.local_addr();
    assert_eq!(server.base_url(), format!("https://{addr}"));
    let token = server.issue_token("2001", 3600).expect("token");
    let bearer = format!("Bearer {token}");

    let negotiate = https(
        addr,
        &ca,
        "POST",
        "/hubs/feed/negotiate?negotiateVersion=1",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(negotiate.status, 200, "{}", negotiate.text());
    let id = connection_token(&negotiate);

    let (mut ws, leaf) = wss_feed(addr, &[&ca], &format!("id={id}&access_token={token}")).await;
    assert_eq!(
        leaf, cert.der,
        "the server presented the configured certificate"
    );
    assert_eq!(who_am_i(&mut ws, "1").await, "2001");

    let text = unique_prefix("over-tls");
    let body = format!("{{\"recipients\":[\"2001\"],\"payload\":{{\"text\":\"{text}\"}}}}");
    let auth = format!("Bearer {TEST_API_KEY}");
    let published = https(
        addr,
        &ca,
        "POST",
        "/api/feed",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(published.status, 202, "{}", published.text());
    loop {
        let frame = next_text(&mut ws).await.expect("FeedUpdated");
        if frame.contains("FeedUpdated") {
            assert!(frame.contains(&text), "{frame}");
            break;
        }
    }

    let metrics = https(addr, &ca, "GET", "/metrics", &[], b"").await;
    assert_eq!(metrics.status, 200);
    let metrics = metrics.text();
    for series in [
        "feedhub_tls_handshakes_total ",
        "feedhub_tls_handshake_failures_total{reason=\"plain_http\"} ",
        "feedhub_tls_reloads_total{result=\"ok\"} ",
    ] {
        assert!(metrics.contains(series), "{series} in /metrics");
    }
    drop(ws);
    server.shutdown().await;
}

/// Reads from a raw socket until the server closes it; panics after `limit`.
async fn closed_within(socket: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let started = Instant::now();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server did not close the socket within {limit:?}"),
        }
    }
}

/// Plain HTTP gets a clear 400; a plain ws:// upgrade is refused; garbage, a silent socket,
/// a truncated ClientHello and a client that does not trust the certificate each end only
/// their own connection (the silent ones at the handshake deadline), and the server goes
/// on serving https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_end_only_their_own_connection() {
    let ca = TestCa::new("bad");
    let stranger = TestCa::new("stranger");
    let files = Files::new("bad");
    let mut tls = files.install(&ca.issue("server"));
    tls.handshake_timeout = Duration::from_millis(500);
    let server = start_tls_feed(tls).await;
    let addr = server.local_addr();
    let plain_before = TLS_METRICS
        .plain_http
        .load(std::sync::atomic::Ordering::Relaxed);
    let timeouts_before = TLS_METRICS
        .handshake_timeouts
        .load(std::sync::atomic::Ordering::Relaxed);

    // A healthy connection held open through all of it.
    let token = server.issue_token("2002", 3600).expect("token");
    let (mut ws, _) = wss_feed(addr, &[&ca], &format!("access_token={token}")).await;

    // Plain HTTP.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let r = request(tcp, "GET", "/healthz", &[], b"").await;
    assert_eq!(r.status, 400, "{}", r.headers);
    assert!(r.text().contains("https://"), "{}", r.text());

    // A plain ws:// upgrade (what a client configured with ws:// sends).
    let url = format!("ws://127.0.0.1:{}{}", addr.port(), feed::FEED_HUB_PATH);
    match within("plain ws", tokio_tungstenite::connect_async(url)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        other => panic!("a plain ws:// upgrade must be refused with 400: {other:?}"),
    }

    // Garbage: not TLS, not HTTP.
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage
        .write_all(&[0x00, 0xff, 0x13, 0x37, 0x00, 0x00])
        .await
        .expect("write");
    let got = closed_within(&mut garbage, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "nothing answers garbage: {got:?}");

    // A TLS record header of a ClientHello, then garbage inside it.
    let mut bad_hello = TcpStream::connect(addr).await.expect("connect");
    bad_hello
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .expect("write");
    closed_within(&mut bad_hello, Duration::from_secs(5)).await;

    // Silent, and truncated: both closed at the handshake deadline.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut truncated = TcpStream::connect(addr).await.expect("connect");
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    closed_within(&mut silent, Duration::from_secs(5)).await;
    closed_within(&mut truncated, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed at the deadline, not at once ({waited:?})"
    );

    // A client that does not trust this server's CA fails its own handshake.
    let refused = tls_connect(addr, &[&stranger]).await;
    assert!(
        refused.is_err(),
        "an untrusted certificate must fail the client's check"
    );

    // The server is fine: the open WebSocket works and new https requests are served.
    assert_eq!(who_am_i(&mut ws, "after").await, "2002");
    let health = https(addr, &ca, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let counted = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(counted(&TLS_METRICS.plain_http) >= plain_before + 2);
    assert!(counted(&TLS_METRICS.handshake_timeouts) >= timeouts_before + 2);
    drop(ws);
    server.shutdown().await;
}

/// [`feedhub::tls::Tls::reload`]: new handshakes get the new certificate (from another CA),
/// the WebSocket opened before keeps working; a bad certificate or a missing key is
/// refused and the current certificate stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_serves_new_connections_the_new_certificate_and_keeps_open_ones() {
    let old_ca = TestCa::new("old");
    let new_ca = TestCa::new("new");
    let old = old_ca.issue("old");
    let new = new_ca.issue("new");
    let files = Files::new("reload");
    let server = start_tls_feed(files.install(&old)).await;
    let addr = server.local_addr();
    let tls = server.tls().expect("tls on").clone();
    let token = server.issue_token("2003", 3600).expect("token");
    let query = format!("access_token={token}");

    let (mut before, got) = wss_feed(addr, &[&old_ca], &query).await;
    assert_eq!(got, old.der);

    files.install(&new);
    tls.reload().await.expect("reload");
    assert_eq!(tls.current_chain()[0].as_ref(), &new.der[..]);
    let (mut after, got) = wss_feed(addr, &[&new_ca], &query).await;
    assert_eq!(got, new.der, "a new connection gets the new certificate");
    assert!(
        tls_connect(addr, &[&old_ca]).await.is_err(),
        "the old CA no longer verifies new connections"
    );
    assert_eq!(
        who_am_i(&mut before, "b").await,
        "2003",
        "the old connection works"
    );
    assert_eq!(who_am_i(&mut after, "a").await, "2003");

    // A key that is not the certificate's: refused, the new certificate stays.
    files.write("key.pem", &old.key_pem);
    let err = tls.reload().await.expect_err("mismatched key refused");
    assert!(err.to_string().contains("does not match"), "{err}");
    // Garbage, then a missing key file.
    files.write("cert.pem", "not a certificate\n");
    let err = tls.reload().await.expect_err("garbage refused");
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
    std::fs::remove_file(files.path("key.pem")).expect("rm key");
    files.write("cert.pem", &new.cert_pem);
    let err = tls.reload().await.expect_err("missing key refused");
    assert!(err.to_string().contains("key.pem"), "{err}");
    let (_, got) = wss_feed(addr, &[&new_ca], &query).await;
    assert_eq!(got, new.der, "still the last good certificate");
    assert_eq!(who_am_i(&mut before, "b2").await, "2003");
    drop((before, after));
    server.shutdown().await;
}

/// Unusable certificate files are a startup error naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_unusable_certificate_files() {
    let ca = TestCa::new("startup");
    let a = ca.issue("a");
    let b = ca.issue("b");
    let files = Files::new("startup");
    let start = |tls: TlsConfig| async move {
        ServerBuilder::new(feed_config())
            .hub(feed::feed_hub())
            .tls(tls)
            .start()
            .await
            .map(|_| ())
    };
    let missing = TlsConfig::new(files.path("nope.pem"), files.path("nope.key"));
    let err = start(missing).await.expect_err("missing files");
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let cert = files.write("a.pem", &a.cert_pem);
    let other_key = files.write("b.key", &b.key_pem);
    let err = start(TlsConfig::new(&cert, &other_key))
        .await
        .expect_err("mismatched key");
    assert!(err.to_string().contains("does not match"), "{err}");
    let swapped = start(TlsConfig::new(&other_key, &cert))
        .await
        .expect_err("key and certificate swapped");
    assert!(swapped.to_string().contains("no PEM"), "{swapped}");
}

// ---------------------------------------------------------------------------------------
// The real binary: SIGHUP
// ---------------------------------------------------------------------------------------

/// The `feedhub` binary, its log lines collected.
struct Binary {
    child: tokio::process::Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts the binary with `args` and, of the `FEEDHUB_*` variables, only `envs`.
    async fn start(args: &[String], envs: &[(&str, String)]) -> (Binary, SocketAddr) {
        let mut cmd = binary_command(envs);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn feedhub");
        let log = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn AsyncRead + Send + Unpin>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    println!("[feedhub] {line}");
                    log.lock().expect("log").push(strip_ansi(&line));
                }
            });
        }
        let mut binary = Binary { child, log };
        let line = binary.wait_for_log("listening", 0).await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        (binary, addr)
    }

    /// The first log line after the first `skip` lines containing `needle`.
    async fn wait_for_log(&mut self, needle: &str, skip: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .log
                .lock()
                .expect("log")
                .iter()
                .skip(skip)
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("feedhub exited ({status}) before logging {needle:?}");
            }
            assert!(Instant::now() < deadline, "feedhub did not log {needle:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lines(&self) -> usize {
        self.log.lock().expect("log").len()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on the pid of the child this test started and still holds.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }
}

/// The `feedhub` binary with none of this process's `FEEDHUB_*` variables, plus `envs`.
fn binary_command(envs: &[(&str, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_feedhub"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FEEDHUB_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    cmd
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// SIGHUP on the real binary: new connections get the new certificate, a wss:// WebSocket
/// opened before stays open and working; a bad file on the next SIGHUP is logged and the
/// good certificate stays; `/metrics` counts both reloads; SIGTERM still shuts it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_running_binary() {
    let ca = TestCa::new("sighup");
    let first = ca.issue("first");
    let second = ca.issue("second");
    let files = Files::new("sighup");
    let tls = files.install(&first);
    // The certificate by flag, the key by its environment twin.
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        TEST_SECRET,
        "--api-key",
        TEST_API_KEY,
        "--tls-cert",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([tls.cert.display().to_string()])
    .collect();
    let envs = [("FEEDHUB_TLS_KEY", tls.key.display().to_string())];
    let (mut binary, addr) = Binary::start(&args, &envs).await;
    binary.wait_for_log("feed hub at https://", 0).await;
    let token = feedhub::auth::Authenticator::new(Some(TEST_SECRET), &Default::default())
        .expect("authenticator")
        .issue("2004", 3600)
        .expect("token");
    let query = format!("access_token={token}");

    let (mut open, got) = wss_feed(addr, &[&ca], &query).await;
    assert_eq!(got, first.der);

    files.install(&second);
    let seen = binary.lines();
    binary.signal(libc::SIGHUP);
    binary.wait_for_log("TLS certificate reloaded", seen).await;
    let (mut fresh, got) = wss_feed(addr, &[&ca], &query).await;
    assert_eq!(
        got, second.der,
        "a new connection gets the reloaded certificate"
    );
    assert_eq!(
        who_am_i(&mut open, "1").await,
        "2004",
        "the open WebSocket still works"
    );
    assert_eq!(who_am_i(&mut fresh, "2").await, "2004");

    // A half-written key on the next SIGHUP: logged, the second certificate stays.
    files.write("key.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n");
    let seen = binary.lines();
    binary.signal(libc::SIGHUP);
    let line = binary.wait_for_log("reload failed", seen).await;
    assert!(line.contains("key.pem"), "the log names the file: {line}");
    let (_, got) = wss_feed(addr, &[&ca], &query).await;
    assert_eq!(got, second.der, "still the last good certificate");
    assert_eq!(who_am_i(&mut open, "3").await, "2004");

    let metrics = https(addr, &ca, "GET", "/metrics", &[], b"").await.text();
    assert!(
        metrics.contains("feedhub_tls_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("feedhub_tls_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );

    drop((open, fresh));
    binary.signal(libc::SIGTERM);
    let status = within("feedhub exit", binary.child.wait())
        .await
        .expect("wait");
    assert!(status.success(), "graceful exit: {status}");
}

// ---------------------------------------------------------------------------------------
// Real clients: the official Node client and Chromium
// ---------------------------------------------------------------------------------------

/// The official `@microsoft/signalr` client over https/wss on every transport, trusting the
/// test CA through `NODE_EXTRA_CA_CERTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_client_over_wss_and_https() {
    let Some(node) = external::node() else { return };
    let ca = TestCa::new("node");
    let files = Files::new("node");
    let server = start_tls_feed(files.install(&ca.issue("server"))).await;
    let ca_file = files.write("ca.pem", &ca.pem);
    let env = [
        (
            "FEEDHUB_URL",
            format!("https://localhost:{}", server.local_addr().port()),
        ),
        ("FEEDHUB_JWT_SECRET", TEST_SECRET.to_string()),
        ("FEEDHUB_API_KEY", TEST_API_KEY.to_string()),
        ("NODE_EXTRA_CA_CERTS", ca_file.display().to_string()),
    ];
    let run = node.run("tls.mjs", &env, Duration::from_secs(120)).await;
    server.shutdown().await;
    run.assert_success();
}

/// The demo page in headless Chromium over https: the feed scenario of `browser.mjs`
/// (Alice posts, Bob sees it live, Carol does not, ...) with every page checked to be an
/// https secure context whose hub WebSocket is wss://. Chromium accepts the server's key,
/// pinned with `--ignore-certificate-errors-spki-list` (Chromium has no flag to trust a CA
/// file; any other certificate still fails), Node (the script's own requests) trusts the
/// CA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_runs_the_demo_over_https_and_wss() {
    let Some(node) = external::node() else { return };
    let Some(chromium) = external::chromium() else {
        return;
    };
    let ca = TestCa::new("chromium");
    let cert = ca.issue("server");
    let files = Files::new("chromium");
    let config = ServerConfig {
        dev_identities: true,
        ..feed_config()
    };
    let server = ServerBuilder::new(config)
        .hub(feed::feed_hub())
        .memory_bus(MemoryBus::new())
        .demo_store(Arc::new(MemoryStore::new(1000)))
        .tls(files.install(&cert))
        .start()
        .await
        .expect("demo over tls");
    let ca_file = files.write("ca.pem", &ca.pem);
    let url = format!("https://localhost:{}", server.local_addr().port());
    let env = [
        ("FEEDHUB_URL", url.clone()),
        ("FEEDHUB_URL_B", url),
        ("FEEDHUB_API_KEY", TEST_API_KEY.to_string()),
        ("FEEDHUB_SCENARIO", "feed".to_string()),
        ("FEEDHUB_PROTOCOL", "json".to_string()),
        ("FEEDHUB_CHROMIUM", chromium.display().to_string()),
        (
            "FEEDHUB_CHROMIUM_ARGS",
            format!("--ignore-certificate-errors-spki-list={}", cert.spki_sha256),
        ),
        ("FEEDHUB_EXPECT_SECURE", "1".to_string()),
        ("NODE_EXTRA_CA_CERTS", ca_file.display().to_string()),
    ];
    let run = node
        .run("browser.mjs", &env, Duration::from_secs(240))
        .await;
    server.shutdown().await;
    run.assert_success();
}

/// The binary refuses half a TLS configuration (a certificate without its key, by flag or by
/// environment) and unusable files, with a message naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_refuses_half_or_unusable_tls_settings() {
    let ca = TestCa::new("flags");
    let files = Files::new("flags");
    let tls = files.install(&ca.issue("server"));
    let cert = tls.cert.display().to_string();
    let key = tls.key.display().to_string();
    // (flags, FEEDHUB_* variables, what the error must say)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, String)>, &'a str);
    let cases: [Case; 4] = [
        (vec!["--tls-cert", &cert], vec![], "--tls-key"),
        (vec![], vec![("FEEDHUB_TLS_KEY", key.clone())], "--tls-cert"),
        // Certificate and key swapped: the "certificate" file holds no certificate.
        (
            vec!["--tls-cert", &key],
            vec![("FEEDHUB_TLS_KEY", cert.clone())],
            "no PEM certificate",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", "/nonexistent/feedhub.key"],
            vec![],
            "/nonexistent/feedhub.key",
        ),
    ];
    for (args, envs, expected) in cases {
        let mut cmd = binary_command(&envs);
        cmd.args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = within("feedhub exits", cmd.output()).await.expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?} {envs:?} must fail: {text}");
        assert!(text.contains(expected), "{args:?}: {expected:?} in {text}");
    }
}
