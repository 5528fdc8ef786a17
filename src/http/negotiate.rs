//! `POST {hub}/negotiate` and the connection tokens it issues.
//!
//! Tokens (negotiate v1) are signed and self-contained: `base64url(id[16] ‖ expiry[8] ‖
//! mac[16] ‖ node)`, where the MAC (HMAC-SHA256, truncated) covers the id, the expiry, the
//! issuing node's id and the user id. Any node that knows the key can check a token and
//! recover the connection id and the node that negotiated it, with no negotiate state kept
//! in memory, so negotiate and connect need no sticky session. Server-Sent Events and Long
//! Polling connections live on the negotiating node (the token's *owner*); their requests
//! that land elsewhere are forwarded there (`http::forward`).
//! Negotiate v0 has no token: the client connects with the connection id, so a v0 id is
//! itself such a token (flagged v0, bound to no user), checked the same way by any node.
//!
//! The top bit of the signed expiry marks a connection negotiated with
//! `useStatefulReconnect=true` (stateful reconnect, see `session::replay`): the flag is
//! covered by the MAC, so any node can tell from the token alone whether the connection may
//! resume on a new WebSocket.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::unix_now;
use crate::hub::Transports;
use crate::ids::ConnectionId;

type HmacSha256 = Hmac<Sha256>;

/// How long a negotiated connection may wait for its transport (ASP.NET's
/// `DisconnectTimeout` is 15 s for an inactive connection; clients connect at once).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);

/// Most ended connection ids remembered at once.
const MAX_ENDED: usize = 100_000;

/// Bit of the signed expiry that marks a stateful-reconnect connection.
const STATEFUL_BIT: u64 = 1 << 63;

/// Bit of the signed expiry that marks a negotiate v0 id (the id is the token).
const V0_BIT: u64 = 1 << 62;

/// The flag bits of the signed expiry.
const FLAGS: u64 = STATEFUL_BIT | V0_BIT;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The connection id.
    pub id: ConnectionId,
    /// Negotiated with `useStatefulReconnect=true`.
    pub stateful: bool,
    /// The connect deadline passed (a live stateful connection may still resume with it).
    pub expired: bool,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token we issued for this user, or expired: 404 "No Connection with that ID".
    Unknown,
}

/// Longest node id a token can carry.
pub const MAX_NODE_ID: usize = 128;

/// Issues and checks connection tokens.
pub struct Tokens {
    key: Vec<u8>,
    /// This node's id, written into the tokens it issues ("" writes none).
    node: String,
    /// Connections that ended while their token was still valid, so the token cannot open
    /// a second connection with the same id (ASP.NET forgets a disposed connection's token).
    ended: Mutex<IdSet>,
    /// Connections of this node's tokens that a WebSocket on another node started
    /// (`forward::claim`): their SSE, Long Polling and WebSocket requests here are refused
    /// as ASP.NET refuses them on a WebSocket connection.
    claimed: Mutex<IdSet>,
}

/// A set of connection ids that remembers each one for at least a token's lifetime (after
/// that the token cannot start a connection anyway) and at most two. Ids are kept as 64-bit
/// keyed hashes (a false match needs a collision of two live ids' hashes: about 1 in 10⁹
/// at 100,000 entries) in two generations: new ids go into the current one, and every
/// [`TOKEN_TTL`] the older generation is dropped whole, which gives its memory back at once.
/// At most [`MAX_ENDED`] ids.
struct IdSet {
    hasher: std::collections::hash_map::RandomState,
    current: HashSet<u64>,
    previous: HashSet<u64>,
    since: Instant,
}

impl Default for IdSet {
    fn default() -> Self {
        IdSet {
            hasher: Default::default(),
            current: HashSet::new(),
            previous: HashSet::new(),
            since: Instant::now(),
        }
    }
}

