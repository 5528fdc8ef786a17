//! The HTTP transports on the hub path, as ASP.NET's `HttpConnectionDispatcher` serves them:
//!
//! | request | what |
//! |---|---|
//! | `GET {hub}?id=T` + `Upgrade: websocket` | WebSockets (also without `id`: `skipNegotiation`) |
//! | `GET {hub}?id=T` + `Accept: text/event-stream` | Server-Sent Events: one streaming response |
//! | `GET {hub}?id=T` | Long Polling: the first poll answers 200 at once, later ones wait |
//! | `POST {hub}?id=T` | client → server bytes for SSE and Long Polling (200) |
//! | `DELETE {hub}?id=T` | ends a Long Polling connection (202) |
//!
//! Each transport only feeds and drains the session's [`Link`]; the session runs as its own
//! task ([`session::spawn`]). Status codes and texts follow ASP.NET: unknown or ended token
//! 404 "No Connection with that ID", missing `id` 400 "Connection ID required", another
//! transport on a bound token 400 "Cannot change transports mid-connection", a transport the
//! hub does not allow 404 "`<T>` transport not supported by this end point type", a second
//! WebSocket or SSE stream 409, POST on a WebSocket connection 405, DELETE on anything but
//! Long Polling 400. Concurrent POSTs queue behind a per-connection lock (as in ASP.NET;
//! never 409). A POST body is bounded (413 beyond it).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;

use super::connections::HttpConnection;
use super::negotiate::TokenError;
use super::relay::{self, ResumeSender};
use super::state::HttpState;
use super::{text, Body};
use crate::auth::Identity;
use crate::connection::{RequestInfo, TransportKind};
use crate::hub::HubLifetime;
use crate::ids::ConnectionId;
use crate::session::{self, SessionParams};
use crate::transport::link::{Link, WireItem};
use crate::transport::{FrameSink as _, FrameSource as _};

/// What an `id=` value refers to on this node.
pub(crate) enum Lookup {
    /// A connection bound to a transport.
    Live(Arc<HttpConnection>),
    /// A connection that has received POSTs but no transport request yet.
    Pending(Arc<HttpConnection>),
    /// A valid token whose connection has not started yet (`v0`: negotiate v0 id).
    New(ConnectionId, bool),
    /// Nothing: 404.
    Unknown,
    /// A token of this node whose connection a WebSocket on another node started
    /// (`forward::claim`): the requests here get what they would on a WebSocket connection.
    Elsewhere,
}

/// Resolves `token` for a request of `user`.
pub(crate) fn lookup(state: &HttpState, token: &str, user: &str) -> Lookup {
    match find(state, token, user) {
        Lookup::Live(c) if c.transport().is_none() => Lookup::Pending(c),
        Lookup::New(id, _) if state.tokens.is_claimed(&id) => Lookup::Elsewhere,
        other => other,
    }
}

fn find(state: &HttpState, token: &str, user: &str) -> Lookup {
    if let Some(id) = state.tokens.id_of(token, user) {
        if let Some(c) = state.connections.get(&id) {
            if !c.v0 {
                return Lookup::Live(c);
            }
        }
        return match state.tokens.check(token, user) {
            Ok(id) => Lookup::New(id, false),
            Err(TokenError::Unknown) => Lookup::Unknown,
        };
    }
    // Negotiate v0: the secret is the connection id itself.
    if let Ok(id) = ConnectionId::new(token) {
        if let Some(c) = state.connections.get(&id) {
            if c.v0 && c.user == user {
                return Lookup::Live(c);
            }
            return Lookup::Unknown;
        }
    }
    match state.tokens.check(token, user) {
        Ok(id) => Lookup::New(id, true),
        Err(TokenError::Unknown) => Lookup::Unknown,
    }
}

pub(crate) fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "No Connection with that ID")
}

pub(crate) fn not_supported(kind: TransportKind) -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        format!(
            "{} transport not supported by this end point type",
            kind.name()
        ),
    )
}

pub(crate) fn cannot_change() -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        "Cannot change transports mid-connection",
    )
}

fn already_active() -> Response<Body> {
    text(
        StatusCode::CONFLICT,
        "Connection already has an active transport.",
    )
}

/// Largest POST body: a few hub messages' worth (the client batches what it queued), never
/// unbounded. The same bound as a WebSocket message.
pub(crate) fn max_post_body(hub: &HubLifetime) -> usize {
    hub.definition()
        .options
        .max_message_size
        .saturating_mul(4)
        .max(64 * 1024)
}

