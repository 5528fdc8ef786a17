//! The Redis backplane (`--redis-url`): scale-out across any number of feedhub instances.
//!
//! Per instance there are exactly two Redis connections:
//!
//! - **one pub/sub connection** for every channel of every hub on this node. Its socket is
//!   read by a reader task that decodes each message ([`super::envelope`]) and hands it to
//!   the [`Inbox`] without waiting (a full dispatch queue drops and counts; Redis is never
//!   blocked). Its writes belong to the supervisor task, which owns the connection's life.
//! - **one multiplexed publishing connection** (the `redis` crate's `MultiplexedConnection`),
//!   shared by every publisher on the node.
//!
//! Subscriptions: the set of channels this node should listen to (`desired`) is the source
//! of truth. [`Backplane::subscribe`] adds to it and asks the supervisor to reconcile; the
//! supervisor drains every request queued meanwhile and sends one `SUBSCRIBE` (and one
//! `UNSUBSCRIBE`) for the whole batch, at most [`RedisConfig::batch_size`] channels per
//! command, then waits until Redis confirmed *every* channel before answering. So
//! subscribe returns only once the subscription is active, and concurrent connects share
//! round trips.
//!
//! Reconnect: when the pub/sub connection drops (EOF, error, or no reply to a PING within
//! three ping intervals), `is_ready()` turns false (`/readyz` 503), the publisher is
//! dropped, and the supervisor reconnects with exponential backoff (with jitter). On
//! reconnect it resubscribes every channel in `desired`, in batches, before it reports
//! ready again; it logs and counts reconnects, resubscribed channels and the resubscribe
//! time (`/metrics`). Client connections stay open throughout. While disconnected,
//! [`Backplane::publish`] fails at once with [`BackplaneError::Unavailable`] (the caller
//! may nack and retry), and [`Backplane::subscribe`] waits at most
//! [`RedisConfig::op_timeout`] for the connection before failing.
//!
//! Feed history ([`Backplane::append`], [`Backplane::history`]) runs the Lua script of
//! [`super::redis_history`] on the publishing connection: a batch of appends is one
//! script call per up to 256 events, in one pipeline (one round trip). After a reconnect the inbox is told to resync
//! ([`Inbox::resync_all`]): whatever was published while this node was not subscribed is
//! read back from history by the hubs, and the forwarded HTTP exchanges in flight fail
//! (`http::forward`: a lost poll answer or stream frame cannot be read back).
//!
//! The Azure REST API's user groups ([`Backplane::user_group_add`]) are one sorted set per
//! hub and user, `<scope>:ugroups:<user>`, scored by each membership's end (Unix ms) and
//! expiring with the last one (a Lua script adds, trims and sets the expiry atomically).
//!
//! Channel names are documented in [`super::channel`]; payloads in [`super::envelope`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::redis_history::{Failure, HistoryScript};
use super::resp::{write_command, Frame, RespReader};
use super::{
    envelope, Appended, Backplane, BackplaneError, BackplaneMessage, Channel, Delivery, FeedAppend,
    HistoryConfig, HistoryPage, Inbox,
};
use crate::metrics::{inc, METRICS};

