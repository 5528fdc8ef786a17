//! The soak's post service: publishes feed events to RabbitMQ's `FeedUpdate` exchange at a
//! fixed rate with publisher confirms, and is the ground truth ("oracle") the checker
//! compares deliveries with.
//!
//! - Every event has a stable `id` (in the body and as the AMQP `message-id`), its publish
//!   time `t` (µs since the epoch, taken once: a retry keeps it) and, per recipient, that
//!   user's sequence number `k` (`"ks":{"<user>":k}`): 1, 2, 3 … per user, with no gaps.
//! - Most events go to one user (routing key `feed.<user>`); a share are recipients lists
//!   (`{"recipients":[…],"id":…,"payload":{…}}`), one `k` per recipient.
//! - Events are published in batches; the next batch starts only when every event of the
//!   current one is confirmed (`mandatory`, so an event no queue took is a failure too). On
//!   any failure the publisher reconnects and republishes the whole batch in order with the
//!   same ids, so per-user order holds and a republished event is a duplicate by id, never a
//!   new event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::BasicProperties;

use super::now_micros;

/// Most events in one batch.
const MAX_BATCH: usize = 1_000;

/// What the oracle knows about every user.
pub struct Oracle {
    /// User ids, by index.
    pub users: Vec<String>,
    index: HashMap<String, usize>,
    /// Publish time (µs) of each generated event per user: entry `k-1` is event `k`.
    times: Vec<Mutex<Vec<u64>>>,
    /// Per user, the highest `k` RabbitMQ confirmed (a prefix: batches confirm whole).
    confirmed: Vec<AtomicU64>,
    /// Events (messages) confirmed.
    pub messages: AtomicU64,
    /// Deliveries owed (one per recipient) confirmed.
    pub recipient_events: AtomicU64,
    /// Batches republished after a failure.
    pub republished_batches: AtomicU64,
    /// Events republished after a failure.
    pub republished_events: AtomicU64,
    /// Publish failures (connection loss, nack, unroutable).
    pub failures: AtomicU64,
    /// The last failure.
    pub last_error: Mutex<Option<String>>,
    /// Publish → all confirmed, per batch (µs).
    confirm: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Oracle {
    /// An oracle for `users`.
    pub fn new(users: Vec<String>) -> Oracle {
        let index = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.clone(), i))
            .collect();
        Oracle {
            times: users.iter().map(|_| Mutex::new(Vec::new())).collect(),
            confirmed: users.iter().map(|_| AtomicU64::new(0)).collect(),
            users,
            index,
            messages: AtomicU64::new(0),
            recipient_events: AtomicU64::new(0),
            republished_batches: AtomicU64::new(0),
            republished_events: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            confirm: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("histogram bounds"),
            ),
        }
    }

    /// The index of a user id.
    pub fn user_index(&self, user: &str) -> Option<usize> {
        self.index.get(user).copied()
    }

    /// The highest confirmed `k` of user `u`.
    pub fn confirmed(&self, u: usize) -> u64 {
        self.confirmed[u].load(Ordering::Acquire)
    }

    /// How many events of user `u` were generated (published or about to be).
    pub fn generated(&self, u: usize) -> u64 {
        self.times[u]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64
    }

    /// The publish time of event `k` of user `u`.
    pub fn time_of(&self, u: usize, k: u64) -> Option<u64> {
        if k == 0 {
            return None;
        }
        self.times[u]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(k as usize - 1)
            .copied()
    }

    fn next_k(&self, u: usize, t: u64) -> u64 {
        let mut v = self.times[u].lock().unwrap_or_else(|p| p.into_inner());
        v.push(t);
        v.len() as u64
    }

    /// Publish → confirm per batch, ms: (p50, p99, max).
    pub fn confirm_summary(&self) -> (f64, f64, f64) {
        let h = self.confirm.lock().unwrap_or_else(|p| p.into_inner());
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0,
        )
    }

    fn fail(&self, e: impl std::fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// What and how fast to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Exchange (feedhub's `FeedUpdate`).
    pub exchange: String,
    /// Events per second over the regular users.
    pub rate: f64,
    /// Share of events that are recipients lists (0..1).
    pub multi_share: f64,
    /// Recipients per list.
    pub multi_recipients: usize,
    /// Approximate payload size of regular events.
    pub payload_bytes: usize,
    /// Index of the stall user in the oracle (it gets its own, heavier traffic), if any.
    pub stall_user: Option<usize>,
    /// Stall user: events per second and their size.
    pub stall_rate: f64,
    /// Stall user payload size.
    pub stall_bytes: usize,
    /// Run id (event id prefix).
    pub run: String,
}

/// One event to publish (kept for republishing).
struct Outgoing {
    routing_key: String,
    body: Vec<u8>,
    id: String,
    recipients: Vec<(usize, u64)>,
}

