//! No sticky sessions for Server-Sent Events and Long Polling: a request for a connection
//! that another node owns is forwarded to the owner over the backplane, and the owner's
//! response streams back.
//!
//! A connection token names the node that negotiated it (signed, see `negotiate`). That node
//! owns the connection's Server-Sent Events or Long Polling transport, so every node can
//! tell from the token alone where a poll, a send, an event stream or a delete belongs, with
//! no directory and no race between a first poll and a send landing on different nodes.
//! (A WebSocket is one long-lived request: its connection lives where it lands, see
//! `transports::websocket`; a stateful resume that lands elsewhere uses `relay`.)
//!
//! One exchange, numbered by a random relay id:
//!
//! 1. The landing node has authenticated the request and checked the token for the user. It
//!    reads the body (bounded like any send) and publishes `Relay(Request { reply_node,
//!    method, uri, headers, body })` on the owner's node channel (`feedhub:node:<id>`).
//! 2. The owner answers `Opened { owner }` at once (so a dead owner is told from a long poll
//!    that simply waits: no answer within [`relay::OPEN_TIMEOUT`] is a 404, the connection is
//!    gone), then serves the request with the same handlers as a local one
//!    (`http::admit_forwarded`, which authenticates it again, and `http::serve_forwarded`).
//! 3. The owner publishes `Head { status, headers, body, end }`: a whole response (a poll's
//!    messages, a send's 200) is one message. A stream (Server-Sent Events) continues as
//!    numbered `Data` frames, each carrying every event ready at that moment (up to
//!    [`COALESCE`] bytes), and ends with `Close`.
//! 4. When the client goes away first, the landing node publishes `Close`; the owner drops
//!    the response, exactly as if its own client had gone (a poll ends, an event stream
//!    ends the connection).
//!
//! **Lost frames.** Redis pub/sub is at most once: whatever is published to a node while its
//! subscription is down (a Redis restart, a cut between the node and Redis) is gone, and a
//! lost `Head` may carry messages the owner already took from the connection's queue. So a
//! forwarded exchange never carries on past a possible loss; it fails fast and the
//! connection ends, and the client (`@microsoft/signalr` ends its connection on a 404 poll or
//! a broken event stream) starts over and recovers from history (`Recover`):
//!
//! - *Landing node*: when its backplane resubscribed after an outage, or its dispatch queue
//!   dropped messages of its node channel (`Router::frames_lost`, from the node's resync
//!   signal), every exchange in flight fails at once: a poll or a stream still waiting for
//!   its head answers 404 (a send or a delete 503), a stream ends. A `Data` gap, a stray
//!   frame or a full frame queue end the stream too.
//! - *Owner*: on the same signal, or when it cannot publish a head or a frame, a poll or a
//!   stream it serves for another node ends its connection (the next request for it gets
//!   404) and tells the landing node as soon as the backplane takes it (for up to 5 s): 404
//!   for a poll still waiting, `Close` for a stream.
//! - *A dead owner*: a request published to a node channel nobody listens on any more
//!   (Redis's `PUBLISH` reply is 0: the owner's process died, or it is away from Redis) is a
//!   404 at once, and every second the landing node probes the owners it waits on
//!   (`relay::watch_nodes`, one `PUBSUB NUMSUB`): a poll or a stream waiting on a gone owner
//!   fails within about a second.
//! - *Silence*: a forwarded poll waits at most [`FORWARDED_POLL_WAIT`] (5 s) on the owner
//!   instead of the hub's long-poll timeout, and a forwarded stream sends an SSE comment
//!   every [`FORWARD_KEEPALIVE`] (3 s) without events, so the landing node gives a poll or a
//!   stream up after [`FORWARD_SILENCE`] (10 s) without a frame (a dead owner): 404, or the
//!   stream ends. That is well inside the history a `Recover` reads from.
//!
//! A WebSocket that lands on another node than its token's starts its connection there
//! (a WebSocket is one long request; nothing to forward), but first *claims* it from the
//! token's node (`Relay(Claim)`, answered with a `Head`): from then on that node answers
//! the token's polls, event streams, sends and WebSockets as ASP.NET answers them on a
//! WebSocket connection (400, 405, 409) instead of starting a second connection with the
//! same id.
//!
//! Everything is bounded: [`MAX_FORWARDS`] exchanges in flight per node (503 beyond), the
//! request body by the hub's send limit, the request headers by [`MAX_HEADER_BYTES`] (431),
//! [`FORWARD_QUEUE`] response frames of at most about [`COALESCE`] bytes (2 MiB) queued on
//! the landing node (a slower client loses its event stream, as a slow consumer does), and
//! every wait has a timeout: [`relay::OPEN_TIMEOUT`] (3 s) for `Opened`,
//! [`FORWARD_SILENCE`] (10 s) for a poll's or stream's next frame, 60 s for the head of a
//! send (it may wait on a full inbound queue).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::relay::{self, NodeWatch, RelayIn, Router, OPEN_TIMEOUT};
use super::state::HttpState;
use super::{text, Body};
use crate::backplane::channel::node_channel;
use crate::backplane::{BackplaneMessage, BackplanePayload, Channel, RelayFrame, RelayKind};
use crate::connection::TransportKind;
use crate::ids::ConnectionId;
use crate::metrics::{inc, METRICS};