/// Settings of the Redis backplane. Build with [`RedisConfig::from_url`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    client: ::redis::Client,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
    /// Longest wait of a publish, a subscribe, or one batch confirmation (default 2 s).
    pub op_timeout: Duration,
    /// Longest wait for a TCP connection to Redis (default 2 s).
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max` (default 50 ms).
    pub backoff_min: Duration,
    /// Largest reconnect delay (default 1 s, so delivery resumes within about a second of
    /// Redis coming back).
    pub backoff_max: Duration,
    /// Channels per SUBSCRIBE/UNSUBSCRIBE command (default 500).
    pub batch_size: usize,
    /// PING interval on the pub/sub connection (default 5 s).
    pub ping_interval: Duration,
    /// Largest message accepted from Redis; larger ones are skipped and counted
    /// (default 1 MiB).
    pub max_message_bytes: usize,
    /// Subscription requests queued for the supervisor (default 4096).
    pub request_queue: usize,
    /// History bounds and key naming (the server sets them from its flags).
    pub history: HistoryConfig,
}

impl RedisConfig {
    /// Parses `redis://[[user]:password@]host[:port][/db]`. TLS (`rediss://`) and Unix
    /// sockets are refused with a clear error.
    pub fn from_url(url: &str) -> Result<RedisConfig, BackplaneError> {
        use ::redis::{ConnectionAddr, IntoConnectionInfo};
        let info = url
            .into_connection_info()
            .map_err(|e| BackplaneError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => {
                return Err(BackplaneError::Unavailable(format!(
                    "unsupported Redis address {other:?}: only redis://host:port is supported"
                )))
            }
        };
        let settings = info.redis_settings();
        let client = ::redis::Client::open(info.clone())
            .map_err(|e| BackplaneError::Unavailable(format!("invalid Redis URL: {e}")))?;
        Ok(RedisConfig {
            client,
            host,
            port,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            op_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            batch_size: 500,
            ping_interval: Duration::from_secs(5),
            max_message_bytes: 1024 * 1024,
            request_queue: 4096,
            history: HistoryConfig::default(),
        })
    }

    /// `host:port`, for logs.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What a [`RedisBackplane`] has done, for tests and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisStats {
    /// Successful reconnects after a lost connection.
    pub reconnects: u64,
    /// Channels subscribed by the last resubscribe.
    pub last_resubscribed: u64,
    /// Duration of the last resubscribe.
    pub last_resubscribe: Duration,
    /// Channels currently subscribed on Redis.
    pub subscribed: usize,
}

struct Request {
    channels: Vec<Channel>,
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

struct Shared {
    config: RedisConfig,
    node_id: String,
    inbox: Inbox,
    desired: Mutex<HashSet<Channel>>,
    requests: mpsc::Sender<Request>,
    ready: watch::Sender<bool>,
    publisher: RwLock<Option<::redis::aio::MultiplexedConnection>>,
    /// Cancelled to force a reconnect (e.g. the publishing connection broke).
    session: Mutex<CancellationToken>,
    reconnects: AtomicU64,
    last_resubscribed: AtomicU64,
    last_resubscribe_us: AtomicU64,
    subscribed: AtomicUsize,
    malformed: AtomicU64,
    script: HistoryScript,
}

impl Shared {
    fn lock_desired(&self) -> std::sync::MutexGuard<'_, HashSet<Channel>> {
        self.desired.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_ready(&self, ready: bool) {
        self.ready.send_replace(ready);
        METRICS
            .backplane_connected
            .store(i64::from(ready), Ordering::Relaxed);
    }

