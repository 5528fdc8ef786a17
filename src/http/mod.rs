//! The HTTP face of the server, on hyper 1: routing, negotiate, the WebSocket upgrade,
//! health and metrics, the publish API, CORS. It parses requests and hands upgraded sockets
//! to the transports; the only state it keeps is the table of live transports
//! ([`connections`]).
//!
//! | route | what |
//! |---|---|
//! | `POST {hub}/negotiate` | [`negotiate`]: connection id and token, transports |
//! | `GET {hub}` + `Upgrade: websocket` | the WebSocket transport (with `id=`, or without negotiate: `skipNegotiation`) |
//! | `GET {hub}?id=` + `Accept: text/event-stream` | Server-Sent Events ([`transports`]) |
//! | `GET`, `POST`, `DELETE {hub}?id=` | long polls, sends, Long Polling end ([`transports`]) |
//! | `POST /api/feed` | publish a feed event (`Authorization: Bearer <api key>`) |
//! | `POST /dev/token?user=ID` | development mode only: a token for a demo user |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness, readiness (backplane and ingest connected), Prometheus text |
//! | mounted paths | services the composition root mounts ([`mount`]): the demo page and its post service (`/`, `/app.js`, `/app.css`, `/demo/*`), a REST API |
//!
//! The state every handler gets is [`state::HttpState`]; the shared response and body
//! helpers are in [`respond`], a leaf the mounted services use too.

pub mod conn;
pub mod connections;
pub mod forward;
pub mod limits;
pub mod mount;
pub mod negotiate;
pub mod origin;
pub mod relay;
pub mod respond;
pub mod state;
pub mod transports;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

pub use respond::Body;
use respond::{body_timeout, json, read_body, read_incoming, text};
pub use state::HttpState;

use crate::auth::{token_from_request, AuthError, Identity};
use crate::connection::RequestInfo;
use crate::hub::HubLifetime;
use crate::metrics::{inc, METRICS};

/// Entry point for every request.
pub async fn handle(
    state: Arc<HttpState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut resp = route(&state, req).await;
    if let Some(origin) = origin {
        apply_cors(&state, &origin, &mut resp);
    }
    Ok(resp)
}

/// Entry point for every relay message of this node's backplane channel (the composition
/// root's dispatch workers call it; never waits): forwarded requests and WebSocket claims
/// are served with `state` ([`forward`]), the rest is the relay router's
/// ([`relay::Router::on_frame`]).
pub fn on_relay_frame(state: &Arc<HttpState>, frame: &crate::backplane::RelayFrame) {
    use crate::backplane::RelayKind;
    match &frame.kind {
        RelayKind::Request { .. } => {
            forward::accept(
                &state.router,
                state.clone(),
                frame.relay,
                frame.kind.clone(),
            );
        }
        RelayKind::Claim {
            connection,
            reply_node,
        } => forward::answer_claim(&state.router, state, frame.relay, connection, reply_node),
        _ => state.router.on_frame(frame),
    }
}

/// Adds CORS headers for a listed origin: the origin echoed (never `*`, because the
/// SignalR client sends credentials; `*` and `null` are refused at start, see [`origin`]),
/// credentials allowed.
fn apply_cors(state: &HttpState, origin: &HeaderValue, resp: &mut Response<Body>) {
    let Ok(o) = origin.to_str() else { return };
    if !origin::listed(o, &state.config.cors_origins) {
        return;
    }
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

fn preflight(req: &Request<Incoming>) -> Response<Body> {
    let mut r = text(StatusCode::NO_CONTENT, "");
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    let requested = req
        .headers()
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_static(
                "authorization, content-type, x-requested-with, x-signalr-user-agent",
            )
        });
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    r
}

