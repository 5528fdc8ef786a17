//! Verification keys for asymmetric JWTs: what kind of key each is, which algorithms it may
//! verify, and how it is read from a PEM file (`--jwt-public-key`) or from one entry of a
//! JSON Web Key Set (`auth::jwks`).
//!
//! Pure: no I/O except reading the PEM file named in the configuration, no logging. A key
//! only ever verifies the algorithms of its own kind (an RSA key RS*/PS*, a P-256 key ES256,
//! …), and a JWK that names an `alg` only that one: this, and never using a public key as an
//! HMAC secret, is what refuses algorithm confusion.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey};

/// The kind of an asymmetric public key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA: RS256/384/512 and PS256/384/512.
    Rsa,
    /// ECDSA on P-256: ES256.
    EcP256,
    /// ECDSA on P-384: ES384.
    EcP384,
    /// Ed25519: EdDSA.
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind verifies `alg`.
    pub fn verifies(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyKind::EcP256, Algorithm::ES256)
                | (KeyKind::EcP384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }
}

/// One public key that can verify token signatures.
#[derive(Clone)]
pub struct VerifyingKey {
    /// The JWK `kid`, matched against the token header's `kid`.
    pub kid: Option<String>,
    /// The only algorithm this key may verify, when its JWK names one.
    pub alg: Option<Algorithm>,
    /// What kind of key it is.
    pub kind: KeyKind,
    /// The key itself.
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.verifies(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Why a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: String,
    },
    /// The file holds no public key this server understands.
    #[error("{path}: no RSA, EC (P-256, P-384) or Ed25519 public key in PEM form (-----BEGIN PUBLIC KEY-----) found")]
    NoKey {
        /// The file.
        path: String,
    },
}

/// Reads every public key of a PEM file (`PUBLIC KEY` or `RSA PUBLIC KEY` blocks; several
/// blocks may follow each other, for key rotation).
pub fn load_pem_file(path: &Path) -> Result<Vec<VerifyingKey>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    let keys = parse_pem(&text);
    if keys.is_empty() {
        return Err(KeyError::NoKey {
            path: path.display().to_string(),
        });
    }
    Ok(keys)
}

/// The public keys in PEM text; blocks of other kinds (certificates, private keys) are
/// skipped.
pub fn parse_pem(text: &str) -> Vec<VerifyingKey> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        // The END line's own dashes: the block runs to the end of "-----END …-----".
        let Some(end) = block.find("-----END ") else {
            break;
        };
        let after_end = &block[end + 9..];
        let Some(close) = after_end.find("-----") else {
            break;
        };
        let len = end + 9 + close + 5;
        if let Some(key) = block.get(..len).and_then(pem_block_key) {
            keys.push(key);
        }
        rest = &block[len..];
    }
    keys
}

/// One PEM block as a public key, if it is one.
fn pem_block_key(block: &str) -> Option<VerifyingKey> {
    let key = |kind, key| {
        Some(VerifyingKey {
            kid: None,
            alg: None,
            kind,
            key,
        })
    };
    if block.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
        return DecodingKey::from_rsa_pem(block.as_bytes())
            .ok()
            .and_then(|k| key(KeyKind::Rsa, k));
    }
    if !block.starts_with("-----BEGIN PUBLIC KEY-----") {
        return None;
    }
    if let Ok(k) = DecodingKey::from_rsa_pem(block.as_bytes()) {
        return key(KeyKind::Rsa, k);
    }
    if let Ok(k) = DecodingKey::from_ec_pem(block.as_bytes()) {
        // The key is the uncompressed point (0x04 ‖ x ‖ y): its length names the curve.
        let kind = match k.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => KeyKind::EcP256,
            Ok(97) => KeyKind::EcP384,
            _ => return None,
        };
        return key(kind, k);
    }
    if let Ok(k) = DecodingKey::from_ed_pem(block.as_bytes()) {
        return key(KeyKind::Ed25519, k);
    }
    None
}

/// One entry of a JWK Set as a verifying key, or why it is not one (an encryption key, a
/// symmetric key, an unknown curve or algorithm: such entries are skipped, not fatal).
pub fn from_jwk(value: &serde_json::Value) -> Result<VerifyingKey, String> {
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    if let Some(usage) = field("use") {
        if usage != "sig" {
            return Err(format!("key use '{usage}' is not 'sig'"));
        }
    }
    let alg = match field("alg") {
        Some(a) => Some(
            a.parse::<Algorithm>()
                .map_err(|_| format!("unsupported alg '{a}'"))?,
        ),
        None => None,
    };
    let kind = match (field("kty"), field("crv")) {
        (Some("RSA"), _) => KeyKind::Rsa,
        (Some("EC"), Some("P-256")) => KeyKind::EcP256,
        (Some("EC"), Some("P-384")) => KeyKind::EcP384,
        (Some("OKP"), Some("Ed25519")) => KeyKind::Ed25519,
        // Symmetric (`oct`) keys are never taken from a key set: a shared secret published
        // at a URL is no secret.
        (kty, crv) => return Err(format!("unsupported key type {kty:?} (curve {crv:?})")),
    };
    if let Some(a) = alg {
        if !kind.verifies(a) {
            return Err(format!("alg {a:?} does not fit a {kind:?} key"));
        }
    }
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(value.clone()).map_err(|e| format!("malformed key: {e}"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(VerifyingKey {
        kid: field("kid").map(str::to_string),
        alg,
        kind,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_verify_only_their_algorithms() {
        assert!(KeyKind::Rsa.verifies(Algorithm::PS256));
        assert!(!KeyKind::Rsa.verifies(Algorithm::HS256));
        assert!(!KeyKind::Rsa.verifies(Algorithm::ES256));
        assert!(KeyKind::EcP256.verifies(Algorithm::ES256));
        assert!(!KeyKind::EcP256.verifies(Algorithm::ES384));
        assert!(KeyKind::Ed25519.verifies(Algorithm::EdDSA));
        assert!(!KeyKind::Ed25519.verifies(Algorithm::HS256));
    }

    #[test]
    fn jwk_entries_that_are_not_signature_keys_are_skipped() {
        let oct = serde_json::json!({"kty": "oct", "k": "c2VjcmV0", "kid": "x"});
        assert!(from_jwk(&oct).is_err());
        let enc = serde_json::json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"});
        assert!(from_jwk(&enc).is_err());
        let wrong_alg = serde_json::json!({"kty": "RSA", "alg": "ES256", "n": "AQAB", "e": "AQAB"});
        assert!(from_jwk(&wrong_alg).is_err());
        let unknown_alg =
            serde_json::json!({"kty": "RSA", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"});
        assert!(from_jwk(&unknown_alg).is_err());
        let rsa = serde_json::json!({"kty": "RSA", "kid": "k1", "alg": "RS256", "n": "AQAB", "e": "AQAB"});
        let key = from_jwk(&rsa).unwrap();
        assert_eq!(key.kid.as_deref(), Some("k1"));
        assert!(key.accepts(Algorithm::RS256));
        assert!(
            !key.accepts(Algorithm::PS256),
            "the JWK's alg pins the algorithm"
        );
    }

    #[test]
    fn pem_text_without_public_keys_gives_none() {
        assert!(parse_pem("").is_empty());
        assert!(
            parse_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_empty()
        );
        assert!(
            parse_pem("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----")
                .is_empty()
        );
    }
}
