//! The in-process backplane: the single-instance default, and a way to run several "nodes"
//! in one test process (two hubs on one [`MemoryBus`] form a two-node cluster, as ASP.NET's
//! `CreateBackplane()` specification tests do).
//!
//! Messages are passed as `Arc`s, never encoded: the bus is a map from channel to the
//! inboxes of the nodes subscribed to it.
//!
//! The Azure REST API's user groups live on the bus too (per hub scope and user, a map of
//! group → end, ended ones dropped on touch and in a sweep every few thousand adds).
//!
//! Feed history lives on the bus too (so every "node" of a test cluster reads the same
//! one): per user a `VecDeque` of at most `size` events, none older than `ttl`, and a
//! position (a random epoch made when the user's history is created, and the top offset).
//! Offset assignment, storing and publishing happen under one lock, so per-user order is
//! append order. A position unused for `max(4 × ttl, 24 h)` is forgotten (a later append
//! starts a new epoch), as the Redis meta key expires. A process restart loses everything:
//! new epochs, so clients get `recovered: false`, never a wrong `true`.
//!
//! Memory per user: about 120 bytes for the position plus, per kept event, its payload and
//! id plus about 80 bytes; at most `size` events per user, and only for users who received
//! an event in the last `ttl` (older events are dropped on the next touch or sweep).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::history::{HistoryConfig, REDELIVERY_SCAN};
use super::{
    new_epoch, Appended, Backplane, BackplaneError, BackplaneMessage, BackplanePayload, Channel,
    Delivery, FeedAppend, FeedMessage, HistoryPage, Inbox,
};

/// The shared bus. Clone it to give several nodes the same bus.
#[derive(Clone, Default, Debug)]
pub struct MemoryBus {
    subscribers: Arc<Mutex<Subscribers>>,
    histories: Arc<Mutex<Histories>>,
    user_groups: Arc<Mutex<UserGroups>>,
}

/// (hub scope, user) → group → end (Unix ms): the Azure REST API's user groups.
#[derive(Debug, Default)]
struct UserGroups {
    users: HashMap<(String, String), HashMap<String, u64>>,
    since_sweep: u64,
}

impl UserGroups {
    /// Drops ended memberships of every user (bounded memory: users never looked at again).
    fn sweep(&mut self, now_ms: u64) {
        self.users.retain(|_, groups| {
            groups.retain(|_, end| *end > now_ms);
            !groups.is_empty()
        });
        self.since_sweep = 0;
    }
}

/// Appends between two sweeps of idle users.
const SWEEP_EVERY: u64 = 4096;

/// Every user's history on the bus.
#[derive(Debug, Default)]
struct Histories {
    users: HashMap<String, UserHistory>,
    since_sweep: u64,
}

#[derive(Debug)]
struct UserHistory {
    epoch: Arc<str>,
    top: u64,
    events: VecDeque<Stored>,
    touched: Instant,
}

#[derive(Debug)]
struct Stored {
    offset: u64,
    id: String,
    payload: Bytes,
    at: Instant,
}

impl Histories {
    /// The user's history, created (new epoch) when missing or forgotten; expired events
    /// dropped.
    fn user(&mut self, user: &str, cfg: &HistoryConfig, now: Instant) -> &mut UserHistory {
        let meta_ttl = cfg.meta_ttl();
        let h = self
            .users
            .entry(user.to_string())
            .or_insert_with(|| UserHistory {
                epoch: new_epoch(),
                top: 0,
                events: VecDeque::new(),
                touched: now,
            });
        if now.saturating_duration_since(h.touched) > meta_ttl {
            *h = UserHistory {
                epoch: new_epoch(),
                top: 0,
                events: VecDeque::new(),
                touched: now,
            };
        }
        h.expire(cfg.ttl, now);
        h
    }

    fn sweep(&mut self, cfg: &HistoryConfig, now: Instant) {
        let meta_ttl = cfg.meta_ttl();
        self.users.retain(|_, h| {
            h.expire(cfg.ttl, now);
            now.saturating_duration_since(h.touched) <= meta_ttl
        });
        self.since_sweep = 0;
    }
}

impl UserHistory {
    fn expire(&mut self, ttl: Duration, now: Instant) {
        while self
            .events
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > ttl)
        {
            self.events.pop_front();
        }
    }
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

    fn lock_histories(&self) -> std::sync::MutexGuard<'_, Histories> {
        self.histories.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_user_groups(&self) -> std::sync::MutexGuard<'_, UserGroups> {
        self.user_groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets every history (as a Redis restart without persistence would): the next
    /// append or read starts a new epoch.
    pub fn forget_histories(&self) {
        self.lock_histories().users.clear();
    }

    /// The inboxes subscribed to `channel`, except `skip_node`'s (empty: none skipped).
    fn targets(&self, channel: &Channel, skip_node: &str) -> Vec<Inbox> {
        let subs = self.lock();
        subs.get(channel)
            .map(|v| {
                v.iter()
                    .filter(|(node, _)| skip_node.is_empty() || node != skip_node)
                    .map(|(_, inbox)| inbox.clone())
                    .collect()
            })
            .unwrap_or_default()
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
    history: HistoryConfig,
}

impl MemoryBackplane {
    /// Joins `bus` as node `node_id`, delivering inbound messages to `inbox`.
    pub fn new(bus: MemoryBus, node_id: impl Into<String>, inbox: Inbox) -> MemoryBackplane {
        MemoryBackplane {
            bus,
            node_id: node_id.into(),
            inbox,
            history: HistoryConfig::default(),
        }
    }

