//! Authentication: JWTs whose `sub` claim (or a configured claim) is the user id.
//!
//! The token comes from the `access_token` query parameter (browsers cannot set headers on a
//! WebSocket) or from `Authorization: Bearer`. A missing, malformed, badly signed, expired or
//! not yet valid token, or one for another issuer or audience, is an [`AuthError`], which the
//! HTTP layer turns into 401 at negotiate and at connect.
//!
//! Keys:
//! - HS256 with a shared secret (`--jwt-secret`, at least [`MIN_SECRET_BYTES`] bytes);
//! - RS256/384/512, PS256/384/512, ES256/384 and EdDSA with public keys from PEM files
//!   ([`keys`]) or from an identity provider's JSON Web Key Set ([`jwks`]).
//!
//! What is refused whatever the configuration: `alg: none`; HMAC with anything but the
//! configured secret (an HS256 token "signed" with an RSA public key's bytes finds no key:
//! algorithm confusion); a key verifying another algorithm than its own kind's; a `crit`
//! header (this server implements no JWS extension, RFC 7515 §4.1.11); HS384/HS512.
//!
//! Claims: `exp` is required unless [`JwtOptions::allow_no_exp`]; `exp` and `nbf` are checked
//! with [`JwtOptions::leeway_secs`]; `iss` and `aud` are checked when configured (any `aud`
//! is accepted when none is). A connection whose hub asks for it is closed when its token
//! stops being accepted ([`Identity::valid_until`], `session`).
//!
//! Without a secret or public keys the server runs in *development mode*: tokens are still
//! verified, against a fixed, publicly known development secret, and `/dev/token` issues them
//! for demo users. This keeps one code path for authentication in every mode; the mode is
//! logged loudly at startup.

pub mod jwks;
pub mod keys;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use jwks::{Jwks, JwksConfig};
use keys::VerifyingKey;

/// The development-mode secret. Public on purpose: tokens signed with it prove nothing.
pub const DEVELOPMENT_SECRET: &str = "feedhub-development-secret-not-for-production";

/// Shortest HS256 secret accepted: 256 bits, the hash size (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// Default clock skew allowed on `exp` and `nbf`.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// The claim ASP.NET maps a user id to (`ClaimTypes.NameIdentifier`): tokens that have no
/// `sub` but this (issued by ASP.NET Identity, WS-Federation) still name a user.
pub const NAME_IDENTIFIER_CLAIM: &str =
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier";

/// Who is connecting.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The user id claim; `None` for anonymous connections.
    pub user_id: Option<UserId>,
    /// All claims of the token (empty when anonymous).
    pub claims: Claims,
    /// Unix time (seconds) from which the token is no longer accepted: one second after its
    /// `exp` plus the leeway. `None` without a token, or for a token without `exp`.
    pub valid_until: Option<u64>,
}

/// A token's claims, kept as compact JSON and parsed on first use. Every connection holds
/// its identity for life, and a parsed map costs ~650 bytes (one B-tree node) although hubs
/// rarely read the claims (the idle memory budget in `bench/README.md`); the text costs
/// what the claims are long.
#[derive(Default)]
pub struct Claims {
    /// The claims as a JSON object (empty when there are none).
    json: Box<str>,
    parsed: std::sync::OnceLock<serde_json::Map<String, serde_json::Value>>,
}

impl Claims {
    /// Claims of an already parsed token.
    pub fn new(map: &serde_json::Map<String, serde_json::Value>) -> Claims {
        let json = if map.is_empty() {
            String::new()
        } else {
            // A map of JSON values always serialises.
            serde_json::to_string(map).unwrap_or_default()
        };
        Claims {
            json: json.into_boxed_str(),
            parsed: std::sync::OnceLock::new(),
        }
    }

    /// The claims (parsed now if this is the first look).
    pub fn map(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.parsed.get_or_init(|| {
            if self.json.is_empty() {
                serde_json::Map::new()
            } else {
                // Written by `Claims::new` from a map, so it parses back.
                serde_json::from_str(&self.json).unwrap_or_default()
            }
        })
    }

    /// One claim.
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.map().get(name)
    }

    /// Whether there are no claims.
    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }
}

impl Clone for Claims {
    fn clone(&self) -> Claims {
        Claims {
            json: self.json.clone(),
            parsed: std::sync::OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.map().iter()).finish()
    }
}

