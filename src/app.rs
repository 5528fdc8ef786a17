//! The composition root: the only place that names concrete backplane types and wires the
//! layers together. [`ServerBuilder`] takes hub declarations and settings; [`Server`] runs
//! the accept loop, the backplane dispatch workers, and graceful shutdown.
//!
//! Shutdown (SIGINT/SIGTERM in the binary, [`Server::shutdown`] in code): `/readyz` starts
//! failing, the listener stops accepting, every session sends Close with
//! `allowReconnect: true`, and the server waits for sessions to end, up to a deadline.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::backplane::memory::{MemoryBackplane, MemoryBus};
use crate::backplane::redis::{RedisBackplane, RedisConfig};
use crate::backplane::{Backplane, Delivery, HistoryConfig, Inbox};
use crate::demo::store::{MemoryStore, PostStore};
use crate::demo::{DemoRoutes, DemoService, Directory, FeedPublisher, HubPublisher};
use crate::http::limits::{Admission, Slot};
use crate::http::mount::{Mount, Mounts, Route};
use crate::http::negotiate::Tokens;
use crate::http::state::{HttpConfig, HttpState};
use crate::hub::{Clients, Groups, HubDefinition, HubLifetime};
use crate::tls::{Tls, TlsConfig};

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// HS256 secret (at least 32 bytes); with neither it nor public keys in `jwt`, the
    /// server runs in development mode (see `auth`).
    pub jwt_secret: Option<String>,
    /// Public keys, key set, issuer, audience, leeway and user claim of JWTs.
    pub jwt: crate::auth::JwtOptions,
    /// Key of the connection tokens negotiate issues (at least 32 bytes); instances that
    /// accept each other's tokens (no sticky sessions) share it. `None`: derived from
    /// `jwt_secret`, or random per instance where there is none (public keys only).
    pub connection_key: Option<String>,
    /// Key for `POST /api/feed`; `None` disables the publish API.
    pub api_key: Option<String>,
    /// Origins allowed for CORS with credentials (`*` allows any, echoed).
    pub cors_origins: Vec<String>,
    /// How long shutdown waits for connections to close.
    pub shutdown_timeout: Duration,
    /// This node's id on the backplane.
    pub node_id: String,
    /// Largest `POST /api/feed` body.
    pub max_publish_body: usize,
    /// Serve `/dev/token` (demo identities).
    pub dev_identities: bool,
    /// The hub `POST /api/feed` delivers to.
    pub feed_hub: Option<String>,
    /// Backplane dispatch workers.
    pub dispatch_workers: usize,
    /// Messages queued per dispatch worker before drops.
    pub dispatch_queue: usize,
    /// Overrides every hub's `HubOptions::channel_prefix` (the first part of non-user
    /// backplane channel names), so deployments or test runs sharing a Redis stay apart.
    /// It is also the first part of the history's Redis keys.
    pub channel_prefix: Option<String>,
    /// Feed events kept per user (`--history-size`).
    pub history_size: usize,
    /// Age of the oldest kept feed event (`--history-ttl-secs`).
    pub history_ttl: Duration,
    /// Most events one `Recover` returns (`--recover-limit`); overrides every hub's
    /// `HubOptions::recover_limit`.
    pub recover_limit: usize,
    /// Connection, rate and time limits of the HTTP layer (see `http::limits`).
    pub limits: crate::http::limits::LimitsConfig,
    /// Overrides every hub's `HubOptions::max_connections_per_user` (0: no cap).
    pub max_connections_per_user: Option<usize>,
    /// Development mode (no JWT secret) may listen on a non-loopback address.
    pub dev_mode_public: bool,
    /// Access key of the Azure SignalR data-plane REST API and client redirect
    /// (`--azure-access-key`, see `azure`); `None`: not served.
    pub azure_access_key: Option<String>,
    /// ASP.NET Redis backplane interop (`--aspnet-hub <route>=<hub type>`): (hub route, CLR
    /// hub type full name) pairs; each route must be a mounted hub.
    pub aspnet_hubs: Vec<(String, String)>,
    /// StackExchange.Redis channel prefix of the ASP.NET servers (`--aspnet-channel-prefix`,
    /// default empty).
    pub aspnet_channel_prefix: String,
    /// How long an ASP.NET group command waits for its ack (ASP.NET: 30 s).
    pub aspnet_ack_timeout: Duration,
}