    fn publisher(&self) -> Option<::redis::aio::MultiplexedConnection> {
        self.publisher
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_publisher(&self, p: Option<::redis::aio::MultiplexedConnection>) {
        *self.publisher.write().unwrap_or_else(|p| p.into_inner()) = p;
    }

    fn current_session(&self) -> CancellationToken {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_subscribed(&self, n: usize) {
        let old = self.subscribed.swap(n, Ordering::Relaxed);
        METRICS
            .backplane_subscribed
            .fetch_add(n as i64 - old as i64, Ordering::Relaxed);
    }
}

/// One node's handle on Redis. Dropping it stops the supervisor and closes both
/// connections.
pub struct RedisBackplane {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("redis", &self.shared.config.address())
            .field("node_id", &self.shared.node_id)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisBackplane {
    /// Starts the backplane for node `node_id`: spawns the supervisor, which connects (and
    /// keeps reconnecting) in the background. Must be called inside a Tokio runtime.
    pub fn new(config: RedisConfig, node_id: impl Into<String>, inbox: Inbox) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(config.request_queue.max(1));
        let shared = Arc::new(Shared {
            config,
            node_id: node_id.into(),
            inbox,
            desired: Mutex::new(HashSet::new()),
            requests: tx,
            ready: watch::channel(false).0,
            publisher: RwLock::new(None),
            session: Mutex::new(CancellationToken::new()),
            reconnects: AtomicU64::new(0),
            last_resubscribed: AtomicU64::new(0),
            last_resubscribe_us: AtomicU64::new(0),
            subscribed: AtomicUsize::new(0),
            malformed: AtomicU64::new(0),
            script: HistoryScript::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(supervise(shared.clone(), rx, stop.clone()));
        Arc::new(RedisBackplane { shared, stop })
    }

    /// Counters of this instance.
    pub fn stats(&self) -> RedisStats {
        let s = &self.shared;
        RedisStats {
            reconnects: s.reconnects.load(Ordering::Relaxed),
            last_resubscribed: s.last_resubscribed.load(Ordering::Relaxed),
            last_resubscribe: Duration::from_micros(s.last_resubscribe_us.load(Ordering::Relaxed)),
            subscribed: s.subscribed.load(Ordering::Relaxed),
        }
    }

    /// Waits until connected, up to `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.ready.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn request(&self, channels: Vec<Channel>) -> Result<(), BackplaneError> {
        let (tx, rx) = oneshot::channel();
        let req = Request {
            channels,
            reply: Some(tx),
        };
        let timeout = self.shared.config.op_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.shared.requests.send(req)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(BackplaneError::Unavailable("backplane stopped".into())),
            Err(_) => {
                return Err(BackplaneError::Unavailable(
                    "subscription queue full".into(),
                ))
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(BackplaneError::Unavailable(e)),
            Ok(Err(_)) => Err(BackplaneError::Unavailable("backplane stopped".into())),
            Err(_) => Err(BackplaneError::Unavailable(format!(
                "Redis did not confirm within {timeout:?}"
            ))),
        }
    }

    /// The publishing connection, if connected.
    fn connection(&self) -> Result<::redis::aio::MultiplexedConnection, BackplaneError> {
        self.shared
            .publisher()
            .filter(|_| self.is_ready())
            .ok_or_else(|| BackplaneError::Unavailable("Redis not connected".into()))
    }

    /// Maps a history script failure; a broken connection is reconnected.
    fn settle<T>(&self, result: Result<T, Failure>) -> Result<T, BackplaneError> {
        match result {
            Ok(v) => Ok(v),
            Err(Failure::Refused(e)) => Err(e),
            Err(Failure::Connection(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.shared.current_session().cancel();
                }
                Err(BackplaneError::Unavailable(format!("Redis history: {e}")))
            }
        }
    }

    /// Asks the supervisor to reconcile `channels` without waiting.
    fn nudge(&self, channels: Vec<Channel>) {
        let _ = self.shared.requests.try_send(Request {
            channels,
            reply: None,
        });
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    async fn publish(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<(), BackplaneError> {
        self.publish_reaching(channel, message).await.map(|_| ())
    }

    /// `PUBLISH`'s reply counts the subscribed clients of the one Redis this backplane
    /// talks to (no Redis Cluster, where it would count one shard's only).
    async fn publish_reaching(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<Option<usize>, BackplaneError> {
        let Some(mut conn) = self.shared.publisher().filter(|_| self.is_ready()) else {
            return Err(BackplaneError::Unavailable("Redis not connected".into()));
        };
        let payload =
            envelope::encode(&message).map_err(|e| BackplaneError::Encode(e.to_string()))?;
        let cmd = ::redis::cmd("PUBLISH")
            .arg(channel.as_str())
            .arg(payload)
            .to_owned();
        let result = tokio::time::timeout(
            self.shared.config.op_timeout,
            cmd.query_async::<i64>(&mut conn),
        )
        .await;
        match result {
            Ok(Ok(receivers)) => {
                inc(&METRICS.backplane_published);
                Ok(Some(usize::try_from(receivers).unwrap_or(0)))
            }
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    // The publishing connection is broken: reconnect both.
                    self.shared.current_session().cancel();
                }
                Err(BackplaneError::Unavailable(format!("Redis PUBLISH: {e}")))
            }
            Err(_) => Err(BackplaneError::Unavailable(format!(
                "Redis PUBLISH timed out after {:?}",
                self.shared.config.op_timeout
            ))),
        }
    }

    async fn subscribers(
        &self,
        channels: &[Channel],
    ) -> Result<Option<Vec<usize>>, BackplaneError> {
        if channels.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let mut conn = self.connection()?;
        let mut cmd = ::redis::cmd("PUBSUB");
        cmd.arg("NUMSUB");
        for ch in channels {
            cmd.arg(ch.as_str());
        }
        let reply = tokio::time::timeout(
            self.shared.config.op_timeout,
            cmd.query_async::<Vec<(String, i64)>>(&mut conn),
        )
        .await
        .map_err(|_| BackplaneError::Unavailable("Redis PUBSUB NUMSUB timed out".into()))?
        .map_err(|e| BackplaneError::Unavailable(format!("Redis PUBSUB NUMSUB: {e}")))?;
        // The reply lists the channels in the order asked.
        let counts: Vec<usize> = reply
            .into_iter()
            .map(|(_, n)| usize::try_from(n).unwrap_or(0))
            .collect();
        if counts.len() != channels.len() {
            return Err(BackplaneError::Unavailable(
                "Redis PUBSUB NUMSUB: unexpected reply".into(),
            ));
        }
        Ok(Some(counts))
    }

    async fn subscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        if channels.is_empty() {
            return Ok(());
        }
        if !self.wait_ready(self.shared.config.op_timeout).await {
            return Err(BackplaneError::Unavailable("Redis not connected".into()));
        }
        self.shared.lock_desired().extend(channels.iter().cloned());
        match self.request(channels.to_vec()).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Not subscribed as far as the caller knows: make it so on Redis too.
                let mut desired = self.shared.lock_desired();
                for ch in channels {
                    desired.remove(ch);
                }
                drop(desired);
                self.nudge(channels.to_vec());
                Err(e)
            }
        }
    }

    async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        if channels.is_empty() {
            return Ok(());
        }
        {
            let mut desired = self.shared.lock_desired();
            for ch in channels {
                desired.remove(ch);
            }
        }
        if !self.is_ready() {
            // A lost connection has no subscriptions, and reconnecting subscribes only
            // `desired`; queue a reconcile in case the connection is already back.
            self.nudge(channels.to_vec());
            return Ok(());
        }
        self.request(channels.to_vec()).await
    }

    fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    async fn append(&self, batch: &[FeedAppend]) -> Result<Vec<Appended>, BackplaneError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.connection()?;
        let cfg = &self.shared.config;
        let result = self
            .shared
            .script
            .append(
                &mut conn,
                &cfg.history,
                &self.shared.node_id,
                batch,
                cfg.op_timeout,
            )
            .await;
        let done = self.settle(result)?;
        crate::metrics::add(
            &METRICS.backplane_published,
            done.iter().filter(|a| !a.duplicate).count() as u64,
        );
        Ok(done)
    }

    async fn history(
        &self,
        user: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        let mut conn = self.connection()?;
        let cfg = &self.shared.config;
        let result = self
            .shared
            .script
            .read(&mut conn, &cfg.history, user, since, limit, cfg.op_timeout)
            .await;
        self.settle(result)
    }

    async fn user_group_add(
        &self,
        scope: &str,
        user: &str,
        group: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), BackplaneError> {
        let mut conn = self.connection()?;
        // EVAL (not EVALSHA): a rare call, and a short script.
        let cmd = ::redis::cmd("EVAL")
            .arg(USER_GROUP_ADD)
            .arg(1)
            .arg(user_groups_key(scope, user))
            .arg(now_ms)
            .arg(expires_ms)
            .arg(group)
            .arg(super::MAX_USER_GROUPS)
            .to_owned();
        self.timed("user group add", cmd.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    async fn user_group_remove(
        &self,
        scope: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<(), BackplaneError> {
        let mut conn = self.connection()?;
        let key = user_groups_key(scope, user);
        let cmd = match group {
            Some(g) => ::redis::cmd("ZREM").arg(&key).arg(g).to_owned(),
            None => ::redis::cmd("DEL").arg(&key).to_owned(),
        };
        self.timed("user group remove", cmd.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    async fn user_groups(
        &self,
        scope: &str,
        user: &str,
        now_ms: u64,
    ) -> Result<Vec<super::UserGroup>, BackplaneError> {
        let mut conn = self.connection()?;
        let cmd = ::redis::cmd("ZRANGEBYSCORE")
            .arg(user_groups_key(scope, user))
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .to_owned();
        let flat: Vec<String> = self
            .timed("user groups", cmd.query_async(&mut conn))
            .await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| match pair {
                [group, score] => Some(super::UserGroup {
                    group: group.clone(),
                    expires_ms: score.parse::<f64>().ok()? as u64,
                }),
                _ => None,
            })
            .collect())
    }
}

// ---- user groups (the Azure REST API's) ----

/// Adds one membership to a user's sorted set (scored by its end), drops ended ones and
/// those over the cap (soonest end first), and lets the key expire with its last member.
/// KEYS[1]: the set; ARGV: now (ms), end (ms), group, cap.
const USER_GROUP_ADD: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], string.format('%d', tonumber(last[2])))
return 1
";

/// The sorted set of a user's groups in hub `scope`.
fn user_groups_key(scope: &str, user: &str) -> String {
    format!("{scope}:ugroups:{user}")
}

impl RedisBackplane {
    /// Runs one command on the publishing connection within the operation timeout; a broken
    /// connection is reconnected.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, BackplaneError> {
        match tokio::time::timeout(self.shared.config.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    self.shared.current_session().cancel();
                }
                Err(BackplaneError::Unavailable(format!("Redis {what}: {e}")))
            }
            Err(_) => Err(BackplaneError::Unavailable(format!(
                "Redis {what} timed out after {:?}",
                self.shared.config.op_timeout
            ))),
        }
    }
}

