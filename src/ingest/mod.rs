//! Turns external feed events into hub sends: the HTTP publish API (`POST /api/feed`) and,
//! with `--amqp-url`, the RabbitMQ consumer share one pure decoder ([`event`]) and the
//! delivery functions ([`deliver`], and [`deliver_batch`] for an ordered batch).

pub mod amqp;
pub mod event;

use crate::hub::{HubError, HubLifetime, Target};
use crate::protocol::Value;
use event::FeedEvent;

/// Sends `event` to every connection of each recipient, on every node, as
/// `<feed target>(<payload>)`. The payload's JSON is forwarded as received, never
/// re-serialized (except that the event id is inserted, see [`FeedEvent::payload_with_id`]).
pub async fn deliver(hub: &HubLifetime, event: &FeedEvent) -> Result<(), HubError> {
    let target = Target::Users(event.recipients.clone());
    let method = hub.definition().options.feed_target.clone();
    crate::metrics::inc(&crate::metrics::METRICS.feed_events);
    hub.send(
        &target,
        &method,
        vec![Value::json_unchecked(event.payload_with_id())],
    )
    .await
}

/// Delivers `events` in slice order: every user's events reach the backplane in that order
/// (the RabbitMQ consumer hands over its deliveries in queue order). Stops at the first
/// failure; the events before it may have been delivered (the caller redelivers the whole
/// batch, with the same ids).
pub async fn deliver_batch(hub: &HubLifetime, events: &[FeedEvent]) -> Result<(), HubError> {
    for event in events {
        deliver(hub, event).await?;
    }
    Ok(())
}
