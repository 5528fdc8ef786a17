//! TLS termination (`--tls-cert`, `--tls-key`): rustls with the ring provider, PEM files,
//! reloaded without a restart.
//!
//! What it owns: turning an accepted socket into a TLS stream for the HTTP layer, and the
//! certificate that handshake presents. It knows nothing about HTTP, hubs or sessions; the
//! composition root (`app.rs`) calls [`Tls::accept`] inside each connection's own task,
//! never in the accept loop, so a slow or silent client only ever holds its own task.
//!
//! - **Reload.** The certificate and key sit behind a resolver ([`ResolvesServerCert`])
//!   holding an `Arc<CertifiedKey>` under a lock. [`Tls::reload`] reads both files again
//!   and swaps the pair only when both parse and match; otherwise the old pair stays and
//!   the error is returned (the SIGHUP loop, [`reload_on_sighup`], logs it). Established
//!   connections never notice: a TLS session keeps the keys it negotiated; only handshakes
//!   after the swap see the new certificate.
//! - **Bounds.** The whole handshake, from the first byte to the finished handshake, has a
//!   deadline ([`DEFAULT_HANDSHAKE_TIMEOUT`]). Plain HTTP sent to the TLS port gets a `400`
//!   that says to use `https://`/`wss://`, read from at most [`PLAIN_HTTP_HEAD_LIMIT`] bytes.
//! - **Metrics.** [`TLS_METRICS`]: handshakes, handshake failures by reason, reloads by
//!   result; rendered with the rest at `/metrics`.
//!
//! The PEM parsing ([`certified_key_from_pem`]) is pure and tested beside the code.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

/// How long a client has from connecting to a finished TLS handshake. Browsers and the
/// official clients finish in milliseconds; the bound only stops idle or trickling sockets
/// from holding a task and a file descriptor (nginx's `ssl_handshake_timeout` is 60 s,
/// Kestrel's `HandshakeTimeout` 10 s).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a plain-HTTP request head sent to the TLS port is read before the `400`
/// (so the client's request is consumed and the close does not reset the answer away).
pub const PLAIN_HTTP_HEAD_LIMIT: usize = 16 * 1024;

/// The first byte of a TLS handshake record (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The body of the `400` plain HTTP on the TLS port gets.
pub const PLAIN_HTTP_ANSWER: &str =
    "This port speaks TLS: use https:// (or wss://), not http://.\n";

/// Where the certificate and key come from.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// PEM file with the private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`--tls-key`).
    pub key: PathBuf,
    /// Deadline for each handshake ([`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    /// Certificate chain and key files, with the default handshake timeout.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Why a certificate/key pair was not usable.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// The certificate file is not valid PEM.
    #[error("malformed certificate PEM: {0}")]
    CertificatePem(String),
    /// The key file holds no private key block.
    #[error("no PEM private key found (PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey,
    /// The key file is not valid PEM.
    #[error("malformed private key PEM: {0}")]
    KeyPem(String),
    /// The key is not one rustls can sign with (RSA, ECDSA P-256/P-384, Ed25519).
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    /// The private key is not the certificate's, or the certificate does not parse.
    #[error("the certificate does not match the private key: {0}")]
    Mismatch(String),
}

