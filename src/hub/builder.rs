//! Declaring a hub: [`HubBuilder`] registers methods by name (matched case-insensitively, as
//! ASP.NET does), streaming methods, and connect/disconnect hooks, and sets [`HubOptions`].
//!
//! ```no_run
//! use feedhub::hub::{HubBuilder, HubContext, HubError};
//!
//! let hub = HubBuilder::new("/chat")
//!     .method("Echo", |_ctx: HubContext, (text,): (String,)| async move { Ok::<_, HubError>(text) })
//!     .method("Broadcast", |ctx: HubContext, (text,): (String,)| async move {
//!         ctx.clients().all().send("Message", (text,)).await
//!     })
//!     .build();
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::Stream;

use super::method::{FromArgs, IntoValue, MethodEntry};
use super::{HubContext, HubError};
use crate::backplane::channel::UserChannelStyle;
use crate::connection::outbound::{OutboundLimits, SlowConsumerPolicy};
use crate::connection::TransportKind;
use crate::protocol::DEFAULT_MAX_MESSAGE_SIZE;

/// The transports a hub accepts (ASP.NET's `HttpConnectionDispatcherOptions.Transports`,
/// default all three). Negotiate lists only these; a request on another one gets 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transports {
    /// WebSockets (also the only transport `skipNegotiation` can use).
    pub websockets: bool,
    /// Server-Sent Events plus POST (JSON only).
    pub server_sent_events: bool,
    /// Long Polling plus POST and DELETE.
    pub long_polling: bool,
}

impl Default for Transports {
    fn default() -> Self {
        Transports {
            websockets: true,
            server_sent_events: true,
            long_polling: true,
        }
    }
}

impl Transports {
    /// Whether `kind` is allowed.
    pub fn allows(&self, kind: TransportKind) -> bool {
        match kind {
            TransportKind::WebSockets => self.websockets,
            TransportKind::ServerSentEvents => self.server_sent_events,
            TransportKind::LongPolling => self.long_polling,
        }
    }
}

/// Default of [`HubOptions::max_connections_per_user`].
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 100;