// ---- the supervisor: connects, resubscribes, serves subscription requests ----

async fn supervise(shared: Arc<Shared>, mut rx: mpsc::Receiver<Request>, stop: CancellationToken) {
    let cfg = shared.config.clone();
    let mut backoff = cfg.backoff_min;
    let mut connected_before = false;
    let mut lost_at: Option<Instant> = None;
    let mut failures: u64 = 0;
    loop {
        let token = stop.child_token();
        *shared.session.lock().unwrap_or_else(|p| p.into_inner()) = token.clone();
        let established = tokio::select! {
            _ = stop.cancelled() => return,
            r = establish(&shared, token) => r,
        };
        let (mut session, resubscribed, took) = match established {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                // The first failure and then every 20th: an outage must not flood the log.
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(redis = %cfg.address(), attempt = failures, error = %e,
                        retry_in_ms = backoff.as_millis() as u64, "Redis backplane cannot connect; retrying");
                }
                let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 4);
                let delay = backoff + Duration::from_millis(jitter);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        failures = 0;
        backoff = cfg.backoff_min;
        shared.set_subscribed(session.active.len());
        if connected_before {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
            shared
                .last_resubscribed
                .store(resubscribed as u64, Ordering::Relaxed);
            shared
                .last_resubscribe_us
                .store(took.as_micros() as u64, Ordering::Relaxed);
            inc(&METRICS.backplane_reconnects);
            METRICS
                .backplane_resubscribed
                .fetch_add(resubscribed as u64, Ordering::Relaxed);
            METRICS
                .backplane_resubscribe_ms
                .store(took.as_millis() as u64, Ordering::Relaxed);
            tracing::info!(
                redis = %cfg.address(),
                channels = resubscribed,
                resubscribe_ms = took.as_millis() as u64,
                outage_ms = lost_at.map(|t| t.elapsed().as_millis() as u64),
                "Redis backplane reconnected and resubscribed"
            );
        } else {
            tracing::info!(redis = %cfg.address(), node = %shared.node_id, "Redis backplane connected");
        }
        shared.set_ready(true);
        if connected_before {
            // Messages published while the subscriptions were down are lost to this node:
            // the hubs repair their users' feeds from history.
            shared.inbox.resync_all();
        }
        connected_before = true;
        let reason = session.serve(&shared, &mut rx).await;
        shared.set_ready(false);
        shared.set_publisher(None);
        shared.set_subscribed(0);
        drop(session);
        if stop.is_cancelled() {
            return;
        }
        lost_at = Some(Instant::now());
        tracing::warn!(redis = %cfg.address(), reason = %reason,
            "Redis backplane connection lost; /readyz fails until it is back, reconnecting");
    }
}

/// Opens the pub/sub connection, resubscribes every desired channel in batches, and opens
/// the publishing connection. Returns the session, the channels resubscribed and the time
/// the resubscribe took.
async fn establish(
    shared: &Arc<Shared>,
    token: CancellationToken,
) -> Result<(Session, usize, Duration), String> {
    let cfg = &shared.config;
    let mut session = Session::open(shared, token).await?;
    let started = Instant::now();
    let channels: Vec<Channel> = shared.lock_desired().iter().cloned().collect();
    session
        .apply(b"SUBSCRIBE", &channels)
        .await
        .map_err(|e| format!("resubscribing {} channels: {e}", channels.len()))?;
    let took = started.elapsed();
    let conn = tokio::time::timeout(
        cfg.connect_timeout + cfg.op_timeout,
        cfg.client.get_multiplexed_async_connection_with_config(
            &::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(cfg.connect_timeout))
                .set_response_timeout(Some(cfg.op_timeout)),
        ),
    )
    .await
    .map_err(|_| "publishing connection timed out".to_string())?
    .map_err(|e| format!("publishing connection: {e}"))?;
    let mut conn = conn;
    shared.script.reset();
    shared
        .script
        .load(&mut conn, cfg.op_timeout)
        .await
        .map_err(|e| format!("loading the history script: {e}"))?;
    shared.set_publisher(Some(conn));
    Ok((session, channels.len(), took))
}

