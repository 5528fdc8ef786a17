//! JWTs of real identity providers against the feed hub: every accepted algorithm with its
//! key, the refused ones (alg none, HS/RS confusion, crit, wrong key kind), `iss`, `aud`,
//! `nbf`, `exp` and the leeway, a local HTTPS JWKS server with key rotation, rate-limited
//! refetches and an outage, the connection closed at token expiry, the real binary's
//! start-up checks and env twins, and the official `@microsoft/signalr` client with RS256.
//!
//! Keys and the test CA are made at run time with the `openssl` CLI (missing: the tests
//! print `SKIPPED` and pass, unless `CI=true`, where they fail). Every token is checked at
//! both doors: negotiate and the WebSocket connect (skipNegotiation).
//!
//! Run: `cargo test --release --test jwt`.

#[path = "support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "support/external.rs"]
mod external;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use feedhub::auth::jwks::JwksConfig;
use feedhub::auth::{unix_now, JwtOptions, NAME_IDENTIFIER_CLAIM};
use feedhub::hub::{HubBuilder, HubContext, HubError};
use feedhub::protocol::{HubMessage, ProtocolKind};
use feedhub::session::TOKEN_EXPIRED_REASON;
use feedhub::{feed, ServerBuilder, ServerConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::cluster::http;
use support::{within, RawClient, TestServer, TEST_SECRET};

// ---------------------------------------------------------------------------------------
// Keys (openssl CLI), tokens
// ---------------------------------------------------------------------------------------

/// A key pair made by openssl: the private key signs tokens, the public PEM file is what
/// the server is given.
struct KeyPair {
    enc: EncodingKey,
    public_pem: String,
    public_path: PathBuf,
}

/// Every key the tests use, made once per test binary.
struct Keys {
    rsa: KeyPair,
    rsa2: KeyPair,
    /// An RSA key the server never learns.
    foreign: KeyPair,
    p256: KeyPair,
    p384: KeyPair,
    ed: KeyPair,
    /// CA certificate (PEM file) and the JWKS server's certificate and key, for 127.0.0.1.
    ca: PathBuf,
    tls_cert: PathBuf,
    tls_key: PathBuf,
}

fn run_openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn keypair(dir: &Path, name: &str, algorithm: &[&str]) -> KeyPair {
    let private = format!("{name}.key");
    let public = format!("{name}.pub.pem");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(algorithm);
    args.extend_from_slice(&["-out", &private]);
    run_openssl(dir, &args);
    run_openssl(dir, &["pkey", "-in", &private, "-pubout", "-out", &public]);
    let private_pem = std::fs::read(dir.join(&private)).unwrap();
    let enc = match algorithm[1] {
        "RSA" => EncodingKey::from_rsa_pem(&private_pem),
        "EC" => EncodingKey::from_ec_pem(&private_pem),
        _ => EncodingKey::from_ed_pem(&private_pem),
    }
    .unwrap();
    KeyPair {
        enc,
        public_pem: std::fs::read_to_string(dir.join(&public)).unwrap(),
        public_path: dir.join(public),
    }
}

/// The keys, or `None` without openssl (a failure under CI).
fn keys() -> Option<&'static Keys> {
    static KEYS: OnceLock<Option<Keys>> = OnceLock::new();
    KEYS.get_or_init(|| {
        if let Err(e) = Command::new("openssl").arg("version").output() {
            if external::is_ci() {
                panic!("openssl is required under CI=true: {e}");
            }
            println!("SKIPPED: openssl unavailable ({e}); set CI=true to make this a failure");
            return None;
        }
        let dir = external::target_dir().join(format!(
            "jwt-test-{}-{}",
            std::process::id(),
            feedhub::ids::random_token()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
        let keys = Keys {
            rsa: keypair(&dir, "rsa", &rsa),
            rsa2: keypair(&dir, "rsa2", &rsa),
            foreign: keypair(&dir, "foreign", &rsa),
            p256: keypair(&dir, "p256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
            p384: keypair(&dir, "p384", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
            ed: keypair(&dir, "ed", &["-algorithm", "ED25519"]),
            ca: dir.join("ca.crt"),
            tls_cert: dir.join("leaf.crt"),
            tls_key: dir.join("leaf.key"),
        };
        // A CA, and a server certificate for 127.0.0.1 it signed (webpki refuses a CA
        // certificate as the server's own).
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let mut ca = vec!["req", "-x509"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=feedhub-test-ca"]);
        run_openssl(&dir, &ca);
        let mut csr = vec!["req"];
        csr.extend_from_slice(&ec);
        csr.extend_from_slice(&["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost"]);
        run_openssl(&dir, &csr);
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run_openssl(
            &dir,
            &[
                "x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", "leaf.crt", "-days", "2", "-extfile", "leaf.ext",
            ],
        );
        Some(keys)
    })
    .as_ref()
}

fn claims(user: &str) -> Value {
    let now = unix_now();
    json!({"sub": user, "iat": now, "exp": now + 3600})
}

fn sign(key: &KeyPair, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.enc).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with exactly this header, signed by nobody (`signature` as given).
fn unsigned(header: Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// An HS256 token whose HMAC key is `secret`.
fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// The JWK of a key pair, with `kid` (and `alg` when given).
fn jwk(key: &KeyPair, alg: Algorithm, kid: &str, pin_alg: bool) -> Value {
    let mut v =
        serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&key.enc, alg).unwrap())
            .unwrap();
    v["kid"] = json!(kid);
    v["use"] = json!("sig");
    if !pin_alg {
        v.as_object_mut().unwrap().remove("alg");
    }
    v
}

fn jwks(entries: &[Value]) -> String {
    json!({ "keys": entries }).to_string()
}

// ---------------------------------------------------------------------------------------
// Servers and doors
// ---------------------------------------------------------------------------------------

/// A hub that requires a user but does not close connections at token expiry.
fn plain_hub() -> feedhub::hub::HubDefinition {
    HubBuilder::new("/plain")
        .configure(|o| o.require_auth = true)
        .method("WhoAmI", |ctx: HubContext, (): ()| async move {
            Ok::<_, HubError>(ctx.user_id().map(str::to_string))
        })
        .build()
}

async fn server(secret: Option<&str>, jwt: JwtOptions) -> TestServer {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: secret.map(str::to_string),
        jwt,
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        ..ServerConfig::default()
    };
    let server = ServerBuilder::new(config)
        .hub(feed::feed_hub())
        .hub(plain_hub())
        .start()
        .await
        .expect("server");
    TestServer {
        base_url: format!("http://{}", server.local_addr()),
        jwt_secret: secret.unwrap_or_default().to_string(),
        api_key: String::new(),
        server: Some(server),
    }
}

fn pem_options(keys: &[&KeyPair]) -> JwtOptions {
    JwtOptions {
        public_keys: keys.iter().map(|k| k.public_path.clone()).collect(),
        ..JwtOptions::default()
    }
}

async fn negotiate_status(s: &TestServer, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    http(
        &s.base_url,
        "POST",
        "/hubs/feed/negotiate?negotiateVersion=1",
        &[("Authorization", auth.as_str())],
        "",
    )
    .await
    .0
}

async fn connect_status(s: &TestServer, token: &str) -> u16 {
    let url = format!("{}/hubs/feed?access_token={token}", s.ws_url());
    match within("websocket connect", tokio_tungstenite::connect_async(url)).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

/// Asserts the token's fate at both doors: accepted (200 and 101) or refused (401, 401).
async fn expect(s: &TestServer, what: &str, token: &str, accepted: bool) {
    let got = (
        negotiate_status(s, token).await,
        connect_status(s, token).await,
    );
    let want = if accepted { (200, 101) } else { (401, 401) };
    assert_eq!(got, want, "{what}: (negotiate, connect)");
}

// ---------------------------------------------------------------------------------------
// Algorithms and refusals
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_is_accepted_with_a_key_of_its_kind() {
    let Some(k) = keys() else { return };
    let s = server(None, pem_options(&[&k.rsa, &k.p256, &k.p384, &k.ed])).await;
    let c = claims("alice");
    for (alg, key) in [
        (Algorithm::RS256, &k.rsa),
        (Algorithm::RS384, &k.rsa),
        (Algorithm::RS512, &k.rsa),
        (Algorithm::PS256, &k.rsa),
        (Algorithm::PS384, &k.rsa),
        (Algorithm::PS512, &k.rsa),
        (Algorithm::ES256, &k.p256),
        (Algorithm::ES384, &k.p384),
        (Algorithm::EdDSA, &k.ed),
    ] {
        expect(&s, &format!("{alg:?}"), &sign(key, alg, None, &c), true).await;
    }
    // The user is the sub claim.
    let mut ws = RawClient::connect(
        &format!(
            "{}/plain?access_token={}",
            s.ws_url(),
            sign(&k.p256, Algorithm::ES256, None, &c)
        ),
        ProtocolKind::Json,
    )
    .await;
    assert_eq!(invoke_who_am_i(&mut ws).await, json!("alice"));
}

async fn invoke_who_am_i(ws: &mut RawClient) -> Value {
    ws.send_text(
        "{\"type\":1,\"invocationId\":\"1\",\"target\":\"WhoAmI\",\"arguments\":[]}\u{1e}",
    )
    .await;
    match ws.recv().await {
        Some(HubMessage::Completion(c)) => match c.result {
            feedhub::protocol::CompletionResult::Value(v) => {
                serde_json::from_str(&v.to_json_string().unwrap()).unwrap()
            }
            other => panic!("WhoAmI failed: {other:?}"),
        },
        other => panic!("expected a Completion, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_wrong_kinds_and_unsigned_tokens_are_refused() {
    let Some(k) = keys() else { return };
    // Only an RSA key and a P-256 key are configured, and no HS256 secret.
    let s = server(None, pem_options(&[&k.rsa, &k.p256])).await;
    let c = claims("mallory");
    let cases = [
        (
            "RS256 signed by an unknown key",
            sign(&k.foreign, Algorithm::RS256, None, &c),
        ),
        (
            "ES384 (no P-384 key)",
            sign(&k.p384, Algorithm::ES384, None, &c),
        ),
        (
            "EdDSA (no Ed25519 key)",
            sign(&k.ed, Algorithm::EdDSA, None, &c),
        ),
        // A P-256 signature presented as ES384: the P-256 key does not verify ES384.
        ("ES256 signature labelled ES384", {
            let t = sign(&k.p256, Algorithm::ES256, None, &c);
            let (_, rest) = t.split_once('.').unwrap();
            format!("{}.{rest}", b64(br#"{"alg":"ES384","typ":"JWT"}"#))
        }),
        (
            "alg none",
            unsigned(json!({"alg": "none", "typ": "JWT"}), &c, ""),
        ),
        ("alg None", unsigned(json!({"alg": "None"}), &c, "")),
        ("no alg", unsigned(json!({"typ": "JWT"}), &c, "AAAA")),
        // Algorithm confusion: HS256 "signed" with the RSA public key's PEM bytes, which
        // the server has; without a secret HS256 is not accepted at all.
        (
            "HS256 with the RSA public key as secret",
            hs256(k.rsa.public_pem.as_bytes(), &c),
        ),
        (
            "HS256 with the test secret",
            hs256(TEST_SECRET.as_bytes(), &c),
        ),
        ("RS256 with a crit header", {
            let mut h = Header::new(Algorithm::RS256);
            h.crit = Some(vec!["http://example.com/ext".into()]);
            jsonwebtoken::encode(&h, &c, &k.rsa.enc).unwrap()
        }),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, token) in &cases {
        expect(&s, what, token, false).await;
    }
    // Tampered claims with a valid signature's header: refused.
    let good = sign(&k.rsa, Algorithm::RS256, None, &c);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims("admin").to_string().as_bytes()),
        parts[2]
    );
    expect(&s, "RS256 with swapped claims", &forged, false).await;
    expect(&s, "the untampered token", &good, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_and_rs256_together_never_confuse_their_keys() {
    let Some(k) = keys() else { return };
    let s = server(Some(TEST_SECRET), pem_options(&[&k.rsa])).await;
    let c = claims("bob");
    expect(
        &s,
        "HS256 with the secret",
        &hs256(TEST_SECRET.as_bytes(), &c),
        true,
    )
    .await;
    expect(
        &s,
        "RS256 with the key",
        &sign(&k.rsa, Algorithm::RS256, None, &c),
        true,
    )
    .await;
    expect(
        &s,
        "HS256 with the RSA public key as secret",
        &hs256(k.rsa.public_pem.as_bytes(), &c),
        false,
    )
    .await;
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &c,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    expect(&s, "HS512 with the secret", &hs512, false).await;
    let mut h = Header::new(Algorithm::HS256);
    h.crit = Some(vec!["b64".into()]);
    let crit =
        jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(TEST_SECRET.as_bytes())).unwrap();
    expect(&s, "HS256 with crit", &crit, false).await;
}

// ---------------------------------------------------------------------------------------
// Claims
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_audience_nbf_exp_and_leeway() {
    let Some(k) = keys() else { return };
    let s = server(
        None,
        JwtOptions {
            issuers: vec!["https://idp.test/realms/feed".into()],
            audiences: vec!["api://feedhub".into(), "feedhub-web".into()],
            leeway_secs: 30,
            ..pem_options(&[&k.rsa])
        },
    )
    .await;
    let now = unix_now();
    let base = json!({
        "sub": "carol", "iss": "https://idp.test/realms/feed", "aud": "api://feedhub",
        "iat": now, "exp": now + 600,
    });
    let with = |changes: Value| {
        let mut c = base.clone();
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                c.as_object_mut().unwrap().remove(key);
            } else {
                c[key] = value.clone();
            }
        }
        sign(&k.rsa, Algorithm::RS256, None, &c)
    };
    let cases = [
        ("all right", with(json!({})), true),
        ("second audience", with(json!({"aud": "feedhub-web"})), true),
        (
            "aud array with one match",
            with(json!({"aud": ["account", "api://feedhub"]})),
            true,
        ),
        ("other audience", with(json!({"aud": "account"})), false),
        ("no aud", with(json!({"aud": null})), false),
        (
            "other issuer",
            with(json!({"iss": "https://evil.test"})),
            false,
        ),
        ("no iss", with(json!({"iss": null})), false),
        (
            "nbf in 10 s (within the leeway)",
            with(json!({"nbf": now + 10})),
            true,
        ),
        ("nbf in 5 min", with(json!({"nbf": now + 300})), false),
        (
            "expired 10 s ago (within the leeway)",
            with(json!({"exp": now - 10})),
            true,
        ),
        ("expired 2 min ago", with(json!({"exp": now - 120})), false),
        ("no exp", with(json!({"exp": null})), false),
        (
            "no sub, but ASP.NET's nameidentifier",
            with(json!({"sub": null, NAME_IDENTIFIER_CLAIM: "carol"})),
            true,
        ),
        ("no user id claim at all", with(json!({"sub": null})), false),
    ];
    for (what, token, accepted) in &cases {
        expect(&s, what, token, *accepted).await;
    }

    // --jwt-allow-no-exp, --jwt-leeway-secs 0 and --jwt-user-claim.
    let lax = server(
        None,
        JwtOptions {
            allow_no_exp: true,
            leeway_secs: 0,
            user_claim: Some("oid".into()),
            ..pem_options(&[&k.rsa])
        },
    )
    .await;
    let sign_c = |c: Value| sign(&k.rsa, Algorithm::RS256, None, &c);
    expect(&lax, "no exp, allowed", &sign_c(json!({"oid": "o1"})), true).await;
    expect(
        &lax,
        "expired 10 s ago, no leeway",
        &sign_c(json!({"oid": "o1", "exp": now - 10})),
        false,
    )
    .await;
    expect(
        &lax,
        "nbf in 10 s, no leeway",
        &sign_c(json!({"oid": "o1", "nbf": now + 10})),
        false,
    )
    .await;
    expect(&lax, "sub but no oid", &sign_c(json!({"sub": "s1"})), false).await;
    expect(
        &lax,
        "any aud when none is configured",
        &sign_c(json!({"oid": "o1", "aud": "whatever"})),
        true,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// JWKS: a local HTTPS server with rotation and outages
// ---------------------------------------------------------------------------------------

/// A tiny HTTPS server that serves a key set and counts its requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    /// Answer 503 instead of the set.
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(keys: &Keys, body: String) -> JwksServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&keys.tls_cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&keys.tls_key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://{}/realms/test/certs",
            listener.local_addr().unwrap()
        );
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (b, h, d) = (body.clone(), hits.clone(), down.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, b, h, d) = (acceptor.clone(), b.clone(), h.clone(), d.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let (status, text) = if d.load(Ordering::SeqCst) {
                            (503, "down".to_string())
                        } else {
                            (200, b.lock().unwrap().clone())
                        };
                        async move {
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(Bytes::from(text)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer {
            url,
            body,
            hits,
            down,
            task,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn serve(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn options(&self, keys: &Keys, refresh: Duration, min_refetch: Duration) -> JwtOptions {
        JwtOptions {
            jwks: Some(JwksConfig {
                ca: Some(keys.ca.clone()),
                refresh_interval: refresh,
                min_refetch_interval: min_refetch,
                ..JwksConfig::new(self.url.clone())
            }),
            ..JwtOptions::default()
        }
    }

    async fn wait_hits(&self, at_least: usize, what: &str) {
        within(what, async {
            while self.hits() < at_least {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_fetches_a_new_kid_once_and_rate_limits_unknown_kids() {
    let Some(k) = keys() else { return };
    let idp = JwksServer::start(k, jwks(&[jwk(&k.rsa, Algorithm::RS256, "k1", true)])).await;
    let s = server(
        None,
        idp.options(k, Duration::from_secs(3600), Duration::from_secs(60)),
    )
    .await;
    idp.wait_hits(1, "the first key set fetch").await;
    let c = claims("dave");
    expect(
        &s,
        "kid k1",
        &sign(&k.rsa, Algorithm::RS256, Some("k1"), &c),
        true,
    )
    .await;
    assert_eq!(idp.hits(), 1, "a known kid fetches nothing");

    // The provider rotates: k2 appears. The first k2 token fetches the set, once.
    idp.serve(jwks(&[
        jwk(&k.rsa, Algorithm::RS256, "k1", true),
        jwk(&k.rsa2, Algorithm::RS256, "k2", true),
    ]));
    let k2 = sign(&k.rsa2, Algorithm::RS256, Some("k2"), &c);
    let concurrent: Vec<_> = (0..4).map(|_| negotiate_status(&s, &k2)).collect();
    for status in futures_util::future::join_all(concurrent).await {
        assert_eq!(status, 200, "k2 after the rotation");
    }
    expect(&s, "kid k2", &k2, true).await;
    assert_eq!(
        idp.hits(),
        2,
        "one fetch for the new kid, however many tokens carried it"
    );

    // Made-up kids: refused, and no more fetches within the refetch interval.
    for i in 0..5 {
        let t = sign(&k.rsa2, Algorithm::RS256, Some(&format!("made-up-{i}")), &c);
        expect(&s, "an unknown kid", &t, false).await;
    }
    assert_eq!(idp.hits(), 2, "unknown kids are rate limited");
    // The key of a kid still verifies only under its own kid.
    expect(
        &s,
        "k2's key under kid k1",
        &sign(&k.rsa2, Algorithm::RS256, Some("k1"), &c),
        false,
    )
    .await;
    // The set pins RS256: PS256 with the same key is refused.
    expect(
        &s,
        "PS256 with a key pinned to RS256",
        &sign(&k.rsa, Algorithm::PS256, Some("k1"), &c),
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_refetches_again_after_the_interval_and_drops_removed_keys() {
    let Some(k) = keys() else { return };
    let idp = JwksServer::start(
        k,
        jwks(&[
            jwk(&k.rsa, Algorithm::RS256, "k1", false),
            jwk(&k.p256, Algorithm::ES256, "e1", true),
            jwk(&k.ed, Algorithm::EdDSA, "d1", true),
        ]),
    )
    .await;
    let interval = Duration::from_secs(3);
    let s = server(None, idp.options(k, Duration::from_secs(3600), interval)).await;
    idp.wait_hits(1, "the first key set fetch").await;
    let c = claims("erin");
    expect(
        &s,
        "RS256 k1",
        &sign(&k.rsa, Algorithm::RS256, Some("k1"), &c),
        true,
    )
    .await;
    expect(
        &s,
        "PS512 k1 (no alg pinned)",
        &sign(&k.rsa, Algorithm::PS512, Some("k1"), &c),
        true,
    )
    .await;
    expect(
        &s,
        "ES256 e1",
        &sign(&k.p256, Algorithm::ES256, Some("e1"), &c),
        true,
    )
    .await;
    expect(
        &s,
        "EdDSA d1",
        &sign(&k.ed, Algorithm::EdDSA, Some("d1"), &c),
        true,
    )
    .await;
    expect(
        &s,
        "no kid: any key of the kind",
        &sign(&k.p256, Algorithm::ES256, None, &c),
        true,
    )
    .await;

    // k1 is retired, k2 published. The first unknown kid fetches; the next one within
    // the interval does not; after it, one more fetch.
    idp.serve(jwks(&[jwk(&k.rsa2, Algorithm::RS256, "k2", true)]));
    let started = Instant::now();
    expect(
        &s,
        "k2",
        &sign(&k.rsa2, Algorithm::RS256, Some("k2"), &c),
        true,
    )
    .await;
    assert_eq!(idp.hits(), 2);
    expect(
        &s,
        "k1 after its removal",
        &sign(&k.rsa, Algorithm::RS256, Some("k1"), &c),
        false,
    )
    .await;
    expect(
        &s,
        "unknown kid x",
        &sign(&k.rsa2, Algorithm::RS256, Some("x"), &c),
        false,
    )
    .await;
    assert!(
        started.elapsed() < interval,
        "the machine was too slow for this check"
    );
    assert_eq!(idp.hits(), 2, "within the interval: no refetch");
    tokio::time::sleep(interval + Duration::from_millis(300)).await;
    expect(
        &s,
        "unknown kid x again",
        &sign(&k.rsa2, Algorithm::RS256, Some("x"), &c),
        false,
    )
    .await;
    assert_eq!(idp.hits(), 3, "after the interval: one refetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_keeps_the_cached_keys() {
    let Some(k) = keys() else { return };
    let idp = JwksServer::start(k, jwks(&[jwk(&k.rsa, Algorithm::RS256, "k1", true)])).await;
    // Refreshes every second, so the outage is seen several times.
    let s = server(
        None,
        idp.options(k, Duration::from_secs(1), Duration::from_secs(1)),
    )
    .await;
    idp.wait_hits(1, "the first key set fetch").await;
    let c = claims("frank");
    let k1 = sign(&k.rsa, Algorithm::RS256, Some("k1"), &c);
    expect(&s, "k1", &k1, true).await;

    idp.down.store(true, Ordering::SeqCst);
    let before = idp.hits();
    idp.wait_hits(before + 2, "refreshes during the outage")
        .await;
    expect(&s, "k1 during the outage (503)", &k1, true).await;
    expect(
        &s,
        "an unknown kid during the outage",
        &sign(&k.rsa2, Algorithm::RS256, Some("k2"), &c),
        false,
    )
    .await;

    // Garbage and sets without usable keys are outages too.
    idp.down.store(false, Ordering::SeqCst);
    for body in [
        "not json",
        r#"{"keys":[]}"#,
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
    ] {
        idp.serve(body.to_string());
        let before = idp.hits();
        idp.wait_hits(before + 2, "refreshes of a bad set").await;
        expect(&s, &format!("k1 while the set is {body}"), &k1, true).await;
    }

    // Back, rotated: the background refresh alone picks the new set up.
    idp.serve(jwks(&[jwk(&k.rsa2, Algorithm::RS256, "k2", true)]));
    let before = idp.hits();
    idp.wait_hits(before + 2, "refreshes after the recovery")
        .await;
    let after = idp.hits();
    expect(
        &s,
        "k2 after the recovery",
        &sign(&k.rsa2, Algorithm::RS256, Some("k2"), &c),
        true,
    )
    .await;
    assert!(
        idp.hits() <= after + 1,
        "k2 was in the refreshed set already"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_must_be_https_and_its_ca_readable() {
    let Some(k) = keys() else { return };
    for (url, ca) in [
        ("http://127.0.0.1:1/keys", None),
        ("https://127.0.0.1:1/keys", Some(k.tls_key.clone())),
        (
            "https://127.0.0.1:1/keys",
            Some(PathBuf::from("/nonexistent/ca.pem")),
        ),
    ] {
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            jwt: JwtOptions {
                jwks: Some(JwksConfig {
                    ca: ca.clone(),
                    ..JwksConfig::new(url)
                }),
                ..JwtOptions::default()
            },
            ..ServerConfig::default()
        };
        let started = ServerBuilder::new(config)
            .hub(feed::feed_hub())
            .start()
            .await;
        assert!(started.is_err(), "{url} with CA {ca:?} must not start");
    }
}

// ---------------------------------------------------------------------------------------
// Expiry closes connections
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_when_its_token_expires_on_hubs_that_ask_for_it() {
    let s = server(
        Some(TEST_SECRET),
        JwtOptions {
            leeway_secs: 0,
            ..JwtOptions::default()
        },
    )
    .await;
    let exp = unix_now() + 3;
    let token = hs256(TEST_SECRET.as_bytes(), &json!({"sub": "gina", "exp": exp}));
    let connected = Instant::now();
    let mut feed_ws = RawClient::connect(
        &format!("{}/hubs/feed?access_token={token}", s.ws_url()),
        ProtocolKind::Json,
    )
    .await;
    let mut plain_ws = RawClient::connect(
        &format!("{}/plain?access_token={token}", s.ws_url()),
        ProtocolKind::Json,
    )
    .await;
    assert_eq!(invoke_who_am_i(&mut feed_ws).await, json!("gina"));

    // The feed hub: Close with the reason and allowReconnect, at expiry, not before.
    match feed_ws.recv().await {
        Some(HubMessage::Close(c)) => {
            assert_eq!(c.error.as_deref(), Some(TOKEN_EXPIRED_REASON));
            assert!(
                c.allow_reconnect,
                "the client may come back with a fresh token"
            );
        }
        other => panic!("expected Close at token expiry, got {other:?}"),
    }
    assert!(unix_now() > exp, "closed before the token expired");
    assert!(
        connected.elapsed() < Duration::from_secs(6),
        "closed late: {:?}",
        connected.elapsed()
    );
    feed_ws.expect_closed().await;

    // A hub without close_on_token_expiry keeps the connection.
    assert_eq!(invoke_who_am_i(&mut plain_ws).await, json!("gina"));
    // The expired token opens nothing new.
    expect(&s, "the expired token", &token, false).await;
}

// ---------------------------------------------------------------------------------------
// The real binary: start-up checks and env twins
// ---------------------------------------------------------------------------------------

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_feedhub"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    // The test's own environment must not configure the binary.
    for (key, _) in std::env::vars() {
        if key.starts_with("FEEDHUB_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs the binary, expecting it to exit by itself within the wait; (success, output).
async fn run_to_exit(mut cmd: Command) -> (bool, String) {
    let child = tokio::process::Command::from(std::mem::replace(&mut cmd, Command::new("true")))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn feedhub");
    let out = within("feedhub to exit", child.wait_with_output())
        .await
        .expect("feedhub output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_short_secret_by_flag_and_by_env() {
    let mut by_flag = binary();
    by_flag.args(["--listen", "127.0.0.1:0", "--jwt-secret", "a"]);
    let (ok, text) = run_to_exit(by_flag).await;
    assert!(!ok, "a 1-byte secret must stop the start: {text}");
    assert!(text.contains("at least 32"), "{text}");

    let mut by_env = binary();
    by_env
        .env("FEEDHUB_LISTEN", "127.0.0.1:0")
        .env("FEEDHUB_JWT_SECRET", "31-bytes-secret-is-not-enough!!");
    let (ok, text) = run_to_exit(by_env).await;
    assert!(!ok, "a 31-byte secret must stop the start: {text}");
    assert!(text.contains("at least 32"), "{text}");

    let mut bad_key = binary();
    bad_key.args([
        "--listen",
        "127.0.0.1:0",
        "--jwt-public-key",
        "/nonexistent/key.pem",
    ]);
    let (ok, text) = run_to_exit(bad_key).await;
    assert!(!ok && text.contains("/nonexistent/key.pem"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_public_key_issuer_audience_and_leeway_from_env() {
    let Some(k) = keys() else { return };
    let mut cmd = binary();
    cmd.env("FEEDHUB_LISTEN", "127.0.0.1:0")
        .env("FEEDHUB_JWT_PUBLIC_KEY", &k.p384.public_path)
        .env("FEEDHUB_JWT_ISSUER", "https://login.test/tenant/v2.0")
        .env("FEEDHUB_JWT_AUDIENCE", "api://feedhub,feedhub-spa")
        .env("FEEDHUB_JWT_LEEWAY_SECS", "0")
        .env("FEEDHUB_JWT_USER_CLAIM", "oid");
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn feedhub");
    let stdout = child.stdout.take().unwrap();
    let base_url = within("the listening line", async {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(at) = line.find("feed hub at http://") {
                let url = &line[at + "feed hub at ".len()..];
                let url = url
                    .split(|c: char| c.is_whitespace() || c == '\u{1b}')
                    .next()
                    .unwrap();
                return url.trim_end_matches("/hubs/feed").to_string();
            }
        }
        panic!("feedhub exited without listening");
    })
    .await;
    let s = TestServer {
        base_url,
        jwt_secret: String::new(),
        api_key: String::new(),
        server: None,
    };
    let now = unix_now();
    let t = |c: Value| sign(&k.p384, Algorithm::ES384, None, &c);
    let good = json!({"oid": "o-7", "iss": "https://login.test/tenant/v2.0", "aud": "feedhub-spa", "exp": now + 600});
    expect(&s, "ES384 with iss, aud, oid", &t(good.clone()), true).await;
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("other");
    expect(&s, "wrong aud", &t(wrong_aud), false).await;
    let mut late = good.clone();
    late["exp"] = json!(now - 5);
    expect(&s, "expired 5 s ago, leeway 0", &t(late), false).await;
    expect(
        &s,
        "HS256 (no secret given)",
        &hs256(TEST_SECRET.as_bytes(), &good),
        false,
    )
    .await;
    let pid = child.id().expect("pid");
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = within("feedhub to stop", child.wait()).await;
}

// ---------------------------------------------------------------------------------------
// The official client
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_with_rs256_tokens_from_a_jwks() {
    let Some(k) = keys() else { return };
    let Some(node) = external::node() else { return };
    let idp = JwksServer::start(k, jwks(&[jwk(&k.rsa, Algorithm::RS256, "rsa-1", true)])).await;
    let s = server(
        None,
        JwtOptions {
            issuers: vec!["https://idp.test".into()],
            audiences: vec!["feedhub".into()],
            leeway_secs: 0,
            ..idp.options(k, Duration::from_secs(3600), Duration::from_secs(30))
        },
    )
    .await;
    let now = unix_now();
    let token = |key: &KeyPair, ttl: u64| {
        sign(
            key,
            Algorithm::RS256,
            Some("rsa-1"),
            &json!({"sub": "1042", "iss": "https://idp.test", "aud": "feedhub", "iat": now, "exp": now + ttl}),
        )
    };
    let env = vec![
        ("FEEDHUB_URL", s.base_url.clone()),
        ("FEEDHUB_USER", "1042".to_string()),
        ("FEEDHUB_RS256_TOKEN", token(&k.rsa, 3600)),
        ("FEEDHUB_FOREIGN_TOKEN", token(&k.foreign, 3600)),
        ("FEEDHUB_SHORT_TOKEN", token(&k.rsa, 6)),
    ];
    let run = node.run("jwt.mjs", &env, Duration::from_secs(120)).await;
    drop(s);
    run.assert_success();
}
