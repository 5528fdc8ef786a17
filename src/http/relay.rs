//! No sticky sessions: a transport request that lands on a node which does not own the
//! connection is relayed to the owner over the backplane.
//!
//! Ownership needs no directory: the node that hosts a connection's session is subscribed to
//! that connection's backplane channel (`<hub prefix>:conn:<id>`, see `backplane::channel`),
//! so a message published there reaches exactly the owner, wherever the connection started.
//!
//! A stateful-reconnect client that comes back on another node (a round-robin proxy, a
//! restarted load balancer) is handled like this:
//!
//! 1. The landing node checks the token (signed: any node can), picks a random relay id,
//!    registers it, and publishes `Relay(Open { connection, reply_node })` on the
//!    connection's channel.
//! 2. The owner's [`Router`] (fed by the backplane dispatch workers, never waiting) finds
//!    the connection's resume slot and hands the session a fresh link, served by a relay
//!    pump instead of a WebSocket pump; it answers `Opened { owner }`
//!    on the landing node's channel (`feedhub:node:<id>`), or `Opened { owner: "" }` when
//!    the connection is not there.
//! 3. The landing node answers the upgrade only after a positive answer: no answer within
//!    [`OPEN_TIMEOUT`] (owner dead, connection gone) or a refusal is a 404, and the client
//!    starts over (a new negotiate), as it would against ASP.NET. When the backplane says
//!    the `Open` reached nobody (Redis's `PUBLISH` reply is 0: no owner), the 404 comes at
//!    once.
//! 4. Then bytes flow as `Relay(Data { seq, .. })` on the two node channels. Each direction
//!    is numbered; a gap (a full dispatch queue dropped one) or a full relay queue closes the
//!    relay, which the stateful session survives (the client resumes again) rather than
//!    carrying on with a hole. Either side's end sends `Relay(Close)`.
//!
//! Bounds: [`RELAY_QUEUE`] frames per relay direction; pending opens are removed on timeout.
//!
//! Liveness: while this node waits on other nodes (the owners of its relays and forwarded
//! exchanges), [`watch_nodes`] asks the backplane every [`NODE_PROBE`] how many subscribers
//! their node channels have (one `PUBSUB NUMSUB`); a node with none is gone (its process
//! died and Redis dropped its subscriptions, or it is away from Redis and its answers would
//! be lost), and whatever waits on it fails at once instead of after its silence limit.
//!
//! The [`Router`] also carries the other cross-node exchanges of the HTTP layer, which share
//! its relay ids, its node channel and its dispatch: forwarded Server-Sent Events and Long
//! Polling requests (`Request` → `Opened`, `Head`, `Data`…, `Close`) and WebSocket claims
//! (`Claim` → `Head`), both in `http::forward`, and the signal that fails the forwarded
//! exchanges in flight when relay frames may have been lost ([`Router::frames_lost`], called
//! by the node's resync worker after a backplane outage).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backplane::channel::node_channel;
use crate::backplane::{
    Backplane, BackplaneMessage, BackplanePayload, Channel, RelayFrame, RelayKind,
};
use crate::ids::ConnectionId;
use crate::protocol::TransferFormat;
use crate::transport::link::{Link, LinkSink, LinkSource, WireItem};
use crate::transport::websocket::{WsSink, WsSource};
use crate::transport::{FrameSink, FrameSource, TransportError};

/// Frames queued per relay direction before the relay is closed.
pub const RELAY_QUEUE: usize = 1024;

/// How long the landing node waits for the owner to accept a relay.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

type Upg = TokioIo<Upgraded>;

/// Hands a returning client's transport (a fresh link's halves) to its stateful session.
pub type ResumeSender = mpsc::Sender<(LinkSource, LinkSink)>;

/// Inbound events of one relay.
#[derive(Debug)]
pub(crate) enum RelayIn {
    Data(u64, Bytes, bool),
    Close,
    /// A forwarded request's response head (`http::forward`).
    Head {
        status: u16,
        headers: Vec<(String, Bytes)>,
        body: Bytes,
        end: bool,
    },
}

