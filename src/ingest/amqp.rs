//! RabbitMQ ingest (`--amqp-url`): consumes feed events from a topic exchange and delivers
//! them in queue order through [`super::deliver_batch`], the same path as `POST /api/feed`.
//!
//! Topology (declared idempotently on every (re)connect; names configurable for tests):
//!
//! | object | name (default) | kind |
//! |---|---|---|
//! | exchange | `FeedUpdate` | durable topic |
//! | queue | `feedhub.feed-updates.v2` | quorum queue, `x-single-active-consumer`, shared by all instances, bound with `#`, `x-dead-letter-exchange = FeedUpdate.dlx` |
//! | dead-letter exchange | `FeedUpdate.dlx` | durable fanout |
//! | dead-letter queue | `feedhub.feed-updates.v2.dlx` | durable, bound to the DLX: rejected messages are kept there |
//!
//! Routing keys: `feed.<userId>` addresses one user and the whole JSON body is the payload;
//! any other key (e.g. `feed`, `post.created`) carries a recipients body
//! `{"recipients":[...],"payload":...,"id":...}`. The queue is bound with `#`, so every
//! message published to the exchange is consumed once.
//!
//! **Order.** Every instance consumes the queue, but the queue has a *single active
//! consumer*: RabbitMQ delivers to one of them at a time and promotes a waiting one when
//! the active one's channel or connection closes (a `kill -9` closes the socket at once; a
//! hung host is noticed after the heartbeat timeout, `--amqp-heartbeat`). The active
//! consumer processes its deliveries strictly in order, in batches: it takes everything
//! already delivered (up to [`AmqpConfig::max_batch`]), hands the batch to
//! [`super::deliver_batch`] (per-user order = batch order), and acks the batch with one
//! `multiple` ack only after the backplane answered. So every user's events reach the
//! backplane in the order RabbitMQ received them, whatever the number of instances. (A
//! classic queue would do for order, but RabbitMQ 3.10.8, Debian 12's, can crash a classic
//! single-active-consumer queue when the active consumer changes (rabbitmq-server#5460), and
//! a quorum queue returns a departed consumer's messages in order; hence quorum.)
//!
//! **Fail-stop.** A backplane failure closes the channel: every unacked delivery (the failed
//! batch and everything prefetched) returns to the queue in order, and consumption backs off
//! (100 ms doubling to 5 s) and resumes (meanwhile another instance may take over). Part of
//! the failed batch may already have been delivered: redeliveries carry the same event id
//! (the body's `id`, else `message_id`, else a hash of routing key and body, see
//! [`super::event::decode_delivery`]), so they can be recognized. A malformed message (too
//! large, not JSON, no recipients, bad user id, no payload, no address) is
//! **dead-lettered**: republished to the DLX with the header `x-feedhub-reason` (plus
//! `x-feedhub-routing-key`, and the original headers), with a publisher confirm, then
//! acked; if that republish fails it is rejected without requeue, which dead-letters it
//! through the queue's `x-dead-letter-exchange` (reason only in the log and metrics). It
//! never blocks the queue.
//!
//! Connection loss: the consumer reconnects with backoff (100 ms doubling to
//! [`AmqpConfig::reconnect_max`]); `/readyz` answers 503 until it consumes again (a waiting
//! consumer counts as consuming). Unacked messages return to the queue when a connection
//! drops, so nothing is lost; a message may be delivered twice (at-least-once), with the
//! same id.
//!
//! Metrics (`/metrics`): `feedhub_amqp_connected`, `feedhub_amqp_consumed_total`,
//! `feedhub_amqp_acked_total`, `feedhub_amqp_nacked_total` (requeued after a backplane
//! failure), `feedhub_amqp_batches_total`, `feedhub_amqp_redelivered_total`,
//! `feedhub_amqp_rejected_total{reason=...}`,
//! `feedhub_amqp_reconnects_total`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::event::{decode_delivery, EventError, FeedEvent};
use crate::hub::HubLifetime;
use crate::metrics::inc;