/// Forwarded exchanges in flight per node, each side counted.
pub const MAX_FORWARDS: usize = 10_000;

/// Largest total size of the request headers a node forwards.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Most body bytes the owner puts into one `Data` frame (a frame may exceed it by the last
/// event added).
pub const COALESCE: usize = 16 * 1024;

/// Response frames of one exchange queued on the landing node before its response ends.
pub const FORWARD_QUEUE: usize = 128;

/// How long the landing node waits for the response head of a send or a delete (a send may
/// wait on a full inbound queue of the session).
const SEND_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a forwarded poll waits on the owner for messages before it is answered 200
/// without any (the client polls again), instead of the hub's `long_poll_timeout`: a
/// forwarded poll that hears nothing for much longer then means a silent owner.
pub const FORWARDED_POLL_WAIT: Duration = Duration::from_secs(5);

/// Keep-alive interval of a forwarded event stream on the owner (an SSE comment when no
/// event went out for this long; at most the hub's `sse_keep_alive`).
pub const FORWARD_KEEPALIVE: Duration = Duration::from_secs(3);

/// The landing node gives a forwarded poll or stream up (404, or the stream ends) after this
/// long without a frame from the owner: [`FORWARDED_POLL_WAIT`] or two
/// [`FORWARD_KEEPALIVE`]s plus slack for a busy backplane. Well under the time a user's
/// history covers at high rates (100 events; about 25 s in the chaos soak), so the client
/// that starts over can still recover what it missed.
pub const FORWARD_SILENCE: Duration = Duration::from_secs(10);

/// How long an owner whose answer could not be published keeps trying to tell the landing
/// node (see `Owner::give_up`), and how often.
const GIVE_UP_NOTICE: Duration = Duration::from_secs(5);
const GIVE_UP_RETRY: Duration = Duration::from_millis(200);

/// Headers that describe one hop, not the request: never forwarded (RFC 9110 §7.6.1), nor
/// the length (the body travels whole).
pub(crate) fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// The end-to-end headers of `headers`, as the envelope carries them.
pub(crate) fn end_to_end(headers: &http::HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name))
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// Rebuilds a header map from the envelope's pairs (invalid ones are dropped).
pub(crate) fn header_map(pairs: Vec<(String, Bytes)>) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let Ok(value) = HeaderValue::from_maybe_shared(value) else {
            continue;
        };
        if !hop_by_hop(&name) {
            map.append(name, value);
        }
    }
    map
}

/// Counts one exchange in flight for as long as it lives.
struct InFlight(Arc<Router>);

