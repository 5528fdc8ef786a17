//! A JSON Web Key Set fetched from an identity provider (`--jwt-jwks-url`): Azure AD's
//! `…/discovery/v2.0/keys`, Keycloak's `…/protocol/openid-connect/certs`, Auth0's
//! `/.well-known/jwks.json`.
//!
//! The set is fetched over HTTPS (rustls; the system's roots, plus `--jwt-jwks-ca` to trust
//! a private CA) and cached:
//! - a background task refreshes it every `refresh_interval`, and retries sooner after a
//!   failure;
//! - a token whose `kid` is not in the cache triggers one refetch (the provider rotated its
//!   keys), at most once per `min_refetch_interval`, however many such tokens arrive: a
//!   flood of tokens with made-up `kid`s costs the provider one request per interval;
//! - a failed fetch (the provider is down, answers an error or garbage) keeps the cached
//!   keys, so an outage of the provider does not log anyone out;
//! - the response body and the number of keys are bounded.
//!
//! Owns no tokens: `auth` asks it for the keys and, before verifying, whether a `kid` needs
//! a refetch. Never blocks a request for longer than one bounded fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::keys::{self, VerifyingKey};

/// Default background refresh interval.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Default shortest time between two fetches caused by unknown `kid`s.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);
/// Largest key set body read (Azure AD's set is about 10 KiB).
pub const MAX_BODY: usize = 256 * 1024;
/// Most keys kept from one set (providers publish a handful: current, next, previous).
pub const MAX_KEYS: usize = 64;
/// Deadline of one fetch: connect, TLS, request and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how often to fetch the key set.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    /// The `https://` URL of the key set.
    pub url: String,
    /// A PEM file of extra CA certificates to trust (a private CA, tests).
    pub ca: Option<std::path::PathBuf>,
    /// How often the background task refetches the set.
    pub refresh_interval: Duration,
    /// Shortest time between two fetches caused by unknown `kid`s (also the retry delay
    /// after a failed background fetch, when shorter than `refresh_interval`).
    pub min_refetch_interval: Duration,
}

impl JwksConfig {
    /// A configuration for `url` with the default intervals.
    pub fn new(url: impl Into<String>) -> JwksConfig {
        JwksConfig {
            url: url.into(),
            ca: None,
            refresh_interval: DEFAULT_REFRESH,
            min_refetch_interval: DEFAULT_MIN_REFETCH,
        }
    }
}

/// Why a key set could not be set up or fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// The URL is not an `https://` URL with a host.
    #[error("the JWKS URL must be an https:// URL with a host: {0}")]
    Url(String),
    /// The CA file could not be read or holds no certificate.
    #[error("JWKS CA file: {0}")]
    Ca(String),
    /// Connecting, TLS or HTTP failed.
    #[error("JWKS fetch failed: {0}")]
    Fetch(String),
    /// The provider answered something else than 200.
    #[error("JWKS fetch answered HTTP {0}")]
    Status(u16),
    /// The body is not a key set with at least one usable key.
    #[error("JWKS response unusable: {0}")]
    Body(String),
}

/// The parsed URL.
#[derive(Debug)]
struct Target {
    host: String,
    port: u16,
    path: String,
    authority: String,
}

