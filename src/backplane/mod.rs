//! Cross-node delivery: one [`Backplane`] trait, several implementations ([`memory`] for one
//! process, [`redis`] for scale-out, with its wire format in [`envelope`] and [`resp`]), and the [`Inbox`] through which a backplane hands inbound messages to
//! the node without ever waiting.
//!
//! Local fan-out is *not* here: `hub/` delivers to local connections itself and uses the
//! backplane only to reach other nodes (Centrifuge's Node/Broker split, not ASP.NET's
//! "a backplane is a whole lifetime manager").
//!
//! Data path: `hub::lifetime` → [`Backplane::publish`] → (network) → the backplane's reader →
//! [`Inbox::deliver`] → a bounded dispatch worker (same channel, same worker: per-channel order)
//! → `hub::lifetime` delivers to the local connections.

pub mod channel;
pub mod envelope;
pub mod memory;
pub mod redis;
pub mod resp;

use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use channel::Channel;

use crate::ids::{ConnectionId, GroupName};
use crate::protocol::Value;

/// A message travelling between nodes.
#[derive(Debug, Clone)]
pub struct BackplaneMessage {
    /// The publishing node's id, so a node can skip messages it already delivered locally.
    /// Empty for messages from foreign publishers (`PUBLISH feed-42 {json}`).
    pub origin: String,
    /// What to do.
    pub payload: BackplanePayload,
}

/// The payload kinds.
#[derive(Debug, Clone)]
pub enum BackplanePayload {
    /// Invoke `target(arguments)` on the channel's local connections, except `exclude`.
    Invocation {
        /// Client method name.
        target: String,
        /// Arguments, in their original encoding.
        arguments: Vec<Value>,
        /// Connections that must not receive it (`Others`, `AllExcept`, `GroupExcept`).
        exclude: Vec<ConnectionId>,
    },
    /// Plain JSON published by a foreign service on a user channel: becomes the hub's
    /// default feed invocation (`FeedUpdated(<json>)`).
    RawJson(Bytes),
    /// Add or remove a connection owned by the receiving node to or from a group.
    Group {
        /// The connection (on the node that owns it).
        connection: ConnectionId,
        /// The group.
        group: GroupName,
        /// true: add; false: remove.
        add: bool,
    },
    /// Close a connection owned by the receiving node.
    CloseConnection {
        /// The connection.
        connection: ConnectionId,
        /// Close error text.
        error: Option<String>,
    },
    /// A transport relayed between the node a client's request landed on and the node that
    /// owns the connection (no sticky sessions; see `http::relay`).
    Relay(RelayFrame),
}

/// One message of a relayed transport.
#[derive(Debug, Clone)]
pub struct RelayFrame {
    /// The relay's id (chosen by the node the client is connected to).
    pub relay: u64,
    /// What it carries.
    pub kind: RelayKind,
}

/// Relay message kinds.
#[derive(Debug, Clone)]
pub enum RelayKind {
    /// Client node → owner, on the connection's channel: attach a transport to
    /// `connection`; answer on `reply_node`'s node channel.
    Open {
        /// The connection.
        connection: ConnectionId,
        /// The node the client is connected to.
        reply_node: String,
    },
    /// Owner → client node: the answer to `Open` (`owner`: the owner's node id, or empty
    /// when the connection is not resumable there).
    Opened {
        /// The owning node, empty when refused.
        owner: String,
    },
    /// Bytes, in order (`seq` starts at 1 in each direction; a gap closes the relay).
    Data {
        /// Sequence number.
        seq: u64,
        /// Transport bytes.
        data: Bytes,
        /// Binary (MessagePack) rather than text: the WebSocket frame type to use.
        binary: bool,
    },
    /// Either side ended the relay.
    Close,
    /// Client node → owner, on the owner's node channel: an HTTP request (a Server-Sent
    /// Events or Long Polling request for a connection the owner negotiated) to serve as if
    /// it had arrived there; the answer goes to `reply_node` (see `http::forward`).
    Request {
        /// The node the client is connected to.
        reply_node: String,
        /// HTTP method.
        method: String,
        /// Path and query.
        uri: String,
        /// End-to-end request headers, as (name, value) pairs.
        headers: Vec<(String, Bytes)>,
        /// The whole request body.
        body: Bytes,
    },
    /// Client node → the node a token names, on that node's channel: a WebSocket is about
    /// to start `connection` on the client node; the named node records it (so that node
    /// refuses other transports for it) and answers with a `Head` (200: go ahead; otherwise
    /// the status and text to answer the WebSocket request with).
    Claim {
        /// The connection.
        connection: ConnectionId,
        /// The node the client is connected to.
        reply_node: String,
    },
    /// Owner → client node: the response head of a forwarded request, with the first body
    /// bytes; `end`: that was the whole body (otherwise `Data` frames follow, then `Close`).
    Head {
        /// HTTP status.
        status: u16,
        /// Response headers.
        headers: Vec<(String, Bytes)>,
        /// The start of the body.
        body: Bytes,
        /// No more body follows.
        end: bool,
    },
}

