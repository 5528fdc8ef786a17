//! [`HubContext`]: what a hub method, stream or hook sees of its connection and hub
//! (ASP.NET's `Hub.Context`, `Hub.Clients` and `Hub.Groups` in one value).

use std::any::Any;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::clients::{Clients, Groups};
use super::HubLifetime;
use crate::connection::{ConnectionHandle, RequestInfo, TransportKind};
use crate::protocol::ProtocolKind;

/// The context of one call on one connection. Cheap to clone.
#[derive(Clone)]
pub struct HubContext {
    pub(crate) connection: ConnectionHandle,
    pub(crate) lifetime: Arc<HubLifetime>,
    /// Cancelled when the current streaming invocation is cancelled by the client, or when
    /// the connection ends. `None` for the connection's own context: a child of
    /// `ConnectionAborted` is made when asked for ([`HubContext::cancellation`]), as a token
    /// costs an allocation for the connection's life (the idle memory budget in
    /// `bench/README.md`).
    pub(crate) cancel: Option<CancellationToken>,
}

impl std::fmt::Debug for HubContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubContext")
            .field("connection", &self.connection.id)
            .finish_non_exhaustive()
    }
}

impl HubContext {
    pub(crate) fn new(connection: ConnectionHandle, lifetime: Arc<HubLifetime>) -> HubContext {
        HubContext {
            connection,
            lifetime,
            cancel: None,
        }
    }

    pub(crate) fn with_cancel(&self, cancel: CancellationToken) -> HubContext {
        HubContext {
            cancel: Some(cancel),
            ..self.clone()
        }
    }

    /// `Context.ConnectionId`.
    pub fn connection_id(&self) -> &str {
        self.connection.id.as_str()
    }

    /// `Context.UserIdentifier`: the JWT `sub`, or `None` when anonymous.
    pub fn user_id(&self) -> Option<&str> {
        self.connection.user_id().map(|u| u.as_str())
    }

    /// `Context.User`'s claims.
    pub fn claims(&self) -> &serde_json::Map<String, serde_json::Value> {
        self.connection.identity.claims.map()
    }

    /// The connect request (`Context.GetHttpContext()`): query, headers, cookies.
    pub fn request(&self) -> &RequestInfo {
        &self.connection.request
    }

    /// The transport in use (`IHttpTransportFeature.TransportType`).
    pub fn transport(&self) -> TransportKind {
        self.connection.transport
    }

    /// The hub protocol in use.
    pub fn protocol(&self) -> ProtocolKind {
        self.connection.protocol
    }

    /// `Context.Items[key] = value`.
    pub fn set_item<T: Any + Send + Sync>(&self, key: &str, value: T) {
        self.connection.set_item(key, value);
    }

    /// `Context.Items[key]`.
    pub fn item<T: Any + Send + Sync>(&self, key: &str) -> Option<Arc<T>> {
        self.connection.item(key)
    }

    /// Fires when the current streaming invocation is cancelled (CancelInvocation) or the
    /// connection ends (`Context.ConnectionAborted`).
    pub fn cancellation(&self) -> CancellationToken {
        match &self.cancel {
            Some(c) => c.clone(),
            None => self.connection.aborted.child_token(),
        }
    }

    /// `Context.Abort()`: closes the connection; the client is not told to reconnect.
    pub fn abort(&self) {
        self.connection.close(None, false);
    }

    /// Closes the connection with a Close message carrying `error` and `allow_reconnect`.
    pub fn close(&self, error: Option<String>, allow_reconnect: bool) {
        self.connection.close(error, allow_reconnect);
    }

    /// `Clients`.
    pub fn clients(&self) -> Clients {
        Clients::new(self.lifetime.clone(), Some(self.connection.clone()))
    }

    /// `Groups`.
    pub fn groups(&self) -> Groups {
        Groups::new(self.lifetime.clone())
    }
}
