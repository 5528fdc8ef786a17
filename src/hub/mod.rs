//! Node-local hub logic: the typed hub API for Rust users ([`HubBuilder`], [`HubContext`],
//! [`Clients`], [`Groups`]), the connection registry, reference-counted backplane
//! subscriptions, and local fan-out. No sockets and no I/O crates here: the hub pushes
//! framed bytes into connections' outbound queues and talks to other nodes only through the
//! `Backplane` trait.
//!
//! - [`builder`]: declaring a hub: methods by name, streams, OnConnected/OnDisconnected.
//! - [`method`]: argument binding (`FromArgs`), results (`IntoValue`), upload streams.
//! - [`context`]: what a hub method sees (`Context` in ASP.NET).
//! - [`clients`]: `Clients.All/Caller/Others/Client(s)/User(s)/Group(s)/…` and `Groups`.
//! - [`lifetime`]: the per-hub runtime: registry, subscriptions, local-first fan-out, and
//!   inbound backplane deliveries.
//! - [`registry`] / [`subscriptions`]: who is connected; which channels this node listens to.
//! - [`admin`]: what a management API asks across nodes: existence checks, user groups
//!   kept by the backplane, closing by user, group or all.
//! - [`aspnet`]: sharing the Redis backplane with ASP.NET Core SignalR servers.
//! - [`history`]: feed appends, offset-checked delivery and gap repair ([`cursor`]: the
//!   pure per-user cursor).

pub mod admin;
pub mod aspnet;
pub mod builder;
pub mod clients;
pub mod context;
pub mod cursor;
pub mod history;
pub mod lifetime;
pub mod method;
pub mod registry;
pub mod subscriptions;

use std::fmt;

pub use builder::{AspNetOptions, HubBuilder, HubDefinition, HubOptions, Transports};
pub use clients::{ClientProxy, Clients, Groups, SingleClientProxy};
pub use context::HubContext;
pub use history::{HistoryCounts, HistoryStats};
pub use lifetime::{user_cap_message, ConnectError, HubLifetime, Target};
pub use method::{
    channel_stream, ChannelStream, FromArg, FromArgs, IntoArgs, IntoValue, StreamWriter,
    UploadStream,
};

/// An error from hub code.
///
/// [`HubError::Hub`] is ASP.NET's `HubException`: its text always reaches the client.
/// Any other error (converted with `?` from any `std::error::Error`) is hidden from the client
/// unless detailed errors are enabled, exactly as ASP.NET does.
pub enum HubError {
    /// Text passed through to the client.
    Hub(String),
    /// An internal error: logged; shown to the client only with detailed errors.
    Other {
        /// Type-like name shown with detailed errors (`Exception`, `InvalidDataException`).
        kind: &'static str,
        /// The message.
        message: String,
    },
}

impl HubError {
    /// A `HubException` with `message`.
    pub fn new(message: impl Into<String>) -> HubError {
        HubError::Hub(message.into())
    }

    /// The text ASP.NET appends to its error prefix: ` HubException: msg` for hub errors;
    /// for others, ` Kind: msg` when `detailed` and nothing otherwise.
    pub fn client_suffix(&self, detailed: bool) -> String {
        match self {
            HubError::Hub(m) => format!(" HubException: {m}"),
            HubError::Other { kind, message } if detailed => format!(" {kind}: {message}"),
            HubError::Other { .. } => String::new(),
        }
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubError::Hub(m) => write!(f, "HubException: {m}"),
            HubError::Other { kind, message } => write!(f, "{kind}: {message}"),
        }
    }
}

impl fmt::Debug for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HubError {
    fn from(e: E) -> Self {
        HubError::Other {
            kind: "Exception",
            message: e.to_string(),
        }
    }
}

/// `Result<T, HubError>`.
pub type HubResult<T> = Result<T, HubError>;