/// Backplane failures.
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    /// Not connected right now (the caller may retry or nack).
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    /// The message could not be encoded.
    #[error("backplane encode error: {0}")]
    Encode(String),
}

/// Cross-node publish/subscribe. Implementations must be cheap to share (`Arc<dyn Backplane>`)
/// and must hand inbound messages to the [`Inbox`] they were built with, never awaiting a
/// client socket.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Short name for logs and metrics (`memory`, `redis`).
    fn name(&self) -> &'static str;

    /// This node's id (the `origin` of what it publishes).
    fn node_id(&self) -> &str;

    /// Publishes to every node subscribed to `channel` (this one included, if subscribed).
    async fn publish(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<(), BackplaneError>;

    /// Subscribes this node to `channels`. Returns once the subscription is active, so
    /// anything published afterwards arrives.
    async fn subscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError>;

    /// Unsubscribes this node from `channels`.
    async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError>;

    /// Whether the backplane is connected (`/readyz`).
    fn is_ready(&self) -> bool;
}

/// One inbound message for this node.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The channel it arrived on.
    pub channel: Channel,
    /// The message.
    pub message: Arc<BackplaneMessage>,
}

/// The non-blocking hand-off from a backplane reader to the dispatch workers.
///
/// Messages of one channel always go to the same worker, so per-user order is kept. A full
/// worker queue drops the message and counts it (`feedhub_backplane_dropped_total`): the
/// backplane reader must never wait for a slow worker, or one stalled connection would stall
/// every user on the node (Centrifuge's redis_pubsub_shared.go makes the same choice).
#[derive(Clone, Debug)]
pub struct Inbox {
    workers: Arc<[mpsc::Sender<Delivery>]>,
    dropped: Arc<AtomicU64>,
}

impl Inbox {
    /// An inbox with `workers` queues of `capacity` messages each, and their receivers.
    pub fn new(workers: usize, capacity: usize) -> (Inbox, Vec<mpsc::Receiver<Delivery>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..workers.max(1))
            .map(|_| mpsc::channel(capacity.max(1)))
            .unzip();
        (
            Inbox {
                workers: txs.into(),
                dropped: Arc::new(AtomicU64::new(0)),
            },
            rxs,
        )
    }

    /// Hands a message to its channel's worker without waiting.
    pub fn deliver(&self, delivery: Delivery) {
        crate::metrics::inc(&crate::metrics::METRICS.backplane_received);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        delivery.channel.as_str().hash(&mut h);
        let n = self.workers.len();
        let idx = (h.finish() % n as u64) as usize;
        let Some(worker) = self.workers.get(idx) else {
            return;
        };
        if worker.try_send(delivery).is_err() {
            crate::metrics::inc(&crate::metrics::METRICS.backplane_dropped);
            let dropped = self
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Rate-limited: the first drop and then every 1000th.
            if dropped % 1000 == 0 {
                tracing::warn!(
                    dropped = dropped + 1,
                    "backplane dispatch queue full; message dropped"
                );
            }
        }
    }
}