async fn route(state: &Arc<HttpState>, req: Request<Incoming>) -> Response<Body> {
    // Another way into the hubs (the Azure SignalR client redirect's `/client/…`): its
    // paths mapped onto the hubs' own (`mount::HubGateway`).
    let req = match &state.gateway {
        Some(gateway) => gateway.rewrite(req),
        None => req,
    };
    let path = req.uri().path().trim_end_matches('/').to_string();
    let path = if path.is_empty() {
        "/".to_string()
    } else {
        path
    };
    if req.method() == Method::OPTIONS {
        return preflight(&req);
    }
    match path.as_str() {
        "/healthz" => return text(StatusCode::OK, "ok"),
        "/readyz" => {
            return match (state.ready)() {
                Ok(()) => text(StatusCode::OK, "ready"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
            }
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, METRICS.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return r;
        }
        "/api/feed" => return publish(state, req).await,
        "/dev/token" => return dev_token(state, &req),
        _ => {}
    }
    if let Some(service) = state.mounts.find(req.method(), &path) {
        return service.handle(req, &path).await;
    }
    // A token signed with a key the cached key set lacks refetches it here, where waiting
    // is fine; `authenticate` itself stays synchronous.
    prepare_auth(state, req.uri(), req.headers()).await;
    if let Some(hub_path) = path.strip_suffix("/negotiate") {
        if let Some(hub) = state.hubs.get(hub_path) {
            if let Err(r) = connect_rate(state, &req) {
                return *r;
            }
            return negotiate(state, hub, &req);
        }
    }
    if let Some(hub) = state.hubs.get(path.as_str()).cloned() {
        return connect(state, hub, req).await;
    }
    text(StatusCode::NOT_FOUND, "Not Found")
}

/// Lets the authenticator fetch what the request's token needs (`auth::Authenticator::prepare`).
async fn prepare_auth(state: &HttpState, uri: &http::Uri, headers: &http::HeaderMap) {
    if state.auth.jwks().is_none() {
        return;
    }
    let auth_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = token_from_request(uri.query(), auth_header);
    state.auth.prepare(token.as_deref()).await;
}

/// Authenticates a request for `hub`: 401 where a token is required and missing, and
/// wherever a token is present but invalid.
fn authenticate(
    state: &HttpState,
    hub: &HubLifetime,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<Identity, Box<Response<Body>>> {
    let auth_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let result = match token_from_request(uri.query(), auth_header) {
        // A gateway's token (the Azure client redirect) where the hub's own check fails.
        Some(t) => state.auth.verify(&t).or_else(|e| {
            state
                .gateway
                .as_ref()
                .and_then(|g| g.identity(hub, &t, headers))
                .ok_or(e)
        }),
        None if hub.definition().options.require_auth => Err(AuthError::Missing),
        None => Ok(Identity::anonymous()),
    };
    result.map_err(|e| {
        inc(&METRICS.auth_failures);
        tracing::debug!(error = %e, "unauthorized");
        let mut r = text(StatusCode::UNAUTHORIZED, "Unauthorized");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Box::new(r)
    })
}

fn negotiate(state: &HttpState, hub: &HubLifetime, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let identity = match authenticate(state, hub, req.uri(), req.headers()) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    if let Some(user) = &identity.user_id {
        let max = hub.definition().options.max_connections_per_user;
        if max > 0 && hub.registry().user_connection_count(user) >= max {
            // A clear negotiate error: the official clients show it as the reason start()
            // failed. Counted per hub, on this node.
            inc(&METRICS.refused_user_cap);
            let body = serde_json::to_vec(&serde_json::json!({
                "error": crate::hub::user_cap_message(max)
            }))
            .unwrap_or_default();
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, body);
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(limits::RETRY_AFTER_SECS),
            );
            return r;
        }
    }
    let user = identity.user_id.as_ref().map_or("", |u| u.as_str());
    let options = &hub.definition().options;
    let body = negotiate::response_body(
        &state.tokens,
        user,
        req.uri().query().unwrap_or(""),
        options.stateful_reconnect,
        &options.transports,
    );
    json(StatusCode::OK, body)
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, value: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(value))
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// A request on the hub path: one of the three transports, a send, or a delete
/// (see [`transports`]). Every request is authenticated, and a token only works for the
/// user it was issued to. A Server-Sent Events or Long Polling request whose token names
/// another node (the one that negotiated it) is forwarded there ([`forward`]).
async fn connect(
    state: &Arc<HttpState>,
    hub: Arc<HubLifetime>,
    req: Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let is_ws = method == Method::GET && is_websocket_upgrade(&req);
    if is_ws || (method == Method::GET && transports::accepts_event_stream(req.headers())) {
        // A new persistent transport: its Origin, then its address's connect rate.
        if let Err(r) = check_origin(state, &req).and_then(|()| connect_rate(state, &req)) {
            return *r;
        }
    }
    let (identity, token) = match admit(state, &hub, &method, req.uri(), req.headers()) {
        Ok(admitted) => admitted,
        Err(r) => return *r,
    };
    let Some(token) = token else {
        if is_ws {
            return transports::websocket(state, hub, None, identity, req).await;
        }
        return text(StatusCode::BAD_REQUEST, "Connection ID required");
    };
    if is_ws {
        // A WebSocket connection lives where its socket lands (a stateful resume elsewhere
        // is relayed, see `relay`).
        return transports::websocket(state, hub, Some(&token), identity, req).await;
    }
    let user = user_of(&identity);
    let (parts, body) = req.into_parts();
    if let Some(owner) = state.tokens.remote_owner(&token, &user) {
        let body = if method == Method::POST {
            let timeout = body_timeout(&parts.extensions);
            match read_incoming(body, transports::max_post_body(&hub), timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            }
        } else {
            Bytes::new()
        };
        return forward::forward(state, owner, &parts, body).await;
    }
    let body = transports::SendBody::Incoming(body);
    hub_request(state, hub, &parts, identity, &token, &user, body, false).await
}