/// Relay state of this node.
pub struct Router {
    node_id: String,
    backplane: Arc<dyn Backplane>,
    /// Resume slots of this node's stateful connections.
    pub(crate) resumable: Arc<DashMap<ConnectionId, ResumeSender>>,
    pub(crate) relays: DashMap<u64, mpsc::Sender<RelayIn>>,
    pub(crate) pending_opens: DashMap<u64, oneshot::Sender<String>>,
    /// Requests this node forwarded to their owner, and forwarded requests it served.
    pub(crate) forwarded: std::sync::atomic::AtomicU64,
    pub(crate) served: std::sync::atomic::AtomicU64,
    /// Forwarded exchanges in flight on this node (either side), bounded by
    /// `forward::MAX_FORWARDS`.
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
    /// Cancelled, and replaced, when relay frames to or from this node may have been lost
    /// ([`Router::frames_lost`]): every forwarded exchange in flight holds the token of its
    /// start and fails when it fires.
    outage: std::sync::Mutex<CancellationToken>,
    /// Nodes this node waits on (owners of forwarded exchanges and relays in flight), probed
    /// for liveness by [`watch_nodes`]: node id → the token fired when it is gone.
    watched: DashMap<String, Watched>,
    next_watch: std::sync::atomic::AtomicU64,
}

/// One watched node.
#[derive(Debug)]
struct Watched {
    gone: CancellationToken,
    waiters: usize,
    /// Tells this entry from a later one of the same node (after it was found gone).
    generation: u64,
}

/// How often the nodes this node waits on are probed (one `PUBSUB NUMSUB` for all of them,
/// only while something is in flight).
pub const NODE_PROBE: Duration = Duration::from_secs(1);

/// Registers interest in a node's liveness while it lives (see [`Router::watch`]).
pub(crate) struct NodeWatch {
    router: Arc<Router>,
    node: String,
    generation: u64,
    gone: CancellationToken,
}

impl NodeWatch {
    /// Fires when the node was found gone (nobody subscribed to its node channel).
    pub(crate) fn gone(&self) -> &CancellationToken {
        &self.gone
    }
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.router.watched.entry(self.node.clone()) {
            if e.get().generation == self.generation {
                e.get_mut().waiters -= 1;
                if e.get().waiters == 0 {
                    e.remove();
                }
            }
        }
    }
}

/// Probes, every [`NODE_PROBE`], the nodes `router` waits on: a node nobody is subscribed
/// for any more (its process died: Redis dropped its subscriptions with its socket) fails
/// the exchanges and relays waiting on it at once, instead of after their silence limit.
/// Ends with `shutdown` or the router. Backplanes that cannot count subscribers (`None`)
/// are not probed.
pub async fn watch_nodes(router: std::sync::Weak<Router>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(NODE_PROBE) => {}
        }
        let Some(router) = router.upgrade() else {
            return;
        };
        let nodes: Vec<String> = router.watched.iter().map(|e| e.key().clone()).collect();
        if nodes.is_empty() {
            continue;
        }
        let channels: Vec<Channel> = nodes.iter().map(|n| node_channel(n)).collect();
        let counts = match router.backplane.subscribers(&channels).await {
            Ok(Some(counts)) => counts,
            // Unknown, or the backplane is away (its own outage fails what may be lost).
            Ok(None) | Err(_) => continue,
        };
        for (node, n) in nodes.iter().zip(counts) {
            if n == 0 {
                if let Some((_, w)) = router.watched.remove(node) {
                    tracing::debug!(node = %node, "node gone (no subscription); failing what waits on it");
                    w.gone.cancel();
                }
            }
        }
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn publish_spawned(
    backplane: Arc<dyn Backplane>,
    channel: Channel,
    origin: String,
    frame: RelayFrame,
) {
    tokio::spawn(async move {
        let msg = Arc::new(BackplaneMessage {
            origin,
            payload: BackplanePayload::Relay(frame),
        });
        if let Err(e) = backplane.publish(&channel, msg).await {
            tracing::debug!(error = %e, "relay publish failed");
        }
    });
}

impl Router {
    /// The router of node `node_id`.
    pub fn new(node_id: String, backplane: Arc<dyn Backplane>) -> Arc<Router> {
        Arc::new(Router {
            node_id,
            backplane,
            resumable: Arc::new(DashMap::new()),
            relays: DashMap::new(),
            pending_opens: DashMap::new(),
            forwarded: Default::default(),
            served: Default::default(),
            in_flight: Default::default(),
            outage: std::sync::Mutex::new(CancellationToken::new()),
            watched: DashMap::new(),
            next_watch: Default::default(),
        })
    }