fn no_cache(resp: &mut Response<Body>) {
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::EXPIRES,
        HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"),
    );
}

/// Everything needed to start a session for a request.
pub(crate) struct Start {
    pub hub: Arc<HubLifetime>,
    pub identity: Identity,
    pub request: RequestInfo,
    pub kind: TransportKind,
    /// Stateful reconnect negotiated (WebSockets): the session gets a resume slot.
    pub stateful: bool,
}

/// Registers a connection that has no transport yet (its link is ready, its session not
/// started). `Err` if the id is already registered (a concurrent start with the same token).
pub(crate) fn register(
    state: &Arc<HttpState>,
    id: ConnectionId,
    v0: bool,
    user: &str,
    disconnect_timeout: Duration,
) -> Result<Arc<HttpConnection>, Arc<HttpConnection>> {
    let (link, source) = Link::new();
    let conn = Arc::new(HttpConnection::new(id, user.to_string(), v0, link, source));
    state.connections.insert(conn.clone())?;
    // Ends the connection if no transport binds, or a Long Polling client stops polling.
    spawn_watchdog(state.clone(), conn.clone(), disconnect_timeout);
    Ok(conn)
}

/// Binds `conn` to a transport and starts its session task. `Err(response)` if it already
/// has one.
pub(crate) fn bind(
    state: &Arc<HttpState>,
    conn: &Arc<HttpConnection>,
    start: Start,
) -> Result<(), Box<Response<Body>>> {
    let Some(source) = conn.bind(start.kind) else {
        return Err(Box::new(if conn.transport() == Some(start.kind) {
            already_active()
        } else {
            cannot_change()
        }));
    };
    let state2 = state.clone();
    let ended_id = conn.id.clone();
    // A stateful connection's resume slot: where a returning client's new transport (a
    // local WebSocket or a relay from another node) is handed to the session.
    let resume = if start.stateful {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        match state.router.resumable.entry(conn.id.clone()) {
            dashmap::Entry::Occupied(_) => return Err(Box::new(already_active())),
            dashmap::Entry::Vacant(v) => {
                v.insert(tx);
            }
        }
        Some(rx)
    } else {
        None
    };
    session::spawn(
        SessionParams {
            hub: start.hub,
            connection_id: conn.id.clone(),
            identity: Box::new(start.identity),
            request: start.request,
            transport: start.kind,
            shutdown: state.shutdown.clone(),
            stateful: start.stateful,
        },
        &conn.link,
        source,
        &state.tracker,
        resume,
        move || {
            // Refuse the token first, then forget the slot: a resume racing with the end
            // gets a 404 rather than a fresh connection under the same id.
            state2.tokens.mark_ended(&ended_id);
            state2.router.resumable.remove(&ended_id);
        },
    );
    Ok(())
}

/// Resolves the connection a transport request (GET) starts or continues: `Ok((conn,
/// started))` where `started` says the session was started by this request.
fn open(
    state: &Arc<HttpState>,
    token: Option<&str>,
    start: Start,
) -> Result<(Arc<HttpConnection>, bool), Box<Response<Body>>> {
    let user = start
        .identity
        .user_id
        .as_ref()
        .map_or(String::new(), |u| u.as_str().to_string());
    let options = start.hub.definition().options.clone();
    let found = match token {
        None => None,
        Some(token) => match lookup(state, token, &user) {
            Lookup::Unknown => return Err(Box::new(not_found())),
            Lookup::Elsewhere if start.kind == TransportKind::WebSockets => {
                return Err(Box::new(already_active()))
            }
            Lookup::Elsewhere => return Err(Box::new(cannot_change())),
            Lookup::Live(c) => {
                if c.transport() == Some(start.kind) {
                    return Ok((c, false));
                }
                return Err(Box::new(cannot_change()));
            }
            other => Some(other),
        },
    };
    if !options.transports.allows(start.kind) {
        return Err(Box::new(not_supported(start.kind)));
    }
    let conn = match found {
        // skipNegotiation (WebSockets only): a fresh connection.
        None => register(
            state,
            ConnectionId::random(),
            false,
            &user,
            options.disconnect_timeout,
        ),
        Some(Lookup::Pending(c)) => Ok(c),
        Some(Lookup::New(id, v0)) => register(state, id, v0, &user, options.disconnect_timeout),
        Some(Lookup::Live(_) | Lookup::Unknown | Lookup::Elsewhere) => {
            return Err(Box::new(not_found()))
        }
    }
    .map_err(|_| Box::new(already_active()))?;
    bind(state, &conn, start)?;
    Ok((conn, true))
}