/// With `--cors-origin` set, a WebSocket upgrade or SSE request from another origin: 403
/// (see [`origin`]).
fn check_origin(state: &HttpState, req: &Request<Incoming>) -> Result<(), Box<Response<Body>>> {
    let origin = req.headers().get(header::ORIGIN).map(|v| v.to_str());
    let origin = match origin {
        None => None,
        Some(Ok(o)) => Some(o),
        Some(Err(_)) => Some("\u{fffd}"),
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    if origin::upgrade_allowed(origin, host, &state.config.cors_origins) {
        return Ok(());
    }
    inc(&METRICS.refused_origin);
    Err(Box::new(text(
        StatusCode::FORBIDDEN,
        "Origin not allowed (see --cors-origin).",
    )))
}

/// The per-address negotiate/connect rate (see [`limits`]): 429 with `Retry-After` over it.
fn connect_rate(state: &HttpState, req: &Request<Incoming>) -> Result<(), Box<Response<Body>>> {
    let Some(info) = req.extensions().get::<conn::ConnInfo>() else {
        return Ok(());
    };
    match state.admission.allow_connect(info.peer) {
        Ok(()) => Ok(()),
        Err(retry) => {
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many connection attempts from this address. Try again later.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry.as_secs()));
            Err(Box::new(r))
        }
    }
}

/// The checks every hub-path request passes, landed here or forwarded: the method (GET,
/// POST or DELETE), then authentication. The identity and the `id=` token, if any.
fn admit(
    state: &HttpState,
    hub: &HubLifetime,
    method: &Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(Identity, Option<String>), Box<Response<Body>>> {
    if method != Method::GET && method != Method::POST && method != Method::DELETE {
        return Err(Box::new(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
        )));
    }
    let identity = authenticate(state, hub, uri, headers)?;
    Ok((identity, id_param(uri)))
}

/// The `id=` query value, if any.
fn id_param(uri: &http::Uri) -> Option<String> {
    id_param_of(uri.query().unwrap_or(""))
}

