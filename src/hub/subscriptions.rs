//! Reference-counted backplane subscriptions: a node listens to a user's (or group's)
//! channel only while it holds at least one local member.
//!
//! - The first local member subscribes, and the caller awaits it, so nothing published after
//!   the handshake is missed (ASP.NET awaits the same inside `OnConnectedAsync`).
//! - The last member leaving schedules an unsubscribe after a debounce, which re-checks the
//!   count first: a page reload (leave, then join within the debounce) costs nothing.
//! - Subscribe and unsubscribe of one channel are serialised by a sharded async lock, so an
//!   unsubscribe can never overtake a later subscribe (ASP.NET's `RedisSubscriptionManager`
//!   uses one global lock; Centrifuge shards, as we do).
//! - Batching: each channel is (un)subscribed through the backplane as soon as needed; a
//!   network backplane coalesces the calls that are in flight at once (the Redis backplane
//!   sends one SUBSCRIBE or UNSUBSCRIBE for all of them), so a burst of connects or a wave
//!   of debounced unsubscribes costs a few round trips, not one per channel.
//! - A failed subscribe leaves the count raised but the channel marked unsubscribed, so the
//!   next member retries, and the connection that saw the failure gets an error.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backplane::{Backplane, BackplaneError, Channel};

const LOCK_SHARDS: usize = 64;

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    count: usize,
    subscribed: bool,
}

/// The subscription manager of one hub on one node.
pub struct Subscriptions {
    backplane: Arc<dyn Backplane>,
    state: Mutex<HashMap<Channel, Entry>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    debounce: Duration,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("debounce", &self.debounce)
            .finish_non_exhaustive()
    }
}

impl Subscriptions {
    /// A manager over `backplane`.
    pub fn new(backplane: Arc<dyn Backplane>, debounce: Duration) -> Arc<Subscriptions> {
        Arc::new(Subscriptions {
            backplane,
            state: Mutex::new(HashMap::new()),
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            debounce,
        })
    }

    fn lock_for(&self, ch: &Channel) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ch.hash(&mut h);
        let idx = (h.finish() as usize) % self.locks.len();
        // `idx` is reduced modulo the length, so the index is always in range.
        &self.locks[idx]
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut HashMap<Channel, Entry>) -> R) -> R {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut st)
    }

    /// Adds a member to `channel`, subscribing if this node is not subscribed yet.
    pub async fn acquire(&self, channel: &Channel) -> Result<(), BackplaneError> {
        let _guard = self.lock_for(channel).lock().await;
        let needs = self.with_state(|st| {
            let e = st.entry(channel.clone()).or_default();
            e.count += 1;
            !e.subscribed
        });
        if needs {
            self.backplane
                .subscribe(std::slice::from_ref(channel))
                .await?;
            self.with_state(|st| {
                if let Some(e) = st.get_mut(channel) {
                    e.subscribed = true;
                }
            });
        }
        Ok(())
    }

    /// Removes a member from `channel`; the last one out schedules a debounced, re-checked
    /// unsubscribe (`immediate` skips the debounce, for one-off channels such as a
    /// connection's own).
    pub fn release(self: &Arc<Self>, channel: Channel, immediate: bool) {
        let last = self.with_state(|st| match st.get_mut(&channel) {
            Some(e) => {
                e.count = e.count.saturating_sub(1);
                e.count == 0
            }
            None => false,
        });
        if !last {
            return;
        }
        let this = self.clone();
        let delay = if immediate {
            Duration::ZERO
        } else {
            self.debounce
        };
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            this.unsubscribe_if_unused(&channel).await;
        });
    }

    async fn unsubscribe_if_unused(&self, channel: &Channel) {
        let _guard = self.lock_for(channel).lock().await;
        let unused = self.with_state(|st| match st.get(channel) {
            Some(e) if e.count == 0 => {
                let was = e.subscribed;
                st.remove(channel);
                was
            }
            _ => false,
        });
        if unused {
            if let Err(e) = self
                .backplane
                .unsubscribe(std::slice::from_ref(channel))
                .await
            {
                tracing::warn!(channel = %channel, error = %e, "unsubscribe failed");
            }
        }
    }

    /// Whether this node is subscribed to `channel` (members or not: an unsubscribe may be
    /// waiting for its debounce).
    pub fn is_subscribed(&self, channel: &Channel) -> bool {
        self.with_state(|st| st.get(channel).is_some_and(|e| e.subscribed))
    }

    /// Local member count of `channel`.
    pub fn count(&self, channel: &Channel) -> usize {
        self.with_state(|st| st.get(channel).map_or(0, |e| e.count))
    }
}
