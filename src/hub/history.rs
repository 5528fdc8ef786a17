//! Feed history on the node: appending feed events ([`HubLifetime::append_feed`]), their
//! cursor-checked, in-order delivery with the offset spliced in, server-side gap repair
//! (a [`Cursor`] per user with local connections; history reads run in spawned tasks, never
//! on a dispatch worker), and the reads behind the feed hub's `Recover`.
//!
//! Local delivery of an appended event takes the same path as a remote one: the node's own
//! subscription brings it back (the backplane delivers `Feed` messages to their origin
//! too), so every node sees a user's events in one order, and the cursor can tell a gap
//! from a duplicate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::cursor::{Cursor, Fetch, Step};
use super::HubLifetime;
use crate::backplane::channel::ChannelTarget;
use crate::backplane::history::splice_offset;
use crate::backplane::{Appended, BackplaneError, FeedAppend, FeedMessage, HistoryPage, Resync};
use crate::ids::UserId;
use crate::metrics::{add, inc, METRICS};
use crate::protocol::{HubMessage, Invocation, PreparedMessage, Value};

/// Waits before the retries of a failed history read during a repair.
const READ_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

/// One user's cursor, shared by the dispatch worker and the repair task.
pub(crate) type CursorCell = Arc<Mutex<Cursor<Bytes>>>;

/// What this hub's gap repair did (per hub; `/metrics` has the process totals).
#[derive(Debug, Default)]
pub struct HistoryStats {
    pub(crate) repairs: AtomicU64,
    pub(crate) repaired: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) duplicates: AtomicU64,
}

/// A snapshot of [`HistoryStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HistoryCounts {
    /// History reads started to fill a gap or resync.
    pub repairs: u64,
    /// Events delivered from history by those reads.
    pub repaired: u64,
    /// Offsets given up (neither delivered live nor still in history).
    pub lost: u64,
    /// Duplicate events dropped by the cursors.
    pub duplicates: u64,
}

fn lock(cell: &CursorCell) -> std::sync::MutexGuard<'_, Cursor<Bytes>> {
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