/// Settings of the RabbitMQ consumer.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`).
    pub url: String,
    /// The topic exchange feed events are published to.
    pub exchange: String,
    /// The shared quorum queue (single active consumer) all instances consume.
    pub queue: String,
    /// Unacknowledged deliveries in flight per instance (`basic.qos`).
    pub prefetch: u16,
    /// Most deliveries handed to the backplane as one batch (and acked with one ack).
    pub max_batch: usize,
    /// AMQP heartbeat: a silent broker connection is considered dead after about this
    /// long, and RabbitMQ promotes another consumer when this one's host hangs. `None`:
    /// the broker's (RabbitMQ: 60 s). A `heartbeat=` in the URL wins.
    pub heartbeat: Option<Duration>,
    /// Largest accepted message body; larger ones are dead-lettered.
    pub max_message_size: usize,
    /// Upper bound of the reconnect backoff.
    pub reconnect_max: Duration,
    /// Upper bound of the backoff after a backplane failure.
    pub retry_max: Duration,
}

/// Default exchange name.
pub const DEFAULT_EXCHANGE: &str = "FeedUpdate";
/// Default queue name (`.v2`: a quorum queue with a single active consumer; the queue
/// arguments cannot change on an existing queue, so the name did; see README "Feed ingest"
/// for the migration from `feedhub.feed-updates`).
pub const DEFAULT_QUEUE: &str = "feedhub.feed-updates.v2";
/// The queue of releases before per-user order across instances (competing consumers).
pub const LEGACY_QUEUE: &str = "feedhub.feed-updates";
/// Default prefetch.
pub const DEFAULT_PREFETCH: u16 = 1024;
/// Default batch bound.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Default heartbeat in seconds.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-feedhub-reason";

impl AmqpConfig {
    /// Defaults for `url`: exchange `FeedUpdate`, queue `feedhub.feed-updates.v2`, prefetch
    /// 1024, batches of up to 256, heartbeat 10 s, 256 KiB bodies, reconnect backoff up to
    /// 1 s, retry backoff up to 5 s.
    pub fn new(url: impl Into<String>) -> AmqpConfig {
        AmqpConfig {
            url: url.into(),
            exchange: DEFAULT_EXCHANGE.to_string(),
            queue: DEFAULT_QUEUE.to_string(),
            prefetch: DEFAULT_PREFETCH,
            max_batch: DEFAULT_MAX_BATCH,
            heartbeat: Some(Duration::from_secs(u64::from(DEFAULT_HEARTBEAT_SECS))),
            max_message_size: 256 * 1024,
            reconnect_max: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
        }
    }

    /// The dead-letter exchange: `<exchange>.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }

    /// The dead-letter queue: `<queue>.dlx`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlx", self.queue)
    }
}

/// Why a message was dead-lettered (the `reason` label and header value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Body larger than the limit.
    TooLarge,
    /// Body is not JSON.
    NotJson,
    /// No or empty `recipients`.
    NoRecipients,
    /// More recipients than allowed.
    TooManyRecipients,
    /// A recipient is not a valid user id.
    BadUserId,
    /// No `payload`.
    NoPayload,
    /// Neither `feed.<userId>` routing key nor a recipients body.
    NoAddress,
    /// The payload nests deeper than `event::MAX_PAYLOAD_DEPTH`.
    TooDeep,
}

impl RejectReason {
    const ALL: [RejectReason; 8] = [
        RejectReason::TooLarge,
        RejectReason::NotJson,
        RejectReason::NoRecipients,
        RejectReason::TooManyRecipients,
        RejectReason::BadUserId,
        RejectReason::NoPayload,
        RejectReason::NoAddress,
        RejectReason::TooDeep,
    ];