/// Per-hub options. Defaults are ASP.NET's `HubOptions` defaults.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Server ping interval (`KeepAliveInterval`, 15 s).
    pub keep_alive_interval: Duration,
    /// Close a client silent for this long, counted from the handshake
    /// (`ClientTimeoutInterval`, 30 s; official clients ping every 15 s). Long Polling is
    /// exempt: its polls are its keep-alive (`disconnect_timeout`).
    pub client_timeout: Duration,
    /// Deadline for the handshake (`HandshakeTimeout`, 15 s).
    pub handshake_timeout: Duration,
    /// Largest incoming message (`MaximumReceiveMessageSize`, 32 KiB).
    pub max_message_size: usize,
    /// Items buffered per upload stream (`StreamBufferCapacity`, 10).
    pub stream_buffer_capacity: usize,
    /// Unary invocations running at once per connection
    /// (`MaximumParallelInvocationsPerClient`, 1).
    pub max_parallel_invocations: usize,
    /// Invocations waiting for a slot before the connection's reads pause.
    pub max_pending_invocations: usize,
    /// Show internal error details to clients (`EnableDetailedErrors`, false).
    pub detailed_errors: bool,
    /// How long the server waits for a client result.
    pub client_result_timeout: Duration,
    /// Outbound queue bounds per connection.
    pub outbound: OutboundLimits,
    /// What to do with a connection whose outbound queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// Require an authenticated user (401 at negotiate and connect otherwise).
    pub require_auth: bool,
    /// How user channels are named on the backplane.
    pub user_channels: UserChannelStyle,
    /// First part of the hub's non-user backplane channels (`<prefix>:<path>:all`, …);
    /// `feedhub` by default. Give each deployment sharing a Redis its own.
    pub channel_prefix: String,
    /// The client method feed events invoke (`FeedUpdated`).
    pub feed_target: String,
    /// Delay before unsubscribing a channel whose last local member left, so a page reload
    /// does not thrash the backplane.
    pub unsubscribe_debounce: Duration,
    /// Offer stateful reconnect to clients that ask for it (`AllowStatefulReconnects`,
    /// default false as in ASP.NET). WebSockets only.
    pub stateful_reconnect: bool,
    /// Bounds of the replay buffer of unacknowledged messages per stateful connection
    /// (ASP.NET's `StatefulReconnectBufferSize`: 100,000 bytes).
    pub replay: crate::session::replay::ReplayLimits,
    /// How long a stateful connection whose transport dropped waits for the client to come
    /// back before it ends normally (OnDisconnected).
    pub reconnect_window: Duration,
    /// Delay between receiving a message and acknowledging it (ASP.NET: 1 s timer).
    pub ack_interval: Duration,
    /// Transports this hub accepts (default all).
    pub transports: Transports,
    /// How long a long poll waits for messages before answering an empty 200
    /// (`LongPolling.PollTimeout`, 90 s; keep it below the client's 100 s).
    pub long_poll_timeout: Duration,
    /// A Long Polling connection with no poll for this long is ended and OnDisconnected runs
    /// (`DisconnectTimeout`, 15 s).
    pub disconnect_timeout: Duration,
    /// An SSE stream idle this long gets a `:` comment line, so proxies keep it open.
    pub sse_keep_alive: Duration,
    /// Feed events to this hub's users (`feed_target` sends to users, `POST /api/feed`,
    /// RabbitMQ) are appended to the users' history with offsets, and the node repairs
    /// gaps from it (the feed hub; default false).
    pub history: bool,
    /// Most events one `Recover` returns (`--recover-limit`, 300).
    pub recover_limit: usize,
    /// Connections one user may hold on this hub on one node (0: no cap). Over it, negotiate
    /// answers 429 with an `error`, and a connect gets a handshake error and Close 1008.
    /// 100 by default: far more tabs and devices than a person has, far fewer than a
    /// script holding one token opens to exhaust a node.
    pub max_connections_per_user: usize,
    /// Close a connection (Close with a reason and `allowReconnect: true`) when its access
    /// token stops being accepted (`exp` plus the leeway), as ASP.NET's
    /// `CloseOnAuthenticationExpiration`: the client reconnects with a fresh token, or is
    /// refused. Default false; the feed hub turns it on.
    pub close_on_token_expiry: bool,
    /// Share the Redis backplane with ASP.NET Core SignalR servers of this hub (`None`:
    /// off). See `hub::aspnet`.
    pub aspnet: Option<AspNetOptions>,
}

/// ASP.NET Redis backplane interop of one hub (`--aspnet-hub <route>=<type>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AspNetOptions {
    /// The hub's CLR type full name on the ASP.NET side (`MyApp.Hubs.FeedHub`): the stem of
    /// its channel names. Case-sensitive.
    pub hub_type: String,
    /// StackExchange.Redis's `ChannelPrefix` on the ASP.NET side (`--aspnet-channel-prefix`,
    /// default empty), prepended without a separator.
    pub channel_prefix: String,
    /// How long a group command for a connection on another server waits for its ack
    /// (ASP.NET: 30 s, swept every 5 s).
    pub ack_timeout: Duration,
}

impl AspNetOptions {
    /// Interop for hub type `hub_type` with ASP.NET's defaults.
    pub fn new(hub_type: impl Into<String>) -> AspNetOptions {
        AspNetOptions {
            hub_type: hub_type.into(),
            channel_prefix: String::new(),
            ack_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            keep_alive_interval: Duration::from_secs(15),
            client_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(15),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            stream_buffer_capacity: 10,
            max_parallel_invocations: 1,
            max_pending_invocations: 32,
            detailed_errors: false,
            client_result_timeout: Duration::from_secs(60),
            outbound: OutboundLimits::default(),
            slow_consumer: SlowConsumerPolicy::default(),
            require_auth: false,
            user_channels: UserChannelStyle::Prefixed,
            channel_prefix: "feedhub".to_string(),
            feed_target: "FeedUpdated".to_string(),
            unsubscribe_debounce: Duration::from_secs(1),
            stateful_reconnect: false,
            replay: crate::session::replay::ReplayLimits::default(),
            reconnect_window: Duration::from_secs(15),
            ack_interval: Duration::from_secs(1),
            transports: Transports::default(),
            long_poll_timeout: Duration::from_secs(90),
            disconnect_timeout: Duration::from_secs(15),
            sse_keep_alive: Duration::from_secs(10),
            history: false,
            recover_limit: crate::backplane::history::DEFAULT_RECOVER_LIMIT,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            close_on_token_expiry: false,
            aspnet: None,
        }
    }
}