    /// Watches node `node` (an owner this node is about to wait on) until the returned
    /// guard drops; its token fires when [`watch_nodes`] finds the node gone.
    pub(crate) fn watch(self: &Arc<Router>, node: &str) -> NodeWatch {
        let mut e = self
            .watched
            .entry(node.to_string())
            .or_insert_with(|| Watched {
                gone: CancellationToken::new(),
                waiters: 0,
                generation: self
                    .next_watch
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            });
        e.waiters += 1;
        NodeWatch {
            router: self.clone(),
            node: node.to_string(),
            generation: e.generation,
            gone: e.gone.clone(),
        }
    }

    /// The token an exchange starting now holds: it fires when relay frames may have been
    /// lost after this point.
    pub(crate) fn outage_token(&self) -> CancellationToken {
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Relay frames to or from this node may have been lost: the backplane lost and
    /// regained its subscriptions (Redis pub/sub does not keep what was published
    /// meanwhile), or the node's dispatch queue dropped messages of its node channel. Every
    /// forwarded exchange in flight fails at once (`http::forward`): a waiting poll answers
    /// 404, a stream ends, and a connection whose poll or stream this node serves for
    /// another node ends, so the client starts over and recovers instead of carrying on
    /// past a hole. Exchanges that start afterwards are not affected.
    pub fn frames_lost(&self) {
        let old = {
            let mut g = self.outage.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *g, CancellationToken::new())
        };
        old.cancel();
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The backplane relays travel on.
    pub(crate) fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// Requests this node forwarded to the node owning their connection.
    pub fn forwarded_requests(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forwarded requests this node served as the owner.
    pub fn served_requests(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's channel (subscribe it at start).
    pub fn channel(&self) -> Channel {
        node_channel(&self.node_id)
    }

    fn sink(self: &Arc<Router>, relay: u64, to_node: &str) -> RemoteSink {
        RemoteSink {
            router: self.clone(),
            channel: node_channel(to_node),
            relay,
            seq: 0,
            closed: false,
        }
    }

    fn source(self: &Arc<Router>, relay: u64, rx: mpsc::Receiver<RelayIn>) -> RemoteSource {
        RemoteSource {
            router: self.clone(),
            relay,
            rx,
            next_seq: 1,
        }
    }

    /// Handles a relay message from the backplane. Never waits. Forwarded requests and
    /// WebSocket claims (`Request`, `Claim`) are not the router's: `http::on_relay_frame`
    /// serves them with the HTTP state, and hands everything else here.
    pub fn on_frame(self: &Arc<Router>, frame: &RelayFrame) {
        let relay = frame.relay;
        match &frame.kind {
            RelayKind::Open {
                connection,
                reply_node,
            } => {
                let slot = self.resumable.get(connection).map(|t| t.clone());
                let mut owner = String::new();
                if let Some(tx) = slot {
                    let (in_tx, in_rx) = mpsc::channel(RELAY_QUEUE);
                    self.relays.insert(relay, in_tx);
                    let (link, source) = Link::new();
                    match tx.try_send((source, link.sink())) {
                        Ok(()) => {
                            owner = self.node_id.clone();
                            tokio::spawn(owner_pump(
                                link,
                                self.source(relay, in_rx),
                                self.sink(relay, reply_node),
                            ));
                        }
                        Err(_) => {
                            self.relays.remove(&relay);
                        }
                    }
                }
                publish_spawned(
                    self.backplane.clone(),
                    node_channel(reply_node),
                    self.node_id.clone(),
                    RelayFrame {
                        relay,
                        kind: RelayKind::Opened { owner },
                    },
                );
            }
            RelayKind::Opened { owner } => {
                if let Some((_, tx)) = self.pending_opens.remove(&relay) {
                    let _ = tx.send(owner.clone());
                }
            }
            RelayKind::Data { seq, data, binary } => {
                let full = match self.relays.get(&relay) {
                    Some(tx) => tx
                        .try_send(RelayIn::Data(*seq, data.clone(), *binary))
                        .is_err(),
                    None => false,
                };
                if full {
                    // Closing beats a hole in the stream: drop the sender, the reader ends.
                    tracing::debug!(relay, "relay queue full; closing the relay");
                    self.relays.remove(&relay);
                }
            }
            RelayKind::Close => {
                if let Some((_, tx)) = self.relays.remove(&relay) {
                    let _ = tx.try_send(RelayIn::Close);
                }
            }
            RelayKind::Request { .. } | RelayKind::Claim { .. } => {
                tracing::debug!(
                    relay,
                    "forwarded request or claim given to the router; ignored"
                );
            }
            RelayKind::Head {
                status,
                headers,
                body,
                end,
            } => {
                let head = RelayIn::Head {
                    status: *status,
                    headers: headers.clone(),
                    body: body.clone(),
                    end: *end,
                };
                if let Some(tx) = self.relays.get(&relay).map(|t| t.clone()) {
                    if tx.try_send(head).is_err() {
                        self.relays.remove(&relay);
                    }
                }
            }
        }
    }

    /// Landing side: asks the owner of `connection` (found through `conn_channel`) to take
    /// a relayed transport. `Some((relay, owner, inbound))` when it accepted.
    async fn open(
        self: &Arc<Router>,
        connection: &ConnectionId,
        conn_channel: Channel,
    ) -> Option<(u64, String, mpsc::Receiver<RelayIn>)> {
        let relay: u64 = rand::random();
        let (open_tx, open_rx) = oneshot::channel();
        self.pending_opens.insert(relay, open_tx);
        let (in_tx, in_rx) = mpsc::channel(RELAY_QUEUE);
        self.relays.insert(relay, in_tx);
        let msg = Arc::new(BackplaneMessage {
            origin: self.node_id.clone(),
            payload: BackplanePayload::Relay(RelayFrame {
                relay,
                kind: RelayKind::Open {
                    connection: connection.clone(),
                    reply_node: self.node_id.clone(),
                },
            }),
        });
        let answer = match self.backplane.publish_reaching(&conn_channel, msg).await {
            // Nobody holds the connection's channel: no owner (gone, or the connection
            // ended); answer at once rather than after the open timeout.
            Ok(Some(0)) | Err(_) => None,
            Ok(_) => tokio::time::timeout(OPEN_TIMEOUT, open_rx)
                .await
                .ok()
                .and_then(Result::ok),
        };
        self.pending_opens.remove(&relay);
        match answer {
            Some(owner) if !owner.is_empty() => Some((relay, owner, in_rx)),
            _ => {
                self.relays.remove(&relay);
                None
            }
        }
    }
}

/// Owner side of a relay: serves the session's link from the relayed bytes, as the
/// WebSocket pump serves it from a socket.
async fn owner_pump(link: Link, mut from_client: RemoteSource, mut to_client: RemoteSink) {
    let reader = async {
        while let Some((bytes, _)) = from_client.recv_with_format().await {
            if link.feed(bytes).await.is_err() {
                return None;
            }
        }
        Some("relay closed".to_string())
    };
    let writer = async {
        loop {
            match link.wire.next().await {
                WireItem::Unit(data, format) => {
                    if let Err(e) = to_client.send(data, format).await {
                        return Some(e.to_string());
                    }
                }
                WireItem::End(code, reason) => {
                    to_client.close(code, &reason).await;
                    return None;
                }
            }
        }
    };
    let gone = link.gone_token();
    let reason = tokio::select! {
        r = reader => r,
        r = writer => r,
        _ = gone.cancelled() => None,
    };
    to_client.close(1000, "").await;
    link.transport_gone(reason);
}

/// Landing side of a relay, prepared before the upgrade is answered.
pub struct Landing {
    router: Arc<Router>,
    relay: u64,
    owner: String,
    inbound: mpsc::Receiver<RelayIn>,
}

impl Landing {
    /// Asks the owner; `None` (answer 404) when nobody owns a resumable `connection`.
    pub async fn open(
        router: &Arc<Router>,
        connection: &ConnectionId,
        conn_channel: Channel,
    ) -> Option<Landing> {
        let (relay, owner, inbound) = router.open(connection, conn_channel).await?;
        crate::metrics::inc(&crate::metrics::METRICS.relays_opened);
        Some(Landing {
            router: router.clone(),
            relay,
            owner,
            inbound,
        })
    }

    /// Pumps bytes between the client's WebSocket and the owner until either side ends.
    /// `first`: a frame already read from the client (forwarded first).
    pub async fn run(
        self,
        mut ws_src: WsSource<Upg>,
        mut ws_sink: WsSink<Upg>,
        first: Option<Bytes>,
    ) {
        let mut to_owner = self.router.sink(self.relay, &self.owner);
        let mut from_owner = self.router.source(self.relay, self.inbound);
        // A dead owner closes the socket at once: the client resumes again, which then
        // fails fast (404), and it starts over and recovers, instead of waiting for its
        // server timeout on a relay nobody feeds.
        let owner = self.router.watch(&self.owner);
        if let Some(f) = first {
            if to_owner.send(f, TransferFormat::Binary).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = owner.gone().cancelled() => {
                    ws_sink.close(1011, "").await;
                    break;
                }
                m = ws_src.recv() => match m {
                    Some(Ok(bytes)) => {
                        if to_owner.send(bytes, TransferFormat::Binary).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
                m = from_owner.recv_with_format() => match m {
                    Some((bytes, format)) => {
                        let sent = tokio::time::timeout(Duration::from_secs(10), ws_sink.send(bytes, format)).await;
                        if !matches!(sent, Ok(Ok(()))) {
                            break;
                        }
                    }
                    None => {
                        ws_sink.close(1000, "").await;
                        break;
                    }
                },
            }
        }
        to_owner.close(1000, "").await;
    }
}

/// The receiving half of a relayed transport.
pub struct RemoteSource {
    router: Arc<Router>,
    relay: u64,
    rx: mpsc::Receiver<RelayIn>,
    next_seq: u64,
}

impl RemoteSource {
    async fn recv_with_format(&mut self) -> Option<(Bytes, TransferFormat)> {
        match self.rx.recv().await {
            None | Some(RelayIn::Close | RelayIn::Head { .. }) => None,
            Some(RelayIn::Data(seq, data, binary)) => {
                if seq != self.next_seq {
                    tracing::debug!(
                        relay = self.relay,
                        seq,
                        expected = self.next_seq,
                        "relay gap; closing"
                    );
                    return None;
                }
                self.next_seq += 1;
                let format = if binary {
                    TransferFormat::Binary
                } else {
                    TransferFormat::Text
                };
                Some((data, format))
            }
        }
    }
}

impl Drop for RemoteSource {
    fn drop(&mut self) {
        self.router.relays.remove(&self.relay);
    }
}

impl FrameSource for RemoteSource {
    async fn recv(&mut self) -> Option<Result<Bytes, TransportError>> {
        match self.recv_with_format().await {
            Some((b, _)) => Some(Ok(b)),
            None => Some(Err(TransportError::Closed("relay closed".into()))),
        }
    }
}

/// The sending half of a relayed transport.
pub struct RemoteSink {
    router: Arc<Router>,
    channel: Channel,
    relay: u64,
    seq: u64,
    closed: bool,
}

impl RemoteSink {
    fn message(&self, kind: RelayKind) -> Arc<BackplaneMessage> {
        Arc::new(BackplaneMessage {
            origin: self.router.node_id.clone(),
            payload: BackplanePayload::Relay(RelayFrame {
                relay: self.relay,
                kind,
            }),
        })
    }
}

impl Drop for RemoteSink {
    fn drop(&mut self) {
        if !self.closed {
            self.closed = true;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let backplane = self.router.backplane.clone();
                let channel = self.channel.clone();
                let msg = self.message(RelayKind::Close);
                rt.spawn(async move {
                    let _ = backplane.publish(&channel, msg).await;
                });
            }
        }
    }
}

impl FrameSink for RemoteSink {
    async fn send(&mut self, data: Bytes, format: TransferFormat) -> Result<(), TransportError> {
        if self.closed {
            return Err(TransportError::Closed("relay closed".into()));
        }
        self.seq += 1;
        let msg = self.message(RelayKind::Data {
            seq: self.seq,
            data,
            binary: format == TransferFormat::Binary,
        });
        self.router
            .backplane
            .publish(&self.channel, msg)
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))
    }

    async fn close(&mut self, _code: u16, _reason: &str) {
        if !self.closed {
            self.closed = true;
            let msg = self.message(RelayKind::Close);
            let _ = self.router.backplane.publish(&self.channel, msg).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::memory::{MemoryBackplane, MemoryBus};
    use crate::backplane::Inbox;

    #[test]
    fn lost_frames_fail_the_exchanges_started_before_only() {
        let (inbox, _rx) = Inbox::new(1, 1);
        let backplane = Arc::new(MemoryBackplane::new(MemoryBus::new(), "n1", inbox));
        let router = Router::new("n1".into(), backplane);
        let (a, b) = (router.outage_token(), router.outage_token());
        assert!(!a.is_cancelled());
        router.frames_lost();
        assert!(
            a.is_cancelled() && b.is_cancelled(),
            "every exchange in flight"
        );
        let later = router.outage_token();
        assert!(
            !later.is_cancelled(),
            "an exchange starting afterwards is not affected"
        );
        router.frames_lost();
        assert!(later.is_cancelled());
    }
}
