//! [`AmqpPublisher`]: the demo post service's way to RabbitMQ. With `--amqp-url` a post's
//! feed event is published to the `FeedUpdate` topic exchange (routing key `feed`, the
//! recipients body, persistent, `message-id` = post id) exactly as an external post service
//! would, and reaches browsers through feedhub's own consumer (`ingest::amqp`). Publisher
//! confirms: a post answers 201 only once RabbitMQ has taken the event; a broken connection
//! is reopened on the next post. Every step has a timeout.

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::FeedPublisher;
use crate::ingest::event::FeedEvent;

/// The routing key of recipients-body events (not `feed.<userId>`, which names one user).
pub const ROUTING_KEY: &str = "feed";

/// Publishes feed events to a RabbitMQ topic exchange.
pub struct AmqpPublisher {
    url: String,
    exchange: String,
    timeout: Duration,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl AmqpPublisher {
    /// Publishes to `exchange` at `url`; connects on first use.
    pub fn new(url: impl Into<String>, exchange: impl Into<String>) -> AmqpPublisher {
        AmqpPublisher {
            url: url.into(),
            exchange: exchange.into(),
            timeout: Duration::from_secs(5),
            channel: Mutex::new(None),
        }
    }

    async fn open(&self) -> Result<(Connection, Channel), String> {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current());
        let conn = Connection::connect(&self.url, props)
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ: {e}"))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("confirm.select: {e}"))?;
        channel
            .exchange_declare(
                &self.exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("declare exchange {:?}: {e}", self.exchange))?;
        Ok((conn, channel))
    }

    async fn publish_once(&self, id: Option<&str>, body: &[u8]) -> Result<(), String> {
        let mut slot = self.channel.lock().await;
        let usable = slot
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected());
        if !usable {
            *slot = Some(self.open().await?);
        }
        let Some((_, channel)) = slot.as_ref() else {
            return Err("no RabbitMQ channel".to_string());
        };
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id) = id {
            properties = properties.with_message_id(id.into());
        }
        let published = channel
            .basic_publish(
                &self.exchange,
                ROUTING_KEY,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await;
        let confirm = match published {
            Ok(c) => c,
            Err(e) => {
                *slot = None;
                return Err(format!("publish: {e}"));
            }
        };
        let confirm = confirm.await.map_err(|e| format!("publish confirm: {e}"))?;
        if !confirm.is_ack() {
            return Err("RabbitMQ refused the event".to_string());
        }
        if confirm.take_message().is_some() {
            return Err(format!(
                "no queue is bound to exchange {:?} (is a feedhub instance with --amqp-url consuming?)",
                self.exchange
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl FeedPublisher for AmqpPublisher {
    fn name(&self) -> &'static str {
        "amqp"
    }

    async fn publish(&self, event: &FeedEvent, body: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.publish_once(event.id.as_deref(), body)).await
        {
            Ok(r) => r,
            Err(_) => {
                // Drop a channel that hangs; the next post reconnects.
                if let Ok(mut slot) = self.channel.try_lock() {
                    *slot = None;
                }
                Err("RabbitMQ did not confirm the event in time".to_string())
            }
        }
    }
}
