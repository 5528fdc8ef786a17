//! Cross-node delivery: one [`Backplane`] trait, several implementations ([`memory`] for one
//! process, [`redis`] for scale-out, with its wire format in [`envelope`] and [`resp`]), and the [`Inbox`] through which a backplane hands inbound messages to
//! the node without ever waiting. [`aspnet`] is ASP.NET Core SignalR's Redis backplane
//! format, for hubs that share Redis with ASP.NET servers (its payloads travel as
//! [`BackplanePayload::AspNet`]; `hub::aspnet` gives them meaning).
//!
//! Local fan-out is *not* here: `hub/` delivers to local connections itself and uses the
//! backplane only to reach other nodes (Centrifuge's Node/Broker split, not ASP.NET's
//! "a backplane is a whole lifetime manager").
//!
//! Data path: `hub::lifetime` → [`Backplane::publish`] → (network) → the backplane's reader →
//! [`Inbox::deliver`] → a bounded dispatch worker (same channel, same worker: per-channel order)
//! → `hub::lifetime` delivers to the local connections.
//!
//! Feed events take [`Backplane::append`] instead: stored in the recipient's bounded
//! history ([`history`]) and published in one atomic step, with the user's next offset; the
//! node's own subscription brings them back for local delivery, so a user's events reach
//! every node in one order. [`Backplane::history`] reads a user's history (the feed hub's
//! `Recover`, and the node's gap repair). When the inbox had to drop a message, or the
//! backplane lost and regained its subscriptions, it tells the node ([`Inbox::next_resync`])
//! so the node can fill the gap from history.

pub mod aspnet;
pub mod channel;
pub mod envelope;
pub mod history;
pub mod memory;
pub mod redis;
mod redis_history;
pub mod resp;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

pub use channel::Channel;
pub use history::{Appended, FeedAppend, HistoryConfig, HistoryPage};

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
    /// Group membership of the channel's local connections (published on a user's channel:
    /// every connection of the user; on a connection's channel: that connection), for the
    /// Azure REST API's user groups (`hub::admin`).
    Membership {
        /// The group; `None` with `add == false`: every group.
        group: Option<GroupName>,
        /// true: add; false: remove.
        add: bool,
        /// When an added user membership ends (Unix milliseconds); `None`: it is not
        /// tracked (the connections stay until they leave or are removed).
        expires_ms: Option<u64>,
    },
    /// Close the channel's local connections (a user's, a group's, or every one), except
    /// `exclude`, with Close error `error`.
    CloseTargets {
        /// Connections left open.
        exclude: Vec<ConnectionId>,
        /// Close error text.
        error: Option<String>,
    },
    /// A feed event appended to its user's history ([`Backplane::append`]): delivered as the
    /// hub's feed invocation with `"offset"` spliced into object payloads.
    Feed(FeedMessage),
    /// A payload in ASP.NET Core SignalR's Redis backplane format ([`aspnet`]), undecoded:
    /// its meaning depends on the channel, so the hub decodes it. Published as is.
    AspNet(Bytes),
}

/// A feed event as published by [`Backplane::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedMessage {
    /// The recipient.
    pub user: String,
    /// Its offset in the user's history.
    pub offset: u64,
    /// The history's epoch.
    pub epoch: Arc<str>,
    /// The event id (empty: none).
    pub id: String,
    /// The payload's JSON text as appended (without the offset).
    pub payload: Bytes,
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

/// One group membership of a user ([`Backplane::user_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserGroup {
    /// The group.
    pub group: String,
    /// When the membership ends (Unix milliseconds).
    pub expires_ms: u64,
}