impl InFlight {
    fn enter(router: &Arc<Router>) -> Option<InFlight> {
        let before = router.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(router.clone());
        (before < MAX_FORWARDS).then_some(guard)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn relay_message(router: &Router, relay: u64, kind: RelayKind) -> Arc<BackplaneMessage> {
    Arc::new(BackplaneMessage {
        origin: router.node_id().to_string(),
        payload: BackplanePayload::Relay(RelayFrame { relay, kind }),
    })
}

/// Landing side: the state of one exchange. Dropping it before the owner ended the response
/// tells the owner to drop it too.
struct Exchange {
    router: Arc<Router>,
    relay: u64,
    owner: Channel,
    ended: bool,
    _count: InFlight,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.router.relays.remove(&self.relay);
        self.router.pending_opens.remove(&self.relay);
        if !self.ended {
            relay::publish_spawned(
                self.router.backplane().clone(),
                self.owner.clone(),
                self.router.node_id().to_string(),
                RelayFrame {
                    relay: self.relay,
                    kind: RelayKind::Close,
                },
            );
        }
    }
}

fn unavailable(why: &str) -> Response<Body> {
    text(StatusCode::SERVICE_UNAVAILABLE, why)
}

/// The landing node's answer when a forwarded exchange failed after the owner took it (its
/// answer may be lost): a poll or an event stream gets 404, as ASP.NET answers for a
/// connection that is gone (`@microsoft/signalr` then ends the connection, and the app
/// starts over and recovers); a send or a delete gets 503 (it may or may not have been
/// processed).
fn lost(get: bool, why: &str) -> Response<Body> {
    inc(&METRICS.http_forwards_failed);
    tracing::debug!(why, "forwarded request failed");
    if get {
        super::transports::not_found()
    } else {
        unavailable(why)
    }
}

/// Forwards a Server-Sent Events or Long Polling request (`parts`, with its whole `body`)
/// to `owner`, the node that negotiated its connection, and returns the owner's response.
pub(crate) async fn forward(
    state: &Arc<HttpState>,
    owner: String,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response<Body> {
    let router = &state.router;
    let headers = end_to_end(&parts.headers);
    let header_bytes: usize = headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request header fields too large to forward.",
        );
    }
    let Some(count) = InFlight::enter(router) else {
        return unavailable("Too many forwarded requests; try again.");
    };
    // Taken before the request goes out: frames lost from now on fail this exchange.
    let outage = router.outage_token();
    let get = parts.method == Method::GET;
    let relay: u64 = rand::random();
    let (in_tx, mut inbound) = mpsc::channel(FORWARD_QUEUE);
    let (open_tx, open_rx) = oneshot::channel();
    router.relays.insert(relay, in_tx);
    router.pending_opens.insert(relay, open_tx);
    let mut exchange = Exchange {
        router: router.clone(),
        relay,
        owner: node_channel(&owner),
        ended: false,
        _count: count,
    };
    let uri = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let request = relay_message(
        router,
        relay,
        RelayKind::Request {
            reply_node: router.node_id().to_string(),
            method: parts.method.as_str().to_string(),
            uri,
            headers,
            body,
        },
    );
    router.forwarded.fetch_add(1, Ordering::Relaxed);
    inc(&METRICS.http_forwarded);
    // A dead owner fails what waits on it at once (`relay::watch_nodes`).
    let watch = router.watch(&owner);
    match router
        .backplane()
        .publish_reaching(&exchange.owner, request)
        .await
    {
        Err(e) => {
            exchange.ended = true;
            return unavailable(&format!("Cannot reach the connection's node: {e}"));
        }
        Ok(Some(0)) => {
            // Nobody listens on the owner's channel: it is gone, and so is the connection
            // (or it is away from the backplane, and would not have heard the request).
            exchange.ended = true;
            return super::transports::not_found();
        }
        Ok(_) => {}
    }
    // The owner acknowledges at once; silence means it is gone, and so is the connection.
    let opened = tokio::select! {
        o = tokio::time::timeout(OPEN_TIMEOUT, open_rx) => o,
        _ = outage.cancelled() => return lost(get, "backplane outage while opening"),
        _ = watch.gone().cancelled() => return lost(get, "the connection's node is gone"),
    };
    if !matches!(opened, Ok(Ok(ref o)) if !o.is_empty()) {
        exchange.ended = true;
        return super::transports::not_found();
    }
    // A poll is answered within FORWARDED_POLL_WAIT (a stream's head comes at once); a send
    // may wait on a full inbound queue of the session.
    let head_timeout = if get {
        FORWARD_SILENCE
    } else {
        SEND_HEAD_TIMEOUT
    };
    let head = tokio::select! {
        h = tokio::time::timeout(head_timeout, inbound.recv()) => h,
        _ = outage.cancelled() => return lost(get, "backplane outage while waiting for the answer"),
        _ = watch.gone().cancelled() => return lost(get, "the connection's node is gone"),
    };
    let head = match head {
        Ok(Some(RelayIn::Head {
            status,
            headers,
            body,
            end,
        })) => (status, headers, body, end),
        Ok(Some(RelayIn::Close)) => {
            exchange.ended = true;
            return lost(get, "the connection's node ended the request");
        }
        // A stray frame, or the queue was dropped (full).
        Ok(_) => return lost(get, "the connection's node's answer was lost"),
        Err(_) if get => return lost(get, "the connection's node did not answer in time"),
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                "The connection's node did not answer in time.",
            )
        }
    };
    let (status, headers, first, end) = head;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = if end {
        exchange.ended = true;
        drop(exchange);
        super::respond::full(first)
    } else {
        streamed(first, inbound, exchange, outage, watch)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = header_map(headers);
    r
}

