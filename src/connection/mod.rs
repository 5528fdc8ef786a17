//! What the rest of the server knows about one client connection: [`Connection`], shared as
//! [`ConnectionHandle`]. No tasks and no sockets live here.
//!
//! The hub pushes framed bytes into the connection's bounded [`outbound::Outbound`] queue;
//! the connection's session task (`session/`) is the only code that writes to its socket.

pub mod outbound;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::ids::{ConnectionId, GroupName, UserId};
use crate::protocol::{PreparedMessage, ProtocolKind, Value};
use outbound::{CloseRequest, Outbound, PushError};

/// The transport a connection uses (`GetActiveTransportName`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// WebSockets.
    WebSockets,
    /// Server-Sent Events plus POST.
    ServerSentEvents,
    /// Long Polling plus POST.
    LongPolling,
}

impl TransportKind {
    /// The name ASP.NET uses (`HttpTransportType` enum names).
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::WebSockets => "WebSockets",
            TransportKind::ServerSentEvents => "ServerSentEvents",
            TransportKind::LongPolling => "LongPolling",
        }
    }
}

/// What the hub may read of the HTTP request that opened the connection
/// (ASP.NET's `Context.GetHttpContext()`).
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// The raw query string of the connect request (without `?`), less its `access_token`
    /// (the identity holds what the token said).
    pub query: String,
    /// Request headers of the connect request.
    pub headers: http::HeaderMap,
}

impl RequestInfo {
    /// First value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A cookie of the request.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// `Context.Items`: key → value of any type.
type Items = HashMap<String, Arc<dyn Any + Send + Sync>>;

/// A pending client result: the server invoked a client method and waits for its Completion.
type ResultWaiter = oneshot::Sender<Result<Value, String>>;

/// One connected client.
pub struct Connection {
    /// Public connection id.
    pub id: ConnectionId,
    /// Who is connected.
    pub identity: Identity,
    /// The hub protocol chosen in the handshake.
    pub protocol: ProtocolKind,
    /// The transport in use.
    pub transport: TransportKind,
    /// The connect request.
    pub request: RequestInfo,
    /// Outbound queue; the session task drains it.
    pub outbound: Outbound,
    /// Cancelled when the connection ends (`Context.ConnectionAborted`).
    pub aborted: CancellationToken,
    /// When the session closes the connection because its access token expired (hubs with
    /// `close_on_token_expiry`); kept here, not in the session future (`session::size_tests`).
    pub(crate) token_expiry: Option<tokio::time::Instant>,
    /// Groups this connection is in, so they can be left when it ends.
    pub(crate) groups: Mutex<Vec<GroupName>>,
    /// `Context.Items`, allocated on first use (most connections never use it; boxed, so
    /// an unused map costs a pointer, not a map, for the connection's life).
    #[allow(clippy::box_collection)] // the point: a pointer, not a 48-byte empty map
    items: Mutex<Option<Box<Items>>>,
    /// Client results awaiting the client's Completion, allocated on first use (boxed too).
    #[allow(clippy::box_collection)]
    pending_results: Mutex<Option<Box<HashMap<String, ResultWaiter>>>>,
    next_result_id: AtomicU64,
}

/// A cheap, cloneable reference to a [`Connection`].
pub type ConnectionHandle = Arc<Connection>;

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("user", &self.identity.user_id)
            .field("protocol", &self.protocol)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A new connection record; the session closes it at `token_expiry`, if any.
    pub fn new(
        id: ConnectionId,
        identity: Identity,
        protocol: ProtocolKind,
        transport: TransportKind,
        request: RequestInfo,
        outbound: Outbound,
        token_expiry: Option<tokio::time::Instant>,
    ) -> ConnectionHandle {
        Arc::new(Connection {
            id,
            identity,
            protocol,
            transport,
            request,
            outbound,
            aborted: CancellationToken::new(),
            token_expiry,
            groups: Mutex::new(Vec::new()),
            items: Mutex::new(None),
            pending_results: Mutex::new(None),
            next_result_id: AtomicU64::new(1),
        })
    }

    /// The user id, if authenticated.
    pub fn user_id(&self) -> Option<&UserId> {
        self.identity.user_id.as_ref()
    }

    /// Queues a prepared message, encoded for this connection's protocol.
    pub fn send_prepared(&self, msg: &PreparedMessage) -> Result<(), PushError> {
        match msg.bytes_for(self.protocol) {
            Ok(bytes) => self.send_bytes(bytes),
            Err(e) => {
                tracing::warn!(conn_id = %self.id, error = %e, "message could not be encoded; dropped");
                Err(PushError::Closed)
            }
        }
    }

    /// Queues already framed bytes.
    pub fn send_bytes(&self, bytes: Bytes) -> Result<(), PushError> {
        let r = self.outbound.push(bytes);
        crate::metrics::METRICS.record_push(&r);
        r
    }

    /// Asks the session to close this connection with a Close message.
    pub fn close(&self, error: Option<String>, allow_reconnect: bool) {
        self.outbound.close(CloseRequest {
            error,
            allow_reconnect,
        });
    }

    /// Stores an item (`Context.Items[key] = value`).
    pub fn set_item<T: Any + Send + Sync>(&self, key: &str, value: T) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items
            .get_or_insert_with(Default::default)
            .insert(key.to_string(), Arc::new(value));
    }

    /// Reads an item stored with [`Connection::set_item`].
    pub fn item<T: Any + Send + Sync>(&self, key: &str) -> Option<Arc<T>> {
        let items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let v = items.as_ref()?.get(key)?.clone();
        v.downcast::<T>().ok()
    }

    /// Registers a pending client result and returns its invocation id (`s1`, `s2`, …; the
    /// `s` keeps it apart from client-chosen ids, as in ASP.NET).
    pub(crate) fn register_result(&self) -> (String, oneshot::Receiver<Result<Value, String>>) {
        let id = format!("s{}", self.next_result_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        let mut pending = self
            .pending_results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending
            .get_or_insert_with(Default::default)
            .insert(id.clone(), tx);
        (id, rx)
    }

    /// Registers a pending client result under an id chosen elsewhere (a client result call
    /// forwarded from another server, with that server's invocation id).
    pub(crate) fn register_result_as(
        &self,
        id: String,
    ) -> oneshot::Receiver<Result<Value, String>> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self
            .pending_results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.get_or_insert_with(Default::default).insert(id, tx);
        rx
    }

    /// Forgets a pending client result (timeout, cancel).
    pub(crate) fn forget_result(&self, id: &str) {
        let mut pending = self
            .pending_results
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(map) = pending.as_mut() {
            map.remove(id);
        }
    }

    /// Completes a pending client result. Returns false if no such result is pending.
    pub(crate) fn complete_result(&self, id: &str, result: Result<Value, String>) -> bool {
        let waiter = {
            let mut pending = self
                .pending_results
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending.as_mut().and_then(|m| m.remove(id))
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }

    /// Fails every pending client result (the connection ended).
    pub(crate) fn fail_pending_results(&self) {
        let drained = {
            let mut pending = self
                .pending_results
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending.take()
        };
        for (_, tx) in drained.into_iter().flat_map(|m| *m) {
            let _ = tx.send(Err(format!("Connection '{}' disconnected.", self.id)));
        }
    }
}