/// Ends a connection's transport for good and forgets it.
fn finish(state: &HttpState, conn: &Arc<HttpConnection>, reason: Option<String>) {
    conn.link.transport_gone(reason);
    conn.link.wire.end(1000, "");
    state.connections.remove(conn);
}

/// The connection `token` names for `user` on this node, if it is genuine: a v1 token's
/// id, or a negotiate v0 id.
pub(crate) fn connection_of(state: &HttpState, token: &str, user: &str) -> Option<ConnectionId> {
    state
        .tokens
        .id_of(token, user)
        .or_else(|| ConnectionId::new(token).ok())
}

/// Ends connection `id` of this node for good, if it is here: its token is refused from now
/// on (404), its transport ends and its session closes with `reason`. For a connection
/// whose poll answer or stream frames may have been lost on the way to the client
/// (`forward`): carrying on would leave the client a silent gap, ending it makes the
/// client start over and recover.
pub(crate) fn end_connection(state: &HttpState, id: &ConnectionId, reason: &str) {
    // Refused first: a poll racing with the end gets a 404, not a fresh connection.
    state.tokens.mark_ended(id);
    if let Some(conn) = state.connections.get(id) {
        tracing::debug!(conn_id = %id, reason, "connection ended");
        finish(state, &conn, Some(reason.to_string()));
    }
}

/// `GET` with `Accept: text/event-stream`: opens the SSE stream, with a comment every
/// `keep_alive` without an event.
pub(crate) fn server_sent_events(
    state: &Arc<HttpState>,
    hub: Arc<HubLifetime>,
    token: &str,
    identity: Identity,
    request: RequestInfo,
    keep_alive: Duration,
) -> Response<Body> {
    let start = Start {
        hub,
        identity,
        request,
        kind: TransportKind::ServerSentEvents,
        stateful: false,
    };
    let conn = match open(state, Some(token), start) {
        Ok((c, true)) => c,
        // A second stream for a connection that has one.
        Ok((_, false)) => return already_active(),
        Err(r) => return *r,
    };
    let guard = SseGuard {
        state: state.clone(),
        conn,
    };
    // The first write is a comment, flushed at once: browsers fire `open` only on data.
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b":\r\n")))
    });
    let events = futures_util::stream::unfold(Some(guard), move |guard| async move {
        let guard = guard?;
        let wire = guard.conn.link.wire.clone();
        let item = tokio::time::timeout(keep_alive, wire.next()).await;
        match item {
            Err(_) => Some((Ok(Frame::data(Bytes::from_static(b":\r\n"))), Some(guard))),
            Ok(WireItem::Unit(data, _)) => Some((Ok(Frame::data(sse_event(&data))), Some(guard))),
            Ok(WireItem::End(..)) => {
                drop(guard);
                None
            }
        }
    });
    use futures_util::StreamExt;
    let body = StreamBody::new(first.chain(events)).boxed_unsync();
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Ends the SSE connection when its response stream is dropped (the client went away) or
/// finished (the session ended).
struct SseGuard {
    state: Arc<HttpState>,
    conn: Arc<HttpConnection>,
}

impl Drop for SseGuard {
    fn drop(&mut self) {
        finish(&self.state, &self.conn, None);
    }
}

/// One SSE event (`ServerSentEventsMessageFormatter`): the payload split at each LF (a CR
/// before it dropped), each piece a `data: ` line ending in CRLF, then an empty line.
pub fn sse_event(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 16);
    for line in payload.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// `GET` without upgrade or event-stream: a long poll, answered 200 without messages