impl ServerConfig {
    /// The history settings the built-in backplanes get (keys under the channel prefix,
    /// appends published on the feed hub's `feed-<userId>` channels).
    pub fn history(&self) -> HistoryConfig {
        HistoryConfig {
            size: self.history_size.max(1),
            ttl: self.history_ttl.max(Duration::from_secs(1)),
            key_prefix: self
                .channel_prefix
                .clone()
                .unwrap_or_else(|| "feedhub".to_string()),
            ..HistoryConfig::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            jwt_secret: None,
            jwt: crate::auth::JwtOptions::default(),
            connection_key: None,
            api_key: None,
            cors_origins: Vec::new(),
            shutdown_timeout: Duration::from_secs(10),
            node_id: format!("node-{}", crate::ids::random_token()),
            max_publish_body: 256 * 1024,
            dev_identities: false,
            feed_hub: None,
            dispatch_workers: 4,
            dispatch_queue: 8192,
            channel_prefix: None,
            history_size: crate::backplane::history::DEFAULT_HISTORY_SIZE,
            history_ttl: crate::backplane::history::DEFAULT_HISTORY_TTL,
            recover_limit: crate::backplane::history::DEFAULT_RECOVER_LIMIT,
            limits: crate::http::limits::LimitsConfig::default(),
            max_connections_per_user: None,
            dev_mode_public: false,
            azure_access_key: None,
            aspnet_hubs: Vec::new(),
            aspnet_channel_prefix: String::new(),
            aspnet_ack_timeout: Duration::from_secs(30),
        }
    }
}

/// Makes the backplane for a node, given the inbox it must deliver to.
pub type BackplaneFactory = Box<dyn FnOnce(&ServerConfig, Inbox) -> Arc<dyn Backplane> + Send>;

/// Builds a [`Server`].
pub struct ServerBuilder {
    config: ServerConfig,
    hubs: Vec<HubDefinition>,
    backplane: Option<BackplaneFactory>,
    demo_page: String,
    demo_store: Option<Arc<dyn PostStore>>,
    demo_publisher: Option<Arc<dyn FeedPublisher>>,
    demo_users: Directory,
    extra_ready: Vec<Arc<dyn Fn() -> Result<(), String> + Send + Sync>>,
    tls: Option<TlsConfig>,
    mounts: Vec<(Route, Arc<dyn Mount>)>,
}

