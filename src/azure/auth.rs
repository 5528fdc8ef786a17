//! Access-key tokens of the Azure SignalR Service, checked as the service checks them. Pure:
//! no I/O (the clock is the system's, read by `jsonwebtoken`).
//!
//! Two kinds of token are signed with the access key (HS256; the HMAC key is the UTF-8
//! bytes of the key string, not its base64 decoding):
//!
//! - **REST tokens** ([`verify_rest`]): what the management SDK (`ServiceManager`,
//!   `RestClient`) sends as `Authorization: Bearer` on every data-plane call. Its `aud` is
//!   the request URL as the SDK built it: `scheme://host/` (older SDKs drop the port, newer
//!   ones keep it) + path, then either `?api-version=…` (or `?application=<app>&api-version=…`),
//!   or, in SDKs that sign `Uri.GetLeftPart(Path)`, no query at all. The `excluded`,
//!   `reason` and `ttl` parameters are appended after signing and are never part of `aud`.
//! - **Client tokens** ([`verify_client`]): what a serverless app's negotiate hands the
//!   client with the redirect URL; `aud` is `scheme://host/client/?hub=<hub>` and the user
//!   id is in `asrs.s.uid` (the .NET SDK), `nameid` (the documentation), `sub`, or ASP.NET's
//!   `nameidentifier` claim.
//!
//! How `aud` is compared with the request ([`audience_matches`]):
//! - the scheme is not compared (TLS may end at a proxy in front of feedhub);
//! - the host must equal the `Host` header's host, ignoring case and any port on either side
//!   (the SDK drops the port; a request forwarded by another feedhub node carries no `Host`
//!   and is not host-checked: the node it landed on checked it);
//! - the path must equal the request path (byte for byte, or after percent-decoding both);
//! - a query in `aud` must equal the request's query without `excluded`, `reason` and `ttl`
//!   (as ordered lists of decoded name/value pairs); an `aud` without a query matches any.
//!
//! `exp` is required and, like `nbf`, checked with [`LEEWAY_SECS`] of clock skew. `kid` and
//! `nameid` of REST tokens are ignored, as the service ignores them.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::ids::UserId;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Query parameters the SDK appends after signing (never part of `aud`).
pub const UNSIGNED_PARAMS: [&str; 3] = ["excluded", "reason", "ttl"];

/// Claims holding a client token's user id, in the order they are looked at.
pub const USER_CLAIMS: [&str; 4] = [
    "asrs.s.uid",
    "nameid",
    "sub",
    crate::auth::NAME_IDENTIFIER_CLAIM,
];

/// Why a token was refused (each is a 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` (nor `access_token=`).
    #[error("missing access token")]
    Missing,
    /// Malformed, badly signed, expired, not yet valid, or not HS256.
    #[error("invalid access token: {0}")]
    Invalid(String),
    /// The token's `aud` is not this request's URL.
    #[error("the token's audience '{0}' does not match the request")]
    Audience(String),
    /// A client token without a usable user id claim.
    #[error("the token names no valid user id: {0}")]
    User(String),
}

/// What a request looks like to the audience check.
#[derive(Debug, Clone, Copy)]
pub struct RequestUrl<'a> {
    /// The `Host` header (with or without a port); `None` skips the host check.
    pub host: Option<&'a str>,
    /// The raw (percent-encoded) request path.
    pub path: &'a str,
    /// The raw query string (without `?`).
    pub query: &'a str,
}

/// Verified claims.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Verifies a REST token for `url`: signature, `exp`/`nbf`, and `aud` ([`audience_matches`]).
pub fn verify_rest(key: &str, token: &str, url: RequestUrl<'_>) -> Result<Claims, TokenError> {
    let claims = decode(key, token)?;
    let aud = audience(&claims)?;
    if !audience_matches(aud, url) {
        return Err(TokenError::Audience(aud.to_string()));
    }
    Ok(claims)
}

/// A verified client token: its user id (if any claim names one), claims and validity end.
#[derive(Debug, Clone)]
pub struct ClientToken {
    /// The user id.
    pub user: Option<UserId>,
    /// Unix time (seconds) from which the token is no longer accepted (`exp` + leeway + 1).
    pub valid_until: Option<u64>,
    /// Every claim.
    pub claims: Claims,
}

