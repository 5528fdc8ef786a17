//! The `feedhub` binary: parses flags (each with an environment twin), starts the server
//! with the feed hub, and runs until SIGINT/SIGTERM. With `--tls-cert`/`--tls-key`, SIGHUP
//! reloads the certificate and key.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;

use clap::Parser;
use feedhub::backplane::redis::RedisConfig;
use feedhub::demo::amqp_publisher::AmqpPublisher;
use feedhub::demo::redis_store::RedisStore;
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
    /// RabbitMQ queue shared by all instances (its dead letters go to `<queue>.dlx`).
    #[arg(long, env = "FEEDHUB_AMQP_QUEUE", default_value = amqp::DEFAULT_QUEUE)]
    amqp_queue: String,
    /// RabbitMQ prefetch (unacked deliveries in flight per instance).
    #[arg(long, env = "FEEDHUB_AMQP_PREFETCH", default_value_t = amqp::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(1..))]
    amqp_prefetch: u16,
    /// HS256 secret for client JWTs (without it: development mode).
    #[arg(long, env = "FEEDHUB_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// API key for POST /api/feed.
    #[arg(long, env = "FEEDHUB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Origins allowed for CORS (repeat, or comma-separate; `*` for any).
    #[arg(long, env = "FEEDHUB_CORS_ORIGINS", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Serve demo identities at /dev/token even with a JWT secret.
    #[arg(long, env = "FEEDHUB_DEV_IDENTITIES")]
    dev_identities: bool,
    /// PEM certificate chain (leaf first): serve HTTPS/WSS instead of HTTP; SIGHUP reloads it.
    #[arg(long, env = "FEEDHUB_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long, env = "FEEDHUB_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // A malformed URL is a startup error; an unreachable Redis is not (the server starts
    // not ready and keeps reconnecting).
    let redis = match &args.redis_url {
        Some(url) => {
            Some(RedisConfig::from_url(url).map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?)
        }
        None => None,
    };
    let development = args.jwt_secret.is_none();
    let config = ServerConfig {
        listen: args.listen,
        jwt_secret: args.jwt_secret,
        api_key: args.api_key,
        cors_origins: args.cors_origin,
        dev_identities: development || args.dev_identities,
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        channel_prefix: Some(args.channel_prefix.clone()),
        ..ServerConfig::default()
    };
    let dev_identities = config.dev_identities;
    let max_publish_body = config.max_publish_body;
    let ingest = args.amqp_url.map(|url| {
        AmqpIngest::new(AmqpConfig {
            exchange: args.amqp_exchange,
            queue: args.amqp_queue,
            prefetch: args.amqp_prefetch,
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