/// The `id=` value of a query string, if any and not empty.
pub(crate) fn id_param_of(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

fn user_of(identity: &Identity) -> String {
    identity
        .user_id
        .as_ref()
        .map_or(String::new(), |u| u.as_str().to_string())
}

/// Serves a Server-Sent Events, Long Polling, send or delete request of this node's
/// connection `token` (arrived here, or `forwarded` by the node it landed on: a forwarded
/// poll waits at most [`forward::FORWARDED_POLL_WAIT`] and a forwarded stream keeps alive
/// every [`forward::FORWARD_KEEPALIVE`], so the landing node can tell a silent owner fast).
#[allow(clippy::too_many_arguments)]
async fn hub_request(
    state: &Arc<HttpState>,
    hub: Arc<HubLifetime>,
    parts: &http::request::Parts,
    identity: Identity,
    token: &str,
    user: &str,
    body: transports::SendBody,
    forwarded: bool,
) -> Response<Body> {
    if parts.method == Method::POST {
        let timeout = body_timeout(&parts.extensions);
        return transports::send(state, &hub, token, user, body, timeout).await;
    }
    if parts.method == Method::DELETE {
        return transports::delete(state, token, user);
    }
    let request = RequestInfo {
        query: kept_query(parts.uri.query().unwrap_or("")),
        headers: owned_headers(&parts.headers),
    };
    let options = &hub.definition().options;
    let (poll_wait, keep_alive) = if forwarded {
        (
            options.long_poll_timeout.min(forward::FORWARDED_POLL_WAIT),
            options.sse_keep_alive.min(forward::FORWARD_KEEPALIVE),
        )
    } else {
        (options.long_poll_timeout, options.sse_keep_alive)
    };
    if transports::accepts_event_stream(&parts.headers) {
        return transports::server_sent_events(state, hub, token, identity, request, keep_alive);
    }
    transports::long_poll(state, hub, token, identity, request, poll_wait).await
}

/// A forwarded request that passed the checks of [`admit_forwarded`].
pub(crate) struct Admitted {
    hub: Arc<HubLifetime>,
    identity: Identity,
    token: String,
    user: String,
}

impl Admitted {
    /// The connection the request is for (the token's, or a negotiate v0 id).
    pub(crate) fn connection(&self, state: &HttpState) -> Option<crate::ids::ConnectionId> {
        transports::connection_of(state, &self.token, &self.user)
    }
}

/// Owner side of [`forward`]: checks a request another node forwarded as [`connect`] would
/// have had it landed here (authenticated again: nodes trust the token, not each other's
/// word). `Err`: the answer.
pub(crate) async fn admit_forwarded(
    state: &Arc<HttpState>,
    parts: &http::request::Parts,
) -> Result<Admitted, Response<Body>> {
    let path = parts.uri.path().trim_end_matches('/');
    let Some(hub) = state.hubs.get(path).cloned() else {
        return Err(text(StatusCode::NOT_FOUND, "Not Found"));
    };
    prepare_auth(state, &parts.uri, &parts.headers).await;
    let (identity, token) = match admit(state, &hub, &parts.method, &parts.uri, &parts.headers) {
        Ok(admitted) => admitted,
        Err(r) => return Err(*r),
    };
    let Some(token) = token else {
        return Err(text(StatusCode::BAD_REQUEST, "Connection ID required"));
    };
    let user = user_of(&identity);
    if state.tokens.remote_owner(&token, &user).is_some() {
        // Not this node's connection: never forward twice.
        return Err(transports::not_found());
    }
    Ok(Admitted {
        hub,
        identity,
        token,
        user,
    })
}

/// Owner side of [`forward`]: serves an admitted forwarded request (with its whole body).
pub(crate) async fn serve_forwarded(
    state: &Arc<HttpState>,
    admitted: Admitted,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response<Body> {
    let Admitted {
        hub,
        identity,
        token,
        user,
    } = admitted;
    let body = transports::SendBody::Ready(body);
    hub_request(state, hub, parts, identity, &token, &user, body, true).await
}

/// The query string a connection's [`RequestInfo`] keeps: the connect request's, without
/// its `access_token` (a credential, already verified and available as the identity's
/// claims; a JWT is a few hundred bytes held for the connection's whole life, see the idle
/// memory budget in `bench/README.md`).
fn kept_query(query: &str) -> String {
    let is_token = |pair: &&str| pair.split('=').next() == Some("access_token");
    if !query.split('&').any(|p| is_token(&p)) {
        return query.to_string();
    }
    query
        .split('&')
        .filter(|p| !is_token(p))
        .collect::<Vec<_>>()
        .join("&")
}

/// Whether `name` is a request header a connection's [`RequestInfo`] does not keep: the
/// hop-by-hop and WebSocket handshake headers, used up by the upgrade.
fn upgrade_only(name: &header::HeaderName) -> bool {
    [
        header::CONNECTION,
        header::UPGRADE,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_EXTENSIONS,
    ]
    .contains(name)
}

/// A copy of `headers` that owns its bytes. hyper's header values are slices of the
/// connection's 8 KiB read buffer, so keeping the original map for the connection's lifetime
/// (the hub sees it as the connect request) would pin that whole buffer: 8 KiB per idle
/// connection, found with massif in the idle-density benchmark.
///
/// The headers that only served the WebSocket upgrade itself ([`upgrade_only`]) are
/// not kept: they mean nothing once the socket is upgraded, and a map entry costs ~100
/// bytes for the connection's whole life (the idle memory budget in `bench/README.md`).
fn owned_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let count = headers.iter().filter(|(n, _)| !upgrade_only(n)).count();
    let mut out = http::HeaderMap::with_capacity(count);
    for (name, value) in headers {
        if upgrade_only(name) {
            continue;
        }
        let mut copy = match HeaderValue::from_bytes(value.as_bytes()) {
            Ok(v) => v,
            Err(_) => continue,
        };
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
    }
    out
}

/// `POST /api/feed`: the HTTP publish API. Same path as RabbitMQ events.
async fn publish(state: &Arc<HttpState>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let Some(hub) = state.feed_hub.clone() else {
        return text(StatusCode::NOT_FOUND, "No feed hub is configured.");
    };
    let Some(expected) = state.config.api_key.as_deref() else {
        return text(
            StatusCode::UNAUTHORIZED,
            "The publish API is disabled: no API key is configured.",
        );
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let matches = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |a, (x, y)| a | (x ^ y))
                == 0
    });
    if !matches {
        inc(&METRICS.auth_failures);
        return text(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a valid API key is required.",
        );
    }
    let limit = state.config.max_publish_body;
    let body = match read_body(req, limit).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let event = match crate::ingest::event::decode_recipients_body(&body) {
        Ok(e) => e,
        Err(e) => {
            inc(&METRICS.feed_rejected);
            return text(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    match crate::ingest::deliver(&hub, &event).await {
        Ok(()) => json(
            StatusCode::ACCEPTED,
            serde_json::to_vec(
                &serde_json::json!({ "accepted": true, "recipients": event.recipients.len() }),
            )
            .unwrap_or_default(),
        ),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Delivery failed: {e}"),
        ),
    }
}

/// `POST /dev/token?user=ID`: development identities (off unless enabled).
fn dev_token(state: &HttpState, req: &Request<Incoming>) -> Response<Body> {
    if !state.config.dev_identities {
        return text(
            StatusCode::NOT_FOUND,
            "Development identities are disabled.",
        );
    }
    if req.method() != Method::POST && req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let user = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.into_owned());
    let Some(user) = user.filter(|u| crate::ids::UserId::new(u).is_ok()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "Query parameter 'user' (a valid user id) is required.",
        );
    };
    match state.auth.issue(&user, 24 * 3600) {
        Ok(token) => json(
            StatusCode::OK,
            serde_json::to_vec(&serde_json::json!({ "user": user, "token": token }))
                .unwrap_or_default(),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_query_drops_only_the_access_token() {
        assert_eq!(kept_query(""), "");
        assert_eq!(kept_query("id=abc&x=1"), "id=abc&x=1");
        assert_eq!(kept_query("id=abc&access_token=eyJ.x.y&x=1"), "id=abc&x=1");
        assert_eq!(kept_query("access_token=eyJ.x.y"), "");
        assert_eq!(kept_query("access_token_hint=1"), "access_token_hint=1");
    }

    #[test]
    fn owned_headers_keep_what_the_hub_may_read_and_drop_the_upgrade_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("hub:5000"));
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_KEY, HeaderValue::from_static("k"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate"),
        );
        h.insert("x-custom", HeaderValue::from_static("v"));
        let mut auth = HeaderValue::from_static("Bearer t");
        auth.set_sensitive(true);
        h.insert(header::AUTHORIZATION, auth);
        let out = owned_headers(&h);
        assert_eq!(out.len(), 5);
        assert_eq!(out.get(header::HOST).unwrap(), "hub:5000");
        assert_eq!(out.get_all(header::COOKIE).iter().count(), 2);
        assert_eq!(out.get("x-custom").unwrap(), "v");
        assert!(out.get(header::AUTHORIZATION).unwrap().is_sensitive());
        for gone in [
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
        ] {
            assert!(out.get(&gone).is_none(), "{gone} kept");
        }
    }
}
