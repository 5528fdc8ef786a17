//! The `feedhub` binary: parses flags (each with an environment twin), starts the server
//! with the feed hub, and runs until SIGINT/SIGTERM. With `--tls-cert`/`--tls-key`, SIGHUP
//! reloads the certificate and key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::Parser;
use feedhub::auth::{self, jwks, JwtOptions};
use feedhub::backplane::history;
use feedhub::backplane::redis::RedisConfig;
use feedhub::demo::amqp_publisher::AmqpPublisher;
use feedhub::demo::redis_store::RedisStore;
use feedhub::http::limits::{self, LimitsConfig};
use feedhub::ingest::amqp::{self, AmqpConfig, AmqpIngest};
use feedhub::tls::TlsConfig;
use feedhub::{feed, ServerBuilder, ServerConfig};

/// A SignalR-compatible hub server for live feeds.
#[derive(Debug, Parser)]
#[command(name = "feedhub", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FEEDHUB_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Redis URL: use Redis as the backplane (default: in-memory, single instance).
    #[arg(long, env = "FEEDHUB_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of the non-user backplane channels (`<prefix>:/hubs/feed:all`, …); give each
    /// deployment sharing one Redis its own.
    #[arg(long, env = "FEEDHUB_CHANNEL_PREFIX", default_value = "feedhub")]
    channel_prefix: String,
    /// RabbitMQ URL (`amqp://guest:guest@127.0.0.1:5672/%2f`): consume feed events.
    #[arg(long, env = "FEEDHUB_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// RabbitMQ topic exchange feed events are published to.
    #[arg(long, env = "FEEDHUB_AMQP_EXCHANGE", default_value = amqp::DEFAULT_EXCHANGE)]
    amqp_exchange: String,
    /// RabbitMQ quorum queue (single active consumer) shared by all instances (its dead
    /// letters go to `<queue>.dlx`).
    #[arg(long, env = "FEEDHUB_AMQP_QUEUE", default_value = amqp::DEFAULT_QUEUE)]
    amqp_queue: String,
    /// RabbitMQ prefetch (unacked deliveries in flight per instance).
    #[arg(long, env = "FEEDHUB_AMQP_PREFETCH", default_value_t = amqp::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(1..))]
    amqp_prefetch: u16,
    /// RabbitMQ deliveries handed to the backplane as one ordered batch (at most).
    #[arg(long, env = "FEEDHUB_AMQP_BATCH", default_value_t = amqp::DEFAULT_MAX_BATCH as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    amqp_batch: u16,
    /// RabbitMQ heartbeat in seconds (0: the broker's, 60 s): a hung broker connection, and
    /// on the broker's side a hung active consumer, is noticed after about this long.
    #[arg(long, env = "FEEDHUB_AMQP_HEARTBEAT", default_value_t = amqp::DEFAULT_HEARTBEAT_SECS)]
    amqp_heartbeat: u16,
    /// HS256 secret for client JWTs, at least 32 bytes (without it and without public
    /// keys: development mode).
    #[arg(long, env = "FEEDHUB_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM file of a public key (RSA, EC P-256/P-384 or Ed25519) verifying RS*/PS*/ES*/EdDSA
    /// JWTs (repeat, or comma-separate).
    #[arg(long, env = "FEEDHUB_JWT_PUBLIC_KEY", value_delimiter = ',')]
    jwt_public_key: Vec<PathBuf>,
    /// https:// URL of the identity provider's JSON Web Key Set (fetched, cached, refreshed).
    #[arg(long, env = "FEEDHUB_JWT_JWKS_URL")]
    jwt_jwks_url: Option<String>,
    /// PEM file of extra CA certificates to trust for the JWKS fetch.
    #[arg(long, env = "FEEDHUB_JWT_JWKS_CA")]
    jwt_jwks_ca: Option<PathBuf>,
    /// Seconds between background refreshes of the key set.
    #[arg(long, env = "FEEDHUB_JWT_JWKS_REFRESH_SECS", default_value_t = jwks::DEFAULT_REFRESH.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    jwt_jwks_refresh_secs: u64,
    /// Shortest time, in seconds, between two key set fetches caused by unknown key ids.
    #[arg(long, env = "FEEDHUB_JWT_JWKS_MIN_REFETCH_SECS", default_value_t = jwks::DEFAULT_MIN_REFETCH.as_secs())]
    jwt_jwks_min_refetch_secs: u64,
    /// Accepted `iss` claim (repeat, or comma-separate); not checked when absent.
    #[arg(long, env = "FEEDHUB_JWT_ISSUER", value_delimiter = ',')]
    jwt_issuer: Vec<String>,
    /// Accepted `aud` claim (repeat, or comma-separate); not checked when absent.
    #[arg(long, env = "FEEDHUB_JWT_AUDIENCE", value_delimiter = ',')]
    jwt_audience: Vec<String>,
    /// Accept JWTs without `exp` (they never expire).
    #[arg(long, env = "FEEDHUB_JWT_ALLOW_NO_EXP")]
    jwt_allow_no_exp: bool,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(long, env = "FEEDHUB_JWT_LEEWAY_SECS", default_value_t = auth::DEFAULT_LEEWAY_SECS)]
    jwt_leeway_secs: u64,
    /// The claim holding the user id (default: `sub`, else ASP.NET's nameidentifier claim).
    #[arg(long, env = "FEEDHUB_JWT_USER_CLAIM")]
    jwt_user_claim: Option<String>,
    /// Key of negotiate's connection tokens, shared by instances without sticky sessions
    /// (at least 32 bytes; default: derived from --jwt-secret).
    #[arg(long, env = "FEEDHUB_CONNECTION_KEY", hide_env_values = true)]
    connection_key: Option<String>,
    /// API key for POST /api/feed.
    #[arg(long, env = "FEEDHUB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Access key of the Azure SignalR Service data-plane REST API (`/api/hubs/…`) and
    /// serverless client redirect (`/client/…`): a backend using the connection string
    /// `Endpoint=http://<this server>;AccessKey=<key>;Version=1.0;` works unchanged.
    #[arg(long, env = "FEEDHUB_AZURE_ACCESS_KEY", hide_env_values = true)]
    azure_access_key: Option<String>,
    /// Origins allowed for CORS (repeat, or comma-separate; `*` for any).
    #[arg(long, env = "FEEDHUB_CORS_ORIGINS", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Serve demo identities at /dev/token even with a JWT secret.
    #[arg(long, env = "FEEDHUB_DEV_IDENTITIES")]
    dev_identities: bool,
    /// Feed events kept per user for Recover and gap repair.
    #[arg(long, env = "FEEDHUB_HISTORY_SIZE", default_value_t = history::DEFAULT_HISTORY_SIZE,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|v| v as usize))]
    history_size: usize,
    /// Seconds a feed event is kept (a user's history expires this long after their last
    /// event; the position, for `recovered: true`, lives max(4 × this, 24 h)).
    #[arg(long, env = "FEEDHUB_HISTORY_TTL_SECS", default_value_t = history::DEFAULT_HISTORY_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    history_ttl_secs: u64,
    /// Most events one Recover call returns (more missed: recovered false).
    #[arg(long, env = "FEEDHUB_RECOVER_LIMIT", default_value_t = history::DEFAULT_RECOVER_LIMIT,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|v| v as usize))]
    recover_limit: usize,
    /// Development mode (no --jwt-secret) may listen on a non-loopback address.
    #[arg(long, env = "FEEDHUB_DEV_MODE_PUBLIC")]
    dev_mode_public: bool,
    /// Seconds a request head may take to arrive (slowloris guard).
    #[arg(long, env = "FEEDHUB_HEADER_READ_TIMEOUT_SECS", default_value_t = limits::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_secs: u64,
    /// Seconds an HTTP connection may stay idle between requests.
    #[arg(long, env = "FEEDHUB_IDLE_TIMEOUT_SECS", default_value_t = limits::DEFAULT_IDLE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_secs: u64,
    /// Seconds a request body may take to arrive (408 after).
    #[arg(long, env = "FEEDHUB_BODY_READ_TIMEOUT_SECS", default_value_t = limits::DEFAULT_BODY_READ_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    body_read_timeout_secs: u64,
    /// Open connections in total (503 over it); lowered below the descriptor limit.
    #[arg(long, env = "FEEDHUB_MAX_CONNECTIONS", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Open connections per client address, IPv6 per /64 (429 over it; 0: no cap).
    #[arg(long, env = "FEEDHUB_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = limits::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS)]
    max_connections_per_address: usize,
    /// Negotiate/connect requests per second per client address (429 over it; 0: no limit).
    #[arg(long, env = "FEEDHUB_CONNECT_RATE_PER_ADDRESS", default_value_t = limits::DEFAULT_CONNECT_RATE_PER_ADDRESS)]
    connect_rate_per_address: u32,
    /// Burst allowance of --connect-rate-per-address.
    #[arg(long, env = "FEEDHUB_CONNECT_BURST_PER_ADDRESS", default_value_t = limits::DEFAULT_CONNECT_BURST_PER_ADDRESS)]
    connect_burst_per_address: u32,
    /// Connections one user may hold per hub on this instance (0: no cap).
    #[arg(long, env = "FEEDHUB_MAX_CONNECTIONS_PER_USER", default_value_t = feedhub::hub::builder::DEFAULT_MAX_CONNECTIONS_PER_USER)]
    max_connections_per_user: usize,
    /// Share the Redis backplane with ASP.NET Core SignalR servers for a hub:
    /// `<route>=<hub type full name>`, e.g. `/hubs/feed=MyApp.Hubs.FeedHub`. Repeat the flag,
    /// or separate with commas (FEEDHUB_ASPNET_HUB). Needs --redis-url.
    #[arg(long = "aspnet-hub", env = "FEEDHUB_ASPNET_HUB", value_delimiter = ',',
          value_parser = parse_aspnet_hub)]
    aspnet_hub: Vec<(String, String)>,
    /// The ASP.NET servers' StackExchange.Redis `ChannelPrefix` (prepended to their channel
    /// names with no separator; default empty).
    #[arg(long, env = "FEEDHUB_ASPNET_CHANNEL_PREFIX", default_value = "")]
    aspnet_channel_prefix: String,
    /// PEM certificate chain (leaf first): serve HTTPS/WSS instead of HTTP; SIGHUP reloads it.
    #[arg(long, env = "FEEDHUB_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, env = "FEEDHUB_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// `<route>=<hub type>` of --aspnet-hub.