impl ServerBuilder {
    /// A builder with `config`.
    pub fn new(config: ServerConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            hubs: Vec::new(),
            backplane: None,
            demo_page: crate::demo::INDEX_HTML.to_string(),
            demo_store: None,
            demo_publisher: None,
            demo_users: Directory::standard(),
            extra_ready: Vec::new(),
            tls: None,
            mounts: Vec::new(),
        }
    }

    /// Mounts a hub.
    pub fn hub(mut self, hub: HubDefinition) -> Self {
        self.hubs.push(hub);
        self
    }

    /// Uses this backplane (default: a private in-memory bus, i.e. a single node).
    pub fn backplane(mut self, factory: BackplaneFactory) -> Self {
        self.backplane = Some(factory);
        self
    }

    /// Joins an in-memory bus shared with other servers in this process.
    pub fn memory_bus(self, bus: MemoryBus) -> Self {
        self.backplane(Box::new(move |cfg, inbox| {
            Arc::new(
                MemoryBackplane::new(bus, cfg.node_id.clone(), inbox).with_history(cfg.history()),
            )
        }))
    }

    /// Uses Redis as the backplane (scale-out). The server starts even when Redis is
    /// unreachable: it is not ready (`/readyz` 503) and keeps reconnecting, as ASP.NET's
    /// Redis backplane does.
    pub fn redis(self, mut redis: RedisConfig) -> Self {
        self.backplane(Box::new(move |cfg, inbox| {
            redis.history = cfg.history();
            RedisBackplane::new(redis, cfg.node_id.clone(), inbox)
        }))
    }

    /// Adds a readiness condition (e.g. the RabbitMQ consumer is connected).
    pub fn ready_check(mut self, check: Arc<dyn Fn() -> Result<(), String> + Send + Sync>) -> Self {
        self.extra_ready.push(check);
        self
    }

    /// Replaces the page served at `/`.
    pub fn demo_page(mut self, html: String) -> Self {
        self.demo_page = html;
        self
    }

    /// Where the demo post service stores posts (default: in memory, this instance only).
    pub fn demo_store(mut self, store: Arc<dyn PostStore>) -> Self {
        self.demo_store = Some(store);
        self
    }

    /// How the demo post service publishes feed events (default: the in-memory path,
    /// `ingest::deliver` on the feed hub).
    pub fn demo_publisher(mut self, publisher: Arc<dyn FeedPublisher>) -> Self {
        self.demo_publisher = Some(publisher);
        self
    }

    /// The demo users (default [`Directory::standard`]: 1001 Alice, 1002 Bob, 1003 Carol).
    pub fn demo_users(mut self, directory: Directory) -> Self {
        self.demo_users = directory;
        self
    }

    /// Mounts `service` on the router at `route` (see `http::mount`): it gets the requests
    /// whose path matches and that no built-in route (`/healthz`, `/readyz`, `/metrics`,
    /// `/api/feed`, `/dev/token`) or earlier mount (the demo's `GET /`, `GET /app.js`,
    /// `GET /app.css`, `/demo/`, then the services mounted before) takes; the hubs come
    /// after. E.g. a REST API at `Route::prefix("/api/hubs/")`.
    pub fn mount(mut self, route: Route, service: Arc<dyn Mount>) -> Self {
        self.mounts.push((route, service));
        self
    }

    /// Serves HTTPS and WSS with this certificate and key instead of plain HTTP. The files
    /// are read by [`ServerBuilder::start`] (unusable files are a startup error) and again
    /// by [`Tls::reload`] (SIGHUP in the binary).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Binds the listener, starts the hubs and the backplane, and begins serving.
    pub async fn start(self) -> anyhow::Result<Server> {
        let config = self.config;
        // Unusable certificate files are a startup error, before anything is started.
        let tls = match self.tls {
            Some(c) => Some(Arc::new(Tls::load(c)?)),
            None => None,
        };
        if config.node_id.is_empty() || config.node_id.len() > crate::http::negotiate::MAX_NODE_ID {
            anyhow::bail!(
                "the node id must be 1 to {} bytes long",
                crate::http::negotiate::MAX_NODE_ID
            );
        }
        // A short secret, an unreadable key file or a bad key set URL stops the start.
        let auth = Arc::new(Authenticator::new(
            config.jwt_secret.as_deref(),
            &config.jwt,
        )?);
        let token_key = match (&config.connection_key, &config.jwt_secret) {
            (Some(k), _) if k.len() < crate::auth::MIN_SECRET_BYTES => {
                anyhow::bail!(
                    "--connection-key is {} bytes; it needs at least {}",
                    k.len(),
                    crate::auth::MIN_SECRET_BYTES
                )
            }
            (Some(k), _) => format!("feedhub-connection-token:{k}").into_bytes(),
            // Nodes sharing the JWT secret accept each other's connection tokens.
            (None, Some(s)) => format!("feedhub-connection-token:{s}").into_bytes(),
            (None, None) => {
                if !auth.is_development() {
                    tracing::warn!("no --connection-key (nor --jwt-secret): connection tokens are valid on this instance only; without sticky sessions, give every instance the same --connection-key");
                }
                rand::random::<[u8; 32]>().to_vec()
            }
        };
        crate::http::origin::validate(&config.cors_origins)
            .map_err(|e| anyhow::anyhow!("--cors-origin: {e}"))?;
        if auth.is_development() && !config.listen.ip().is_loopback() && !config.dev_mode_public {
            // Development mode signs tokens with a public secret: anyone who can reach the
            // port can be anyone. Only on a loopback address unless asked for explicitly.
            anyhow::bail!(
                "development mode (no --jwt-secret) refuses to listen on {}, a non-loopback address: anyone reaching it could sign in as any user. Give --jwt-secret, listen on 127.0.0.1, or pass --dev-mode-public",
                config.listen
            );
        }
        let (inbox, receivers) = Inbox::new(config.dispatch_workers, config.dispatch_queue);
        let resync = inbox.clone();
        let backplane: Arc<dyn Backplane> = match self.backplane {
            Some(f) => f(&config, inbox),
            None => Arc::new(
                MemoryBackplane::new(MemoryBus::new(), config.node_id.clone(), inbox)
                    .with_history(config.history()),
            ),
        };
        let shutdown = CancellationToken::new();
        if let Some((route, _)) = config
            .aspnet_hubs
            .iter()
            .find(|(route, _)| !self.hubs.iter().any(|h| &h.path == route))
        {
            anyhow::bail!("--aspnet-hub: no hub is mounted at {route}");
        }
        for (i, (route, _)) in config.aspnet_hubs.iter().enumerate() {
            if config.aspnet_hubs[..i].iter().any(|(r, _)| r == route) {
                anyhow::bail!("--aspnet-hub: {route} is given twice");
            }
        }
        let mut hubs = HashMap::new();
        for mut def in self.hubs {
            if let Some((_, hub_type)) = config.aspnet_hubs.iter().find(|(r, _)| *r == def.path) {
                def.options.aspnet = Some(crate::hub::AspNetOptions {
                    hub_type: hub_type.clone(),
                    channel_prefix: config.aspnet_channel_prefix.clone(),
                    ack_timeout: config.aspnet_ack_timeout,
                });
            }
            if let Some(prefix) = &config.channel_prefix {
                def.options.channel_prefix = prefix.clone();
            }
            def.options.recover_limit = config.recover_limit.max(1);
            if let Some(max) = config.max_connections_per_user {
                def.options.max_connections_per_user = max;
            }
            let lifetime = HubLifetime::new(def, backplane.clone());
            if let (Some(server), Some(o)) = (
                lifetime.aspnet_server_name(),
                &lifetime.definition().options.aspnet,
            ) {
                tracing::info!(hub = %lifetime.definition().path, hub_type = %o.hub_type,
                    channel_prefix = %o.channel_prefix, server = %server,
                    "ASP.NET Redis backplane interop on");
            }
            if let Err(e) = lifetime.start().await {
                // The backplane is down: serve anyway (not ready) and keep trying.
                tracing::warn!(hub = %lifetime.definition().path, error = %e,
                    "hub-wide backplane subscription failed; retrying in the background");
                tokio::spawn(retry_hub_start(lifetime.clone(), shutdown.clone()));
            }
            hubs.insert(lifetime.definition().path.clone(), lifetime);
        }
        let hub_list: Arc<Vec<Arc<HubLifetime>>> = Arc::new(hubs.values().cloned().collect());
        let router = crate::http::relay::Router::new(config.node_id.clone(), backplane.clone());
        tokio::spawn(resync_worker(
            resync,
            hub_list.clone(),
            router.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(crate::http::relay::watch_nodes(
            Arc::downgrade(&router),
            shutdown.clone(),
        ));
        if let Err(e) = backplane.subscribe(&[router.channel()]).await {
            // As with the hub channels: keep trying in the background (relays to this node
            // fail, and clients start over, until it is active).
            tracing::warn!(error = %e, "node channel subscribe failed; retrying");
            let (backplane, channel) = (backplane.clone(), router.channel());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if backplane
                        .subscribe(std::slice::from_ref(&channel))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            });
        }

        // The Azure SignalR data-plane REST API and client redirect (`--azure-access-key`).
        let azure = match config.azure_access_key.as_deref() {
            Some("") => anyhow::bail!("--azure-access-key is empty"),
            Some(key) => Some(Arc::new(crate::azure::RestApi::new(key, hubs.values()))),
            None => None,
        };
        let feed_hub = config.feed_hub.as_ref().and_then(|p| hubs.get(p).cloned());
        // The demo post service runs only where demo identities do.
        let demo = match (&feed_hub, config.dev_identities) {
            (Some(hub), true) => {
                let store = self.demo_store.unwrap_or_else(|| {
                    Arc::new(MemoryStore::new(crate::demo::MEMORY_STORE_CAPACITY))
                });
                let publisher = self
                    .demo_publisher
                    .unwrap_or_else(|| Arc::new(HubPublisher::new(hub.clone())));
                Some(Arc::new(DemoService::new(
                    store,
                    publisher,
                    self.demo_users,
                )))
            }
            _ => None,
        };
        // The services mounted beside the hubs (see `http::mount`): the demo page and its
        // post service.
        let demo: Arc<dyn Mount> = Arc::new(DemoRoutes::new(demo, auth.clone(), self.demo_page));
        let mut mounts = Mounts::new();
        mounts
            .mount(Route::exact("/").method(http::Method::GET), demo.clone())
            .mount(
                Route::exact("/app.js").method(http::Method::GET),
                demo.clone(),
            )
            .mount(
                Route::exact("/app.css").method(http::Method::GET),
                demo.clone(),
            )
            .mount(Route::prefix("/demo/"), demo);
        if let Some(api) = &azure {
            let api: Arc<dyn Mount> = api.clone();
            for prefix in crate::azure::ROUTE_PREFIXES {
                mounts.mount(Route::prefix(prefix), api.clone());
            }
        }
        for (route, service) in self.mounts {
            mounts.mount(route, service);
        }
        let draining = Arc::new(AtomicBool::new(false));
        let ready = {
            let backplane = backplane.clone();
            let draining = draining.clone();
            let extra = self.extra_ready;
            Box::new(move || {
                if draining.load(Ordering::Relaxed) {
                    return Err("shutting down".to_string());
                }
                if !backplane.is_ready() {
                    return Err(format!("backplane '{}' not connected", backplane.name()));
                }
                for check in &extra {
                    check()?;
                }
                Ok(())
            })
        };
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let tracker = TaskTracker::new();
        let admission = Admission::new(config.limits.clone(), crate::http::limits::fd_limit());
        tracing::info!(
            max_connections = admission.max_connections(),
            per_address = config.limits.max_connections_per_address,
            connect_rate_per_address = config.limits.connect_rate_per_address,
            "connection limits"
        );
        let state = Arc::new(HttpState {
            hubs,
            auth,
            tokens: Tokens::for_node(&token_key, &config.node_id),
            connections: crate::http::connections::Connections::new(),
            config: HttpConfig {
                api_key: config.api_key.clone(),
                cors_origins: config.cors_origins.clone(),
                max_publish_body: config.max_publish_body,
                dev_identities: config.dev_identities,
            },
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            ready,
            feed_hub,
            router: router.clone(),
            mounts,
            admission,
            tls,
            gateway: azure.map(|api| api as Arc<dyn crate::http::mount::HubGateway>),
        });
        // Relay messages of this node's channel are served with the HTTP state
        // (`http::on_relay_frame`); until the workers start, deliveries wait in their queues.
        for rx in receivers {
            tokio::spawn(dispatch_worker(rx, hub_list.clone(), state.clone()));
        }
        if state.auth.is_development() {
            tracing::warn!(
                "DEVELOPMENT MODE: no --jwt-secret, --jwt-public-key or --jwt-jwks-url given; tokens are signed with a public development secret. Do not expose this server."
            );
        }
        if let Some(jwks) = state.auth.jwks() {
            // Fetches the key set at once, then keeps it fresh; a token arriving before the
            // first fetch ends waits for it (`Authenticator::prepare`).
            tokio::spawn(jwks.clone().refresh_loop(shutdown.clone()));
        }
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        tokio::spawn(prune_rates(state.admission.clone(), shutdown.clone()));
        tracing::info!(addr = %local_addr, node = %config.node_id, "listening");
        Ok(Server {
            local_addr,
            state,
            shutdown_timeout: config.shutdown_timeout,
            accept,
            draining,
            backplane,
        })
    }
}