type ConnectedHook =
    Arc<dyn Fn(HubContext) -> BoxFuture<'static, Result<(), HubError>> + Send + Sync>;
type DisconnectedHook =
    Arc<dyn Fn(HubContext, Option<String>) -> BoxFuture<'static, ()> + Send + Sync>;

/// A complete hub declaration, ready to be mounted on a server.
#[derive(Clone)]
pub struct HubDefinition {
    /// URL path, e.g. `/hubs/feed`.
    pub path: String,
    /// Options.
    pub options: HubOptions,
    pub(crate) methods: Arc<HashMap<String, MethodEntry>>,
    pub(crate) on_connected: Option<ConnectedHook>,
    pub(crate) on_disconnected: Option<DisconnectedHook>,
}

impl std::fmt::Debug for HubDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubDefinition")
            .field("path", &self.path)
            .field("methods", &self.methods.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl HubDefinition {
    /// Looks a method up by name, case-insensitively.
    pub(crate) fn method(&self, name: &str) -> Option<&MethodEntry> {
        self.methods.get(&name.to_ascii_lowercase())
    }
}

/// Builds a [`HubDefinition`].
pub struct HubBuilder {
    path: String,
    options: HubOptions,
    methods: HashMap<String, MethodEntry>,
    on_connected: Option<ConnectedHook>,
    on_disconnected: Option<DisconnectedHook>,
}

impl HubBuilder {
    /// A hub served at `path` (for example `/hubs/feed`).
    pub fn new(path: &str) -> HubBuilder {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        HubBuilder {
            path: path.trim_end_matches('/').to_string(),
            options: HubOptions::default(),
            methods: HashMap::new(),
            on_connected: None,
            on_disconnected: None,
        }
    }

    /// Replaces the options.
    pub fn options(mut self, options: HubOptions) -> Self {
        self.options = options;
        self
    }

    /// Edits the options in place.
    pub fn configure(mut self, f: impl FnOnce(&mut HubOptions)) -> Self {
        f(&mut self.options);
        self
    }

    /// Registers a method answering `Invocation`s. Arguments are a tuple of parameter types
    /// (upload streams included as [`super::UploadStream`]); the result is serialized for the
    /// caller's protocol (`()` answers `null`, as a void ASP.NET method does).
    pub fn method<A, T, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: FromArgs,
        T: IntoValue,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HubError>> + Send + 'static,
    {
        self.methods
            .insert(name.to_ascii_lowercase(), MethodEntry::unary(name, f));
        self
    }

    /// Registers a method answering `StreamInvocation`s with a stream of items
    /// (`IAsyncEnumerable<T>` / `ChannelReader<T>` in ASP.NET). The stream is dropped when the
    /// client cancels; [`HubContext::cancellation`] fires too.
    pub fn stream<A, T, S, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: FromArgs,
        T: IntoValue,
        S: Stream<Item = Result<T, HubError>> + Send + 'static,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, HubError>> + Send + 'static,
    {
        self.methods
            .insert(name.to_ascii_lowercase(), MethodEntry::stream(name, f));
        self
    }

    /// Runs after the handshake, before the connection's messages are dispatched
    /// (`OnConnectedAsync`). An error closes the connection without reconnect.
    pub fn on_connected<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HubError>> + Send + 'static,
    {
        self.on_connected = Some(Arc::new(move |ctx| Box::pin(f(ctx))));
        self
    }

    /// Runs when the connection has ended (`OnDisconnectedAsync`); the second argument is the
    /// error that ended it, if any.
    pub fn on_disconnected<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(HubContext, Option<String>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_disconnected = Some(Arc::new(move |ctx, err| Box::pin(f(ctx, err))));
        self
    }

    /// Finishes the declaration.
    pub fn build(self) -> HubDefinition {
        HubDefinition {
            path: self.path,
            options: self.options,
            methods: Arc::new(self.methods),
            on_connected: self.on_connected,
            on_disconnected: self.on_disconnected,
        }
    }
}
