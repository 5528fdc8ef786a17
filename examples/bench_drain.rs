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
//! shared). For the contenders that use Redis the line also gives the cost per event, from
//! Redis's `INFO` before and after the drain (Redis-wide: other clients of the same Redis
//! count too, so use a Redis of your own for exact figures, `--redis-url`): `EVALSHA` calls
//! and round trips per batch, bytes received and sent by Redis, and Redis CPU (user + sys);
//! and this process's CPU per event (feedhub's consumer and lapin; RabbitMQ's own CPU is
//! not included). Each run's feedhub line says how it compares with the bare consumer of
//! the same run. Queues and exchanges are deleted at the end.

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

/// Redis-wide counters (`INFO stats`, `INFO cpu`, `INFO commandstats`) and this process's
/// CPU time, to cost a drain per event.
#[derive(Debug, Clone, Copy, Default)]
struct Costs {
    /// Bytes Redis received (`total_net_input_bytes`).
    redis_in: f64,
    /// Bytes Redis sent (`total_net_output_bytes`).
    redis_out: f64,
    /// Redis CPU seconds (`used_cpu_user + used_cpu_sys`).
    redis_cpu: f64,
    /// `EVALSHA` calls.
    evalsha: f64,
    /// `PUBLISH` calls (from clients, not from scripts).
    publish: f64,
    /// This process's CPU seconds (user + sys).
    own_cpu: f64,
}

impl Costs {
    async fn now(redis: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Costs> {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .arg("cpu")
            .arg("commandstats")
            .query_async(redis)
            .await?;
        let field = |name: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let calls = |cmd: &str| -> f64 {
            info.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0.0)
        };
        Ok(Costs {
            redis_in: field("total_net_input_bytes"),
            redis_out: field("total_net_output_bytes"),
            redis_cpu: field("used_cpu_user") + field("used_cpu_sys"),
            evalsha: calls("evalsha"),
            publish: calls("publish"),
            own_cpu: own_cpu_seconds(),
        })
    }

    /// "per event" text for the difference `self - before` over `events` in `batches`.
    fn per_event(&self, before: &Costs, events: usize, batches: Option<u64>) -> String {
        let n = events.max(1) as f64;
        let d = |a: f64, b: f64| (a - b).max(0.0);
        let mut out = String::new();
        if let Some(b) = batches {
            let b = b.max(1) as f64;
            out.push_str(&format!(
                "{:.1} EVALSHA and 1 round trip per batch of {:.0}; ",
                d(self.evalsha, before.evalsha) / b,
                n / b
            ));
        } else if d(self.publish, before.publish) > 0.0 {
            out.push_str(&format!(
                "{:.2} PUBLISH per event; ",
                d(self.publish, before.publish) / n
            ));
        }
        out.push_str(&format!(
            "per event: Redis got {:.0} B, sent {:.0} B, CPU {:.1} us; this process CPU {:.1} us",
            d(self.redis_in, before.redis_in) / n,
            d(self.redis_out, before.redis_out) / n,
            d(self.redis_cpu, before.redis_cpu) * 1e6 / n,
            d(self.own_cpu, before.own_cpu) * 1e6 / n,
        ));
        out
    }
}

/// This process's CPU time (user + system) in seconds, from `/proc/self/stat`.
fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
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

async fn run_one(
    args: &Args,
    which: &str,
    conn: &Connection,
    redis: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<(f64, String)> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let topo = Topo::new(which);
    topo.declare(&ch, which != "old").await?;
    let filled = Instant::now();
    topo.fill(&ch, args.events, args.users).await?;
    let fill = filled.elapsed();
    let before = loadavg();
    // The drain's duration, and its costs per event where Redis is involved.
    let result: anyhow::Result<(Duration, Option<String>)> = async {
        match which {
            "bare" => {
                let costs = Costs::now(redis).await?;
                let started = Instant::now();
                bare(conn, &topo.queue, args.prefetch, args.events).await?;
                let took = started.elapsed();
                let own = (own_cpu_seconds() - costs.own_cpu) * 1e6 / args.events as f64;
                Ok((
                    took,
                    Some(format!("this process CPU {own:.1} us per event")),
                ))
            }
            "old" => {
                let server = server(&args.redis_url).await?;
                let hub = server
                    .hub(feed::FEED_HUB_PATH)
                    .context("feed hub missing")?;
                let costs = Costs::now(redis).await?;
                let started = Instant::now();
                old(conn, &topo.queue, args.prefetch, args.events, &hub).await?;
                let took = started.elapsed();
                let after = Costs::now(redis).await?;
                Ok((took, Some(after.per_event(&costs, args.events, None))))
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
                let batches = || {
                    feedhub::ingest::amqp::AMQP_METRICS
                        .batches
                        .load(std::sync::atomic::Ordering::Relaxed)
                };
                let batches_before = batches();
                let costs = Costs::now(redis).await?;
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
                let took = started.elapsed();
                let after = Costs::now(redis).await?;
                ingest.stop().await;
                let per_event =
                    after.per_event(&costs, args.events, Some(batches() - batches_before));
                Ok((took, Some(per_event)))
            }
            other => anyhow::bail!("unknown contender {other:?} (bare, feedhub, old)"),
        }
    }
    .await;
    let after = loadavg();
    topo.delete(&ch).await;
    let _ = ch.close(200, "done").await;
    let (took, costs) = result?;
    let rate = args.events as f64 / took.as_secs_f64();
    let costs = costs.map(|c| format!("\n         {c}")).unwrap_or_default();
    Ok((
        rate,
        format!(
            "{which:<8} {rate:>9.0} events/s  ({} events in {took:.2?}; queue filled in {fill:.1?}; loadavg before {before}, after {after}){costs}",
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
    let mut redis = redis::Client::open(args.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await
        .context("Redis")?;
    let mut rates: Vec<(String, Vec<f64>)> =
        args.only.iter().map(|w| (w.clone(), vec![])).collect();
    for run in 0..args.runs {
        let mut bare_rate = None;
        for (which, list) in rates.iter_mut() {
            let (rate, line) = run_one(&args, which, &conn, &mut redis).await?;
            println!("run {run}: {line}");
            match (which.as_str(), bare_rate) {
                ("bare", _) => bare_rate = Some(rate),
                (_, Some(bare)) => println!(
                    "run {run}: {which} drained at {:.0}% of the bare consumer's rate in this run",
                    rate * 100.0 / bare
                ),
                _ => {}
            }
            list.push(rate);
        }
    }
    println!("summary (median events/s, loadavg {}):", loadavg());
    let medians: Vec<(String, f64)> = rates
        .into_iter()
        .map(|(which, mut list)| {
            list.sort_by(|a, b| a.total_cmp(b));
            (which, list.get(list.len() / 2).copied().unwrap_or(0.0))
        })
        .collect();
    let bare = medians.iter().find(|(w, _)| w == "bare").map(|m| m.1);
    for (which, median) in &medians {
        match bare {
            Some(b) if which != "bare" && b > 0.0 => {
                println!(
                    "  {which:<8} {median:>9.0}  ({:.0}% of bare)",
                    median * 100.0 / b
                )
            }
            _ => println!("  {which:<8} {median:>9.0}"),
        }
    }
    let _ = conn.close(200, "done").await;
    Ok(())
}
