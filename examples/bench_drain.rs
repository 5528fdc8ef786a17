//! The ordered drain benchmark (issue 12): how fast feedhub moves events that wait in
//! RabbitMQ into the Redis backplane, side by side with peers in the same run.
//!
//! ```sh
//! cargo run --release --example bench_drain -- --events 100000
//! ```
//!
//! For each contender a private exchange and queue are declared, `--events` feed events
//! (routing key `feed.<user>`, `--users` users, a ~200-byte object payload) are published
//! into the queue first, then the consumer starts and the clock runs until every event is
//! acked. Contenders (`--only`):
//!
//! - `bare`: a bare lapin consumer on the same quorum single-active-consumer queue with the
//!   same prefetch, which only acks (one `multiple` ack per batch of what is already
//!   delivered): RabbitMQ's own ceiling on this machine.
//! - `feedhub`: feedhub's consumer ([`feedhub::ingest::amqp::AmqpIngest`], ordered batches)
//!   into the Redis backplane, in process.
//! - `old`: the consumer loop of earlier releases, rebuilt here: a classic queue, one
//!   `HubLifetime::send` (a Redis PUBLISH, no history) awaited per event, a `multiple` ack
//!   every 64 events (unordered across instances; one instance shown).
//!
//! The load average is printed before and after each contender (the machine may be
//! shared). Queues and exchanges are deleted at the end.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use feedhub::backplane::redis::RedisConfig;
use feedhub::hub::{HubLifetime, Target};
use feedhub::ingest::amqp::{queue_arguments, AmqpConfig, AmqpIngest};
use feedhub::ingest::event::decode_delivery;
use feedhub::protocol::Value;
use feedhub::{feed, ServerBuilder, ServerConfig};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Drain-rate benchmark: RabbitMQ -> Redis backplane.
#[derive(Debug, Parser)]
#[command(name = "bench_drain")]
struct Args {
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Redis URL (the backplane).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Events queued before each contender starts.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct users the events go to.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Prefetch (all contenders).
    #[arg(long, default_value_t = feedhub::ingest::amqp::DEFAULT_PREFETCH)]
    prefetch: u16,
    /// feedhub's batch bound.
    #[arg(long, default_value_t = feedhub::ingest::amqp::DEFAULT_MAX_BATCH)]
    batch: usize,
    /// Contenders, in this order (bare, feedhub, old).
    #[arg(long, value_delimiter = ',', default_value = "bare,feedhub,old")]
    only: Vec<String>,
    /// Runs of each contender (interleaved).
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_string())
}

async fn amqp(url: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Ok(Connection::connect(url, props).await?)
}