/// TLS failures: loading the files, or one connection's handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The files were read but do not make a usable certificate and key.
    #[error("{cert} / {key}: {source}")]
    Load {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: PemError,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// The client did not finish the handshake within the deadline.
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The client spoke plain HTTP to the TLS port (answered with 400).
    #[error("plain HTTP on the TLS port")]
    PlainHttp,
    /// The client sent something that is neither TLS nor HTTP.
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotTls(u8),
    /// The handshake failed (bad ClientHello, no shared cipher, the peer went away, …).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// Counters of the TLS layer, rendered at `/metrics`.
#[derive(Debug)]
pub struct TlsMetrics {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes that did not finish in time.
    pub handshake_timeouts: AtomicU64,
    /// Plain HTTP requests answered with 400 on the TLS port.
    pub plain_http: AtomicU64,
    /// Other handshake failures (not TLS, bad ClientHello, peer gone, no shared cipher).
    pub handshake_errors: AtomicU64,
    /// Certificate reloads that swapped the certificate.
    pub reloads: AtomicU64,
    /// Certificate reloads that failed (the previous certificate stayed).
    pub reload_failures: AtomicU64,
}

/// The process's TLS metrics.
pub static TLS_METRICS: TlsMetrics = TlsMetrics {
    handshakes: AtomicU64::new(0),
    handshake_timeouts: AtomicU64::new(0),
    plain_http: AtomicU64::new(0),
    handshake_errors: AtomicU64::new(0),
    reloads: AtomicU64::new(0),
    reload_failures: AtomicU64::new(0),
};

impl TlsMetrics {
    fn count(&self, outcome: &Result<(), &TlsError>) {
        let counter = match outcome {
            Ok(()) => &self.handshakes,
            Err(TlsError::HandshakeTimeout(_)) => &self.handshake_timeouts,
            Err(TlsError::PlainHttp) => &self.plain_http,
            Err(_) => &self.handshake_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends the TLS metrics in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP feedhub_tls_handshakes_total TLS handshakes completed.\n\
             # TYPE feedhub_tls_handshakes_total counter\n\
             feedhub_tls_handshakes_total {}",
            v(&self.handshakes)
        );
        let _ = writeln!(
            out,
            "# HELP feedhub_tls_handshake_failures_total TLS handshakes that failed, by reason.\n\
             # TYPE feedhub_tls_handshake_failures_total counter\n\
             feedhub_tls_handshake_failures_total{{reason=\"timeout\"}} {}\n\
             feedhub_tls_handshake_failures_total{{reason=\"plain_http\"}} {}\n\
             feedhub_tls_handshake_failures_total{{reason=\"error\"}} {}",
            v(&self.handshake_timeouts),
            v(&self.plain_http),
            v(&self.handshake_errors)
        );
        let _ = writeln!(
            out,
            "# HELP feedhub_tls_reloads_total TLS certificate reloads (SIGHUP), by result.\n\
             # TYPE feedhub_tls_reloads_total counter\n\
             feedhub_tls_reloads_total{{result=\"ok\"}} {}\n\
             feedhub_tls_reloads_total{{result=\"error\"}} {}",
            v(&self.reloads),
            v(&self.reload_failures)
        );
    }
}

/// The crypto provider feedhub's TLS uses (ring, as lapin's AMQP TLS does).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM certificate chain and private key into a pair rustls can serve, checking
/// that the key belongs to the leaf certificate. Pure: no I/O.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, PemError> {
    certified_key_with(&provider(), cert_pem, key_pem)
}

fn certified_key_with(
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, PemError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::CertificatePem(e.to_string()))?;
    if chain.is_empty() {
        return Err(PemError::NoCertificate);
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(PemError::NoKey),
        Err(e) => return Err(PemError::KeyPem(e.to_string())),
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| PemError::UnsupportedKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public half; the handshake will tell.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(PemError::Mismatch(e.to_string())),
    }
}

/// Serves whichever certificate was loaded last, to every client (no SNI selection).
#[derive(Debug)]
struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    fn get(&self) -> Arc<CertifiedKey> {
        // A poisoned lock still holds a complete pair: the writer only assigns an Arc.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The TLS side of the listener: the rustls configuration, the reloadable certificate, and
/// the per-connection handshake.
pub struct Tls {
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    server_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.config.cert)
            .field("key", &self.config.key)
            .finish_non_exhaustive()
    }
}

/// Reads a file, naming it in the error.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Tls {
    /// Loads the certificate and key (a startup error when they are unusable) and builds
    /// the rustls configuration: TLS 1.2 and 1.3, ALPN `http/1.1`, no client certificates.
    pub fn load(config: TlsConfig) -> Result<Tls, TlsError> {
        let provider = provider();
        let key = Tls::read_pair(&provider, &config)?;
        let resolver = Arc::new(CertResolver {
            current: RwLock::new(Arc::new(key)),
        });
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // hyper serves HTTP/1.1 only; say so, so a client offering h2 does not try it.
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            config,
            provider,
            resolver,
            server_config: Arc::new(server_config),
        })
    }

    fn read_pair(provider: &CryptoProvider, config: &TlsConfig) -> Result<CertifiedKey, TlsError> {
        let cert_pem = read(&config.cert)?;
        let key_pem = read(&config.key)?;
        certified_key_with(provider, &cert_pem, &key_pem).map_err(|source| TlsError::Load {
            cert: config.cert.clone(),
            key: config.key.clone(),
            source,
        })
    }

    /// The files this listener serves.
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// The certificate chain new handshakes get (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.resolver.get().cert.clone()
    }

    /// Reads the certificate and key files again and serves them to new handshakes. On any
    /// error the current pair stays in use and the error is returned. Open connections are
    /// not touched.
    pub async fn reload(&self) -> Result<(), TlsError> {
        let provider = self.provider.clone();
        let config = self.config.clone();
        let loaded = tokio::task::spawn_blocking(move || Tls::read_pair(&provider, &config))
            .await
            .unwrap_or_else(|e| Err(TlsError::Config(format!("reload task failed: {e}"))));
        match loaded {
            Ok(key) => {
                self.resolver.set(key);
                TLS_METRICS.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                TLS_METRICS.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// The server side of one connection's handshake, within the handshake deadline.
    /// Plain HTTP gets a `400` naming `https://` before the error is returned. Counted in
    /// [`TLS_METRICS`]; the caller logs.
    pub async fn accept<IO>(&self, io: IO) -> Result<TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let deadline = self.config.handshake_timeout;
        let result = match tokio::time::timeout(deadline, self.handshake(io)).await {
            Ok(r) => r,
            Err(_) => Err(TlsError::HandshakeTimeout(deadline)),
        };
        TLS_METRICS.count(&result.as_ref().map(|_| ()));
        result
    }

    async fn handshake<IO>(&self, mut io: IO) -> Result<TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // One byte tells TLS from plain HTTP; it is handed to rustls, not lost.
        let mut first = [0u8; 1];
        if io.read(&mut first).await.map_err(TlsError::Handshake)? == 0 {
            return Err(TlsError::Handshake(io::ErrorKind::UnexpectedEof.into()));
        }
        match first[0] {
            TLS_HANDSHAKE_RECORD => {}
            b'A'..=b'Z' => {
                answer_plain_http(&mut io, first[0]).await;
                return Err(TlsError::PlainHttp);
            }
            other => return Err(TlsError::NotTls(other)),
        }
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor
            .read_tls(&mut &first[..])
            .map_err(TlsError::Handshake)?;
        let start = tokio_rustls::LazyConfigAcceptor::new(acceptor, io)
            .await
            .map_err(TlsError::Handshake)?;
        start
            .into_stream(self.server_config.clone())
            .await
            .map_err(TlsError::Handshake)
    }
}