    /// The label: `too_large`, `not_json`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::NotJson => "not_json",
            RejectReason::NoRecipients => "no_recipients",
            RejectReason::TooManyRecipients => "too_many_recipients",
            RejectReason::BadUserId => "bad_user_id",
            RejectReason::NoPayload => "no_payload",
            RejectReason::NoAddress => "no_address",
            RejectReason::TooDeep => "too_deep",
        }
    }

    fn of(e: &EventError) -> RejectReason {
        match e {
            EventError::NotJson(_) => RejectReason::NotJson,
            EventError::NoRecipients => RejectReason::NoRecipients,
            EventError::TooManyRecipients => RejectReason::TooManyRecipients,
            EventError::BadUserId(_) => RejectReason::BadUserId,
            EventError::NoPayload | EventError::ReservedOffset => RejectReason::NoPayload,
            EventError::NoAddress(_) => RejectReason::NoAddress,
            EventError::TooDeep => RejectReason::TooDeep,
        }
    }

    fn index(self) -> usize {
        RejectReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0)
    }
}

/// Counters of the RabbitMQ consumer (process-wide, like [`crate::metrics::METRICS`]).
#[derive(Debug)]
pub struct AmqpMetrics {
    /// Deliveries received.
    pub consumed: AtomicU64,
    /// Deliveries acked after a successful delivery.
    pub acked: AtomicU64,
    /// Deliveries requeued after a backplane failure (the failed batch).
    pub nacked: AtomicU64,
    /// Batches handed to the backplane.
    pub batches: AtomicU64,
    /// Deliveries flagged redelivered by RabbitMQ (after a consumer failure or a requeue).
    pub redelivered: AtomicU64,
    /// Deliveries dead-lettered, by [`RejectReason`].
    pub rejected: [AtomicU64; 8],
    /// Successful reconnects after a lost or failed connection.
    pub reconnects: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// 1 while consuming.
    pub connected: AtomicU64,
}

/// The consumer's metrics.
pub static AMQP_METRICS: AmqpMetrics = AmqpMetrics {
    consumed: AtomicU64::new(0),
    acked: AtomicU64::new(0),
    nacked: AtomicU64::new(0),
    batches: AtomicU64::new(0),
    redelivered: AtomicU64::new(0),
    rejected: [const { AtomicU64::new(0) }; 8],
    reconnects: AtomicU64::new(0),
    connect_failures: AtomicU64::new(0),
    connected: AtomicU64::new(0),
};

impl AmqpMetrics {
    /// Dead-lettered count for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    /// Prometheus text of these metrics.
    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP feedhub_amqp_connected 1 while the RabbitMQ consumer is consuming.\n# TYPE feedhub_amqp_connected gauge\nfeedhub_amqp_connected {}",
            get(&self.connected)
        );
        for (name, help, c) in [
            ("consumed", "RabbitMQ deliveries received.", &self.consumed),
            ("acked", "RabbitMQ deliveries acked.", &self.acked),
            (
                "nacked",
                "RabbitMQ deliveries requeued after a backplane failure.",
                &self.nacked,
            ),
            (
                "batches",
                "Batches of RabbitMQ deliveries handed to the backplane.",
                &self.batches,
            ),
            (
                "redelivered",
                "RabbitMQ deliveries flagged redelivered (same event id as before).",
                &self.redelivered,
            ),
            (
                "reconnects",
                "RabbitMQ reconnects after a lost connection.",
                &self.reconnects,
            ),
            (
                "connect_failures",
                "Failed RabbitMQ connection attempts.",
                &self.connect_failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP feedhub_amqp_{name}_total {help}\n# TYPE feedhub_amqp_{name}_total counter\nfeedhub_amqp_{name}_total {}",
                get(c)
            );
        }
        let _ = writeln!(
            out,
            "# HELP feedhub_amqp_rejected_total RabbitMQ messages dead-lettered as malformed.\n# TYPE feedhub_amqp_rejected_total counter"
        );
        for r in RejectReason::ALL {
            let _ = writeln!(
                out,
                "feedhub_amqp_rejected_total{{reason=\"{}\"}} {}",
                r.as_str(),
                get(&self.rejected[r.index()])
            );
        }
    }
}