/// One contender's private topology.
struct Topo {
    exchange: String,
    queue: String,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let id = format!("benchdrain{:08x}.{tag}", rand::random::<u32>());
        Topo {
            exchange: format!("{id}.FeedUpdate"),
            queue: format!("{id}.feed-updates"),
        }
    }

    /// Declares the exchange, the DLX and the queue (quorum + single active consumer, as
    /// feedhub does, or a classic queue for the old path), bound with `#`.
    async fn declare(&self, ch: &Channel, ordered: bool) -> anyhow::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            &self.exchange,
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        let dlx = format!("{}.dlx", self.exchange);
        ch.exchange_declare(&dlx, ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        let q = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let args = if ordered {
            queue_arguments(&dlx)
        } else {
            let mut a = FieldTable::default();
            a.insert(
                "x-dead-letter-exchange".into(),
                lapin::types::AMQPValue::LongString(dlx.as_str().into()),
            );
            a
        };
        ch.queue_declare(&self.queue, q, args).await?;
        ch.queue_declare(&format!("{}.dlx", self.queue), q, FieldTable::default())
            .await?;
        ch.queue_bind(
            &self.queue,
            &self.exchange,
            "#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    async fn delete(&self, ch: &Channel) {
        for q in [self.queue.clone(), format!("{}.dlx", self.queue)] {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
        for e in [self.exchange.clone(), format!("{}.dlx", self.exchange)] {
            let _ = ch
                .exchange_delete(&e, ExchangeDeleteOptions::default())
                .await;
        }
    }

    /// Publishes `n` events (pipelined, confirms awaited per 1,000).
    async fn fill(&self, ch: &Channel, n: usize, users: usize) -> anyhow::Result<()> {
        let pad = "x".repeat(120);
        let mut confirms = Vec::with_capacity(1000);
        for i in 0..n {
            let user = i % users;
            let body =
                format!(r#"{{"kind":"post.created","seq":{i},"author":"bench","text":"{pad}"}}"#);
            confirms.push(
                ch.basic_publish(
                    &self.exchange,
                    &format!("feed.bench-{user}"),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
            );
            if confirms.len() == 1000 {
                for c in confirms.drain(..) {
                    anyhow::ensure!(c.await?.is_ack(), "publish nacked");
                }
            }
        }
        for c in confirms {
            anyhow::ensure!(c.await?.is_ack(), "publish nacked");
        }
        Ok(())
    }
}

/// A channel with `prefetch` consuming `queue`.
async fn subscribe(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> anyhow::Result<(Channel, lapin::Consumer)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue,
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

/// The bare consumer: acks what is already delivered with one `multiple` ack; returns when
/// `n` are acked.
async fn bare(conn: &Connection, queue: &str, prefetch: u16, n: usize) -> anyhow::Result<()> {
    let (ch, mut consumer) = subscribe(conn, queue, prefetch, "bench-bare").await?;
    let mut acked = 0;
    while acked < n {
        let d = consumer.next().await.context("consumer ended")??;
        let mut last = d;
        let mut count = 1;
        while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
            last = d;
            count += 1;
        }
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        acked += count;
    }
    let _ = ch.close(200, "done").await;
    Ok(())
}

/// The consumer loop of earlier releases: one awaited delivery (PUBLISH) per event, a
/// `multiple` ack every 64 events or when nothing more is buffered.
async fn old(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    n: usize,
    hub: &HubLifetime,
) -> anyhow::Result<()> {
    let (ch, mut consumer) = subscribe(conn, queue, prefetch, "bench-old").await?;
    let mut acked = 0;
    let mut pending = None;
    let mut count = 0;
    while acked < n {
        let next = match consumer.next().now_or_never() {
            Some(d) => d,
            None => {
                if let Some(a) = pending.take() {
                    lapin::acker::Acker::ack(&a, BasicAckOptions { multiple: true }).await?;
                    acked += std::mem::take(&mut count);
                    if acked >= n {
                        break;
                    }
                }
                consumer.next().await
            }
        };
        let d = next.context("consumer ended")??;
        let message_id = d.properties.message_id().as_ref().map(|m| m.as_str());
        let event = decode_delivery(d.routing_key.as_str(), &d.data, message_id)?;
        // Earlier releases' `ingest::deliver`: one PUBLISH per recipient, no history.
        hub.send(
            &Target::Users(event.recipients.clone()),
            &hub.definition().options.feed_target,
            vec![Value::json_unchecked(event.payload_with_id())],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        pending = Some(d.acker);
        count += 1;
        if count >= 64 {
            if let Some(a) = pending.take() {
                a.ack(BasicAckOptions { multiple: true }).await?;
                acked += std::mem::take(&mut count);
            }
        }
    }
    if let Some(a) = pending.take() {
        a.ack(BasicAckOptions { multiple: true }).await?;
    }
    let _ = ch.close(200, "done").await;
    Ok(())
}

/// A feed server on the Redis backplane (no clients: the drain measures RabbitMQ ->
/// backplane).
async fn server(redis_url: &str) -> anyhow::Result<feedhub::app::Server> {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        feed_hub: Some(feed::FEED_HUB_PATH.to_string()),
        ..ServerConfig::default()
    };
    let server = ServerBuilder::new(config)
        .hub(feed::feed_hub())
        .redis(RedisConfig::from_url(redis_url).map_err(|e| anyhow::anyhow!("{e}"))?)
        .start()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.backplane().is_ready() {
        anyhow::ensure!(Instant::now() < deadline, "Redis backplane not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(server)
}

async fn run_one(args: &Args, which: &str, conn: &Connection) -> anyhow::Result<(f64, String)> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let topo = Topo::new(which);
    topo.declare(&ch, which != "old").await?;
    let filled = Instant::now();
    topo.fill(&ch, args.events, args.users).await?;
    let fill = filled.elapsed();
    let before = loadavg();
    let result: anyhow::Result<Duration> = async {
        match which {
            "bare" => {
                let started = Instant::now();
                bare(conn, &topo.queue, args.prefetch, args.events).await?;
                Ok(started.elapsed())
            }
            "old" => {
                let server = server(&args.redis_url).await?;
                let hub = server
                    .hub(feed::FEED_HUB_PATH)
                    .context("feed hub missing")?;
                let started = Instant::now();
                old(conn, &topo.queue, args.prefetch, args.events, &hub).await?;
                Ok(started.elapsed())
            }
            "feedhub" => {
                let server = server(&args.redis_url).await?;
                let hub = server
                    .hub(feed::FEED_HUB_PATH)
                    .context("feed hub missing")?;
                let ingest = AmqpIngest::new(AmqpConfig {
                    exchange: topo.exchange.clone(),
                    queue: topo.queue.clone(),
                    prefetch: args.prefetch,
                    max_batch: args.batch,
                    ..AmqpConfig::new(args.amqp_url.clone())
                });
                let started = Instant::now();
                ingest.start(hub);
                let deadline = Instant::now() + Duration::from_secs(600);
                while ingest.acked() < args.events as u64 {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "feedhub drained only {} of {} in 600 s",
                        ingest.acked(),
                        args.events
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let elapsed = started.elapsed();
                ingest.stop().await;
                let batches = feedhub::ingest::amqp::AMQP_METRICS
                    .batches
                    .load(std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "feedhub: {} batches so far in this process (mean {:.0} events per batch)",
                    batches,
                    ingest.acked() as f64 / batches.max(1) as f64
                );
                Ok(elapsed)
            }
            other => anyhow::bail!("unknown contender {other:?} (bare, feedhub, old)"),
        }
    }
    .await;
    let after = loadavg();
    topo.delete(&ch).await;
    let _ = ch.close(200, "done").await;
    let took = result?;
    let rate = args.events as f64 / took.as_secs_f64();
    Ok((
        rate,
        format!(
            "{which:<8} {rate:>9.0} events/s  ({} events in {took:.2?}; queue filled in {fill:.1?}; loadavg before {before}, after {after})",
            args.events
        ),
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let conn = amqp(&args.amqp_url).await.context("RabbitMQ")?;
    println!(
        "drain: {} queued events to {} users, prefetch {}, feedhub batch {} (loadavg {})",
        args.events,
        args.users,
        args.prefetch,
        args.batch,
        loadavg()
    );
    let mut rates: Vec<(String, Vec<f64>)> =
        args.only.iter().map(|w| (w.clone(), vec![])).collect();
    for run in 0..args.runs {
        for (which, list) in rates.iter_mut() {
            let (rate, line) = run_one(&args, which, &conn).await?;
            println!("run {run}: {line}");
            list.push(rate);
        }
    }
    println!("summary (median events/s):");
    for (which, mut list) in rates {
        list.sort_by(|a, b| a.total_cmp(b));
        println!("  {which:<8} {:>9.0}", list[list.len() / 2]);
    }
    let _ = conn.close(200, "done").await;
    Ok(())
}