impl IdSet {
    fn key(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    /// Starts a new generation when the current one is a token's lifetime old.
    fn rotate(&mut self, now: Instant) {
        let age = now.duration_since(self.since);
        if age < TOKEN_TTL {
            return;
        }
        self.previous = if age < TOKEN_TTL * 2 {
            std::mem::take(&mut self.current)
        } else {
            self.current = HashSet::new();
            HashSet::new()
        };
        self.since = now;
    }

    /// Adds `id`; false when it was present already or the set is full.
    fn insert(&mut self, id: &str) -> bool {
        self.rotate(Instant::now());
        let key = self.key(id);
        if self.current.len() + self.previous.len() >= MAX_ENDED || self.previous.contains(&key) {
            return false;
        }
        self.current.insert(key)
    }

    fn contains(&self, id: &str) -> bool {
        let key = self.key(id);
        self.current.contains(&key) || self.previous.contains(&key)
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens signed with `key`. Nodes that must accept each other's tokens share the key.
    pub fn new(key: &[u8]) -> Tokens {
        Tokens::for_node(key, "")
    }

    /// Tokens signed with `key` that name node `node` as the owner of the connections it
    /// negotiates (at most [`MAX_NODE_ID`] bytes; a longer id is not written).
    pub fn for_node(key: &[u8], node: &str) -> Tokens {
        let node = if node.len() <= MAX_NODE_ID { node } else { "" };
        Tokens {
            key: key.to_vec(),
            node: node.to_string(),
            ended: Mutex::new(IdSet::default()),
            claimed: Mutex::new(IdSet::default()),
        }
    }

    /// Records that connection `id` ended: its token is refused from now on.
    pub fn mark_ended(&self, id: &ConnectionId) {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.insert(id.as_str());
    }

    /// Records that a WebSocket on another node started connection `id` of one of this
    /// node's tokens; false when it was claimed already (or the record is full).
    pub fn claim(&self, id: &ConnectionId) -> bool {
        let mut claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        claimed.insert(id.as_str())
    }

    /// Whether a WebSocket on another node started connection `id`.
    pub fn is_claimed(&self, id: &ConnectionId) -> bool {
        let claimed = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        claimed.contains(id.as_str())
    }

    fn ended_text(&self, id: &str) -> bool {
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        ended.contains(id)
    }

    /// Whether connection `id` ended (its token is refused).
    pub fn has_ended(&self, id: &ConnectionId) -> bool {
        self.ended_text(id.as_str())
    }

    fn mac(&self, id: &[u8], expiry: u64, node: &[u8], user: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        if let Ok(mut m) = HmacSha256::new_from_slice(&self.key) {
            m.update(id);
            m.update(&expiry.to_be_bytes());
            // Length-prefixed (at most MAX_NODE_ID < 256): node and user cannot be confused.
            m.update(&[node.len() as u8]);
            m.update(node);
            m.update(user.as_bytes());
            let full = m.finalize().into_bytes();
            out.copy_from_slice(&full[..16]);
        }
        out
    }

    /// A new connection id and its v1 token for `user` ("" when anonymous).
    pub fn issue(&self, user: &str) -> (ConnectionId, String) {
        self.issue_with(user, false)
    }

    /// A new connection id and its v1 token; `stateful` marks a stateful-reconnect connection.
    pub fn issue_with(&self, user: &str, stateful: bool) -> (ConnectionId, String) {
        self.sign(user, if stateful { STATEFUL_BIT } else { 0 })
    }

    /// A token: a fresh random id, the expiry with `flags`, the MAC, this node's id.
    fn sign(&self, user: &str, flags: u64) -> (ConnectionId, String) {
        let raw: [u8; 16] = rand::random();
        let id_text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let expiry = (unix_now() + TOKEN_TTL.as_secs()) | flags;
        let mut token = Vec::with_capacity(40 + self.node.len());
        token.extend_from_slice(&raw);
        token.extend_from_slice(&expiry.to_be_bytes());
        token.extend_from_slice(&self.mac(&raw, expiry, self.node.as_bytes(), user));
        token.extend_from_slice(self.node.as_bytes());
        let id = ConnectionId::new(&id_text).unwrap_or_else(|_| ConnectionId::random());
        (
            id,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token),
        )
    }

    /// A new connection id for a negotiate v0 client. v0 has no separate token: the id is
    /// the secret the client connects with, so it is a signed token itself (marked v0,
    /// bound to no user, naming this node): any node checks it, and its Server-Sent Events
    /// and Long Polling requests find their way here, as with v1.
    pub fn issue_v0(&self) -> ConnectionId {
        let (_, token) = self.sign("", V0_BIT);
        ConnectionId::new(&token).unwrap_or_else(|_| ConnectionId::random())
    }

    /// Decodes a token and checks its MAC for `user`: the connection id, the raw signed
    /// expiry (with the flag bits) and the owning node ("" when none is named).
    fn open(&self, token: &str, user: &str) -> Result<(ConnectionId, u64, String), TokenError> {
        // 40 bytes plus the node id, base64url: longer input is not a token of ours.
        if token.len() > (40 + MAX_NODE_ID) * 4 / 3 + 4 {
            return Err(TokenError::Unknown);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Unknown)?;
        if bytes.len() < 40 || bytes.len() > 40 + MAX_NODE_ID {
            return Err(TokenError::Unknown);
        }
        let (raw, rest) = bytes.split_at(16);
        let (exp, rest) = rest.split_at(8);
        let (mac, node) = rest.split_at(16);
        let mut exp_arr = [0u8; 8];
        exp_arr.copy_from_slice(exp);
        let expiry = u64::from_be_bytes(exp_arr);
        let expected = self.mac(raw, expiry, node, user);
        // Constant-time comparison: the MAC must not leak through timing.
        let ok = expected
            .iter()
            .zip(mac)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !ok {
            // Forged, corrupted, or issued to another user: all look the same from here.
            return Err(TokenError::Unknown);
        }
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let id = ConnectionId::new(&id).map_err(|_| TokenError::Unknown)?;
        let node = String::from_utf8(node.to_vec()).map_err(|_| TokenError::Unknown)?;
        Ok((id, expiry, node))
    }

    /// A v1 token of `user` (not a v0 id): [`Tokens::open`].
    fn open_v1(&self, token: &str, user: &str) -> Result<(ConnectionId, u64, String), TokenError> {
        match self.open(token, user)? {
            (_, expiry, _) if expiry & V0_BIT != 0 => Err(TokenError::Unknown),
            opened => Ok(opened),
        }
    }

    /// A negotiate v0 id: its expiry and node. The id is the whole text.
    fn open_v0(&self, id: &str) -> Option<(u64, String)> {
        match self.open(id, "") {
            Ok((_, expiry, node)) if expiry & V0_BIT != 0 => Some((expiry, node)),
            _ => None,
        }
    }

    /// The node that negotiated a genuine token of `user` (or a v0 id), when it is another
    /// node than this one: where its Server-Sent Events and Long Polling requests are
    /// served. `None` for this node's tokens, tokens naming no node, and anything not valid.
    pub fn remote_owner(&self, token: &str, user: &str) -> Option<String> {
        let node = match self.open_v1(token, user) {
            Ok((_, _, node)) => node,
            Err(_) => self.open_v0(token)?.1,
        };
        (!node.is_empty() && node != self.node).then_some(node)
    }

    /// The connection id a genuine v1 token of `user` names, expired or not. For requests
    /// on a connection that is already running (polls and sends outlive the token's TTL,
    /// which only bounds how long a negotiation may wait for its transport).
    pub fn id_of(&self, token: &str, user: &str) -> Option<ConnectionId> {
        self.open_v1(token, user).ok().map(|(id, _, _)| id)
    }

    /// Checks the `id=` value of a request that starts a connection (a v1 token of `user`,
    /// or a v0 id) and returns the connection id: unexpired, and not of a connection that
    /// ended.
    pub fn check(&self, token: &str, user: &str) -> Result<ConnectionId, TokenError> {
        if let Some((expiry, _)) = self.open_v0(token) {
            if (expiry & !FLAGS) < unix_now() || self.ended_text(token) {
                return Err(TokenError::Unknown);
            }
            return ConnectionId::new(token).map_err(|_| TokenError::Unknown);
        }
        match self.inspect(token, user)? {
            TokenInfo { expired: true, .. } => Err(TokenError::Unknown),
            info => Ok(info.id),
        }
    }

    /// Checks a v1 token's signature and the ended list and reports what it says, including
    /// whether it expired (the caller decides: a live stateful connection may resume with an
    /// expired token, nothing else may).
    pub fn inspect(&self, token: &str, user: &str) -> Result<TokenInfo, TokenError> {
        let (id, expiry, _) = self.open_v1(token, user)?;
        let stateful = expiry & STATEFUL_BIT != 0;
        let expired = (expiry & !FLAGS) < unix_now();
        if self.ended_text(id.as_str()) {
            return Err(TokenError::Unknown);
        }
        Ok(TokenInfo {
            id,
            stateful,
            expired,
        })
    }
}

/// One entry of `availableTransports`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AvailableTransport {
    /// `WebSockets`, `ServerSentEvents` or `LongPolling`.
    pub transport: &'static str,
    /// `Text` and/or `Binary`.
    pub transfer_formats: Vec<&'static str>,
}