fn parse_aspnet_hub(s: &str) -> Result<(String, String), String> {
    let (route, hub) = s.split_once('=').ok_or_else(|| {
        format!("expected <route>=<hub type>, e.g. /hubs/feed=MyApp.Hubs.FeedHub; got '{s}'")
    })?;
    let (route, hub) = (route.trim(), hub.trim());
    if !route.starts_with('/') {
        return Err(format!("the route '{route}' must start with '/'"));
    }
    if hub.is_empty() || hub.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("'{hub}' is not a hub type name"));
    }
    Ok((route.to_string(), hub.to_string()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !args.aspnet_hub.is_empty() && args.redis_url.is_none() {
        anyhow::bail!("--aspnet-hub needs --redis-url: ASP.NET servers are reached through Redis");
    }
    // The usual soft limit of 1,024 descriptors would cap the server at a few hundred
    // clients; the total connection cap is then kept below whatever limit is in force.
    if let Some(fds) = limits::raise_fd_limit() {
        tracing::info!(fds, "descriptor limit (RLIMIT_NOFILE)");
    }
    // A malformed URL is a startup error; an unreachable Redis is not (the server starts
    // not ready and keeps reconnecting).
    let redis = match &args.redis_url {
        Some(url) => {
            Some(RedisConfig::from_url(url).map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?)
        }
        None => None,
    };
    let development =
        args.jwt_secret.is_none() && args.jwt_public_key.is_empty() && args.jwt_jwks_url.is_none();
    let jwt = JwtOptions {
        public_keys: args.jwt_public_key,
        jwks: args.jwt_jwks_url.map(|url| jwks::JwksConfig {
            ca: args.jwt_jwks_ca,
            refresh_interval: Duration::from_secs(args.jwt_jwks_refresh_secs),
            min_refetch_interval: Duration::from_secs(args.jwt_jwks_min_refetch_secs),
            ..jwks::JwksConfig::new(url)
        }),
        issuers: args.jwt_issuer,
        audiences: args.jwt_audience,
        allow_no_exp: args.jwt_allow_no_exp,
        leeway_secs: args.jwt_leeway_secs,
        user_claim: args.jwt_user_claim,
    };
    let config = ServerConfig {
        listen: args.listen,
        jwt_secret: args.jwt_secret,
        jwt,
        connection_key: args.connection_key,
        api_key: args.api_key,
        azure_access_key: args.azure_access_key,
        cors_origins: args.cors_origin,
        dev_identities: development || args.dev_identities,
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        channel_prefix: Some(args.channel_prefix.clone()),
        history_size: args.history_size,
        history_ttl: std::time::Duration::from_secs(args.history_ttl_secs),
        recover_limit: args.recover_limit,
        limits: LimitsConfig {
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
            max_connections: args.max_connections,
            max_connections_per_address: args.max_connections_per_address,
            connect_rate_per_address: args.connect_rate_per_address,
            connect_burst_per_address: args.connect_burst_per_address,
        },
        max_connections_per_user: Some(args.max_connections_per_user),
        dev_mode_public: args.dev_mode_public,
        aspnet_hubs: args.aspnet_hub,
        aspnet_channel_prefix: args.aspnet_channel_prefix,
        ..ServerConfig::default()
    };
    let dev_identities = config.dev_identities;
    let max_publish_body = config.max_publish_body;
    let ingest = args.amqp_url.map(|url| {
        AmqpIngest::new(AmqpConfig {
            exchange: args.amqp_exchange,
            queue: args.amqp_queue,
            prefetch: args.amqp_prefetch,
            max_batch: usize::from(args.amqp_batch),
            heartbeat: (args.amqp_heartbeat > 0)
                .then(|| std::time::Duration::from_secs(u64::from(args.amqp_heartbeat))),
            max_message_size: max_publish_body,
            ..AmqpConfig::new(url)
        })
    });
    let mut builder = ServerBuilder::new(config).hub(feed::feed_hub());
    if let Some(ingest) = &ingest {
        builder = builder.ready_check(ingest.ready_check());
    }
    if let Some(redis) = redis {
        tracing::info!(redis = %redis.address(), "using the Redis backplane");
        builder = builder.redis(redis);
    }
    if let (Some(url), true) = (&args.redis_url, dev_identities) {
        // The demo's posts in the same Redis, so every instance serves the same history.
        let store = RedisStore::new(url, &format!("{}:demo:", args.channel_prefix))
            .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?;
        builder = builder.demo_store(Arc::new(store));
    }
    if let (Some(ingest), true) = (&ingest, dev_identities) {
        // The demo's posts go to the FeedUpdate exchange, like any post service's.
        let c = ingest.config();
        builder = builder.demo_publisher(Arc::new(AmqpPublisher::new(
            c.url.clone(),
            c.exchange.clone(),
        )));
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        builder = builder.tls(TlsConfig::new(cert, key));
    }
    let server = builder.start().await?;
    #[cfg(unix)]
    if let Some(tls) = server.tls() {
        tokio::spawn(feedhub::tls::reload_on_sighup(tls.clone()));
    }
    tracing::info!("feed hub at {}{}", server.base_url(), feed::FEED_HUB_PATH);
    if let Some(ingest) = &ingest {
        let hub = server
            .hub(feed::FEED_HUB_PATH)
            .ok_or_else(|| anyhow::anyhow!("feed hub missing"))?;
        ingest.start(hub);
    }
    feedhub::app::wait_for_signal().await;
    tracing::info!("shutting down");
    // Stop consuming first: unacked events go back to the queue for the other instances.
    if let Some(ingest) = &ingest {
        ingest.stop().await;
    }
    server.shutdown().await;
    Ok(())
}