/// after `poll_timeout` (the client polls again).
pub(crate) async fn long_poll(
    state: &Arc<HttpState>,
    hub: Arc<HubLifetime>,
    token: &str,
    identity: Identity,
    request: RequestInfo,
    poll_timeout: Duration,
) -> Response<Body> {
    let start = Start {
        hub,
        identity,
        request,
        kind: TransportKind::LongPolling,
        stateful: false,
    };
    let conn = match open(state, Some(token), start) {
        Ok((c, false)) => c,
        Ok((_, true)) => {
            // First poll: the connection started; answer at once.
            let mut r = text(StatusCode::OK, "");
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            no_cache(&mut r);
            return r;
        }
        Err(mut r) => {
            no_cache(&mut r);
            return *r;
        }
    };
    let ticket = conn.begin_poll();
    let _end = PollEnd {
        conn: conn.clone(),
        number: ticket.number,
    };
    let wire = conn.link.wire.clone();
    let mut r = tokio::select! {
        biased;
        data = wire.take_all() => match data {
            Some(body) => {
                let mut r = Response::new(http_body_util::Full::new(body).boxed_unsync());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                r
            }
            None => {
                // The connection is over: 204, and forget it.
                finish(state, &conn, None);
                text(StatusCode::NO_CONTENT, "")
            }
        },
        _ = ticket.cancelled.cancelled() => text(StatusCode::NO_CONTENT, ""),
        _ = tokio::time::sleep(poll_timeout) => text(StatusCode::OK, ""),
    };
    no_cache(&mut r);
    r
}

/// Ends a poll when its request finishes or is dropped.
struct PollEnd {
    conn: Arc<HttpConnection>,
    number: u64,
}

impl Drop for PollEnd {
    fn drop(&mut self) {
        self.conn.end_poll(self.number);
    }
}

/// Ends a connection no transport has bound to within `timeout` (an unused negotiation that
/// only POSTed), or a Long Polling connection that has gone `timeout` without a poll.
fn spawn_watchdog(state: Arc<HttpState>, conn: Arc<HttpConnection>, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let gone = conn.link.gone_token();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = gone.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            match conn.transport() {
                None | Some(TransportKind::LongPolling) => {}
                // Persistent transports end with their request or socket.
                Some(_) => return,
            }
            if conn.idle_for().is_some_and(|idle| idle >= timeout) {
                tracing::debug!(conn_id = %conn.id, "no poll within the disconnect timeout");
                finish(&state, &conn, None);
                return;
            }
        }
    });
}

fn post_on_websocket() -> Response<Body> {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        "POST requests are not allowed for WebSocket connections.",
    )
}

/// A send's body: still to be read, or read already (a forwarded send).
pub(crate) enum SendBody {
    /// The request's body.
    Incoming(Incoming),
    /// The whole body.
    Ready(Bytes),
}

/// `POST {hub}?id=T`: client → server bytes for SSE and Long Polling.
pub(crate) async fn send(
    state: &Arc<HttpState>,
    hub: &HubLifetime,
    token: &str,
    user: &str,
    body: SendBody,
    body_timeout: Duration,
) -> Response<Body> {
    let conn = match lookup(state, token, user) {
        Lookup::Live(c) | Lookup::Pending(c) => c,
        // A send before the first transport request (signalrcore sends its handshake before
        // its first poll): ASP.NET buffers it in the negotiated connection, so do we.
        Lookup::New(id, v0) => {
            let timeout = hub.definition().options.disconnect_timeout;
            match register(state, id, v0, user, timeout) {
                Ok(c) => c,
                Err(existing) => existing,
            }
        }
        Lookup::Unknown => return not_found(),
        Lookup::Elsewhere => return post_on_websocket(),
    };
    if conn.transport() == Some(TransportKind::WebSockets) {
        return post_on_websocket();
    }
    let limit = max_post_body(hub);
    // Sends of one connection are applied in arrival order, one at a time.
    let _lock = conn.send_lock.lock().await;
    let body = match body {
        SendBody::Incoming(b) => {
            match super::respond::read_incoming(b, limit, body_timeout).await {
                Ok(b) => b,
                Err(r) => return r,
            }
        }
        SendBody::Ready(b) if b.len() > limit => return super::respond::body_too_large(limit),
        SendBody::Ready(b) => b,
    };
    if body.is_empty() {
        return text(StatusCode::OK, "");
    }
    match conn.link.feed(body).await {
        Ok(()) => text(StatusCode::OK, ""),
        Err(_) => not_found(),
    }
}

/// `DELETE {hub}?id=T`: ends a Long Polling connection (202; a waiting poll answers 204).
pub(crate) fn delete(state: &HttpState, token: &str, user: &str) -> Response<Body> {
    let conn = match lookup(state, token, user) {
        Lookup::Live(c) | Lookup::Pending(c) => c,
        Lookup::Unknown | Lookup::New(..) => return not_found(),
        Lookup::Elsewhere => return delete_refused(),
    };
    if conn.transport() != Some(TransportKind::LongPolling) {
        return delete_refused();
    }
    finish(state, &conn, None);
    text(StatusCode::ACCEPTED, "")
}