/// Publishes until `stop` is set; returns when the last batch is confirmed (or after a
/// bounded number of retries of it once stopping).
pub async fn run(
    plan: PublishPlan,
    oracle: std::sync::Arc<Oracle>,
    stop: std::sync::Arc<AtomicBool>,
) {
    let regular: Vec<usize> = (0..oracle.users.len())
        .filter(|u| Some(*u) != plan.stall_user)
        .collect();
    let started = Instant::now();
    let mut generated = 0u64;
    let mut stall_generated = 0u64;
    let mut seq = 0u64;
    let mut channel: Option<lapin::Channel> = None;
    let mut conn_keep: Option<lapin::Connection> = None;
    let pad = "x".repeat(plan.payload_bytes.saturating_sub(90).max(1));
    let stall_pad = "y".repeat(plan.stall_bytes.saturating_sub(90).max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stopping = stop.load(Ordering::Relaxed);
        if stopping {
            break;
        }
        let secs = started.elapsed().as_secs_f64();
        let due = ((plan.rate * secs) as u64).saturating_sub(generated);
        let stall_due = ((plan.stall_rate * secs) as u64).saturating_sub(stall_generated);
        let n = (due as usize).min(MAX_BATCH);
        let sn = (stall_due as usize).min(MAX_BATCH / 4);
        if n == 0 && sn == 0 {
            continue;
        }
        let mut batch = Vec::with_capacity(n + sn);
        for _ in 0..n {
            seq += 1;
            let t = now_micros();
            let id = format!("{}-{seq}", plan.run);
            let multi = plan.multi_share > 0.0
                && regular.len() > plan.multi_recipients
                && rand::random::<f64>() < plan.multi_share;
            let mut recipients: Vec<usize> = Vec::new();
            if multi {
                while recipients.len() < plan.multi_recipients.max(2) {
                    let u = regular[rand::random::<u64>() as usize % regular.len()];
                    if !recipients.contains(&u) {
                        recipients.push(u);
                    }
                }
            } else {
                recipients.push(regular[rand::random::<u64>() as usize % regular.len()]);
            }
            batch.push(event(&oracle, id, t, &recipients, &pad, multi));
        }
        generated += n as u64;
        if let Some(su) = plan.stall_user {
            for _ in 0..sn {
                seq += 1;
                let t = now_micros();
                let id = format!("{}-{seq}", plan.run);
                batch.push(event(&oracle, id, t, &[su], &stall_pad, false));
            }
        }
        stall_generated += sn as u64;
        // Publish the batch until every event of it is confirmed.
        let mut attempt = 0u32;
        loop {
            if channel.as_ref().is_none_or(|c| !c.status().connected()) {
                match connect(&plan.amqp_url).await {
                    Ok((conn, ch)) => {
                        conn_keep = Some(conn);
                        channel = Some(ch);
                    }
                    Err(e) => {
                        oracle.fail(format!("connect: {e:#}"));
                        channel = None;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            let Some(ch) = channel.as_ref() else { continue };
            if attempt > 0 {
                oracle.republished_batches.fetch_add(1, Ordering::Relaxed);
                oracle
                    .republished_events
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            attempt += 1;
            let sent = Instant::now();
            match publish(ch, &plan.exchange, &batch).await {
                Ok(()) => {
                    let _ = oracle
                        .confirm
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(sent.elapsed().as_micros().max(1) as u64);
                    break;
                }
                Err(e) => {
                    oracle.fail(format!("publish: {e:#}"));
                    if let Some(c) = channel.take() {
                        let _ = c.close(200, "retry").await;
                    }
                    if let Some(c) = conn_keep.take() {
                        let _ = c.close(200, "retry").await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for ev in &batch {
            for (u, k) in &ev.recipients {
                oracle.confirmed[*u].fetch_max(*k, Ordering::AcqRel);
            }
            oracle.messages.fetch_add(1, Ordering::Relaxed);
            oracle
                .recipient_events
                .fetch_add(ev.recipients.len() as u64, Ordering::Relaxed);
        }
    }
    if let Some(c) = conn_keep.take() {
        let _ = c.close(200, "done").await;
    }
}

fn event(
    oracle: &Oracle,
    id: String,
    t: u64,
    recipients: &[usize],
    pad: &str,
    multi: bool,
) -> Outgoing {
    let ks: Vec<(usize, u64)> = recipients
        .iter()
        .map(|u| (*u, oracle.next_k(*u, t)))
        .collect();
    let mut ks_json = String::from("{");
    for (i, (u, k)) in ks.iter().enumerate() {
        if i > 0 {
            ks_json.push(',');
        }
        ks_json.push_str(&format!("\"{}\":{k}", oracle.users[*u]));
    }
    ks_json.push('}');
    let payload = format!("{{\"id\":\"{id}\",\"t\":{t},\"ks\":{ks_json},\"p\":\"{pad}\"}}");
    let (routing_key, body) = if multi {
        let list: Vec<String> = ks
            .iter()
            .map(|(u, _)| format!("\"{}\"", oracle.users[*u]))
            .collect();
        (
            "multi".to_string(),
            format!(
                "{{\"recipients\":[{}],\"id\":\"{id}\",\"payload\":{payload}}}",
                list.join(",")
            ),
        )
    } else {
        (format!("feed.{}", oracle.users[ks[0].0]), payload)
    };
    Outgoing {
        routing_key,
        body: body.into_bytes(),
        id,
        recipients: ks,
    }
}

async fn connect(url: &str) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
    let props = lapin::ConnectionProperties::default()
        .with_connection_name("feedhub-soak-publisher".into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(url, props),
    )
    .await
    .map_err(|_| anyhow!("connect timed out"))??;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

async fn publish(ch: &lapin::Channel, exchange: &str, batch: &[Outgoing]) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(batch.len());
    for ev in batch {
        let c = ch
            .basic_publish(
                exchange,
                &ev.routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &ev.body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(ev.id.as_str().into())
                    .with_delivery_mode(2),
            )
            .await?;
        confirms.push(c);
    }
    let all = async {
        for c in confirms {
            match c.await? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => bail!("unroutable (no queue bound yet?)"),
                Confirmation::Nack(_) => bail!("nacked"),
                Confirmation::NotRequested => bail!("confirms not enabled"),
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(15), all)
        .await
        .map_err(|_| anyhow!("confirms timed out"))?
}