    /// Uses these history bounds (default [`HistoryConfig::default`]).
    pub fn with_history(mut self, history: HistoryConfig) -> MemoryBackplane {
        self.history = history;
        self
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
        // The origin node already delivered to its local connections (local-first fan-out),
        // so it is skipped here instead of dropping its own message later.
        let targets = self.bus.targets(channel, &message.origin);
        for inbox in targets {
            inbox.deliver(Delivery {
                channel: channel.clone(),
                message: message.clone(),
            });
        }
        Ok(())
    }

    async fn publish_reaching(
        &self,
        channel: &Channel,
        message: Arc<BackplaneMessage>,
    ) -> Result<Option<usize>, BackplaneError> {
        let n = self.bus.subscriber_count(channel);
        self.publish(channel, message).await.map(|()| Some(n))
    }

    async fn subscribers(
        &self,
        channels: &[Channel],
    ) -> Result<Option<Vec<usize>>, BackplaneError> {
        Ok(Some(
            channels
                .iter()
                .map(|c| self.bus.subscriber_count(c))
                .collect(),
        ))
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

    async fn append(&self, batch: &[FeedAppend]) -> Result<Vec<Appended>, BackplaneError> {
        let cfg = &self.history;
        let now = Instant::now();
        let mut out = Vec::with_capacity(batch.len());
        // One lock for offset, store and publish: per-user order is append order on every
        // node (the inboxes are handed the message before the next offset is taken).
        let mut all = self.bus.lock_histories();
        for event in batch {
            let h = all.user(&event.user, cfg, now);
            h.touched = now;
            if event.redelivered && !event.id.is_empty() {
                if let Some(found) = h
                    .events
                    .iter()
                    .rev()
                    .take(REDELIVERY_SCAN)
                    .find(|e| e.id == event.id)
                {
                    out.push(Appended {
                        offset: found.offset,
                        epoch: h.epoch.clone(),
                        duplicate: true,
                    });
                    continue;
                }
            }
            h.top += 1;
            let offset = h.top;
            h.events.push_back(Stored {
                offset,
                id: event.id.clone(),
                payload: event.payload.clone(),
                at: now,
            });
            while h.events.len() > cfg.size {
                h.events.pop_front();
            }
            let epoch = h.epoch.clone();
            let channel = cfg.channel(&event.user);
            let message = Arc::new(BackplaneMessage {
                origin: self.node_id.clone(),
                payload: BackplanePayload::Feed(FeedMessage {
                    user: event.user.clone(),
                    offset,
                    epoch: epoch.clone(),
                    id: event.id.clone(),
                    payload: event.payload.clone(),
                }),
            });
            crate::metrics::inc(&crate::metrics::METRICS.backplane_published);
            // Every subscribed node, this one included: local delivery takes the same path.
            for inbox in self.bus.targets(&channel, "") {
                inbox.deliver(Delivery {
                    channel: channel.clone(),
                    message: message.clone(),
                });
            }
            out.push(Appended {
                offset,
                epoch,
                duplicate: false,
            });
        }
        all.since_sweep += batch.len() as u64;
        if all.since_sweep >= SWEEP_EVERY {
            all.sweep(cfg, now);
        }
        Ok(out)
    }

    async fn user_group_add(
        &self,
        scope: &str,
        user: &str,
        group: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), BackplaneError> {
        let mut all = self.bus.lock_user_groups();
        let groups = all
            .users
            .entry((scope.to_string(), user.to_string()))
            .or_default();
        groups.retain(|_, end| *end > now_ms);
        groups.insert(group.to_string(), expires_ms);
        while groups.len() > super::MAX_USER_GROUPS {
            // The membership ending soonest goes first.
            let Some(soonest) = groups
                .iter()
                .min_by_key(|(_, end)| **end)
                .map(|(g, _)| g.clone())
            else {
                break;
            };
            groups.remove(&soonest);
        }
        all.since_sweep += 1;
        if all.since_sweep >= SWEEP_EVERY {
            all.sweep(now_ms);
        }
        Ok(())
    }

    async fn user_group_remove(
        &self,
        scope: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<(), BackplaneError> {
        let mut all = self.bus.lock_user_groups();
        let key = (scope.to_string(), user.to_string());
        match group {
            None => {
                all.users.remove(&key);
            }
            Some(g) => {
                if let Some(groups) = all.users.get_mut(&key) {
                    groups.remove(g);
                    if groups.is_empty() {
                        all.users.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    async fn user_groups(
        &self,
        scope: &str,
        user: &str,
        now_ms: u64,
    ) -> Result<Vec<super::UserGroup>, BackplaneError> {
        let all = self.bus.lock_user_groups();
        Ok(all
            .users
            .get(&(scope.to_string(), user.to_string()))
            .map(|groups| {
                groups
                    .iter()
                    .filter(|(_, end)| **end > now_ms)
                    .map(|(g, end)| super::UserGroup {
                        group: g.clone(),
                        expires_ms: *end,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn history(
        &self,
        user: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        let now = Instant::now();
        let mut all = self.bus.lock_histories();
        let h = all.user(user, &self.history, now);
        let events: Vec<(u64, Bytes)> = match since {
            None => {
                let skip = h.events.len().saturating_sub(limit);
                h.events
                    .iter()
                    .skip(skip)
                    .map(|e| (e.offset, e.payload.clone()))
                    .collect()
            }
            Some(s) => h
                .events
                .iter()
                .filter(|e| e.offset > s)
                .take(limit)
                .map(|e| (e.offset, e.payload.clone()))
                .collect(),
        };
        let complete = HistoryPage::is_complete(since, h.top, &events);
        Ok(HistoryPage {
            epoch: h.epoch.clone(),
            offset: h.top,
            events,
            complete,
        })
    }
}