/// Connection state shared with `/readyz`.
#[derive(Debug, Default)]
struct Status {
    consuming: AtomicBool,
    consumed: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// The RabbitMQ consumer. Create it before the server (for [`AmqpIngest::ready_check`]),
/// then [`AmqpIngest::start`] it with the feed hub.
pub struct AmqpIngest {
    config: AmqpConfig,
    status: Arc<Status>,
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AmqpIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpIngest")
            .field("exchange", &self.config.exchange)
            .field("queue", &self.config.queue)
            .finish_non_exhaustive()
    }
}

impl AmqpIngest {
    /// A stopped consumer with `config`.
    pub fn new(config: AmqpConfig) -> AmqpIngest {
        AmqpIngest {
            config,
            status: Arc::new(Status::default()),
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// Whether it is consuming right now.
    pub fn is_consuming(&self) -> bool {
        self.status.consuming.load(Ordering::Relaxed)
    }

    /// Deliveries this consumer received (all outcomes).
    pub fn consumed(&self) -> u64 {
        self.status.consumed.load(Ordering::Relaxed)
    }

    /// Deliveries this consumer acked after delivering them.
    pub fn acked(&self) -> u64 {
        self.status.acked.load(Ordering::Relaxed)
    }

    /// Deliveries this consumer nacked for a retry (backplane failures).
    pub fn nacked(&self) -> u64 {
        self.status.nacked.load(Ordering::Relaxed)
    }

    /// A readiness condition for `ServerBuilder::ready_check`: Err while not consuming.
    pub fn ready_check(&self) -> Arc<dyn Fn() -> Result<(), String> + Send + Sync> {
        let status = self.status.clone();
        Arc::new(move || {
            if status.consuming.load(Ordering::Relaxed) {
                return Ok(());
            }
            let why = status
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Err(match why {
                Some(e) => format!("RabbitMQ consumer not connected: {e}"),
                None => "RabbitMQ consumer not connected".to_string(),
            })
        })
    }

    /// Starts consuming for `hub` (in a background task that reconnects until
    /// [`AmqpIngest::stop`]).
    pub fn start(&self, hub: Arc<HubLifetime>) {
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if task.is_some() {
            return;
        }
        let consumer = Consumer {
            config: self.config.clone(),
            status: self.status.clone(),
            cancel: self.cancel.clone(),
            hub,
        };
        *task = Some(tokio::spawn(consumer.run()));
    }

    /// Stops consuming: cancels the consumer and closes the connection, which returns every
    /// unacked message to the queue. Waits for the task (bounded).
    pub async fn stop(&self) {
        self.cancel.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("RabbitMQ consumer did not stop within 5 s");
            }
        }
        self.status.consuming.store(false, Ordering::Relaxed);
    }
}