/// Most group memberships kept per user ([`Backplane::user_group_add`]); beyond it the ones
/// ending soonest are dropped.
pub const MAX_USER_GROUPS: usize = 1000;

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

    /// Publishes like [`Backplane::publish`] and says how many nodes were subscribed to
    /// `channel` when it went out, when the backplane can tell (Redis: `PUBLISH`'s reply;
    /// `None`: unknown). `Some(0)` means nobody got it: a node channel's node is gone, or
    /// away from the backplane.
    async fn publish_reaching(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<Option<usize>, BackplaneError> {
        self.publish(channel, message).await.map(|()| None)
    }

    /// How many nodes are subscribed to each of `channels` right now, when the backplane
    /// can tell (Redis: `PUBSUB NUMSUB`, one round trip; `None`: unknown). Used to notice
    /// that a node this one waits on is gone.
    async fn subscribers(
        &self,
        channels: &[Channel],
    ) -> Result<Option<Vec<usize>>, BackplaneError> {
        let _ = channels;
        Ok(None)
    }

    /// Subscribes this node to `channels`. Returns once the subscription is active, so
    /// anything published afterwards arrives.
    async fn subscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError>;

    /// Unsubscribes this node from `channels`.
    async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError>;

    /// Whether the backplane is connected (`/readyz`).
    fn is_ready(&self) -> bool;

    /// Appends each event to its user's history and publishes it on the user's channel
    /// ([`HistoryConfig::channel`]) as a [`BackplanePayload::Feed`], in slice order,
    /// atomically per event (Redis: one EVALSHA of a Lua script per up to 256 events, all
    /// pipelined on one connection: one round trip per batch). Per-user order is slice
    /// order. A redelivered event found among the user's newest events is not appended or
    /// published again (`duplicate`). On error a prefix of the batch may have been appended
    /// (never an event after one that failed): the caller retries the whole batch marked
    /// redelivered (events with an id are then found instead of appended twice).
    async fn append(&self, batch: &[FeedAppend]) -> Result<Vec<Appended>, BackplaneError>;

    /// Events of `user` after offset `since` (oldest first, at most `limit`; `None`: the
    /// newest `limit`), with the current position. `complete` is false when the history no
    /// longer reaches back to `since + 1`, the limit cut it, or `since` is ahead of the
    /// top. A user without history gets one (a new epoch at offset 0).
    async fn history(
        &self,
        user: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError>;

    /// Records, for every node, that `user` of hub `scope` is in `group` until `expires_ms`
    /// (Unix milliseconds; a later call for the same group replaces the end). Memberships
    /// that ended by `now_ms` are dropped; at most [`MAX_USER_GROUPS`] are kept per user
    /// (the ones ending soonest go first). The Azure REST API's user groups: they also
    /// apply to connections the user opens later (Redis: one sorted set per user, scored by
    /// the end, expiring with its last member).
    async fn user_group_add(
        &self,
        scope: &str,
        user: &str,
        group: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), BackplaneError> {
        let _ = (scope, user, group, expires_ms, now_ms);
        Err(BackplaneError::Unavailable(format!(
            "the {} backplane keeps no user groups",
            self.name()
        )))
    }

    /// Removes `user` of hub `scope` from `group` (`None`: from every group).
    async fn user_group_remove(
        &self,
        scope: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<(), BackplaneError> {
        let _ = (scope, user, group);
        Err(BackplaneError::Unavailable(format!(
            "the {} backplane keeps no user groups",
            self.name()
        )))
    }

    /// The groups `user` of hub `scope` is in at `now_ms` (memberships ending later), in no
    /// particular order.
    async fn user_groups(
        &self,
        scope: &str,
        user: &str,
        now_ms: u64,
    ) -> Result<Vec<UserGroup>, BackplaneError> {
        let _ = (scope, user, now_ms);
        Ok(Vec::new())
    }
}

/// A fresh random epoch (16 hex digits).
pub(crate) fn new_epoch() -> Arc<str> {
    let n: u64 = rand::random();
    Arc::from(format!("{n:016x}"))
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
    resync: Arc<ResyncSignal>,
}

/// Most channels remembered for a resync after drops; beyond it, everything is resynced.
const MAX_RESYNC_CHANNELS: usize = 10_000;

/// Channels whose messages were lost on the way to the node (dropped by a full dispatch
/// queue, or missed while the backplane was disconnected).
#[derive(Debug, Default)]
struct ResyncSignal {
    channels: Mutex<HashSet<Channel>>,
    all: AtomicBool,
    notify: tokio::sync::Notify,
}

/// What [`Inbox::next_resync`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resync {
    /// Every subscribed channel may have lost messages (the backplane reconnected and
    /// resubscribed).
    All,
    /// Messages of these channels were dropped.
    Channels(Vec<Channel>),
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
                resync: Arc::default(),
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
        if let Err(e) = worker.try_send(delivery) {
            let channel = match e {
                mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d) => {
                    d.channel
                }
            };
            self.note_lost(channel);
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

    /// Tells the node that every subscribed channel may have lost messages (called by a
    /// backplane after it reconnected and resubscribed).
    pub fn resync_all(&self) {
        self.resync.all.store(true, Ordering::Release);
        self.resync.notify.notify_one();
    }

    fn note_lost(&self, channel: Channel) {
        let mut set = self
            .resync
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if set.len() < MAX_RESYNC_CHANNELS {
            set.insert(channel);
        } else {
            self.resync.all.store(true, Ordering::Release);
        }
        drop(set);
        self.resync.notify.notify_one();
    }

    /// Waits until messages were lost, and says where (one waiter: the node's resync task).
    pub async fn next_resync(&self) -> Resync {
        loop {
            let notified = self.resync.notify.notified();
            if self.resync.all.swap(false, Ordering::AcqRel) {
                self.take_lost();
                return Resync::All;
            }
            let lost = self.take_lost();
            if !lost.is_empty() {
                return Resync::Channels(lost);
            }
            notified.await;
        }
    }

    fn take_lost(&self) -> Vec<Channel> {
        let mut set = self
            .resync
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *set).into_iter().collect()
    }
}