/// Verifies a client token for hub `hub` (its Azure name, lowercase): signature,
/// `exp`/`nbf`, and an `aud` of `scheme://host/client/?hub=<hub>` (or `<app>_<hub>`) whose
/// host is `host`'s (unchecked when `None`).
pub fn verify_client(
    key: &str,
    token: &str,
    hub: &str,
    host: Option<&str>,
) -> Result<ClientToken, TokenError> {
    let claims = decode(key, token)?;
    let aud = audience(&claims)?;
    if !client_audience_matches(aud, hub, host) {
        return Err(TokenError::Audience(aud.to_string()));
    }
    let user = match USER_CLAIMS.iter().find_map(|c| claims.get(*c)) {
        None => None,
        Some(serde_json::Value::String(s)) => {
            Some(UserId::new(s).map_err(|e| TokenError::User(e.to_string()))?)
        }
        Some(serde_json::Value::Number(n)) => {
            Some(UserId::new(&n.to_string()).map_err(|e| TokenError::User(e.to_string()))?)
        }
        Some(_) => return Err(TokenError::User("not a string".into())),
    };
    let valid_until = claims
        .get("exp")
        .and_then(|e| e.as_u64().or_else(|| e.as_f64().map(|f| f as u64)))
        .map(|exp| exp.saturating_add(LEEWAY_SECS).saturating_add(1));
    Ok(ClientToken {
        user,
        valid_until,
        claims,
    })
}

fn decode(key: &str, token: &str) -> Result<Claims, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v.required_spec_claims.insert("exp".into());
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key.as_bytes()), &v)
        .map(|d| d.claims)
        .map_err(|e| TokenError::Invalid(e.to_string()))
}

/// The single `aud` (a string, or an array of one string).
fn audience(claims: &Claims) -> Result<&str, TokenError> {
    match claims.get("aud") {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Array(a)) if a.len() == 1 => a
            .first()
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| TokenError::Invalid("aud is not a string".into())),
        _ => Err(TokenError::Invalid("the token has no aud".into())),
    }
}

/// An absolute `http(s)://authority/path?query` split into host (without port), path (at
/// least `/`) and query; `None` when it is not one.
fn split_url(url: &str) -> Option<(&str, &str, Option<&str>)> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let rest = rest.split('#').next().unwrap_or(rest);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(end);
    let (path, query) = match after.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (after, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    Some((host_of(authority), path, query))
}