impl Drop for AmqpIngest {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// How a consuming session ended.
enum Ended {
    /// Stop requested.
    Cancelled,
    /// The connection or channel failed; reconnect.
    Lost(String),
    /// The backplane failed; the channel was closed to requeue in-flight messages.
    BackplaneFailed,
}

struct Consumer {
    config: AmqpConfig,
    status: Arc<Status>,
    cancel: CancellationToken,
    hub: Arc<HubLifetime>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(100);

impl Consumer {
    fn set_consuming(&self, on: bool, error: Option<String>) {
        self.status.consuming.store(on, Ordering::Relaxed);
        AMQP_METRICS.connected.store(on as u64, Ordering::Relaxed);
        *self
            .status
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }

    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn run(self) {
        let mut st = Backoffs {
            connect: MIN_BACKOFF,
            retry: MIN_BACKOFF,
            was_connected: false,
        };
        loop {
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => break,
                r = tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.config.url, self.config.heartbeat)) => r,
            };
            let conn = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    self.connect_failed(format!("connect: {e}"), st.connect);
                    if !self.sleep(st.connect).await {
                        break;
                    }
                    st.connect = (st.connect * 2).min(self.config.reconnect_max);
                    continue;
                }
                Err(_) => {
                    self.connect_failed("connect: timed out".to_string(), st.connect);
                    if !self.sleep(st.connect).await {
                        break;
                    }
                    st.connect = (st.connect * 2).min(self.config.reconnect_max);
                    continue;
                }
            };
            // One connection, possibly several channels in a row (after backplane failures).
            let lost = loop {
                match self.consume(&conn, &mut st).await {
                    Ended::BackplaneFailed => {
                        self.set_consuming(false, Some("backplane unavailable".to_string()));
                        if !self.sleep(st.retry).await {
                            break None;
                        }
                        st.retry = (st.retry * 2).min(self.config.retry_max);
                    }
                    Ended::Cancelled => break None,
                    Ended::Lost(why) => break Some(why),
                }
            };
            match lost {
                None => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "feedhub shutting down"),
                    )
                    .await;
                    break;
                }
                Some(why) => {
                    tracing::warn!(error = %why, retry_in = ?st.connect, "RabbitMQ connection lost; reconnecting");
                    self.set_consuming(false, Some(why));
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), conn.close(320, "lost")).await;
                    if !self.sleep(st.connect).await {
                        break;
                    }
                    st.connect = (st.connect * 2).min(self.config.reconnect_max);
                }
            }
        }
        self.set_consuming(false, Some("stopped".to_string()));
        tracing::info!("RabbitMQ consumer stopped");
    }

    fn connect_failed(&self, why: String, retry_in: Duration) {
        inc(&AMQP_METRICS.connect_failures);
        tracing::warn!(error = %why, retry_in = ?retry_in, "RabbitMQ unavailable");
        self.set_consuming(false, Some(why));
    }

    /// Declares the topology, consumes until something ends it.
    async fn consume(&self, conn: &Connection, st: &mut Backoffs) -> Ended {
        let channel = match self.open(conn).await {
            Ok(c) => c,
            Err(e) => return Ended::Lost(e),
        };
        let dlx_channel = match conn.create_channel().await {
            Ok(c) => match c.confirm_select(ConfirmSelectOptions::default()).await {
                Ok(()) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "RabbitMQ: no confirm channel for dead letters; rejecting instead");
                    None
                }
            },
            Err(e) => return Ended::Lost(format!("channel: {e}")),
        };
        let tag = format!("feedhub-{}", crate::ids::random_token());
        let mut consumer = match channel
            .basic_consume(
                &self.config.queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(c) => c,
            Err(e) => return Ended::Lost(format!("basic.consume: {e}")),
        };
        if st.was_connected {
            inc(&AMQP_METRICS.reconnects);
        } else if self.config.queue == DEFAULT_QUEUE {
            warn_about_legacy_queue(conn).await;
        }
        st.was_connected = true;
        st.connect = MIN_BACKOFF;
        self.set_consuming(true, None);
        tracing::info!(
            exchange = %self.config.exchange,
            queue = %self.config.queue,
            prefetch = self.config.prefetch,
            "RabbitMQ consumer started (active when RabbitMQ makes it the single active consumer)"
        );
        // Two stages joined by a one-slot queue, so decoding (and waiting for) the next
        // batch overlaps the backplane round trip of the previous one, while batches still
        // reach the backplane one at a time, in order: a batch is sent only after the one
        // before it succeeded, so a failed batch is never overtaken by a later one.
        let (tx, rx) = tokio::sync::mpsc::channel::<Prepared>(1);
        let failed = CancellationToken::new();
        let (taken, delivered) = tokio::join!(
            self.take(&mut consumer, dlx_channel.as_ref(), tx, &failed),
            self.deliver(rx, &failed, st),
        );
        let ended = match (delivered, taken) {
            (Err(HandleError::Backplane(why)), _) => {
                tracing::warn!(error = %why, "backplane delivery failed; closing the channel (requeues in order), backing off");
                // Fail-stop: nothing of the failed batch (or after it) is acked; closing the
                // channel requeues it and everything prefetched after it, in order.
                Ended::BackplaneFailed
            }
            (Err(HandleError::Amqp(why)), _) | (Ok(()), Err(why)) => return Ended::Lost(why),
            (Ok(()), Ok(())) => Ended::Cancelled,
        };
        let why = match ended {
            Ended::BackplaneFailed => "backplane unavailable",
            _ => "stopping",
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), channel.close(200, why)).await;
        if let Some(c) = &dlx_channel {
            let _ = tokio::time::timeout(Duration::from_secs(2), c.close(200, why)).await;
        }
        ended
    }

    /// Stage 1: takes batches of deliveries (everything already delivered, up to the bound),
    /// decodes them (dead-lettering malformed messages) and queues them for [`Self::deliver`].
    /// Ends with Ok when cancelled (or when the delivery stage stopped), Err when the
    /// channel failed.
    async fn take(
        &self,
        consumer: &mut lapin::Consumer,
        dlx: Option<&Channel>,
        tx: tokio::sync::mpsc::Sender<Prepared>,
        failed: &CancellationToken,
    ) -> Result<(), String> {
        let max_batch = self.config.max_batch.max(1);
        let mut batch: Vec<Delivery> = Vec::with_capacity(max_batch);
        loop {
            // Wait for the first delivery of the next batch ...
            let first = tokio::select! {
                // Closing the connection (by the caller) returns every unacked delivery.
                _ = self.cancel.cancelled() => return Ok(()),
                _ = failed.cancelled() => return Ok(()),
                n = consumer.next() => n,
            };
            match first {
                None => return Err("consumer cancelled by the broker".to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(d)) => batch.push(d),
            }
            // ... then take everything already delivered, without waiting, up to the bound.
            while batch.len() < max_batch {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(d))) => batch.push(d),
                    // The channel is gone: its unacked deliveries are back in the queue.
                    Some(None) => return Err("consumer cancelled by the broker".to_string()),
                    Some(Some(Err(e))) => return Err(e.to_string()),
                    None => break,
                }
            }
            let prepared = match self.prepare(&mut batch, dlx).await {
                Ok(p) => p,
                Err(HandleError::Amqp(why) | HandleError::Backplane(why)) => return Err(why),
            };
            if let Some(p) = prepared {
                tokio::select! {
                    _ = failed.cancelled() => return Ok(()),
                    sent = tx.send(p) => if sent.is_err() { return Ok(()) },
                }
            }
        }
    }

    /// Decodes `batch` in order, draining it; malformed messages are dead-lettered (acked or
    /// rejected on their own: the batch's `multiple` ack covers the others around them).
    async fn prepare(
        &self,
        batch: &mut Vec<Delivery>,
        dlx: Option<&Channel>,
    ) -> Result<Option<Prepared>, HandleError> {
        let n = batch.len() as u64;
        AMQP_METRICS.consumed.fetch_add(n, Ordering::Relaxed);
        self.status.consumed.fetch_add(n, Ordering::Relaxed);
        let mut events = Vec::with_capacity(batch.len());
        let mut last = None;
        for d in batch.drain(..) {
            if d.redelivered {
                inc(&AMQP_METRICS.redelivered);
            }
            match self.decode(&d) {
                Ok(e) => {
                    events.push(e);
                    last = Some(d.acker);
                }
                Err((reason, text)) => self.dead_letter(&d, dlx, reason, &text).await?,
            }
        }
        Ok(last.map(|acker| Prepared { events, acker }))
    }

    /// Stage 2: hands each batch to the backplane ([`super::deliver_batch`]: per-user order =
    /// batch order), then acks it with one `multiple` ack. Stops at the first failure
    /// (cancelling `failed`); ends with Ok when stage 1 ended.
    async fn deliver(
        &self,
        mut rx: tokio::sync::mpsc::Receiver<Prepared>,
        failed: &CancellationToken,
        st: &mut Backoffs,
    ) -> Result<(), HandleError> {
        let result = async {
            while let Some(p) = rx.recv().await {
                let n = p.events.len() as u64;
                let delivered = self.deliver_one(&p).await;
                if let Err(e) = delivered {
                    if matches!(e, HandleError::Backplane(_)) {
                        AMQP_METRICS.nacked.fetch_add(n, Ordering::Relaxed);
                        self.status.nacked.fetch_add(n, Ordering::Relaxed);
                    }
                    return Err(e);
                }
                st.retry = MIN_BACKOFF;
            }
            Ok(())
        }
        .await;
        failed.cancel();
        result
    }

    async fn deliver_one(&self, p: &Prepared) -> Result<(), HandleError> {
        // While the backplane is known to be down, do not even try: the batch is requeued.
        let backplane = self.hub.backplane();
        if !backplane.is_ready() {
            return Err(HandleError::Backplane(format!(
                "backplane '{}' not connected",
                backplane.name()
            )));
        }
        super::deliver_batch(&self.hub, &p.events)
            .await
            .map_err(|e| HandleError::Backplane(e.to_string()))?;
        inc(&AMQP_METRICS.batches);
        p.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(|e| HandleError::Amqp(format!("ack: {e}")))?;
        let acked = p.events.len() as u64;
        AMQP_METRICS.acked.fetch_add(acked, Ordering::Relaxed);
        self.status.acked.fetch_add(acked, Ordering::Relaxed);
        Ok(())
    }

    /// The event of a delivery, or why it is malformed.
    fn decode(&self, d: &Delivery) -> Result<FeedEvent, (RejectReason, String)> {
        if d.data.len() > self.config.max_message_size {
            return Err((
                RejectReason::TooLarge,
                format!(
                    "body of {} bytes exceeds the limit of {} bytes",
                    d.data.len(),
                    self.config.max_message_size
                ),
            ));
        }
        let message_id = d.properties.message_id().as_ref().map(|m| m.as_str());
        match decode_delivery(d.routing_key.as_str(), &d.data, message_id) {
            Ok(mut e) => {
                e.redelivered = d.redelivered;
                Ok(e)
            }
            Err(e) => Err((RejectReason::of(&e), e.to_string())),
        }
    }

    async fn open(&self, conn: &Connection) -> Result<Channel, String> {
        let c = &self.config;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        channel
            .basic_qos(c.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos: {e}"))?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                &c.exchange,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("declare exchange {:?}: {e}", c.exchange))?;
        let dlx = c.dead_letter_exchange();
        channel
            .exchange_declare(&dlx, ExchangeKind::Fanout, durable, FieldTable::default())
            .await
            .map_err(|e| format!("declare exchange {dlx:?}: {e}"))?;
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let dlq = c.dead_letter_queue();
        channel
            .queue_declare(&dlq, durable_queue, FieldTable::default())
            .await
            .map_err(|e| format!("declare queue {dlq:?}: {e}"))?;
        channel
            .queue_bind(
                &dlq,
                &dlx,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("bind {dlq:?}: {e}"))?;
        channel
            .queue_declare(&c.queue, durable_queue, queue_arguments(&dlx))
            .await
            .map_err(|e| {
                format!(
                    "declare queue {:?} (an existing queue must be a quorum queue with x-single-active-consumer=true and x-dead-letter-exchange={dlx:?}): {e}",
                    c.queue
                )
            })?;
        channel
            .queue_bind(
                &c.queue,
                &c.exchange,
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("bind {:?}: {e}", c.queue))?;
        Ok(channel)
    }

    async fn dead_letter(
        &self,
        d: &Delivery,
        dlx: Option<&Channel>,
        reason: RejectReason,
        text: &str,
    ) -> Result<(), HandleError> {
        inc(&crate::metrics::METRICS.feed_rejected);
        AMQP_METRICS.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reason = reason.as_str(),
            detail = %text,
            routing_key = %d.routing_key,
            bytes = d.data.len(),
            "malformed RabbitMQ message dead-lettered"
        );
        if let Some(ch) = dlx {
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            headers.insert(
                REASON_HEADER.into(),
                AMQPValue::LongString(format!("{}: {text}", reason.as_str()).as_str().into()),
            );
            headers.insert(
                "x-feedhub-routing-key".into(),
                AMQPValue::LongString(d.routing_key.as_str().into()),
            );
            let props = d.properties.clone().with_headers(headers);
            let published = async {
                let confirm = ch
                    .basic_publish(
                        &self.config.dead_letter_exchange(),
                        d.routing_key.as_str(),
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await?;
                confirm.await
            };
            match tokio::time::timeout(Duration::from_secs(5), published).await {
                Ok(Ok(c)) if c.is_ack() => {
                    return d
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map(|_| ())
                        .map_err(|e| HandleError::Amqp(format!("ack: {e}")));
                }
                Ok(Ok(_)) => tracing::warn!("dead-letter republish was nacked; rejecting"),
                Ok(Err(e)) => tracing::warn!(error = %e, "dead-letter republish failed; rejecting"),
                Err(_) => tracing::warn!("dead-letter republish timed out; rejecting"),
            }
        }
        d.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
            .map_err(|e| HandleError::Amqp(format!("reject: {e}")))
    }
}