/// One pub/sub connection's life.
struct Session {
    writer: OwnedWriteHalf,
    acks: Arc<AtomicU64>,
    acked: Arc<Notify>,
    last_read: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    active: HashSet<Channel>,
    reader: tokio::task::JoinHandle<()>,
    batch_size: usize,
    op_timeout: Duration,
    ping_interval: Duration,
    failed: Arc<AtomicBool>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        self.lost.cancel();
    }
}

impl Session {
    async fn open(shared: &Arc<Shared>, lost: CancellationToken) -> Result<Session, String> {
        let cfg = &shared.config;
        let stream = tokio::time::timeout(
            cfg.connect_timeout,
            TcpStream::connect((cfg.host.as_str(), cfg.port)),
        )
        .await
        .map_err(|_| format!("connect timed out after {:?}", cfg.connect_timeout))?
        .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (read, mut writer) = stream.into_split();
        let mut reader = RespReader::new(read, cfg.max_message_bytes);
        if let Some(password) = &cfg.password {
            let mut out = Vec::new();
            match &cfg.username {
                Some(user) => write_command(
                    &mut out,
                    [&b"AUTH"[..], user.as_bytes(), password.as_bytes()].into_iter(),
                ),
                None => write_command(&mut out, [&b"AUTH"[..], password.as_bytes()].into_iter()),
            }
            writer.write_all(&out).await.map_err(|e| e.to_string())?;
            match tokio::time::timeout(cfg.op_timeout, reader.read_frame()).await {
                Ok(Ok(Frame::Simple(ok))) if ok == "OK" => {}
                Ok(Ok(Frame::Error(e))) => return Err(format!("AUTH failed: {e}")),
                Ok(Ok(other)) => return Err(format!("AUTH: unexpected reply {other:?}")),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("AUTH timed out".into()),
            }
        }
        let acks = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(Notify::new());
        let last_read = Arc::new(Mutex::new(Instant::now()));
        let failed = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(
            reader,
            shared.clone(),
            acks.clone(),
            acked.clone(),
            last_read.clone(),
            lost.clone(),
            failed.clone(),
        ));
        Ok(Session {
            writer,
            acks,
            acked,
            last_read,
            lost,
            active: HashSet::new(),
            reader,
            batch_size: cfg.batch_size.max(1),
            op_timeout: cfg.op_timeout,
            ping_interval: cfg.ping_interval,
            failed,
        })
    }

    /// Sends `command` (SUBSCRIBE or UNSUBSCRIBE) for `channels` in batches, each confirmed
    /// channel by channel before the next batch, and updates `active`.
    async fn apply(&mut self, command: &[u8], channels: &[Channel]) -> Result<(), String> {
        for batch in channels.chunks(self.batch_size) {
            let target = self.acks.load(Ordering::Acquire) + batch.len() as u64;
            let mut out = Vec::with_capacity(16 + batch.len() * 24);
            write_command(
                &mut out,
                std::iter::once(command)
                    .chain(batch.iter().map(|c| c.as_str().as_bytes()))
                    .collect::<Vec<_>>()
                    .into_iter(),
            );
            self.writer
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let wait = async {
                loop {
                    let notified = self.acked.notified();
                    if self.acks.load(Ordering::Acquire) >= target {
                        return;
                    }
                    notified.await;
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = self.lost.cancelled() => return Err("connection lost".into()),
                _ = tokio::time::sleep(self.op_timeout) => {
                    return Err(format!("Redis did not confirm {} channels within {:?}", batch.len(), self.op_timeout));
                }
            }
            if self.failed.load(Ordering::Acquire) {
                return Err("Redis refused the command".into());
            }
            let subscribe = command == b"SUBSCRIBE";
            for ch in batch {
                if subscribe {
                    self.active.insert(ch.clone());
                } else {
                    self.active.remove(ch);
                }
            }
        }
        Ok(())
    }

    /// Serves subscription requests until the connection is lost; returns why.
    async fn serve(&mut self, shared: &Arc<Shared>, rx: &mut mpsc::Receiver<Request>) -> String {
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            let req = tokio::select! {
                _ = self.lost.cancelled() => return "connection closed".into(),
                _ = ping.tick() => {
                    let idle = self.last_read.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                    if idle > self.ping_interval * 3 {
                        return format!("no reply from Redis for {idle:?}");
                    }
                    let mut out = Vec::new();
                    write_command(&mut out, [&b"PING"[..]].into_iter());
                    if let Err(e) = self.writer.write_all(&out).await {
                        return format!("write: {e}");
                    }
                    continue;
                }
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return "backplane dropped".into(),
                },
            };
            let mut batch = vec![req];
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let (to_sub, to_unsub) = {
                let desired = shared.lock_desired();
                let mut seen = HashSet::new();
                let mut sub = Vec::new();
                let mut unsub = Vec::new();
                for ch in batch.iter().flat_map(|r| r.channels.iter()) {
                    if !seen.insert(ch.clone()) {
                        continue;
                    }
                    match (desired.contains(ch), self.active.contains(ch)) {
                        (true, false) => sub.push(ch.clone()),
                        (false, true) => unsub.push(ch.clone()),
                        _ => {}
                    }
                }
                (sub, unsub)
            };
            let mut result = self.apply(b"SUBSCRIBE", &to_sub).await;
            if result.is_ok() {
                result = self.apply(b"UNSUBSCRIBE", &to_unsub).await;
            }
            shared.set_subscribed(self.active.len());
            for r in batch {
                if let Some(reply) = r.reply {
                    let _ = reply.send(result.clone());
                }
            }
            if let Err(e) = result {
                return e;
            }
        }
    }
}