/// The landing side's body of a streamed response: `first`, then the owner's `Data` frames
/// in order, until `Close`, a gap, [`FORWARD_SILENCE`] without a frame (the owner keeps a
/// forwarded stream alive every [`FORWARD_KEEPALIVE`]), or `outage` (frames may have been
/// lost). Every end but `Close` is abrupt for the client, whose connection then ends: it
/// starts over and recovers rather than carrying on past a hole.
fn streamed(
    first: Bytes,
    inbound: mpsc::Receiver<RelayIn>,
    exchange: Exchange,
    outage: CancellationToken,
    owner: NodeWatch,
) -> Body {
    struct St {
        first: Option<Bytes>,
        inbound: mpsc::Receiver<RelayIn>,
        exchange: Exchange,
        next_seq: u64,
        outage: CancellationToken,
        owner: NodeWatch,
    }
    let st = St {
        first: (!first.is_empty()).then_some(first),
        inbound,
        exchange,
        next_seq: 1,
        outage,
        owner,
    };
    let stream = futures_util::stream::unfold(Some(st), move |st| async move {
        let mut st = st?;
        if let Some(f) = st.first.take() {
            return Some((Ok::<_, Infallible>(Frame::data(f)), Some(st)));
        }
        let next = tokio::select! {
            n = tokio::time::timeout(FORWARD_SILENCE, st.inbound.recv()) => n,
            _ = st.outage.cancelled() => {
                inc(&METRICS.http_forwards_failed);
                tracing::debug!(relay = st.exchange.relay, "backplane outage; forwarded stream ended");
                return None;
            }
            _ = st.owner.gone().cancelled() => {
                inc(&METRICS.http_forwards_failed);
                tracing::debug!(relay = st.exchange.relay, "the owner is gone; forwarded stream ended");
                return None;
            }
        };
        match next {
            Ok(Some(RelayIn::Data(seq, data, _))) if seq == st.next_seq => {
                st.next_seq += 1;
                Some((Ok(Frame::data(data)), Some(st)))
            }
            Ok(Some(RelayIn::Close)) => {
                st.exchange.ended = true;
                None
            }
            // A gap, a stray frame, a full queue (the sender was dropped) or silence:
            // end the response; the exchange's drop tells the owner.
            other => {
                inc(&METRICS.http_forwards_failed);
                tracing::debug!(
                    relay = st.exchange.relay,
                    expected = st.next_seq,
                    silent = other.is_err(),
                    "forwarded stream broken; ended"
                );
                None
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Owner side: a forwarded request arrived on this node's channel. Never waits (called by
/// the backplane dispatch workers): the exchange runs in its own task.
pub(crate) fn accept(router: &Arc<Router>, state: Arc<HttpState>, relay: u64, kind: RelayKind) {
    let RelayKind::Request {
        reply_node,
        method,
        uri,
        headers,
        body,
    } = kind
    else {
        return;
    };
    // Registered before anything is answered, so the landing node's Close finds it.
    let (tx, rx) = mpsc::channel(4);
    router.relays.insert(relay, tx);
    let count = InFlight::enter(router);
    let outage = router.outage_token();
    let router = router.clone();
    state.tracker.clone().spawn(async move {
        // `count` (the in-flight slot) is held until this task ends.
        let mut owner = Owner {
            router: router.clone(),
            state: state.clone(),
            relay,
            reply: node_channel(&reply_node),
            cancel: rx,
            seq: 0,
            outage,
            get: method == "GET",
            connection: None,
            head_sent: false,
        };
        // Acknowledged at once, whatever the answer: silence is how the landing node tells
        // a dead owner from a poll that waits.
        let opened = RelayKind::Opened {
            owner: router.node_id().to_string(),
        };
        if !owner.send(opened).await {
            return;
        }
        let response = match (&count, build_parts(&method, &uri, headers)) {
            (None, _) => unavailable("Too many forwarded requests; try again."),
            (Some(_), None) => text(StatusCode::BAD_REQUEST, "Malformed forwarded request."),
            (Some(_), Some(parts)) => {
                router.served.fetch_add(1, Ordering::Relaxed);
                match owner.serve(parts, body).await {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        owner.respond(response).await;
    });
}

pub(crate) fn build_parts(
    method: &str,
    uri: &str,
    headers: Vec<(String, Bytes)>,
) -> Option<http::request::Parts> {
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let uri: http::Uri = uri.parse().ok()?;
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers = header_map(headers);
    Some(parts)
}

/// Owner side of one exchange.
struct Owner {
    router: Arc<Router>,
    state: Arc<HttpState>,
    relay: u64,
    reply: Channel,
    /// `Close` from the landing node (its client went away).
    cancel: mpsc::Receiver<RelayIn>,
    seq: u64,
    /// Fires when this node's relay frames may have been lost (`Router::frames_lost`).
    outage: CancellationToken,
    /// A poll or an event stream (it carries messages to the client), not a send or a
    /// delete.
    get: bool,
    /// The connection a poll or stream serves, once the request was admitted.
    connection: Option<ConnectionId>,
    /// The response head went out.
    head_sent: bool,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.router.relays.remove(&self.relay);
    }
}

impl Owner {
    /// Publishes to the landing node; false when the backplane refused.
    async fn send(&self, kind: RelayKind) -> bool {
        let msg = relay_message(&self.router, self.relay, kind);
        match self.router.backplane().publish(&self.reply, msg).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(relay = self.relay, error = %e, "forwarded response lost");
                false
            }
        }
    }

    /// Admits and serves the request; `None` when the landing node cancelled it, or the
    /// exchange failed meanwhile (then the landing node has been told).
    async fn serve(&mut self, parts: http::request::Parts, body: Bytes) -> Option<Response<Body>> {
        let state = self.state.clone();
        let get = self.get;
        let admitted = tokio::select! {
            a = super::admit_forwarded(&state, &parts) => a,
            _ = self.cancel.recv() => return None,
        };
        let admitted = match admitted {
            Ok(a) => a,
            Err(r) => return Some(r),
        };
        if get {
            self.connection = admitted.connection(&state);
        }
        tokio::select! {
            r = super::serve_forwarded(&state, admitted, &parts, body) => Some(r),
            _ = self.cancel.recv() => None,
            _ = self.outage.cancelled(), if get => {
                // Whether the landing node still waits is unknown (its Close may be lost).
                self.give_up("backplane outage").await;
                None
            }
        }
    }

    /// Streams `response` back: the head with every body byte ready now, then (for a
    /// stream) `Data` frames until the body ends or the landing node cancels. A frame that
    /// cannot be published, or an outage of this node's relay frames meanwhile, ends the
    /// exchange with [`Owner::give_up`].
    async fn respond(&mut self, response: Response<Body>) {
        let (parts, mut body) = response.into_parts();
        let (first, mut end) = ready_bytes(&mut body);
        let head = RelayKind::Head {
            status: parts.status.as_u16(),
            headers: end_to_end(&parts.headers),
            body: first,
            end,
        };
        if !self.send(head).await {
            drop(body);
            self.give_up("the response head could not be published")
                .await;
            return;
        }
        self.head_sent = true;
        while !end {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = self.cancel.recv() => return,
                _ = self.outage.cancelled() => {
                    drop(body);
                    self.give_up("backplane outage").await;
                    return;
                }
            };
            let mut chunk = BytesMut::new();
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        chunk.extend_from_slice(&data);
                    }
                    let (more, ended) = ready_bytes(&mut body);
                    chunk.extend_from_slice(&more);
                    end = ended;
                }
                _ => end = true,
            }
            if !chunk.is_empty() {
                self.seq += 1;
                let data = RelayKind::Data {
                    seq: self.seq,
                    data: chunk.freeze(),
                    binary: false,
                };
                if !self.send(data).await {
                    drop(body);
                    self.give_up("a stream frame could not be published").await;
                    return;
                }
            }
        }
        self.send(RelayKind::Close).await;
    }

    /// The exchange failed while its answer may have been lost on the way: ends the
    /// connection of a poll or a stream (the messages a lost poll answer carried are gone
    /// from its queue; the client must start over and recover rather than poll on past
    /// them), then tells the landing node, as soon as the backplane takes it (for up to
    /// [`GIVE_UP_NOTICE`]): a poll or stream that has no head yet gets a 404 (a send 503),
    /// a stream ends. Without the notice the landing node gives up by itself after
    /// [`FORWARD_SILENCE`].
    async fn give_up(&mut self, why: &str) {
        if let (true, Some(id)) = (self.get, self.connection.as_ref()) {
            inc(&METRICS.forwarded_connections_ended);
            tracing::debug!(relay = self.relay, conn_id = %id, why, "forwarded exchange failed; ending its connection");
            super::transports::end_connection(&self.state, id, why);
        }
        let notice = if self.head_sent {
            RelayKind::Close
        } else {
            let (status, body): (u16, &'static str) = if self.get {
                (404, "No Connection with that ID")
            } else {
                (
                    503,
                    "The connection's node could not answer; the request may have been processed.",
                )
            };
            RelayKind::Head {
                status,
                headers: vec![(
                    "content-type".to_string(),
                    Bytes::from_static(b"text/plain"),
                )],
                body: Bytes::from_static(body.as_bytes()),
                end: true,
            }
        };
        let deadline = tokio::time::Instant::now() + GIVE_UP_NOTICE;
        loop {
            if self.send(notice.clone()).await {
                return;
            }
            if tokio::time::Instant::now() + GIVE_UP_RETRY > deadline {
                return;
            }
            tokio::select! {
                // The landing node's client is gone: nobody waits for the notice.
                _ = self.cancel.recv() => return,
                _ = tokio::time::sleep(GIVE_UP_RETRY) => {}
            }
        }
    }
}

/// Takes the body bytes that are ready without waiting (up to about [`COALESCE`]); `true`
/// when the body ended.
fn ready_bytes(body: &mut Body) -> (Bytes, bool) {
    let mut out = BytesMut::new();
    while out.len() < COALESCE {
        match body.frame().now_or_never() {
            None => return (out.freeze(), false),
            Some(None) => return (out.freeze(), true),
            Some(Some(Ok(f))) => {
                if let Ok(data) = f.into_data() {
                    out.extend_from_slice(&data);
                }
            }
            Some(Some(Err(never))) => match never {},
        }
    }
    (out.freeze(), false)
}

/// A WebSocket is about to start `connection` on this node, but its token names `owner`:
/// asks the owner, which refuses the token's other transports from now on (a poll or an
/// event stream there would otherwise start a second connection with the same id).
/// `Err(response)`: the owner refused (409/400/404 as ASP.NET answers a transport mix-up or
/// an ended connection) or did not answer within [`OPEN_TIMEOUT`] (404: the connection's
/// node is gone; the client negotiates again).
pub(crate) async fn claim(
    state: &Arc<HttpState>,
    owner: &str,
    connection: ConnectionId,
) -> Result<(), Response<Body>> {
    let router = &state.router;
    let relay: u64 = rand::random();
    let (in_tx, mut inbound) = mpsc::channel(1);
    router.relays.insert(relay, in_tx);
    let msg = relay_message(
        router,
        relay,
        RelayKind::Claim {
            connection,
            reply_node: router.node_id().to_string(),
        },
    );
    let answer = match router
        .backplane()
        .publish_reaching(&node_channel(owner), msg)
        .await
    {
        // Nobody listens on the token's node's channel: it is gone (404 at once).
        Ok(Some(0)) | Err(_) => None,
        Ok(_) => tokio::time::timeout(OPEN_TIMEOUT, inbound.recv())
            .await
            .ok()
            .flatten(),
    };
    router.relays.remove(&relay);
    match answer {
        Some(RelayIn::Head { status: 200, .. }) => Ok(()),
        Some(RelayIn::Head { status, body, .. }) => Err(text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT),
            String::from_utf8_lossy(&body).into_owned(),
        )),
        _ => Err(super::transports::not_found()),
    }
}

