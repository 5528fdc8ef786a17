//! The HTTP layer's shared state, [`HttpState`]: what the router, the transports and the
//! cross-node exchanges (`http::forward`, `http::relay`) serve requests with. The
//! composition root (`app`) builds it from concrete parts and hands it to the accept loop
//! and to the backplane dispatch workers; nothing in the HTTP layer reaches back to `app`.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connections::Connections;
use super::limits::Admission;
use super::mount::{HubGateway, Mounts};
use super::negotiate::Tokens;
use super::relay::Router;
use crate::auth::Authenticator;
use crate::hub::HubLifetime;
use crate::tls::Tls;

/// The settings the HTTP layer reads per request (from `ServerConfig`).
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Key for `POST /api/feed`; `None` disables the publish API.
    pub api_key: Option<String>,
    /// Origins allowed for CORS with credentials (see `http::origin`).
    pub cors_origins: Vec<String>,
    /// Largest `POST /api/feed` body.
    pub max_publish_body: usize,
    /// Serve `/dev/token` (demo identities).
    pub dev_identities: bool,
}

/// Readiness: `Ok` when ready, the reason otherwise (`/readyz`).
pub type ReadyCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Shared state of the HTTP layer.
pub struct HttpState {
    pub(crate) hubs: HashMap<String, Arc<HubLifetime>>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) tokens: Tokens,
    pub(crate) connections: Connections,
    pub(crate) config: HttpConfig,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) ready: ReadyCheck,
    pub(crate) feed_hub: Option<Arc<HubLifetime>>,
    /// Resume slots of this node's stateful connections and relayed transports
    /// (no sticky sessions, see `http::relay`).
    pub(crate) router: Arc<Router>,
    /// Services mounted by the composition root (the demo, a REST API; see `http::mount`).
    pub(crate) mounts: Mounts,
    /// Connection counters and per-address rates (`http::limits`).
    pub(crate) admission: Arc<Admission>,
    /// TLS on the listener (`--tls-cert`/`--tls-key`); `None` serves plain HTTP.
    pub(crate) tls: Option<Arc<Tls>>,
    /// Another way into the hubs (the Azure SignalR client redirect; see
    /// `http::mount::HubGateway`).
    pub(crate) gateway: Option<Arc<dyn HubGateway>>,
}
