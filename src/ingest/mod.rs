//! Turns external feed events into hub sends: the HTTP publish API (`POST /api/feed`) and,
//! with `--amqp-url`, the RabbitMQ consumer share one pure decoder ([`event`]) and one
//! delivery function ([`deliver_batch`]; [`deliver`] for one event).
//!
//! Delivery appends each event to every recipient's history ([`HubLifetime::append_feed`]:
//! one backplane call for the whole batch, one Redis round trip), which also publishes it;
//! every node holding a recipient delivers it from its subscription, with the offset.

pub mod amqp;
pub mod event;

use crate::backplane::{Appended, FeedAppend};
use crate::hub::{HubError, HubLifetime};
use event::FeedEvent;

/// Appends `events` to their recipients' histories and publishes them, in order (one
/// [`FeedAppend`] per recipient, all with the event's id), as one batch. The payload's JSON
/// is forwarded as received, never re-serialized (except that the event id is inserted,
/// see [`FeedEvent::payload_with_id`]). Returns where each append landed, in batch order
/// (events in order, each event's recipients in order).
pub async fn deliver_batch(
    hub: &HubLifetime,
    events: &[FeedEvent],
) -> Result<Vec<Appended>, HubError> {
    let mut batch = Vec::with_capacity(events.iter().map(|e| e.recipients.len()).sum());
    for event in events {
        let payload = event.payload_with_id();
        let id = event.id.clone().unwrap_or_default();
        for user in &event.recipients {
            batch.push(FeedAppend {
                user: user.as_str().to_string(),
                id: id.clone(),
                payload: payload.clone(),
                redelivered: event.redelivered,
            });
        }
    }
    crate::metrics::add(&crate::metrics::METRICS.feed_events, events.len() as u64);
    hub.append_feed(&batch).await.map_err(|e| HubError::Other {
        kind: "IOException",
        message: e.to_string(),
    })
}

/// [`deliver_batch`] for one event.
pub async fn deliver(hub: &HubLifetime, event: &FeedEvent) -> Result<(), HubError> {
    deliver_batch(hub, std::slice::from_ref(event))
        .await
        .map(|_| ())
}
