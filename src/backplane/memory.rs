//! The in-process backplane: the single-instance default, and a way to run several "nodes"
//! in one test process (two hubs on one [`MemoryBus`] form a two-node cluster, as ASP.NET's
//! `CreateBackplane()` specification tests do).
//!
//! Messages are passed as `Arc`s, never encoded: the bus is a map from channel to the
//! inboxes of the nodes subscribed to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Backplane, BackplaneError, BackplaneMessage, Channel, Delivery, Inbox};

/// The shared bus. Clone it to give several nodes the same bus.
#[derive(Clone, Default, Debug)]
pub struct MemoryBus {
    subscribers: Arc<Mutex<Subscribers>>,
}

/// Channel → the (node id, inbox) pairs subscribed to it.
type Subscribers = HashMap<Channel, Vec<(String, Inbox)>>;

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> MemoryBus {
        MemoryBus::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many nodes are subscribed to `channel` (Redis's `PUBSUB NUMSUB`).
    pub fn subscriber_count(&self, channel: &Channel) -> usize {
        let subs = self.lock();
        subs.get(channel).map_or(0, Vec::len)
    }

    /// Every channel with at least one subscriber.
    pub fn channels(&self) -> Vec<Channel> {
        let subs = self.lock();
        subs.keys().cloned().collect()
    }
}

/// One node's handle on a [`MemoryBus`].
#[derive(Debug)]
pub struct MemoryBackplane {
    bus: MemoryBus,
    node_id: String,
    inbox: Inbox,
}

impl MemoryBackplane {
    /// Joins `bus` as node `node_id`, delivering inbound messages to `inbox`.
    pub fn new(bus: MemoryBus, node_id: impl Into<String>, inbox: Inbox) -> MemoryBackplane {
        MemoryBackplane {
            bus,
            node_id: node_id.into(),
            inbox,
        }
    }
}

#[async_trait]
impl Backplane for MemoryBackplane {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn publish(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<(), BackplaneError> {
        crate::metrics::inc(&crate::metrics::METRICS.backplane_published);
        let targets: Vec<Inbox> = {
            let subs = self.bus.lock();
            // The origin node already delivered to its local connections (local-first
            // fan-out), so it is skipped here instead of dropping its own message later.
            subs.get(channel)
                .map(|v| {
                    v.iter()
                        .filter(|(node, _)| message.origin.is_empty() || *node != message.origin)
                        .map(|(_, inbox)| inbox.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        for inbox in targets {
            inbox.deliver(Delivery {
                channel: channel.clone(),
                message: message.clone(),
            });
        }
        Ok(())
    }

    async fn subscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        let mut subs = self.bus.lock();
        for ch in channels {
            let list = subs.entry(ch.clone()).or_default();
            if !list.iter().any(|(n, _)| n == &self.node_id) {
                list.push((self.node_id.clone(), self.inbox.clone()));
            }
        }
        Ok(())
    }

    async fn unsubscribe(&self, channels: &[Channel]) -> Result<(), BackplaneError> {
        let mut subs = self.bus.lock();
        for ch in channels {
            if let Some(list) = subs.get_mut(ch) {
                list.retain(|(n, _)| n != &self.node_id);
                if list.is_empty() {
                    subs.remove(ch);
                }
            }
        }
        Ok(())
    }

    fn is_ready(&self) -> bool {
        true
    }
}