/// The negotiate response body.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NegotiateResponse {
    /// 0 or 1.
    pub negotiate_version: u32,
    /// Public connection id.
    pub connection_id: String,
    /// Secret token (v1 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_token: Option<String>,
    /// Transports, in order of preference.
    pub available_transports: Vec<AvailableTransport>,
    /// Present (true) only when the client asked for stateful reconnect and the hub allows it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub use_stateful_reconnect: bool,
}

/// The transports negotiate lists, in ASP.NET's order (the client tries them in order).
pub fn available_transports(allowed: &Transports) -> Vec<AvailableTransport> {
    let mut out = Vec::with_capacity(3);
    if allowed.websockets {
        out.push(AvailableTransport {
            transport: "WebSockets",
            transfer_formats: vec!["Text", "Binary"],
        });
    }
    if allowed.server_sent_events {
        out.push(AvailableTransport {
            transport: "ServerSentEvents",
            transfer_formats: vec!["Text"],
        });
    }
    if allowed.long_polling {
        out.push(AvailableTransport {
            transport: "LongPolling",
            transfer_formats: vec!["Text", "Binary"],
        });
    }
    out
}

/// The negotiate response body for a request with `query` from `user` ("" when
/// anonymous): a new connection id, its token (v1), the transports, and the
/// stateful-reconnect flag when the client asked for it and `allow_stateful` (the hub's
/// `AllowStatefulReconnects`; it needs a token, so v1 only); or ASP.NET's
/// `{"error":"…"}` for a version it refuses (still sent with HTTP 200).
pub fn response_body(
    tokens: &Tokens,
    user: &str,
    query: &str,
    allow_stateful: bool,
    transports: &Transports,
) -> Vec<u8> {
    let version = match requested_version(query) {
        Ok(v) => v,
        Err(error) => {
            return serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default()
        }
    };
    // The flag travels signed inside the token.
    let stateful = version >= 1 && allow_stateful && wants_stateful_reconnect(query);
    let (connection_id, connection_token) = if version >= 1 {
        let (id, token) = tokens.issue_with(user, stateful);
        (id, Some(token))
    } else {
        (tokens.issue_v0(), None)
    };
    let body = NegotiateResponse {
        negotiate_version: version,
        connection_id: connection_id.to_string(),
        connection_token,
        available_transports: available_transports(transports),
        use_stateful_reconnect: stateful,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Whether the negotiate query asks for stateful reconnect (`useStatefulReconnect=true`).
pub fn wants_stateful_reconnect(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| {
        k.eq_ignore_ascii_case("useStatefulReconnect") && v.eq_ignore_ascii_case("true")
    })
}

/// Reads `negotiateVersion` from a query string, case-insensitively; ASP.NET's error texts.
pub fn requested_version(query: &str) -> Result<u32, String> {
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k.eq_ignore_ascii_case("negotiateVersion") {
            return match v.trim().parse::<i64>() {
                Ok(n) if n < 0 => Err(format!("The client requested version '{n}', but the server does not support this version.")),
                Ok(n) => Ok(n.min(1) as u32),
                Err(_) => Err("The client requested a non-integer protocol version.".into()),
            };
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_ids_live_one_to_two_token_lifetimes_and_memory_is_returned() {
        let mut set = IdSet::default();
        for i in 0..10_000 {
            assert!(set.insert(&format!("old{i}")));
        }
        assert!(!set.insert("old7"), "present already");
        assert!(set.contains("old7") && !set.contains("new"));
        let Some(start) = Instant::now().checked_sub(TOKEN_TTL) else {
            return; // the clock is too young to fake an old generation
        };
        // One lifetime later the ids move to the previous generation and are still refused.
        set.since = start;
        assert!(set.insert("new"));
        assert!(set.contains("old7") && set.contains("new"));
        assert_eq!(set.current.len(), 1);
        // Two lifetimes: the old generation is dropped whole.
        let Some(start) = Instant::now().checked_sub(TOKEN_TTL) else {
            return;
        };
        set.since = start;
        assert!(set.insert("newer"));
        assert!(!set.contains("old7"));
        assert!(set.contains("new") && set.contains("newer"));
        assert!(set.previous.capacity() < 64, "memory given back");
    }

    #[test]
    fn tokens_round_trip_and_bind_user() {
        let t = Tokens::new(b"key");
        let (id, token) = t.issue("alice");
        assert_eq!(t.check(&token, "alice"), Ok(id));
        assert_eq!(t.check(&token, "bob"), Err(TokenError::Unknown));
        assert_eq!(
            Tokens::new(b"other").check(&token, "alice"),
            Err(TokenError::Unknown)
        );
        assert_eq!(t.check("garbage", "alice"), Err(TokenError::Unknown));
        let mut bad = token.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            t.check(std::str::from_utf8(&bad).unwrap(), "alice"),
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn stateful_flag_is_signed() {
        let t = Tokens::new(b"key");
        let (id, token) = t.issue_with("u", true);
        let info = t.inspect(&token, "u").unwrap();
        assert_eq!(info.id, id);
        assert!(info.stateful && !info.expired);
        assert!(!t.inspect(&t.issue("u").1, "u").unwrap().stateful);
        // Flipping the flag bit (first byte of the expiry) breaks the MAC.
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap();
        raw[16] ^= 0x80;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(t.inspect(&forged, "u"), Err(TokenError::Unknown));
        assert!(wants_stateful_reconnect(
            "negotiateVersion=1&useStatefulReconnect=true"
        ));
        assert!(!wants_stateful_reconnect("negotiateVersion=1"));
    }

    #[test]
    fn tokens_name_their_node_under_the_mac() {
        let a = Tokens::for_node(b"key", "node-a");
        let b = Tokens::for_node(b"key", "node-b");
        let (id, token) = a.issue("u");
        assert_eq!(b.check(&token, "u"), Ok(id));
        assert_eq!(b.remote_owner(&token, "u").as_deref(), Some("node-a"));
        assert_eq!(
            a.remote_owner(&token, "u"),
            None,
            "own tokens are served here"
        );
        assert_eq!(b.remote_owner(&token, "other"), None, "MAC binds the user");
        // Another node name in place of the real one breaks the MAC.
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap();
        let last = raw.len() - 1;
        raw[last] = b'b';
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(b.check(&forged, "u"), Err(TokenError::Unknown));
        assert_eq!(b.remote_owner(&forged, "u"), None);
        // A node-less token (Tokens::new) is served wherever it lands.
        let (_, plain) = Tokens::new(b"key").issue("u");
        assert_eq!(b.remote_owner(&plain, "u"), None);
        assert!(b.check(&plain, "u").is_ok());
        assert_eq!(
            Tokens::for_node(b"key", &"n".repeat(MAX_NODE_ID + 1)).node,
            ""
        );
    }

    #[test]
    fn v0_ids_are_signed_name_their_node_and_end_with_their_connection() {
        let a = Tokens::for_node(b"key", "node-a");
        let b = Tokens::for_node(b"key", "node-b");
        let id = a.issue_v0();
        assert_eq!(b.remote_owner(id.as_str(), "").as_deref(), Some("node-a"));
        assert_eq!(
            b.remote_owner(id.as_str(), "alice").as_deref(),
            Some("node-a")
        );
        assert_eq!(a.remote_owner(id.as_str(), ""), None);
        // Any node checks it, for any user (v0 binds none); the id is the whole text.
        assert_eq!(b.check(id.as_str(), "alice"), Ok(id.clone()));
        assert_eq!(a.check(id.as_str(), ""), Ok(id.clone()));
        // Never a v1 token, not even for the anonymous user.
        assert_eq!(a.id_of(id.as_str(), ""), None);
        assert_eq!(a.inspect(id.as_str(), ""), Err(TokenError::Unknown));
        a.mark_ended(&id);
        assert_eq!(a.check(id.as_str(), ""), Err(TokenError::Unknown));
        // Forged or foreign: refused, and never forwarded.
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id.as_str())
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(b.check(&forged, ""), Err(TokenError::Unknown));
        assert_eq!(b.remote_owner(&forged, ""), None);
        assert_eq!(
            Tokens::for_node(b"other", "node-b").check(id.as_str(), ""),
            Err(TokenError::Unknown)
        );
        assert_eq!(b.remote_owner("plain", ""), None);
    }

    #[test]
    fn negotiate_version_parsing() {
        assert_eq!(requested_version(""), Ok(0));
        assert_eq!(requested_version("NegotiateVersion=1"), Ok(1));
        assert_eq!(requested_version("negotiateVersion=5"), Ok(1));
        assert!(requested_version("negotiateVersion=x")
            .unwrap_err()
            .contains("non-integer"));
    }
}