/// Warns when the queue of earlier releases (`feedhub.feed-updates`) still exists: while
/// it is bound to the exchange it receives a copy of every event, which nobody consumes
/// once every instance runs this release (see README "Feed ingest", migration).
async fn warn_about_legacy_queue(conn: &Connection) {
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    // A passive declaration of a missing queue closes this throwaway channel (404).
    if let Ok(q) = ch
        .queue_declare(LEGACY_QUEUE, passive, FieldTable::default())
        .await
    {
        tracing::warn!(
            queue = LEGACY_QUEUE,
            messages = q.message_count(),
            consumers = q.consumer_count(),
            "the queue of earlier feedhub releases still exists; once no instance consumes it, delete it (README: Feed ingest, migration)"
        );
        let _ = ch.close(200, "checked").await;
    }
}

/// The arguments of the feed queue: a quorum queue with a single active consumer (per-user
/// order across instances) and dead letters to `dlx`. Public so tools and tests declare it
/// the same way (RabbitMQ refuses a redeclaration with other arguments).
pub fn queue_arguments(dlx: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.into()),
    );
    args
}

/// A decoded batch waiting for the backplane.
struct Prepared {
    /// The events, in queue order.
    events: Vec<FeedEvent>,
    /// The last delivered message's acker: one `multiple` ack covers the batch.
    acker: lapin::acker::Acker,
}

/// Backoff state across connections and channels.
struct Backoffs {
    /// Next reconnect delay.
    connect: Duration,
    /// Next delay after a backplane failure (reset by a successful delivery).
    retry: Duration,
    /// Whether a session ever consumed (so the next one counts as a reconnect).
    was_connected: bool,
}

enum HandleError {
    /// The backplane failed: requeue and retry later.
    Backplane(String),
    /// The AMQP channel failed: reconnect.
    Amqp(String),
}

/// Connects to `url` with `heartbeat` (unless the URL sets `heartbeat=` itself).
async fn connect(url: &str, heartbeat: Option<Duration>) -> Result<Connection, String> {
    let mut uri: AMQPUri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    if let (None, Some(h)) = (uri.query.heartbeat, heartbeat) {
        uri.query.heartbeat = Some(u16::try_from(h.as_secs().max(1)).unwrap_or(u16::MAX));
    }
    let props = ConnectionProperties::default()
        .with_connection_name("feedhub".into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Connection::connect_uri(uri, props)
        .await
        .map_err(|e| e.to_string())
}