/// A cached, refreshed key set.
pub struct Jwks {
    config: JwksConfig,
    target: Target,
    tls: tokio_rustls::TlsConnector,
    /// The cached keys; replaced whole by a successful fetch, kept by a failed one.
    keys: RwLock<Arc<Vec<VerifyingKey>>>,
    /// When the last fetch caused by an unknown `kid` started (the rate limit).
    last_kid_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time: tokens with the same new `kid` wait for the one fetch.
    fetching: tokio::sync::Mutex<()>,
    /// Fetches started (successful or not).
    fetches: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// A key set for `config`, empty until the first fetch. Checks the URL and the CA file.
    pub fn new(config: JwksConfig) -> Result<Jwks, JwksError> {
        let target = parse_url(&config.url)?;
        let tls = tls_connector(config.ca.as_deref())?;
        Ok(Jwks {
            config,
            target,
            tls,
            keys: RwLock::new(Arc::new(Vec::new())),
            last_kid_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// The cached keys.
    pub fn keys(&self) -> Arc<Vec<VerifyingKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the cache holds a key with this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys().iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Fetches started so far (for tests and logs).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// A token names `kid`, which the cache does not hold: refetch the set, unless a fetch
    /// for an unknown `kid` started less than `min_refetch_interval` ago. Concurrent callers
    /// share one fetch.
    pub async fn refetch_for(&self, kid: &str) {
        let _one = self.fetching.lock().await;
        // Another caller may have fetched it while this one waited.
        if self.has_kid(kid) {
            return;
        }
        {
            let mut last = self
                .last_kid_fetch
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if last.is_some_and(|t| now < t + self.config.min_refetch_interval) {
                return;
            }
            *last = Some(now);
        }
        tracing::info!(kid, "JWT key id not in the cached key set; refetching it");
        let _ = self.fetch_locked().await;
    }

    /// Fetches the set now and replaces the cache on success (the background task).
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _one = self.fetching.lock().await;
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<usize, JwksError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch_body()).await {
            Ok(r) => r.and_then(|body| parse_set(&body)),
            Err(_) => Err(JwksError::Fetch("timed out".into())),
        };
        match result {
            Ok(keys) => {
                let n = keys.len();
                tracing::debug!(url = %self.config.url, keys = n, "JWKS fetched");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                Ok(n)
            }
            Err(e) => {
                // An outage of the provider keeps the keys it published last.
                tracing::warn!(url = %self.config.url, error = %e,
                    cached = self.keys().len(), "JWKS fetch failed; keeping the cached keys");
                Err(e)
            }
        }
    }

    async fn fetch_body(&self) -> Result<Bytes, JwksError> {
        let fetch = |e: &dyn std::fmt::Display| JwksError::Fetch(e.to_string());
        let t = &self.target;
        let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| fetch(&e))?;
        let name =
            rustls::pki_types::ServerName::try_from(t.host.clone()).map_err(|e| fetch(&e))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| fetch(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fetch(&e))?;
        // The connection ends with the exchange (or with the timeout around this future).
        let driver = tokio::spawn(conn);
        let request = http::Request::get(t.path.as_str())
            .header(http::header::HOST, t.authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "feedhub")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch(&e))?;
        let result = async {
            let response = sender.send_request(request).await.map_err(|e| fetch(&e))?;
            if response.status() != http::StatusCode::OK {
                return Err(JwksError::Status(response.status().as_u16()));
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| JwksError::Body(format!("{e} (limit {MAX_BODY} bytes)")))?;
            Ok(body.to_bytes())
        }
        .await;
        driver.abort();
        result
    }

    /// Keeps the set fresh until `shutdown`: fetches at once, then every
    /// `refresh_interval`; after a failure, again after `min_refetch_interval` (if shorter).
    pub async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let delay = match self.refresh().await {
                Ok(_) => self.config.refresh_interval,
                Err(_) => self
                    .config
                    .refresh_interval
                    .min(self.config.min_refetch_interval.max(Duration::from_secs(1))),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The usable keys of a key set document, at most [`MAX_KEYS`]. Entries this server cannot
/// use are skipped; a set without any usable key is an error (and keeps the cache).
fn parse_set(body: &[u8]) -> Result<Vec<VerifyingKey>, JwksError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| JwksError::Body(e.to_string()))?;
    let entries = doc
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| JwksError::Body("no \"keys\" array".into()))?;
    let mut keys = Vec::new();
    for entry in entries {
        match keys::from_jwk(entry) {
            Ok(k) if keys.len() < MAX_KEYS => keys.push(k),
            Ok(_) => {
                tracing::warn!(
                    limit = MAX_KEYS,
                    "JWKS holds more keys than kept; the rest are ignored"
                );
                break;
            }
            Err(why) => tracing::debug!(%why, "JWKS entry skipped"),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::Body("no usable signature key".into()));
    }
    Ok(keys)
}

fn parse_url(url: &str) -> Result<Target, JwksError> {
    let bad = || JwksError::Url(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    // `[::1]` in the URL, `::1` to connect and to match the certificate.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let authority = uri.authority().ok_or_else(bad)?.as_str().to_string();
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    Ok(Target {
        host,
        port: uri.port_u16().unwrap_or(443),
        path,
        authority,
    })
}

fn tls_connector(ca: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, JwksError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    // The system's roots; a missing or partly unreadable store is not fatal (a private CA
    // may be all that is needed).
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| JwksError::Ca(format!("{}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| JwksError::Ca(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(JwksError::Ca(format!(
                "{}: no certificate found",
                path.display()
            )));
        }
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(JwksError::Ca(format!(
                "{}: no usable certificate",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_with_a_host() {
        assert!(parse_url("http://idp.example/keys").is_err());
        assert!(parse_url("https:///keys").is_err());
        assert!(parse_url("not a url").is_err());
        let t = parse_url("https://127.0.0.1:8443/realms/r/certs?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8443, "/realms/r/certs?x=1")
        );
        let t = parse_url("https://[::1]/k").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 443));
    }

    #[test]
    fn sets_without_usable_keys_are_errors() {
        assert!(parse_set(b"not json").is_err());
        assert!(parse_set(b"{}").is_err());
        assert!(parse_set(br#"{"keys":[]}"#).is_err());
        assert!(parse_set(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).is_err());
        let keys = parse_set(
            br#"{"keys":[{"kty":"oct","k":"eA"},{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"}]}"#,
        )
        .unwrap();
        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn a_huge_set_is_cut_to_the_bound() {
        let one = r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#;
        let body = format!(r#"{{"keys":[{}]}}"#, vec![one; MAX_KEYS + 10].join(","));
        assert_eq!(parse_set(body.as_bytes()).unwrap().len(), MAX_KEYS);
    }
}