fn delete_refused() -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        "Cannot terminate this connection using the DELETE endpoint.",
    )
}

/// A WebSocket is about to start the connection of `token` here: when the token names
/// another node, claim the connection from it first (`forward::claim`).
async fn claim_if_remote(
    state: &Arc<HttpState>,
    token: &str,
    user: &str,
) -> Result<(), Response<Body>> {
    let Some(owner) = state.tokens.remote_owner(token, user) else {
        return Ok(());
    };
    match lookup(state, token, user) {
        Lookup::New(id, _) => super::forward::claim(state, &owner, id).await,
        // Running here already, or unknown: `open` answers.
        _ => Ok(()),
    }
}

/// What a WebSocket request with a stateful-reconnect token is for.
enum StatefulPlan {
    /// A new socket for a stateful connection living on this node.
    ResumeLocal(ResumeSender),
    /// The connection is not here: a first connect (the client sends a handshake) or a
    /// resume of a connection on another node (it sends `Sequence`). The first frame decides.
    FreshOrRelay(ConnectionId),
    /// An expired token whose connection another node owns: relay.
    Relay(relay::Landing),
}

/// Checks the upgrade headers: the `Sec-WebSocket-Key`, or the error response.
fn upgrade_key(req: &Request<Incoming>) -> Result<HeaderValue, Box<Response<Body>>> {
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "Missing Sec-WebSocket-Key",
        )));
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
        return Err(Box::new(r));
    }
    Ok(key)
}