/// The token's node side of [`claim`]: grants it unless the connection runs here, waits
/// here for a stateful resume, ended, or was claimed already. Never waits.
pub(crate) fn answer_claim(
    router: &Arc<Router>,
    state: &HttpState,
    relay: u64,
    connection: &ConnectionId,
    reply_node: &str,
) {
    const ACTIVE: (u16, &str) = (409, "Connection already has an active transport.");
    let local = state.connections.get(connection);
    let (status, reason) = match local.as_ref().and_then(|c| c.transport()) {
        Some(TransportKind::WebSockets) => ACTIVE,
        Some(_) => (400, "Cannot change transports mid-connection"),
        // Sends arrived here before any transport (kept for the first poll or stream).
        None if local.is_some() => (400, "Cannot change transports mid-connection"),
        None if router.resumable.contains_key(connection) => ACTIVE,
        None if state.tokens.has_ended(connection) => (404, "No Connection with that ID"),
        None if !state.tokens.claim(connection) => ACTIVE,
        None => (200, ""),
    };
    relay::publish_spawned(
        router.backplane().clone(),
        node_channel(reply_node),
        router.node_id().to_string(),
        RelayFrame {
            relay,
            kind: RelayKind::Head {
                status,
                headers: Vec::new(),
                body: Bytes::from_static(reason.as_bytes()),
                end: true,
            },
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        h.append("accept", HeaderValue::from_static("text/event-stream"));
        let pairs = end_to_end(&h);
        let names: Vec<&str> = pairs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["authorization", "accept"]);
        let back = header_map(pairs);
        assert_eq!(back.get("accept").unwrap(), "text/event-stream");
        assert!(back.get("connection").is_none());
        let odd = header_map(vec![
            ("bad name".into(), Bytes::from_static(b"x")),
            ("x-ok".into(), Bytes::from_static(b"bad\nvalue")),
            ("x-fine".into(), Bytes::from_static(b"1")),
        ]);
        assert_eq!(odd.len(), 1);
    }

    #[test]
    fn ready_bytes_takes_a_whole_body_and_stops_at_a_pending_stream() {
        let mut whole = super::super::respond::full(Bytes::from_static(b"abc"));
        assert_eq!(ready_bytes(&mut whole), (Bytes::from_static(b"abc"), true));
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
        tx.try_send(Ok(Frame::data(Bytes::from_static(b":\r\n"))))
            .unwrap();
        let frames =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
            );
        let mut stream = StreamBody::new(frames).boxed_unsync();
        assert_eq!(
            ready_bytes(&mut stream),
            (Bytes::from_static(b":\r\n"), false)
        );
        drop(tx);
        assert_eq!(ready_bytes(&mut stream), (Bytes::new(), true));
    }

    #[test]
    fn malformed_forwarded_requests_are_refused() {
        assert!(build_parts("GET", "/hub?id=x", vec![]).is_some());
        assert!(build_parts("G ET", "/hub", vec![]).is_none());
        assert!(build_parts("GET", "not a uri at all \n", vec![]).is_none());
    }
}