impl From<serde_json::Map<String, serde_json::Value>> for Claims {
    fn from(map: serde_json::Map<String, serde_json::Value>) -> Claims {
        Claims::new(&map)
    }
}

impl Identity {
    /// An anonymous identity.
    pub fn anonymous() -> Identity {
        Identity::default()
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the query or the Authorization header.
    #[error("missing access token")]
    Missing,
    /// The token is malformed, badly signed, expired, refused or has no usable user id.
    #[error("invalid access token: {0}")]
    Invalid(String),
}

/// Why the authentication settings cannot be used (a startup error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthConfigError {
    /// `--jwt-secret` is too short to be an HS256 key.
    #[error("--jwt-secret is {len} bytes; HS256 needs at least {MIN_SECRET_BYTES} (e.g. `openssl rand -base64 48`)")]
    ShortSecret {
        /// Its length in bytes.
        len: usize,
    },
    /// A `--jwt-public-key` file.
    #[error("--jwt-public-key {0}")]
    Key(#[from] keys::KeyError),
    /// The key set settings.
    #[error("--jwt-jwks-url: {0}")]
    Jwks(#[from] jwks::JwksError),
    /// An empty issuer, audience or user claim name.
    #[error("{0} must not be empty")]
    Empty(&'static str),
}

/// JWT settings besides the HS256 secret.
#[derive(Debug, Clone)]
pub struct JwtOptions {
    /// PEM files of public keys (`--jwt-public-key`).
    pub public_keys: Vec<PathBuf>,
    /// An identity provider's key set (`--jwt-jwks-url`).
    pub jwks: Option<JwksConfig>,
    /// Accepted `iss` values; none: `iss` is not checked.
    pub issuers: Vec<String>,
    /// Accepted `aud` values (a token's `aud` must contain one); none: not checked.
    pub audiences: Vec<String>,
    /// Accept tokens without `exp` (they never expire).
    pub allow_no_exp: bool,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// The claim holding the user id; `None`: `sub`, else [`NAME_IDENTIFIER_CLAIM`].
    pub user_claim: Option<String>,
}

impl Default for JwtOptions {
    fn default() -> Self {
        JwtOptions {
            public_keys: Vec::new(),
            jwks: None,
            issuers: Vec::new(),
            audiences: Vec::new(),
            allow_no_exp: false,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            user_claim: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StandardClaims {
    sub: Option<String>,
    exp: Option<u64>,
}

/// The asymmetric algorithms accepted (each verified only by keys of its kind).
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The HS256 secret, as both keys (development identities and tests issue tokens).
struct SharedSecret {
    decoding: DecodingKey,
    encoding: EncodingKey,
}

/// Verifies tokens: HS256 with the shared secret, the asymmetric algorithms with the
/// configured public keys and key set.
pub struct Authenticator {
    secret: Option<SharedSecret>,
    /// Keys from `--jwt-public-key` files.
    static_keys: Vec<VerifyingKey>,
    jwks: Option<Arc<Jwks>>,
    /// One validation per accepted algorithm (HS256 first), built once.
    validations: Vec<(Algorithm, Validation)>,
    leeway_secs: u64,
    user_claim: Option<String>,
    development: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("development", &self.development)
            .field("static_keys", &self.static_keys.len())
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `secret` and `options`. Without a secret and without public
    /// keys: development mode. A short secret, an unreadable key file or a bad key set URL
    /// is an error (the server must not start).
    pub fn new(
        secret: Option<&str>,
        options: &JwtOptions,
    ) -> Result<Authenticator, AuthConfigError> {
        if let Some(s) = secret {
            if s.len() < MIN_SECRET_BYTES {
                return Err(AuthConfigError::ShortSecret { len: s.len() });
            }
        }
        if options.issuers.iter().any(String::is_empty) {
            return Err(AuthConfigError::Empty("--jwt-issuer"));
        }
        if options.audiences.iter().any(String::is_empty) {
            return Err(AuthConfigError::Empty("--jwt-audience"));
        }
        if options.user_claim.as_deref() == Some("") {
            return Err(AuthConfigError::Empty("--jwt-user-claim"));
        }
        let mut static_keys = Vec::new();
        for path in &options.public_keys {
            static_keys.extend(keys::load_pem_file(path)?);
        }
        let jwks = match &options.jwks {
            Some(c) => Some(Arc::new(Jwks::new(c.clone())?)),
            None => None,
        };
        let development = secret.is_none() && static_keys.is_empty() && jwks.is_none();
        let secret = match (secret, development) {
            (Some(s), _) => Some(s),
            (None, true) => Some(DEVELOPMENT_SECRET),
            (None, false) => None,
        }
        .map(|s| SharedSecret {
            decoding: DecodingKey::from_secret(s.as_bytes()),
            encoding: EncodingKey::from_secret(s.as_bytes()),
        });
        let mut algorithms = Vec::new();
        if secret.is_some() {
            algorithms.push(Algorithm::HS256);
        }
        if !static_keys.is_empty() || jwks.is_some() {
            algorithms.extend(ASYMMETRIC);
        }
        let validations = algorithms
            .into_iter()
            .map(|alg| (alg, validation(alg, options)))
            .collect();
        Ok(Authenticator {
            secret,
            static_keys,
            jwks,
            validations,
            leeway_secs: options.leeway_secs,
            user_claim: options.user_claim.clone(),
            development,
        })
    }

    /// An authenticator with only an HS256 secret (or development mode for `None`) and
    /// default options. Panics on a secret shorter than [`MIN_SECRET_BYTES`]: for tests and
    /// examples, where the secret is a constant.
    pub fn with_secret(secret: Option<&str>) -> Authenticator {
        match Authenticator::new(secret, &JwtOptions::default()) {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    /// Whether this is the development mode (no secret and no public keys configured).
    pub fn is_development(&self) -> bool {
        self.development
    }

    /// The identity provider's key set, if one is configured (`app` runs its refresh).
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Call before [`Authenticator::verify`] where a request may wait: a token signed with
    /// a key the cached key set does not hold (the provider rotated its keys) refetches
    /// the set, at most once per `min_refetch_interval`. Does nothing otherwise.
    pub async fn prepare(&self, token: Option<&str>) {
        let (Some(jwks), Some(token)) = (&self.jwks, token) else {
            return;
        };
        let Ok(header) = parse_header(token) else {
            return;
        };
        let asymmetric = header
            .get("alg")
            .and_then(serde_json::Value::as_str)
            .and_then(|a| a.parse::<Algorithm>().ok())
            .is_some_and(|a| ASYMMETRIC.contains(&a));
        if !asymmetric {
            return;
        }
        match header.get("kid").and_then(serde_json::Value::as_str) {
            Some(kid) if !jwks.has_kid(kid) => jwks.refetch_for(kid).await,
            // No kid: any key may fit; only an empty cache (the first fetch failed or has
            // not finished) is worth a fetch.
            None if jwks.keys().is_empty() && self.static_keys.is_empty() => {
                jwks.refetch_for("").await
            }
            _ => {}
        }
    }

    /// Verifies `token` and returns the identity it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let invalid = |why: &str| AuthError::Invalid(why.to_string());
        let header = parse_header(token)?;
        if header.contains_key("crit") {
            // RFC 7515 §4.1.11: a recipient that does not understand a listed extension must
            // reject the token; this server understands none.
            return Err(invalid("unsupported critical header parameter (crit)"));
        }
        let alg = match header.get("alg").and_then(serde_json::Value::as_str) {
            Some(a) if a.eq_ignore_ascii_case("none") => {
                return Err(invalid("unsigned tokens (alg none) are refused"))
            }
            Some(a) => a
                .parse::<Algorithm>()
                .map_err(|_| invalid(&format!("unsupported alg '{a}'")))?,
            None => return Err(invalid("token header has no alg")),
        };
        let Some(validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
        else {
            return Err(invalid(&format!("alg {alg:?} is not accepted here")));
        };
        let kid = header.get("kid").and_then(serde_json::Value::as_str);
        let claims = if alg == Algorithm::HS256 {
            // Only ever the configured secret: never a public key's bytes as an HMAC key.
            let secret = self
                .secret
                .as_ref()
                .ok_or_else(|| invalid("HS256 tokens are not accepted here"))?;
            decode(token, &secret.decoding, validation)?
        } else {
            self.verify_asymmetric(token, alg, kid, validation)?
        };
        self.identity(claims)
    }

    /// Tries the keys that may have signed an asymmetric token: with a `kid`, the key set's
    /// key of that id and the PEM keys; without, every key of the algorithm's kind.
    fn verify_asymmetric(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        validation: &Validation,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
        let from_set = self.jwks.as_ref().map(|j| j.keys()).unwrap_or_default();
        let candidates = from_set
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
            .chain(self.static_keys.iter())
            .filter(|k| k.accepts(alg));
        let mut tried = false;
        for key in candidates {
            tried = true;
            match jsonwebtoken::decode(token, &key.key, validation) {
                Ok(data) => return Ok(data.claims),
                // Another key may fit; any other error means the signature was fine and
                // the claims are not (or the token is malformed): final.
                Err(e) if is_key_mismatch(&e) => continue,
                Err(e) => return Err(AuthError::Invalid(e.to_string())),
            }
        }
        Err(AuthError::Invalid(match (tried, kid) {
            (false, Some(kid)) => format!("no {alg:?} key with kid '{kid}'"),
            (false, None) => format!("no {alg:?} key configured"),
            (true, _) => "InvalidSignature".to_string(),
        }))
    }

    /// The identity of verified claims: the user id claim and the validity end.
    fn identity(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Identity, AuthError> {
        let value = match &self.user_claim {
            Some(c) => claims.get(c.as_str()),
            None => claims
                .get("sub")
                .or_else(|| claims.get(NAME_IDENTIFIER_CLAIM)),
        };
        let name = self.user_claim.as_deref().unwrap_or("sub");
        let user = match value {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::Invalid(format!("token has no '{name}' claim"))),
        };
        let user_id =
            UserId::new(&user).map_err(|e| AuthError::Invalid(format!("bad '{name}': {e}")))?;
        let valid_until = claims
            .get("exp")
            .and_then(|e| e.as_u64().or_else(|| e.as_f64().map(|f| f as u64)))
            // `exp + leeway` is the last second accepted (jsonwebtoken refuses only
            // `exp + leeway < now`).
            .map(|exp| exp.saturating_add(self.leeway_secs).saturating_add(1));
        Ok(Identity {
            user_id: Some(user_id),
            claims: Claims::new(&claims),
            valid_until,
        })
    }

    /// Issues an HS256 token for `user_id` valid for `ttl_secs` (development identities,
    /// tests). Fails where no secret is configured.
    pub fn issue(&self, user_id: &str, ttl_secs: u64) -> Result<String, AuthError> {
        let secret = self
            .secret
            .as_ref()
            .ok_or_else(|| AuthError::Invalid("no HS256 secret to sign with".into()))?;
        let claims = StandardClaims {
            sub: Some(user_id.to_string()),
            exp: Some(unix_now() + ttl_secs),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &secret.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// The validation of tokens signed with `alg`.
fn validation(alg: Algorithm, options: &JwtOptions) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = options.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.required_spec_claims.clear();
    if !options.allow_no_exp {
        v.required_spec_claims.insert("exp".into());
    }
    if options.issuers.is_empty() {
        v.iss = None;
    } else {
        v.set_issuer(&options.issuers);
        v.required_spec_claims.insert("iss".into());
    }
    if options.audiences.is_empty() {
        // Tokens of real providers always carry an `aud`: without a configured audience
        // any is accepted (with one, it must match).
        v.validate_aud = false;
    } else {
        v.set_audience(&options.audiences);
        v.required_spec_claims.insert("aud".into());
    }
    v
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
    jsonwebtoken::decode(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| AuthError::Invalid(e.to_string()))
}

/// Whether a decode error says "this key did not verify the signature" (try another key).
fn is_key_mismatch(e: &jsonwebtoken::errors::Error) -> bool {
    use jsonwebtoken::errors::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEddsaKey
    )
}

/// The token's JOSE header as JSON (the first of three dot-separated parts).
fn parse_header(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
    let invalid = || AuthError::Invalid("malformed token".into());
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| invalid())?;
    serde_json::from_slice(&bytes).map_err(|_| invalid())
}

/// The monotonic instant of `unix_secs` (seconds since the Unix epoch); now for a time
/// already past.
pub fn instant_at(unix_secs: u64) -> tokio::time::Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    tokio::time::Instant::now() + std::time::Duration::from_secs(unix_secs).saturating_sub(now)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Finds the bearer token of a request: `access_token` query parameter first (WebSocket and
/// SSE from browsers), then `Authorization: Bearer`.
pub fn token_from_request(query: Option<&str>, authorization: Option<&str>) -> Option<String> {
    if let Some(q) = query {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "access_token" && !v.is_empty() {
                return Some(v.into_owned());
            }
        }
    }
    let auth = authorization?.trim();
    let (scheme, rest) = auth.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
        Some(rest.trim().to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_kept_as_text_and_read_back() {
        let mut map = serde_json::Map::new();
        map.insert("sub".into(), serde_json::json!("u1"));
        map.insert("exp".into(), serde_json::json!(1_700_000_000u64));
        map.insert("roles".into(), serde_json::json!(["a", "b"]));
        let claims = Claims::new(&map);
        assert!(!claims.is_empty());
        assert_eq!(claims.get("sub"), Some(&serde_json::json!("u1")));
        assert_eq!(claims.map(), &map);
        assert_eq!(claims.clone().map(), &map);
        let none = Claims::default();
        assert!(none.is_empty());
        assert!(none.map().is_empty());
        assert!(Claims::new(&serde_json::Map::new()).is_empty());
    }

    const SECRET: &str = "an-hs256-test-secret-of-32-bytes-or-more";

    fn hs(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn raw(header: serde_json::Value, claims: serde_json::Value, sig: &str) -> String {
        let b = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!("{}.{}.{sig}", b(header), b(claims))
    }

    #[test]
    fn issues_and_verifies() {
        let auth = Authenticator::with_secret(Some(SECRET));
        let t = auth.issue("1002", 60).unwrap();
        let id = auth.verify(&t).unwrap();
        assert_eq!(id.user_id.unwrap().as_str(), "1002");
        let until = id.valid_until.unwrap();
        assert!(until >= unix_now() + 60 + DEFAULT_LEEWAY_SECS - 2);
    }

    #[test]
    fn short_secrets_are_refused() {
        let e = Authenticator::new(Some("a"), &JwtOptions::default()).unwrap_err();
        assert_eq!(e, AuthConfigError::ShortSecret { len: 1 });
        assert!(Authenticator::new(Some(&"x".repeat(31)), &JwtOptions::default()).is_err());
        assert!(Authenticator::new(Some(&"x".repeat(32)), &JwtOptions::default()).is_ok());
    }

    #[test]
    fn rejects_wrong_secret_expired_and_garbage() {
        let a = Authenticator::with_secret(Some(SECRET));
        let b = Authenticator::with_secret(Some("another-secret-that-is-32-bytes-long"));
        let t = a.issue("u", 60).unwrap();
        assert!(matches!(b.verify(&t), Err(AuthError::Invalid(_))));
        let expired = hs(
            SECRET,
            serde_json::json!({"sub": "u", "exp": unix_now() - 3600}),
        );
        assert!(matches!(a.verify(&expired), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
        assert!(a.verify("a.b.c.d").is_err());
    }

    #[test]
    fn exp_is_required_unless_allowed() {
        let no_exp = hs(SECRET, serde_json::json!({"sub": "u"}));
        let strict = Authenticator::with_secret(Some(SECRET));
        assert!(strict.verify(&no_exp).is_err());
        let lax = Authenticator::new(
            Some(SECRET),
            &JwtOptions {
                allow_no_exp: true,
                ..JwtOptions::default()
            },
        )
        .unwrap();
        let id = lax.verify(&no_exp).unwrap();
        assert_eq!(id.valid_until, None);
    }

    #[test]
    fn nbf_and_leeway() {
        let now = unix_now();
        let auth = Authenticator::with_secret(Some(SECRET));
        let future = hs(
            SECRET,
            serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 300}),
        );
        assert!(auth.verify(&future).is_err());
        let skewed = hs(
            SECRET,
            serde_json::json!({"sub": "u", "exp": now + 600, "nbf": now + 10}),
        );
        assert!(
            auth.verify(&skewed).is_ok(),
            "within the default 30 s leeway"
        );
        let just_expired = hs(SECRET, serde_json::json!({"sub": "u", "exp": now - 10}));
        assert!(auth.verify(&just_expired).is_ok());
        let strict = Authenticator::new(
            Some(SECRET),
            &JwtOptions {
                leeway_secs: 0,
                ..JwtOptions::default()
            },
        )
        .unwrap();
        assert!(strict.verify(&skewed).is_err());
        assert!(strict.verify(&just_expired).is_err());
    }

    #[test]
    fn issuer_and_audience() {
        let now = unix_now();
        let opts = JwtOptions {
            issuers: vec!["https://idp".into()],
            audiences: vec!["api-a".into(), "api-b".into()],
            ..JwtOptions::default()
        };
        let auth = Authenticator::new(Some(SECRET), &opts).unwrap();
        let ok = |iss: &str, aud: serde_json::Value| {
            auth.verify(&hs(
                SECRET,
                serde_json::json!({"sub": "u", "exp": now + 60, "iss": iss, "aud": aud}),
            ))
            .is_ok()
        };
        assert!(ok("https://idp", serde_json::json!("api-b")));
        assert!(ok("https://idp", serde_json::json!(["other", "api-a"])));
        assert!(!ok("https://evil", serde_json::json!("api-a")));
        assert!(!ok("https://idp", serde_json::json!("other")));
        let no_aud = hs(
            SECRET,
            serde_json::json!({"sub": "u", "exp": now + 60, "iss": "https://idp"}),
        );
        assert!(auth.verify(&no_aud).is_err());
        // Without configured audiences any aud is fine.
        let open = Authenticator::with_secret(Some(SECRET));
        assert!(open
            .verify(&hs(
                SECRET,
                serde_json::json!({"sub": "u", "exp": now + 60, "aud": "x"})
            ))
            .is_ok());
    }

    #[test]
    fn alg_none_crit_and_other_hmac_are_refused() {
        let auth = Authenticator::with_secret(Some(SECRET));
        let claims = serde_json::json!({"sub": "u", "exp": unix_now() + 60});
        let none = raw(serde_json::json!({"alg": "none"}), claims.clone(), "");
        assert!(auth
            .verify(&none)
            .unwrap_err()
            .to_string()
            .contains("alg none"));
        let none_upper = raw(serde_json::json!({"alg": "NONE"}), claims.clone(), "");
        assert!(auth.verify(&none_upper).is_err());
        // A valid HS256 signature, but a critical extension this server does not know.
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp-ext".into()]);
        let crit = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(auth.verify(&crit).unwrap_err().to_string().contains("crit"));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(auth.verify(&hs512).is_err());
        // No public keys configured: RS256 is not accepted at all.
        let rs = raw(serde_json::json!({"alg": "RS256"}), claims, "AAAA");
        assert!(auth.verify(&rs).is_err());
    }

    #[test]
    fn user_claim_fallbacks() {
        let now = unix_now();
        let auth = Authenticator::with_secret(Some(SECRET));
        let ni = hs(
            SECRET,
            serde_json::json!({NAME_IDENTIFIER_CLAIM: "77", "exp": now + 60}),
        );
        assert_eq!(auth.verify(&ni).unwrap().user_id.unwrap().as_str(), "77");
        let both = hs(
            SECRET,
            serde_json::json!({"sub": "s", NAME_IDENTIFIER_CLAIM: "n", "exp": now + 60}),
        );
        assert_eq!(auth.verify(&both).unwrap().user_id.unwrap().as_str(), "s");
        let custom = Authenticator::new(
            Some(SECRET),
            &JwtOptions {
                user_claim: Some("oid".into()),
                ..JwtOptions::default()
            },
        )
        .unwrap();
        let oid = hs(
            SECRET,
            serde_json::json!({"sub": "s", "oid": "o-1", "exp": now + 60}),
        );
        assert_eq!(
            custom.verify(&oid).unwrap().user_id.unwrap().as_str(),
            "o-1"
        );
        assert!(custom
            .verify(&both)
            .unwrap_err()
            .to_string()
            .contains("'oid'"));
    }

    #[test]
    fn token_sources() {
        assert_eq!(
            token_from_request(Some("id=1&access_token=abc%2B"), None).as_deref(),
            Some("abc+")
        );
        assert_eq!(
            token_from_request(None, Some("Bearer xyz")).as_deref(),
            Some("xyz")
        );
        assert_eq!(token_from_request(None, Some("Basic xyz")), None);
        assert_eq!(token_from_request(Some("id=1"), None), None);
    }
}