/// Reads the rest of a plain-HTTP request head (bounded) and answers `400`, so the client
/// sees why instead of a reset.
async fn answer_plain_http<IO>(io: &mut IO, first: u8)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = vec![first];
    let mut buf = [0u8; 2048];
    while head.len() < PLAIN_HTTP_HEAD_LIMIT && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_ANSWER}",
        PLAIN_HTTP_ANSWER.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Reloads `tls` on every SIGHUP, logging the outcome; runs until the process ends.
#[cfg(unix)]
pub async fn reload_on_sighup(tls: Arc<Tls>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS certificate reload disabled");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        match tls.reload().await {
            Ok(()) => tracing::info!(
                cert = %tls.config.cert.display(),
                key = %tls.config.key.display(),
                "SIGHUP: TLS certificate reloaded; new connections get it"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "SIGHUP: TLS certificate reload failed; keeping the current certificate"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed P-256 certificate for `localhost` and its PKCS#8 key (generated once
    /// with `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes`).
    const CERT: &str = include_str!("../protocol-tests/fixtures/tls/localhost.crt");
    const KEY: &str = include_str!("../protocol-tests/fixtures/tls/localhost.key");
    /// Another key (not the certificate's).
    const OTHER_KEY: &str = include_str!("../protocol-tests/fixtures/tls/other.key");

    #[test]
    fn a_matching_pair_loads() {
        let key = certified_key_from_pem(CERT.as_bytes(), KEY.as_bytes()).expect("loads");
        assert_eq!(key.cert.len(), 1);
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let err = certified_key_from_pem(CERT.as_bytes(), OTHER_KEY.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::Mismatch(_)), "{err}");
    }

    #[test]
    fn missing_blocks_are_named() {
        let err = certified_key_from_pem(b"", KEY.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::NoCertificate), "{err}");
        let err = certified_key_from_pem(CERT.as_bytes(), CERT.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::NoKey), "{err}");
        let err = certified_key_from_pem(KEY.as_bytes(), KEY.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::NoCertificate), "{err}");
    }

    #[test]
    fn garbage_inside_pem_is_refused() {
        let garbage_cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = certified_key_from_pem(garbage_cert.as_bytes(), KEY.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::Mismatch(_)), "{err}");
        let garbage_key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let err = certified_key_from_pem(CERT.as_bytes(), garbage_key.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::UnsupportedKey(_)), "{err}");
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = certified_key_from_pem(broken.as_bytes(), KEY.as_bytes()).unwrap_err();
        assert!(matches!(err, PemError::CertificatePem(_)), "{err}");
    }

    #[test]
    fn metrics_render_every_series() {
        let mut out = String::new();
        TLS_METRICS.render(&mut out);
        for series in [
            "feedhub_tls_handshakes_total ",
            "feedhub_tls_handshake_failures_total{reason=\"timeout\"} ",
            "feedhub_tls_handshake_failures_total{reason=\"plain_http\"} ",
            "feedhub_tls_handshake_failures_total{reason=\"error\"} ",
            "feedhub_tls_reloads_total{result=\"ok\"} ",
            "feedhub_tls_reloads_total{result=\"error\"} ",
        ] {
            assert!(out.contains(series), "{series} missing in {out}");
        }
    }
}
