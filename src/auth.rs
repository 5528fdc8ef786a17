//! Authentication: HS256 JWTs whose `sub` claim is the user id.
//!
//! The token comes from the `access_token` query parameter (browsers cannot set headers on a
//! WebSocket) or from `Authorization: Bearer`. A missing, malformed, badly signed or expired
//! token is an [`AuthError`], which the HTTP layer turns into 401 at negotiate and at connect.
//!
//! Without a configured secret the server runs in *development mode*: tokens are still
//! verified, against a fixed, publicly known development secret, and `/dev/token` issues them
//! for demo users. This keeps one code path for authentication in every mode; the mode is
//! logged loudly at startup.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// The development-mode secret. Public on purpose: tokens signed with it prove nothing.
pub const DEVELOPMENT_SECRET: &str = "feedhub-development-secret-not-for-production";

/// Who is connecting.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The `sub` claim; `None` for anonymous connections.
    pub user_id: Option<UserId>,
    /// All claims of the token (empty when anonymous).
    pub claims: serde_json::Map<String, serde_json::Value>,
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
    /// The token is malformed, badly signed, expired or has no usable `sub`.
    #[error("invalid access token: {0}")]
    Invalid(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct StandardClaims {
    sub: Option<String>,
    exp: Option<u64>,
}

/// Verifies HS256 tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    development: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("development", &self.development)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for `secret`, or development mode when `None`.
    pub fn new(secret: Option<&str>) -> Authenticator {
        let development = secret.is_none();
        let secret = secret.unwrap_or(DEVELOPMENT_SECRET).as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is checked when present; tokens without it are accepted, as ASP.NET's
        // JwtBearer does with RequireExpirationTime = false.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.leeway = 5;
        Authenticator {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            development,
        }
    }

    /// Whether this is the development mode (no secret configured).
    pub fn is_development(&self) -> bool {
        self.development
    }

    /// Verifies `token` and returns the identity it names.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.decoding,
            &self.validation,
        )
        .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let sub = match claims.get("sub") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::Invalid("token has no 'sub' claim".into())),
        };
        let user_id =
            UserId::new(&sub).map_err(|e| AuthError::Invalid(format!("bad 'sub': {e}")))?;
        Ok(Identity {
            user_id: Some(user_id),
            claims,
        })
    }

    /// Issues a token for `user_id` valid for `ttl_secs` (development identities, tests).
    pub fn issue(&self, user_id: &str, ttl_secs: u64) -> Result<String, AuthError> {
        let claims = StandardClaims {
            sub: Some(user_id.to_string()),
            exp: Some(unix_now() + ttl_secs),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
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
    fn issues_and_verifies() {
        let auth = Authenticator::new(Some("s3cret"));
        let t = auth.issue("1002", 60).unwrap();
        let id = auth.verify(&t).unwrap();
        assert_eq!(id.user_id.unwrap().as_str(), "1002");
    }

    #[test]
    fn rejects_wrong_secret_and_expired() {
        let a = Authenticator::new(Some("a"));
        let b = Authenticator::new(Some("b"));
        let t = a.issue("u", 60).unwrap();
        assert!(matches!(b.verify(&t), Err(AuthError::Invalid(_))));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &StandardClaims {
                sub: Some("u".into()),
                exp: Some(unix_now() - 3600),
            },
            &EncodingKey::from_secret(b"a"),
        )
        .unwrap();
        assert!(matches!(a.verify(&expired), Err(AuthError::Invalid(_))));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
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