async fn retry_hub_start(hub: Arc<HubLifetime>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if hub.start().await.is_ok() {
            tracing::info!(hub = %hub.definition().path, "hub-wide backplane subscription active");
            return;
        }
    }
}

async fn dispatch_worker(
    mut rx: mpsc::Receiver<Delivery>,
    hubs: Arc<Vec<Arc<HubLifetime>>>,
    state: Arc<HttpState>,
) {
    while let Some(d) = rx.recv().await {
        if let crate::backplane::BackplanePayload::Relay(frame) = &d.message.payload {
            crate::http::on_relay_frame(&state, frame);
            continue;
        }
        for hub in hubs.iter() {
            if let Some(target) = hub.scheme().parse(&d.channel) {
                hub.on_delivery(&target, &d.message);
                break;
            }
        }
    }
}

/// Lost backplane messages (dropped by a full dispatch queue, or missed during a
/// reconnect): the hubs repair the affected users' feeds from history, and when relay
/// frames of this node's channel may be among them, the forwarded requests in flight fail
/// (`Router::frames_lost`; a lost poll answer or stream frame cannot be repaired).
async fn resync_worker(
    inbox: Inbox,
    hubs: Arc<Vec<Arc<HubLifetime>>>,
    router: Arc<crate::http::relay::Router>,
    shutdown: CancellationToken,
) {
    let node_channel = router.channel();
    loop {
        let which = tokio::select! {
            _ = shutdown.cancelled() => return,
            w = inbox.next_resync() => w,
        };
        let relays_hit = match &which {
            crate::backplane::Resync::All => true,
            crate::backplane::Resync::Channels(channels) => channels.contains(&node_channel),
        };
        if relays_hit {
            router.frames_lost();
        }
        for hub in hubs.iter() {
            hub.resync(&which);
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<HttpState>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => { backoff = Duration::from_millis(5); s }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning. (The total cap in
                    // `http::limits` is kept below the descriptor limit so this stays rare.)
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // Admission before anything is read: the total and per-address caps.
        let slot = match state.admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                state.admission.refuse(stream, why);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_stream(stream, peer.ip(), slot, state.clone()));
    }
}

/// One admitted socket, in its own task: the TLS handshake when TLS is on (bounded by its
/// deadline, and by shutdown), then HTTP with the time limits of `http::conn`. The admission
/// slot is held throughout.
async fn serve_stream(stream: TcpStream, peer: IpAddr, slot: Slot, state: Arc<HttpState>) {
    let Some(tls) = state.tls.clone() else {
        return crate::http::conn::serve_connection(stream, peer, Some(slot), state).await;
    };
    let accepted = tokio::select! {
        r = tls.accept(stream) => r,
        _ = state.shutdown.cancelled() => return,
    };
    match accepted {
        Ok(stream) => crate::http::conn::serve_connection(stream, peer, Some(slot), state).await,
        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
    }
}

/// Forgets idle per-address rate buckets now and then (bounded memory, see `http::limits`).
async fn prune_rates(admission: Arc<Admission>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => admission.prune(),
        }
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    state: Arc<HttpState>,
    shutdown_timeout: Duration,
    accept: JoinHandle<()>,
    draining: Arc<AtomicBool>,
    backplane: Arc<dyn Backplane>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The listener's TLS (certificate reload: [`Tls::reload`]), when it serves TLS.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.state.tls.as_ref()
    }

    /// `https://ADDR` with TLS, `http://ADDR` without.
    pub fn base_url(&self) -> String {
        let scheme = if self.state.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.local_addr)
    }

    /// `IHubContext`: send to a hub's clients from outside any connection.
    pub fn clients(&self, hub_path: &str) -> Option<Clients> {
        self.hub(hub_path).map(|h| Clients::new(h, None))
    }

    /// `IHubContext.Groups`: add or remove any connection (on any node) to or from groups.
    pub fn groups(&self, hub_path: &str) -> Option<Groups> {
        self.hub(hub_path).map(Groups::new)
    }

    /// A hub's runtime.
    pub fn hub(&self, hub_path: &str) -> Option<Arc<HubLifetime>> {
        self.state.hubs.get(hub_path).cloned()
    }

    /// Server-Sent Events and Long Polling requests this server forwarded to the node that
    /// owns their connection (no sticky sessions, see `http::forward`).
    pub fn forwarded_requests(&self) -> u64 {
        self.state.router.forwarded_requests()
    }

    /// Forwarded requests this server served for other nodes.
    pub fn served_forwarded_requests(&self) -> u64 {
        self.state.router.served_requests()
    }

    /// The backplane.
    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// Issues a token for `user` (tests, examples, development identities).
    pub fn issue_token(&self, user: &str, ttl_secs: u64) -> Option<String> {
        self.state.auth.issue(user, ttl_secs).ok()
    }

    /// Graceful shutdown: fail readiness, stop accepting, send Close with
    /// `allowReconnect: true` to every connection, wait for them up to the configured
    /// deadline.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Relaxed);
        self.state.shutdown.cancel();
        self.accept.abort();
        self.state.tracker.close();
        let deadline = self.shutdown_timeout;
        if tokio::time::timeout(deadline, self.state.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.state.tracker.len(),
                "shutdown deadline passed with connections still open"
            );
        }
    }

    /// Runs until SIGINT or SIGTERM ([`wait_for_signal`]), then shuts down gracefully.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Waits for SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