fn switching_protocols(key: &HeaderValue) -> Response<Body> {
    let mut r = Response::new(super::respond::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(
        &tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
    ) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Stateful reconnect on WebSockets (see `session::replay` and [`relay`]): `None` when the
/// token is not a stateful one (the plain WebSocket path applies).
async fn stateful_plan(
    state: &Arc<HttpState>,
    hub: &HubLifetime,
    token: &str,
    user: &str,
) -> Option<Result<StatefulPlan, Response<Body>>> {
    if !hub.definition().options.stateful_reconnect {
        return None;
    }
    let info = state.tokens.inspect(token, user).ok()?;
    if !info.stateful {
        return None;
    }
    // A live stateful connection of this node: hand the new socket over (an expired connect
    // deadline does not matter once the connection exists).
    if let Some(tx) = state.router.resumable.get(&info.id).map(|t| t.clone()) {
        return Some(Ok(StatefulPlan::ResumeLocal(tx)));
    }
    if hub.registry().get(&info.id).is_some() || state.connections.get(&info.id).is_some() {
        return Some(Err(already_active()));
    }
    if info.expired {
        return Some(
            match relay::Landing::open(&state.router, &info.id, hub.scheme().connection(&info.id))
                .await
            {
                Some(l) => Ok(StatefulPlan::Relay(l)),
                None => Err(not_found()),
            },
        );
    }
    Some(Ok(StatefulPlan::FreshOrRelay(info.id)))
}

/// `GET` + `Upgrade: websocket`: validates, starts the session, answers 101 and pumps the
/// upgraded socket in a task. Stateful-reconnect tokens may instead resume a connection of
/// this node, or be relayed to the node that owns it.
pub(crate) async fn websocket(
    state: &Arc<HttpState>,
    hub: Arc<HubLifetime>,
    token: Option<&str>,
    identity: Identity,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let key = match upgrade_key(&req) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let user = identity
        .user_id
        .as_ref()
        .map_or("", |u| u.as_str())
        .to_string();
    let plan = match token {
        Some(t) if hub.definition().options.transports.websockets => {
            match stateful_plan(state, &hub, t, &user).await {
                Some(Ok(p)) => Some(p),
                Some(Err(r)) => return r,
                None => None,
            }
        }
        _ => None,
    };
    let request = RequestInfo {
        query: super::kept_query(req.uri().query().unwrap_or("")),
        headers: super::owned_headers(req.headers()),
    };
    let max = hub.definition().options.max_message_size;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state2 = state.clone();
    match plan {
        Some(StatefulPlan::ResumeLocal(tx)) => {
            if tx.is_closed() {
                // The session ended between the lookup and now.
                return not_found();
            }
            state.tracker.spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let (link, source) = Link::new();
                // Bounded wait: the session takes it at once unless it is ending; a link it
                // never takes ends, which closes the socket and the client gives up.
                let handed =
                    tokio::time::timeout(Duration::from_secs(5), tx.send((source, link.sink())))
                        .await;
                if matches!(handed, Ok(Ok(()))) {
                    crate::transport::websocket::pump(TokioIo::new(upgraded), max, link).await;
                }
            });
            return switching_protocols(&key);
        }
        Some(StatefulPlan::Relay(landing)) => {
            state.tracker.spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let (src, snk) =
                    crate::transport::websocket::accept(TokioIo::new(upgraded), max).await;
                landing.run(src, snk, None).await;
            });
            return switching_protocols(&key);
        }
        Some(StatefulPlan::FreshOrRelay(id)) => {
            let timeout = hub.definition().options.handshake_timeout;
            let token = token.unwrap_or_default().to_string();
            state.tracker.spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let (mut src, mut snk) =
                    crate::transport::websocket::accept(TokioIo::new(upgraded), max).await;
                // A handshake starts the connection here; anything else is a stateful client
                // resuming a connection that lives on another node.
                let Ok(Some(Ok(first))) = tokio::time::timeout(timeout, src.recv()).await else {
                    return;
                };
                let mut probe = BytesMut::from(&first[..]);
                let is_handshake = matches!(
                    crate::protocol::handshake::parse_request(&mut probe, max),
                    Ok(Some(_))
                );
                if !is_handshake {
                    match relay::Landing::open(&state2.router, &id, hub.scheme().connection(&id))
                        .await
                    {
                        Some(landing) => landing.run(src, snk, Some(first)).await,
                        None => snk.close(1008, "No Connection with that ID").await,
                    }
                    return;
                }
                if let Err(r) = claim_if_remote(&state2, &token, &user).await {
                    let reason = r.status().canonical_reason().unwrap_or("refused");
                    snk.close(1008, reason).await;
                    return;
                }
                let start = Start {
                    hub,
                    identity,
                    request,
                    kind: TransportKind::WebSockets,
                    stateful: true,
                };
                let conn = match open(&state2, Some(&token), start) {
                    Ok((c, true)) => c,
                    _ => {
                        snk.close(1008, "Connection already has an active transport.")
                            .await;
                        return;
                    }
                };
                if conn.link.feed(first).await.is_ok() {
                    crate::transport::websocket::pump_split(src, snk, conn.link.clone()).await;
                }
                // The session outlives its socket (it waits for a resume); only the table
                // entry of this first transport goes.
                finish(&state2, &conn, None);
            });
            return switching_protocols(&key);
        }
        None => {}
    }
    if let Some(t) = token {
        if let Err(r) = claim_if_remote(state, t, &user).await {
            return r;
        }
    }
    let start = Start {
        hub,
        identity,
        request,
        kind: TransportKind::WebSockets,
        stateful: false,
    };
    let conn = match open(state, token, start) {
        Ok((c, true)) => c,
        // Two WebSockets on one (non-stateful) connection: 409.
        Ok((_, false)) => return already_active(),
        Err(r) => return *r,
    };
    state.tracker.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                crate::transport::websocket::pump(TokioIo::new(upgraded), max, conn.link.clone())
                    .await;
                finish(&state2, &conn, None);
            }
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                finish(&state2, &conn, Some(format!("upgrade failed: {e}")));
            }
        }
    });
    switching_protocols(&key)
}

/// Whether the request's `Accept` header lists `text/event-stream`.
pub(crate) fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_lines_and_drop_cr() {
        assert_eq!(&sse_event(b"{}\x1e")[..], b"data: {}\x1e\r\n\r\n");
        assert_eq!(
            &sse_event(b"a\r\nb\nc")[..],
            b"data: a\r\ndata: b\r\ndata: c\r\n\r\n"
        );
        assert_eq!(&sse_event(b"x\n")[..], b"data: x\r\ndata: \r\n\r\n");
    }

    #[test]
    fn accept_header_detection() {
        let r = Request::builder()
            .header("accept", "text/html, Text/Event-Stream;q=0.9")
            .body(())
            .unwrap();
        assert!(accepts_event_stream(r.headers()));
        let r = Request::builder().header("accept", "*/*").body(()).unwrap();
        assert!(!accepts_event_stream(r.headers()));
    }
}