impl HubLifetime {
    /// Appends feed events to their users' histories and publishes them (one backplane
    /// call: one Redis round trip for the batch), in slice order. Connections, here and
    /// on other nodes, get them through their subscriptions.
    pub async fn append_feed(&self, batch: &[FeedAppend]) -> Result<Vec<Appended>, BackplaneError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self.backplane.append(batch).await {
            Ok(done) => {
                let dups = done.iter().filter(|a| a.duplicate).count() as u64;
                add(&METRICS.history_appends, done.len() as u64 - dups);
                add(&METRICS.history_duplicates, dups);
                // A hub with ASP.NET interop: ASP.NET servers get a copy on `H:user:{id}`.
                self.aspnet_feed_copies(batch, &done).await;
                Ok(done)
            }
            Err(e) => {
                inc(&METRICS.backplane_errors);
                Err(e)
            }
        }
    }

    /// Reads `user`'s history after `since` (`None`: the newest `limit` events).
    pub async fn read_history(
        &self,
        user: &UserId,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BackplaneError> {
        self.backplane.history(user.as_str(), since, limit).await
    }

    /// The gap-repair counters of this hub.
    pub fn history_counts(&self) -> HistoryCounts {
        let s = &self.history_stats;
        HistoryCounts {
            repairs: s.repairs.load(Ordering::Relaxed),
            repaired: s.repaired.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            duplicates: s.duplicates.load(Ordering::Relaxed),
        }
    }

    /// A feed event from the backplane (this node's own appends included). Never waits.
    pub(super) fn on_feed(&self, target: &ChannelTarget, msg: &FeedMessage) {
        let ChannelTarget::User(user) = target else {
            return;
        };
        if self.registry.user_connection_count(user) == 0 {
            return;
        }
        if !self.def.options.history {
            // A hub without history: deliver as is, no checks.
            self.deliver_feed(user, msg.offset, &msg.payload);
            return;
        }
        let cell = self.cursor(user);
        let fetch = {
            let mut cursor = lock(&cell);
            let step = cursor.on_event(&msg.epoch, msg.offset, msg.payload.clone());
            self.apply(user, step)
        };
        if let Some(fetch) = fetch {
            self.spawn_repair(user.clone(), cell, fetch);
        }
    }

    fn cursor(&self, user: &UserId) -> CursorCell {
        self.cursors.entry(user.clone()).or_default().clone()
    }

    /// Forgets the cursor of a user without local connections.
    pub(super) fn drop_cursor(&self, user: &UserId) {
        self.cursors.remove(user);
    }

    /// A user's first connection here: read the history's position in the background, so
    /// that a resync can repair from it even before the first event arrives.
    pub(super) fn init_cursor(&self, user: &UserId) {
        if !self.def.options.history {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let user = user.clone();
        tokio::spawn(async move {
            if let Ok(page) = me.backplane.history(user.as_str(), None, 0).await {
                if me.registry.user_connection_count(&user) > 0 {
                    lock(&me.cursor(&user)).init(&page.epoch, page.offset);
                }
            }
        });
    }

    /// Delivers a cursor step (under the cursor's lock, so deliveries keep offset order)
    /// and records it; returns the read to make next.
    fn apply(&self, user: &UserId, step: Step<Bytes>) -> Option<Fetch> {
        for (offset, payload) in &step.deliver {
            self.deliver_feed(user, *offset, payload);
        }
        let s = &self.history_stats;
        if step.duplicates > 0 {
            s.duplicates.fetch_add(step.duplicates, Ordering::Relaxed);
            add(&METRICS.feed_duplicates_dropped, step.duplicates);
        }
        if step.repaired > 0 {
            s.repaired.fetch_add(step.repaired, Ordering::Relaxed);
            add(&METRICS.gap_repaired_events, step.repaired);
        }
        if step.lost > 0 {
            s.lost.fetch_add(step.lost, Ordering::Relaxed);
            add(&METRICS.gap_lost_events, step.lost);
            tracing::warn!(user = %user, lost = step.lost, "feed events lost: not in history any more");
        }
        step.fetch
    }

    /// `FeedUpdated(<payload with "offset">)` to the user's local connections.
    fn deliver_feed(&self, user: &UserId, offset: u64, payload: &Bytes) {
        let body = match splice_offset(payload, offset) {
            Some(b) => b,
            None => {
                inc(&METRICS.feed_without_offset);
                payload.clone()
            }
        };
        let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
            self.def.options.feed_target.clone(),
            vec![Value::json_unchecked(body)],
        )));
        self.registry.for_each_of_user(user, |c| {
            let _ = c.send_prepared(&prepared);
        });
    }

    /// Messages may have been lost (the backplane resubscribed, or the inbox dropped some):
    /// read the affected users' histories after their last positions.
    pub fn resync(&self, which: &Resync) {
        if !self.def.options.history {
            return;
        }
        let users: Vec<UserId> = match which {
            Resync::All => self.cursors.iter().map(|e| e.key().clone()).collect(),
            Resync::Channels(channels) => channels
                .iter()
                .filter_map(|ch| match self.scheme.parse(ch) {
                    Some(ChannelTarget::User(u)) => Some(u),
                    _ => None,
                })
                .collect(),
        };
        for user in users {
            let Some(cell) = self.cursors.get(&user).map(|c| c.clone()) else {
                continue;
            };
            let fetch = lock(&cell).on_resync();
            if let Some(fetch) = fetch {
                self.spawn_repair(user, cell, fetch);
            }
        }
    }

    fn spawn_repair(&self, user: UserId, cell: CursorCell, fetch: Fetch) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move { me.repair(user, cell, fetch).await });
    }

    async fn repair(self: Arc<Self>, user: UserId, cell: CursorCell, mut fetch: Fetch) {
        let limit = self.def.options.recover_limit.max(1);
        loop {
            self.history_stats.repairs.fetch_add(1, Ordering::Relaxed);
            inc(&METRICS.gap_repairs);
            let mut page = self
                .backplane
                .history(user.as_str(), Some(fetch.since), limit)
                .await;
            for wait in READ_RETRIES {
                if page.is_ok() {
                    break;
                }
                tokio::time::sleep(wait).await;
                page = self
                    .backplane
                    .history(user.as_str(), Some(fetch.since), limit)
                    .await;
            }
            let next = {
                let mut cursor = lock(&cell);
                let step = match page {
                    Ok(p) => cursor.on_page(fetch.generation, &p.epoch, p.offset, p.events),
                    Err(e) => {
                        tracing::warn!(user = %user, error = %e, "history read for a gap repair failed");
                        cursor.on_fetch_failed(fetch.generation)
                    }
                };
                self.apply(&user, step)
            };
            match next {
                Some(f) => fetch = f,
                None => return,
            }
        }
    }
}