/// The host of `host[:port]` or `[v6][:port]`, without the port.
pub fn host_of(authority: &str) -> &str {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn host_ok(aud_host: &str, host: Option<&str>) -> bool {
    match host {
        None => true,
        Some(h) => host_of(h).eq_ignore_ascii_case(aud_host),
    }
}

/// Whether a REST token's `aud` names this request (rules in the module doc).
pub fn audience_matches(aud: &str, url: RequestUrl<'_>) -> bool {
    let Some((aud_host, aud_path, aud_query)) = split_url(aud) else {
        return false;
    };
    if !host_ok(aud_host, url.host) {
        return false;
    }
    if aud_path != url.path {
        let same = match (percent_decode(aud_path), percent_decode(url.path)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        if !same {
            return false;
        }
    }
    match aud_query {
        None | Some("") => true,
        Some(q) => {
            let signed: Vec<(String, String)> = pairs(q).collect();
            let sent: Vec<(String, String)> = pairs(url.query)
                .filter(|(k, _)| !UNSIGNED_PARAMS.contains(&k.as_str()))
                .collect();
            signed == sent
        }
    }
}

/// Whether a client token's `aud` is `…/client/?hub=<hub>` (or `<app>_<hub>`) on `host`.
pub fn client_audience_matches(aud: &str, hub: &str, host: Option<&str>) -> bool {
    let Some((aud_host, aud_path, aud_query)) = split_url(aud) else {
        return false;
    };
    if !host_ok(aud_host, host) || aud_path.trim_end_matches('/') != "/client" {
        return false;
    }
    let named = pairs(aud_query.unwrap_or(""))
        .find(|(k, _)| k == "hub")
        .map(|(_, v)| v);
    named.is_some_and(|n| hub_name_matches(&n, hub))
}

/// Whether `given` (a `hub=` value: `<hub>` or `<application>_<hub>`) names hub `hub`,
/// ignoring case (the SDK lowercases both).
pub fn hub_name_matches(given: &str, hub: &str) -> bool {
    if given.eq_ignore_ascii_case(hub) {
        return true;
    }
    given
        .split_once('_')
        .is_some_and(|(_, h)| h.eq_ignore_ascii_case(hub))
}

fn pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// Percent-decodes `s` (`%XX` → byte; anything else as is). `None` when the result is not
/// UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn sign(key: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// aspnet-interop.md C.6: the exact token bytes.
    const C6_AUD: &str = "https://feedhub.service.signalr.net/api/hubs/feedhub/users/1002/:send?api-version=2022-06-01";

    #[test]
    fn c6_vector_signature_is_the_documented_one() {
        // Header {"alg":"HS256","typ":"JWT"} and the payload as the doc writes them.
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64(&format!(r#"{{"aud":"{C6_AUD}","exp":2000000000}}"#));
        let token = format!("{header}.{payload}.RVpRZ1xKPIxo3p7Q6B4wPsNeiGxIqVHyA1V5plry0fI");
        let url = RequestUrl {
            host: Some("feedhub.service.signalr.net"),
            path: "/api/hubs/feedhub/users/1002/:send",
            query: "api-version=2022-06-01",
        };
        let claims = verify_rest("test-access-key", &token, url).unwrap();
        assert_eq!(claims["exp"], 2000000000u64);
        assert!(matches!(
            verify_rest("other-key", &token, url),
            Err(TokenError::Invalid(_))
        ));
        // With the port in Host, and with `excluded` appended: still the same aud.
        let with_port = RequestUrl {
            host: Some("feedhub.service.signalr.net:443"),
            query: "api-version=2022-06-01&excluded=c1",
            ..url
        };
        verify_rest("test-access-key", &token, with_port).unwrap();
        // One byte of the payload changed: refused.
        let tampered = token.replacen(
            &payload,
            &b64(&format!(r#"{{"aud":"{C6_AUD}","exp":2000000001}}"#)),
            1,
        );
        assert!(verify_rest("test-access-key", &tampered, url).is_err());
    }

    #[test]
    fn audience_rules() {
        let url = |host, path, query| RequestUrl { host, path, query };
        let aud = "http://localhost/api/hubs/feed/:send?api-version=2022-06-01";
        let ok = |u| audience_matches(aud, u);
        assert!(ok(url(
            Some("localhost:5001"),
            "/api/hubs/feed/:send",
            "api-version=2022-06-01"
        )));
        assert!(ok(url(
            Some("LOCALHOST"),
            "/api/hubs/feed/:send",
            "api-version=2022-06-01&excluded=a&excluded=b"
        )));
        assert!(ok(url(
            None,
            "/api/hubs/feed/:send",
            "api-version=2022-06-01"
        )));
        assert!(!ok(url(
            Some("evil"),
            "/api/hubs/feed/:send",
            "api-version=2022-06-01"
        )));
        assert!(!ok(url(
            Some("localhost"),
            "/api/hubs/feed/groups/x/:send",
            "api-version=2022-06-01"
        )));
        assert!(!ok(url(
            Some("localhost"),
            "/api/hubs/feed/:send",
            "api-version=2024-12-01"
        )));
        assert!(!ok(url(
            Some("localhost"),
            "/api/hubs/feed/:send",
            "application=x&api-version=2022-06-01"
        )));
        // With an application, and a port kept in aud (newer SDKs, path only).
        let app = "http://localhost/api/hubs/feed/:send?application=app&api-version=2022-06-01";
        assert!(audience_matches(
            app,
            url(
                Some("localhost"),
                "/api/hubs/feed/:send",
                "application=app&api-version=2022-06-01&excluded=c"
            )
        ));
        let path_only = "http://127.0.0.1:5001/api/hubs/feed/users/a%20b/:send";
        assert!(audience_matches(
            path_only,
            url(
                Some("127.0.0.1:5001"),
                "/api/hubs/feed/users/a%20b/:send",
                "api-version=2024-12-01"
            )
        ));
        assert!(audience_matches(
            path_only,
            url(
                Some("127.0.0.1"),
                "/api/hubs/feed/users/a b/:send",
                "api-version=2024-12-01"
            )
        ));
        assert!(!audience_matches("feed", url(None, "/", "")));
        assert!(!audience_matches(
            "ftp://localhost/api",
            url(None, "/api", "")
        ));
        assert!(audience_matches(
            "http://[::1]:80/x",
            url(Some("[::1]:5000"), "/x", "")
        ));
    }

    #[test]
    fn rest_token_claims() {
        let key = "k";
        let aud = "http://h/api/health?api-version=2022-06-01";
        let url = RequestUrl {
            host: Some("h"),
            path: "/api/health",
            query: "api-version=2022-06-01",
        };
        let t = sign(
            key,
            serde_json::json!({ "aud": aud, "exp": now() + 60, "nbf": now() - 1 }),
        );
        verify_rest(key, &t, url).unwrap();
        let t = sign(key, serde_json::json!({ "aud": [aud], "exp": now() + 60 }));
        verify_rest(key, &t, url).unwrap();
        let expired = sign(key, serde_json::json!({ "aud": aud, "exp": now() - 120 }));
        assert!(matches!(
            verify_rest(key, &expired, url),
            Err(TokenError::Invalid(_))
        ));
        let early = sign(
            key,
            serde_json::json!({ "aud": aud, "exp": now() + 600, "nbf": now() + 300 }),
        );
        assert!(verify_rest(key, &early, url).is_err());
        let no_exp = sign(key, serde_json::json!({ "aud": aud }));
        assert!(verify_rest(key, &no_exp, url).is_err());
        let no_aud = sign(key, serde_json::json!({ "exp": now() + 60 }));
        assert!(verify_rest(key, &no_aud, url).is_err());
        let wrong = sign(
            key,
            serde_json::json!({ "aud": "http://h/api/hubs/x/:send", "exp": now() + 60 }),
        );
        assert!(matches!(
            verify_rest(key, &wrong, url),
            Err(TokenError::Audience(_))
        ));
        assert_eq!(verify_rest(key, "", url).unwrap_err(), TokenError::Missing);
        assert!(verify_rest(key, "garbage", url).is_err());
    }

    #[test]
    fn client_tokens() {
        let key = "k";
        let t = |claims| sign(key, claims);
        let aud = "http://127.0.0.1:9/client/?hub=feed";
        let ok = t(serde_json::json!({ "aud": aud, "exp": now() + 60, "asrs.s.uid": "1002" }));
        let c = verify_client(key, &ok, "feed", Some("127.0.0.1:5000")).unwrap();
        assert_eq!(c.user.unwrap().as_str(), "1002");
        assert!(verify_client(key, &ok, "other", Some("127.0.0.1")).is_err());
        assert!(verify_client(key, &ok, "feed", Some("localhost")).is_err());
        let nameid = t(
            serde_json::json!({ "aud": "http://h/client?hub=App_Feed", "exp": now() + 60, "nameid": "u" }),
        );
        assert_eq!(
            verify_client(key, &nameid, "feed", Some("h"))
                .unwrap()
                .user
                .unwrap()
                .as_str(),
            "u"
        );
        let sub = t(
            serde_json::json!({ "aud": "http://h/client/?hub=feed", "exp": now() + 60, "sub": 7 }),
        );
        assert_eq!(
            verify_client(key, &sub, "feed", None)
                .unwrap()
                .user
                .unwrap()
                .as_str(),
            "7"
        );
        let anon = t(serde_json::json!({ "aud": "http://h/client/?hub=feed", "exp": now() + 60 }));
        assert!(verify_client(key, &anon, "feed", None)
            .unwrap()
            .user
            .is_none());
        let rest_aud =
            t(serde_json::json!({ "aud": "http://h/api/hubs/feed/:send", "exp": now() + 60 }));
        assert!(verify_client(key, &rest_aud, "feed", None).is_err());
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b%3A").as_deref(), Some("a b:"));
        assert_eq!(percent_decode("%zz%4").as_deref(), Some("%zz%4"));
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(host_of("h:1"), "h");
        assert_eq!(host_of("[::1]:1"), "::1");
        assert!(hub_name_matches("app_feed", "feed"));
        assert!(hub_name_matches("FEED", "feed"));
        assert!(!hub_name_matches("feedx", "feed"));
    }
}
