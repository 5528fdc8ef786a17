//! Publishes a test feed event to RabbitMQ, as a post service would:
//! `cargo run --release --example publish_feed -- --to 1002 --text hi`.
//!
//! One `--to` uses the routing-key form (`feed.<userId>`, body = payload); several use the
//! recipients body (`{"recipients":[...],"payload":...}`, routing key `feed`). The message is
//! persistent, published with a publisher confirm and `mandatory`, so an exchange with no
//! queue bound (feedhub never started) is reported instead of silently dropped.
use clap::Parser;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

/// Publish a feed event to the FeedUpdate exchange.
#[derive(Debug, Parser)]
struct Args {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "FEEDHUB_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Exchange.
    #[arg(long, env = "FEEDHUB_AMQP_EXCHANGE", default_value = "FeedUpdate")]
    exchange: String,
    /// Recipient user id (repeat for several).
    #[arg(long, required = true)]
    to: Vec<String>,
    /// Text of the post.
    #[arg(long, default_value = "hello from publish_feed")]
    text: String,
    /// Event id (AMQP message id; clients see it as the payload's `id`).
    #[arg(long)]
    id: Option<String>,
    /// How many events to publish (numbered `seq` 0..count).
    #[arg(long, default_value_t = 1)]
    count: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let conn = Connection::connect(&args.amqp_url, props).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .exchange_declare(
            &args.exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let started = std::time::Instant::now();
    for seq in 0..args.count {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let payload = serde_json::json!({
            "kind": "post.created",
            "author": "publish_feed",
            "text": args.text,
            "seq": seq,
            "at": at,
        });
        let (routing_key, body) = if args.to.len() == 1 {
            (format!("feed.{}", args.to[0]), payload)
        } else {
            (
                "feed".to_string(),
                serde_json::json!({ "recipients": args.to, "payload": payload }),
            )
        };
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = &args.id {
            let id = if args.count > 1 {
                format!("{id}-{seq}")
            } else {
                id.clone()
            };
            properties = properties.with_message_id(id.as_str().into());
        }
        let confirm = channel
            .basic_publish(
                &args.exchange,
                &routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &serde_json::to_vec(&body)?,
                properties,
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            anyhow::bail!("RabbitMQ did not confirm event {seq}");
        }
        if confirm.take_message().is_some() {
            anyhow::bail!(
                "event {seq} was returned: no queue is bound to '{}' (start feedhub with --amqp-url first)",
                args.exchange
            );
        }
    }
    println!(
        "published {} event(s) to exchange '{}' for {:?} in {:?}",
        args.count,
        args.exchange,
        args.to,
        started.elapsed()
    );
    conn.close(200, "done").await?;
    Ok(())
}