async fn read_loop(
    mut reader: RespReader<tokio::net::tcp::OwnedReadHalf>,
    shared: Arc<Shared>,
    acks: Arc<AtomicU64>,
    acked: Arc<Notify>,
    last_read: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    failed: Arc<AtomicBool>,
) {
    loop {
        let frame = tokio::select! {
            _ = lost.cancelled() => return,
            f = reader.read_frame() => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "Redis pub/sub read ended");
                lost.cancel();
                return;
            }
        };
        *last_read.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        match frame {
            Frame::Array(items) => {
                let kind = items.first().and_then(Frame::as_bytes).unwrap_or(b"");
                match kind {
                    b"message" => on_message(&shared, &items),
                    b"subscribe" | b"unsubscribe" => {
                        acks.fetch_add(1, Ordering::AcqRel);
                        acked.notify_one();
                    }
                    _ => {} // "pong" and anything else: liveness only.
                }
            }
            Frame::Error(e) => {
                tracing::warn!(error = %e, "Redis refused a pub/sub command");
                failed.store(true, Ordering::Release);
                lost.cancel();
                return;
            }
            _ => {}
        }
    }
}

fn on_message(shared: &Shared, items: &[Frame]) {
    let (Some(Frame::Bulk(channel)), Some(payload)) = (items.get(1), items.get(2)) else {
        return;
    };
    let payload: Bytes = match payload {
        Frame::Bulk(b) => b.clone(),
        Frame::Oversize(n) => {
            malformed(shared, &format!("message of {n} bytes exceeds the limit"));
            return;
        }
        _ => return,
    };
    let Ok(channel) = std::str::from_utf8(channel) else {
        return;
    };
    match envelope::decode(payload) {
        Ok(message) => shared.inbox.deliver(Delivery {
            channel: Channel::new(channel),
            message: Arc::new(message),
        }),
        Err(e) => malformed(shared, &e.to_string()),
    }
}

fn malformed(shared: &Shared, why: &str) {
    inc(&METRICS.backplane_malformed);
    let n = shared.malformed.fetch_add(1, Ordering::Relaxed);
    if n % 1000 == 0 {
        tracing::warn!(
            count = n + 1,
            reason = why,
            "malformed backplane message dropped"
        );
    }
}
