//! The HTTP face of the server, on hyper 1: routing, negotiate, the WebSocket upgrade,
//! health and metrics, the publish API, CORS. It parses requests and hands upgraded sockets
//! to `session::run`; it holds no hub state of its own.
//!
//! | route | what |
//! |---|---|
//! | `POST {hub}/negotiate` | [`negotiate`]: connection id and token, transports |
//! | `GET {hub}` + `Upgrade: websocket` | the WebSocket transport (with `id=`, or without negotiate: `skipNegotiation`) |
//! | `POST /api/feed` | publish a feed event (`Authorization: Bearer <api key>`) |
//! | `POST /dev/token?user=ID` | development mode only: a token for a demo user |
//! | `GET /healthz`, `/readyz`, `/metrics` | liveness, readiness (backplane and ingest connected), Prometheus text |
//! | `GET /` | the demo page |

pub mod negotiate;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::app::AppState;
use crate::auth::{token_from_request, AuthError, Identity};
use crate::connection::{RequestInfo, TransportKind};
use crate::hub::HubLifetime;
use crate::ids::ConnectionId;
use crate::metrics::{inc, METRICS};
use crate::session::{self, SessionParams};
use negotiate::{requested_version, AvailableTransport, NegotiateResponse, TokenError};

/// Response body type.
pub type Body = Full<Bytes>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

/// Entry point for every request.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut resp = route(&state, req).await;
    if let Some(origin) = origin {
        apply_cors(&state, &origin, &mut resp);
    }
    Ok(resp)
}

/// Adds CORS headers for an allowed origin: the origin echoed (never `*`, because the
/// SignalR client sends credentials), credentials allowed.
fn apply_cors(state: &AppState, origin: &HeaderValue, resp: &mut Response<Body>) {
    let Ok(o) = origin.to_str() else { return };
    let allowed = state
        .config
        .cors_origins
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(o));
    if !allowed {
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

async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
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
        "/" if req.method() == Method::GET => {
            let mut r = text(StatusCode::OK, state.demo_page.clone());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            return r;
        }
        _ => {}
    }
    if let Some(hub_path) = path.strip_suffix("/negotiate") {
        if let Some(hub) = state.hubs.get(hub_path) {
            return negotiate(state, hub, &req);
        }
    }
    if let Some(hub) = state.hubs.get(path.as_str()).cloned() {
        return connect(state, hub, req);
    }
    text(StatusCode::NOT_FOUND, "Not Found")
}

/// Authenticates a request for `hub`: 401 where a token is required and missing, and
/// wherever a token is present but invalid.
fn authenticate(
    state: &AppState,
    hub: &HubLifetime,
    req: &Request<Incoming>,
) -> Result<Identity, Box<Response<Body>>> {
    let auth_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let result = match token_from_request(req.uri().query(), auth_header) {
        Some(t) => state.auth.verify(&t),
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

fn negotiate(state: &AppState, hub: &HubLifetime, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let identity = match authenticate(state, hub, req) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let version = match requested_version(req.uri().query().unwrap_or("")) {
        Ok(v) => v,
        Err(error) => {
            let body =
                serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default();
            return json(StatusCode::OK, body);
        }
    };
    let user = identity.user_id.as_ref().map_or("", |u| u.as_str());
    let (connection_id, connection_token) = if version >= 1 {
        let (id, token) = state.tokens.issue(user);
        (id, Some(token))
    } else {
        (state.tokens.issue_v0(), None)
    };
    let body = NegotiateResponse {
        negotiate_version: version,
        connection_id: connection_id.to_string(),
        connection_token,
        available_transports: vec![AvailableTransport {
            transport: "WebSockets",
            transfer_formats: vec!["Text", "Binary"],
        }],
    };
    json(
        StatusCode::OK,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
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

fn connect(
    state: &Arc<AppState>,
    hub: Arc<HubLifetime>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let id_param = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "id")
        .map(|(_, v)| v.into_owned());
    if !is_websocket_upgrade(&req) {
        return match (req.method().clone(), id_param) {
            (_, None) => text(StatusCode::BAD_REQUEST, "Connection ID required"),
            (Method::POST, Some(_)) => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST requests are not allowed for WebSocket connections.",
            ),
            (Method::DELETE, Some(_)) => text(
                StatusCode::BAD_REQUEST,
                "Cannot terminate this connection using the DELETE endpoint.",
            ),
            (_, Some(_)) => text(
                StatusCode::BAD_REQUEST,
                "This server offers only the WebSockets transport; use a WebSocket upgrade.",
            ),
        };
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let identity = match authenticate(state, &hub, &req) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let user = identity.user_id.as_ref().map_or("", |u| u.as_str());
    let connection_id = match id_param {
        // skipNegotiation: no id; the connection gets a fresh one.
        None => ConnectionId::random(),
        Some(token) => match state.tokens.check(&token, user) {
            Ok(id) => id,
            Err(TokenError::Unknown) => {
                return text(StatusCode::NOT_FOUND, "No Connection with that ID")
            }
        },
    };
    if hub.registry().get(&connection_id).is_some() {
        return text(
            StatusCode::CONFLICT,
            "Connection already has an active transport.",
        );
    }
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "Missing Sec-WebSocket-Key");
    };
    if !version_ok {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "Unsupported WebSocket version",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let request_info = RequestInfo {
        query,
        headers: owned_headers(req.headers()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state2 = state.clone();
    let max = hub.definition().options.max_message_size;
    state.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (source, sink) = crate::transport::websocket::accept(TokioIo::new(upgraded), max).await;
        let ended_id = connection_id.clone();
        session::run(
            source,
            sink,
            SessionParams {
                hub,
                connection_id,
                identity,
                request: request_info,
                transport: TransportKind::WebSockets,
                shutdown: state2.shutdown.clone(),
            },
        )
        .await;
        state2.tokens.mark_ended(&ended_id);
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// A copy of `headers` that owns its bytes. hyper's header values are slices of the
/// connection's 8 KiB read buffer, so keeping the original map for the connection's lifetime
/// (the hub sees it as the connect request) would pin that whole buffer: 8 KiB per idle
/// connection, found with massif in the idle-density benchmark.
fn owned_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
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
async fn publish(state: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
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
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Body larger than {limit} bytes."),
                );
            }
            return text(
                StatusCode::BAD_REQUEST,
                format!("Could not read the body: {e}"),
            );
        }
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
fn dev_token(state: &AppState, req: &Request<Incoming>) -> Response<Body> {
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
